//! `shrink distill` and `shrink train`: train a student from a teacher's soft targets, or a
//! model from labels alone, on shrink's own engine, and write the same ONNX graph back with
//! the trained weights.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use super::reporters::BarReporter;
use super::ExitStatus;
use crate::data::Preprocess;
use crate::distill::augment::Augment;
use crate::distill::feature::HintSpec;
use crate::distill::net::Teacher;
use crate::distill::run::{self, OptimizerKind, Options, Summary, TeacherBackend, TeacherFactory};
use crate::distill::schedule::ScheduleKind;
use crate::engine::Tensor;
use crate::printer;
use crate::runtime::{self, BackendKind, RuntimeOptions, Session};

/// Options shared by `distill` and `train`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Labelled training data: an .npz with `x` and `y`, MNIST IDX files, or an image folder.
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Labelled validation data, evaluated after every epoch; the best epoch's weights are
    /// the ones written.
    #[arg(long, value_name = "PATH")]
    pub val: Option<PathBuf>,
    /// Where the trained model is written (once, at the end).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    #[command(flatten)]
    pub preprocess: Preprocess,
    /// Passes over the training data.
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay: added to the gradient for SGD, decoupled for AdamW (as in PyTorch).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Learning-rate schedule after the warm-up, evaluated per step.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    pub schedule: ScheduleKind,
    /// Epochs of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: usize,
    /// Label smoothing of the hard-label loss, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Scale gradients down when their global L2 norm exceeds this.
    #[arg(long, value_name = "NORM")]
    pub clip_grad_norm: Option<f64>,
    /// Augment training samples, comma-separated: crop, flip, shift.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "AUG,..")]
    pub augment: Vec<Augment>,
    /// Seed for shuffling, augmentation and initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: every core). Same seed and threads give the same weights.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write a checkpoint here after every epoch (`last.ckpt`).
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint-dir, bit for bit.
    #[arg(long, requires = "checkpoint_dir")]
    pub resume: bool,
    /// Stop after this epoch, leaving the checkpoint for --resume (writes no --out).
    #[arg(long, value_name = "EPOCH", requires = "checkpoint_dir")]
    pub stop_after: Option<usize>,
    /// Keep these weights (initializer names) fixed, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "NAME,..")]
    pub freeze: Vec<String>,
    /// Train only these weights (initializer names), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "NAME,..")]
    pub train_only: Vec<String>,
    /// Write per-epoch metrics as JSON lines to this file; `-` prints them on stdout.
    /// Repeatable.
    #[arg(long, value_name = "PATH")]
    pub metrics: Vec<PathBuf>,
}

/// Train a small student ONNX model to imitate a large teacher (knowledge distillation).
#[derive(Debug, Clone, clap::Args)]
pub struct DistillArgs {
    /// The teacher model.
    #[arg(long, value_name = "MODEL")]
    pub teacher: PathBuf,
    /// The student model to train, exported with its BatchNorm layers kept.
    #[arg(long, value_name = "MODEL")]
    pub student: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Softmax temperature of the soft targets.
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// Weight of the soft-target loss; 1 - alpha weighs the label loss.
    #[arg(long, default_value_t = 0.9)]
    pub alpha: f64,
    /// What computes the teacher's outputs.
    #[arg(long, value_enum, default_value_t = TeacherBackend::Engine)]
    pub teacher_backend: TeacherBackend,
    /// Add a hint loss between an intermediate tensor of the teacher and one of the student
    /// (a learned 1x1 projection maps channels when they differ). Repeatable.
    #[arg(long, value_name = "TEACHER_TENSOR:STUDENT_TENSOR")]
    pub hint: Vec<HintSpec>,
    /// Weight of each hint loss.
    #[arg(long, default_value_t = 1.0)]
    pub hint_weight: f64,
    /// ONNX Runtime library for --teacher-backend ort (default: ORT_DYLIB_PATH, next to
    /// the executable, or the onnxruntime Python package).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
}

