//! Numerical faults through the real binary: NaN and infinite values in datasets and
//! weights, all-zero calibration data, constant activations. Each ends in a message — an
//! error naming where, or a warning with a usable model — never in a model holding NaN.

use std::io::Write;

use shrink::onnx::{Data, Model};

use crate::bench::fixture;
use crate::util::{Dir, Output};

fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: String = shape.iter().map(|d| format!("{d}, ")).collect();
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    while !(dict.len() + 11).is_multiple_of(64) {
        dict.push(' ');
    }
    dict.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    b.extend_from_slice(dict.as_bytes());
    b.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    b
}

fn npy_i64(data: &[i64]) -> Vec<u8> {
    let mut dict = format!(
        "{{'descr': '<i8', 'fortran_order': False, 'shape': ({}, ), }}",
        data.len()
    );
    while !(dict.len() + 11).is_multiple_of(64) {
        dict.push(' ');
    }
    dict.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    b.extend_from_slice(dict.as_bytes());
    b.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    b
}

/// An .npz of `n` 1x28x28 digits, every pixel `fill`, with `poison` written at flat index
/// `at` of sample `sample`.
fn digits(d: &Dir, name: &str, n: usize, fill: f32, poison: Option<(usize, usize, f32)>) -> String {
    let mut x = vec![fill; n * 784];
    if let Some((sample, at, v)) = poison {
        x[sample * 784 + at] = v;
    }
    let y: Vec<i64> = (0..n as i64).map(|i| i % 10).collect();
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    w.start_file("x.npy", opts).unwrap();
    w.write_all(&npy_f32(&[n, 1, 28, 28], &x)).unwrap();
    w.start_file("y.npy", opts).unwrap();
    w.write_all(&npy_i64(&y)).unwrap();
    let path = d.path(name);
    std::fs::write(&path, w.finish().unwrap().into_inner()).unwrap();
    path.display().to_string()
}

