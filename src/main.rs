use std::process::ExitCode;

use clap::{Parser, Subcommand};

use shrink::commands::bench::{BenchArgs, RssProbeArgs};
use shrink::commands::distill::{DistillArgs, TrainArgs};
use shrink::commands::gate::GateArgs;
use shrink::commands::inspect::InspectArgs;
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
    /// Describe a model: inputs, outputs, ops, parameters, MACs, and which backends run it.
    Inspect(InspectArgs),
    /// Measure latency, memory and accuracy of one or more models, side by side.
    Bench(BenchArgs),
    /// Check a bench report against budgets and a baseline; exit 1 when a gate fails.
    Gate(GateArgs),
    /// Train a small student model to imitate a large teacher (knowledge distillation).
    Distill(DistillArgs),
    /// Train a model on labelled data.
    Train(TrainArgs),
    #[command(name = "__rss-probe", hide = true)]
    RssProbe(RssProbeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shrink::printer::init(cli.quiet);
    let result: anyhow::Result<ExitStatus> = match cli.command {
        Command::Inspect(args) => shrink::commands::inspect::inspect(&args),
        Command::Bench(args) => shrink::commands::bench::bench(&args),
        Command::Gate(args) => shrink::commands::gate::gate(&args),
        Command::Distill(args) => shrink::commands::distill::distill(&args),
        Command::Train(args) => shrink::commands::distill::train(&args),
        Command::RssProbe(args) => shrink::commands::bench::rss_probe(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status.code() as u8),
        Err(err) => {
            eprint!("{}", shrink::hint::render(&err));
            ExitCode::from(2)
        }
    }
}
