//! `shrink distill` and `shrink train` through the real binary, on the digits fixtures.

use std::path::{Path, PathBuf};

use shrink::data::{Dataset, Preprocess};
use shrink::onnx::{Data, Dim, Model, Node, Tensor};
use shrink::runtime::{self, BackendKind, RuntimeOptions};

use crate::util::{Dir, Output};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .display()
        .to_string()
}

/// A short run: 1000 training samples, batches of 32, one epoch, two threads; `extra` flags
/// replace these defaults or add to them.
fn distill_args(out: &str, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<(String, Option<String>)> = [
        ("--teacher", fixture("teacher.onnx")),
        ("--student", fixture("student.onnx")),
        ("--data", fixture("digits_train.npz")),
        ("--val", fixture("digits_val.npz")),
        ("--out", out.to_string()),
        ("--limit", "1000".into()),
        ("--batch-size", "32".into()),
        ("--epochs", "1".into()),
        ("--threads", "2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Some(v)))
    .collect();
    let mut i = 0;
    while i < extra.len() {
        let key = extra[i].to_string();
        let value = extra
            .get(i + 1)
            .filter(|v| !v.starts_with("--"))
            .map(|v| v.to_string());
        i += 1 + usize::from(value.is_some());
        let repeatable = matches!(key.as_str(), "--metrics" | "--hint");
        match flags.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) if !repeatable => slot.1 = value,
            _ => flags.push((key, value)),
        }
    }
    let mut a = vec!["distill".to_string()];
    for (k, v) in flags {
        a.push(k);
        a.extend(v);
    }
    a
}

fn run(dir: &Dir, args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    dir.run(&refs)
}

