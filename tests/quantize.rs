//! `shrink quantize` through the real binary: the int8 model runs in ONNX Runtime and tract,
//! keeps the float model's accuracy, and bad input is refused.

use shrink::bench::report::BenchReport;

use crate::bench::fixture;
use crate::util::Dir;

fn quantize(d: &Dir, model: &str, out: &str, extra: &[&str]) -> crate::util::Output {
    let mut args = vec![
        "quantize",
        model,
        "--calib",
        &*Box::leak(fixture("digits_train.npz").into_boxed_str()),
        "--out",
        out,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    d.run(&args)
}

fn top1(d: &Dir, model: &str, backend: &str) -> f64 {
    top1_of(d, model, backend, &[])
}

fn top1_of(d: &Dir, model: &str, backend: &str, extra: &[&str]) -> f64 {
    let json = format!("{backend}.json");
    let data = fixture("digits_val.npz");
    let mut args = vec![
        "bench",
        model,
        "--backend",
        backend,
        "--data",
        &data,
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--threads",
        "1",
        "--json",
        &json,
    ];
    args.extend_from_slice(extra);
    let out = d.run(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    BenchReport::load(&d.path(&json)).unwrap().models[0]
        .accuracy
        .as_ref()
        .unwrap()
        .top1
}

#[test]
fn quantized_teacher_runs_in_ort_and_tract_without_losing_accuracy() {
    let d = Dir::new();
    let out = quantize(
        &d,
        &fixture("teacher.onnx"),
        "q.onnx",
        &["--report", "q.json"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let float = top1(&d, &fixture("teacher.onnx"), "ort");
    let ort = top1(&d, "q.onnx", "ort");
    let tract = top1(&d, "q.onnx", "tract");
    // 1000 validation digits: 0.5 points is five digits.
    assert!(
        float - ort <= 0.005,
        "ORT int8 top-1 {ort} vs float {float}"
    );
    assert!(
        float - tract <= 0.005,
        "tract int8 top-1 {tract} vs float {float}"
    );
    let r: serde_json::Value = serde_json::from_str(&d.read("q.json")).unwrap();
    assert_eq!(r["schema"], "shrink.quantize/1");
    assert!(
        r["size_ratio"].as_f64().unwrap() < 0.45,
        "{}",
        r["size_ratio"]
    );
    assert_eq!(r["layers"].as_array().unwrap().len(), 7);
    assert!(r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["weight_sqnr_db"].as_f64().unwrap() > 30.0));
    assert!(d.path("q.md").exists());
    // The graph really is int8: every Conv weight comes from an int8 initializer.
    let m = shrink::onnx::Model::load(&d.path("q.onnx")).unwrap();
    let int8 = m
        .graph
        .initializers
        .values()
        .filter(|t| matches!(t.data, shrink::onnx::Data::I8(_)))
        .count();
    assert_eq!(int8, 7);
    assert!(
        m.graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "QuantizeLinear")
            .count()
            >= 8
    );
    assert_eq!(m.opset, 17);
}

#[test]
fn every_calibration_method_and_format_option_produces_a_working_model() {
    // This checks that each option yields a valid model that still classifies; how much each
    // method loses is measured against ONNX Runtime's quantizer in fixtures/ort_quantize.py.
    let d = Dir::new();
    for (i, extra) in [
        vec!["--method", "minmax"],
        vec!["--method", "percentile", "--percentile", "99.9"],
        vec!["--method", "entropy"],
        vec!["--method", "mse", "--per-tensor"],
        vec!["--activation-type", "i8", "--no-bias-correction"],
        vec!["--target", "tensorrt"],
        vec!["--target", "tract"],
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("q{i}.onnx");
        let out = quantize(&d, &fixture("teacher.onnx"), &name, &extra);
        assert_eq!(out.code, 0, "{extra:?}: {}", out.stderr);
        let acc = top1(&d, &name, "ort");
        assert!(acc > 0.95, "{extra:?}: top-1 {acc}");
    }
}

#[test]
fn batchnorm_student_and_opset11_constant_weights_quantize_without_preparation() {
    let d = Dir::new();
    let out = quantize(
        &d,
        &fixture("student.onnx"),
        "s.onnx",
        &["--save-prepared", "prep.onnx"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let prep = shrink::onnx::Model::load(&d.path("prep.onnx")).unwrap();
    assert!(!prep
        .graph
        .nodes
        .iter()
        .any(|n| n.op_type == "BatchNormalization"));
    let out = quantize(
        &d,
        &fixture("teacher_opset11_constants.onnx"),
        "c.onnx",
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let m = shrink::onnx::Model::load(&d.path("c.onnx")).unwrap();
    // Per-channel DequantizeLinear needs opset 13.
    assert_eq!(m.opset, 13);
    let acc = top1(&d, "c.onnx", "ort");
    assert!(acc > 0.97, "{acc}");
}

#[test]
fn excluded_nodes_stay_float() {
    let d = Dir::new();
    let out = quantize(
        &d,
        &fixture("teacher.onnx"),
        "q.onnx",
        &["--exclude", "/fc/Gemm", "--exclude-op", "Add"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let m = shrink::onnx::Model::load(&d.path("q.onnx")).unwrap();
    let gemm = m.graph.nodes.iter().find(|n| n.op_type == "Gemm").unwrap();
    assert!(
        m.graph
            .initializers
            .get(&gemm.inputs[1])
            .is_some_and(|t| t.as_f32().is_some()),
        "Gemm weight was quantized"
    );
    let bad = quantize(
        &d,
        &fixture("teacher.onnx"),
        "x.onnx",
        &["--exclude", "/no/such/node"],
    );
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("/no/such/node"), "{}", bad.stderr);
    assert!(!d.path("x.onnx").exists());
}

#[test]
fn calibration_data_of_the_wrong_shape_is_refused() {
    let d = Dir::new();
    let out = d.run(&[
        "quantize",
        &fixture("mbv2_tiny.onnx"),
        "--calib",
        &fixture("digits_train.npz"),
        "--out",
        "q.onnx",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("digits_train.npz") && out.stderr.contains("[3, 32, 32]"),
        "{}",
        out.stderr
    );
    assert!(!d.path("q.onnx").exists());
}

#[test]
fn wide_teacher_is_under_027x_and_keeps_accuracy_in_ort() {
    let d = Dir::new();
    let out = quantize(
        &d,
        &fixture("teacher_wide.onnx"),
        "q.onnx",
        &["--report", "q.json"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let r: serde_json::Value = serde_json::from_str(&d.read("q.json")).unwrap();
    let ratio = r["size_ratio"].as_f64().unwrap();
    assert!(ratio <= 0.27, "size ratio {ratio}");
    let float = top1(&d, &fixture("teacher_wide.onnx"), "ort");
    let int8 = top1(&d, "q.onnx", "ort");
    assert!(float - int8 <= 0.003, "int8 {int8} vs float {float}");
}

#[test]
fn accuracy_aware_mode_returns_sensitive_layers_to_float_until_the_budget_holds() {
    let d = Dir::new();
    // Entropy ranges clip this teacher's early activations and cost about a point; the
    // search must win it back by keeping the most sensitive nodes in float.
    let out = quantize(
        &d,
        &fixture("teacher.onnx"),
        "q.onnx",
        &[
            "--method",
            "entropy",
            "--eval",
            &fixture("digits_val.npz"),
            "--max-accuracy-drop",
            "0.2",
            "--report",
            "q.json",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let r: serde_json::Value = serde_json::from_str(&d.read("q.json")).unwrap();
    let drop = r["accuracy_drop_pts"].as_f64().unwrap();
    assert!(drop <= 0.2, "drop {drop}");
    let kept = r["kept_float_for_accuracy"].as_array().unwrap();
    assert!(!kept.is_empty(), "{r}");
    let sens = r["sensitivity"].as_array().unwrap();
    assert_eq!(sens[0]["rank"], 1);
    assert!(sens
        .windows(2)
        .all(|w| w[0]["output_sqnr_db"].as_f64() <= w[1]["output_sqnr_db"].as_f64()));
    assert_eq!(sens[0]["node"], kept[0]);
}

#[test]
fn equalization_keeps_the_float_function() {
    let d = Dir::new();
    let out = d.run(&[
        "quantize",
        &fixture("teacher.onnx"),
        "--calib",
        &fixture("digits_train.npz"),
        "--out",
        "q.onnx",
        "--equalize",
        "--save-prepared",
        "eq.onnx",
        "--threads",
        "1",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("equalized 2 conv pairs"),
        "{}",
        out.stderr
    );
    let r = d.run(&[
        "bench",
        "eq.onnx",
        "--reference",
        &fixture("teacher.onnx"),
        "--data",
        &fixture("digits_val.npz"),
        "--iterations",
        "1",
        "--no-memory",
        "--json",
        "r.json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ag = BenchReport::load(&d.path("r.json")).unwrap().models[0]
        .agreement
        .clone()
        .unwrap();
    assert_eq!(ag.top1_agreement, 1.0);
    assert!(ag.max_abs_diff < 1e-4, "{}", ag.max_abs_diff);
}

#[test]
fn qoperator_format_runs_in_ort_and_tract() {
    let d = Dir::new();
    let out = quantize(
        &d,
        &fixture("teacher.onnx"),
        "q.onnx",
        &["--format", "qoperator", "--report", "q.json"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let m = shrink::onnx::Model::load(&d.path("q.onnx")).unwrap();
    // Six Convs, and the classifier Gemm as a 1x1 QLinearConv.
    assert_eq!(
        m.graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "QLinearConv")
            .count(),
        7
    );
    let float = top1(&d, &fixture("teacher.onnx"), "ort");
    for backend in ["ort", "tract"] {
        let acc = top1(&d, "q.onnx", backend);
        assert!(float - acc <= 0.005, "{backend}: {acc} vs float {float}");
    }
}

#[test]
fn fp16_teacher_is_half_the_size_and_keeps_accuracy_in_ort_and_tract() {
    let d = Dir::new();
    let teacher = fixture("teacher_wide.onnx");
    // No --calib: float16 conversion needs no calibration.
    let out = d.run(&[
        "quantize",
        &teacher,
        "--precision",
        "fp16",
        "--out",
        "h.onnx",
        "--eval",
        &fixture("digits_val.npz"),
        "--report",
        "h.json",
        "--threads",
        "1",
        // tract runs float16 through slow generic kernels on x86-64; ORT is quick here, and
        // tract is checked below on part of the data.
        "--calib-backend",
        "ort",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let r: serde_json::Value = serde_json::from_str(&d.read("h.json")).unwrap();
    let ratio = r["size_ratio"].as_f64().unwrap();
    assert!(ratio < 0.55, "size ratio {ratio}");
    assert!(r["keep_io_types"].as_bool().unwrap());
    // Outputs compared on the --eval data when no --calib is given.
    assert!(r["compared_samples"].as_u64().unwrap() > 0);
    let diff = r["output_max_abs_diff"].as_f64().unwrap();
    let scale = r["output_max_abs"].as_f64().unwrap();
    assert!(diff > 0.0 && diff < 1e-2 * scale, "diff {diff} of {scale}");
    let float = top1(&d, &teacher, "ort");
    let half = top1(&d, "h.onnx", "ort");
    assert!(float - half <= 0.002, "ort: fp16 {half} vs float {float}");
    let limit = ["--limit", "200"];
    let float = top1_of(&d, &teacher, "tract", &limit);
    let half = top1_of(&d, "h.onnx", "tract", &limit);
    assert!(float - half <= 0.005, "tract: fp16 {half} vs float {float}");
    // The model's own inputs and outputs stay float32.
    let m = shrink::onnx::Model::load(&d.path("h.onnx")).unwrap();
    let f32_code = shrink::onnx::proto::tensor_proto::DataType::Float as i32;
    assert!(m
        .graph
        .inputs
        .iter()
        .chain(&m.graph.outputs)
        .all(|v| v.elem_type == f32_code));
}

#[test]
fn fp16_io_makes_inputs_and_outputs_float16_and_int8_options_are_refused() {
    let d = Dir::new();
    let teacher = fixture("teacher.onnx");
    let out = d.run(&[
        "quantize",
        &teacher,
        "--precision",
        "fp16",
        "--fp16-io",
        "--out",
        "h.onnx",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let m = shrink::onnx::Model::load(&d.path("h.onnx")).unwrap();
    let f16_code = shrink::onnx::proto::tensor_proto::DataType::Float16 as i32;
    assert!(m
        .graph
        .inputs
        .iter()
        .chain(&m.graph.outputs)
        .all(|v| v.elem_type == f16_code));

    let out = d.run(&[
        "quantize",
        &teacher,
        "--precision",
        "fp16",
        "--per-tensor",
        "--out",
        "x.onnx",
    ]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("--per-tensor applies to int8"),
        "{}",
        out.stderr
    );
    let out = d.run(&["quantize", &teacher, "--out", "x.onnx"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("needs calibration data"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--precision fp16"), "{}", out.stderr);
    assert!(!d.path("x.onnx").exists());
}

#[test]
fn tensorrt_target_writes_symmetric_int8_without_int32_biases_and_refuses_qoperator() {
    let d = Dir::new();
    let out = quantize(
        &d,
        &fixture("teacher.onnx"),
        "t.onnx",
        &["--target", "tensorrt", "--report", "t.json"],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let m = shrink::onnx::Model::load(&d.path("t.onnx")).unwrap();
    let g = &m.graph;
    assert!(g.initializers.values().all(|t| !matches!(
        t.data,
        shrink::onnx::Data::I32(_) | shrink::onnx::Data::U8(_)
    )));
    let r: serde_json::Value = serde_json::from_str(&d.read("t.json")).unwrap();
    assert!(r["activations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["zero_point"] == 0));
    assert!(r["target_rules"]
        .to_string()
        .contains("inputs of quantized ops only"));

    let out = quantize(
        &d,
        &fixture("teacher.onnx"),
        "x.onnx",
        &["--target", "tensorrt", "--format", "qoperator"],
    );
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("reads QDQ models only"),
        "{}",
        out.stderr
    );
    assert!(!d.path("x.onnx").exists());
}