/// Train a model on labelled data (`distill` without a teacher).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The model to train, exported with its BatchNorm layers kept.
    #[arg(long, value_name = "MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl CommonArgs {
    fn options(&self, teacher: Option<PathBuf>, student: PathBuf) -> Options {
        Options {
            val: self.val.clone(),
            preprocess: self.preprocess.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            optimizer: self.optimizer,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            schedule: self.schedule,
            warmup_epochs: self.warmup_epochs,
            label_smoothing: self.label_smoothing,
            clip_grad_norm: self.clip_grad_norm,
            augment: self.augment.clone(),
            freeze: self.freeze.clone(),
            train_only: self.train_only.clone(),
            seed: self.seed,
            threads: self.threads,
            checkpoint_dir: self.checkpoint_dir.clone(),
            resume: self.resume,
            stop_after: self.stop_after,
            ..Options::new(teacher, student, self.data.clone(), self.out.clone())
        }
    }
}

impl DistillArgs {
    pub fn options(&self) -> Options {
        Options {
            temperature: self.temperature,
            alpha: self.alpha,
            teacher_backend: self.teacher_backend,
            hints: self.hint.clone(),
            hint_weight: self.hint_weight,
            ..self
                .common
                .options(Some(self.teacher.clone()), self.student.clone())
        }
    }
}

pub fn distill(args: &DistillArgs) -> Result<ExitStatus> {
    finish(
        &run_with(&args.options(), &args.common.metrics, args.ort_lib.clone())?,
        &args.common.metrics,
    )
}

pub fn train(args: &TrainArgs) -> Result<ExitStatus> {
    let opts = args.common.options(None, args.model.clone());
    finish(
        &run_with(&opts, &args.common.metrics, None)?,
        &args.common.metrics,
    )
}

/// Runs training or distillation with progress bars and metrics files: the entry point for
/// recipes. `metrics` are JSON-lines files rewritten after each epoch (`-`: stdout).
pub fn run_with(opts: &Options, metrics: &[PathBuf], ort_lib: Option<PathBuf>) -> Result<Summary> {
    let bars = BarReporter::default();
    let factory = OrtFactory { ort_lib };
    let mut on_epoch = |history: &[serde_json::Value]| -> Result<()> {
        if let Some(m) = history.last() {
            printer::info(epoch_line(m));
        }
        for path in metrics {
            if path == Path::new("-") {
                if let Some(last) = history.last() {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{last}")?;
                    out.flush()?;
                }
            } else {
                let text: String = history.iter().map(|v| format!("{v}\n")).collect();
                crate::util::write_atomic(path, text.as_bytes())
                    .with_context(|| format!("cannot write metrics to {}", path.display()))?;
            }
        }
        Ok(())
    };
    let summary = run::run(opts, Some(&factory), &bars, &mut on_epoch)?;
    bars.done();
    Ok(summary)
}

/// `epoch 2/5: loss 0.4123, train 91.2%, val 95.1% (best), 10234 samples/s` from a metrics line.
fn epoch_line(m: &serde_json::Value) -> String {
    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    let val = match m["val_acc"].as_f64() {
        Some(v) => {
            let best = m["best_epoch"] == m["epoch"];
            format!(
                ", val {:.1}%{}",
                v * 100.0,
                if best { " (best)" } else { "" }
            )
        }
        None => String::new(),
    };
    format!(
        "epoch {}/{}: loss {:.4}, train {:.1}%{val}, {:.0} samples/s",
        m["epoch"],
        m["epochs"],
        f("train_loss"),
        f("train_acc") * 100.0,
        f("samples_per_s")
    )
}

