//! Budgets: the limits a gate enforces, read from a YAML budget file or embedded in a recipe.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::hint::{HintExt, Hinted};

/// Limits a report must meet. Every field is optional; a gate checks only what is set.
/// Absolute limits judge the current report alone; relative ones compare it with a baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    /// Largest allowed model file, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<u64>,
    /// Largest allowed median latency per batch, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_p50_ms: Option<f64>,
    /// Largest allowed 95th-percentile latency per batch, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_p95_ms: Option<f64>,
    /// Largest allowed peak resident set size, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_peak_rss_bytes: Option<u64>,
    /// Smallest allowed top-1 accuracy, as a fraction (0.75 for 75%), like the report's
    /// `accuracy.top1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1: Option<f64>,
    /// Largest allowed growth of the model file over the baseline, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_increase_pct: Option<f64>,
    /// Largest allowed growth of median latency over the baseline, in percent; a larger growth
    /// fails only when it is statistically significant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_regression_pct: Option<f64>,
    /// Largest allowed fall of top-1 accuracy below the baseline, in percentage points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_top1_drop_pts: Option<f64>,
}

/// Every key a budget accepts, in the order checks are run.
pub const KEYS: [&str; 8] = [
    "max_size_bytes",
    "max_latency_p50_ms",
    "max_latency_p95_ms",
    "max_peak_rss_bytes",
    "min_top1",
    "max_size_increase_pct",
    "max_latency_regression_pct",
    "max_top1_drop_pts",
];

impl Budgets {
    /// Reads and validates a YAML budget file.
    pub fn load(path: &Path) -> Result<Budgets> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read budget file {}", path.display()))?;
        Budgets::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates YAML budget text; `origin` names the source in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Budgets> {
        // An empty document (or one of comments only) sets no limits.
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            return Ok(Budgets::default());
        }
        let de = serde_norway::Deserializer::from_str(text);
        let budgets: Budgets = match serde_path_to_error::deserialize(de) {
            Ok(b) => b,
            Err(e) => return Err(yaml_error(e, origin)),
        };
        budgets
            .validate()
            .with_context(|| format!("invalid budget file {origin}"))?;
        Ok(budgets)
    }

    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        self == &Budgets::default()
    }

    /// True when some limit needs a baseline report.
    pub fn needs_baseline(&self) -> bool {
        !self.relative_keys().is_empty()
    }

    /// Names of the set limits that compare against a baseline.
    pub fn relative_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.max_size_increase_pct.is_some() {
            keys.push("max_size_increase_pct");
        }
        if self.max_latency_regression_pct.is_some() {
            keys.push("max_latency_regression_pct");
        }
        if self.max_top1_drop_pts.is_some() {
            keys.push("max_top1_drop_pts");
        }
        keys
    }

    /// Refuses limits that cannot mean anything (negative sizes, top-1 above 1, NaN).
    pub fn validate(&self) -> Result<()> {
        let non_negative = [
            ("max_latency_p50_ms", self.max_latency_p50_ms),
            ("max_latency_p95_ms", self.max_latency_p95_ms),
            ("max_size_increase_pct", self.max_size_increase_pct),
            (
                "max_latency_regression_pct",
                self.max_latency_regression_pct,
            ),
            ("max_top1_drop_pts", self.max_top1_drop_pts),
        ];
        for (key, value) in non_negative {
            if let Some(v) = value {
                if !v.is_finite() || v < 0.0 {
                    bail!("`{key}` is {v}; it must be a number ≥ 0");
                }
            }
        }
        if let Some(v) = self.min_top1 {
            if !(0.0..=1.0).contains(&v) {
                return Err(anyhow::anyhow!(
                    "`min_top1` is {v}; it must be a fraction between 0 and 1"
                ))
                .hint(format!(
                    "top-1 is a fraction as in the bench report: write `min_top1: {}` for {v}%",
                    v / 100.0
                ));
            }
        }
        Ok(())
    }
}

