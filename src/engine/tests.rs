//! Engine checks against outside references: single-op models against ONNX Runtime
//! (forward) and PyTorch (gradients), whole fixture models against ONNX Runtime, and the
//! student's training-mode gradients against PyTorch. The numbers come from
//! `fixtures/ops/make_op_refs.py`.
//!
//! Tolerance everywhere: |got - want| <= 1e-4 + 1e-4 * |want|.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use super::{Mode, Net, Tensor};
use crate::onnx::{self, Model};

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(7)
}

#[track_caller]
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shapes differ");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        let excess = (g - w).abs() - (ATOL + RTOL * w.abs());
        if !(excess <= 0.0) && excess.max(f32::MAX * (g.is_nan() as u8 as f32)) >= worst.0 {
            worst = (excess.max(f32::MIN_POSITIVE), i);
        }
    }
    assert!(
        worst.0 == 0.0,
        "{what}: element {} is {} but the reference is {} (tolerance {ATOL} + {RTOL}*|ref|)",
        worst.1,
        got.data[worst.1],
        want.data[worst.1]
    );
}

fn tensor(v: &Value) -> Tensor {
    let shape = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let data = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect();
    Tensor::new(shape, data).expect("consistent reference tensor")
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, &c| (acc << 6) | val(c)) << (6 * (4 - chunk.len()));
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..chunk.len()]);
    }
    out
}

fn load_refs() -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("ops/refs.json")).expect("fixtures/ops/refs.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn case_model(case: &Value) -> Model {
    let proto = onnx::load::decode_model(&base64(case["model"].as_str().expect("model")))
        .expect("model decodes");
    Model::from_proto(proto).expect("model loads")
}

/// Runs one single-op case: forward against ONNX Runtime (or PyTorch for training mode),
/// gradients against PyTorch.
fn run_case(case: &Value) {
    let name = case["name"].as_str().expect("name");
    let model = case_model(case);
    let mut net = Net::from_model(&model).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let mode = if case["mode"] == "train" {
        Mode::Train
    } else {
        Mode::Eval
    };
    let inputs: Vec<(String, Tensor)> = case["inputs"]
        .as_object()
        .expect("inputs")
        .iter()
        .map(|(k, v)| (k.clone(), tensor(v)))
        .collect();
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let fwd = net
        .forward_inputs(&refs, mode, &mut rng())
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let (outputs, dys): (Vec<(String, Tensor)>, Vec<(String, Tensor)>) =
        if let Some(o) = case.get("outputs") {
            let outs = o
                .as_object()
                .expect("outputs")
                .iter()
                .map(|(k, v)| (k.clone(), tensor(v)))
                .collect();
            let dys = case["dys"]
                .as_object()
                .expect("dys")
                .iter()
                .map(|(k, v)| (k.clone(), tensor(v)))
                .collect();
            (outs, dys)
        } else {
            let dys = case
                .get("dy")
                .map(|d| vec![("y".to_string(), tensor(d))])
                .unwrap_or_default();
            (vec![("y".to_string(), tensor(&case["output"]))], dys)
        };
    for (o, want) in &outputs {
        let got = fwd
            .get(o)
            .unwrap_or_else(|| panic!("{name}: no output {o}"));
        assert_close(got, want, &format!("{name}: output {o}"));
    }
    if dys.is_empty() {
        return;
    }
    let seeds: Vec<(&str, &Tensor)> = dys.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let grads = net
        .backward_with_inputs(&fwd, &seeds)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let want = case["grads"].as_object().expect("grads");
    for (k, v) in want {
        let got = grads
            .input(k)
            .or_else(|| grads.get(k))
            .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
        assert_close(got, &tensor(v), &format!("{name}: gradient of {k}"));
    }
    // The engine must not invent gradients PyTorch does not have (BatchNorm statistics).
    for (k, _) in grads.iter() {
        assert!(want.contains_key(k), "{name}: unexpected gradient for {k}");
    }
    for stat in ["running_mean", "running_var"] {
        if let Some(v) = case.get(stat) {
            let key = if stat == "running_mean" {
                "mean"
            } else {
                "var"
            };
            assert_close(
                net.state().get(key).expect("state"),
                &tensor(v),
                &format!("{name}: {stat}"),
            );
        }
    }
}

#[test]
fn single_ops_match_onnxruntime_and_pytorch() {
    let refs = load_refs();
    assert_eq!(
        refs["tolerance"]["abs"].as_f64().map(|v| v as f32),
        Some(ATOL)
    );
    let cases = refs["cases"].as_array().expect("cases");
    assert!(cases.len() >= 60);
    for case in cases {
        run_case(case);
    }
}

