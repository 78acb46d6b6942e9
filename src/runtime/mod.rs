//! Inference backends behind one trait: tract (embedded default) and ONNX Runtime.

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

#[cfg(feature = "backends")]
pub mod ort;
#[cfg(feature = "backends")]
pub mod tract;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract: pure Rust, embedded, nothing to install.
    #[default]
    Tract,
    /// ONNX Runtime, loaded at run time from the `onnxruntime` Python package or `--ort-lib`.
    Ort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    /// NVIDIA GPU: tract-cuda, or ONNX Runtime's CUDA execution provider.
    Cuda,
    /// ONNX Runtime's XNNPACK execution provider (mobile-class CPU kernels).
    Xnnpack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// This machine, with the requested threads.
    #[default]
    Host,
    /// Mobile-class: tract, one thread, as on a phone's big core.
    Mobile,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
        })
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Xnnpack => "xnnpack",
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Host => "host",
            Target::Mobile => "mobile",
        })
    }
}

/// How to open a session.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    pub backend: BackendKind,
    pub device: Device,
    pub threads: usize,
    /// Explicit ONNX Runtime library (`--ort-lib`); searched for when None.
    pub ort_lib: Option<PathBuf>,
}

/// What a session actually uses; reports record this, not what was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub backend: String,
    pub provider: String,
    pub threads: usize,
    pub version: String,
}

/// A float tensor crossing the runtime boundary.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A loaded model ready to run batches of one fixed shape.
pub trait Session {
    fn info(&self) -> &SessionInfo;
    /// Runs one batch; `data` is the model's single float input in the shape the session was
    /// opened with. Returns every output as f32.
    fn run(&mut self, data: &[f32]) -> Result<Vec<Output>>;
}

/// Opens a session for `model` (ONNX bytes) with a fixed input shape (batch included).
pub fn open(
    model: &[u8],
    input_shape: &[usize],
    opts: &RuntimeOptions,
) -> Result<Box<dyn Session>> {
    #[cfg(feature = "backends")]
    match opts.backend {
        BackendKind::Tract => Ok(Box::new(tract::TractSession::open(
            model,
            input_shape,
            opts,
        )?)),
        BackendKind::Ort => Ok(Box::new(ort::OrtSession::open(model, input_shape, opts)?)),
    }
    #[cfg(not(feature = "backends"))]
    {
        let _ = (model, input_shape);
        anyhow::bail!(
            "this build of shrink has no inference backends (`{}` needs the `backends` feature)",
            opts.backend
        )
    }
}

/// Threads to use when the user gave none: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(all(test, feature = "backends"))]
mod tests;
