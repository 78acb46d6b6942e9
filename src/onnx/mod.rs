//! ONNX protobuf I/O and the graph IR every other layer works on.

pub mod ir;
pub mod load;
pub mod shape;
pub mod summary;
pub mod tensor;

#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    include!("proto/onnx.rs");
}

pub use ir::{Dim, Graph, Model, Node, ValueInfo};
pub use load::{load_model, save_model};
pub use tensor::{Data, Tensor};
