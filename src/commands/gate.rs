//! `shrink gate`: fail CI when a bench report breaks its budgets or regresses from a baseline.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::bench::report::BenchReport;
use crate::commands::ExitStatus;
use crate::gate::{self, render, Budgets, GateOptions};
use crate::hint::HintExt;
use crate::printer;
use crate::util::write_atomic;

#[derive(clap::Args, Debug)]
pub struct GateArgs {
    /// The bench report to judge (`shrink bench ... --json REPORT`).
    pub report: PathBuf,
    /// A report to compare with, for relative budgets (e.g. the main branch's report).
    #[arg(long, value_name = "REPORT")]
    pub baseline: Option<PathBuf>,
    /// YAML file of limits (`max_size_bytes`, `max_latency_regression_pct`, ...).
    #[arg(long, value_name = "FILE")]
    pub budget: Option<PathBuf>,
    /// Which model of the report to judge [default: the last].
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Compare reports measured with different settings (backend, threads, CPU...) anyway.
    #[arg(long)]
    pub allow_mismatch: bool,
    /// Significance level of the latency regression test.
    #[arg(long, value_name = "ALPHA", default_value_t = 0.05)]
    pub alpha: f64,
    /// Seed of the bootstrap confidence interval.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the outcome as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write a JUnit XML file, one test case per check.
    #[arg(long, value_name = "PATH")]
    pub junit: Option<PathBuf>,
    /// Also write a Markdown summary (for a pull-request comment).
    #[arg(long, value_name = "PATH")]
    pub markdown: Option<PathBuf>,
    /// After the gate passes, replace the baseline with this report.
    #[arg(long, requires = "baseline")]
    pub update_baseline: bool,
    /// With --update-baseline: replace the baseline even if a gate failed.
    #[arg(long, requires = "update_baseline")]
    pub force: bool,
}

pub fn gate(args: &GateArgs) -> Result<ExitStatus> {
    let budgets = match &args.budget {
        Some(path) => Budgets::load(path)?,
        None => Budgets::default(),
    };
    gate_with_budgets(args, &budgets)
}

/// [`gate`] with budgets already loaded (a recipe's `gate` stage holds them inline).
pub fn gate_with_budgets(args: &GateArgs, budgets: &Budgets) -> Result<ExitStatus> {
    let budgets = budgets.clone();
    let current = BenchReport::load(&args.report)?;
    let baseline = match &args.baseline {
        Some(path) => {
            let loaded = BenchReport::load(path);
            Some(if args.update_baseline && !path.exists() {
                loaded.hint(format!(
                    "to start a baseline, copy a report there: cp {} {}",
                    args.report.display(),
                    path.display()
                ))?
            } else {
                loaded?
            })
        }
        None => None,
    };
    let opts = GateOptions {
        model: args.model.clone(),
        allow_mismatch: args.allow_mismatch,
        alpha: args.alpha,
        seed: args.seed,
    };
    let outcome = gate::evaluate(&current, baseline.as_ref(), &budgets, &opts)
        .with_context(|| format!("cannot gate {}", args.report.display()))?;

    for w in &outcome.warnings {
        printer::warn(w);
    }
    if args.json {
        print!("{}", render::json(&outcome));
    } else {
        print!("{}", render::table(&outcome));
    }
    if let Some(path) = &args.junit {
        write_atomic(path, render::junit(&outcome).as_bytes())?;
        printer::info(format!("wrote JUnit report {}", path.display()));
    }
    let markdown = render::markdown(&outcome);
    if let Some(path) = &args.markdown {
        write_atomic(path, markdown.as_bytes())?;
        printer::info(format!("wrote Markdown summary {}", path.display()));
    }
    if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
        // The runner collects the step summary by appending; it is not ours to replace.
        let path = PathBuf::from(path);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open GITHUB_STEP_SUMMARY file {}", path.display()))?;
        writeln!(file, "{markdown}")
            .with_context(|| format!("cannot append to {}", path.display()))?;
    }
    if std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true") {
        // The runner reads workflow commands from stderr as well, which keeps stdout data-only.
        eprint!("{}", render::github_annotations(&outcome));
    }

    let passed = outcome.passed();
    let failed: Vec<&str> = outcome.failures().map(|c| c.name.as_str()).collect();
    if passed {
        printer::info(format!(
            "gate passed: {} of {} checks for model `{}`",
            outcome.checks.len(),
            outcome.checks.len(),
            outcome.model
        ));
    } else {
        printer::info(format!(
            "gate failed: {} of {} checks for model `{}` ({})",
            failed.len(),
            outcome.checks.len(),
            outcome.model,
            failed.join(", ")
        ));
    }

    if args.update_baseline {
        // `requires = "baseline"` on the flag makes this present.
        if let Some(path) = &args.baseline {
            if passed || args.force {
                let bytes = std::fs::read(&args.report)
                    .with_context(|| format!("cannot read {}", args.report.display()))?;
                write_atomic(path, &bytes)?;
                printer::info(format!(
                    "updated baseline {} from {}{}",
                    path.display(),
                    args.report.display(),
                    if passed {
                        ""
                    } else {
                        " (--force, despite failed gates)"
                    }
                ));
            } else {
                printer::warn(format!(
                    "baseline {} not updated because a gate failed (pass --force to update anyway)",
                    path.display()
                ));
            }
        }
    }

    Ok(if passed {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}