fn train(d: &Dir, data: &str, out: &str, extra: &[&str]) -> Output {
    let teacher = fixture("teacher.onnx");
    let student = fixture("student.onnx");
    let mut args = vec![
        "distill",
        "--teacher",
        &teacher,
        "--student",
        &student,
        "--data",
        data,
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    d.run(&args)
}

fn quantize(d: &Dir, model: &str, calib: &str, out: &str) -> Output {
    d.run(&[
        "quantize",
        model,
        "--calib",
        calib,
        "--out",
        out,
        "--threads",
        "1",
        "--quiet",
    ])
}

/// Every float initializer of a model is finite.
fn assert_finite_model(path: &std::path::Path) {
    let m = Model::load(path).unwrap();
    for (name, t) in &m.graph.initializers {
        let bad = match &t.data {
            Data::F32(v) => v.iter().any(|x| !x.is_finite()),
            Data::F64(v) => v.iter().any(|x| !x.is_finite()),
            _ => false,
        };
        assert!(
            !bad,
            "{} holds a non-finite value in `{name}`",
            path.display()
        );
    }
}

#[test]
fn nan_or_inf_in_training_data_names_the_sample() {
    let d = Dir::new();
    let nan = digits(&d, "nan.npz", 40, 0.5, Some((17, 300, f32::NAN)));
    let out = train(&d, &nan, "s.onnx", &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("sample 17 of"), "{}", out.stderr);
    assert!(out.stderr.contains("contains NaN"), "{}", out.stderr);
    let inf = digits(&d, "inf.npz", 40, 0.5, Some((3, 0, f32::NEG_INFINITY)));
    let out = train(&d, &inf, "s.onnx", &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("sample 3 of"), "{}", out.stderr);
    assert!(out.stderr.contains("contains -inf"), "{}", out.stderr);
    // Validation data is checked too.
    let ok = digits(&d, "ok.npz", 40, 0.5, None);
    let out = train(&d, &ok, "s.onnx", &["--val", &nan]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("contains NaN"), "{}", out.stderr);
    assert!(!d.path("s.onnx").exists());
}

#[test]
fn nan_loss_from_a_nan_teacher_stops_training_without_a_model() {
    let d = Dir::new();
    let mut teacher = Model::load(std::path::Path::new(&fixture("teacher.onnx"))).unwrap();
    // The classifier's bias: a NaN there reaches every logit (one in a conv weight can be
    // masked by a following ReLU, as max(NaN, 0) is 0).
    let b = teacher
        .graph
        .initializers
        .values_mut()
        .find(|t| matches!(t.data, Data::F32(_)) && t.dims == [10])
        .unwrap();
    if let Data::F32(v) = &mut b.data {
        v[4] = f32::NAN;
    }
    teacher.save(&d.path("nan_teacher.onnx")).unwrap();
    let data = digits(&d, "ok.npz", 40, 0.5, None);
    let out = d.run(&[
        "distill",
        "--teacher",
        "nan_teacher.onnx",
        "--student",
        &fixture("student.onnx"),
        "--data",
        &data,
        "--out",
        "s.onnx",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--quiet",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("NaN"), "{}", out.stderr);
    assert!(
        !d.path("s.onnx").exists(),
        "a model was written from NaN targets"
    );
}

#[test]
fn nan_in_calibration_data_is_refused() {
    let d = Dir::new();
    let calib = digits(&d, "nan.npz", 40, 0.5, Some((5, 9, f32::NAN)));
    let out = quantize(&d, &fixture("student_folded.onnx"), &calib, "q.onnx");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("contains NaN"), "{}", out.stderr);
    assert!(!d.path("q.onnx").exists());
}

#[test]
fn nan_weights_are_refused_by_quantize() {
    let d = Dir::new();
    let mut m = Model::load(std::path::Path::new(&fixture("student_folded.onnx"))).unwrap();
    let (name, w) = m
        .graph
        .initializers
        .iter_mut()
        .find(|(_, t)| matches!(t.data, Data::F32(_)) && t.dims.len() == 4)
        .unwrap();
    let name = name.clone();
    if let Data::F32(v) = &mut w.data {
        v[3] = f32::INFINITY;
    }
    m.save(&d.path("inf.onnx")).unwrap();
    let calib = digits(&d, "ok.npz", 40, 0.5, None);
    let out = quantize(&d, "inf.onnx", &calib, "q.onnx");
    assert_eq!(out.code, 2, "{}", out.stderr);
    // Weights are quantized before calibration, so the error names the weight tensor.
    assert!(
        out.stderr.contains(&format!("weights `{name}`"))
            && out.stderr.contains("weight element 3 is inf"),
        "the error names `{name}` or the activation: {}",
        out.stderr
    );
    assert!(!d.path("q.onnx").exists());
}

#[test]
fn all_zero_calibration_data_warns_and_keeps_scales_finite() {
    let d = Dir::new();
    let calib = digits(&d, "zeros.npz", 40, 0.0, None);
    let out = quantize(&d, &fixture("student_folded.onnx"), &calib, "q.onnx");
    assert_eq!(out.code, 0, "{}", out.stderr);
    // The input (and every activation downstream of it) is constant: each is named.
    assert!(
        out.stderr
            .contains("is constant (0) on every calibration sample"),
        "{}",
        out.stderr
    );
    assert_finite_model(&d.path("q.onnx"));
    // The model still runs.
    let bench = d.run(&[
        "bench",
        "q.onnx",
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--threads",
        "1",
    ]);
    assert_eq!(bench.code, 0, "{}", bench.stderr);
}

#[test]
fn constant_activation_warns_and_keeps_scales_finite() {
    // Every pixel 0.7: the input has zero range, the layers after it a single value each.
    let d = Dir::new();
    let calib = digits(&d, "flat.npz", 40, 0.7, None);
    let out = quantize(&d, &fixture("student_folded.onnx"), &calib, "q.onnx");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("is constant (0.7) on every calibration sample"),
        "{}",
        out.stderr
    );
    assert_finite_model(&d.path("q.onnx"));
}
