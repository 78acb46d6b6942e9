//! `gate`: judges a bench report against budgets and, optionally, a baseline report, so CI can
//! fail a change that makes a model bigger, slower or less accurate.
//!
//! Latency regressions are judged on raw samples: a change fails only when the ratio of
//! medians exceeds the threshold *and* a one-sided Mann–Whitney U test says the excess is
//! significant (see [`stats`]), so timer noise on a shared CI runner does not fail builds.

pub mod budget;
pub mod render;
pub mod stats;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::bench::report::{BenchReport, ModelReport, Settings};
use crate::hint::HintExt;

pub use budget::Budgets;

/// Fewest latency samples per report for the regression test; below this the normal
/// approximation of the Mann–Whitney statistic is too coarse.
pub const MIN_SAMPLES: usize = 8;
/// Bootstrap resamples for the confidence interval of the ratio of medians.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// How to run a gate, besides the budgets themselves.
#[derive(Debug, Clone, PartialEq)]
pub struct GateOptions {
    /// Which model of the report to judge; the last one when `None`.
    pub model: Option<String>,
    /// Compare reports whose settings differ (recorded as a warning) instead of refusing.
    pub allow_mismatch: bool,
    /// Significance level of the latency regression test.
    pub alpha: f64,
    /// Seed of the bootstrap resampling.
    pub seed: u64,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            model: None,
            allow_mismatch: false,
            alpha: 0.05,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

/// Whether the limit is an upper (`max`) or lower (`min`) bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Max,
    Min,
}

/// Which rule decided a latency regression check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The ratio of medians is within 1 + threshold.
    WithinThreshold,
    /// The ratio exceeds 1 + threshold, but the samples do not show it significantly.
    NotSignificant,
    /// The ratio exceeds 1 + threshold and the test rejects "no worse than the threshold".
    SignificantRegression,
}

/// The statistics behind a latency regression verdict.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Significance {
    pub median_current_ms: f64,
    pub median_baseline_ms: f64,
    /// median(current) / median(baseline).
    pub ratio: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Coverage of the interval, 1 − alpha.
    pub confidence: f64,
    /// One-sided Mann–Whitney p-value of current against baseline × (1 + threshold).
    pub p_value: f64,
    pub alpha: f64,
    pub n_current: usize,
    pub n_baseline: usize,
    pub rule: Rule,
}

/// One budget judged against the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// The measured quantity with its unit, e.g. `size_bytes`, `latency_regression_pct`.
    pub name: String,
    pub measured: f64,
    pub limit: f64,
    pub bound: Bound,
    pub verdict: Verdict,
    /// One line saying why, for people.
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub significance: Option<Significance>,
}

/// Every check of one gate run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateOutcome {
    /// The model judged in the current report.
    pub model: String,
    /// The model it was compared with in the baseline report, if any.
    pub baseline_model: Option<String>,
    /// Things that change how the result should be read (e.g. compared despite mismatches).
    pub warnings: Vec<String>,
    pub checks: Vec<Check>,
}

impl GateOutcome {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.verdict == Verdict::Pass)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.verdict == Verdict::Fail)
    }
}

/// A setting that differs between the baseline and the current report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub field: &'static str,
    pub baseline: String,
    pub current: String,
}

