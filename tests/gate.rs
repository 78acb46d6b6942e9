//! `shrink gate` through the real binary: exit codes, outputs and baseline updates.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shrink::bench::report::{
    Accuracy, BenchReport, Latency, ModelReport, Ratios, Settings, SCHEMA,
};

use crate::util::{check_xml, Dir, Output};

fn settings() -> Settings {
    Settings {
        backend: "tract".into(),
        device: "cpu".into(),
        provider: "tract-cpu".into(),
        target: "host".into(),
        threads: 4,
        batch_size: 1,
        warmup: 10,
        iterations: 40,
        cpu_model: "Test CPU @ 3.0GHz".into(),
        cpu_cores: 8,
        os: "linux".into(),
        arch: "x86_64".into(),
        versions: [("tract".to_string(), "0.23.9".to_string())].into(),
    }
}

/// Latencies like a shared CI runner's: lognormal around `median_ms` with `jitter` (the sigma
/// of the log, 0.2 ≈ 20%), plus every tenth iteration a 3× outlier (a preempted thread).
fn noisy_samples(seed: u64, median_ms: f64, jitter: f64, n: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            // Box–Muller; 1 − u keeps the logarithm's argument in (0, 1].
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let v = median_ms * (jitter * z).exp();
            if i % 10 == 7 {
                v * 3.0
            } else {
                v
            }
        })
        .collect()
}

fn model(name: &str, size_bytes: u64, top1: f64, samples: Vec<f64>) -> ModelReport {
    let latency_ms = Latency::from_samples(samples);
    ModelReport {
        name: name.into(),
        path: format!("models/{name}.onnx"),
        size_bytes,
        weight_bytes: size_bytes - 4096,
        params: (size_bytes - 4096) / 4,
        peak_rss_bytes: Some(150 << 20),
        gpu_memory_bytes: None,
        session_create_ms: 35.0,
        cold_start_ms: 18.0,
        throughput_per_s: 1000.0 / latency_ms.mean,
        latency_ms,
        accuracy: Some(Accuracy {
            data: "data/val".into(),
            samples: 500,
            top1,
            top5: 0.95,
        }),
        agreement: None,
        ratios: Ratios {
            latency_p50: 1.0,
            size: 1.0,
        },
    }
}

fn report(model: ModelReport) -> BenchReport {
    BenchReport {
        schema: SCHEMA.into(),
        shrink_version: "0.1.0".into(),
        created_unix: 1_750_000_000,
        settings: settings(),
        models: vec![model],
    }
}

/// A steady report: 40 samples around `median_ms` with 3% jitter.
fn steady(seed: u64, size_bytes: u64, top1: f64, median_ms: f64) -> BenchReport {
    report(model(
        "mobilenet_int8",
        size_bytes,
        top1,
        noisy_samples(seed, median_ms, 0.03, 40),
    ))
}

fn write_report(dir: &Dir, name: &str, r: &BenchReport) {
    dir.write(name, r.to_json());
}

