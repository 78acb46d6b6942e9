//! Runs models on a backend and measures latency, accuracy, agreement and memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::report::{
    Accuracy, Agreement, BenchReport, Latency, ModelReport, Ratios, Settings, SCHEMA,
};
use crate::data::{Dataset, Preprocess};
use crate::onnx::Model;
use crate::runtime::{self, BackendKind, Device, RuntimeOptions, Session, Target};

/// A model to measure, with the name it gets in reports.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
}

impl ModelSpec {
    /// Parses `PATH` or `NAME=PATH`.
    pub fn parse(s: &str) -> ModelSpec {
        match s.split_once('=') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => ModelSpec {
                name: n.into(),
                path: p.into(),
            },
            _ => {
                let path = PathBuf::from(s);
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| s.to_string());
                ModelSpec { name, path }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub runtime: RuntimeOptions,
    pub target: Target,
    pub batch_size: usize,
    pub warmup: usize,
    pub iterations: usize,
    /// When set, timed rounds continue until this much time has passed (at least one round).
    pub duration: Option<Duration>,
    pub data: Option<PathBuf>,
    pub preprocess: Preprocess,
    pub reference: Option<PathBuf>,
    /// Measure peak RSS in a child process (`shrink` must be the running executable).
    pub measure_rss: bool,
    pub seed: u64,
}

/// Progress callbacks; the CLI draws bars, tests pass `()`.
pub trait Progress {
    fn phase(&self, _label: &str, _total: u64) {}
    fn inc(&self, _n: u64) {}
    fn finish(&self) {}
}

impl Progress for () {}

struct Loaded {
    spec: ModelSpec,
    bytes: Vec<u8>,
    sample: [usize; 3],
    size_bytes: u64,
    weight_bytes: u64,
    params: u64,
}

fn load(spec: &ModelSpec) -> Result<Loaded> {
    let model = Model::load(&spec.path)?;
    let sample =
        sample_shape(&model).with_context(|| format!("cannot bench {}", spec.path.display()))?;
    let size_bytes = std::fs::metadata(&spec.path)?.len();
    let weight_bytes = model
        .graph
        .initializers
        .values()
        .map(|t| t.byte_size() as u64)
        .sum();
    let params = model
        .graph
        .initializers
        .values()
        .map(|t| t.numel() as u64)
        .sum();
    let bytes = prost::Message::encode_to_vec(&model.to_proto());
    Ok(Loaded {
        spec: spec.clone(),
        bytes,
        sample,
        size_bytes,
        weight_bytes,
        params,
    })
}

/// `[c, h, w]` of a model's single image input.
pub fn sample_shape(model: &Model) -> Result<[usize; 3]> {
    let g = &model.graph;
    ensure!(
        g.inputs.len() == 1,
        "the model has {} inputs; shrink works on models with one image input",
        g.inputs.len()
    );
    let s = g.inputs[0].concrete_shape(1)?;
    ensure!(
        s.len() == 4,
        "input `{}` has shape {s:?}; shrink expects an NCHW image input",
        g.inputs[0].name
    );
    input_len(&[1, s[1], s[2], s[3]])
        .with_context(|| format!("input `{}` of shape {s:?}", g.inputs[0].name))?;
    Ok([s[1], s[2], s[3]])
}

/// Elements of an input batch of `shape`, refused before allocating when the model declares
/// more than fits in memory.
fn input_len(shape: &[usize; 4]) -> Result<usize> {
    let bytes = crate::util::byte_size(shape.iter().map(|&d| d as u64), 4);
    crate::util::ensure_fits_in_memory(bytes, || {
        format!("an input batch of shape {shape:?} (float32)")
    })?;
    Ok(shape.iter().product())
}

fn effective_runtime(opts: &BenchOptions) -> Result<RuntimeOptions> {
    let mut rt = opts.runtime.clone();
    if opts.target == Target::Mobile {
        ensure!(
            rt.backend == BackendKind::Tract && rt.device == Device::Cpu,
            "--target mobile runs tract on one CPU thread; drop --backend/--device or use --target host"
        );
        rt.threads = 1;
    }
    rt.threads = rt.threads.max(1);
    Ok(rt)
}

fn time_ms(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// A deterministic input batch in [0, 1) for latency runs (values don't change timings).
fn synthetic_input(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32) / (1u64 << 24) as f32
        })
        .collect()
}

