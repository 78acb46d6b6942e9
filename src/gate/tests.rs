//! Unit tests of `evaluate`: every budget passing and failing, missing data, mismatches.

use super::*;
use crate::bench::report::{Accuracy, Latency, Ratios, SCHEMA};
use crate::hint::render;

pub(crate) fn settings() -> Settings {
    Settings {
        backend: "tract".into(),
        device: "cpu".into(),
        provider: "tract-cpu".into(),
        target: "host".into(),
        threads: 4,
        batch_size: 1,
        warmup: 5,
        iterations: 40,
        cpu_model: "Test CPU @ 3.0GHz".into(),
        cpu_cores: 8,
        os: "linux".into(),
        arch: "x86_64".into(),
        versions: Default::default(),
    }
}

/// Deterministic samples spread around `center`: a fixed pattern of ±`spread` fractions.
pub(crate) fn samples(center: f64, spread: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let u = ((i * 37 + 11) % 101) as f64 / 100.0; // 0..1, well mixed
            center * (1.0 + spread * (2.0 * u - 1.0))
        })
        .collect()
}

pub(crate) fn model(name: &str, size_bytes: u64, latency: Vec<f64>) -> ModelReport {
    let latency = Latency::from_samples(latency);
    ModelReport {
        name: name.into(),
        path: format!("{name}.onnx"),
        size_bytes,
        weight_bytes: size_bytes / 2,
        params: size_bytes / 4,
        peak_rss_bytes: Some(200 << 20),
        gpu_memory_bytes: None,
        session_create_ms: 10.0,
        cold_start_ms: 20.0,
        throughput_per_s: 1000.0 / latency.mean,
        latency_ms: latency,
        accuracy: Some(Accuracy {
            data: "val".into(),
            samples: 1000,
            top1: 0.76,
            top5: 0.93,
        }),
        agreement: None,
        ratios: Ratios {
            latency_p50: 1.0,
            size: 1.0,
        },
    }
}

pub(crate) fn report(models: Vec<ModelReport>) -> BenchReport {
    BenchReport {
        schema: SCHEMA.into(),
        shrink_version: "0.1.0".into(),
        created_unix: 1_700_000_000,
        settings: settings(),
        models,
    }
}

fn one(size: u64, center_ms: f64) -> BenchReport {
    report(vec![model("net", size, samples(center_ms, 0.05, 40))])
}

fn run(cur: &BenchReport, base: Option<&BenchReport>, b: Budgets) -> GateOutcome {
    evaluate(cur, base, &b, &GateOptions::default()).unwrap()
}

fn only(outcome: &GateOutcome) -> &Check {
    assert_eq!(outcome.checks.len(), 1, "{outcome:?}");
    &outcome.checks[0]
}

fn err_text(cur: &BenchReport, base: Option<&BenchReport>, b: Budgets, o: GateOptions) -> String {
    render(&evaluate(cur, base, &b, &o).unwrap_err())
}

#[test]
fn size_budget() {
    let cur = one(1000, 10.0);
    let b = |limit| Budgets {
        max_size_bytes: Some(limit),
        ..Default::default()
    };
    let pass = run(&cur, None, b(1000));
    assert_eq!(only(&pass).verdict, Verdict::Pass);
    assert!(pass.passed());
    let fail = run(&cur, None, b(999));
    let c = only(&fail);
    assert_eq!((c.name.as_str(), c.verdict), ("size_bytes", Verdict::Fail));
    assert_eq!((c.measured, c.limit), (1000.0, 999.0));
    assert!(!fail.passed());
}

#[test]
fn latency_percentile_budgets() {
    let cur = one(1000, 10.0);
    let p50 = cur.models[0].latency_ms.p50;
    let p95 = cur.models[0].latency_ms.p95;
    let pass = run(
        &cur,
        None,
        Budgets {
            max_latency_p50_ms: Some(p50 + 0.01),
            max_latency_p95_ms: Some(p95 + 0.01),
            ..Default::default()
        },
    );
    assert!(pass.passed(), "{pass:?}");
    let fail = run(
        &cur,
        None,
        Budgets {
            max_latency_p50_ms: Some(p50 + 0.01),
            max_latency_p95_ms: Some(p95 - 0.01),
            ..Default::default()
        },
    );
    let failed: Vec<_> = fail.failures().map(|c| c.name.as_str()).collect();
    assert_eq!(failed, ["latency_p95_ms"]);
}

