//! One training or distillation run from files to files: loads the models and data, checks
//! everything that can be checked before the first step, trains, and writes the student's
//! ONNX graph back with its trained weights.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::augment::Augment;
use super::engine_net;
use super::feature::HintSpec;
use super::loss::KdConfig;
use super::net::{Network, Teacher};
use super::optim::OptimizerConfig;
use super::schedule::ScheduleKind;
use super::train::{self, FitConfig, Progress, Samples};
use crate::data::{Dataset, Preprocess};
use crate::engine::Tensor;
use crate::hint::HintExt;
use crate::onnx::Model;
use crate::printer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TeacherBackend {
    /// shrink's own engine.
    #[default]
    Engine,
    /// ONNX Runtime (through the commands layer, which owns the runtimes).
    Ort,
}

/// Everything one run needs; `shrink distill`, `shrink train` and recipes fill it in.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// None trains on labels alone (`shrink train`).
    pub teacher: Option<PathBuf>,
    pub student: PathBuf,
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    pub out: PathBuf,
    /// Applies to both datasets, except `limit`, which only applies to the training data.
    pub preprocess: Preprocess,
    pub temperature: f64,
    pub alpha: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub schedule: ScheduleKind,
    pub warmup_epochs: usize,
    pub label_smoothing: f64,
    pub clip_grad_norm: Option<f64>,
    pub augment: Vec<Augment>,
    pub freeze: Vec<String>,
    pub train_only: Vec<String>,
    pub teacher_backend: TeacherBackend,
    pub hints: Vec<HintSpec>,
    pub hint_weight: f64,
    pub seed: u64,
    /// None: every core.
    pub threads: Option<usize>,
    pub checkpoint_dir: Option<PathBuf>,
    pub resume: bool,
    pub stop_after: Option<usize>,
}

impl Options {
    /// The defaults of `shrink distill` / `shrink train` (and of recipes).
    pub fn new(teacher: Option<PathBuf>, student: PathBuf, data: PathBuf, out: PathBuf) -> Options {
        Options {
            teacher,
            student,
            data,
            val: None,
            out,
            preprocess: Preprocess::default(),
            temperature: 4.0,
            alpha: 0.9,
            epochs: 5,
            batch_size: 64,
            lr: 0.05,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            schedule: ScheduleKind::Cosine,
            warmup_epochs: 0,
            label_smoothing: 0.0,
            clip_grad_norm: None,
            augment: Vec::new(),
            freeze: Vec::new(),
            train_only: Vec::new(),
            teacher_backend: TeacherBackend::Engine,
            hints: Vec::new(),
            hint_weight: 1.0,
            seed: 0,
            threads: None,
            checkpoint_dir: None,
            resume: false,
            stop_after: None,
        }
    }

    fn fit_config(&self, threads: usize) -> Result<FitConfig> {
        let optimizer = match self.optimizer {
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
            },
            OptimizerKind::Adamw => {
                ensure!(!self.nesterov, "--nesterov applies to SGD only");
                OptimizerConfig::Adamw {
                    weight_decay: self.weight_decay,
                }
            }
        };
        ensure!(
            (0.0..1.0).contains(&self.label_smoothing),
            "--label-smoothing must be in [0, 1), got {}",
            self.label_smoothing
        );
        let kd = match self.teacher {
            Some(_) => {
                ensure!(
                    self.temperature > 0.0,
                    "--temperature must be positive, got {}",
                    self.temperature
                );
                ensure!(
                    (0.0..=1.0).contains(&self.alpha),
                    "--alpha must be between 0 and 1, got {}",
                    self.alpha
                );
                Some(KdConfig {
                    temperature: self.temperature,
                    alpha: self.alpha,
                    label_smoothing: self.label_smoothing,
                })
            }
            None => None,
        };
        ensure!(self.hint_weight >= 0.0, "--hint-weight must be >= 0");
        let mut augment = self.augment.clone();
        augment.sort();
        augment.dedup();
        Ok(FitConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            optimizer,
            schedule: self.schedule,
            warmup_epochs: self.warmup_epochs,
            label_smoothing: self.label_smoothing,
            clip_grad_norm: self.clip_grad_norm,
            augment,
            seed: self.seed,
            kd,
            hints: self.hints.clone(),
            hint_weight: self.hint_weight,
            checkpoint_dir: self.checkpoint_dir.clone(),
            resume: self.resume,
            stop_after: self.stop_after,
            threads,
        })
    }
}