pub fn run(
    models: &[ModelSpec],
    opts: &BenchOptions,
    progress: &dyn Progress,
) -> Result<BenchReport> {
    ensure!(!models.is_empty(), "give at least one model to bench");
    ensure!(opts.batch_size > 0, "--batch-size must be at least 1");
    ensure!(
        opts.iterations > 0 || opts.duration.is_some(),
        "--iterations must be at least 1"
    );
    let rt = effective_runtime(opts)?;
    let loaded: Vec<Loaded> = models.iter().map(load).collect::<Result<_>>()?;
    let mut sessions: Vec<Box<dyn Session>> = Vec::new();
    let mut create_ms = Vec::new();
    let mut cold_ms = Vec::new();
    let mut inputs = Vec::new();
    for (i, m) in loaded.iter().enumerate() {
        let shape = [opts.batch_size, m.sample[0], m.sample[1], m.sample[2]];
        let len = input_len(&shape)?;
        let mut session = None;
        let t = time_ms(|| {
            session = Some(runtime::open(&m.bytes, &shape, &rt).with_context(|| {
                format!("cannot open {} on {}", m.spec.path.display(), rt.backend)
            })?);
            Ok(())
        })?;
        let mut s = session.expect("set above");
        let x = synthetic_input(len, opts.seed + i as u64);
        cold_ms.push(time_ms(|| s.run(&x).map(|_| ()))?);
        create_ms.push(t);
        sessions.push(s);
        inputs.push(x);
    }
    progress.phase("warm-up", (opts.warmup * sessions.len()) as u64);
    for _ in 0..opts.warmup {
        for (s, x) in sessions.iter_mut().zip(&inputs) {
            s.run(x)?;
            progress.inc(1);
        }
    }
    progress.finish();
    // Interleaved rounds (A B A B ...) so that drift in machine load hits every model alike.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); sessions.len()];
    let start = Instant::now();
    let total = opts.iterations.max(1) as u64;
    progress.phase("timing", total);
    let mut round = 0usize;
    loop {
        for ((s, x), out) in sessions.iter_mut().zip(&inputs).zip(samples.iter_mut()) {
            let t = Instant::now();
            s.run(x)?;
            out.push(t.elapsed().as_secs_f64() * 1e3);
        }
        round += 1;
        progress.inc(1);
        let done = match opts.duration {
            Some(d) => start.elapsed() >= d && round >= 1,
            None => round >= opts.iterations,
        };
        if done {
            break;
        }
    }
    progress.finish();
    let providers: Vec<String> = sessions.iter().map(|s| s.info().provider.clone()).collect();
    let info = sessions[0].info().clone();
    drop(sessions);

    let reference = match &opts.reference {
        Some(p) => Some(load(&ModelSpec::parse(&p.to_string_lossy()))?),
        None => None,
    };
    let mut reports = Vec::new();
    for (i, (m, lat)) in loaded.iter().zip(samples).enumerate() {
        let latency = Latency::from_samples(lat);
        let accuracy = match &opts.data {
            Some(d) => Some(accuracy(m, d, opts, &rt, progress)?),
            None => None,
        };
        let agreement = match &reference {
            Some(r) => Some(agreement(m, r, opts, &rt)?),
            None => None,
        };
        let peak_rss_bytes = if opts.measure_rss {
            Some(peak_rss_in_child(&m.spec.path, opts, &rt)?)
        } else {
            None
        };
        reports.push(ModelReport {
            name: m.spec.name.clone(),
            path: m.spec.path.display().to_string(),
            size_bytes: m.size_bytes,
            weight_bytes: m.weight_bytes,
            params: m.params,
            peak_rss_bytes,
            gpu_memory_bytes: None,
            session_create_ms: create_ms[i],
            cold_start_ms: cold_ms[i],
            throughput_per_s: opts.batch_size as f64 * 1e3 / latency.mean,
            latency_ms: latency,
            accuracy,
            agreement,
            ratios: Ratios {
                latency_p50: 1.0,
                size: 1.0,
            },
        });
    }
    let (p0, s0) = (reports[0].latency_ms.p50, reports[0].size_bytes as f64);
    for r in &mut reports {
        r.ratios = Ratios {
            latency_p50: r.latency_ms.p50 / p0,
            size: r.size_bytes as f64 / s0,
        };
    }
    ensure!(
        providers.iter().all(|p| *p == providers[0]),
        "models ran on different providers: {providers:?}"
    );
    let mut versions = std::collections::BTreeMap::new();
    versions.insert(
        if info.backend == "ort" {
            "onnxruntime".to_string()
        } else {
            "tract".to_string()
        },
        info.version.clone(),
    );
    Ok(BenchReport {
        schema: SCHEMA.into(),
        shrink_version: env!("CARGO_PKG_VERSION").into(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        settings: Settings {
            backend: info.backend.clone(),
            device: rt.device.to_string(),
            provider: info.provider.clone(),
            target: opts.target.to_string(),
            threads: info.threads,
            batch_size: opts.batch_size,
            warmup: opts.warmup,
            iterations: round,
            cpu_model: cpu_model(),
            cpu_cores: runtime::default_threads(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            versions,
        },
        models: reports,
    })
}

/// Top-1/top-5 of a model given as ONNX bytes, on labelled `data`.
pub fn accuracy_of(
    bytes: &[u8],
    sample: [usize; 3],
    data: &Path,
    preprocess: &Preprocess,
    rt: &RuntimeOptions,
) -> Result<Accuracy> {
    let m = Loaded {
        spec: ModelSpec {
            name: String::new(),
            path: PathBuf::new(),
        },
        bytes: bytes.to_vec(),
        sample,
        size_bytes: 0,
        weight_bytes: 0,
        params: 0,
    };
    let opts = BenchOptions {
        runtime: rt.clone(),
        target: Target::Host,
        batch_size: EVAL_BATCH,
        warmup: 0,
        iterations: 1,
        duration: None,
        data: Some(data.to_path_buf()),
        preprocess: preprocess.clone(),
        reference: None,
        measure_rss: false,
        seed: 0,
    };
    accuracy(&m, data, &opts, rt, &())
}

/// Batch size for accuracy passes: big enough to be quick, independent of the latency batch.
const EVAL_BATCH: usize = 32;

/// Runs `f` on every batch of `data`, padding the last batch to the session's fixed shape.
fn for_each_output(
    m: &Loaded,
    data: &Path,
    opts: &BenchOptions,
    rt: &RuntimeOptions,
    mut f: impl FnMut(&[f32], usize, Option<&[i64]>) -> Result<()>,
) -> Result<u64> {
    let ds = Dataset::open(data, &opts.preprocess, m.sample)?;
    let shape = [EVAL_BATCH, m.sample[0], m.sample[1], m.sample[2]];
    let len = input_len(&shape)?;
    let mut s = runtime::open(&m.bytes, &shape, rt)?;
    let mut n = 0u64;
    for b in ds.batches(EVAL_BATCH)? {
        let b = b?;
        let mut x = b.x;
        x.resize(len, 0.0);
        let out = s.run(&x)?;
        let logits = &out.first().context("the model has no outputs")?.data;
        ensure!(
            logits.len() % EVAL_BATCH == 0,
            "the model's first output does not have the batch as its first axis"
        );
        f(logits, b.shape[0], b.y.as_deref())?;
        n += b.shape[0] as u64;
    }
    Ok(n)
}

fn accuracy(
    m: &Loaded,
    data: &Path,
    opts: &BenchOptions,
    rt: &RuntimeOptions,
    progress: &dyn Progress,
) -> Result<Accuracy> {
    let (mut top1, mut top5) = (0u64, 0u64);
    progress.phase(&format!("accuracy {}", m.spec.name), 0);
    let n = for_each_output(m, data, opts, rt, |logits, n, y| {
        let y = y.context("the dataset has no labels; accuracy needs labelled data")?;
        let classes = logits.len() / EVAL_BATCH;
        for i in 0..n {
            let row = &logits[i * classes..(i + 1) * classes];
            let rank = row
                .iter()
                .filter(|&&v| v > row[y[i] as usize % classes.max(1)])
                .count();
            ensure!(
                (y[i] as usize) < classes,
                "label {} is out of range for a model with {classes} outputs",
                y[i]
            );
            top1 += (rank == 0) as u64;
            top5 += (rank < 5) as u64;
        }
        progress.inc(n as u64);
        Ok(())
    })?;
    progress.finish();
    Ok(Accuracy {
        data: data.display().to_string(),
        samples: n,
        top1: top1 as f64 / n as f64,
        top5: top5 as f64 / n as f64,
    })
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Signal-to-quantization-noise ratio in dB of `approx` against `reference`.
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    let (mut s, mut e) = (0f64, 0f64);
    for (r, a) in reference.iter().zip(approx) {
        s += (*r as f64).powi(2);
        e += (*r as f64 - *a as f64).powi(2);
    }
    if e == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (s / e).log10()
    }
}

fn agreement(
    m: &Loaded,
    r: &Loaded,
    opts: &BenchOptions,
    rt: &RuntimeOptions,
) -> Result<Agreement> {
    ensure!(
        m.sample == r.sample,
        "the reference model takes {:?} but {} takes {:?}",
        r.sample,
        m.spec.name,
        m.sample
    );
    let collect = |l: &Loaded| -> Result<Vec<f32>> {
        let mut all = Vec::new();
        match &opts.data {
            Some(d) => {
                for_each_output(l, d, opts, rt, |logits, n, _| {
                    all.extend_from_slice(&logits[..n * logits.len() / EVAL_BATCH]);
                    Ok(())
                })?;
            }
            None => {
                let shape = [EVAL_BATCH, l.sample[0], l.sample[1], l.sample[2]];
                let len = input_len(&shape)?;
                let mut s = runtime::open(&l.bytes, &shape, rt)?;
                let x = synthetic_input(len, opts.seed);
                all = s.run(&x)?.into_iter().next().context("no outputs")?.data;
            }
        }
        Ok(all)
    };
    let a = collect(m)?;
    let b = collect(r)?;
    ensure!(
        a.len() == b.len() && !a.is_empty(),
        "{} and the reference give outputs of different sizes",
        m.spec.name
    );
    let samples = match &opts.data {
        Some(_) => a.len() / (a.len() / b.len().max(1)).max(1),
        None => EVAL_BATCH,
    };
    let classes = a.len() / samples.max(1);
    let agree = a
        .chunks(classes)
        .zip(b.chunks(classes))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    Ok(Agreement {
        reference: r.spec.path.display().to_string(),
        samples: (a.len() / classes) as u64,
        top1_agreement: agree as f64 / (a.len() / classes) as f64,
        max_abs_diff: a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max),
        sqnr_db: Some(sqnr_db(&b, &a)).filter(|v| v.is_finite()),
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Peak resident set (VmHWM) of this process, in bytes.
pub fn own_peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Loads and runs one model in a child `shrink` process and reads back its peak RSS, so that
/// models measured in one call don't inflate each other's figures.
fn peak_rss_in_child(model: &Path, opts: &BenchOptions, rt: &RuntimeOptions) -> Result<u64> {
    let exe = std::env::current_exe().context("cannot find the shrink executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__rss-probe")
        .arg(model)
        .arg("--backend")
        .arg(rt.backend.to_string())
        .arg("--device")
        .arg(rt.device.to_string())
        .arg("--threads")
        .arg(rt.threads.to_string())
        .arg("--batch-size")
        .arg(opts.batch_size.to_string())
        .arg("--iterations")
        .arg(opts.warmup.max(3).to_string());
    if let Some(l) = &rt.ort_lib {
        cmd.arg("--ort-lib").arg(l);
    }
    let out = cmd
        .output()
        .context("cannot start the memory probe process")?;
    if !out.status.success() {
        bail!(
            "the memory probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("the memory probe printed no figure")
}

/// The child side of [`peak_rss_in_child`]: load, run, print VmHWM.
pub fn rss_probe(
    model: &Path,
    rt: &RuntimeOptions,
    batch: usize,
    iterations: usize,
) -> Result<u64> {
    let m = load(&ModelSpec {
        name: String::new(),
        path: model.to_path_buf(),
    })?;
    let shape = [batch, m.sample[0], m.sample[1], m.sample[2]];
    let len = input_len(&shape)?;
    let mut s = runtime::open(&m.bytes, &shape, rt)?;
    let x = synthetic_input(len, 0);
    for _ in 0..iterations.max(1) {
        s.run(&x)?;
    }
    own_peak_rss().context("peak RSS is not available on this platform (/proc/self/status)")
}
