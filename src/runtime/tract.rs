//! The embedded default backend: tract, on CPU or (tract-cuda) an NVIDIA GPU.

use anyhow::{anyhow, bail, ensure, Context, Result};
use tract_onnx::prelude::*;

use super::{Device, Output, RuntimeOptions, Session, SessionInfo};
use crate::hint::HintExt;

pub const TRACT_VERSION: &str = "0.23.9";

pub struct TractSession {
    state: Box<dyn tract_onnx::tract_core::runtime::State>,
    input_shape: Vec<usize>,
    info: SessionInfo,
}

fn tract_err(e: TractError) -> anyhow::Error {
    anyhow!("{e:#}")
}

impl TractSession {
    pub fn open(
        model: &[u8],
        input_shape: &[usize],
        opts: &RuntimeOptions,
    ) -> Result<TractSession> {
        ensure!(
            opts.device != Device::Xnnpack,
            "the XNNPACK execution provider belongs to ONNX Runtime; use `--backend ort --device xnnpack`, or `--target mobile` for tract's mobile-class settings"
        );
        let threads = opts.threads.max(1);
        let executor = if threads > 1 {
            tract_linalg::multithread::Executor::multithread(threads)
        } else {
            tract_linalg::multithread::Executor::SingleThread
        };
        tract_linalg::multithread::set_default_executor(executor);
        let shape: TVec<usize> = input_shape.iter().copied().collect();
        let typed = tract_onnx::onnx()
            .model_for_read(&mut &model[..])
            .map_err(tract_err)
            .context("tract cannot read the model")?
            .with_input_fact(0, f32::fact(shape).into())
            .map_err(tract_err)?
            .into_typed()
            .map_err(tract_err)
            .context("tract cannot analyse the model")?;
        let (runnable, provider): (Box<dyn tract_onnx::tract_core::runtime::Runnable>, &str) =
            match opts.device {
                Device::Cpu => (
                    Box::new(
                        typed
                            .into_optimized()
                            .map_err(tract_err)?
                            .into_runnable()
                            .map_err(tract_err)?,
                    ),
                    "tract-cpu",
                ),
                Device::Cuda => {
                    // Referencing the crate keeps its runtime registered in the binary.
                    let _ = std::any::type_name::<tract_cuda::CudaTransform>();
                    let rt = tract_onnx::tract_core::runtime::runtime_for_name("cuda")
                    .map_err(tract_err)
                    .context("CUDA is not available to tract")
                    .hint("tract-cuda needs an NVIDIA driver (libcuda.so) and the CUDA runtime libraries on the library path; use `--device cpu` on machines without a GPU")?
                    .context("tract was built without its CUDA runtime")?;
                    (
                        rt.prepare(typed)
                            .map_err(tract_err)
                            .context("tract-cuda cannot prepare the model")?,
                        "tract-cuda",
                    )
                }
                Device::Xnnpack => bail!("unreachable: xnnpack refused above"),
            };
        let state = runnable.spawn().map_err(tract_err)?;
        Ok(TractSession {
            state,
            input_shape: input_shape.to_vec(),
            info: SessionInfo {
                backend: "tract".into(),
                provider: provider.into(),
                threads,
                version: TRACT_VERSION.into(),
            },
        })
    }
}

impl Session for TractSession {
    fn info(&self) -> &SessionInfo {
        &self.info
    }

    fn run(&mut self, data: &[f32]) -> Result<Vec<Output>> {
        let t = tract_ndarray::ArrayD::from_shape_vec(self.input_shape.clone(), data.to_vec())
            .context("input data does not match the session's input shape")?;
        let outs = self
            .state
            .run(tvec!(Tensor::from(t).into()))
            .map_err(tract_err)
            .context("tract failed to run the model")?;
        outs.into_iter()
            .map(|v| {
                let t = v
                    .into_tensor()
                    .cast_to::<f32>()
                    .map_err(tract_err)?
                    .into_owned();
                Ok(Output {
                    shape: t.shape().to_vec(),
                    data: t
                        .try_as_plain_ram()
                        .map_err(tract_err)?
                        .as_slice::<f32>()
                        .map_err(tract_err)?
                        .to_vec(),
                })
            })
            .collect()
    }
}
