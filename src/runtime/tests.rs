//! Both backends against ONNX Runtime's Python outputs stored in the fixtures.

use std::path::PathBuf;

use super::*;
use crate::data::npy::read_npz_array;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn run_fixture(model: &str, backend: BackendKind, input: &str, reference: &str) -> f32 {
    let bytes = std::fs::read(fixture(model)).unwrap();
    let (shape, x) = read_npz_array(&fixture("reference_outputs.npz"), input)
        .or_else(|_| read_npz_array(&fixture("digits_small_f32.npz"), input))
        .unwrap();
    let (_, want) = read_npz_array(&fixture("reference_outputs.npz"), reference).unwrap();
    let opts = RuntimeOptions {
        backend,
        threads: 1,
        ..Default::default()
    };
    let mut s = open(&bytes, &shape, &opts).unwrap();
    let out = s.run(&x).unwrap();
    max_abs_diff(&out[0].data, &want)
}

// Python onnxruntime produced the references with the same library build and one thread;
// ort through our binding must agree to the bit.
#[test]
fn ort_matches_python_onnxruntime_exactly() {
    for (model, input, reference) in [
        ("teacher.onnx", "x", "teacher"),
        ("student.onnx", "x", "student"),
        ("student_folded.onnx", "x", "student_folded"),
        (
            "teacher_opset11_constants.onnx",
            "x",
            "teacher_opset11_constants",
        ),
        ("mbv2_tiny.onnx", "mbv2_input", "mbv2_tiny"),
    ] {
        let d = run_fixture(model, BackendKind::Ort, input, reference);
        assert_eq!(
            d, 0.0,
            "{model}: ort differs from Python onnxruntime by {d}"
        );
    }
}

// tract has its own kernels (different summation order); 1e-4 absolute on logits.
#[test]
fn tract_matches_python_onnxruntime() {
    for (model, input, reference) in [
        ("teacher.onnx", "x", "teacher"),
        ("student.onnx", "x", "student"),
        ("student_folded.onnx", "x", "student_folded"),
        (
            "teacher_opset11_constants.onnx",
            "x",
            "teacher_opset11_constants",
        ),
        ("mbv2_tiny.onnx", "mbv2_input", "mbv2_tiny"),
    ] {
        let d = run_fixture(model, BackendKind::Tract, input, reference);
        assert!(
            d < 1e-4,
            "{model}: tract differs from Python onnxruntime by {d}"
        );
    }
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        return; // Machines with a GPU run the device check instead.
    }
    let bytes = std::fs::read(fixture("student.onnx")).unwrap();
    let opts = RuntimeOptions {
        backend: BackendKind::Tract,
        device: Device::Cuda,
        threads: 1,
        ..Default::default()
    };
    let e = match open(&bytes, &[1, 1, 28, 28], &opts) {
        Ok(_) => panic!("CUDA opened without a GPU"),
        Err(e) => crate::hint::render(&e),
    };
    assert!(e.contains("CUDA"), "{e}");
}
