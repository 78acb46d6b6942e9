//! The versioned JSON schema of `shrink bench` reports, read back by `shrink gate`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Bumped when a field changes meaning or disappears; new optional fields keep the version.
pub const SCHEMA: &str = "shrink.bench/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BenchReport {
    pub schema: String,
    pub shrink_version: String,
    /// Seconds since the Unix epoch when the run finished.
    pub created_unix: u64,
    pub settings: Settings,
    /// One entry per model, in the order given on the command line; ratios are against the first.
    pub models: Vec<ModelReport>,
}

/// Everything that changes a measured number. Two reports are comparable only when these match.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `tract` or `ort`.
    pub backend: String,
    /// What was asked for: `cpu`, `cuda` or `xnnpack`.
    pub device: String,
    /// What actually ran, e.g. `tract-cpu`, `tract-cuda`, `ort-CPUExecutionProvider`.
    pub provider: String,
    /// `host` or `mobile`.
    pub target: String,
    pub threads: usize,
    pub batch_size: usize,
    pub warmup: usize,
    pub iterations: usize,
    pub cpu_model: String,
    pub cpu_cores: usize,
    pub os: String,
    pub arch: String,
    /// Library versions that produced the numbers (`tract`, `onnxruntime`).
    pub versions: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelReport {
    /// File stem unless given as NAME=PATH.
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
    /// Bytes of all initializers (weights, biases, quantization parameters).
    pub weight_bytes: u64,
    pub params: u64,
    /// Peak resident set of a child process that loaded and ran this model alone.
    pub peak_rss_bytes: Option<u64>,
    pub gpu_memory_bytes: Option<u64>,
    pub session_create_ms: f64,
    /// The first run after the session was created.
    pub cold_start_ms: f64,
    pub latency_ms: Latency,
    /// Samples (not batches) per second, from the mean latency.
    pub throughput_per_s: f64,
    pub accuracy: Option<Accuracy>,
    pub agreement: Option<Agreement>,
    /// Against the first model of the report; 1.0 for the first.
    pub ratios: Ratios,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// Every timed iteration, in the order measured, in milliseconds per batch.
    pub samples: Vec<f64>,
    pub mean: f64,
    pub stdev: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    /// Coefficient of variation, stdev / mean.
    pub cv: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Accuracy {
    pub data: String,
    pub samples: u64,
    pub top1: f64,
    pub top5: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    pub reference: String,
    pub samples: u64,
    pub top1_agreement: f64,
    pub max_abs_diff: f64,
    /// None when the outputs are identical (infinite SQNR, which JSON cannot hold).
    pub sqnr_db: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ratios {
    pub latency_p50: f64,
    pub size: f64,
}

impl Latency {
    /// Summarises raw samples; percentiles use linear interpolation between order statistics.
    pub fn from_samples(samples: Vec<f64>) -> Latency {
        let n = samples.len();
        if n == 0 {
            return Latency {
                samples,
                mean: f64::NAN,
                stdev: f64::NAN,
                min: f64::NAN,
                p50: f64::NAN,
                p90: f64::NAN,
                p95: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                cv: f64::NAN,
            };
        }
        let mut sorted = samples.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        let stdev = var.sqrt();
        Latency {
            mean,
            stdev,
            min: sorted[0],
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p95: percentile(&sorted, 95.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[n - 1],
            cv: if mean > 0.0 { stdev / mean } else { 0.0 },
            samples,
        }
    }
}

/// Percentile `q` (0..=100) of an ascending slice, linear interpolation (NumPy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = (q / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl BenchReport {
    pub fn load(path: &Path) -> Result<BenchReport> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read bench report {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        match value.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            Some(other) => bail!(
                "{} has report schema `{other}`, this shrink reads `{SCHEMA}`; re-run `shrink bench` to produce a current report",
                path.display()
            ),
            None => bail!(
                "{} is not a shrink bench report (no `schema` field); produce one with `shrink bench MODEL --json {}`",
                path.display(),
                path.display()
            ),
        }
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .with_context(|| format!("{} is not a valid {SCHEMA} report", path.display()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// The model named `name`, or the only/last model when `name` is None.
    pub fn model(&self, name: Option<&str>) -> Result<&ModelReport> {
        match name {
            Some(n) => self.models.iter().find(|m| m.name == n).with_context(|| {
                let names: Vec<_> = self.models.iter().map(|m| m.name.as_str()).collect();
                format!(
                    "no model named `{n}` in the report; it has: {}",
                    names.join(", ")
                )
            }),
            None => self.models.last().context("the report has no models"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy.percentile([1,2,3,4,10], [50, 90, 99]) == [3.0, 7.6, 9.76]
        let s = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile(&s, 50.0), 3.0);
        assert!((percentile(&s, 90.0) - 7.6).abs() < 1e-12);
        assert!((percentile(&s, 99.0) - 9.76).abs() < 1e-12);
    }

    #[test]
    fn latency_summary() {
        let l = Latency::from_samples(vec![2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(l.mean, 5.0);
        // sample stdev: sqrt(32/7)
        assert!((l.stdev - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(l.min, 2.0);
        assert_eq!(l.max, 9.0);
        assert_eq!(l.samples.len(), 8);
    }
}