/// What a run reports at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub teacher_val_acc: Option<f64>,
    pub student_before_val_acc: Option<f64>,
    pub student_after_val_acc: Option<f64>,
    pub best_epoch: Option<usize>,
    pub epochs_done: usize,
    pub epochs: usize,
    pub trained: Vec<String>,
    /// Where the trained model was written; None when `stop_after` ended the run early.
    pub out: Option<PathBuf>,
    pub threads: usize,
    pub teacher_backend: Option<String>,
    pub metrics: Vec<serde_json::Value>,
}

/// Teachers the commands layer builds for backends this layer cannot reach (ONNX Runtime).
pub trait TeacherFactory {
    fn open(&self, model: &Path, sample: [usize; 3], threads: usize) -> Result<Box<dyn Teacher>>;
}

/// Normalisation ops whose presence shows the graph was exported for training.
const NORMS: [&str; 4] = [
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
];

/// How to export a student that keeps its BatchNorm layers.
pub const EXPORT_HINT: &str = "export the student for training with `torch.onnx.export(model, x, path, \
    training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)` so its BatchNormalization layers are kept";

/// `[c, h, w]` of the model's single NCHW input.
pub fn sample_shape(model: &Model, path: &Path) -> Result<[usize; 3]> {
    let g = &model.graph;
    ensure!(
        g.inputs.len() == 1,
        "{} has {} inputs; training needs one image input",
        path.display(),
        g.inputs.len()
    );
    let s = g.inputs[0]
        .concrete_shape(1)
        .with_context(|| format!("input of {}", path.display()))?;
    ensure!(
        s.len() == 4,
        "input `{}` of {} has shape {s:?}; training needs an NCHW image input",
        g.inputs[0].name,
        path.display()
    );
    Ok([s[1], s[2], s[3]])
}

fn load_samples(
    path: &Path,
    pre: &Preprocess,
    sample: [usize; 3],
    what: &str,
    model: &Path,
) -> Result<Samples> {
    let ds = Dataset::open(path, pre, sample).with_context(|| {
        format!(
            "cannot use {} as {what} for {} (input [N, {}, {}, {}])",
            path.display(),
            model.display(),
            sample[0],
            sample[1],
            sample[2]
        )
    })?;
    let b = ds.load_all()?;
    let y =
        b.y.with_context(|| format!("{} has no labels; {what} must be labelled", path.display()))?;
    let x = Tensor::new(b.shape.to_vec(), b.x)?;
    Samples::new(x, y).with_context(|| format!("{what} {}", path.display()))
}

