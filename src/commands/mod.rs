//! One module per subcommand; each takes its parsed flags and returns an [`ExitStatus`].

pub mod bench;
pub mod distill;
pub mod gate;
pub mod inspect;
pub mod pipeline;
pub mod quantize;
pub mod reporters;
pub mod run;

/// How a command ended. Errors (bad input, missing files, unsupported ops) are returned as
/// `Err` and map to exit code 2 in `main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Everything ran and every check passed.
    Success,
    /// The command ran, but a gate or check failed.
    Failure,
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
        }
    }
}
