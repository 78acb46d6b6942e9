//! The typed options of each stage kind, as a recipe writes them, with their defaults.
//!
//! Paths and references are parsed as written ([`FileRef`], [`DataRef`], [`OutPath`]) and
//! filled in with resolved paths when the recipe is loaded, so a planned stage carries
//! everything its executor needs. Input paths are relative to the recipe's folder; output
//! paths (`out`, `report`, `markdown`, `html`) are relative to the output folder and must
//! stay inside it.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::data::Preprocess;

use super::source::Location;

/// The kinds of stage a recipe can hold, in canonical order (the order ties run in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageKind {
    Distill,
    Train,
    Quantize,
    Bench,
    Gate,
}

impl StageKind {
    pub const ALL: [StageKind; 5] = [
        StageKind::Distill,
        StageKind::Train,
        StageKind::Quantize,
        StageKind::Bench,
        StageKind::Gate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageKind::Distill => "distill",
            StageKind::Train => "train",
            StageKind::Quantize => "quantize",
            StageKind::Bench => "bench",
            StageKind::Gate => "gate",
        }
    }

    pub fn from_name(name: &str) -> Option<StageKind> {
        StageKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The output other stages refer to as `${STAGE.FIELD}`, and its default file name.
    pub fn output(self) -> Option<(&'static str, &'static str)> {
        match self {
            StageKind::Distill => Some(("out", "distill.onnx")),
            StageKind::Train => Some(("out", "train.onnx")),
            StageKind::Quantize => Some(("out", "quantize.onnx")),
            StageKind::Bench => Some(("report", "bench.json")),
            StageKind::Gate => None,
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A file a stage reads: a path relative to the recipe's folder, or a reference
/// (`${inputs.NAME}`, `${STAGE.out}`, `${bench.report}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// The resolved path.
    pub path: PathBuf,
    /// The value as written in the recipe.
    pub written: String,
    /// The stage that writes this file, for references to a stage's output.
    pub made_by: Option<StageKind>,
}

impl FileRef {
    pub(crate) fn unresolved(written: String) -> Self {
        FileRef {
            path: PathBuf::new(),
            written,
            made_by: None,
        }
    }
}

impl Serialize for FileRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.path.display())
    }
}

impl<'de> Deserialize<'de> for FileRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrVisitor("a path or a reference like `${inputs.teacher}`"))
            .map(FileRef::unresolved)
    }
}

/// A dataset: its path and how its samples are preprocessed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dataset {
    /// The name under `datasets:`, when it came from there.
    pub name: Option<String>,
    pub path: PathBuf,
    pub preprocess: Preprocess,
}

/// A dataset a stage reads: `${datasets.NAME}`, or a path (default preprocessing).
#[derive(Debug, Clone, PartialEq)]
pub struct DataRef {
    /// The resolved dataset.
    pub dataset: Dataset,
    /// The value as written in the recipe.
    pub written: String,
}

impl Serialize for DataRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.dataset.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DataRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrVisitor(
            "a dataset reference like `${datasets.train}` or a path",
        ))
        .map(|written| DataRef {
            dataset: Dataset {
                name: None,
                path: PathBuf::new(),
                preprocess: Preprocess::default(),
            },
            written,
        })
    }
}

/// A file a stage writes, inside the output folder. Unset, it is a file in the output
/// folder named after the stage (`distill.onnx`, `bench.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutPath {
    /// The resolved path, inside the output folder.
    pub path: PathBuf,
    /// The value as written in the recipe, if it was set.
    pub written: Option<String>,
}

impl Serialize for OutPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.path.display())
    }
}

impl<'de> Deserialize<'de> for OutPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrVisitor("a path inside the output folder"))
            .map(|w| OutPath {
                path: PathBuf::new(),
                written: Some(w),
            })
    }
}

/// One model of a bench stage: `PATH` or `NAME=PATH` (the name labels it in reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BenchModel {
    pub name: Option<String>,
    pub model: FileRef,
}

impl<'de> Deserialize<'de> for BenchModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = d.deserialize_str(StrVisitor("a model path, a reference, or NAME=PATH"))?;
        let named = s.split_once('=').filter(|(name, _)| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
        });
        Ok(match named {
            Some((name, path)) => BenchModel {
                name: Some(name.to_string()),
                model: FileRef::unresolved(path.to_string()),
            },
            None => BenchModel {
                name: None,
                model: FileRef::unresolved(s),
            },
        })
    }
}