fn finish(s: &Summary, metrics: &[PathBuf]) -> Result<ExitStatus> {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |a| format!("{:.1}%", a * 100.0));
    if metrics.iter().any(|p| p == Path::new("-")) {
        println!("{}", serde_json::json!({ "summary": s }));
    } else if s.student_before_val_acc.is_none() {
        printer::info("no --val given: accuracies were not measured");
    } else {
        let mut out = std::io::stdout().lock();
        if let Some(t) = s.teacher_val_acc {
            writeln!(out, "teacher          top-1 {}", pct(Some(t)))?;
        }
        writeln!(
            out,
            "student before   top-1 {}",
            pct(s.student_before_val_acc)
        )?;
        let best = s.best_epoch.map_or(String::new(), |e| {
            format!(" (best epoch {e} of {})", s.epochs)
        });
        writeln!(
            out,
            "student after    top-1 {}{best}",
            pct(s.student_after_val_acc)
        )?;
    }
    match &s.out {
        Some(p) => printer::info(format!("wrote {}", p.display())),
        None => printer::info(format!(
            "stopped after epoch {} of {}; continue with --resume",
            s.epochs_done, s.epochs
        )),
    }
    Ok(ExitStatus::Success)
}

/// Opens teachers on ONNX Runtime.
struct OrtFactory {
    ort_lib: Option<PathBuf>,
}

impl TeacherFactory for OrtFactory {
    fn open(&self, model: &Path, sample: [usize; 3], threads: usize) -> Result<Box<dyn Teacher>> {
        let bytes =
            std::fs::read(model).with_context(|| format!("cannot read {}", model.display()))?;
        let opts = RuntimeOptions {
            backend: BackendKind::Ort,
            threads,
            ort_lib: self.ort_lib.clone(),
            ..Default::default()
        };
        let mut t = OrtTeacher {
            bytes,
            sample,
            opts,
            sessions: HashMap::new(),
            provider: String::new(),
        };
        t.session(1).with_context(|| {
            format!(
                "cannot open the teacher {} in ONNX Runtime",
                model.display()
            )
        })?;
        Ok(Box::new(t))
    }
}

/// A teacher on ONNX Runtime; sessions have a fixed input shape, so one is kept per batch
/// size (usually two: the full batch and the last, shorter one).
struct OrtTeacher {
    bytes: Vec<u8>,
    sample: [usize; 3],
    opts: RuntimeOptions,
    sessions: HashMap<usize, Box<dyn Session>>,
    provider: String,
}

impl OrtTeacher {
    fn session(&mut self, n: usize) -> Result<&mut Box<dyn Session>> {
        if !self.sessions.contains_key(&n) {
            let [c, h, w] = self.sample;
            let s = runtime::open(&self.bytes, &[n, c, h, w], &self.opts)?;
            let i = s.info();
            self.provider = format!("{} {} ({})", i.backend, i.version, i.provider);
            self.sessions.insert(n, s);
        }
        self.sessions.get_mut(&n).context("session cache")
    }
}

impl Teacher for OrtTeacher {
    fn describe(&self) -> String {
        self.provider.clone()
    }

    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
        ensure!(
            taps.is_empty(),
            "ONNX Runtime does not expose the teacher's intermediate tensors"
        );
        let out = self.session(x.shape[0])?.run(&x.data)?;
        let first = out
            .into_iter()
            .next()
            .context("the teacher produced no output")?;
        Ok((Tensor::new(first.shape, first.data)?, Vec::new()))
    }
}

