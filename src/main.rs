use std::process::ExitCode;

use clap::{Parser, Subcommand};

use shrink::commands::bench::{BenchArgs, PredictArgs, RssProbeArgs};
use shrink::commands::distill::{DistillArgs, TrainArgs};
use shrink::commands::gate::GateArgs;
use shrink::commands::inspect::InspectArgs;
use shrink::commands::quantize::QuantizeArgs;
use shrink::commands::run::RunArgs;
use shrink::commands::ExitStatus;

/// Make ONNX CNNs edge-ready: distill, quantize, bench and gate.
#[derive(Parser)]
#[command(name = "shrink", version, about, propagate_version = true)]
struct Cli {
    /// Hide progress bars and informational messages (errors still print).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe: a YAML pipeline of distill, train, quantize, bench and gate stages.
    Run(RunArgs),
    /// Describe a model: inputs, outputs, ops, parameters, MACs, and which backends run it.
    Inspect(InspectArgs),
    /// Measure latency, memory and accuracy of one or more models, side by side.
    Bench(BenchArgs),
    /// Quantize a float model to int8 with calibration on real data.
    Quantize(QuantizeArgs),
    /// Check a bench report against budgets and a baseline; exit 1 when a gate fails.
    Gate(GateArgs),
    /// Train a small student model to imitate a large teacher (knowledge distillation).
    Distill(DistillArgs),
    /// Train a model on labelled data.
    Train(TrainArgs),
    #[command(name = "__rss-probe", hide = true)]
    RssProbe(RssProbeArgs),
    #[command(name = "__predict", hide = true)]
    Predict(PredictArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shrink::printer::init(cli.quiet);
    let result: anyhow::Result<ExitStatus> = match cli.command {
        Command::Run(args) => {
            shrink::commands::run::run(&args, &mut shrink::commands::pipeline::ShrinkExecutor)
        }
        Command::Inspect(args) => shrink::commands::inspect::inspect(&args),
        Command::Bench(args) => shrink::commands::bench::bench(&args),
        Command::Quantize(args) => shrink::commands::quantize::run_quantize(&args),
        Command::Gate(args) => shrink::commands::gate::gate(&args),
        Command::Distill(args) => shrink::commands::distill::distill(&args),
        Command::Train(args) => shrink::commands::distill::train(&args),
        Command::RssProbe(args) => shrink::commands::bench::rss_probe(&args),
        Command::Predict(args) => shrink::commands::bench::predict(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status.code() as u8),
        Err(err) => {
            eprint!("{}", shrink::hint::render(&err));
            ExitCode::from(2)
        }
    }
}
