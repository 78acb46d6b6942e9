//! `shrink inspect MODEL`: what a model is made of and which backends run it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use super::ExitStatus;
use crate::bench::measure::sample_shape;
use crate::onnx::summary::{summarize, Summary};
use crate::onnx::Model;
use crate::runtime::{self, BackendKind, RuntimeOptions};

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The ONNX model to describe.
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Show MACs for every layer, not only the largest ten.
    #[arg(long)]
    pub all_layers: bool,
    /// ONNX Runtime library to try (default: ORT_DYLIB_PATH, next to the executable, or the onnxruntime Python package).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct BackendCheck {
    backend: String,
    runs: bool,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Inspection {
    path: String,
    size_bytes: u64,
    #[serde(flatten)]
    summary: Summary,
    backends: Vec<BackendCheck>,
}

fn check_backends(model: &Model, ort_lib: Option<PathBuf>) -> Vec<BackendCheck> {
    let bytes = prost::Message::encode_to_vec(&model.to_proto());
    let shape = match sample_shape(model) {
        Ok([c, h, w]) => vec![1, c, h, w],
        Err(e) => {
            return vec![BackendCheck {
                backend: "all".into(),
                runs: false,
                detail: format!("{e:#}"),
            }];
        }
    };
    [BackendKind::Tract, BackendKind::Ort]
        .into_iter()
        .map(|backend| {
            let opts = RuntimeOptions {
                backend,
                threads: 1,
                ort_lib: ort_lib.clone(),
                ..Default::default()
            };
            let r = runtime::open(&bytes, &shape, &opts).and_then(|mut s| {
                let x = vec![0.5f32; shape.iter().product()];
                s.run(&x)?;
                Ok(s.info().clone())
            });
            match r {
                Ok(info) => BackendCheck {
                    backend: backend.to_string(),
                    runs: true,
                    detail: format!("{} {}", info.provider, info.version),
                },
                Err(e) => BackendCheck {
                    backend: backend.to_string(),
                    runs: false,
                    detail: format!("{e:#}")
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                },
            }
        })
        .collect()
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn inspect(args: &InspectArgs) -> Result<ExitStatus> {
    let model = Model::load(&args.model)?;
    let summary =
        summarize(&model).with_context(|| format!("cannot analyse {}", args.model.display()))?;
    let size_bytes = std::fs::metadata(&args.model)?.len();
    let backends = check_backends(&model, args.ort_lib.clone());
    let ins = Inspection {
        path: args.model.display().to_string(),
        size_bytes,
        summary,
        backends,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
        return Ok(ExitStatus::Success);
    }
    let s = &ins.summary;
    let mut out = String::new();
    out.push_str(&format!(
        "{}  ({} bytes, IR v{}, opset {}, {})\n",
        ins.path,
        size_bytes,
        s.ir_version,
        s.opset,
        if s.producer.is_empty() {
            "unknown producer"
        } else {
            &s.producer
        }
    ));
    out.push_str("inputs:\n");
    for i in &s.inputs {
        out.push_str(&format!(
            "  {:<16} {:<8} [{}]\n",
            i.name,
            i.dtype,
            i.shape.join(", ")
        ));
    }
    out.push_str("outputs:\n");
    for o in &s.outputs {
        out.push_str(&format!(
            "  {:<16} {:<8} [{}]\n",
            o.name,
            o.dtype,
            o.shape.join(", ")
        ));
    }
    out.push_str(&format!("nodes: {}\n", s.nodes));
    for (op, n) in &s.op_histogram {
        out.push_str(&format!("  {op:<22} {n}\n"));
    }
    out.push_str(&format!(
        "parameters: {} ({} bytes)\n",
        human(s.params),
        s.weight_bytes
    ));
    for (dt, p) in &s.params_by_dtype {
        out.push_str(&format!(
            "  {dt:<10} {:>12} values {:>12} bytes\n",
            p.count, p.bytes
        ));
    }
    out.push_str(&format!("MACs per sample: {}\n", human(s.macs)));
    let mut layers: Vec<_> = s.layers.iter().collect();
    if !args.all_layers {
        layers.sort_by_key(|l| std::cmp::Reverse(l.macs));
        layers.truncate(10);
    }
    for l in layers {
        out.push_str(&format!(
            "  {:<28} {:<14} {:>10}  {:?}\n",
            l.node,
            l.op,
            human(l.macs),
            l.output_shape
        ));
    }
    out.push_str(&format!("quantizable nodes: {}", s.quantizable_nodes));
    let q: Vec<String> = s
        .quantizable_ops
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    out.push_str(&format!(" ({})\n", q.join(", ")));
    out.push_str("backends:\n");
    for b in &ins.backends {
        out.push_str(&format!(
            "  {:<6} {}  {}\n",
            b.backend,
            if b.runs { "runs" } else { "fails" },
            b.detail
        ));
    }
    print!("{out}");
    Ok(ExitStatus::Success)
}
