//! The training engine: f32 tensors, CPU kernels with explicit backward passes, and
//! reverse-mode autodiff over an ONNX graph.
//!
//! Written here rather than taken from a crate because training has to run over the
//! student's own ONNX graph (any supported op, ONNX attribute semantics, weights written
//! back in place); no Rust crate trains an arbitrary ONNX graph.

pub mod backprop;
mod buffers;
pub mod kernels;
pub mod linalg;
pub mod net;
pub mod plan;
mod simd;
pub mod tensor;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use backprop::GradStore;
pub use net::{Forward, Mode, Net, ParamInfo, ParamStore};
pub use tensor::Tensor;