#[test]
fn peak_rss_budget_and_missing_rss() {
    let mut cur = one(1000, 10.0);
    let b = |limit| Budgets {
        max_peak_rss_bytes: Some(limit),
        ..Default::default()
    };
    assert!(run(&cur, None, b(200 << 20)).passed());
    assert!(!run(&cur, None, b((200 << 20) - 1)).passed());
    cur.models[0].peak_rss_bytes = None;
    let text = err_text(&cur, None, b(1), GateOptions::default());
    assert!(text.contains("peak_rss_bytes"), "{text}");
    assert!(text.contains("hint:"), "{text}");
}

#[test]
fn top1_budget_and_missing_accuracy() {
    let mut cur = one(1000, 10.0);
    let b = |limit| Budgets {
        min_top1: Some(limit),
        ..Default::default()
    };
    assert!(run(&cur, None, b(0.76)).passed());
    let fail = run(&cur, None, b(0.77));
    assert_eq!(only(&fail).verdict, Verdict::Fail);
    assert_eq!(only(&fail).bound, Bound::Min);
    assert!(only(&fail).detail.contains("76.00%"), "{fail:?}");
    cur.models[0].accuracy = None;
    let text = err_text(&cur, None, b(0.5), GateOptions::default());
    assert!(text.contains("no accuracy"), "{text}");
    assert!(text.contains("--data"), "{text}");
}

#[test]
fn size_increase_budget() {
    let base = one(1000, 10.0);
    let cur = one(1100, 10.0);
    let b = |pct| Budgets {
        max_size_increase_pct: Some(pct),
        ..Default::default()
    };
    let pass = run(&cur, Some(&base), b(10.0));
    assert_eq!(only(&pass).verdict, Verdict::Pass);
    assert!((only(&pass).measured - 10.0).abs() < 1e-9);
    let fail = run(&cur, Some(&base), b(9.9));
    assert_eq!(only(&fail).verdict, Verdict::Fail);
    assert_eq!(fail.baseline_model.as_deref(), Some("net"));
}

#[test]
fn top1_drop_budget() {
    let base = one(1000, 10.0);
    let mut cur = one(1000, 10.0);
    cur.models[0].accuracy.as_mut().unwrap().top1 = 0.745;
    let b = |pts| Budgets {
        max_top1_drop_pts: Some(pts),
        ..Default::default()
    };
    let pass = run(&cur, Some(&base), b(1.5));
    assert!((only(&pass).measured - 1.5).abs() < 1e-9, "{pass:?}");
    assert!(pass.passed());
    assert!(!run(&cur, Some(&base), b(1.4)).passed());

    let mut base_no_acc = base.clone();
    base_no_acc.models[0].accuracy = None;
    let text = err_text(&cur, Some(&base_no_acc), b(1.0), GateOptions::default());
    assert!(text.contains("baseline report has no accuracy"), "{text}");
}

#[test]
fn relative_budget_without_baseline_is_an_error() {
    let cur = one(1000, 10.0);
    let text = err_text(
        &cur,
        None,
        Budgets {
            max_size_bytes: Some(10_000),
            max_latency_regression_pct: Some(5.0),
            ..Default::default()
        },
        GateOptions::default(),
    );
    assert!(text.contains("max_latency_regression_pct"), "{text}");
    assert!(text.contains("--baseline"), "{text}");
}

#[test]
fn empty_budget_is_an_error() {
    let cur = one(1000, 10.0);
    let text = err_text(&cur, None, Budgets::default(), GateOptions::default());
    assert!(text.contains("no limits"), "{text}");
}

