//! The single integration-test binary: every CLI test runs the real `shrink` executable.

mod util;

mod distill;
mod gate;
