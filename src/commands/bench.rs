//! `shrink bench MODEL...`: latency, memory and accuracy, side by side.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use super::reporters::BarReporter;
use super::ExitStatus;
use crate::bench::measure::{self, BenchOptions, ModelSpec};
use crate::bench::render;
use crate::bench::report::BenchReport;
use crate::data::Preprocess;
use crate::runtime::{BackendKind, Device, RuntimeOptions, Target};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Models to measure, as PATH or NAME=PATH; ratios are against the first.
    #[arg(required = true, value_name = "MODEL")]
    pub models: Vec<String>,
    /// Inference backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Tract)]
    pub backend: BackendKind,
    /// Device or execution provider: cpu, cuda (tract or ort), xnnpack (ort).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// `mobile` runs tract on one thread, as a phone's big core would.
    #[arg(long, value_enum, default_value_t = Target::Host)]
    pub target: Target,
    /// Threads for the backend (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Untimed runs of each model before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Timed runs of each model.
    #[arg(long, default_value_t = 100)]
    pub iterations: usize,
    /// Time for this many seconds instead of a fixed number of iterations.
    #[arg(long, value_name = "SECONDS", conflicts_with = "iterations")]
    pub duration: Option<f64>,
    /// Labelled data for top-1/top-5 accuracy.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub preprocess: Preprocess,
    /// Reference model for agreement (top-1 agreement, max abs diff, SQNR).
    #[arg(long, value_name = "MODEL")]
    pub reference: Option<PathBuf>,
    /// Skip the child process that measures peak RSS.
    #[arg(long)]
    pub no_memory: bool,
    /// Write the JSON report here (stdout gets the Markdown table).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write the Markdown table here.
    #[arg(long, value_name = "PATH")]
    pub markdown: Option<PathBuf>,
    /// Write a self-contained HTML page with latency charts here.
    #[arg(long, value_name = "PATH")]
    pub html: Option<PathBuf>,
    /// ONNX Runtime library (default: ORT_DYLIB_PATH, next to the executable, or the onnxruntime Python package).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl BenchArgs {
    pub fn options(&self) -> Result<BenchOptions> {
        let threads = match self.target {
            Target::Mobile => 1,
            Target::Host => self.threads.unwrap_or_else(crate::runtime::default_threads),
        };
        anyhow::ensure!(threads >= 1, "--threads must be at least 1");
        let duration = match self.duration {
            Some(d) if d > 0.0 && d.is_finite() => Some(Duration::from_secs_f64(d)),
            Some(d) => anyhow::bail!("--duration {d} must be a positive number of seconds"),
            None => None,
        };
        Ok(BenchOptions {
            runtime: RuntimeOptions {
                backend: self.backend,
                device: self.device,
                threads,
                ort_lib: self.ort_lib.clone(),
            },
            target: self.target,
            batch_size: self.batch_size,
            warmup: self.warmup,
            iterations: self.iterations,
            duration,
            data: self.data.clone(),
            preprocess: self.preprocess.clone(),
            reference: self.reference.clone(),
            measure_rss: !self.no_memory,
            seed: self.seed,
        })
    }
}

/// Runs the bench and writes every report asked for; returns the report.
pub fn run_bench(args: &BenchArgs) -> Result<BenchReport> {
    let opts = args.options()?;
    if opts.target == Target::Mobile {
        crate::printer::info(
            "target mobile: tract, 1 thread (x86 kernels here; phones run tract's ARM kernels)",
        );
    }
    let models: Vec<ModelSpec> = args.models.iter().map(|m| ModelSpec::parse(m)).collect();
    let progress = BarReporter::default();
    let report = measure::run(&models, &opts, &progress)?;
    for w in render::warnings(&report) {
        crate::printer::warn(w);
    }
    if let Some(p) = &args.json {
        crate::util::write_atomic(p, report.to_json().as_bytes())
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &args.markdown {
        crate::util::write_atomic(p, render::markdown(&report).as_bytes())?;
    }
    if let Some(p) = &args.html {
        crate::util::write_atomic(p, render::html(&report).as_bytes())?;
    }
    Ok(report)
}

pub fn bench(args: &BenchArgs) -> Result<ExitStatus> {
    let report = run_bench(args)?;
    print!("{}", render::markdown(&report));
    Ok(ExitStatus::Success)
}

/// Arguments of the hidden child process that measures one model's peak RSS.
#[derive(Debug, clap::Args)]
pub struct RssProbeArgs {
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub backend: BackendKind,
    #[arg(long, value_enum)]
    pub device: Device,
    #[arg(long)]
    pub threads: usize,
    #[arg(long)]
    pub batch_size: usize,
    #[arg(long)]
    pub iterations: usize,
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
}

pub fn rss_probe(args: &RssProbeArgs) -> Result<ExitStatus> {
    let rt = RuntimeOptions {
        backend: args.backend,
        device: args.device,
        threads: args.threads,
        ort_lib: args.ort_lib.clone(),
    };
    let rss = measure::rss_probe(&args.model, &rt, args.batch_size, args.iterations)?;
    println!("{rss}");
    Ok(ExitStatus::Success)
}

/// Arguments of the hidden `__predict` command: raw outputs of a model on a dataset, for
/// checking one build of shrink against another (e.g. aarch64 under emulation against x86).
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    pub model: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendKind::Tract)]
    pub backend: BackendKind,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Write the outputs (JSON: shape and values of the first output) here.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn predict(args: &PredictArgs) -> Result<ExitStatus> {
    let model = crate::onnx::Model::load(&args.model)?;
    let sample = crate::bench::measure::sample_shape(&model)?;
    let bytes = prost::Message::encode_to_vec(&model.to_proto());
    let ds = crate::data::Dataset::open(&args.data, &Preprocess::default(), sample)?;
    let all = ds.load_all()?;
    let rt = RuntimeOptions {
        backend: args.backend,
        threads: args.threads,
        ..Default::default()
    };
    let mut s = crate::runtime::open(&bytes, &all.shape, &rt)?;
    let out = s
        .run(&all.x)?
        .into_iter()
        .next()
        .context("the model has no outputs")?;
    let json = serde_json::json!({ "model": args.model.display().to_string(), "shape": out.shape, "values": out.data });
    crate::util::write_atomic(&args.out, json.to_string().as_bytes())?;
    Ok(ExitStatus::Success)
}
