//! `shrink inspect` and `shrink bench` through the real binary, including bad input.

use std::path::PathBuf;

use shrink::bench::report::BenchReport;

use crate::util::Dir;

pub fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn inspect_reports_ops_params_macs_and_backends() {
    let d = Dir::new();
    let out = d.run(&["inspect", &fixture("student.onnx"), "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["op_histogram"]["BatchNormalization"], 2);
    assert_eq!(v["params"], 9170);
    assert_eq!(v["macs"], 28 * 28 * 8 * 9 + 14 * 14 * 16 * 72 + 10 * 784);
    assert_eq!(
        v["inputs"][0]["shape"],
        serde_json::json!(["batch", "1", "28", "28"])
    );
    let backends = v["backends"].as_array().unwrap();
    assert!(backends.iter().all(|b| b["runs"] == true), "{backends:?}");
    let text = d.run(&["inspect", &fixture("teacher_opset11_constants.onnx")]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("opset 11"), "{}", text.stdout);
    // Weights held in Constant nodes count as parameters.
    assert!(
        text.stdout.contains("parameters: 19.6 k"),
        "{}",
        text.stdout
    );
}

#[test]
fn bench_two_models_interleaved_with_accuracy_and_reports() {
    let d = Dir::new();
    let out = d.run(&[
        "bench",
        &fixture("teacher.onnx"),
        &format!("small={}", fixture("student_folded.onnx")),
        "--data",
        &fixture("digits_val.npz"),
        "--limit",
        "256",
        "--reference",
        &fixture("teacher.onnx"),
        "--threads",
        "1",
        "--warmup",
        "2",
        "--iterations",
        "20",
        "--json",
        "r.json",
        "--html",
        "r.html",
        "--markdown",
        "r.md",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let r = BenchReport::load(&d.path("r.json")).unwrap();
    assert_eq!(r.settings.threads, 1);
    assert_eq!(r.settings.provider, "tract-cpu");
    assert_eq!(r.models.len(), 2);
    let (t, s) = (&r.models[0], &r.models[1]);
    assert_eq!(s.name, "small");
    assert_eq!(t.latency_ms.samples.len(), 20);
    assert_eq!(s.latency_ms.samples.len(), 20);
    let acc = t.accuracy.as_ref().unwrap();
    assert_eq!(acc.samples, 256);
    assert!(acc.top1 > 0.95, "teacher top-1 {}", acc.top1);
    assert!(acc.top5 >= acc.top1);
    // The untrained student is near chance; the teacher agrees with itself exactly.
    assert!(s.accuracy.as_ref().unwrap().top1 < 0.3);
    let ag = t.agreement.as_ref().unwrap();
    assert_eq!(ag.top1_agreement, 1.0);
    assert_eq!(ag.max_abs_diff, 0.0);
    assert!(t.peak_rss_bytes.unwrap() > 1 << 20);
    assert_eq!(t.ratios.latency_p50, 1.0);
    assert!((s.ratios.size - s.size_bytes as f64 / t.size_bytes as f64).abs() < 1e-12);
    assert!(t.latency_ms.p50 <= t.latency_ms.p99 && t.latency_ms.min <= t.latency_ms.p50);
    let html = d.read("r.html");
    assert!(html.contains("<svg") && html.contains("latency distribution of small"));
    assert!(d.read("r.md").contains("| small |"));
    assert!(out.stdout.contains("| teacher |"), "{}", out.stdout);
}

#[test]
fn bench_ort_matches_tract_accuracy() {
    let d = Dir::new();
    let run = |backend: &str, file: &str| {
        let out = d.run(&[
            "bench",
            &fixture("teacher.onnx"),
            "--backend",
            backend,
            "--data",
            &fixture("digits_idx"),
            "--threads",
            "1",
            "--iterations",
            "3",
            "--warmup",
            "1",
            "--no-memory",
            "--json",
            file,
        ]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        BenchReport::load(&d.path(file)).unwrap()
    };
    let t = run("tract", "t.json");
    let o = run("ort", "o.json");
    assert_eq!(o.settings.provider, "CPUExecutionProvider");
    assert_eq!(o.settings.versions["onnxruntime"], "1.31.1");
    let (ta, oa) = (
        t.models[0].accuracy.as_ref().unwrap(),
        o.models[0].accuracy.as_ref().unwrap(),
    );
    assert_eq!(ta.samples, 100);
    assert_eq!(ta.top1, oa.top1);
}

#[test]
fn bench_reads_image_folders() {
    let d = Dir::new();
    let out = d.run(&[
        "bench",
        &fixture("teacher.onnx"),
        "--data",
        &fixture("digits_png"),
        "--iterations",
        "2",
        "--warmup",
        "0",
        "--no-memory",
        "--json",
        "r.json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let r = BenchReport::load(&d.path("r.json")).unwrap();
    let a = r.models[0].accuracy.as_ref().unwrap();
    assert_eq!(a.samples, 30);
    assert!(a.top1 > 0.9, "{}", a.top1);
}

#[test]
fn mobile_target_is_single_threaded_tract() {
    let d = Dir::new();
    let out = d.run(&[
        "bench",
        &fixture("student.onnx"),
        "--target",
        "mobile",
        "--iterations",
        "3",
        "--no-memory",
        "--json",
        "r.json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("target mobile"), "{}", out.stderr);
    let r = BenchReport::load(&d.path("r.json")).unwrap();
    assert_eq!(
        (r.settings.threads, r.settings.target.as_str()),
        (1, "mobile")
    );
    let bad = d.run(&[
        "bench",
        &fixture("student.onnx"),
        "--target",
        "mobile",
        "--backend",
        "ort",
    ]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("--target mobile"), "{}", bad.stderr);
}

fn assert_error(out: &crate::util::Output, needles: &[&str]) {
    assert_eq!(
        out.code, 2,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
    for n in needles {
        assert!(out.stderr.contains(n), "expected {n:?} in:\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn truncated_model_is_a_clear_error() {
    let d = Dir::new();
    let bytes = std::fs::read(fixture("teacher.onnx")).unwrap();
    d.write("cut.onnx", &bytes[..bytes.len() / 2]);
    let out = d.run(&["inspect", "cut.onnx"]);
    assert_error(&out, &["cut.onnx", "not a valid ONNX model", "hint:"]);
    let out = d.run(&["bench", "cut.onnx"]);
    assert_error(&out, &["cut.onnx"]);
}

#[test]
fn non_onnx_and_missing_files_are_clear_errors() {
    let d = Dir::new();
    d.write(
        "notes.onnx",
        "these are not the weights you are looking for",
    );
    assert_error(
        &d.run(&["inspect", "notes.onnx"]),
        &["notes.onnx", "not a valid ONNX model"],
    );
    assert_error(
        &d.run(&["bench", "missing.onnx"]),
        &["missing.onnx", "hint:"],
    );
}

/// A model with an op shrink does not know, written with our own protobuf types.
fn model_with_op(op: &str) -> Vec<u8> {
    use prost::Message;
    use shrink::onnx::proto::*;
    let vi = |name: &str| {
        ValueInfo {
            name: name.into(),
            elem_type: 1,
            shape: Some(vec![
                shrink::onnx::Dim::Fixed(1),
                shrink::onnx::Dim::Fixed(1),
                shrink::onnx::Dim::Fixed(4),
                shrink::onnx::Dim::Fixed(4),
            ]),
        }
        .to_proto()
    };
    use shrink::onnx::ValueInfo;
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "g".into(),
            node: vec![NodeProto {
                name: "weird_node".into(),
                op_type: op.into(),
                input: vec!["x".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn unsupported_op_names_the_node() {
    let d = Dir::new();
    d.write("odd.onnx", model_with_op("NonMaxSuppression"));
    assert_error(
        &d.run(&["inspect", "odd.onnx"]),
        &["NonMaxSuppression", "weird_node"],
    );
}

#[test]
fn missing_onnx_runtime_library_says_how_to_install_it() {
    let d = Dir::new();
    let out = d.run_env(
        &[
            "bench",
            &fixture("student.onnx"),
            "--backend",
            "ort",
            "--iterations",
            "1",
        ],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1")],
    );
    assert_error(&out, &["ORT_DYLIB_PATH", "pip install onnxruntime==1.31.1"]);
    let out = d.run(&[
        "bench",
        &fixture("student.onnx"),
        "--backend",
        "ort",
        "--ort-lib",
        &fixture("teacher.onnx"),
        "--iterations",
        "1",
    ]);
    assert_error(
        &out,
        &[
            "cannot load ONNX Runtime",
            "pip install onnxruntime==1.31.1",
        ],
    );
}

#[test]
fn unavailable_cuda_is_an_error_not_a_fallback() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        return; // This test is about machines without a GPU.
    }
    let d = Dir::new();
    for backend in ["tract", "ort"] {
        let out = d.run(&[
            "bench",
            &fixture("student.onnx"),
            "--backend",
            backend,
            "--device",
            "cuda",
            "--iterations",
            "1",
        ]);
        assert_error(&out, &["CUDA", "hint:"]);
    }
    let out = d.run(&[
        "bench",
        &fixture("student.onnx"),
        "--backend",
        "ort",
        "--device",
        "xnnpack",
        "--iterations",
        "1",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
}
