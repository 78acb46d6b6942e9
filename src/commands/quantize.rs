//! `shrink quantize MODEL --calib DATA --out OUT.onnx`: int8 post-training quantization, or
//! `--precision fp16` conversion.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::reporters::BarReporter;
use super::ExitStatus;
use crate::bench::measure::{accuracy_of, sample_shape};
use crate::data::{Dataset, Preprocess};
use crate::hint::HintExt;
use crate::onnx::Model;
use crate::quant::calib::{Method, RangeOptions, DEFAULT_PERCENTILE};
use crate::quant::prepare::{prepare, Prepared};
use crate::quant::qdq::{
    quantize, sensitivity, QuantOptions, QuantProgress, QuantReport, QuantTarget, Runner,
};
use crate::quant::QType;
use crate::runtime::{self, BackendKind, RuntimeOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ActivationType {
    /// uint8, asymmetric (zero point anywhere in 0..=255).
    #[default]
    U8,
    /// int8, symmetric (zero point 0).
    I8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Precision {
    /// int8 weights and activations, calibrated on `--calib`.
    #[default]
    Int8,
    /// float16 weights and compute; needs no calibration.
    Fp16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Qdq,
    Qoperator,
}

#[derive(Debug, Clone, clap::Args)]
pub struct QuantizeArgs {
    /// The float ONNX model.
    pub model: PathBuf,
    /// Representative inputs for calibration (npz, IDX or image folder); required for int8.
    /// With `--precision fp16` they are used, when given, to compare outputs before and after.
    #[arg(long, value_name = "DATA")]
    pub calib: Option<PathBuf>,
    /// Where to write the quantized model.
    #[arg(long, value_name = "OUT.onnx")]
    pub out: PathBuf,
    /// How activation ranges are chosen: auto picks, per tensor, the method with the lowest
    /// estimated quantization error.
    #[arg(long, default_value = "auto", value_parser = parse_method)]
    pub method: Method,
    /// Percentile for `--method percentile`.
    #[arg(long, default_value_t = DEFAULT_PERCENTILE)]
    pub percentile: f64,
    /// One scale per weight tensor instead of one per output channel.
    #[arg(long)]
    pub per_tensor: bool,
    #[arg(long, value_enum, default_value_t = ActivationType::U8)]
    pub activation_type: ActivationType,
    /// Output form: QuantizeLinear/DequantizeLinear pairs around float ops (qdq), or integer
    /// operators QLinearConv/QLinearMatMul (qoperator).
    #[arg(long, value_enum, default_value_t = Format::Qdq)]
    pub format: Format,
    /// int8 quantization, or float16 conversion (about half the size, no calibration).
    #[arg(long, value_enum, default_value_t = Precision::Int8)]
    pub precision: Precision,
    /// With `--precision fp16`: make the model's inputs and outputs float16 too (by default
    /// they stay float32 and the graph casts them).
    #[arg(long)]
    pub fp16_io: bool,
    /// The runtime the model is meant for; applies its rules (symmetry, which ops).
    #[arg(long, value_enum, default_value_t = QuantTarget::Ort)]
    pub target: QuantTarget,
    /// Calibration samples, drawn with --seed.
    #[arg(long, default_value_t = 300)]
    pub calib_samples: usize,
    /// Keep these nodes in float (comma-separated node names).
    #[arg(long, value_delimiter = ',', value_name = "NODE,..")]
    pub exclude: Vec<String>,
    /// Keep every node of these op types in float.
    #[arg(long, value_delimiter = ',', value_name = "OP,..")]
    pub exclude_op: Vec<String>,
    /// Skip bias correction (on by default).
    #[arg(long)]
    pub no_bias_correction: bool,
    /// Cross-layer equalization of Conv → ReLU → Conv pairs before quantizing (helps
    /// depthwise-separable nets whose channels have very different ranges).
    #[arg(long)]
    pub equalize: bool,
    /// Labelled data to measure accuracy before and after.
    #[arg(long, value_name = "DATA")]
    pub eval: Option<PathBuf>,
    /// With --eval: return the most sensitive layers to float until top-1 drops at most
    /// this many points.
    #[arg(long, value_name = "POINTS", requires = "eval")]
    pub max_accuracy_drop: Option<f64>,
    /// Write the quantization report (JSON) here; a Markdown version goes next to it.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// Also write the prepared float model (BN folded, opset raised) here, for debugging.
    #[arg(long, value_name = "PATH")]
    pub save_prepared: Option<PathBuf>,
    #[command(flatten)]
    pub preprocess: Preprocess,
    /// Backend that runs the calibration passes.
    #[arg(long, value_enum, default_value_t = BackendKind::Tract)]
    pub calib_backend: BackendKind,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
}

fn parse_method(s: &str) -> Result<Method, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// Calibration through a runtime session over a seeded subset of the dataset.
struct DatasetRunner<'a> {
    ds: &'a Dataset,
    indices: Vec<usize>,
    rt: RuntimeOptions,
    batch: usize,
    bar: &'a BarReporter,
}

impl Runner for DatasetRunner<'_> {
    fn run(&mut self, model: &Model, sink: &mut crate::quant::qdq::OutputSink<'_>) -> Result<()> {
        let bytes = prost::Message::encode_to_vec(&model.to_proto());
        let names: Vec<String> = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        let [c, h, w] = self.ds.sample_shape();
        let batch = calibration_batch(model, self.batch);
        // One session at a time: only the last batch can be smaller, and a second session
        // would hold a second copy of the runtime's buffers.
        let mut session: Option<(usize, Box<dyn runtime::Session>)> = None;
        let rt = self.rt.clone();
        self.bar.start("calibrating", self.indices.len() as u64);
        self.ds.for_each_subset_batch(&self.indices, batch, |b| {
            let n = b.shape[0];
            if session.as_ref().is_none_or(|(k, _)| *k != n) {
                session = None;
                session = Some((
                    n,
                    runtime::open(&bytes, &[n, c, h, w], &rt)
                        .context("cannot run the model for calibration")?,
                ));
            }
            let s = &mut session.as_mut().expect("opened above").1;
            let outs = s.run(&b.x)?;
            ensure!(
                outs.len() == names.len(),
                "the calibration model returned {} outputs for {} requested",
                outs.len(),
                names.len()
            );
            for (name, o) in names.iter().zip(&outs) {
                sink(name, &o.shape, &o.data)?;
            }
            self.bar.advance(n as u64);
            Ok(())
        })?;
        self.bar.done();
        Ok(())
    }
}