#[test]
fn single_ops_match_with_two_threads() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let refs = load_refs();
    pool.install(|| {
        for case in refs["cases"].as_array().expect("cases") {
            run_case(case);
        }
    });
}

fn raw_f32(name: &str) -> Tensor {
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("ops/models.json")).expect("models.json"),
    )
    .expect("JSON");
    let e = &index[name];
    let bytes = std::fs::read(
        fixtures()
            .join("ops")
            .join(e["file"].as_str().expect("file")),
    )
    .expect("raw file");
    let data = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let shape = e["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    Tensor::new(shape, data).expect("raw tensor")
}

fn load(name: &str) -> Model {
    Model::load(&fixtures().join(name)).expect("fixture model")
}

#[test]
fn fixture_models_match_onnxruntime() {
    let digits = raw_f32("digits_small_x");
    for (file, key, input) in [
        ("student.onnx", "student", &digits),
        ("student_folded.onnx", "student_folded", &digits),
        ("teacher.onnx", "teacher", &digits),
        (
            "teacher_opset11_constants.onnx",
            "teacher_opset11_constants",
            &digits,
        ),
        ("mbv2_tiny.onnx", "mbv2_tiny", &raw_f32("mbv2_input")),
    ] {
        let mut net = Net::from_model(&load(file)).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let want = raw_f32(key);
        let fwd = net
            .forward(input, Mode::Eval, &mut rng())
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_close(fwd.output(), &want, file);
        // A smaller batch gets its own plan and the same numbers.
        let few = input.batch_slice(0..3).expect("slice");
        let fwd = net
            .forward(&few, Mode::Eval, &mut rng())
            .expect("batch of 3");
        assert_close(
            fwd.output(),
            &want.batch_slice(0..3).expect("slice"),
            &format!("{file} batch 3"),
        );
        // The observed run computes the same outputs and shows every value once.
        let mut seen = Vec::new();
        let outs = net
            .run_observed(input, &mut |name, t| {
                assert!(
                    t.data.iter().all(|v| v.is_finite()),
                    "{file}: {name} is not finite"
                );
                seen.push(name.to_string());
                Ok(())
            })
            .expect("observed run");
        assert_close(&outs[0], &want, &format!("{file} observed"));
        let unique: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{file}: a value was shown twice");
        assert!(seen.iter().any(|n| n == "logits"));
    }
}

fn student_batch() -> (Value, Tensor, Vec<usize>) {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("ops/student_grads.json"))
            .expect("student_grads.json"),
    )
    .expect("JSON");
    let x = tensor(&v["input"]);
    let labels = v["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l.as_u64().expect("label") as usize)
        .collect();
    (v, x, labels)
}

/// Mean cross-entropy and its gradient with respect to the logits.
fn cross_entropy(logits: &Tensor, labels: &[usize]) -> (f64, Tensor) {
    let (n, k) = (logits.shape[0], logits.shape[1]);
    let mut grad = Tensor::zeros(&logits.shape);
    let mut loss = 0f64;
    for (i, row) in logits.data.chunks(k).enumerate() {
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
        loss += -(row[labels[i]] as f64 - mx - z.ln());
        for j in 0..k {
            let p = (row[j] as f64 - mx).exp() / z;
            grad.data[i * k + j] = ((p - if j == labels[i] { 1.0 } else { 0.0 }) / n as f64) as f32;
        }
    }
    (loss / n as f64, grad)
}

#[test]
fn student_training_gradients_match_pytorch() {
    let (v, x, labels) = student_batch();
    let mut net = Net::from_model(&load("student.onnx")).expect("student");
    let fwd = net.forward(&x, Mode::Train, &mut rng()).expect("forward");
    assert_close(
        fwd.output(),
        &tensor(&v["logits"]),
        "student train-mode logits",
    );
    let (loss, dlogits) = cross_entropy(fwd.output(), &labels);
    assert!(
        (loss - v["loss"].as_f64().expect("loss")).abs() < 1e-4,
        "loss {loss} vs {}",
        v["loss"]
    );
    let grads = net
        .backward(&fwd, &[("logits", &dlogits)])
        .expect("backward");
    let want = v["grads"].as_object().expect("grads");
    assert_eq!(grads.iter().count(), want.len());
    for (name, g) in want {
        assert_close(
            grads
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for {name}")),
            &tensor(g),
            &format!("student gradient of {name}"),
        );
    }
    for (name, r) in v["running"].as_object().expect("running") {
        assert_close(
            net.state().get(name).expect("running stat"),
            &tensor(r),
            &format!("student {name} after one step"),
        );
    }
}