/// Gate budgets, kept as written: the gate module owns their schema and validates them,
/// using `location` to point its errors at the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    pub value: serde_norway::Value,
    /// Where `budgets:` sits in the recipe (filled in when the recipe is loaded).
    pub location: Option<Location>,
}

impl Serialize for Budgets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Budgets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Budgets {
            value: serde_norway::Value::deserialize(d)?,
            location: None,
        })
    }
}

struct StrVisitor(&'static str);

impl Visitor<'_> for StrVisitor {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
}

macro_rules! lowercase_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
    };
}

lowercase_enum!(
    /// Optimizer for training and distillation.
    Optimizer { Sgd => "sgd", Adamw => "adamw" }
);
lowercase_enum!(
    /// Learning-rate schedule over the epochs (after warmup).
    Schedule { Cosine => "cosine", Step => "step", Constant => "constant" }
);
lowercase_enum!(
    /// Training-time augmentation.
    Augment { Crop => "crop", Flip => "flip", Shift => "shift" }
);
lowercase_enum!(
    /// What runs the teacher's forward passes: shrink's own engine or ONNX Runtime.
    TeacherBackend { Engine => "engine", Ort => "ort" }
);
lowercase_enum!(
    /// How activation ranges are chosen from calibration data.
    CalibrationMethod {
        Auto => "auto",
        Minmax => "minmax",
        Percentile => "percentile",
        Entropy => "entropy",
        Mse => "mse",
    }
);
lowercase_enum!(
    /// Integer type of quantized activations.
    ActivationType { U8 => "u8", I8 => "i8" }
);
lowercase_enum!(
    /// How the quantized graph is written: QuantizeLinear/DequantizeLinear pairs or
    /// integer operators.
    QuantFormat { Qdq => "qdq", Qoperator => "qoperator" }
);
lowercase_enum!(
    /// The runtime a quantized model is tuned for.
    QuantTarget { Ort => "ort", Tract => "tract", Tensorrt => "tensorrt" }
);
lowercase_enum!(
    /// Numeric precision of the quantized model.
    Precision { Int8 => "int8", Fp16 => "fp16" }
);
pub use crate::runtime::{BackendKind as Backend, Device, Target as BenchTarget};

/// Serde defaults, one function per documented default.
mod d {
    use super::*;
    pub fn temperature() -> f64 {
        4.0
    }
    pub fn alpha() -> f64 {
        0.9
    }
    pub fn epochs() -> usize {
        5
    }
    pub fn batch_size() -> usize {
        64
    }
    pub fn lr() -> f64 {
        0.05
    }
    pub fn optimizer() -> Optimizer {
        Optimizer::Sgd
    }
    pub fn momentum() -> f64 {
        0.9
    }
    pub fn weight_decay() -> f64 {
        5e-4
    }
    pub fn schedule() -> Schedule {
        Schedule::Cosine
    }
    pub fn teacher_backend() -> TeacherBackend {
        TeacherBackend::Engine
    }
    pub fn method() -> CalibrationMethod {
        CalibrationMethod::Auto
    }
    pub fn samples() -> usize {
        300
    }
    pub fn percentile() -> f64 {
        99.99
    }
    pub fn activation_type() -> ActivationType {
        ActivationType::U8
    }
    pub fn format() -> QuantFormat {
        QuantFormat::Qdq
    }
    pub fn quant_target() -> QuantTarget {
        QuantTarget::Ort
    }
    pub fn precision() -> Precision {
        Precision::Int8
    }
    pub fn yes() -> bool {
        true
    }
    pub fn backend() -> Backend {
        Backend::Tract
    }
    pub fn device() -> Device {
        Device::Cpu
    }
    pub fn bench_target() -> BenchTarget {
        BenchTarget::Host
    }
    pub fn one() -> usize {
        1
    }
    pub fn warmup() -> usize {
        10
    }
    pub fn iterations() -> usize {
        100
    }
}