/// Trains or distills as `opts` says. `external` opens teachers on backends other than the
/// engine; `on_epoch` receives the metrics history after each epoch.
pub fn run(
    opts: &Options,
    external: Option<&(dyn TeacherFactory + Sync)>,
    progress: &(dyn Progress + Sync),
    on_epoch: &mut (dyn FnMut(&[serde_json::Value]) -> Result<()> + Send),
) -> Result<Summary> {
    let threads = match opts.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let cfg = opts.fit_config(threads)?;
    ensure!(
        cfg.stop_after.is_none_or(|s| s >= 1),
        "--stop-after must be at least 1"
    );
    if opts.resume && opts.checkpoint_dir.is_none() {
        return Err(anyhow::anyhow!("--resume needs --checkpoint-dir"))
            .hint("pass the --checkpoint-dir of the interrupted run");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the worker threads")?;

    pool.install(|| -> Result<Summary> {
        // --- the student ---------------------------------------------------------------
        let student_bytes = std::fs::read(&opts.student).with_context(|| format!("cannot read {}", opts.student.display()))?;
        let mut model = Model::load(&opts.student)?;
        let sample = sample_shape(&model, &opts.student)?;
        if !model.graph.nodes.iter().any(|n| NORMS.contains(&n.op_type.as_str())) {
            printer::warn(format!(
                "{} has no normalisation layers (BatchNorm was probably folded into Conv when it was exported); \
                 it will train, but usually worse and less stably\nhint: {EXPORT_HINT}",
                opts.student.display()
            ));
        }
        let mut net = engine_net::open(&model).with_context(|| format!("cannot train {}", opts.student.display()))?;
        let trainable = select(net.as_ref(), opts)?;
        net.set_trainable(&trainable)?;
        describe_trainable(net.as_ref(), &trainable, &opts.student);

        // --- the teacher ---------------------------------------------------------------
        let mut teacher_bytes = Vec::new();
        let mut teacher: Option<Box<dyn Teacher>> = match &opts.teacher {
            None => None,
            Some(path) => {
                teacher_bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                let tm = Model::load(path)?;
                let ts = sample_shape(&tm, path)?;
                ensure!(
                    ts == sample,
                    "the teacher {} takes inputs [N, {}, {}, {}] but the student {} takes [N, {}, {}, {}]; both must read the same images",
                    path.display(), ts[0], ts[1], ts[2], opts.student.display(), sample[0], sample[1], sample[2]
                );
                Some(match opts.teacher_backend {
                    TeacherBackend::Engine => engine_net::open_teacher(&tm).with_context(|| format!("cannot run the teacher {} on the engine", path.display())).hint("run the teacher on ONNX Runtime with --teacher-backend ort")?,
                    TeacherBackend::Ort => {
                        ensure!(opts.hints.is_empty(), "hint losses read the teacher's intermediate tensors, which only the engine exposes; use --teacher-backend engine");
                        let f = external.context("this build cannot run the teacher on ONNX Runtime")?;
                        f.open(path, sample, threads)?
                    }
                })
            }
        };

        if let Some(t) = &teacher {
            printer::info(format!("teacher runs on {}", t.describe()));
        }

        // --- data --------------------------------------------------------------------
        let data = load_samples(&opts.data, &opts.preprocess, sample, "training data", &opts.student)?;
        let val_pre = Preprocess { limit: None, ..opts.preprocess.clone() };
        let val = opts.val.as_deref().map(|v| load_samples(v, &val_pre, sample, "validation data", &opts.student)).transpose()?;

        // --- checks before the first step ---------------------------------------------
        let (x0, _) = data.gather(&[0]);
        let (s_out, _) = net.infer(&x0, &[]).with_context(|| format!("cannot run {}", opts.student.display()))?;
        ensure!(s_out.shape.len() == 2, "the student's output has shape {:?}; training needs logits [N, classes]", s_out.shape);
        let classes = s_out.shape[1];
        if let (Some(t), Some(path)) = (teacher.as_deref_mut(), &opts.teacher) {
            let (t_out, _) = t.infer(&x0, &[]).with_context(|| format!("cannot run the teacher {}", path.display()))?;
            if t_out.shape != s_out.shape {
                return Err(anyhow::anyhow!(
                    "the teacher {} outputs shape {:?} but the student {} outputs {:?} for one sample; distillation needs the same classes",
                    path.display(), t_out.shape, opts.student.display(), s_out.shape
                ))
                .hint("the teacher and the student must predict the same classes in the same order");
            }
        }
        for (what, d, p) in [("training", Some(&data), Some(opts.data.as_path())), ("validation", val.as_ref(), opts.val.as_deref())] {
            let (Some(d), Some(p)) = (d, p) else { continue };
            if let Some((i, &y)) = d.y.iter().enumerate().find(|(_, &y)| !(0..classes as i64).contains(&y)) {
                bail!("label {y} of sample {i} of the {what} data {} is outside the model's {classes} classes", p.display());
            }
        }

        // --- accuracies before -----------------------------------------------------
        let quiet = train::NoProgress;
        let teacher_acc = match (teacher.as_deref_mut(), &val) {
            (Some(t), Some(v)) => Some(train::evaluate_teacher(t, v, 256, &quiet).context("teacher accuracy on the validation data")?),
            _ => None,
        };
        let before = match &val {
            Some(v) => Some(train::evaluate(net.as_mut(), v, 256, &quiet)?),
            None => None,
        };

        let fingerprint = fingerprint(&cfg, &student_bytes, &teacher_bytes, opts, &data, &trainable);
        let teacher_desc = teacher.as_ref().map(|t| t.describe());
        let teacher_ref = teacher.as_mut().map(|t| t.as_mut() as &mut dyn Teacher);
        let fit = train::fit(net.as_mut(), teacher_ref, &data, val.as_ref(), &cfg, &trainable, &fingerprint, progress, on_epoch)?;

        let after = match &val {
            Some(v) => Some(train::evaluate(net.as_mut(), v, 256, &quiet)?),
            None => None,
        };
        if let (Some(b), Some(a)) = (before, after) {
            if a < b && !fit.stopped_early {
                printer::warn(format!(
                    "training lowered the validation accuracy from {:.1}% to {:.1}% (the best of its epochs); \
                     for a model that is already trained, lower --lr or add --warmup-epochs",
                    b * 100.0,
                    a * 100.0
                ));
            }
        }
        let out = if fit.stopped_early {
            None
        } else {
            super::net::write_back(net.as_ref(), &mut model)?;
            model.save(&opts.out).with_context(|| format!("cannot write the trained model to {}", opts.out.display()))?;
            Some(opts.out.clone())
        };
        Ok(Summary {
            teacher_val_acc: teacher_acc,
            student_before_val_acc: before,
            student_after_val_acc: after,
            best_epoch: fit.best.map(|b| b.epoch),
            epochs_done: fit.epochs_done,
            epochs: cfg.epochs,
            trained: trainable.iter().cloned().collect(),
            out,
            threads,
            teacher_backend: teacher_desc,
            metrics: fit.metrics,
        })
    })
}

/// The parameters to train: every trainable one, narrowed by `--train-only` and `--freeze`.
fn select(net: &dyn Network, opts: &Options) -> Result<BTreeSet<String>> {
    let known: Vec<&str> = net.params().keys().map(String::as_str).collect();
    for (flag, names) in [
        ("--freeze", &opts.freeze),
        ("--train-only", &opts.train_only),
    ] {
        for n in names {
            if !net.params().contains_key(n) {
                let near = known.iter().copied().max_by(|a, b| {
                    strsim::jaro_winkler(n, a).total_cmp(&strsim::jaro_winkler(n, b))
                });
                let hint = match near {
                    Some(s) if strsim::jaro_winkler(n, s) > 0.8 => {
                        format!("did you mean `{s}`? the weights are: {}", known.join(", "))
                    }
                    _ => format!("the weights are: {}", known.join(", ")),
                };
                return Err(anyhow::anyhow!(
                    "{flag} {n}: the student has no weight of that name"
                ))
                .hint(hint);
            }
        }
    }
    let mut keep: BTreeSet<String> = net.params().keys().cloned().collect();
    if !opts.train_only.is_empty() {
        keep.retain(|k| opts.train_only.contains(k));
    }
    keep.retain(|k| !opts.freeze.contains(k));
    if keep.is_empty() {
        let why = if net.params().is_empty() {
            "the student has no trainable weights"
        } else {
            "--freeze/--train-only leave no weight to train"
        };
        return Err(anyhow::anyhow!("{why}"))
            .hint("training changes float initializers of Conv, Gemm, MatMul and normalisation layers; weights stored as Constant nodes or integer tensors cannot train");
    }
    Ok(keep)
}

fn describe_trainable(net: &dyn Network, keep: &BTreeSet<String>, path: &Path) {
    let params = net.params();
    let count: usize = keep.iter().map(|k| params[k].numel()).sum();
    let list = |it: &mut dyn Iterator<Item = &String>| {
        it.map(|k| format!("{k} {:?}", params[k].shape))
            .collect::<Vec<_>>()
            .join(", ")
    };
    printer::info(format!(
        "training {} of {} weights of {} ({count} values): {}",
        keep.len(),
        params.len(),
        path.display(),
        list(&mut keep.iter())
    ));
    let fixed: Vec<&String> = params.keys().filter(|k| !keep.contains(*k)).collect();
    if !fixed.is_empty() {
        printer::info(format!("kept fixed: {}", list(&mut fixed.into_iter())));
    }
}

/// Identifies what shapes a run's trajectory: a checkpoint resumes only under the same one.
fn fingerprint(
    cfg: &FitConfig,
    student: &[u8],
    teacher: &[u8],
    opts: &Options,
    data: &Samples,
    trainable: &BTreeSet<String>,
) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(cfg).unwrap_or_default());
    h.update(format!("{:?}", opts.teacher_backend));
    for part in [student, teacher] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(format!("{:?}", data.x.shape));
    for v in &data.x.data {
        h.update(v.to_le_bytes());
    }
    for y in &data.y {
        h.update(y.to_le_bytes());
    }
    for t in trainable {
        h.update(t.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::net::LossFn;
    use crate::distill::optim::Named;

    struct Weights(Named);

    impl Network for Weights {
        fn params(&self) -> &Named {
            &self.0
        }
        fn params_mut(&mut self) -> &mut Named {
            &mut self.0
        }
        fn state(&self) -> Named {
            Named::new()
        }
        fn set_state(&mut self, _: &Named) -> Result<()> {
            Ok(())
        }
        fn infer(&mut self, _: &Tensor, _: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
            bail!("not run")
        }
        fn train_step(
            &mut self,
            _: &Tensor,
            _: &[String],
            _: &mut rand_chacha::ChaCha8Rng,
            _: &mut LossFn<'_>,
        ) -> Result<Named> {
            bail!("not run")
        }
    }

    fn opts(freeze: &[&str], train_only: &[&str]) -> Options {
        let mut o = Options::new(None, "s.onnx".into(), "d.npz".into(), "o.onnx".into());
        o.freeze = freeze.iter().map(|s| s.to_string()).collect();
        o.train_only = train_only.iter().map(|s| s.to_string()).collect();
        o
    }

    #[test]
    fn a_student_without_trainable_weights_is_refused() {
        let e = select(&Weights(Named::new()), &opts(&[], &[])).unwrap_err();
        let text = crate::hint::render(&e);
        assert!(
            text.starts_with("error: the student has no trainable weights"),
            "{text}"
        );
        assert!(text.contains("hint: "), "{text}");
    }

    #[test]
    fn freeze_and_train_only_narrow_the_selection() {
        let names = ["a.weight", "a.bias", "b.weight"];
        let net = Weights(
            names
                .iter()
                .map(|n| (n.to_string(), Tensor::zeros(&[2])))
                .collect(),
        );
        let got = |f: &[&str], t: &[&str]| {
            select(&net, &opts(f, t)).map(|s| s.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(got(&[], &[]).unwrap(), ["a.bias", "a.weight", "b.weight"]);
        assert_eq!(got(&["a.bias"], &[]).unwrap(), ["a.weight", "b.weight"]);
        assert_eq!(
            got(&["a.bias"], &["a.bias", "b.weight"]).unwrap(),
            ["b.weight"]
        );
        let e = crate::hint::render(&got(&["b.weight"], &["b.weight"]).unwrap_err());
        assert!(e.contains("leave no weight to train"), "{e}");
        let e = crate::hint::render(&got(&["a.weigth"], &[]).unwrap_err());
        assert!(
            e.contains("--freeze a.weigth") && e.contains("did you mean `a.weight`?"),
            "{e}"
        );
    }
}
