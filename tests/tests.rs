//! The single integration-test binary: every CLI test runs the real `shrink` executable.

mod util;

mod bench;
mod distill;
mod durability;
mod gate;
mod hostile;
mod quantize;
mod recipes;
