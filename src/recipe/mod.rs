//! Recipes: a YAML file describing a whole pipeline (distill, train, quantize, bench, gate),
//! parsed and validated in full before anything runs, planned in dependency order and run
//! through a [`StageExecutor`] that the commands layer provides.
//!
//! ```yaml
//! name: quickstart
//! output: ../out/quickstart        # every file the recipe writes goes inside it
//! inputs:
//!   teacher: ../fixtures/teacher.onnx
//! datasets:
//!   val: { path: ../fixtures/digits_val.npz, limit: 500 }   # + fields of data::Preprocess
//! stages:
//!   quantize:
//!     model: ${inputs.teacher}
//!     calibration: { data: ${datasets.val}, method: auto }
//!   bench:
//!     models: [${inputs.teacher}, int8=${quantize.out}]
//!     data: ${datasets.val}
//! ```
//!
//! Input paths are relative to the recipe's folder; output paths (`out`, `report`,
//! `markdown`, `html`) are relative to the output folder and cannot leave it. References are
//! `${inputs.NAME}`, `${datasets.NAME}`, `${STAGE.out}` (distill, train, quantize) and
//! `${bench.report}`; they also order the stages.

mod exec;
mod overrides;
mod plan;
pub mod schema;
mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};
use serde_norway::Value;

use crate::data::Preprocess;
use crate::hint::HintExt;

pub use exec::{run, RunOptions, RunSummary, StageExecutor, StageReport, StageResult, StageStatus};
pub use plan::{Plan, PlannedStage, Selection, StageInput};
pub use schema::*;
pub use source::{FieldPath, Location, Origin, RecipeError, Seg, Target};

use source::Source;

/// A loaded, fully validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    /// The recipe file as given.
    pub file: PathBuf,
    /// The recipe's folder (absolute); input paths are relative to it.
    pub dir: PathBuf,
    /// The output folder (absolute); every file the recipe writes lies inside it.
    pub output: PathBuf,
    pub inputs: BTreeMap<String, PathBuf>,
    pub datasets: BTreeMap<String, Dataset>,
    /// The stages in the order they run.
    pub stages: Vec<Stage>,
    source: Source,
}

/// One stage of a recipe, with its references resolved.
#[derive(Debug, Clone)]
pub struct Stage {
    pub kind: StageKind,
    pub options: StageOptions,
    /// Stages whose outputs this one reads.
    pub needs: Vec<StageKind>,
    /// Files read, including outputs of earlier stages.
    pub inputs: Vec<StageInput>,
    /// Files written, all inside the output folder.
    pub outputs: Vec<PathBuf>,
}

const TOP_LEVEL_KEYS: [&str; 5] = ["name", "output", "inputs", "datasets", "stages"];

impl Recipe {
    /// Reads, parses and validates a recipe; `overrides` are `--set STAGE.PATH=VALUE` flags.
    pub fn load(file: &Path, overrides: &[String]) -> Result<Recipe> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read recipe {}", file.display()))
            .hint("check the path; recipes are YAML files such as recipes/quickstart.yaml")?;
        Recipe::parse(file, &text, overrides)
    }

    /// Like [`Recipe::load`], with the text already read; `file` still anchors relative paths.
    pub fn parse(file: &Path, text: &str, overrides: &[String]) -> Result<Recipe> {
        let mut src = Source::new(file, text);
        let mut value: Value = match serde_norway::from_str(&src.text) {
            Ok(v) => v,
            Err(e) => {
                let location = match e.location() {
                    Some(l) => src.at_file(l.line(), l.column()),
                    None => src.whole(),
                };
                let err = RecipeError {
                    location,
                    field: String::new(),
                    message: format!(
                        "invalid YAML: {}",
                        src.fix_message_positions(&e.to_string())
                    ),
                };
                return Err(err).hint(
                    "check the indentation and quoting there; values containing `: ` or ` #`, \
                     or starting with `{`, `[`, `*`, `&`, `!`, need quotes",
                );
            }
        };
        match &value {
            Value::Mapping(_) => {}
            Value::Null => {
                let err = RecipeError {
                    location: src.whole(),
                    field: String::new(),
                    message: "the recipe is empty".into(),
                };
                return Err(err).hint(
                    "a recipe needs at least `output:` and `stages:`; see recipes/quickstart.yaml",
                );
            }
            _ => {
                return Err(src.error(
                    &FieldPath::root(),
                    Target::Value,
                    "a recipe must be a mapping with `output:` and `stages:`",
                ))
                .hint("see recipes/quickstart.yaml");
            }
        }
        // `gate:` with nothing under it reads as null; make it an empty mapping so the
        // missing required keys are reported rather than the stage silently dropped.
        if let Some(Value::Mapping(stages)) = value.get_mut("stages") {
            for (_, v) in stages.iter_mut() {
                if v.is_null() {
                    *v = Value::Mapping(Default::default());
                }
            }
        }
        overrides::apply(&mut value, &mut src, overrides)?;

        let raw: schema::RecipeFile = serde_path_to_error::deserialize(value)
            .map_err(|e| serde_error(&src, &FieldPath::root(), e, &[]))?;
        Resolver::new(file, src)?.resolve(raw)
    }

    pub fn stage(&self, kind: StageKind) -> Option<&Stage> {
        self.stages.iter().find(|s| s.kind == kind)
    }

    /// Where a field such as `stages.gate.budgets.min_top1` sits in the recipe (or which
    /// `--set` flag put it there), for errors found after loading.
    pub fn locate(&self, field: &str) -> Location {
        match FieldPath::parse(field) {
            Some(p) => self.source.locate(&p, Target::Value),
            None => self.source.whole(),
        }
    }

    /// An error about a field, located like every other recipe error.
    pub fn error_at(&self, field: &str, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(RecipeError {
            location: self.locate(field),
            field: field.to_string(),
            message: message.into(),
        })
    }

    fn stage_names(&self) -> String {
        names(self.stages.iter().map(|s| s.kind.name()))
    }
}