/// `distill`: trains the student to match the teacher's softened outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillOptions {
    /// The teacher model (required).
    pub teacher: FileRef,
    /// The student model to start from (required).
    pub student: FileRef,
    /// Training data (required).
    pub data: DataRef,
    /// Validation data, evaluated after each epoch.
    #[serde(default)]
    pub val: Option<DataRef>,
    /// The trained student (default `<output>/distill.onnx`).
    #[serde(default)]
    pub out: OutPath,
    /// Softmax temperature of the soft targets (default 4.0).
    #[serde(default = "d::temperature")]
    pub temperature: f64,
    /// Weight of the distillation loss against the label loss, in [0, 1] (default 0.9).
    #[serde(default = "d::alpha")]
    pub alpha: f64,
    /// Passes over the training data (default 5).
    #[serde(default = "d::epochs")]
    pub epochs: usize,
    /// Samples per step (default 64).
    #[serde(default = "d::batch_size")]
    pub batch_size: usize,
    /// Peak learning rate (default 0.05).
    #[serde(default = "d::lr")]
    pub lr: f64,
    /// `sgd` (default) or `adamw`.
    #[serde(default = "d::optimizer")]
    pub optimizer: Optimizer,
    /// SGD momentum (default 0.9).
    #[serde(default = "d::momentum")]
    pub momentum: f64,
    /// Nesterov momentum (default false).
    #[serde(default)]
    pub nesterov: bool,
    /// Decoupled weight decay (default 5e-4).
    #[serde(default = "d::weight_decay")]
    pub weight_decay: f64,
    /// `cosine` (default), `step` or `constant`.
    #[serde(default = "d::schedule")]
    pub schedule: Schedule,
    /// Epochs of linear warmup (default 0).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Label smoothing of the hard-label loss, in [0, 1) (default 0.0).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value (default: no clipping).
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Augmentations applied to training samples (default none).
    #[serde(default)]
    pub augment: Vec<Augment>,
    /// Initializers kept fixed (default none).
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Train only these initializers (default: all that are not frozen).
    #[serde(default)]
    pub train_only: Vec<String>,
    /// What runs the teacher: `engine` (default) or `ort`.
    #[serde(default = "d::teacher_backend")]
    pub teacher_backend: TeacherBackend,
    /// Seed for initialisation, shuffling and augmentation (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Worker threads (default: the command's own default).
    #[serde(default)]
    pub threads: Option<usize>,
}

/// `train`: trains a model on labels alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOptions {
    /// The model to start from (required).
    pub model: FileRef,
    /// Training data (required).
    pub data: DataRef,
    /// Validation data, evaluated after each epoch.
    #[serde(default)]
    pub val: Option<DataRef>,
    /// The trained model (default `<output>/train.onnx`).
    #[serde(default)]
    pub out: OutPath,
    /// Passes over the training data (default 5).
    #[serde(default = "d::epochs")]
    pub epochs: usize,
    /// Samples per step (default 64).
    #[serde(default = "d::batch_size")]
    pub batch_size: usize,
    /// Peak learning rate (default 0.05).
    #[serde(default = "d::lr")]
    pub lr: f64,
    /// `sgd` (default) or `adamw`.
    #[serde(default = "d::optimizer")]
    pub optimizer: Optimizer,
    /// SGD momentum (default 0.9).
    #[serde(default = "d::momentum")]
    pub momentum: f64,
    /// Nesterov momentum (default false).
    #[serde(default)]
    pub nesterov: bool,
    /// Decoupled weight decay (default 5e-4).
    #[serde(default = "d::weight_decay")]
    pub weight_decay: f64,
    /// `cosine` (default), `step` or `constant`.
    #[serde(default = "d::schedule")]
    pub schedule: Schedule,
    /// Epochs of linear warmup (default 0).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Label smoothing, in [0, 1) (default 0.0).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value (default: no clipping).
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Augmentations applied to training samples (default none).
    #[serde(default)]
    pub augment: Vec<Augment>,
    /// Initializers kept fixed (default none).
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Train only these initializers (default: all that are not frozen).
    #[serde(default)]
    pub train_only: Vec<String>,
    /// Seed for initialisation, shuffling and augmentation (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Worker threads (default: the command's own default).
    #[serde(default)]
    pub threads: Option<usize>,
}

