//! `shrink run`: loads a recipe, validates it in full, plans its stages and runs them.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::ExitStatus;
use crate::printer;
use crate::recipe::{self, Recipe, RunOptions, Selection, StageExecutor, StageStatus};

/// Run a recipe: distill, train, quantize, bench and gate as one pipeline.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The recipe file (YAML), e.g. recipes/quickstart.yaml.
    pub recipe: PathBuf,
    /// Run only this stage; what it reads from earlier stages must already exist.
    #[arg(long, value_name = "STAGE", conflicts_with = "from")]
    pub only: Option<String>,
    /// Run this stage and every stage after it.
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// Print the plan (stages, resolved options, files read and written) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Override a recipe value, validated like the file: `--set distill.epochs=1`,
    /// `--set quantize.calibration.method=percentile`. Repeatable.
    #[arg(long = "set", value_name = "STAGE.PATH=VALUE")]
    pub set: Vec<String>,
    /// Run the selected stages even if their options and inputs are unchanged.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &RunArgs, exec: &mut dyn StageExecutor) -> Result<ExitStatus> {
    run_to(args, exec, &mut std::io::stdout().lock())
}

/// [`run`], with the plan of `--dry-run` written to `out`.
fn run_to(args: &RunArgs, exec: &mut dyn StageExecutor, out: &mut dyn Write) -> Result<ExitStatus> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let plan = recipe.plan(&Selection {
        only: args.only.clone(),
        from: args.from.clone(),
    })?;
    exec.check(&recipe, &plan)?;
    if args.dry_run {
        out.write_all(plan.render(&recipe).as_bytes())?;
        out.flush()?;
        return Ok(ExitStatus::Success);
    }
    let summary = recipe::run(&recipe, &plan, exec, &RunOptions { force: args.force })?;
    let ran = summary.with(StageStatus::Ran).len();
    let skipped = summary.with(StageStatus::Unchanged).len();
    match summary.failed() {
        None => {
            printer::info(format!(
                "{}: done ({ran} ran, {skipped} unchanged); outputs in {}",
                recipe.name,
                recipe.output.display()
            ));
            Ok(ExitStatus::Success)
        }
        Some(stage) => {
            printer::info(format!("{}: stage {stage} failed", recipe.name));
            Ok(ExitStatus::Failure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{PlannedStage, StageResult};

    struct Recorder(Vec<String>);

    impl StageExecutor for Recorder {
        fn run_stage(&mut self, stage: &PlannedStage) -> Result<StageResult> {
            self.0.push(stage.kind.name().to_string());
            for o in &stage.outputs {
                crate::util::write_atomic(o, stage.kind.name().as_bytes())?;
            }
            Ok(StageResult::gate(
                stage.kind != crate::recipe::StageKind::Gate,
            ))
        }
    }

    fn recipe(dir: &std::path::Path) -> PathBuf {
        std::fs::write(dir.join("m.onnx"), b"model").unwrap();
        std::fs::write(dir.join("d.npz"), b"data").unwrap();
        let text = "output: out\nstages:\n  quantize:\n    model: m.onnx\n    calibration: { data: d.npz }\n  \
                    bench:\n    models: [${quantize.out}]\n  gate:\n    report: ${bench.report}\n";
        let path = dir.join("r.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn args(recipe: PathBuf) -> RunArgs {
        RunArgs {
            recipe,
            only: None,
            from: None,
            dry_run: false,
            set: Vec::new(),
            force: false,
        }
    }

    #[test]
    fn recipe_dry_run_prints_the_plan_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(recipe(dir.path()));
        a.dry_run = true;
        let mut exec = Recorder(Vec::new());
        let mut out = Vec::new();
        assert_eq!(
            run_to(&a, &mut exec, &mut out).unwrap(),
            ExitStatus::Success
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("1. quantize"), "{text}");
        assert!(text.contains("3. gate  (after bench)"), "{text}");
        assert!(exec.0.is_empty());
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn recipe_failed_gate_maps_to_failure() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(recipe(dir.path()));
        let mut exec = Recorder(Vec::new());
        let status = run_to(&a, &mut exec, &mut Vec::new()).unwrap();
        assert_eq!(status, ExitStatus::Failure);
        assert_eq!(exec.0, ["quantize", "bench", "gate"]);
    }
}