fn regression_budget(pct: f64) -> Budgets {
    Budgets {
        max_latency_regression_pct: Some(pct),
        ..Default::default()
    }
}

#[test]
fn consistent_regression_fails_as_significant() {
    let base = report(vec![model("net", 1000, samples(10.0, 0.05, 40))]);
    let cur = report(vec![model("net", 1000, samples(13.0, 0.05, 40))]);
    let out = run(&cur, Some(&base), regression_budget(10.0));
    let c = only(&out);
    assert_eq!(c.verdict, Verdict::Fail);
    let s = c.significance.unwrap();
    assert_eq!(s.rule, Rule::SignificantRegression);
    assert!((s.ratio - 1.3).abs() < 0.02, "{s:?}");
    assert!(s.p_value < 1e-6, "{s:?}");
    assert!(
        s.ci_low > 1.1 && s.ci_low <= s.ratio && s.ratio <= s.ci_high,
        "{s:?}"
    );
    assert!(c.detail.contains("significant regression"), "{}", c.detail);
}

#[test]
fn noisy_excess_that_is_not_significant_passes() {
    // Median 7% above the baseline with a 5% threshold, but only 8 widely spread samples:
    // the shift is small against the spread, so the test cannot reject "≤ 5% slower".
    let y = samples(10.0, 0.5, 8);
    let x: Vec<f64> = y.iter().map(|v| v * 1.07).collect();
    let base = report(vec![model("net", 1000, y)]);
    let cur = report(vec![model("net", 1000, x)]);
    let out = run(&cur, Some(&base), regression_budget(5.0));
    let c = only(&out);
    let s = c.significance.unwrap();
    assert!((s.ratio - 1.07).abs() < 1e-9, "{s:?}");
    assert_eq!(s.rule, Rule::NotSignificant, "{s:?}");
    assert!(s.p_value > 0.3, "{s:?}");
    assert_eq!(c.verdict, Verdict::Pass);
    assert!(
        c.detail.contains("exceeds threshold but not significant"),
        "{}",
        c.detail
    );
}

#[test]
fn regression_within_threshold_passes() {
    let base = report(vec![model("net", 1000, samples(10.0, 0.05, 40))]);
    let cur = report(vec![model("net", 1000, samples(10.3, 0.05, 40))]);
    let out = run(&cur, Some(&base), regression_budget(5.0));
    let c = only(&out);
    assert_eq!(c.verdict, Verdict::Pass);
    assert_eq!(c.significance.unwrap().rule, Rule::WithinThreshold);
    assert!((c.measured - 3.0).abs() < 0.5, "{c:?}");
}

#[test]
fn regression_is_reproducible_for_a_seed() {
    let base = report(vec![model("net", 1000, samples(10.0, 0.2, 30))]);
    let cur = report(vec![model("net", 1000, samples(10.8, 0.2, 30))]);
    let a = run(&cur, Some(&base), regression_budget(5.0));
    let b = run(&cur, Some(&base), regression_budget(5.0));
    assert_eq!(a, b);
}

#[test]
fn too_few_samples_is_an_error() {
    let base = report(vec![model("net", 1000, samples(10.0, 0.05, 5))]);
    let cur = report(vec![model("net", 1000, samples(10.0, 0.05, 40))]);
    let text = err_text(
        &cur,
        Some(&base),
        regression_budget(5.0),
        GateOptions::default(),
    );
    assert!(text.contains("at least 8"), "{text}");
    assert!(text.contains("baseline report has 5"), "{text}");
}