/// The settings that make two reports' numbers incomparable when they differ.
pub fn settings_mismatches(baseline: &Settings, current: &Settings) -> Vec<Mismatch> {
    let fields: [(&'static str, String, String); 6] = [
        ("backend", baseline.backend.clone(), current.backend.clone()),
        (
            "provider",
            baseline.provider.clone(),
            current.provider.clone(),
        ),
        ("target", baseline.target.clone(), current.target.clone()),
        (
            "threads",
            baseline.threads.to_string(),
            current.threads.to_string(),
        ),
        (
            "batch_size",
            baseline.batch_size.to_string(),
            current.batch_size.to_string(),
        ),
        (
            "cpu_model",
            baseline.cpu_model.clone(),
            current.cpu_model.clone(),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, b, c)| b != c)
        .map(|(field, baseline, current)| Mismatch {
            field,
            baseline,
            current,
        })
        .collect()
}

fn describe_mismatches(mismatches: &[Mismatch]) -> String {
    mismatches
        .iter()
        .map(|m| {
            format!(
                "{}: baseline `{}`, current `{}`",
                m.field, m.baseline, m.current
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Judges `current` against `budgets`, comparing with `baseline` for relative budgets.
///
/// Errors (rather than passing silently) when a budget needs data the reports lack, when a
/// relative budget has no baseline, or when the reports were measured with different settings
/// and `opts.allow_mismatch` is off.
pub fn evaluate(
    current: &BenchReport,
    baseline: Option<&BenchReport>,
    budgets: &Budgets,
    opts: &GateOptions,
) -> Result<GateOutcome> {
    budgets.validate()?;
    if budgets.is_empty() {
        return Err(anyhow::anyhow!(
            "the budget sets no limits, so there is nothing to gate"
        ))
        .hint(format!(
            "give --budget FILE with at least one of: {}",
            budget::KEYS.join(", ")
        ));
    }
    if !(opts.alpha > 0.0 && opts.alpha < 1.0) {
        bail!(
            "the significance level must be between 0 and 1 (exclusive), got {}",
            opts.alpha
        );
    }
    let cur = current
        .model(opts.model.as_deref())
        .context("cannot pick the model to gate in the current report")?;

    let mut warnings = Vec::new();
    let base = match baseline {
        None => {
            if budgets.needs_baseline() {
                return Err(anyhow::anyhow!(
                    "{} compare against a baseline, but no baseline report was given",
                    budgets.relative_keys().join(", ")
                ))
                .hint(
                    "pass --baseline REPORT (e.g. the bench report of the main branch), \
                     or remove the relative limits from the budget",
                );
            }
            None
        }
        Some(b) => {
            let mismatches = settings_mismatches(&b.settings, &current.settings);
            if !mismatches.is_empty() {
                let list = describe_mismatches(&mismatches);
                if !opts.allow_mismatch {
                    return Err(anyhow::anyhow!(
                        "the reports were measured with different settings and cannot be \
                         compared: {list}"
                    ))
                    .hint(
                        "re-run `shrink bench` with the baseline's settings, or pass \
                         --allow-mismatch to compare anyway",
                    );
                }
                warnings.push(format!(
                    "comparing reports measured with different settings: {list}"
                ));
            }
            Some(pick_baseline_model(b, cur, opts, &mut warnings)?)
        }
    };

    let mut checks = Vec::new();
    if let Some(limit) = budgets.max_size_bytes {
        checks.push(limit_check(
            "size_bytes",
            cur.size_bytes as f64,
            limit as f64,
            Bound::Max,
        ));
    }
    if let Some(limit) = budgets.max_latency_p50_ms {
        let p50 = latency_summary(cur, "p50", cur.latency_ms.p50)?;
        checks.push(limit_check("latency_p50_ms", p50, limit, Bound::Max));
    }
    if let Some(limit) = budgets.max_latency_p95_ms {
        let p95 = latency_summary(cur, "p95", cur.latency_ms.p95)?;
        checks.push(limit_check("latency_p95_ms", p95, limit, Bound::Max));
    }
    if let Some(limit) = budgets.max_peak_rss_bytes {
        let rss = cur.peak_rss_bytes.ok_or_else(|| {
            anyhow::anyhow!(
                "`max_peak_rss_bytes` needs the peak memory of model `{}`, but the current \
                 report has none (`peak_rss_bytes` is null)",
                cur.name
            )
        });
        let rss = rss.hint(
            "re-run `shrink bench` where it can measure peak memory (Linux), or remove \
             `max_peak_rss_bytes` from the budget",
        )?;
        checks.push(limit_check(
            "peak_rss_bytes",
            rss as f64,
            limit as f64,
            Bound::Max,
        ));
    }
    if let Some(limit) = budgets.min_top1 {
        let top1 = top1(cur, "current", "min_top1")?;
        checks.push(limit_check("top1", top1, limit, Bound::Min));
    }
    if let Some(base) = base {
        if let Some(limit) = budgets.max_size_increase_pct {
            if base.size_bytes == 0 {
                bail!(
                    "the baseline model `{}` has size 0 bytes; a relative size limit needs a real baseline",
                    base.name
                );
            }
            let pct =
                (cur.size_bytes as f64 - base.size_bytes as f64) / base.size_bytes as f64 * 100.0;
            let mut check = limit_check("size_increase_pct", pct, limit, Bound::Max);
            check.detail = format!(
                "{} vs baseline {}: {}",
                format_value("size_bytes", cur.size_bytes as f64),
                format_value("size_bytes", base.size_bytes as f64),
                check.detail
            );
            checks.push(check);
        }
        if let Some(limit) = budgets.max_latency_regression_pct {
            checks.push(latency_regression(cur, base, limit, opts)?);
        }
        if let Some(limit) = budgets.max_top1_drop_pts {
            let now = top1(cur, "current", "max_top1_drop_pts")?;
            let before = top1(base, "baseline", "max_top1_drop_pts")?;
            let drop = (before - now) * 100.0;
            let mut check = limit_check("top1_drop_pts", drop, limit, Bound::Max);
            check.detail = format!(
                "top-1 {} vs baseline {}: {}",
                format_value("top1", now),
                format_value("top1", before),
                check.detail
            );
            checks.push(check);
        }
    }

    Ok(GateOutcome {
        model: cur.name.clone(),
        baseline_model: base.map(|b| b.name.clone()),
        warnings,
        checks,
    })
}

/// The baseline's model with the judged model's name; an explicit `--model` must exist in
/// both reports, otherwise the baseline's last model is used with a warning.
fn pick_baseline_model<'a>(
    baseline: &'a BenchReport,
    cur: &ModelReport,
    opts: &GateOptions,
    warnings: &mut Vec<String>,
) -> Result<&'a ModelReport> {
    if let Some(name) = &opts.model {
        return baseline
            .model(Some(name))
            .context("cannot pick the model to compare with in the baseline report");
    }
    if let Some(m) = baseline.models.iter().find(|m| m.name == cur.name) {
        return Ok(m);
    }
    let m = baseline
        .model(None)
        .context("cannot pick the model to compare with in the baseline report")?;
    warnings.push(format!(
        "the baseline report has no model named `{}`; comparing with its last model `{}` \
         (pick one with --model)",
        cur.name, m.name
    ));
    Ok(m)
}

/// Relative slack on limit comparisons, so that a derived value that equals the limit
/// except for rounding (0.76 − 0.745 = 0.015000000000000013) is not judged over it. Far below
/// any meaningful difference: at most a byte for files up to 1 GB.
const LIMIT_SLACK: f64 = 1e-9;

fn limit_check(name: &str, measured: f64, limit: f64, bound: Bound) -> Check {
    let slack = LIMIT_SLACK * limit.abs().max(1.0);
    let ok = match bound {
        Bound::Max => measured <= limit + slack,
        Bound::Min => measured >= limit - slack,
    };
    let (verdict, detail) = match (ok, bound) {
        (true, _) => (Verdict::Pass, "within the limit".to_string()),
        (false, Bound::Max) => (
            Verdict::Fail,
            format!(
                "{} is over the limit of {}",
                format_value(name, measured),
                format_value(name, limit)
            ),
        ),
        (false, Bound::Min) => (
            Verdict::Fail,
            format!(
                "{} is under the minimum of {}",
                format_value(name, measured),
                format_value(name, limit)
            ),
        ),
    };
    Check {
        name: name.to_string(),
        measured,
        limit,
        bound,
        verdict,
        detail,
        significance: None,
    }
}

fn latency_summary(model: &ModelReport, which: &str, value: f64) -> Result<f64> {
    if model.latency_ms.samples.is_empty() || !value.is_finite() {
        return Err(anyhow::anyhow!(
            "the current report has no latency {which} for model `{}`",
            model.name
        ))
        .hint("re-run `shrink bench` with timed iterations");
    }
    Ok(value)
}

fn top1(model: &ModelReport, which: &str, key: &str) -> Result<f64> {
    match &model.accuracy {
        Some(a) if a.top1.is_finite() => Ok(a.top1),
        _ => Err(anyhow::anyhow!(
            "`{key}` needs the top-1 accuracy of model `{}`, but the {which} report has no accuracy",
            model.name
        ))
        .hint(format!(
            "run `shrink bench` for the {which} report with `--data` (a labelled dataset) to \
             measure accuracy, or remove `{key}` from the budget"
        )),
    }
}

fn latency_samples<'a>(model: &'a ModelReport, which: &str) -> Result<&'a [f64]> {
    let samples = &model.latency_ms.samples;
    if samples.len() < MIN_SAMPLES {
        return Err(anyhow::anyhow!(
            "`max_latency_regression_pct` needs at least {MIN_SAMPLES} latency samples per \
             report; the {which} report has {} for model `{}`",
            samples.len(),
            model.name
        ))
        .hint("re-run `shrink bench` with more timed iterations (30 or more make a useful test)");
    }
    if let Some(bad) = samples.iter().find(|s| !s.is_finite() || **s < 0.0) {
        bail!(
            "the {which} report has an invalid latency sample {bad} for model `{}`",
            model.name
        );
    }
    Ok(samples)
}

/// Fails only when median(current) / median(baseline) > 1 + threshold and a one-sided
/// Mann–Whitney U test of current against baseline × (1 + threshold) is significant at alpha.
/// Scaling the baseline makes the null hypothesis "no worse than the allowed regression", so
/// a significant result means the regression is larger than allowed, not merely non-zero.
fn latency_regression(
    cur: &ModelReport,
    base: &ModelReport,
    threshold_pct: f64,
    opts: &GateOptions,
) -> Result<Check> {
    let x = latency_samples(cur, "current")?;
    let y = latency_samples(base, "baseline")?;
    let median_current = stats::median(x);
    let median_baseline = stats::median(y);
    if median_baseline <= 0.0 {
        bail!(
            "the baseline median latency of model `{}` is {median_baseline} ms; a relative \
             latency limit needs positive latencies",
            base.name
        );
    }
    let ratio = median_current / median_baseline;
    let allowed = 1.0 + threshold_pct / 100.0;
    let scaled: Vec<f64> = y.iter().map(|v| v * allowed).collect();
    let test = stats::mann_whitney_greater(x, &scaled);
    let confidence = 1.0 - opts.alpha;
    let ci = stats::bootstrap_median_ratio(x, y, BOOTSTRAP_RESAMPLES, confidence, opts.seed);
    let p = format_p(test.p_value);
    let (verdict, rule, decision) = if ratio <= allowed {
        (
            Verdict::Pass,
            Rule::WithinThreshold,
            format!("within threshold (p={p}) → pass"),
        )
    } else if test.p_value < opts.alpha {
        (
            Verdict::Fail,
            Rule::SignificantRegression,
            format!("significant regression (p={p} < α={}) → fail", opts.alpha),
        )
    } else {
        (
            Verdict::Pass,
            Rule::NotSignificant,
            format!(
                "exceeds threshold but not significant (p={p} ≥ α={}) → pass",
                opts.alpha
            ),
        )
    };
    let detail = format!(
        "median {median_current:.3} ms vs baseline {median_baseline:.3} ms: ratio {ratio:.3} \
         ({:.0}% CI {:.3}–{:.3}), limit {allowed:.3}, Mann–Whitney n={}/{}; {decision}",
        confidence * 100.0,
        ci.low,
        ci.high,
        x.len(),
        y.len(),
    );
    Ok(Check {
        name: "latency_regression_pct".to_string(),
        measured: (ratio - 1.0) * 100.0,
        limit: threshold_pct,
        bound: Bound::Max,
        verdict,
        detail,
        significance: Some(Significance {
            median_current_ms: median_current,
            median_baseline_ms: median_baseline,
            ratio,
            ci_low: ci.low,
            ci_high: ci.high,
            confidence,
            p_value: test.p_value,
            alpha: opts.alpha,
            n_current: x.len(),
            n_baseline: y.len(),
            rule,
        }),
    })
}

fn format_p(p: f64) -> String {
    if p < 0.001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.3}")
    }
}

/// Formats a check's value for people, by the unit its name ends with.
pub fn format_value(name: &str, v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if name.ends_with("_bytes") {
        let mib = v / (1024.0 * 1024.0);
        if mib >= 1.0 {
            format!("{v:.0} B ({mib:.2} MiB)")
        } else {
            format!("{v:.0} B ({:.1} KiB)", v / 1024.0)
        }
    } else if name.ends_with("_ms") {
        format!("{v:.3} ms")
    } else if name.ends_with("_pct") {
        format!("{v:+.2}%")
    } else if name.ends_with("_pts") {
        format!("{v:.2} pts")
    } else if name == "top1" {
        format!("{:.2}%", v * 100.0)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
pub(crate) mod tests;