fn ok(out: &Output) {
    assert_eq!(
        out.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
}

/// The `{"summary": ...}` line that `--metrics -` ends stdout with.
fn summary(out: &Output) -> serde_json::Value {
    let last = out.stdout.lines().last().expect("a summary line");
    serde_json::from_str::<serde_json::Value>(last).expect("JSON")["summary"].clone()
}

/// Top-1 accuracy of an ONNX model on digits_val, on a runtime other than the engine.
fn accuracy_on(backend: BackendKind, model: &Path) -> f64 {
    let bytes = std::fs::read(model).unwrap();
    let ds = Dataset::open(
        Path::new(&fixture("digits_val.npz")),
        &Preprocess::default(),
        [1, 28, 28],
    )
    .unwrap();
    let all = ds.load_all().unwrap();
    let n = all.len();
    let opts = RuntimeOptions {
        backend,
        threads: 1,
        ..Default::default()
    };
    let mut s = runtime::open(&bytes, &[n, 1, 28, 28], &opts).unwrap();
    let logits = &s.run(&all.x).unwrap()[0];
    let y = all.y.unwrap();
    let right = logits
        .data
        .chunks(10)
        .zip(&y)
        .filter(|(row, &label)| {
            let best = (0..10).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            best as i64 == label
        })
        .count();
    right as f64 / n as f64
}

fn initializer(model: &Path, name: &str) -> Vec<f32> {
    let m = Model::load(model).unwrap();
    m.graph.initializers[name].to_f32_vec()
}

#[test]
fn distill_trains_the_student_and_ort_and_tract_agree() {
    let dir = Dir::new();
    let out = dir.path("student.onnx").display().to_string();
    let metrics = dir.path("m.jsonl").display().to_string();
    let res = run(
        &dir,
        &distill_args(
            &out,
            &["--limit", "2000", "--metrics", "-", "--metrics", &metrics],
        ),
    );
    ok(&res);
    let s = summary(&res);
    let before = s["student_before_val_acc"].as_f64().unwrap();
    let after = s["student_after_val_acc"].as_f64().unwrap();
    assert!((before - 0.042).abs() < 1e-9, "{before}");
    assert!(after > 0.75, "the student reached only {after}");
    assert!((s["teacher_val_acc"].as_f64().unwrap() - 0.982).abs() < 1e-9);
    assert!(
        res.stderr.contains("training 8 of 8 weights"),
        "{}",
        res.stderr
    );
    let lines = dir.read("m.jsonl");
    let epoch: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(epoch["samples_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(epoch["val_acc"].as_f64().unwrap(), after);
    // Engine, ONNX Runtime and tract compute the same logits up to float rounding; a sample
    // whose top two logits are that close may flip, so allow 2 of the 1000.
    for backend in [BackendKind::Ort, BackendKind::Tract] {
        let acc = accuracy_on(backend, Path::new(&out));
        assert!(
            (acc - after).abs() <= 0.002,
            "{backend}: {acc} vs the engine's {after}"
        );
    }
    // The graph is the student's own: same initializer names, BatchNorm kept.
    let (a, b) = (
        Model::load(Path::new(&fixture("student.onnx"))).unwrap(),
        Model::load(Path::new(&out)).unwrap(),
    );
    assert_eq!(
        a.graph.initializers.keys().collect::<Vec<_>>(),
        b.graph.initializers.keys().collect::<Vec<_>>()
    );
    assert_eq!(a.graph.nodes, b.graph.nodes);
    assert_ne!(
        a.graph.initializers["bn1.running_mean"],
        b.graph.initializers["bn1.running_mean"]
    );
}

#[test]
fn same_seed_same_bytes() {
    let dir = Dir::new();
    let extra = ["--augment", "crop,flip", "--seed", "3"];
    for name in ["a.onnx", "b.onnx"] {
        ok(&run(
            &dir,
            &distill_args(&dir.path(name).display().to_string(), &extra),
        ));
    }
    assert_eq!(
        std::fs::read(dir.path("a.onnx")).unwrap(),
        std::fs::read(dir.path("b.onnx")).unwrap()
    );
    ok(&run(
        &dir,
        &distill_args(
            &dir.path("c.onnx").display().to_string(),
            &["--augment", "crop,flip", "--seed", "4"],
        ),
    ));
    assert_ne!(
        std::fs::read(dir.path("a.onnx")).unwrap(),
        std::fs::read(dir.path("c.onnx")).unwrap()
    );
}

#[test]
fn resume_continues_bit_for_bit() {
    let dir = Dir::new();
    let straight = dir.path("straight.onnx").display().to_string();
    let resumed = dir.path("resumed.onnx").display().to_string();
    let extra = [
        "--epochs",
        "2",
        "--limit",
        "600",
        "--augment",
        "shift",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
    ];
    ok(&run(&dir, &distill_args(&straight, &extra)));
    let ck = ["--checkpoint-dir", "ck", "--metrics", "m.jsonl"];
    let first = run(
        &dir,
        &distill_args(
            &resumed,
            &[&extra[..], &ck[..], &["--stop-after", "1"]].concat(),
        ),
    );
    ok(&first);
    assert!(
        !dir.path("resumed.onnx").exists(),
        "--stop-after writes no model"
    );
    assert!(dir.path("ck/last.ckpt").exists());
    ok(&run(
        &dir,
        &distill_args(&resumed, &[&extra[..], &ck[..], &["--resume"]].concat()),
    ));
    assert_eq!(
        std::fs::read(&straight).unwrap(),
        std::fs::read(&resumed).unwrap()
    );
    assert_eq!(dir.read("m.jsonl").lines().count(), 2);
    // Other settings than the interrupted run's are refused.
    let other = run(
        &dir,
        &distill_args(
            &resumed,
            &[&extra[..], &ck[..], &["--resume", "--seed", "9"]].concat(),
        ),
    );
    assert_eq!(other.code, 2);
    assert!(other.stderr.contains("other settings"), "{}", other.stderr);
}

#[test]
fn diverging_loss_names_the_step() {
    let dir = Dir::new();
    let out = dir.path("x.onnx").display().to_string();
    let res = run(
        &dir,
        &distill_args(
            &out,
            &[
                "--lr",
                "1e30",
                "--schedule",
                "constant",
                "--checkpoint-dir",
                "ck",
            ],
        ),
    );
    assert_eq!(res.code, 2, "{}", res.stderr);
    // The loss or the gradients turn non-finite at the second step, once the first update
    // has blown the weights up.
    assert!(
        res.stderr.contains("error: training diverged: the "),
        "{}",
        res.stderr
    );
    assert!(
        res.stderr.contains(" at step 2 (epoch 1, batch 2 of 32)"),
        "{}",
        res.stderr
    );
    assert!(
        res.stderr.contains("no checkpoint was written yet"),
        "{}",
        res.stderr
    );
    assert!(res.stderr.contains("hint: lower --lr"), "{}", res.stderr);
    assert!(!dir.path("x.onnx").exists());
}

#[test]
fn teacher_with_other_classes_is_refused_before_training() {
    let dir = Dir::new();
    let mut m = Model::load(Path::new(&fixture("teacher.onnx"))).unwrap();
    let gemm = m
        .graph
        .nodes
        .iter()
        .find(|n| n.op_type == "Gemm")
        .unwrap()
        .clone();
    for (i, keep) in [(1usize, 5 * 32), (2, 5)] {
        let t = m.graph.initializers.get_mut(&gemm.inputs[i]).unwrap();
        let v = t.to_f32_vec()[..keep].to_vec();
        t.dims[0] = 5;
        t.data = Data::F32(v);
    }
    m.graph.outputs[0].shape = Some(vec![Dim::Param("batch".into()), Dim::Fixed(5)]);
    let teacher = dir.path("five.onnx");
    m.save(&teacher).unwrap();
    let res = run(
        &dir,
        &distill_args("x.onnx", &["--teacher", &teacher.display().to_string()]),
    );
    assert_eq!(res.code, 2, "{}", res.stderr);
    assert!(
        res.stderr.contains("outputs shape [1, 5] but the student"),
        "{}",
        res.stderr
    );
    assert!(res.stderr.contains("hint:"), "{}", res.stderr);
    assert!(!res.stderr.contains("epoch 1"), "{}", res.stderr);
    assert!(!dir.path("x.onnx").exists());
}

#[test]
fn op_without_backward_is_refused_before_training() {
    let dir = Dir::new();
    let mut m = Model::load(Path::new(&fixture("student.onnx"))).unwrap();
    let conv_out = m.graph.nodes[0].outputs[0].clone();
    m.graph
        .initializers
        .insert("s".into(), Tensor::new("s", vec![], Data::F32(vec![0.05])));
    m.graph
        .initializers
        .insert("zp".into(), Tensor::new("zp", vec![], Data::U8(vec![128])));
    let node = |name: &str, op: &str, input: &str, output: &str| Node {
        name: name.into(),
        op_type: op.into(),
        domain: String::new(),
        inputs: vec![input.into(), "s".into(), "zp".into()],
        outputs: vec![output.into()],
        attributes: Vec::new(),
    };
    m.graph.nodes[1].inputs[0] = "dq".into();
    m.graph
        .nodes
        .insert(1, node("q", "QuantizeLinear", &conv_out, "q"));
    m.graph
        .nodes
        .insert(2, node("dq", "DequantizeLinear", "q", "dq"));
    let student = dir.path("qdq.onnx");
    m.save(&student).unwrap();
    let res = dir.run(&[
        "train",
        "--model",
        &student.display().to_string(),
        "--data",
        &fixture("digits_train.npz"),
        "--out",
        "x.onnx",
        "--limit",
        "64",
    ]);
    assert_eq!(res.code, 2, "{}", res.stderr);
    assert!(
        res.stderr.contains("`q` (QuantizeLinear)"),
        "{}",
        res.stderr
    );
    assert!(res.stderr.contains("no backward pass"), "{}", res.stderr);
}

#[test]
fn data_of_another_shape_is_refused() {
    let dir = Dir::new();
    let res = dir.run(&[
        "train",
        "--model",
        &fixture("mbv2_tiny.onnx"),
        "--data",
        &fixture("digits_train.npz"),
        "--out",
        "x.onnx",
    ]);
    assert_eq!(res.code, 2);
    assert!(
        res.stderr
            .contains("[1, 28, 28] (C, H, W) but the model takes [3, 32, 32]"),
        "{}",
        res.stderr
    );
    let res = run(
        &dir,
        &distill_args("x.onnx", &["--teacher", &fixture("mbv2_tiny.onnx")]),
    );
    assert_eq!(res.code, 2);
    assert!(
        res.stderr
            .contains("takes inputs [N, 3, 32, 32] but the student"),
        "{}",
        res.stderr
    );
}

#[test]
fn folded_student_warns_and_says_how_to_export() {
    let dir = Dir::new();
    let res = run(
        &dir,
        &distill_args(
            "x.onnx",
            &[
                "--limit",
                "64",
                "--student",
                &fixture("student_folded.onnx"),
            ],
        ),
    );
    ok(&res);
    assert!(
        res.stderr.contains("warning: ") && res.stderr.contains("has no normalisation layers"),
        "{}",
        res.stderr
    );
    assert!(
        res.stderr
            .contains("training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False"),
        "{}",
        res.stderr
    );
}

#[test]
fn frozen_weights_keep_their_values() {
    let dir = Dir::new();
    let res = dir.run(&[
        "train",
        "--model",
        &fixture("student.onnx"),
        "--data",
        &fixture("digits_train.npz"),
        "--out",
        "t.onnx",
        "--limit",
        "128",
        "--freeze",
        "conv1.weight,bn1.weight",
        "--threads",
        "1",
    ]);
    ok(&res);
    assert!(
        res.stderr.contains("training 6 of 8 weights"),
        "{}",
        res.stderr
    );
    assert!(
        res.stderr
            .contains("kept fixed: bn1.weight [8], conv1.weight [8, 1, 3, 3]"),
        "{}",
        res.stderr
    );
    let (before, after) = (PathBuf::from(fixture("student.onnx")), dir.path("t.onnx"));
    assert_eq!(
        initializer(&before, "conv1.weight"),
        initializer(&after, "conv1.weight")
    );
    assert_ne!(
        initializer(&before, "conv2.weight"),
        initializer(&after, "conv2.weight")
    );
    let res = dir.run(&[
        "train",
        "--model",
        &fixture("student.onnx"),
        "--data",
        &fixture("digits_train.npz"),
        "--out",
        "t.onnx",
        "--train-only",
        "fc.weigth",
    ]);
    assert_eq!(res.code, 2);
    assert!(
        res.stderr.contains("hint: did you mean `fc.weight`?"),
        "{}",
        res.stderr
    );
}

#[test]
fn ort_teacher_and_hint_loss() {
    let dir = Dir::new();
    let res = run(
        &dir,
        &distill_args("a.onnx", &["--teacher-backend", "ort", "--metrics", "-"]),
    );
    ok(&res);
    assert!(
        summary(&res)["teacher_backend"]
            .as_str()
            .unwrap()
            .starts_with("ort"),
        "{}",
        res.stdout
    );
    let res = run(
        &dir,
        &distill_args(
            "b.onnx",
            &[
                "--hint",
                "/layer1/Relu_1_output_0:/pool/MaxPool_output_0",
                "--metrics",
                "-",
            ],
        ),
    );
    ok(&res);
    assert!(
        summary(&res)["student_after_val_acc"].as_f64().unwrap() > 0.3,
        "{}",
        res.stdout
    );
    let res = run(
        &dir,
        &distill_args("c.onnx", &["--hint", "/layer1/Relu_1_output_0:/nope"]),
    );
    assert_eq!(res.code, 2);
    assert!(
        res.stderr.contains("no float tensor named `/nope`"),
        "{}",
        res.stderr
    );
}
