//! shrink: make ONNX CNNs edge-ready — distill, quantize, bench and gate.
//!
//! Layers depend one way only: `onnx` → `engine` → `distill`, `quant` → `runtime` →
//! `bench`, `gate` → `recipe`, `commands`. The binary in `main.rs` is a thin shell over them.
#![deny(unsafe_code)]

pub mod bench;
pub mod commands;
pub mod data;
pub mod distill;
pub mod engine;
pub mod gate;
pub mod hint;
pub mod onnx;
pub mod printer;
pub mod quant;
pub mod recipe;
pub mod runtime;
pub mod util;
