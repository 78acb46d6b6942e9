//! ONNX protobuf I/O and the graph IR every other layer works on.

#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!("proto/onnx.rs");
}
