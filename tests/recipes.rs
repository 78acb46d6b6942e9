//! Recipes through the real binary: the README's quickstart, skipping unchanged stages, and
//! a failing gate's exit code.

use std::path::PathBuf;

use crate::util::Dir;

fn repo(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

#[test]
fn quickstart_recipe_distills_quantizes_benches_and_gates() {
    let d = Dir::new();
    let out = d.run(&["run", &repo("recipes/quickstart.yaml"), "--force"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let dir = PathBuf::from(repo("out/quickstart"));
    for f in ["distill.onnx", "quantize.onnx", "bench.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let r = shrink::bench::report::BenchReport::load(&dir.join("bench.json")).unwrap();
    let q = r.model(Some("quantize")).unwrap();
    assert!(q.accuracy.as_ref().unwrap().top1 > 0.9);
    assert!(out.stderr.contains("gate passed"), "{}", out.stderr);
    // Nothing changed: a second run skips every stage.
    let again = d.run(&["run", &repo("recipes/quickstart.yaml")]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains("0 ran, 4 unchanged"),
        "{}",
        again.stderr
    );
}

#[test]
fn a_failing_gate_exits_1_and_rerunning_does_not_retrain() {
    let d = Dir::new();
    let recipe = format!(
        "name: strict\noutput: out\ninputs:\n  teacher: {t}\n  student: {s}\ndatasets:\n  train: {{ path: {train}, limit: 512 }}\n  val: {{ path: {val}, limit: 200 }}\nstages:\n  distill:\n    teacher: ${{inputs.teacher}}\n    student: ${{inputs.student}}\n    data: ${{datasets.train}}\n    epochs: 1\n  bench:\n    models: [${{distill.out}}]\n    data: ${{datasets.val}}\n    iterations: 5\n  gate:\n    report: ${{bench.report}}\n    budgets: {{ min_top1: 0.999 }}\n",
        t = repo("fixtures/teacher.onnx"),
        s = repo("fixtures/student.onnx"),
        train = repo("fixtures/digits_train.npz"),
        val = repo("fixtures/digits_val.npz"),
    );
    d.write("strict.yaml", recipe);
    let out = d.run(&["run", "strict.yaml"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.contains("top1") && out.stdout.contains("FAIL"),
        "{}",
        out.stdout
    );
    let again = d.run(&["run", "strict.yaml"]);
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains("distill: unchanged"),
        "{}",
        again.stderr
    );
}

#[test]
fn an_fp16_quantize_stage_needs_no_calibration_and_feeds_bench() {
    let d = Dir::new();
    let recipe = format!(
        "name: half\noutput: out\ninputs:\n  teacher: {t}\ndatasets:\n  val: {{ path: {val}, limit: 100 }}\nstages:\n  quantize:\n    model: ${{inputs.teacher}}\n    precision: fp16\n    eval: ${{datasets.val}}\n    report: fp16.json\n  bench:\n    models: [${{quantize.out}}]\n    data: ${{datasets.val}}\n    iterations: 3\n  gate:\n    report: ${{bench.report}}\n    budgets: {{ max_size_bytes: 380000, min_top1: 0.97 }}\n",
        t = repo("fixtures/teacher_wide.onnx"),
        val = repo("fixtures/digits_val.npz"),
    );
    d.write("half.yaml", recipe);
    let out = d.run(&["run", "half.yaml"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let r: serde_json::Value = serde_json::from_str(&d.read("out/fp16.json")).unwrap();
    assert!(r["size_ratio"].as_f64().unwrap() < 0.55, "{r}");
    assert!(r["accuracy_drop_pts"].as_f64().unwrap() <= 0.2, "{r}");

    // fp16_io belongs to fp16 only: an int8 stage with it is refused before anything runs.
    let bad = d.read("half.yaml").replace(
        "precision: fp16",
        "fp16_io: true\n    calibration: { data: ${datasets.val} }",
    );
    d.write("bad.yaml", bad);
    let out = d.run(&["run", "bad.yaml", "--force"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("fp16_io"), "{}", out.stderr);
}
