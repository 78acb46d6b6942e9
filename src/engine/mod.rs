//! The training engine: f32 tensors, CPU kernels with explicit backward passes, and
//! reverse-mode autodiff over an ONNX graph.
//!
//! Written here rather than taken from a crate because training has to run over the
//! student's own ONNX graph (any supported op, ONNX attribute semantics, weights written
//! back in place); no Rust crate trains an arbitrary ONNX graph.
//!
//! # Use
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use rand::SeedableRng;
//! use shrink::engine::{Mode, Net, Tensor};
//!
//! let mut model = shrink::onnx::Model::load(std::path::Path::new("student.onnx"))?;
//! let mut net = Net::from_model(&model)?; // refuses unsupported ops, naming the node
//! net.check_trainable()?; // refuses graphs a gradient cannot pass through
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let x = Tensor::zeros(&[64, 1, 28, 28]);
//! let fwd = net.forward(&x, Mode::Train, &mut rng)?; // BatchNorm running stats update here
//! let dlogits = Tensor::zeros(&fwd.output().shape); // d(loss)/d(logits) from the caller
//! let grads = net.backward(&fwd, &[("logits", &dlogits)])?;
//! drop(fwd); // buffers go back to the net for the next step
//! for (name, g) in grads.iter() {
//!     let p = net.params_mut().get_mut(name).expect("a parameter");
//!     p.data.iter_mut().zip(&g.data).for_each(|(w, g)| *w -= 0.01 * g);
//! }
//! net.write_back(&mut model)?; // trained weights and running stats into the initializers
//! # Ok(()) }
//! ```
//!
//! - [`Net::from_model`] classifies float initializers: weights and biases of Conv,
//!   ConvTranspose, Gemm and MatMul and BatchNorm scale/bias are parameters ([`Net::params`],
//!   trainable unless frozen with [`Net::set_trainable`] / [`Net::freeze`]); BatchNorm running
//!   mean/var are state ([`Net::state`]); everything else is a constant.
//! - Plans are built per input shape on first use and cached, so the short last batch of an
//!   epoch gets its own plan. Shape-only subgraphs (Shape -> Gather -> Concat -> Reshape) are
//!   folded into constants when planning.
//! - [`Forward::get`] returns any named value of the pass (for feature/hint losses), and
//!   [`Net::backward`] accepts gradients at any of them as well as at the outputs.
//! - [`Net::run_observed`] is the lean inference pass: every float value is shown to an
//!   observer and freed after its last use (quantization calibration, teacher features).
//!
//! # Threads and determinism
//!
//! Kernels run on the rayon pool the caller installs (`pool.install(|| ...)`), and GEMM uses
//! `rayon::current_num_threads()` of that same pool, so one knob sets the thread count. Work
//! is split by sizes and thread count only, and every reduction adds in a fixed order: the
//! same inputs, seed and thread count give bit-identical results. Hot loops are compiled
//! twice (baseline and AVX2+FMA, chosen at run time) with identical results.

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