/// `a, b, c`.
fn names<'a>(it: impl IntoIterator<Item = &'a str>) -> String {
    it.into_iter().collect::<Vec<_>>().join(", ")
}

/// The candidate closest to `word`, if it is close enough to be what was meant.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    match closest(word, candidates) {
        Some(c) => format!(", did you mean `{c}`?"),
        None => String::new(),
    }
}

/// Turns a typed-deserialization error into a located [`RecipeError`] with a hint.
/// `extra_keys` are keys the caller accepted before deserializing the rest (for suggestions).
fn serde_error(
    src: &Source,
    base: &FieldPath,
    err: serde_path_to_error::Error<serde_norway::Error>,
    extra_keys: &[&str],
) -> anyhow::Error {
    let mut path = base.clone();
    for seg in err.path().iter() {
        match seg {
            serde_path_to_error::Segment::Map { key } => path.0.push(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => path.0.push(Seg::Index(*index)),
            _ => {}
        }
    }
    let msg = err.inner().to_string();
    let quoted = |s: &str| -> Vec<String> {
        s.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };

    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (field, expected) = match rest.rfind("`, expected ") {
            Some(i) => (&rest[..i], quoted(&rest[i + "`, expected ".len()..])),
            None => (rest.trim_end_matches("`, there are no fields"), Vec::new()),
        };
        let mut valid: Vec<&str> = expected.iter().map(String::as_str).collect();
        valid.extend(extra_keys);
        let parent = FieldPath(path.0[..path.0.len().saturating_sub(1)].to_vec());
        if parent == FieldPath::root().key("stages") {
            let kinds = StageKind::ALL.map(StageKind::name);
            let e = src.error(
                &path,
                Target::Key,
                format!("unknown stage kind `{field}`{}", did_you_mean(field, kinds)),
            );
            return anyhow::Error::new(e).context_hint(format!("stage kinds: {}", names(kinds)));
        }
        let e = src.error(
            &path,
            Target::Key,
            format!(
                "unknown key `{field}`{}",
                did_you_mean(field, valid.iter().copied())
            ),
        );
        return anyhow::Error::new(e).context_hint(format!("valid keys here: {}", names(valid)));
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        let (value, expected) = match rest.rfind("`, expected ") {
            Some(i) => (&rest[..i], quoted(&rest[i + "`, expected ".len()..])),
            None => (rest, Vec::new()),
        };
        let valid: Vec<&str> = expected.iter().map(String::as_str).collect();
        let e = src.error(
            &path,
            Target::Value,
            format!(
                "unknown value `{value}`{}",
                did_you_mean(value, valid.iter().copied())
            ),
        );
        return anyhow::Error::new(e).context_hint(format!("expected one of: {}", names(valid)));
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        let e = src.error(
            &path,
            Target::Key,
            format!("missing required key `{field}`"),
        );
        return anyhow::Error::new(e);
    }
    for (prefix, what) in [
        ("invalid type: ", "wrong type"),
        ("invalid value: ", "wrong value"),
    ] {
        let Some(rest) = msg.strip_prefix(prefix) else {
            continue;
        };
        if let Some(i) = rest.rfind(", expected ") {
            let found = describe_found(&rest[..i]);
            let expected = describe_expected(&rest[i + ", expected ".len()..]);
            let e = src.error(
                &path,
                Target::Value,
                format!("{what}: expected {expected}, found {found}"),
            );
            return anyhow::Error::new(e);
        }
    }
    anyhow::Error::new(src.error(&path, Target::Value, msg))
}

