//! What the training loop needs from a network and from a teacher, as two small traits:
//! the engine implements them over an ONNX graph, ONNX Runtime implements [`Teacher`] in the
//! commands layer, and tests use tiny hand-written models.

use anyhow::Result;
use rand_chacha::ChaCha8Rng;

use super::optim::Named;
use crate::engine::Tensor;

/// Computes the loss of one batch: given the logits and the requested intermediate tensors
/// (in the order asked for), returns the gradients with respect to each of them.
pub type LossFn<'a> = dyn FnMut(&Tensor, &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> + 'a;

/// A trainable network with one image input and one logits output.
pub trait Network {
    /// Every parameter the network could train, by name (ONNX initializer names).
    fn params(&self) -> &Named;
    fn params_mut(&mut self) -> &mut Named;
    /// State that training updates but the optimizer does not (batch-norm running statistics).
    fn state(&self) -> Named;
    fn set_state(&mut self, state: &Named) -> Result<()>;
    /// Only these parameters will be trained; a network may then skip the others' gradients.
    fn set_trainable(&mut self, _names: &std::collections::BTreeSet<String>) -> Result<()> {
        Ok(())
    }
    /// Inference-mode forward pass: the logits and the intermediate tensors named in `taps`.
    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)>;
    /// Training-mode forward pass (batch statistics, running statistics updated), then
    /// `loss` on the logits and `taps`, then the backward pass from the gradients it returns.
    /// Returns the gradient of every parameter.
    fn train_step(
        &mut self,
        x: &Tensor,
        taps: &[String],
        rng: &mut ChaCha8Rng,
        loss: &mut LossFn<'_>,
    ) -> Result<Named>;
}

/// Produces the teacher's logits (and, when it can, intermediate tensors for hint losses).
pub trait Teacher {
    /// What runs the teacher, for messages and reports (e.g. `engine`, `ort (CPU)`).
    fn describe(&self) -> String;
    /// Inference-mode logits of `x` and the intermediate tensors named in `taps`.
    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)>;
}

/// Any network, run in inference mode, can teach.
pub struct NetTeacher<N: Network>(pub N);

impl<N: Network> Teacher for NetTeacher<N> {
    fn describe(&self) -> String {
        "engine".to_string()
    }

    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
        self.0.infer(x, taps)
    }
}

/// Writes the network's parameters and state into the model's initializers of the same
/// names, keeping everything else of the graph as it was. Only float32 initializers are
/// written: a trained weight must not silently change type.
pub fn write_back(net: &dyn Network, model: &mut crate::onnx::Model) -> Result<()> {
    use anyhow::{bail, Context};
    let state = net.state();
    for (name, t) in net.params().iter().chain(state.iter()) {
        let init = model.graph.initializers.get_mut(name).with_context(|| {
            format!("the model has no initializer `{name}` to write the trained values into")
        })?;
        if init.dims != t.shape {
            bail!(
                "initializer `{name}` has shape {:?} but training produced {:?}",
                init.dims,
                t.shape
            );
        }
        match &mut init.data {
            crate::onnx::Data::F32(v) => v.copy_from_slice(&t.data),
            other => bail!("initializer `{name}` is {:?}, not float32; shrink writes trained weights only into float32 initializers", other.dtype()),
        }
    }
    Ok(())
}