/// Names of the checks whose table row says FAIL.
fn failed_checks(out: &Output) -> Vec<String> {
    out.stdout
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().any(|w| w == "FAIL"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

const ALL_PASSING: &str = "\
# every limit the current report meets
max_size_bytes: 3000000
max_latency_p50_ms: 12
max_latency_p95_ms: 40
max_peak_rss_bytes: 200000000
min_top1: 0.70
max_size_increase_pct: 5
max_latency_regression_pct: 10
max_top1_drop_pts: 1.0
";

/// Baseline and current reports that meet every limit of [`ALL_PASSING`].
fn passing_pair(dir: &Dir) {
    write_report(dir, "base.json", &steady(1, 2_500_000, 0.72, 10.0));
    write_report(dir, "cur.json", &steady(2, 2_550_000, 0.715, 10.1));
}

#[test]
fn all_budgets_pass() {
    let dir = Dir::new();
    passing_pair(&dir);
    dir.write("budget.yaml", ALL_PASSING);
    let out = dir.run(&[
        "gate",
        "cur.json",
        "--baseline",
        "base.json",
        "--budget",
        "budget.yaml",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let rows: Vec<_> = out.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 8, "{}", out.stdout);
    assert!(rows.iter().all(|r| r.contains("PASS")), "{}", out.stdout);
    assert!(out.stderr.contains("gate passed"), "{}", out.stderr);
}

#[test]
fn each_budget_violated_in_turn_fails_naming_the_check() {
    let dir = Dir::new();
    passing_pair(&dir);
    // One key tightened below what the current report measures, the rest left passing.
    let violations = [
        ("max_size_bytes", "2549999", "size_bytes"),
        ("max_latency_p50_ms", "5", "latency_p50_ms"),
        ("max_latency_p95_ms", "5", "latency_p95_ms"),
        ("max_peak_rss_bytes", "100000000", "peak_rss_bytes"),
        ("min_top1", "0.8", "top1"),
        ("max_size_increase_pct", "1.5", "size_increase_pct"),
        ("max_latency_regression_pct", "0", "latency_regression_pct"),
        ("max_top1_drop_pts", "0.2", "top1_drop_pts"),
    ];
    for (key, value, check) in violations {
        let budget: String = ALL_PASSING
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key}:")) {
                    format!("{key}: {value}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        dir.write("budget.yaml", &budget);
        let out = dir.run(&[
            "gate",
            "cur.json",
            "--baseline",
            "base.json",
            "--budget",
            "budget.yaml",
        ]);
        assert_eq!(out.code, 1, "{key}: {out:?}");
        assert_eq!(failed_checks(&out), [check], "{key}: {}", out.stdout);
        assert!(out.stderr.contains("gate failed"), "{}", out.stderr);
    }
}

fn regression_budget(dir: &Dir) {
    dir.write("budget.yaml", "max_latency_regression_pct: 5\n");
}

fn gate_json(dir: &Dir) -> (Output, serde_json::Value) {
    let out = dir.run(&[
        "gate",
        "cur.json",
        "--baseline",
        "base.json",
        "--budget",
        "budget.yaml",
        "--json",
    ]);
    let v = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"));
    (out, v)
}

#[test]
fn noisy_but_not_regressed_pair_passes() {
    // Both reports drawn from the same distribution (20% lognormal jitter, 3× outliers). With
    // these seeds the current median happens to be more than 5% above the baseline's, which
    // a comparison of two medians would call a regression; the rank test does not.
    let dir = Dir::new();
    let base = report(model("m", 1_000_000, 0.7, noisy_samples(11, 10.0, 0.2, 30)));
    let cur = report(model("m", 1_000_000, 0.7, noisy_samples(7, 10.0, 0.2, 30)));
    write_report(&dir, "base.json", &base);
    write_report(&dir, "cur.json", &cur);
    regression_budget(&dir);
    let (out, v) = gate_json(&dir);
    assert_eq!(out.code, 0, "{out:?}");
    let check = &v["checks"][0];
    assert_eq!(check["name"], "latency_regression_pct");
    assert_eq!(check["verdict"], "pass");
    let ratio = check["significance"]["ratio"].as_f64().unwrap();
    assert!(
        ratio > 1.05,
        "the seeds must give a median above the threshold: {ratio}"
    );
    assert_eq!(check["significance"]["rule"], "not_significant", "{check}");
    assert!(check["significance"]["p_value"].as_f64().unwrap() >= 0.05);
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("exceeds threshold but not significant"),
        "{check}"
    );
}

#[test]
fn truly_regressed_pair_fails() {
    let dir = Dir::new();
    let base = report(model(
        "m",
        1_000_000,
        0.7,
        noisy_samples(21, 10.0, 0.05, 30),
    ));
    let cur = report(model(
        "m",
        1_000_000,
        0.7,
        noisy_samples(22, 13.0, 0.05, 30),
    ));
    write_report(&dir, "base.json", &base);
    write_report(&dir, "cur.json", &cur);
    regression_budget(&dir);
    let (out, v) = gate_json(&dir);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(v["passed"], false);
    let check = &v["checks"][0];
    assert_eq!(check["verdict"], "fail");
    assert_eq!(check["significance"]["rule"], "significant_regression");
    let low = check["significance"]["ci_low"].as_f64().unwrap();
    assert!(low > 1.05, "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("significant regression"),
        "{check}"
    );
}

#[test]
fn mismatched_settings_exit_2_naming_the_field() {
    let dir = Dir::new();
    passing_pair(&dir);
    let mut cur = steady(2, 2_550_000, 0.715, 10.1);
    cur.settings.threads = 8;
    write_report(&dir, "cur.json", &cur);
    dir.write("budget.yaml", ALL_PASSING);
    let args = [
        "gate",
        "cur.json",
        "--baseline",
        "base.json",
        "--budget",
        "budget.yaml",
    ];
    let out = dir.run(&args);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("threads: baseline `4`, current `8`"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("hint:") && out.stderr.contains("--allow-mismatch"));
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    let mut with_flag = args.to_vec();
    with_flag.push("--allow-mismatch");
    let out = dir.run(&with_flag);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out
        .stderr
        .contains("warning: comparing reports measured with different settings"));
    assert!(out.stderr.contains("threads"), "{}", out.stderr);
}

#[test]
fn misspelt_budget_key_exits_2_naming_key_and_line() {
    let dir = Dir::new();
    passing_pair(&dir);
    dir.write("budget.yaml", "min_top1: 0.7\nmax_sise_bytes: 100\n");
    let out = dir.run(&["gate", "cur.json", "--budget", "budget.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("budget.yaml:2:"), "{}", out.stderr);
    assert!(out.stderr.contains("max_sise_bytes"), "{}", out.stderr);
    assert!(
        out.stderr.contains("did you mean `max_size_bytes`?"),
        "{}",
        out.stderr
    );
}

#[test]
fn missing_report_exits_2() {
    let dir = Dir::new();
    dir.write("budget.yaml", ALL_PASSING);
    let out = dir.run(&["gate", "nope.json", "--budget", "budget.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: cannot read bench report nope.json"),
        "{}",
        out.stderr
    );
}

#[test]
fn junit_file_is_written_and_well_formed() {
    let dir = Dir::new();
    passing_pair(&dir);
    // Fails two checks so both kinds of test case appear.
    dir.write(
        "budget.yaml",
        "max_size_bytes: 1000\nmin_top1: 0.9\nmax_latency_p95_ms: 40\n",
    );
    let out = dir.run(&[
        "gate",
        "cur.json",
        "--budget",
        "budget.yaml",
        "--junit",
        "out/junit.xml",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    let xml = dir.read("out/junit.xml");
    let names = check_xml(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    assert_eq!(names[0], "testsuites");
    assert_eq!(names.iter().filter(|n| *n == "testsuite").count(), 1);
    assert_eq!(names.iter().filter(|n| *n == "testcase").count(), 3);
    assert_eq!(names.iter().filter(|n| *n == "failure").count(), 2);
    assert!(xml.contains("<testsuite name=\"shrink.gate\" tests=\"3\" failures=\"2\""));
    assert!(xml.contains("name=\"size_bytes\""), "{xml}");
    assert!(
        xml.contains("&lt;") || xml.contains("&gt;") || xml.contains("≤"),
        "{xml}"
    );
}

#[test]
fn ci_outputs_annotations_markdown_and_step_summary() {
    let dir = Dir::new();
    passing_pair(&dir);
    dir.write("budget.yaml", "max_size_bytes: 1000\nmin_top1: 0.7\n");
    dir.write("summary.md", "earlier step\n");
    let summary = dir.path("summary.md");
    let out = dir.run_env(
        &[
            "gate",
            "cur.json",
            "--budget",
            "budget.yaml",
            "--markdown",
            "pr.md",
        ],
        &[
            ("GITHUB_ACTIONS", "true"),
            ("GITHUB_STEP_SUMMARY", summary.to_str().unwrap()),
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("::error title=shrink gate::size_bytes failed"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("::notice title=shrink gate::top1 passed"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("::error"),
        "stdout stays data-only: {}",
        out.stdout
    );
    let pr = dir.read("pr.md");
    assert!(pr.contains("❌ shrink gate failed"), "{pr}");
    assert!(
        pr.contains("| ❌ | `size_bytes` |") && pr.contains("| ✅ | `top1` |"),
        "{pr}"
    );
    let step = dir.read("summary.md");
    assert!(
        step.starts_with("earlier step\n"),
        "appended, not replaced: {step}"
    );
    assert!(step.contains(&pr), "{step}");
}

#[test]
fn update_baseline_only_on_pass_unless_forced() {
    let dir = Dir::new();
    passing_pair(&dir);
    let old_base = dir.read("base.json");
    let cur = dir.read("cur.json");
    let gate = |budget: &str, extra: &[&str]| {
        dir.write("budget.yaml", budget);
        let mut args = vec![
            "gate",
            "cur.json",
            "--baseline",
            "base.json",
            "--budget",
            "budget.yaml",
            "--update-baseline",
        ];
        args.extend_from_slice(extra);
        dir.run(&args)
    };

    let out = gate("max_size_increase_pct: 1\n", &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("not updated"), "{}", out.stderr);
    assert_eq!(dir.read("base.json"), old_base);

    let out = gate("max_size_increase_pct: 1\n", &["--force"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("updated baseline"), "{}", out.stderr);
    assert_eq!(dir.read("base.json"), cur);

    dir.write("base.json", &old_base);
    let out = gate("max_size_increase_pct: 5\n", &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("updated baseline"), "{}", out.stderr);
    assert_eq!(dir.read("base.json"), cur);
    let leftovers: Vec<_> = std::fs::read_dir(dir.root())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".shrink-tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn update_baseline_requires_baseline() {
    let dir = Dir::new();
    passing_pair(&dir);
    dir.write("budget.yaml", "max_size_bytes: 3000000\n");
    let out = dir.run(&[
        "gate",
        "cur.json",
        "--budget",
        "budget.yaml",
        "--update-baseline",
    ]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--baseline"), "{}", out.stderr);
}

#[test]
fn relative_budget_without_baseline_exits_2() {
    let dir = Dir::new();
    passing_pair(&dir);
    dir.write("budget.yaml", "max_top1_drop_pts: 1\n");
    let out = dir.run(&["gate", "cur.json", "--budget", "budget.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("max_top1_drop_pts"), "{}", out.stderr);
    assert!(
        out.stderr.contains("hint: pass --baseline"),
        "{}",
        out.stderr
    );
}

#[test]
fn missing_accuracy_exits_2_saying_what_to_add() {
    let dir = Dir::new();
    let mut cur = steady(2, 2_550_000, 0.715, 10.1);
    cur.models[0].accuracy = None;
    write_report(&dir, "cur.json", &cur);
    dir.write("budget.yaml", "min_top1: 0.7\n");
    let out = dir.run(&["gate", "cur.json", "--budget", "budget.yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--data"), "{}", out.stderr);
}