fn describe_found(found: &str) -> String {
    match found {
        "map" => "a mapping".into(),
        "sequence" => "a list".into(),
        "unit value" => "an empty value".into(),
        other => other.into(),
    }
}

fn describe_expected(expected: &str) -> String {
    match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number (0 or more)".into(),
        "i64" | "i32" | "i16" | "i8" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "`true` or `false`".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        s if s.starts_with("struct ") => "a mapping".into(),
        other => other.into(),
    }
}

/// Adds a hint to an error that is already an `anyhow::Error`.
trait ContextHint {
    fn context_hint(self, hint: impl Into<String>) -> anyhow::Error;
}

impl ContextHint for anyhow::Error {
    fn context_hint(self, hint: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(crate::hint::Hinted {
            error: self,
            hint: hint.into(),
        })
    }
}

/// `a/./b/../c` → `a/c`, without touching the file system (the path may not exist yet).
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    out.pop();
                } else if !matches!(out.components().next_back(), Some(Component::RootDir)) {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// If a symbolic link at or below `root` on the way to `path` leads outside `root`,
/// that link. `root` and `path` are absolute and normalized, `path` inside `root`.
pub(crate) fn symlink_escape(root: &Path, path: &Path) -> Option<PathBuf> {
    let canon_root = root.canonicalize().ok()?;
    let rel = path.strip_prefix(root).ok()?;
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match std::fs::symlink_metadata(&cur) {
            Err(_) => return None,
            Ok(m) if m.file_type().is_symlink() => match cur.canonicalize() {
                Ok(c) if c.starts_with(&canon_root) => {}
                _ => return Some(cur),
            },
            Ok(_) => {}
        }
    }
    None
}

/// A `${ROOT.FIELD}` reference, or why the value is not one.
enum Reference<'a> {
    None,
    Ref(&'a str, &'a str),
    Malformed,
}

fn parse_reference(s: &str) -> Reference<'_> {
    if !s.contains("${") {
        return Reference::None;
    }
    let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) else {
        return Reference::Malformed;
    };
    match inner.split_once('.') {
        Some((root, field))
            if !root.is_empty() && !field.is_empty() && !field.contains(['$', '{', '}']) =>
        {
            Reference::Ref(root.trim(), field.trim())
        }
        _ => Reference::Malformed,
    }
}

struct Resolver {
    src: Source,
    dir: PathBuf,
    output: PathBuf,
    inputs: BTreeMap<String, PathBuf>,
    datasets: BTreeMap<String, Dataset>,
    present: Vec<StageKind>,
    /// Each stage's primary output (what `${STAGE.out}` / `${bench.report}` names).
    primary: BTreeMap<StageKind, PathBuf>,
}

impl Resolver {
    fn new(file: &Path, src: Source) -> Result<Resolver> {
        let parent = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = std::path::absolute(&parent)
            .with_context(|| format!("cannot resolve the folder of {}", file.display()))?;
        Ok(Resolver {
            src,
            dir: normalize(&dir),
            output: PathBuf::new(),
            inputs: BTreeMap::new(),
            datasets: BTreeMap::new(),
            present: Vec::new(),
            primary: BTreeMap::new(),
        })
    }

    fn err(&self, path: &FieldPath, target: Target, msg: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(self.src.error(path, target, msg))
    }

    fn input_path(&self, written: &str) -> PathBuf {
        normalize(&self.dir.join(written))
    }

    fn missing_file(&self, path: &FieldPath, written: &str, resolved: &Path) -> anyhow::Error {
        self.err(
            path,
            Target::Value,
            format!(
                "file not found: `{written}` (resolved to {})",
                resolved.display()
            ),
        )
        .context_hint(format!(
            "input paths are relative to the recipe's folder, {}",
            self.dir.display()
        ))
    }

    fn resolve(mut self, raw: schema::RecipeFile) -> Result<Recipe> {
        let root = FieldPath::root();
        let name = match raw.name {
            Some(n) => n,
            None => self
                .src
                .file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "recipe".into()),
        };