/// `quantize`: post-training quantization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeOptions {
    /// The float model (required).
    pub model: FileRef,
    /// The quantized model (default `<output>/quantize.onnx`).
    #[serde(default)]
    pub out: OutPath,
    /// Calibration data and method (required for `precision: int8`).
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// One scale per tensor instead of per output channel (default false).
    #[serde(default)]
    pub per_tensor: bool,
    /// `u8` (default) or `i8`.
    #[serde(default = "d::activation_type")]
    pub activation_type: ActivationType,
    /// `qdq` (default) or `qoperator`.
    #[serde(default = "d::format")]
    pub format: QuantFormat,
    /// Runtime to tune for: `ort` (default), `tract` or `tensorrt`.
    #[serde(default = "d::quant_target")]
    pub target: QuantTarget,
    /// Node names left in float (default none).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Op types left in float (default none).
    #[serde(default)]
    pub exclude_op: Vec<String>,
    /// Data to measure accuracy on before and after quantization.
    #[serde(default)]
    pub eval: Option<DataRef>,
    /// Largest allowed top-1 drop, in percentage points (needs `eval`).
    #[serde(default)]
    pub max_accuracy_drop: Option<f64>,
    /// `int8` (default) or `fp16`.
    #[serde(default = "d::precision")]
    pub precision: Precision,
    /// With `precision: fp16`, float16 inputs and outputs too (default false: they stay
    /// float32).
    #[serde(default)]
    pub fp16_io: bool,
    /// Correct the bias shift quantization introduces (default true).
    #[serde(default = "d::yes")]
    pub bias_correction: bool,
    /// Cross-layer weight equalization before quantizing (default false).
    #[serde(default)]
    pub equalize: bool,
    /// Seed for calibration sampling (default 0).
    #[serde(default)]
    pub seed: u64,
    /// A JSON report of what was quantized (default: none written).
    #[serde(default)]
    pub report: Option<OutPath>,
}

/// How `quantize` calibrates activation ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Calibration data (required).
    pub data: DataRef,
    /// `auto` (default), `minmax`, `percentile`, `entropy` or `mse`.
    #[serde(default = "d::method")]
    pub method: CalibrationMethod,
    /// Samples drawn from `data` (default 300).
    #[serde(default = "d::samples")]
    pub samples: usize,
    /// Percentile kept by `method: percentile`, in (0, 100] (default 99.99).
    #[serde(default = "d::percentile")]
    pub percentile: f64,
}

/// `bench`: accuracy, latency and memory of models, written as a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchOptions {
    /// Models to measure, as paths, references or `NAME=PATH` (required, at least one).
    pub models: Vec<BenchModel>,
    /// `tract` (default) or `ort`.
    #[serde(default = "d::backend")]
    pub backend: Backend,
    /// `cpu` (default), `cuda` or `xnnpack`.
    #[serde(default = "d::device")]
    pub device: Device,
    /// `host` (default) or `mobile`.
    #[serde(default = "d::bench_target")]
    pub target: BenchTarget,
    /// Inference threads (default: the command's own default).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Batch size of timed runs (default 1).
    #[serde(default = "d::one")]
    pub batch_size: usize,
    /// Untimed runs before timing (default 10).
    #[serde(default = "d::warmup")]
    pub warmup: usize,
    /// Timed runs (default 100).
    #[serde(default = "d::iterations")]
    pub iterations: usize,
    /// Labelled data for accuracy (default: latency and memory only).
    #[serde(default)]
    pub data: Option<DataRef>,
    /// Model whose outputs the others are compared with (agreement).
    #[serde(default)]
    pub reference: Option<FileRef>,
    /// The JSON report (default `<output>/bench.json`).
    #[serde(default)]
    pub report: OutPath,
    /// A Markdown table of the report (default: none written).
    #[serde(default)]
    pub markdown: Option<OutPath>,
    /// An HTML page of the report (default: none written).
    #[serde(default)]
    pub html: Option<OutPath>,
}

/// `gate`: checks a bench report against budgets and a baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateOptions {
    /// The bench report to check (required; usually `${bench.report}`).
    pub report: FileRef,
    /// A previous report to compare with, relative to the recipe's folder; it may lie
    /// outside the output folder. Read only, unless `update_baseline` is set.
    #[serde(default)]
    pub baseline: Option<FileRef>,
    /// Budgets, validated by the gate itself.
    #[serde(default)]
    pub budgets: Option<Budgets>,
    /// The model of the report to check, by name (default: the gate's own choice).
    #[serde(default)]
    pub model: Option<String>,
    /// Compare with a baseline measured under different settings (default false).
    #[serde(default)]
    pub allow_mismatch: bool,
    /// Write the report over `baseline` when the gate passes (default false).
    #[serde(default)]
    pub update_baseline: bool,
}

/// A stage's options, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageOptions {
    Distill(DistillOptions),
    Train(TrainOptions),
    Quantize(QuantizeOptions),
    Bench(BenchOptions),
    Gate(GateOptions),
}