/// A recipe's `distill` stage as run options (metrics and the ONNX Runtime library are the
/// executor's to choose). The training data's preprocessing applies to validation too.
pub fn distill_options(o: &crate::recipe::DistillOptions) -> Options {
    let mut opts = Options::new(
        Some(o.teacher.path.clone()),
        o.student.path.clone(),
        o.data.dataset.path.clone(),
        o.out.path.clone(),
    );
    opts.val = o.val.as_ref().map(|v| v.dataset.path.clone());
    opts.preprocess = o.data.dataset.preprocess.clone();
    opts.temperature = o.temperature;
    opts.alpha = o.alpha;
    opts.teacher_backend = match o.teacher_backend {
        crate::recipe::TeacherBackend::Engine => TeacherBackend::Engine,
        crate::recipe::TeacherBackend::Ort => TeacherBackend::Ort,
    };
    common_from_recipe(
        opts,
        RecipeCommon {
            epochs: o.epochs,
            batch_size: o.batch_size,
            lr: o.lr,
            optimizer: o.optimizer,
            momentum: o.momentum,
            nesterov: o.nesterov,
            weight_decay: o.weight_decay,
            schedule: o.schedule,
            warmup_epochs: o.warmup_epochs,
            label_smoothing: o.label_smoothing,
            clip_grad_norm: o.clip_grad_norm,
            augment: &o.augment,
            freeze: &o.freeze,
            train_only: &o.train_only,
            seed: o.seed,
            threads: o.threads,
        },
    )
}

/// A recipe's `train` stage as run options.
pub fn train_options(o: &crate::recipe::TrainOptions) -> Options {
    let mut opts = Options::new(
        None,
        o.model.path.clone(),
        o.data.dataset.path.clone(),
        o.out.path.clone(),
    );
    opts.val = o.val.as_ref().map(|v| v.dataset.path.clone());
    opts.preprocess = o.data.dataset.preprocess.clone();
    common_from_recipe(
        opts,
        RecipeCommon {
            epochs: o.epochs,
            batch_size: o.batch_size,
            lr: o.lr,
            optimizer: o.optimizer,
            momentum: o.momentum,
            nesterov: o.nesterov,
            weight_decay: o.weight_decay,
            schedule: o.schedule,
            warmup_epochs: o.warmup_epochs,
            label_smoothing: o.label_smoothing,
            clip_grad_norm: o.clip_grad_norm,
            augment: &o.augment,
            freeze: &o.freeze,
            train_only: &o.train_only,
            seed: o.seed,
            threads: o.threads,
        },
    )
}

struct RecipeCommon<'a> {
    epochs: usize,
    batch_size: usize,
    lr: f64,
    optimizer: crate::recipe::Optimizer,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    schedule: crate::recipe::Schedule,
    warmup_epochs: usize,
    label_smoothing: f64,
    clip_grad_norm: Option<f64>,
    augment: &'a [crate::recipe::Augment],
    freeze: &'a [String],
    train_only: &'a [String],
    seed: u64,
    threads: Option<usize>,
}

fn common_from_recipe(mut opts: Options, c: RecipeCommon<'_>) -> Options {
    use crate::recipe;
    opts.epochs = c.epochs;
    opts.batch_size = c.batch_size;
    opts.lr = c.lr;
    opts.optimizer = match c.optimizer {
        recipe::Optimizer::Sgd => OptimizerKind::Sgd,
        recipe::Optimizer::Adamw => OptimizerKind::Adamw,
    };
    opts.momentum = c.momentum;
    opts.nesterov = c.nesterov;
    opts.weight_decay = c.weight_decay;
    opts.schedule = match c.schedule {
        recipe::Schedule::Cosine => ScheduleKind::Cosine,
        recipe::Schedule::Step => ScheduleKind::Step,
        recipe::Schedule::Constant => ScheduleKind::Constant,
    };
    opts.warmup_epochs = c.warmup_epochs;
    opts.label_smoothing = c.label_smoothing;
    opts.clip_grad_norm = c.clip_grad_norm;
    opts.augment = c
        .augment
        .iter()
        .map(|a| match a {
            recipe::Augment::Crop => Augment::Crop,
            recipe::Augment::Flip => Augment::Flip,
            recipe::Augment::Shift => Augment::Shift,
        })
        .collect();
    opts.freeze = c.freeze.to_vec();
    opts.train_only = c.train_only.to_vec();
    opts.seed = c.seed;
    opts.threads = c.threads;
    opts
}