/// Calibration batch size: at most `max`, and small enough that one batch of every requested
/// output stays near 128 MiB (the runtime holds them all at once), so calibrating ResNet-size
/// models does not need gigabytes.
fn calibration_batch(model: &Model, max: usize) -> usize {
    const BUDGET: usize = 128 << 20;
    let per_sample = crate::onnx::shape::input_shapes(&model.graph, 1)
        .and_then(|s| crate::onnx::shape::infer(&model.graph, &s))
        .map(|s| {
            model
                .graph
                .outputs
                .iter()
                .filter_map(|o| s.shapes.get(&o.name))
                .map(|d| d.iter().product::<usize>() * 4)
                .sum::<usize>()
        })
        .unwrap_or(0);
    if per_sample == 0 {
        return max;
    }
    (BUDGET / per_sample).clamp(1, max)
}

impl QuantProgress for BarReporter {
    fn pass(&self, label: &str) {
        crate::printer::info(format!("{label}..."));
    }
}

#[derive(Debug, Serialize)]
struct Sensitivity {
    node: String,
    /// 1 is the most sensitive.
    rank: usize,
    output_sqnr_db: f64,
    kept_float: bool,
}

#[derive(Debug, Serialize)]
struct FullReport<'a> {
    schema: &'static str,
    model: String,
    out: String,
    size_before_bytes: u64,
    size_after_bytes: u64,
    size_ratio: f64,
    calib: String,
    calib_samples: usize,
    /// Which samples of the calibration data were used (ascending), so that another tool
    /// can be calibrated on exactly the same ones.
    calib_indices: &'a [usize],
    seed: u64,
    prepared: &'a Prepared,
    accuracy_before_top1: Option<f64>,
    accuracy_after_top1: Option<f64>,
    accuracy_drop_pts: Option<f64>,
    kept_float_for_accuracy: Vec<String>,
    qoperator: Option<crate::quant::qoperator::QOperatorReport>,
    /// Filled by the accuracy-aware search: output SQNR with only that layer quantized.
    sensitivity: Vec<Sensitivity>,
    #[serde(flatten)]
    quant: &'a QuantReport,
}

