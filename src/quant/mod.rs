//! Numerical core of int8 post-training quantization: quantization arithmetic, streaming
//! calibration statistics and range selection, cross-layer equalization and bias
//! correction. Knows nothing about ONNX graphs; the graph rewriting calls this API with
//! plain `f32` slices and shapes.
//!
//! Written here rather than taken from a crate because scales, zero points and calibrated
//! ranges must follow ONNX Runtime's and TensorRT's rules to the bit, so that a model
//! quantized by shrink can be checked against one quantized by `onnxruntime.quantization`.

pub mod arith;
pub mod calib;
pub mod equalize;

pub use arith::{
    dequantize, quantize, quantize_bias, quantize_i8, quantize_per_channel, quantize_u8, sqnr_db,
    PerChannel, QParams, QType, QuantizedBias, Symmetry,
};
pub use calib::{Histogram, Method, RangeOptions, Selection, Target, TensorStats};
pub use equalize::{bias_correction, equalize, ChannelMeans, Weight};

pub mod fp16;
mod patch;
pub mod prepare;
pub mod qdq;
pub mod qoperator;

#[cfg(test)]
mod testutil;
