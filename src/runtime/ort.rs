//! ONNX Runtime through `ort`, loaded at run time (`load-dynamic`) from a library the user
//! already has: `--ort-lib`, `ORT_DYLIB_PATH`, next to the executable, or the `onnxruntime`
//! Python package's `capi/` folder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use super::{Device, Output, RuntimeOptions, Session, SessionInfo};
use crate::hint::HintExt;

/// The ONNX Runtime release `ort` 2.0.0-rc.15 is built against (API 31).
pub const ORT_VERSION: &str = "1.31.1";
const INSTALL_HINT: &str = "install it with `pip install onnxruntime==1.31.1`, or point `--ort-lib`/ORT_DYLIB_PATH at libonnxruntime.so.1.31.1";

/// Where the library was found, and how.
#[derive(Debug, Clone)]
pub struct LibraryLocation {
    pub path: PathBuf,
    pub source: &'static str,
}

/// Finds the ONNX Runtime shared library in the documented order.
pub fn find_library(explicit: Option<&Path>) -> Result<LibraryLocation> {
    if let Some(p) = explicit {
        if !p.is_file() {
            return Err(anyhow!("--ort-lib {} does not exist", p.display())).hint(INSTALL_HINT);
        }
        return Ok(LibraryLocation {
            path: p.to_path_buf(),
            source: "--ort-lib",
        });
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(anyhow!("ORT_DYLIB_PATH={} does not exist", p.display()))
                .hint(INSTALL_HINT);
        }
        return Ok(LibraryLocation {
            path: p,
            source: "ORT_DYLIB_PATH",
        });
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        if let Some(p) = library_in(&dir) {
            return Ok(LibraryLocation {
                path: p,
                source: "next to the executable",
            });
        }
    }
    if let Some(dir) = python_package_dir() {
        if let Some(p) = library_in(&dir.join("capi")) {
            return Ok(LibraryLocation {
                path: p,
                source: "the onnxruntime Python package",
            });
        }
    }
    Err(anyhow!("ONNX Runtime was not found (looked at --ort-lib, ORT_DYLIB_PATH, next to the executable, and the onnxruntime Python package)"))
        .hint(INSTALL_HINT)
}

fn library_in(dir: &Path) -> Option<PathBuf> {
    let exact = dir.join(format!("libonnxruntime.so.{ORT_VERSION}"));
    if exact.is_file() {
        return Some(exact);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libonnxruntime.so")
                    || n == "libonnxruntime.dylib"
                    || n == "onnxruntime.dll"
            })
        })
        .collect();
    found.sort();
    found.pop()
}

fn python_package_dir() -> Option<PathBuf> {
    for py in ["python3", "python"] {
        let out = std::process::Command::new(py)
            .args(["-c", "import importlib.util as u; s = u.find_spec('onnxruntime'); print(s.submodule_search_locations[0] if s else '')"])
            .stderr(std::process::Stdio::null())
            .output();
        if let Ok(out) = out {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !s.is_empty() {
                return Some(PathBuf::from(s));
            }
        }
    }
    None
}

/// One environment per process (an `ort` rule); the first caller's library wins.
static INIT: OnceLock<
    std::result::Result<(LibraryLocation, ort::environment::Environment), String>,
> = OnceLock::new();

/// Loads ONNX Runtime once; later calls return the same result.
pub fn init(explicit: Option<&Path>) -> Result<(LibraryLocation, ort::environment::Environment)> {
    let r = INIT.get_or_init(|| {
        let loc = find_library(explicit).map_err(|e| crate::hint::render(&e))?;
        let builder = ort::init_from(&loc.path).map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {} (found via {}): {e}\nhint: {INSTALL_HINT}",
                loc.path.display(),
                loc.source
            )
        })?;
        let env = builder.with_name("shrink").build().map_err(|e| {
            format!(
                "cannot start ONNX Runtime from {}: {e}\nhint: {INSTALL_HINT}",
                loc.path.display()
            )
        })?;
        Ok((loc, env))
    });
    r.clone().map_err(|rendered| {
        // The rendered message already carries `error:`/`hint:` lines; keep its text.
        let text = rendered
            .trim_start_matches("error: ")
            .trim_end()
            .to_string();
        anyhow!(text)
    })
}

pub struct OrtSession {
    session: ort::session::Session,
    input_name: String,
    input_shape: Vec<usize>,
    info: SessionInfo,
}

fn ort_err<R>(e: ort::Error<R>) -> anyhow::Error {
    // ort's builder errors carry the builder back and are not Send; keep the message only.
    anyhow!("{e}")
}

impl OrtSession {
    pub fn open(model: &[u8], input_shape: &[usize], opts: &RuntimeOptions) -> Result<OrtSession> {
        let (lib, env) = init(opts.ort_lib.as_deref())?;
        let threads = opts.threads.max(1);
        let mut builder = ort::session::Session::builder(&env)
            .map_err(ort_err)?
            .with_intra_threads(threads)
            .map_err(ort_err)?
            .with_inter_threads(1)
            .map_err(ort_err)?;
        let provider = match opts.device {
            Device::Cpu => "CPUExecutionProvider",
            Device::Cuda => {
                builder = builder
                    .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                    .map_err(ort_err)
                    .context("ONNX Runtime's CUDA execution provider could not be registered")
                    .hint("the CPU-only `onnxruntime` package has no CUDA provider: install `onnxruntime-gpu` (with CUDA and cuDNN) and point --ort-lib at its library, or use `--device cpu`")?;
                "CUDAExecutionProvider"
            }
            Device::Xnnpack => {
                builder = builder
                    .with_execution_providers([ort::ep::XNNPACK::default()
                        .with_intra_op_num_threads(std::num::NonZeroUsize::new(threads).unwrap_or(std::num::NonZeroUsize::MIN))
                        .build()
                        .error_on_failure()])
                    .map_err(ort_err)
                    .context("ONNX Runtime's XNNPACK execution provider could not be registered")
                    .hint("use an ONNX Runtime build that includes XNNPACK (the PyPI `onnxruntime` wheel for Linux x86-64 does not), or `--target mobile` for tract's mobile-class settings")?;
                "XnnpackExecutionProvider"
            }
        };
        let session = builder
            .commit_from_memory(model)
            .map_err(ort_err)
            .context("ONNX Runtime cannot load the model")?;
        let inputs = session.inputs();
        if inputs.len() != 1 {
            bail!(
                "the model has {} inputs; shrink runs models with one image input",
                inputs.len()
            );
        }
        let input_name = inputs[0].name().to_string();
        Ok(OrtSession {
            session,
            input_name,
            input_shape: input_shape.to_vec(),
            info: SessionInfo {
                backend: "ort".into(),
                provider: provider.into(),
                threads,
                version: version_of(&lib.path),
            },
        })
    }
}

fn version_of(path: &Path) -> String {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match name.strip_prefix("libonnxruntime.so.") {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => ORT_VERSION.to_string(),
    }
}

impl Session for OrtSession {
    fn info(&self) -> &SessionInfo {
        &self.info
    }

    fn run(&mut self, data: &[f32]) -> Result<Vec<Output>> {
        let shape: Vec<i64> = self.input_shape.iter().map(|&d| d as i64).collect();
        let input = ort::value::TensorRef::from_array_view((shape, data)).map_err(ort_err)?;
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => input])
            .map_err(ort_err)
            .context("ONNX Runtime failed to run the model")?;
        let mut out = Vec::with_capacity(outputs.len());
        for (_, v) in outputs.iter() {
            let (shape, data) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
            out.push(Output {
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
                data: data.to_vec(),
            });
        }
        Ok(out)
    }
}