        // Output folder.
        let out_field = root.key("output");
        if raw.output.trim().is_empty() || raw.output.contains("${") {
            return Err(self.err(&out_field, Target::Value, "`output` must be a folder path"));
        }
        self.output = self.input_path(&raw.output);
        if self.output.is_file() {
            return Err(self.err(
                &out_field,
                Target::Value,
                format!(
                    "{} is a file; `output` must be a folder",
                    self.output.display()
                ),
            ));
        }

        // Inputs.
        for (key, written) in &raw.inputs {
            let field = root.key("inputs").key(key.as_str());
            if written.contains("${") {
                return Err(self
                    .err(
                        &field,
                        Target::Value,
                        "inputs are file paths; references are not allowed here",
                    )
                    .context_hint("refer to inputs from stages instead, as `${inputs.NAME}`"));
            }
            let path = self.input_path(written);
            if !path.exists() {
                return Err(self.missing_file(&field, written, &path));
            }
            self.inputs.insert(key.clone(), path);
        }

        // Datasets: `path` here, everything else is data::Preprocess.
        for (key, value) in raw.datasets {
            let field = root.key("datasets").key(key.as_str());
            let (written, preprocess) = match value {
                Value::String(s) => (s, Preprocess::default()),
                Value::Mapping(mut m) => {
                    let written = match m.remove("path") {
                        Some(Value::String(s)) => s,
                        Some(_) => {
                            return Err(self.err(
                                &field.key("path"),
                                Target::Value,
                                "wrong type: expected a path",
                            ))
                        }
                        None => {
                            return Err(self.err(&field, Target::Key, "missing required key `path`"))
                        }
                    };
                    let pre: Preprocess = serde_path_to_error::deserialize(Value::Mapping(m))
                        .map_err(|e| serde_error(&self.src, &field, e, &["path"]))?;
                    (written, pre)
                }
                _ => {
                    return Err(self.err(
                        &field,
                        Target::Value,
                        "wrong type: expected a path or a mapping like `{ path: data.npz, limit: 500 }`",
                    ))
                }
            };
            let path = self.input_path(&written);
            if !path.exists() {
                return Err(self.missing_file(&field.key("path"), &written, &path));
            }
            self.datasets.insert(
                key.clone(),
                Dataset {
                    name: Some(key),
                    path,
                    preprocess,
                },
            );
        }

        // Stages, in canonical order.
        let s = raw.stages;
        let mut stages: Vec<StageOptions> = Vec::new();
        stages.extend(s.distill.map(StageOptions::Distill));
        stages.extend(s.train.map(StageOptions::Train));
        stages.extend(s.quantize.map(StageOptions::Quantize));
        stages.extend(s.bench.map(StageOptions::Bench));
        stages.extend(s.gate.map(StageOptions::Gate));
        if stages.is_empty() {
            return Err(self
                .err(&root.key("stages"), Target::Key, "the recipe has no stages")
                .context_hint(format!(
                    "add at least one of: {}",
                    names(StageKind::ALL.map(StageKind::name))
                )));
        }
        self.present = stages.iter().map(StageOptions::kind).collect();

        for opts in &stages {
            self.validate(opts)?;
        }

        // Outputs first, so references to them can be resolved in any order.
        let mut written_by: BTreeMap<PathBuf, FieldPath> = BTreeMap::new();
        let mut outputs: BTreeMap<StageKind, Vec<PathBuf>> = BTreeMap::new();
        for opts in &mut stages {
            let kind = opts.kind();
            let stage_field = root.key("stages").key(kind.name());
            let primary_field = kind.output().map(|(f, _)| f);
            for (rel, slot) in opts.slots() {
                let Slot::Out(out) = slot else { continue };
                let field = FieldPath([stage_field.0.clone(), rel.clone()].concat());
                let is_primary = rel == [Seg::Key(primary_field.unwrap_or_default().into())];
                let default = kind.output().map(|(_, file)| file).filter(|_| is_primary);
                out.path = self.resolve_out(&field, out.written.as_deref(), default)?;
                if let Some(other) = written_by.get(&out.path) {
                    return Err(self
                        .err(
                            &field,
                            Target::Value,
                            format!("{} is also written by {other}", out.path.display()),
                        )
                        .context_hint("give each output its own file name"));
                }
                written_by.insert(out.path.clone(), field);
                if is_primary {
                    self.primary.insert(kind, out.path.clone());
                }
                outputs.entry(kind).or_default().push(out.path.clone());
            }
        }