/// Whole-model finite differences on student.onnx in training mode (BatchNorm on batch
/// statistics): loss = sum(r * logits) for a fixed random r, computed in f64 from f32
/// logits, central differences with step 3e-4 on a few entries of every parameter.
///
/// ReLU and max-pool kinks crossed within the step make the difference quotient wander by
/// about 1% of the parameter's largest gradient, so the tolerance is 2% of that scale plus 2%
/// of the entry; the single-op tests and the PyTorch comparison hold the tight tolerance.
#[test]
fn student_gradients_match_finite_differences() {
    let (_, x, _) = student_batch();
    let mut net = Net::from_model(&load("student.onnx")).expect("student");
    let mut r = super::testutil::rng(11);
    let weights = Tensor::new(vec![8, 10], super::testutil::rand_vec(&mut r, 80)).expect("weights");
    let loss = |net: &mut Net| -> f64 {
        let f = net.forward(&x, Mode::Train, &mut rng()).expect("forward");
        f.output()
            .data
            .iter()
            .zip(&weights.data)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let fwd = net.forward(&x, Mode::Train, &mut rng()).expect("forward");
    let grads = net
        .backward(&fwd, &[("logits", &weights)])
        .expect("backward");
    let names: Vec<String> = net.parameters().into_iter().map(|p| p.name).collect();
    for name in names {
        let g = grads.get(&name).expect("gradient").clone();
        let n = g.numel();
        let scale = g.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        for k in [0, n / 3, n - 1] {
            let h = 3e-4f32;
            let keep = net.params().get(&name).expect("param").data[k];
            net.params_mut().get_mut(&name).expect("param").data[k] = keep + h;
            let up = loss(&mut net);
            net.params_mut().get_mut(&name).expect("param").data[k] = keep - h;
            let down = loss(&mut net);
            net.params_mut().get_mut(&name).expect("param").data[k] = keep;
            let fd = (up - down) / (2.0 * h as f64);
            let an = g.data[k] as f64;
            assert!(
                (fd - an).abs() <= 2e-2 * scale + 2e-2 * an.abs(),
                "{name}[{k}]: backward {an} vs finite difference {fd} (largest gradient {scale})"
            );
        }
    }
}

#[test]
fn same_threads_give_bit_identical_steps() {
    let (_, x, labels) = student_batch();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let step = || {
        let mut net = Net::from_model(&load("mbv2_tiny.onnx")).expect("mbv2");
        let input = raw_f32("mbv2_input");
        let fwd = net
            .forward(&input, Mode::Train, &mut rng())
            .expect("forward");
        let (_, d) = cross_entropy(fwd.output(), &labels);
        let g = net.backward(&fwd, &[("logits", &d)]).expect("backward");
        let mut all: Vec<f32> = fwd.output().data.clone();
        for (_, t) in g.iter() {
            all.extend_from_slice(&t.data);
        }
        all
    };
    let a = pool.install(step);
    let b = pool.install(step);
    assert!(
        a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
        "two runs with 2 threads differ"
    );
    let _ = x;
}

/// Buffers are reused with stale contents; a step after another must equal a fresh one.
#[test]
fn reused_buffers_do_not_leak_into_results() {
    for (file, shape) in [
        ("student.onnx", [8usize, 1, 28, 28]),
        ("mbv2_tiny.onnx", [4, 3, 32, 32]),
    ] {
        let mut r = super::testutil::rng(5);
        let n: usize = shape.iter().product();
        let first =
            Tensor::new(shape.to_vec(), super::testutil::rand_vec(&mut r, n)).expect("input");
        let second =
            Tensor::new(shape.to_vec(), super::testutil::rand_vec(&mut r, n)).expect("input");
        let labels = [1, 7, 3, 0, 2, 9, 4, 4];
        let run = |net: &mut Net, x: &Tensor| -> Vec<f32> {
            let fwd = net.forward(x, Mode::Train, &mut rng()).expect("forward");
            let (_, d) = cross_entropy(fwd.output(), &labels[..shape[0]]);
            let g = net
                .backward_with_inputs(&fwd, &[("logits", &d)])
                .expect("backward");
            let mut all = fwd.output().data.clone();
            all.extend(g.iter().flat_map(|(_, t)| t.data.clone()));
            all.extend(g.input("input").expect("input gradient").data.clone());
            all
        };
        let mut used = Net::from_model(&load(file)).expect("model");
        run(&mut used, &first);
        let again = run(&mut used, &second);
        let fresh = run(&mut Net::from_model(&load(file)).expect("model"), &second);
        assert!(
            again
                .iter()
                .zip(&fresh)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{file}: reused buffers changed the result"
        );
    }
}

#[test]
fn write_back_round_trips() {
    let mut model = load("student.onnx");
    let mut net = Net::from_model(&model).expect("student");
    let (_, x, _) = student_batch();
    net.forward(&x, Mode::Train, &mut rng()).expect("forward");
    net.params_mut().get_mut("fc.bias").expect("fc.bias").data[3] = 42.0;
    net.write_back(&mut model).expect("write back");
    let again = Net::from_model(&model).expect("rebuilt");
    assert_eq!(
        again.params().get("fc.bias").expect("fc.bias").data[3],
        42.0
    );
    assert_eq!(
        again.state().get("bn1.running_mean"),
        net.state().get("bn1.running_mean")
    );
    assert_ne!(
        again.state().get("bn1.running_var").expect("var").data,
        vec![1.0; 8]
    );
}

#[test]
fn parameters_state_and_freezing() {
    let mut net = Net::from_model(&load("student.onnx")).expect("student");
    let names: Vec<String> = net.parameters().iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        names,
        [
            "conv1.weight",
            "bn1.weight",
            "bn1.bias",
            "conv2.weight",
            "bn2.weight",
            "bn2.bias",
            "fc.weight",
            "fc.bias"
        ]
    );
    let state: Vec<&str> = net.state().iter().map(|(n, _)| n).collect();
    assert_eq!(
        state,
        [
            "bn1.running_mean",
            "bn1.running_var",
            "bn2.running_mean",
            "bn2.running_var"
        ]
    );
    net.set_trainable(&["fc.weight", "fc.bias"])
        .expect("known names");
    assert!(net.set_trainable(&["nope"]).is_err());
    let (_, x, labels) = student_batch();
    let fwd = net.forward(&x, Mode::Train, &mut rng()).expect("forward");
    let (_, d) = cross_entropy(fwd.output(), &labels);
    let g = net.backward(&fwd, &[("logits", &d)]).expect("backward");
    let with: Vec<&str> = g.iter().map(|(n, _)| n).collect();
    assert_eq!(with, ["fc.weight", "fc.bias"]);
    // Teacher constants-only model: every weight becomes a parameter too.
    let t = Net::from_model(&load("teacher_opset11_constants.onnx")).expect("teacher");
    assert_eq!(
        t.parameters().len(),
        Net::from_model(&load("teacher.onnx"))
            .expect("teacher")
            .parameters()
            .len()
    );
}

