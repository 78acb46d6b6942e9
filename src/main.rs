use std::process::ExitCode;

use clap::{Parser, Subcommand};

use shrink::commands::gate::GateArgs;
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
    /// Check a bench report against budgets and a baseline; exit 1 when a gate fails.
    Gate(GateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shrink::printer::init(cli.quiet);
    let result: anyhow::Result<ExitStatus> = match cli.command {
        Command::Gate(args) => shrink::commands::gate::gate(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status.code() as u8),
        Err(err) => {
            eprint!("{}", shrink::hint::render(&err));
            ExitCode::from(2)
        }
    }
}