        // Everything read: references and input paths.
        let mut edges: Vec<(StageKind, StageKind, FieldPath)> = Vec::new();
        let mut resolved = Vec::new();
        for mut opts in stages {
            let kind = opts.kind();
            let stage_field = root.key("stages").key(kind.name());
            let update_baseline = matches!(&opts, StageOptions::Gate(g) if g.update_baseline);
            let mut inputs: Vec<StageInput> = Vec::new();
            for (rel, slot) in opts.slots() {
                let field = FieldPath([stage_field.0.clone(), rel].concat());
                match slot {
                    Slot::Out(_) => {}
                    Slot::File(f) => {
                        self.resolve_file(&field, f, false, false)?;
                        if let Some(dep) = f.made_by {
                            edges.push((kind, dep, field.clone()));
                        }
                        inputs.push(StageInput {
                            path: f.path.clone(),
                            made_by: f.made_by,
                            optional: false,
                        });
                    }
                    Slot::Baseline(f) => {
                        self.resolve_file(&field, f, true, update_baseline)?;
                        inputs.push(StageInput {
                            path: f.path.clone(),
                            made_by: None,
                            optional: update_baseline,
                        });
                    }
                    Slot::Data(d) => {
                        self.resolve_data(&field, d)?;
                        inputs.push(StageInput {
                            path: d.dataset.path.clone(),
                            made_by: None,
                            optional: false,
                        });
                    }
                }
            }
            for input in &inputs {
                if let Some(field) = written_by
                    .get(&input.path)
                    .filter(|_| input.made_by.is_none())
                {
                    return Err(self
                        .err(
                            field,
                            Target::Value,
                            format!(
                                "would overwrite {}, which stage {kind} reads",
                                input.path.display()
                            ),
                        )
                        .context_hint("write outputs to new files inside the output folder"));
                }
            }
            if let StageOptions::Gate(g) = &mut opts {
                if let Some(b) = &mut g.budgets {
                    b.location = Some(self.src.locate(&stage_field.key("budgets"), Target::Value));
                }
            }
            let mut needs: Vec<StageKind> = edges
                .iter()
                .filter(|(from, _, _)| *from == kind)
                .map(|(_, to, _)| *to)
                .collect();
            needs.sort();
            needs.dedup();
            dedup_inputs(&mut inputs);
            resolved.push(Stage {
                kind,
                options: opts,
                needs,
                inputs,
                outputs: outputs.remove(&kind).unwrap_or_default(),
            });
        }

        let order = self.order(&resolved, &edges)?;
        let mut by_kind: BTreeMap<StageKind, Stage> =
            resolved.into_iter().map(|s| (s.kind, s)).collect();
        let stages = order.iter().filter_map(|k| by_kind.remove(k)).collect();

