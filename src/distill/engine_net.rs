//! The engine as a [`Network`] and a [`Teacher`]: an ONNX graph trained in place.
//!
//! The optimizer works on named tensors in a `BTreeMap` (a fixed order for clipping sums and
//! checkpoints); the engine keeps its own parameter store in graph order. The adapter owns the
//! map and copies it into the engine before a forward pass when it changed: a few hundred
//! thousand floats at most, small next to one convolution over a batch.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use rand_chacha::ChaCha8Rng;

use super::net::{LossFn, Network, Teacher};
use super::optim::Named;
use crate::engine::net::{Mode, Net};
use crate::engine::Tensor;
use crate::onnx::Model;

/// A trainable network over an ONNX graph.
pub struct EngineNet {
    net: Net,
    params: Named,
    /// `params` changed since they were last copied into the engine.
    dirty: bool,
}

/// A trainable network over `model`'s graph. Fails, naming the nodes, when the graph has an
/// op the engine cannot run or one a gradient would have to pass through without a
/// backward pass.
pub fn open(model: &Model) -> Result<Box<dyn Network>> {
    let net = Net::from_model(model)?;
    net.check_trainable()?;
    let params = net
        .params()
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    Ok(Box::new(EngineNet {
        net,
        params,
        dirty: false,
    }))
}

/// `model` run in inference mode as a teacher.
pub fn open_teacher(model: &Model) -> Result<Box<dyn Teacher>> {
    Ok(Box::new(EngineTeacher {
        net: Net::from_model(model)?,
    }))
}

impl EngineNet {
    fn sync(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        for (name, t) in &self.params {
            let slot = self
                .net
                .params_mut()
                .get_mut(name)
                .with_context(|| format!("`{name}` is not a parameter of the model"))?;
            slot.data.copy_from_slice(&t.data);
        }
        self.dirty = false;
        Ok(())
    }
}

/// Inference through `Net::run_observed`, which frees each value after its last use and
/// keeps only the ones asked for.
fn observe(net: &Net, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
    let mut found: Vec<Option<Tensor>> = vec![None; taps.len()];
    let outputs = net.run_observed(x, &mut |name, t| {
        for (slot, tap) in found.iter_mut().zip(taps) {
            if tap == name {
                *slot = Some(t.clone());
            }
        }
        Ok(())
    })?;
    let logits = outputs
        .into_iter()
        .next()
        .context("the model has no output")?;
    let taps = found
        .into_iter()
        .zip(taps)
        .map(|(t, name)| {
            t.with_context(|| format!("the model computes no float tensor named `{name}`"))
        })
        .collect::<Result<_>>()?;
    Ok((logits, taps))
}

impl Network for EngineNet {
    fn params(&self) -> &Named {
        &self.params
    }

    fn params_mut(&mut self) -> &mut Named {
        self.dirty = true;
        &mut self.params
    }

    fn state(&self) -> Named {
        self.net
            .state()
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect()
    }

    fn set_state(&mut self, state: &Named) -> Result<()> {
        for (name, t) in state {
            let slot = self
                .net
                .state_mut()
                .get_mut(name)
                .with_context(|| format!("`{name}` is not batch-norm state of the model"))?;
            anyhow::ensure!(
                slot.shape == t.shape,
                "state `{name}` has shape {:?}, the model {:?}",
                t.shape,
                slot.shape
            );
            slot.data.copy_from_slice(&t.data);
        }
        Ok(())
    }

    fn set_trainable(&mut self, names: &BTreeSet<String>) -> Result<()> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.net.set_trainable(&names)
    }

    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
        self.sync()?;
        observe(&self.net, x, taps)
    }

    fn train_step(
        &mut self,
        x: &Tensor,
        taps: &[String],
        rng: &mut ChaCha8Rng,
        loss: &mut LossFn<'_>,
    ) -> Result<Named> {
        self.sync()?;
        let fwd = self.net.forward(x, Mode::Train, rng)?;
        let tap_values = taps
            .iter()
            .map(|name| {
                fwd.get(name)
                    .cloned()
                    .with_context(|| format!("the model computes no tensor named `{name}`"))
            })
            .collect::<Result<Vec<_>>>()?;
        let output = self
            .net
            .output_names()
            .first()
            .map(|s| s.to_string())
            .context("the model has no output")?;
        let (g, tap_grads) = loss(fwd.output(), &tap_values)?;
        let mut seeds: Vec<(&str, &Tensor)> = vec![(output.as_str(), &g)];
        seeds.extend(taps.iter().map(String::as_str).zip(&tap_grads));
        let mut grads = self.net.backward(&fwd, &seeds)?;
        let names: Vec<String> = grads.iter().map(|(k, _)| k.to_string()).collect();
        Ok(names
            .into_iter()
            .filter_map(|k| grads.remove(&k).map(|t| (k, t)))
            .collect())
    }
}

struct EngineTeacher {
    net: Net,
}

impl Teacher for EngineTeacher {
    fn describe(&self) -> String {
        "engine".to_string()
    }

    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
        observe(&self.net, x, taps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Preprocess};

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name)
    }

    /// The training loop computes teacher logits once, in batches of 256, instead of per
    /// training batch. A sample's logits must not depend on the batch it is in: bit for bit
    /// at training batch sizes, and to float rounding for tiny batches, where the engine
    /// picks other kernels (a short last batch).
    #[test]
    fn teacher_logits_do_not_depend_on_the_batch() {
        let model = Model::load(&fixture("teacher.onnx")).unwrap();
        let mut t = open_teacher(&model).unwrap();
        let ds = Dataset::open(
            &fixture("digits_val.npz"),
            &Preprocess {
                limit: Some(100),
                ..Default::default()
            },
            [1, 28, 28],
        )
        .unwrap();
        let b = ds.load_all().unwrap();
        let x = Tensor::new(b.shape.to_vec(), b.x).unwrap();
        let whole = t.infer(&x, &[]).unwrap().0;
        for (start, len) in [(0, 64), (36, 64), (0, 32), (33, 67), (32, 1), (10, 7)] {
            let part = t
                .infer(&x.batch_slice(start..start + len).unwrap(), &[])
                .unwrap()
                .0;
            let want = &whole.data[start * 10..(start + len) * 10];
            if len >= 32 {
                assert_eq!(part.data, want, "rows {start}..{}", start + len);
            } else {
                let d = part
                    .data
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-5, "rows {start}..{}: {d}", start + len);
            }
        }
    }

    #[test]
    fn inference_and_taps_match_a_training_forward_in_shape() {
        let model = Model::load(&fixture("student.onnx")).unwrap();
        let mut net = open(&model).unwrap();
        let x = Tensor::zeros(&[3, 1, 28, 28]);
        let taps = vec!["/pool/MaxPool_output_0".to_string()];
        let (logits, t) = net.infer(&x, &taps).unwrap();
        assert_eq!(logits.shape, vec![3, 10]);
        assert_eq!(t[0].shape, vec![3, 8, 14, 14]);
        assert!(net.infer(&x, &["nope".to_string()]).is_err());
    }
}