pub fn run_quantize(args: &QuantizeArgs) -> Result<ExitStatus> {
    if args.precision == Precision::Fp16 {
        return run_fp16(args);
    }
    ensure!(!args.fp16_io, "--fp16-io applies to --precision fp16 only");
    if args.format == Format::Qoperator && args.target == QuantTarget::Tensorrt {
        return Err(anyhow::anyhow!(
            "--format qoperator cannot target TensorRT, which reads QDQ models only"
        ))
        .hint("drop --format (QDQ is the default) or choose --target ort");
    }
    let calib = args
        .calib
        .as_ref()
        .context("int8 quantization needs calibration data")
        .hint("pass --calib DATA (a few hundred representative inputs: npz, IDX or an image folder), or --precision fp16, which needs none")?;
    let mut model = Model::load(&args.model)?;
    let sample = sample_shape(&model)?;
    let prepared = prepare(&mut model)
        .with_context(|| format!("cannot prepare {} for quantization", args.model.display()))?;
    if args.equalize {
        let (pairs, skipped) = crate::quant::prepare::equalize_pairs(&mut model.graph)?;
        crate::printer::info(format!("equalized {} conv pairs", pairs.len()));
        if skipped > 0 {
            crate::printer::warn(format!(
                "{skipped} conv pairs are joined by Clip (ReLU6), which equalization would change; they were left alone"
            ));
        }
    }
    if let Some(p) = &args.save_prepared {
        model.save(p)?;
    }
    ensure!(args.calib_samples > 0, "--calib-samples must be at least 1");
    ensure!(
        args.percentile > 0.0 && args.percentile <= 100.0,
        "--percentile must be in (0, 100]"
    );
    let ds = Dataset::open(calib, &args.preprocess, sample)
        .context("cannot open the calibration data")?;
    if ds.len() < args.calib_samples {
        crate::printer::warn(format!(
            "{} has {} samples; calibrating on all of them instead of {}",
            calib.display(),
            ds.len(),
            args.calib_samples
        ));
    }
    let rt = runtime_options(args);
    let bar = BarReporter::default();
    let calib_indices = ds.sample_indices(args.calib_samples, args.seed);
    let mut runner = DatasetRunner {
        ds: &ds,
        indices: calib_indices.clone(),
        rt: rt.clone(),
        batch: 32,
        bar: &bar,
    };
    let mut opts = QuantOptions {
        method: args.method,
        range: RangeOptions {
            percentile: args.percentile,
            ..Default::default()
        },
        per_channel: !args.per_tensor,
        activation: match args.activation_type {
            ActivationType::U8 => QType::U8,
            ActivationType::I8 => QType::I8,
        },
        target: args.target,
        exclude_nodes: args.exclude.clone(),
        exclude_ops: args.exclude_op.clone(),
        bias_correction: !args.no_bias_correction,
        only_nodes: None,
    };
    let (mut qmodel, mut report) = quantize(&model, &opts, &mut runner, &bar)?;
    let mut before = None;
    let mut after = None;
    let mut kept = Vec::new();
    let mut sensitivities = Vec::new();
    if let Some(eval) = &args.eval {
        let acc = |m: &Model| -> Result<f64> {
            let bytes = prost::Message::encode_to_vec(&m.to_proto());
            Ok(accuracy_of(&bytes, sample, eval, &args.preprocess, &rt)?.top1)
        };
        let b = acc(&model)?;
        let mut a = acc(&qmodel)?;
        if let Some(budget) = args
            .max_accuracy_drop
            .filter(|&budget| (b - a) * 100.0 > budget)
        {
            crate::printer::info(format!(
                "top-1 drops {:.2} points (budget {budget}); ranking layers by sensitivity...",
                (b - a) * 100.0
            ));
            let ranked = sensitivity(&model, &opts, &mut runner)?;
            for (rank, (node, sqnr)) in ranked.iter().enumerate() {
                sensitivities.push(Sensitivity {
                    node: node.clone(),
                    rank: rank + 1,
                    output_sqnr_db: *sqnr,
                    kept_float: false,
                });
            }
            // Return the most sensitive layers to float, one at a time, until the budget holds.
            for (node, _) in ranked {
                if (b - a) * 100.0 <= budget {
                    break;
                }
                if let Some(s) = sensitivities.iter_mut().find(|s| s.node == node) {
                    s.kept_float = true;
                }
                opts.exclude_nodes.push(node.clone());
                kept.push(node);
                let (m, r) = quantize(&model, &opts, &mut runner, &bar)?;
                a = acc(&m)?;
                crate::printer::info(format!(
                    "kept {} in float: top-1 {:.2}% (float {:.2}%)",
                    kept.join(", "),
                    a * 100.0,
                    b * 100.0
                ));
                qmodel = m;
                report = r;
            }
            if (b - a) * 100.0 > budget {
                crate::printer::warn(format!(
                    "with every weight layer in float the drop is still {:.2} points, over the {budget} point budget",
                    (b - a) * 100.0
                ));
            }
        }
        before = Some(b);
        after = Some(a);
    }
    let mut qoperator = None;
    if args.format == Format::Qoperator {
        let (m, r) = crate::quant::qoperator::to_qoperator(&qmodel)
            .context("cannot convert the quantized model to QOperator form")?;
        crate::printer::info(format!(
            "QOperator: {} nodes became QLinear operators, {} float islands stay between QuantizeLinear/DequantizeLinear",
            r.converted.len(),
            r.qdq_islands.len()
        ));
        qmodel = m;
        qoperator = Some(r);
    }
    qmodel
        .save(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let size_before = std::fs::metadata(&args.model)?.len();
    let size_after = std::fs::metadata(&args.out)?.len();
    let full = FullReport {
        schema: "shrink.quantize/1",
        model: args.model.display().to_string(),
        out: args.out.display().to_string(),
        size_before_bytes: size_before,
        size_after_bytes: size_after,
        size_ratio: size_after as f64 / size_before as f64,
        calib: calib.display().to_string(),
        calib_samples: args.calib_samples.min(ds.len()),
        calib_indices: &calib_indices,
        seed: args.seed,
        prepared: &prepared,
        accuracy_before_top1: before,
        accuracy_after_top1: after,
        accuracy_drop_pts: before.zip(after).map(|(b, a)| (b - a) * 100.0),
        kept_float_for_accuracy: kept,
        qoperator,
        sensitivity: sensitivities,
        quant: &report,
    };
    let md = markdown(&full);
    finish(args, &full, &md)
}

fn markdown(r: &FullReport) -> String {
    let mut s = format!(
        "**shrink quantize** — {} → {}: {} → {} bytes ({:.3}x), method {}, {} weights, {} activations, target {}\n\n",
        r.model,
        r.out,
        r.size_before_bytes,
        r.size_after_bytes,
        r.size_ratio,
        r.quant.method,
        if r.quant.per_channel { "per-channel" } else { "per-tensor" },
        r.quant.activation_type,
        r.quant.target
    );
    s.push_str(&format!(
        "target {}: {}\n\n",
        r.quant.target,
        r.quant.target_rules.join("; ")
    ));
    if let (Some(b), Some(a)) = (r.accuracy_before_top1, r.accuracy_after_top1) {
        s.push_str(&format!(
            "top-1: float {:.2}%, int8 {:.2}% (drop {:.2} points)\n\n",
            b * 100.0,
            a * 100.0,
            (b - a) * 100.0
        ));
    }
    s.push_str(
        "| layer | op | weight SQNR dB | bias correction (max abs) |\n|---|---|---:|---:|\n",
    );
    for l in &r.quant.layers {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {} |\n",
            l.node,
            l.op,
            l.weight_sqnr_db,
            l.bias_correction_max_abs
                .map(|v| format!("{v:.2e}"))
                .unwrap_or_else(|| "–".into())
        ));
    }
    s.push_str("\n| activation | method | observed | range | scale | zero point | est. SQNR dB |\n|---|---|---|---|---:|---:|---:|\n");
    for a in &r.quant.activations {
        s.push_str(&format!(
            "| {} | {} | [{:.3}, {:.3}] | [{:.3}, {:.3}] | {:.3e} | {} | {:.1} |\n",
            a.tensor,
            a.method,
            a.observed_min,
            a.observed_max,
            a.range_min,
            a.range_max,
            a.scale,
            a.zero_point,
            a.sqnr_db
        ));
    }
    if !r.quant.float_nodes.is_empty() {
        s.push_str(&format!(
            "\nkept in float: {}\n",
            r.quant.float_nodes.join(", ")
        ));
    }
    s
}

