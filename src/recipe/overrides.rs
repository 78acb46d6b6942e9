//! `--set STAGE.PATH=VALUE`: edits applied to the parsed recipe before it is validated, so
//! an override is checked exactly like the file and its errors name the flag.

use anyhow::Result;
use serde_norway::{Mapping, Value};

use super::source::{
    quote_flow_references, FieldPath, Location, Origin, Override, RecipeError, Seg, Source,
};
use super::{did_you_mean, names, ContextHint, StageKind, TOP_LEVEL_KEYS};

/// Applies each flag in order (later ones win) and records them in `src` for error locations.
pub(crate) fn apply(value: &mut Value, src: &mut Source, flags: &[String]) -> Result<()> {
    for flag in flags {
        let fail = |msg: String| {
            anyhow::Error::new(RecipeError {
                location: Location {
                    file: src.file.clone(),
                    origin: Origin::Flag(flag.clone()),
                },
                field: String::new(),
                message: msg,
            })
        };
        let example = "write STAGE.PATH=VALUE, e.g. `--set distill.epochs=1` or `--set quantize.calibration.method=percentile`";
        let Some((path_text, value_text)) = flag.split_once('=') else {
            return Err(fail("expected STAGE.PATH=VALUE".into()).context_hint(example));
        };
        let Some(rel) = FieldPath::parse(path_text.trim()) else {
            return Err(fail(format!("`{path_text}` is not a field path")).context_hint(example));
        };
        let Some(Seg::Key(first)) = rel.0.first() else {
            return Err(fail(format!("`{path_text}` is not a field path")).context_hint(example));
        };
        let path = if TOP_LEVEL_KEYS.contains(&first.as_str()) {
            rel.clone()
        } else {
            let present: Vec<String> = match value.get("stages") {
                Some(Value::Mapping(m)) => m
                    .keys()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            if !present.contains(first) {
                let mut candidates: Vec<&str> = present.iter().map(String::as_str).collect();
                candidates.extend(TOP_LEVEL_KEYS);
                let msg = if StageKind::from_name(first).is_some() {
                    format!("stage `{first}` is not in this recipe")
                } else {
                    format!(
                        "unknown stage `{first}`{}",
                        did_you_mean(first, candidates.iter().copied())
                    )
                };
                return Err(fail(msg).context_hint(format!(
                    "stages in this recipe: {}; other settable keys: {}",
                    names(present.iter().map(String::as_str)),
                    names(TOP_LEVEL_KEYS.iter().copied().filter(|k| *k != "stages"))
                )));
            }
            FieldPath::root()
                .key("stages")
                .key(first.as_str())
                .with_tail(&rel.0[1..])
        };

        let new_value = if value_text.trim().is_empty() {
            Value::Null
        } else {
            let (quoted, _) = quote_flow_references(value_text);
            serde_norway::from_str::<Value>(&quoted)
                .map_err(|e| fail(format!("invalid value `{value_text}`: {e}")))?
        };

        let mut created: Option<FieldPath> = None;
        let mut cur: &mut Value = value;
        for (i, seg) in path.0.iter().enumerate() {
            let here = FieldPath(path.0[..=i].to_vec());
            let last = i + 1 == path.0.len();
            cur = match seg {
                Seg::Key(k) => {
                    if cur.is_null() {
                        *cur = Value::Mapping(Mapping::new());
                    }
                    let Value::Mapping(m) = cur else {
                        let parent = FieldPath(path.0[..i].to_vec());
                        return Err(fail(format!(
                            "`{parent}` is not a mapping, so it has no key `{k}`"
                        )));
                    };
                    let key = Value::String(k.clone());
                    if !m.contains_key(&key) && !last && created.is_none() {
                        created = Some(here.clone());
                    }
                    m.entry(key).or_insert(Value::Null)
                }
                Seg::Index(idx) => {
                    let parent = FieldPath(path.0[..i].to_vec());
                    let Value::Sequence(items) = cur else {
                        return Err(fail(format!("`{parent}` is not a list")));
                    };
                    let len = items.len();
                    match items.get_mut(*idx) {
                        Some(v) => v,
                        None => {
                            return Err(fail(format!(
                                "`{parent}` has {len} items, so there is no [{idx}]"
                            )))
                        }
                    }
                }
            };
        }
        *cur = new_value;
        src.overrides.push(Override {
            text: flag.clone(),
            path,
            created,
        });
    }
    Ok(())
}

impl FieldPath {
    fn with_tail(mut self, tail: &[Seg]) -> FieldPath {
        self.0.extend_from_slice(tail);
        self
    }
}