#[test]
fn hint_gradients_at_intermediate_values() {
    let (_, x, _) = student_batch();
    let mut net = Net::from_model(&load("student.onnx")).expect("student");
    let fwd = net.forward(&x, Mode::Train, &mut rng()).expect("forward");
    // The value after the first pool: its gradient reaches conv1 and bn1 only.
    let feat_name = net_value_after(&fwd, "MaxPool");
    let feat = fwd.get(&feat_name).expect("feature").clone();
    let g = net
        .backward(&fwd, &[(&feat_name, &Tensor::full(&feat.shape, 0.1))])
        .expect("backward");
    let with: Vec<&str> = g.iter().map(|(n, _)| n).collect();
    assert_eq!(with, ["conv1.weight", "bn1.weight", "bn1.bias"]);
    assert!(net.backward(&fwd, &[("no such value", &feat)]).is_err());
    assert!(
        net.backward(&fwd, &[("logits", &feat)]).is_err(),
        "wrong shape must be refused"
    );
}

fn net_value_after(fwd: &super::Forward, op: &str) -> String {
    fwd.plan
        .steps
        .iter()
        .find(|s| s.op_type == op)
        .map(|s| fwd.plan.values[s.outputs[0]].0.clone())
        .expect("op present")
}

#[test]
fn dropout_is_seeded_in_training_and_identity_in_eval() {
    let refs = load_refs();
    let case = refs["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "dropout_eval")
        .expect("dropout case")
        .clone();
    let mut net = Net::from_model(&case_model(&case)).expect("dropout model");
    let x = Tensor::full(&[2, 3, 4, 5], 1.0);
    let a = net
        .forward(&x, Mode::Train, &mut ChaCha8Rng::seed_from_u64(1))
        .expect("train")
        .output()
        .clone();
    let b = net
        .forward(&x, Mode::Train, &mut ChaCha8Rng::seed_from_u64(1))
        .expect("train")
        .output()
        .clone();
    assert_eq!(a, b);
    let dropped = a.data.iter().filter(|&&v| v == 0.0).count() as f32 / a.numel() as f32;
    assert!((dropped - 0.3).abs() < 0.05, "dropped {dropped}");
    assert!(a
        .data
        .iter()
        .all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
    assert_eq!(
        net.forward(&x, Mode::Eval, &mut rng())
            .expect("eval")
            .output(),
        &x
    );
}

fn single_node_model(
    op: &str,
    attrs: Vec<onnx::proto::AttributeProto>,
    extra_inits: Vec<onnx::Tensor>,
) -> Model {
    use onnx::proto::*;
    let vi = |name: &str, dims: &[i64]| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            denotation: String::new(),
                        })
                        .collect(),
                }),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    };
    let mut inputs = vec!["x".to_string()];
    inputs.extend(extra_inits.iter().map(|t| t.name.clone()));
    let graph = GraphProto {
        name: "g".into(),
        node: vec![NodeProto {
            name: "the_node".into(),
            op_type: op.into(),
            input: inputs,
            output: vec!["y".into()],
            attribute: attrs,
            ..Default::default()
        }],
        input: vec![vi("x", &[1, 2, 4, 4])],
        output: vec![vi("y", &[])],
        initializer: extra_inits.iter().map(onnx::Tensor::to_proto).collect(),
        ..Default::default()
    };
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    Model::from_proto(proto).expect("model")
}