/// Options that only int8 quantization reads, named when given with `--precision fp16`.
fn int8_only_options(args: &QuantizeArgs) -> Vec<&'static str> {
    let mut given = Vec::new();
    let mut flag = |on: bool, name: &'static str| {
        if on {
            given.push(name);
        }
    };
    flag(args.per_tensor, "--per-tensor");
    flag(
        args.activation_type != ActivationType::U8,
        "--activation-type",
    );
    flag(args.format != Format::Qdq, "--format qoperator");
    flag(!args.exclude.is_empty(), "--exclude");
    flag(!args.exclude_op.is_empty(), "--exclude-op");
    flag(args.equalize, "--equalize");
    flag(args.max_accuracy_drop.is_some(), "--max-accuracy-drop");
    given
}

#[derive(Debug, Serialize)]
struct Fp16FullReport<'a> {
    schema: &'static str,
    model: String,
    out: String,
    size_before_bytes: u64,
    size_after_bytes: u64,
    size_ratio: f64,
    /// Data the outputs were compared on (`--calib`, else `--eval`), if any.
    compared_on: Option<String>,
    compared_samples: usize,
    accuracy_before_top1: Option<f64>,
    accuracy_after_top1: Option<f64>,
    accuracy_drop_pts: Option<f64>,
    #[serde(flatten)]
    fp16: &'a crate::quant::fp16::Fp16Report,
}

