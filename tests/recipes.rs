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