#[test]
fn mismatched_settings_are_refused_naming_each_field() {
    let base = one(1000, 10.0);
    let mut cur = one(1000, 10.0);
    cur.settings.threads = 8;
    cur.settings.cpu_model = "Other CPU".into();
    cur.settings.warmup = 99; // not a comparability setting
    let b = Budgets {
        max_size_increase_pct: Some(5.0),
        ..Default::default()
    };
    let text = err_text(&cur, Some(&base), b.clone(), GateOptions::default());
    assert!(
        text.contains("threads: baseline `4`, current `8`"),
        "{text}"
    );
    assert!(
        text.contains("cpu_model: baseline `Test CPU @ 3.0GHz`, current `Other CPU`"),
        "{text}"
    );
    assert!(!text.contains("warmup"), "{text}");
    assert!(
        text.contains("hint:") && text.contains("--allow-mismatch"),
        "{text}"
    );

    let opts = GateOptions {
        allow_mismatch: true,
        ..Default::default()
    };
    let out = evaluate(&cur, Some(&base), &b, &opts).unwrap();
    assert!(out.passed());
    assert_eq!(out.warnings.len(), 1);
    assert!(out.warnings[0].contains("threads"), "{:?}", out.warnings);
}

#[test]
fn every_comparability_setting_is_checked() {
    let base = settings();
    type Edit = fn(&mut Settings);
    let edits: [(&str, Edit); 6] = [
        ("backend", |s| s.backend = "ort".into()),
        ("provider", |s| {
            s.provider = "ort-CPUExecutionProvider".into()
        }),
        ("target", |s| s.target = "mobile".into()),
        ("threads", |s| s.threads = 1),
        ("batch_size", |s| s.batch_size = 8),
        ("cpu_model", |s| s.cpu_model = "x".into()),
    ];
    for (field, edit) in edits {
        let mut cur = settings();
        edit(&mut cur);
        let m = settings_mismatches(&base, &cur);
        assert_eq!(m.len(), 1, "{field}");
        assert_eq!(m[0].field, field);
    }
}

#[test]
fn model_selection() {
    let cur = report(vec![
        model("fp32", 4000, samples(10.0, 0.05, 20)),
        model("int8", 1000, samples(6.0, 0.05, 20)),
    ]);
    let b = Budgets {
        max_size_bytes: Some(2000),
        ..Default::default()
    };
    // The last model by default.
    let out = run(&cur, None, b.clone());
    assert_eq!(out.model, "int8");
    assert!(out.passed());
    let opts = GateOptions {
        model: Some("fp32".into()),
        ..Default::default()
    };
    let out = evaluate(&cur, None, &b, &opts).unwrap();
    assert_eq!(out.model, "fp32");
    assert!(!out.passed());
    let opts = GateOptions {
        model: Some("int4".into()),
        ..Default::default()
    };
    let text = err_text(&cur, None, b, opts);
    assert!(
        text.contains("no model named `int4`") && text.contains("fp32, int8"),
        "{text}"
    );
}

#[test]
fn baseline_model_is_matched_by_name() {
    let base = report(vec![
        model("int8", 1000, samples(6.0, 0.05, 20)),
        model("fp32", 4000, samples(10.0, 0.05, 20)),
    ]);
    let cur = report(vec![model("int8", 1050, samples(6.0, 0.05, 20))]);
    let b = Budgets {
        max_size_increase_pct: Some(10.0),
        ..Default::default()
    };
    let out = run(&cur, Some(&base), b.clone());
    assert_eq!(out.baseline_model.as_deref(), Some("int8"));
    assert!(out.warnings.is_empty());
    let renamed = report(vec![model("int8_v2", 1050, samples(6.0, 0.05, 20))]);
    let out = run(&renamed, Some(&base), b);
    assert_eq!(out.baseline_model.as_deref(), Some("fp32"));
    assert_eq!(out.warnings.len(), 1);
}

#[test]
fn values_are_formatted_by_unit() {
    assert_eq!(
        format_value("size_bytes", 5_242_880.0),
        "5242880 B (5.00 MiB)"
    );
    assert_eq!(format_value("peak_rss_bytes", 2048.0), "2048 B (2.0 KiB)");
    assert_eq!(format_value("latency_p50_ms", 1.23456), "1.235 ms");
    assert_eq!(format_value("size_increase_pct", 3.0), "+3.00%");
    assert_eq!(format_value("top1_drop_pts", 1.5), "1.50 pts");
    assert_eq!(format_value("top1", 0.7512), "75.12%");
}