/// Samples the float32 and float16 models are compared on, at most.
const FP16_COMPARE_SAMPLES: usize = 256;

/// `--precision fp16`: float16 weights and compute, float32 inputs and outputs unless
/// `--fp16-io`. Outputs are compared on `--calib` (else `--eval`) data and accuracy measured
/// on `--eval`, both on the model with float32 inputs and outputs (the runtimes are fed
/// float32; the float16-I/O model computes the same values).
fn run_fp16(args: &QuantizeArgs) -> Result<ExitStatus> {
    let int8_only = int8_only_options(args);
    if !int8_only.is_empty() {
        return Err(anyhow::anyhow!(
            "{} applies to int8 quantization, not to --precision fp16",
            int8_only.join(", ")
        ))
        .hint("drop those options, or use --precision int8");
    }
    let mut model = Model::load(&args.model)?;
    let sample = sample_shape(&model)?;
    // Folding BatchNorm and dropping Identity/Dropout first: fewer float16 roundings.
    prepare(&mut model)
        .with_context(|| format!("cannot prepare {} for conversion", args.model.display()))?;
    if let Some(p) = &args.save_prepared {
        model.save(p)?;
    }
    let (half, mut report) = crate::quant::fp16::to_fp16(&model, !args.fp16_io)
        .with_context(|| format!("cannot convert {} to float16", args.model.display()))?;
    let checked = if args.fp16_io {
        crate::quant::fp16::to_fp16(&model, true)?.0
    } else {
        half.clone()
    };
    let rt = runtime_options(args);
    let float_bytes = prost::Message::encode_to_vec(&model.to_proto());
    let half_bytes = prost::Message::encode_to_vec(&checked.to_proto());

    let compare_on = args.calib.as_ref().or(args.eval.as_ref());
    let mut compared_samples = 0;
    if let Some(data) = compare_on {
        let ds = Dataset::open(data, &args.preprocess, sample)
            .with_context(|| format!("cannot open {}", data.display()))?;
        let indices = ds.sample_indices(args.calib_samples.min(FP16_COMPARE_SAMPLES), args.seed);
        let [c, h, w] = ds.sample_shape();
        // The float32 and float16 sessions for the current batch size (only the last batch
        // can be smaller).
        type Pair = (usize, Box<dyn runtime::Session>, Box<dyn runtime::Session>);
        let mut sessions: Option<Pair> = None;
        ds.for_each_subset_batch(&indices, 32, |b| {
            let n = b.shape[0];
            if sessions.as_ref().is_none_or(|(k, _, _)| *k != n) {
                sessions = None;
                let open = |bytes: &[u8], what: &str| {
                    runtime::open(bytes, &[n, c, h, w], &rt)
                        .with_context(|| format!("cannot run the {what} model"))
                };
                sessions = Some((
                    n,
                    open(&float_bytes, "float32")?,
                    open(&half_bytes, "float16")?,
                ));
            }
            let (_, f, h) = sessions.as_mut().expect("opened above");
            let fo = f.run(&b.x)?;
            let ho = h.run(&b.x)?;
            for (a, b) in fo.iter().zip(&ho) {
                report.compare(&a.data, &b.data)?;
            }
            compared_samples += n;
            Ok(())
        })?;
        if report.output_max_abs_diff.is_some_and(|d| !d.is_finite()) {
            bail!(
                "the float16 model's outputs are not finite on {} (values beyond float16's range of ±65504)",
                data.display()
            );
        }
    }
    let (mut before, mut after) = (None, None);
    if let Some(eval) = &args.eval {
        before = Some(accuracy_of(&float_bytes, sample, eval, &args.preprocess, &rt)?.top1);
        after = Some(accuracy_of(&half_bytes, sample, eval, &args.preprocess, &rt)?.top1);
    }

    half.save(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let size_before = std::fs::metadata(&args.model)?.len();
    let size_after = std::fs::metadata(&args.out)?.len();
    let full = Fp16FullReport {
        schema: "shrink.quantize.fp16/1",
        model: args.model.display().to_string(),
        out: args.out.display().to_string(),
        size_before_bytes: size_before,
        size_after_bytes: size_after,
        size_ratio: size_after as f64 / size_before as f64,
        compared_on: compare_on.map(|p| p.display().to_string()),
        compared_samples,
        accuracy_before_top1: before,
        accuracy_after_top1: after,
        accuracy_drop_pts: before.zip(after).map(|(b, a)| (b - a) * 100.0),
        fp16: &report,
    };
    let md = fp16_markdown(&full);
    finish(args, &full, &md)
}

fn fp16_markdown(r: &Fp16FullReport) -> String {
    let mut s = format!(
        "**shrink quantize --precision fp16** — {} → {}: {} → {} bytes ({:.3}x), inputs and outputs {}\n\n",
        r.model,
        r.out,
        r.size_before_bytes,
        r.size_after_bytes,
        r.size_ratio,
        if r.fp16.keep_io_types { "float32" } else { "float16" }
    );
    if let (Some(d), Some(m)) = (r.fp16.output_max_abs_diff, r.fp16.output_max_abs) {
        s.push_str(&format!(
            "outputs on {} samples of {}: max |float32 − float16| {d:.3e} (largest |output| {m:.3e})\n\n",
            r.compared_samples,
            r.compared_on.as_deref().unwrap_or("?"),
        ));
    }
    if let (Some(b), Some(a)) = (r.accuracy_before_top1, r.accuracy_after_top1) {
        s.push_str(&format!(
            "top-1: float32 {:.2}%, float16 {:.2}% (drop {:.2} points)\n\n",
            b * 100.0,
            a * 100.0,
            (b - a) * 100.0
        ));
    }
    s.push_str(&format!(
        "{} initializers stored as float16 ({} values clamped to ±65504), {} Casts inserted\n",
        r.fp16.converted_initializers, r.fp16.clamped_values, r.fp16.casts_inserted
    ));
    if !r.fp16.float32_nodes.is_empty() {
        s.push_str("\n| kept in float32 | op | why |\n|---|---|---|\n");
        for n in &r.fp16.float32_nodes {
            s.push_str(&format!("| {} | {} | {} |\n", n.node, n.op, n.reason));
        }
    }
    s
}

/// The runtime that calibration, comparison and evaluation passes run on.
fn runtime_options(args: &QuantizeArgs) -> RuntimeOptions {
    RuntimeOptions {
        backend: args.calib_backend,
        threads: args.threads.unwrap_or_else(runtime::default_threads),
        ort_lib: args.ort_lib.clone(),
        ..Default::default()
    }
}

/// Writes the report (JSON at `--report`, Markdown next to it) and prints the Markdown.
fn finish(args: &QuantizeArgs, report: &impl Serialize, md: &str) -> Result<ExitStatus> {
    if let Some(p) = &args.report {
        crate::util::write_atomic(p, serde_json::to_string_pretty(report)?.as_bytes())?;
        crate::util::write_atomic(&p.with_extension("md"), md.as_bytes())?;
    }
    print!("{md}");
    Ok(ExitStatus::Success)
}