        Ok(Recipe {
            name,
            file: self.src.file.clone(),
            dir: self.dir,
            output: self.output,
            inputs: self.inputs,
            datasets: self.datasets,
            stages,
            source: self.src,
        })
    }

    fn resolve_out(
        &self,
        field: &FieldPath,
        written: Option<&str>,
        default: Option<&str>,
    ) -> Result<PathBuf> {
        let hint = "output paths are relative to the output folder, e.g. `student.onnx` or `models/student.onnx`";
        let path = match (written, default) {
            (None, Some(file)) => self.output.join(file),
            (None, None) => {
                return Err(self.err(field, Target::Value, "an output path is required here"))
            }
            (Some(w), _) => {
                if w.trim().is_empty() {
                    return Err(self
                        .err(field, Target::Value, "empty output path")
                        .context_hint(hint));
                }
                if w.contains("${") {
                    return Err(self
                        .err(
                            field,
                            Target::Value,
                            "outputs are paths; references are not allowed here",
                        )
                        .context_hint(hint));
                }
                normalize(&self.output.join(w))
            }
        };
        let shown = written.unwrap_or_default();
        if !path.starts_with(&self.output) || path == self.output {
            return Err(self
                .err(
                    field,
                    Target::Value,
                    format!(
                        "`{shown}` resolves to {}, outside the output folder {}",
                        path.display(),
                        self.output.display()
                    ),
                )
                .context_hint(hint));
        }
        if path.starts_with(self.output.join(".shrink")) {
            return Err(self
                .err(
                    field,
                    Target::Value,
                    "`.shrink` inside the output folder is reserved for run state",
                )
                .context_hint(hint));
        }
        if let Some(link) = symlink_escape(&self.output, &path) {
            return Err(self
                .err(
                    field,
                    Target::Value,
                    format!(
                        "`{shown}` would be written through the symbolic link {}, which leads outside the output folder {}",
                        link.display(),
                        self.output.display()
                    ),
                )
                .context_hint("remove the link or choose another output path"));
        }
        Ok(path)
    }

    /// Lists every reference valid in this recipe, for error hints.
    fn valid_references(&self, data: bool) -> String {
        let mut v: Vec<String> = self
            .inputs
            .keys()
            .map(|k| format!("${{inputs.{k}}}"))
            .collect();
        v.extend(self.datasets.keys().map(|k| format!("${{datasets.{k}}}")));
        if !data {
            for k in &self.present {
                if let Some((f, _)) = k.output() {
                    v.push(format!("${{{}.{f}}}", k.name()));
                }
            }
        }
        if v.is_empty() {
            "none (the recipe has no inputs, datasets or stage outputs)".into()
        } else {
            v.join(", ")
        }
    }

    /// Checks the root and field of a reference to something other than an input or dataset.
    fn stage_reference(
        &self,
        field: &FieldPath,
        written: &str,
        root: &str,
        name: &str,
    ) -> Result<StageKind> {
        let Some(kind) = StageKind::from_name(root) else {
            let mut roots = vec!["inputs", "datasets"];
            roots.extend(self.present.iter().map(|k| k.name()));
            return Err(self
                .err(
                    field,
                    Target::Value,
                    format!("unknown reference `{written}`{}", did_you_mean(root, roots)),
                )
                .context_hint(format!(
                    "valid references: {}",
                    self.valid_references(false)
                )));
        };
        if !self.present.contains(&kind) {
            return Err(self
                .err(
                    field,
                    Target::Value,
                    format!("`{written}` refers to stage `{kind}`, which is not in this recipe"),
                )
                .context_hint(format!(
                    "stages in this recipe: {}; valid references: {}",
                    names(self.present.iter().map(|k| k.name())),
                    self.valid_references(false)
                )));
        }
        match kind.output() {
            Some((f, _)) if f == name => Ok(kind),
            Some((f, _)) => Err(self
                .err(
                    field,
                    Target::Value,
                    format!("unknown reference `{written}`: stage {kind} writes `${{{kind}.{f}}}`"),
                )
                .context_hint(format!("valid references: {}", self.valid_references(false)))),
            None => Err(self
                .err(
                    field,
                    Target::Value,
                    format!("unknown reference `{written}`: stage {kind} writes no file other stages can read"),
                )
                .context_hint(format!("valid references: {}", self.valid_references(false)))),
        }
    }

    fn unknown_name(
        &self,
        field: &FieldPath,
        written: &str,
        what: &str,
        name: &str,
        known: Vec<&str>,
    ) -> anyhow::Error {
        let list = if known.is_empty() {
            format!("the recipe has no {what}")
        } else {
            format!("{what}: {}", names(known.iter().copied()))
        };
        self.err(
            field,
            Target::Value,
            format!(
                "unknown reference `{written}`{}",
                did_you_mean(name, known.iter().copied())
            ),
        )
        .context_hint(list)
    }

    fn malformed(&self, field: &FieldPath, written: &str, data: bool) -> anyhow::Error {
        self.err(
            field,
            Target::Value,
            format!(
                "`{written}` is not a reference: write exactly `${{ROOT.NAME}}` as the whole value"
            ),
        )
        .context_hint(format!("valid references: {}", self.valid_references(data)))
    }

    fn resolve_file(
        &self,
        field: &FieldPath,
        f: &mut FileRef,
        baseline: bool,
        may_be_missing: bool,
    ) -> Result<()> {
        match parse_reference(&f.written) {
            Reference::Malformed => return Err(self.malformed(field, &f.written, false)),
            Reference::None => {
                if f.written.trim().is_empty() {
                    return Err(self.err(field, Target::Value, "empty path"));
                }
                f.path = self.input_path(&f.written);
                if !may_be_missing && !f.path.exists() {
                    return Err(self.missing_file(field, &f.written, &f.path));
                }
            }
            Reference::Ref("inputs", name) => match self.inputs.get(name) {
                Some(p) => f.path = p.clone(),
                None => {
                    let known = self.inputs.keys().map(String::as_str).collect();
                    return Err(self.unknown_name(field, &f.written, "inputs", name, known));
                }
            },
            Reference::Ref("datasets", _) => {
                return Err(self
                    .err(
                        field,
                        Target::Value,
                        format!("`{}` is a dataset, but this field takes a file", f.written),
                    )
                    .context_hint(format!(
                        "valid references: {}",
                        self.valid_references(false)
                    )));
            }
            Reference::Ref(root, name) => {
                let kind = self.stage_reference(field, &f.written, root, name)?;
                if baseline {
                    return Err(self
                        .err(
                            field,
                            Target::Value,
                            "a baseline is a report from an earlier run, not an output of this one",
                        )
                        .context_hint("point `baseline` at a saved report, e.g. `baseline.json`"));
                }
                f.path = self.primary.get(&kind).cloned().unwrap_or_default();
                f.made_by = Some(kind);
            }
        }
        Ok(())
    }

    fn resolve_data(&self, field: &FieldPath, d: &mut DataRef) -> Result<()> {
        match parse_reference(&d.written) {
            Reference::Malformed => return Err(self.malformed(field, &d.written, true)),
            Reference::None => {
                if d.written.trim().is_empty() {
                    return Err(self.err(field, Target::Value, "empty path"));
                }
                d.dataset.path = self.input_path(&d.written);
                if !d.dataset.path.exists() {
                    return Err(self.missing_file(field, &d.written, &d.dataset.path));
                }
            }
            Reference::Ref("datasets", name) => match self.datasets.get(name) {
                Some(ds) => d.dataset = ds.clone(),
                None => {
                    let known = self.datasets.keys().map(String::as_str).collect();
                    return Err(self.unknown_name(field, &d.written, "datasets", name, known));
                }
            },
            Reference::Ref("inputs", name) => match self.inputs.get(name) {
                Some(p) => d.dataset.path = p.clone(),
                None => {
                    let known = self.inputs.keys().map(String::as_str).collect();
                    return Err(self.unknown_name(field, &d.written, "inputs", name, known));
                }
            },
            Reference::Ref(root, name) => {
                self.stage_reference(field, &d.written, root, name)?;
                return Err(self
                    .err(
                        field,
                        Target::Value,
                        format!(
                            "`{}` is a stage output, but this field takes a dataset",
                            d.written
                        ),
                    )
                    .context_hint(format!("valid references: {}", self.valid_references(true))));
            }
        }
        Ok(())
    }

    /// Range checks serde cannot express.
    fn validate(&self, opts: &StageOptions) -> Result<()> {
        let stage = FieldPath::root().key("stages").key(opts.kind().name());
        let mut p = Problems::default();
        // Conditions are written so that NaN fails them.
        match opts {
            StageOptions::Distill(o) => {
                p.check(o.temperature > 0.0, "temperature", "must be greater than 0");
                p.check(
                    (0.0..=1.0).contains(&o.alpha),
                    "alpha",
                    "must be between 0 and 1",
                );
                p.training(o.epochs, o.batch_size, o.lr, o.momentum, o.weight_decay);
                p.regularisation(o.label_smoothing, o.clip_grad_norm, o.threads);
            }
            StageOptions::Train(o) => {
                p.training(o.epochs, o.batch_size, o.lr, o.momentum, o.weight_decay);
                p.regularisation(o.label_smoothing, o.clip_grad_norm, o.threads);
            }
            StageOptions::Quantize(o) => {
                if let Some(c) = &o.calibration {
                    p.check(c.samples >= 1, "calibration.samples", "must be at least 1");
                    p.check(
                        c.percentile > 0.0 && c.percentile <= 100.0,
                        "calibration.percentile",
                        "must be in (0, 100]",
                    );
                } else if o.precision == Precision::Int8 {
                    return Err(self.err(
                        &stage,
                        Target::Key,
                        "missing required key `calibration`: int8 quantization needs `calibration: { data: ... }`",
                    ));
                }
                p.check(
                    !o.fp16_io || o.precision == Precision::Fp16,
                    "fp16_io",
                    "applies to `precision: fp16` only",
                );
                if let Some(d) = o.max_accuracy_drop {
                    p.check(
                        d >= 0.0,
                        "max_accuracy_drop",
                        "must be 0 or more (percentage points)",
                    );
                    p.check(
                        o.eval.is_some(),
                        "max_accuracy_drop",
                        "needs `eval:` data to measure accuracy on",
                    );
                }
            }
            StageOptions::Bench(o) => {
                p.check(!o.models.is_empty(), "models", "needs at least one model");
                p.check(o.batch_size >= 1, "batch_size", "must be at least 1");
                p.check(o.iterations >= 1, "iterations", "must be at least 1");
                p.check(o.threads != Some(0), "threads", "must be at least 1");
            }
            StageOptions::Gate(o) => {
                p.check(
                    !o.update_baseline || o.baseline.is_some(),
                    "update_baseline",
                    "needs `baseline:`, the file to write",
                );
            }
        }
        match p.0.into_iter().next() {
            None => Ok(()),
            Some((field, msg)) => {
                let rel = FieldPath::parse(field).unwrap_or_default();
                Err(self.err(&FieldPath([stage.0, rel.0].concat()), Target::Value, msg))
            }
        }
    }

    /// Orders stages by their references, ties in canonical order; errors on a cycle.
    fn order(
        &self,
        stages: &[Stage],
        edges: &[(StageKind, StageKind, FieldPath)],
    ) -> Result<Vec<StageKind>> {
        let kinds: BTreeSet<StageKind> = stages.iter().map(|s| s.kind).collect();
        for s in stages {
            if let Some(cycle) = find_cycle(s.kind, stages) {
                let (from, to) = (cycle[0], cycle[1]);
                let field = edges
                    .iter()
                    .find(|(f, t, _)| *f == from && *t == to)
                    .map(|(_, _, p)| p.clone())
                    .unwrap_or_default();
                let shown = cycle
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(" → ");
                let uses: Vec<String> = cycle
                    .windows(2)
                    .filter_map(|w| {
                        edges
                            .iter()
                            .find(|(f, t, _)| *f == w[0] && *t == w[1])
                            .map(|(_, t, p)| {
                                format!("{p} reads ${{{t}.{}}}", t.output().map_or("out", |o| o.0))
                            })
                    })
                    .collect();
                return Err(self
                    .err(
                        &field,
                        Target::Value,
                        format!("stages form a cycle: {shown} ({})", uses.join("; ")),
                    )
                    .context_hint("a stage can only read outputs of stages that run before it"));
            }
        }
        let mut done: Vec<StageKind> = Vec::new();
        let mut left = kinds;
        while !left.is_empty() {
            // BTreeSet iterates in canonical order, so the first ready stage wins ties.
            let ready = left.iter().copied().find(|k| {
                stages
                    .iter()
                    .find(|s| s.kind == *k)
                    .is_none_or(|s| s.needs.iter().all(|n| done.contains(n)))
            });
            match ready {
                Some(k) => {
                    left.remove(&k);
                    done.push(k);
                }
                None => anyhow::bail!("internal error: stages could not be ordered"),
            }
        }
        Ok(done)
    }
}

