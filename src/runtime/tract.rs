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

/// Runs `f`, turning a panic inside tract into an error. A model that passed shrink's own
/// checks can still trip an assertion in tract (tract-core 0.23.9 panics on a Pad with
/// negative pads and on a Slice step near i64::MAX), and untrusted input must end in an
/// error, not a crash.
fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    thread_local! {
        /// Set while this thread runs guarded tract code; holds what the panic hook saw.
        static GUARDED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    }
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // Panics caught below are reported as errors, so the default hook's message (and
        // backtrace) is kept out of the way there; everywhere else it prints as usual.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let guarded = GUARDED.with(|g| {
                let mut g = g.borrow_mut();
                g.as_mut().map(|seen| *seen = info.to_string()).is_some()
            });
            if !guarded {
                previous(info);
            }
        }));
    });
    GUARDED.with(|g| *g.borrow_mut() = Some(String::new()));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let seen = GUARDED.with(|g| g.borrow_mut().take()).unwrap_or_default();
    match result {
        Ok(r) => r,
        Err(_) => Err(anyhow!("tract crashed on this model: {}", seen.replace('\n', " "))).hint(
            "the model uses a case tract does not handle; try `--backend ort`, and report the model to tract",
        ),
    }
}

impl TractSession {
    pub fn open(
        model: &[u8],
        input_shape: &[usize],
        opts: &RuntimeOptions,
    ) -> Result<TractSession> {
        guard(|| Self::open_unguarded(model, input_shape, opts))
    }

    fn open_unguarded(
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
        guard(|| self.run_unguarded(data))
    }
}

impl TractSession {
    fn run_unguarded(&mut self, data: &[f32]) -> Result<Vec<Output>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tract_panic_becomes_an_error() {
        let r: Result<()> = guard(|| panic!("index out of bounds"));
        let text = crate::hint::render(&r.unwrap_err());
        assert!(
            text.starts_with("error: tract crashed on this model: panicked at"),
            "{text}"
        );
        assert!(text.contains("index out of bounds"), "{text}");
        assert!(
            text.contains("hint: the model uses a case tract does not handle"),
            "{text}"
        );
        // Outside a guard, and after one, nothing is swallowed.
        assert_eq!(guard(|| Ok(3)).unwrap(), 3);
        assert!(std::panic::catch_unwind(|| panic!("plain")).is_err());
    }
}
