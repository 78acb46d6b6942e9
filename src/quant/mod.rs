//! Numerical core of int8 post-training quantization: quantization arithmetic, streaming
//! calibration statistics and range selection. Knows nothing about ONNX graphs; the graph
//! rewriting calls this API with plain `f32` slices and shapes.

pub mod arith;
pub mod calib;

pub use arith::{
    dequantize, quantize, quantize_bias, quantize_i8, quantize_per_channel, quantize_u8, sqnr_db,
    PerChannel, QParams, QType, QuantizedBias, Symmetry,
};
pub use calib::{Histogram, Method, RangeOptions, Selection, Target, TensorStats};
