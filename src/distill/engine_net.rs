//! The engine as a [`Network`] and a [`Teacher`]: an ONNX graph trained in place.

use anyhow::{bail, Result};

use super::net::{Network, Teacher};
use crate::onnx::Model;

/// A trainable network over `model`'s graph.
pub fn open(model: &Model) -> Result<Box<dyn Network>> {
    bail!("the engine cannot build `{}` yet: graph execution is not available in this build", model.graph.name)
}

/// `model` run in inference mode as a teacher.
pub fn open_teacher(model: &Model) -> Result<Box<dyn Teacher>> {
    bail!("the engine cannot build `{}` yet: graph execution is not available in this build", model.graph.name)
}