#[test]
fn unsupported_cases_name_the_node() {
    let e = Net::from_model(&single_node_model("Erf", vec![], vec![]))
        .err()
        .expect("Erf is not trainable");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("the_node") && msg.contains("supported:"),
        "{msg}"
    );

    let pads = onnx::Tensor::new("p", vec![8], onnx::Data::I64(vec![0, 0, 1, 1, 0, 0, 1, 1]));
    let attr = onnx::proto::AttributeProto {
        name: "mode".into(),
        r#type: 3,
        s: b"reflect".to_vec(),
        ..Default::default()
    };
    let msg = format!(
        "{:#}",
        Net::from_model(&single_node_model("Pad", vec![attr], vec![pads]))
            .err()
            .expect("reflect pad")
    );
    assert!(
        msg.contains("the_node") && msg.contains("reflect") && msg.contains("constant"),
        "{msg}"
    );

    // Quantized graphs evaluate but refuse to train, naming the op.
    let s = onnx::Tensor::new("s", vec![], onnx::Data::F32(vec![0.1]));
    let w = onnx::Tensor::new(
        "w",
        vec![2, 2, 1, 1],
        onnx::Data::F32(vec![1.0, 0.0, 0.0, 1.0]),
    );
    let mut m = single_node_model("Conv", vec![], vec![w]);
    m.graph.nodes[0].outputs = vec!["c".into()];
    m.graph.nodes.push(onnx::Node {
        name: "q".into(),
        op_type: "QuantizeLinear".into(),
        domain: String::new(),
        inputs: vec!["c".into(), "s".into()],
        outputs: vec!["y".into()],
        attributes: vec![],
    });
    m.graph.initializers.insert("s".into(), s);
    let mut net = Net::from_model(&m).expect("evaluates");
    let x = Tensor::full(&[1, 2, 4, 4], 0.55);
    assert_eq!(
        net.forward(&x, Mode::Eval, &mut rng())
            .expect("eval")
            .output()
            .data[0],
        6.0
    );
    let msg = format!(
        "{:#}",
        net.forward(&x, Mode::Train, &mut rng())
            .err()
            .expect("no training")
    );
    assert!(msg.contains("`q` (QuantizeLinear)"), "{msg}");
}

#[test]
fn input_shape_mismatch_is_an_error() {
    let mut net = Net::from_model(&load("student.onnx")).expect("student");
    let msg = format!(
        "{:#}",
        net.forward(&Tensor::zeros(&[2, 1, 27, 28]), Mode::Eval, &mut rng())
            .err()
            .expect("bad shape")
    );
    assert!(msg.contains("27"), "{msg}");
    let _: HashMap<(), ()> = HashMap::new();
}
