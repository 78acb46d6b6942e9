//! Training over the engine: losses, optimizers, schedules, augmentation, checkpoints and
//! the distillation / training loop behind `shrink distill` and `shrink train`.
//!
//! Written here rather than taken from a crate because it drives shrink's own engine over the
//! student's ONNX graph; the optimizers and schedules follow PyTorch's definitions exactly so
//! that recipes and hyperparameters carry over.

pub mod augment;
pub mod checkpoint;
pub mod engine_net;
pub mod feature;
pub mod loss;
pub mod net;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod train;