/// Failed range checks, as (field below the stage, message).
#[derive(Default)]
struct Problems(Vec<(&'static str, &'static str)>);

impl Problems {
    fn check(&mut self, ok: bool, field: &'static str, msg: &'static str) {
        if !ok {
            self.0.push((field, msg));
        }
    }

    fn training(
        &mut self,
        epochs: usize,
        batch_size: usize,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) {
        self.check(epochs >= 1, "epochs", "must be at least 1");
        self.check(batch_size >= 1, "batch_size", "must be at least 1");
        self.check(lr > 0.0, "lr", "must be greater than 0");
        self.check(
            (0.0..1.0).contains(&momentum),
            "momentum",
            "must be in [0, 1)",
        );
        self.check(weight_decay >= 0.0, "weight_decay", "must be 0 or more");
    }

    fn regularisation(
        &mut self,
        label_smoothing: f64,
        clip_grad_norm: Option<f64>,
        threads: Option<usize>,
    ) {
        self.check(
            (0.0..1.0).contains(&label_smoothing),
            "label_smoothing",
            "must be in [0, 1)",
        );
        self.check(
            clip_grad_norm.is_none_or(|c| c > 0.0),
            "clip_grad_norm",
            "must be greater than 0",
        );
        self.check(threads != Some(0), "threads", "must be at least 1");
    }
}

/// A cycle through `start` as `[start, .., start]`, if the stages' `needs` contain one.
fn find_cycle(start: StageKind, stages: &[Stage]) -> Option<Vec<StageKind>> {
    fn walk(at: StageKind, start: StageKind, stages: &[Stage], path: &mut Vec<StageKind>) -> bool {
        let needs = stages
            .iter()
            .find(|s| s.kind == at)
            .map(|s| s.needs.as_slice())
            .unwrap_or_default();
        for &n in needs {
            if n == start {
                path.push(n);
                return true;
            }
            if path.contains(&n) {
                continue;
            }
            path.push(n);
            if walk(n, start, stages, path) {
                return true;
            }
            path.pop();
        }
        false
    }
    let mut path = vec![start];
    walk(start, start, stages, &mut path).then_some(path)
}

fn dedup_inputs(inputs: &mut Vec<StageInput>) {
    let mut seen = BTreeSet::new();
    inputs.retain(|i| seen.insert(i.path.clone()));
}

#[cfg(test)]
mod tests;
