//! Plans: which stages of a recipe run, in which order, reading and writing what.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{did_you_mean, names, ContextHint, Recipe, StageKind, StageOptions};

/// Which stages to run: all (the default), `--only STAGE` or `--from STAGE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Run this stage alone; what it reads from earlier stages must already exist.
    pub only: Option<String>,
    /// Run this stage and every stage after it.
    pub from: Option<String>,
}

/// A file a stage reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageInput {
    pub path: PathBuf,
    /// The stage that writes it, for outputs of earlier stages.
    pub made_by: Option<StageKind>,
    /// May be absent (a baseline that `update_baseline` will create).
    pub optional: bool,
}

/// One stage, ready to hand to a [`super::StageExecutor`].
#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub kind: StageKind,
    /// Resolved options: every path is absolute, every reference replaced.
    pub options: StageOptions,
    pub inputs: Vec<StageInput>,
    /// Files the stage must write, all inside the output folder.
    pub outputs: Vec<PathBuf>,
    /// Stages whose outputs this one reads.
    pub needs: Vec<StageKind>,
    /// SHA-256 of the options as canonical JSON: part of what decides a re-run.
    pub options_sha256: String,
}

/// The stages to run, in order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub stages: Vec<PlannedStage>,
}

impl Recipe {
    /// The stages `selection` picks, in dependency order (ties in canonical order: distill,
    /// train, quantize, bench, gate).
    pub fn plan(&self, selection: &Selection) -> Result<Plan> {
        let pick = |flag: &str, name: &str| -> Result<usize> {
            self.stages
                .iter()
                .position(|s| s.kind.name() == name)
                .ok_or_else(|| {
                    let present = self.stages.iter().map(|s| s.kind.name());
                    let msg = if StageKind::from_name(name).is_some() {
                        format!(
                            "{flag} {name}: stage `{name}` is not in {}",
                            self.file.display()
                        )
                    } else {
                        format!(
                            "{flag} {name}: unknown stage{}",
                            did_you_mean(name, present.clone())
                        )
                    };
                    anyhow::anyhow!(msg)
                        .context_hint(format!("stages in this recipe: {}", self.stage_names()))
                })
        };
        let range = match (&selection.only, &selection.from) {
            (Some(_), Some(_)) => anyhow::bail!("--only and --from cannot be used together"),
            (Some(only), None) => {
                let i = pick("--only", only)?;
                i..i + 1
            }
            (None, Some(from)) => pick("--from", from)?..self.stages.len(),
            (None, None) => 0..self.stages.len(),
        };
        let stages = self.stages[range]
            .iter()
            .map(|s| {
                Ok(PlannedStage {
                    kind: s.kind,
                    options: s.options.clone(),
                    inputs: s.inputs.clone(),
                    outputs: s.outputs.clone(),
                    needs: s.needs.clone(),
                    options_sha256: options_sha256(&s.options)
                        .with_context(|| format!("cannot hash the options of stage {}", s.kind))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Plan { stages })
    }
}

fn options_sha256(options: &StageOptions) -> Result<String> {
    let json = canonical(serde_json::to_value(options)?);
    let text = serde_json::to_string(&serde_json::json!({
        "kind": options.kind().name(),
        "options": json,
    }))?;
    Ok(hex(&Sha256::digest(text.as_bytes())))
}

/// Object keys sorted at every level, so equal options always hash the same whatever
/// serde_json's map type.
fn canonical(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(canonical).collect())
        }
        other => other,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A path relative to the current folder when it lies below it, for shorter listings.
fn shown(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) => path
            .strip_prefix(&cwd)
            .unwrap_or(path)
            .display()
            .to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// `key: value` lines for every leaf of a JSON value, nested keys joined with dots.
fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        serde_json::Value::Array(items) if items.iter().any(|i| i.is_object()) => {
            for (i, item) in items.iter().enumerate() {
                leaves(&format!("{prefix}[{i}]"), item, out);
            }
        }
        serde_json::Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(scalar).collect();
            out.push((prefix.to_string(), format!("[{}]", parts.join(", "))));
        }
        // Unset optional values are left out of the listing.
        serde_json::Value::Null => {}
        other => out.push((prefix.to_string(), scalar(other))),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) if Path::new(s).is_absolute() => shown(Path::new(s)),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Plan {
    /// The plan as text, for `--dry-run`: each stage with its resolved options, what it
    /// reads and what it writes.
    pub fn render(&self, recipe: &Recipe) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "recipe {} ({})", recipe.name, recipe.file.display());
        let _ = writeln!(s, "output {}", shown(&recipe.output));
        if self.stages.is_empty() {
            let _ = writeln!(s, "\nno stages selected");
        }
        for (i, st) in self.stages.iter().enumerate() {
            let after = if st.needs.is_empty() {
                String::new()
            } else {
                format!("  (after {})", names(st.needs.iter().map(|k| k.name())))
            };
            let _ = writeln!(s, "\n{}. {}{after}", i + 1, st.kind);
            for input in &st.inputs {
                let from = match input.made_by {
                    Some(k) => format!("  (from {k})"),
                    None if input.optional => "  (if present)".into(),
                    None => String::new(),
                };
                let _ = writeln!(s, "   reads   {}{from}", shown(&input.path));
            }
            for out in &st.outputs {
                let _ = writeln!(s, "   writes  {}", shown(out));
            }
            let mut lines = Vec::new();
            if let Ok(v) = serde_json::to_value(&st.options) {
                leaves("", &v, &mut lines);
            }
            let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in lines {
                let _ = writeln!(s, "   {k:width$}  {v}");
            }
        }
        s
    }
}
