//! The stage executor behind `shrink run`: each recipe stage runs the same code as its
//! subcommand, with the options the recipe gives.

use anyhow::Result;

use super::bench::BenchArgs;
use super::gate::GateArgs;
use super::quantize::QuantizeArgs;
use super::ExitStatus;
use crate::gate::Budgets;
use crate::recipe::schema::{BenchOptions, GateOptions, QuantizeOptions};
use crate::recipe::{Plan, PlannedStage, Recipe, StageExecutor, StageOptions, StageResult};

#[derive(Default)]
pub struct ShrinkExecutor;

fn budgets_of(g: &GateOptions) -> Result<Budgets> {
    let b = match &g.budgets {
        Some(b) => serde_norway::from_value::<Budgets>(b.value.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Budgets::default(),
    };
    b.validate()?;
    Ok(b)
}

fn bench_args(b: &BenchOptions) -> BenchArgs {
    let models = b
        .models
        .iter()
        .map(|m| match &m.name {
            Some(n) => format!("{n}={}", m.model.path.display()),
            None => m.model.path.display().to_string(),
        })
        .collect();
    BenchArgs {
        models,
        backend: b.backend,
        device: b.device,
        target: b.target,
        threads: b.threads,
        batch_size: b.batch_size,
        warmup: b.warmup,
        iterations: b.iterations,
        duration: None,
        data: b.data.as_ref().map(|d| d.dataset.path.clone()),
        preprocess: b
            .data
            .as_ref()
            .map(|d| d.dataset.preprocess.clone())
            .unwrap_or_default(),
        reference: b.reference.as_ref().map(|r| r.path.clone()),
        no_memory: false,
        json: Some(b.report.path.clone()),
        markdown: b.markdown.as_ref().map(|m| m.path.clone()),
        html: b.html.as_ref().map(|m| m.path.clone()),
        ort_lib: None,
        seed: 0,
    }
}

fn quantize_args(q: &QuantizeOptions) -> Result<QuantizeArgs> {
    use crate::recipe::schema::{ActivationType as A, Precision, QuantFormat, QuantTarget as T};
    let c = q.calibration.as_ref();
    if q.precision == Precision::Int8 {
        anyhow::ensure!(
            c.is_some(),
            "the quantize stage needs `calibration: {{ data: ... }}`"
        );
    }
    Ok(QuantizeArgs {
        model: q.model.path.clone(),
        calib: c.map(|c| c.data.dataset.path.clone()),
        out: q.out.path.clone(),
        method: c.map_or("auto", |c| c.method.name()).parse()?,
        percentile: c.map_or(crate::quant::calib::DEFAULT_PERCENTILE, |c| c.percentile),
        precision: match q.precision {
            Precision::Int8 => super::quantize::Precision::Int8,
            Precision::Fp16 => super::quantize::Precision::Fp16,
        },
        fp16_io: q.fp16_io,
        per_tensor: q.per_tensor,
        activation_type: match q.activation_type {
            A::U8 => super::quantize::ActivationType::U8,
            A::I8 => super::quantize::ActivationType::I8,
        },
        format: match q.format {
            QuantFormat::Qdq => super::quantize::Format::Qdq,
            QuantFormat::Qoperator => super::quantize::Format::Qoperator,
        },
        target: match q.target {
            T::Ort => crate::quant::qdq::QuantTarget::Ort,
            T::Tract => crate::quant::qdq::QuantTarget::Tract,
            T::Tensorrt => crate::quant::qdq::QuantTarget::Tensorrt,
        },
        calib_samples: c.map_or(300, |c| c.samples),
        exclude: q.exclude.clone(),
        exclude_op: q.exclude_op.clone(),
        no_bias_correction: !q.bias_correction,
        equalize: q.equalize,
        eval: q.eval.as_ref().map(|e| e.dataset.path.clone()),
        max_accuracy_drop: q.max_accuracy_drop,
        report: q.report.as_ref().map(|r| r.path.clone()),
        save_prepared: None,
        preprocess: c
            .map(|c| &c.data)
            .or(q.eval.as_ref())
            .map(|d| d.dataset.preprocess.clone())
            .unwrap_or_default(),
        calib_backend: crate::runtime::BackendKind::Tract,
        threads: None,
        seed: q.seed,
        ort_lib: None,
    })
}

impl StageExecutor for ShrinkExecutor {
    fn check(&mut self, recipe: &Recipe, plan: &Plan) -> Result<()> {
        for st in &plan.stages {
            if let StageOptions::Gate(g) = &st.options {
                budgets_of(g)
                    .map_err(|e| recipe.error_at("stages.gate.budgets", format!("{e:#}")))?;
            }
        }
        Ok(())
    }

    fn run_stage(&mut self, stage: &PlannedStage) -> Result<StageResult> {
        match &stage.options {
            StageOptions::Bench(b) => {
                let report = super::bench::run_bench(&bench_args(b))?;
                print!("{}", crate::bench::render::markdown(&report));
                Ok(StageResult::done(vec![]))
            }
            StageOptions::Distill(o) => {
                super::distill::run_with(&super::distill::distill_options(o), &[], None)?;
                Ok(StageResult::done(vec![]))
            }
            StageOptions::Train(o) => {
                super::distill::run_with(&super::distill::train_options(o), &[], None)?;
                Ok(StageResult::done(vec![]))
            }
            StageOptions::Quantize(q) => {
                super::quantize::run_quantize(&quantize_args(q)?)?;
                Ok(StageResult::done(vec![]))
            }
            StageOptions::Gate(g) => {
                let args = GateArgs {
                    report: g.report.path.clone(),
                    baseline: g.baseline.as_ref().map(|b| b.path.clone()),
                    budget: None,
                    model: g.model.clone(),
                    allow_mismatch: g.allow_mismatch,
                    alpha: 0.05,
                    seed: 0,
                    json: false,
                    junit: None,
                    markdown: None,
                    update_baseline: g.update_baseline,
                    force: false,
                };
                let status = super::gate::gate_with_budgets(&args, &budgets_of(g)?)?;
                Ok(StageResult::gate(status == ExitStatus::Success))
            }
        }
    }
}