impl StageOptions {
    pub fn kind(&self) -> StageKind {
        match self {
            StageOptions::Distill(_) => StageKind::Distill,
            StageOptions::Train(_) => StageKind::Train,
            StageOptions::Quantize(_) => StageKind::Quantize,
            StageOptions::Bench(_) => StageKind::Bench,
            StageOptions::Gate(_) => StageKind::Gate,
        }
    }
}

/// The `stages:` mapping: at most one stage of each kind, named after its kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StagesFile {
    pub distill: Option<DistillOptions>,
    pub train: Option<TrainOptions>,
    pub quantize: Option<QuantizeOptions>,
    pub bench: Option<BenchOptions>,
    pub gate: Option<GateOptions>,
}

/// The top level of a recipe file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecipeFile {
    /// Default: the recipe file's stem.
    #[serde(default)]
    pub name: Option<String>,
    /// The output folder, relative to the recipe's folder (required).
    pub output: String,
    /// Named input files, relative to the recipe's folder.
    #[serde(default)]
    pub inputs: std::collections::BTreeMap<String, String>,
    /// Named datasets: `{ path, ...fields of data::Preprocess }` or just a path. Read
    /// entry by entry so errors point inside each one.
    #[serde(default)]
    pub datasets: std::collections::BTreeMap<String, serde_norway::Value>,
    pub stages: StagesFile,
}

/// Where in a stage's options a path or reference sits, and which.
pub(crate) enum Slot<'a> {
    File(&'a mut FileRef),
    Data(&'a mut DataRef),
    Out(&'a mut OutPath),
    /// `gate.baseline`: read, may be outside the output folder, may not exist yet.
    Baseline(&'a mut FileRef),
}

impl StageOptions {
    /// Every path or reference in these options, with its field path below the stage.
    pub(crate) fn slots(&mut self) -> Vec<(Vec<super::source::Seg>, Slot<'_>)> {
        use super::source::Seg;
        let k = |s: &str| vec![Seg::Key(s.to_string())];
        let mut v = Vec::new();
        match self {
            StageOptions::Distill(o) => {
                v.push((k("teacher"), Slot::File(&mut o.teacher)));
                v.push((k("student"), Slot::File(&mut o.student)));
                v.push((k("data"), Slot::Data(&mut o.data)));
                if let Some(val) = &mut o.val {
                    v.push((k("val"), Slot::Data(val)));
                }
                v.push((k("out"), Slot::Out(&mut o.out)));
            }
            StageOptions::Train(o) => {
                v.push((k("model"), Slot::File(&mut o.model)));
                v.push((k("data"), Slot::Data(&mut o.data)));
                if let Some(val) = &mut o.val {
                    v.push((k("val"), Slot::Data(val)));
                }
                v.push((k("out"), Slot::Out(&mut o.out)));
            }
            StageOptions::Quantize(o) => {
                v.push((k("model"), Slot::File(&mut o.model)));
                if let Some(c) = &mut o.calibration {
                    let path = vec![Seg::Key("calibration".into()), Seg::Key("data".into())];
                    v.push((path, Slot::Data(&mut c.data)));
                }
                if let Some(e) = &mut o.eval {
                    v.push((k("eval"), Slot::Data(e)));
                }
                v.push((k("out"), Slot::Out(&mut o.out)));
                if let Some(r) = &mut o.report {
                    v.push((k("report"), Slot::Out(r)));
                }
            }
            StageOptions::Bench(o) => {
                for (i, m) in o.models.iter_mut().enumerate() {
                    let path = vec![Seg::Key("models".into()), Seg::Index(i)];
                    v.push((path, Slot::File(&mut m.model)));
                }
                if let Some(dt) = &mut o.data {
                    v.push((k("data"), Slot::Data(dt)));
                }
                if let Some(r) = &mut o.reference {
                    v.push((k("reference"), Slot::File(r)));
                }
                v.push((k("report"), Slot::Out(&mut o.report)));
                if let Some(m) = &mut o.markdown {
                    v.push((k("markdown"), Slot::Out(m)));
                }
                if let Some(h) = &mut o.html {
                    v.push((k("html"), Slot::Out(h)));
                }
            }
            StageOptions::Gate(o) => {
                v.push((k("report"), Slot::File(&mut o.report)));
                if let Some(b) = &mut o.baseline {
                    v.push((k("baseline"), Slot::Baseline(b)));
                }
            }
        }
        v
    }
}