/// Turns a YAML error into one that names the file, line, column and field, with a
/// did-you-mean hint for a misspelt key.
fn yaml_error(e: serde_path_to_error::Error<serde_norway::Error>, origin: &str) -> anyhow::Error {
    let inner = e.inner();
    let location = inner
        .location()
        .map(|l| format!(":{}:{}", l.line(), l.column()))
        .unwrap_or_default();
    let path = e.path().to_string();
    let mut message = inner.to_string();
    // serde_norway appends " at line L column C"; the location already leads the message.
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    // It may also lead with the path, which is printed below in the same words as elsewhere.
    if let Some(rest) = message.strip_prefix(&format!("{path}: ")) {
        message = rest.to_string();
    }
    let field = if path == "." {
        String::new()
    } else {
        format!("`{path}`: ")
    };
    let error = anyhow::anyhow!("{origin}{location}: {field}{message}");
    let hint = if let Some(unknown) = unknown_key(&message) {
        closest_key(unknown).map(|key| format!("did you mean `{key}`?"))
    } else if path == "." {
        Some("a budget file is a mapping of limits, e.g. `max_size_bytes: 5000000`".to_string())
    } else {
        None
    };
    match hint {
        Some(hint) => anyhow::Error::new(Hinted { error, hint }),
        None => error,
    }
}

/// The key named in serde's "unknown field `x`, expected ..." message.
fn unknown_key(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn closest_key(unknown: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hint::render;

    #[test]
    fn parses_every_key() {
        let b = Budgets::from_yaml(
            "max_size_bytes: 5000000\nmax_latency_p50_ms: 12.5\nmax_latency_p95_ms: 20\n\
             max_peak_rss_bytes: 300000000\nmin_top1: 0.75\nmax_size_increase_pct: 5\n\
             max_latency_regression_pct: 10\nmax_top1_drop_pts: 1.0\n",
            "b.yaml",
        )
        .unwrap();
        assert_eq!(b.max_size_bytes, Some(5_000_000));
        assert_eq!(b.max_latency_p95_ms, Some(20.0));
        assert_eq!(b.min_top1, Some(0.75));
        assert_eq!(b.max_top1_drop_pts, Some(1.0));
        assert!(b.needs_baseline());
        assert_eq!(b.relative_keys().len(), 3);
    }

    #[test]
    fn empty_file_sets_no_limits() {
        let b = Budgets::from_yaml("# nothing yet\n\n", "b.yaml").unwrap();
        assert!(b.is_empty());
    }

    #[test]
    fn unknown_key_names_file_line_key_and_suggestion() {
        let err =
            Budgets::from_yaml("min_top1: 0.7\nmax_sise_bytes: 10\n", "budget.yaml").unwrap_err();
        let text = render(&err);
        assert!(text.starts_with("error: budget.yaml:2:"), "{text}");
        assert!(text.contains("max_sise_bytes"), "{text}");
        assert!(
            text.contains("hint: did you mean `max_size_bytes`?"),
            "{text}"
        );
    }

    #[test]
    fn wrong_type_names_the_field_and_line() {
        let err = Budgets::from_yaml(
            "max_size_bytes: 10\nmax_latency_p50_ms: fast\n",
            "budget.yaml",
        )
        .unwrap_err();
        let text = render(&err);
        assert!(
            text.starts_with("error: budget.yaml:2:21: `max_latency_p50_ms`: invalid type"),
            "{text}"
        );
    }

    #[test]
    fn a_list_is_not_a_budget() {
        let err = Budgets::from_yaml("- max_size_bytes: 10\n", "budget.yaml").unwrap_err();
        let text = render(&err);
        assert!(text.starts_with("error: budget.yaml:1:1: "), "{text}");
        assert!(text.contains("hint: a budget file is a mapping"), "{text}");
    }

    #[test]
    fn top1_given_as_percent_is_refused_with_hint() {
        let err = Budgets::from_yaml("min_top1: 75\n", "budget.yaml").unwrap_err();
        let text = render(&err);
        assert!(text.contains("min_top1"), "{text}");
        assert!(text.contains("min_top1: 0.75"), "{text}");
    }

    #[test]
    fn negative_limit_is_refused() {
        let err =
            Budgets::from_yaml("max_latency_regression_pct: -5\n", "budget.yaml").unwrap_err();
        assert!(render(&err).contains("max_latency_regression_pct"));
    }
}
