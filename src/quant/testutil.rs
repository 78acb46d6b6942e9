//! Test helpers shared by the quant modules: hand-built models, seeded inputs, runners over
//! the real backends, and calibrated QDQ models of the fixtures (built once per test binary).

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Result;
use rand::{Rng, SeedableRng};

use super::prepare::prepare;
use super::qdq::{quantize, QuantOptions, Runner};
use crate::data::{Dataset, Preprocess};
use crate::onnx::ir::{Graph, Model, Node, ValueInfo};
use crate::onnx::proto::ModelProto;
use crate::onnx::{Dim, Tensor};
use crate::runtime::{self, BackendKind, RuntimeOptions};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

pub fn value(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        elem_type,
        shape: Some(dims.iter().map(|&d| Dim::Fixed(d)).collect()),
    }
}

pub fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op_type: op.into(),
        domain: String::new(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        attributes: vec![],
    }
}

/// A model of one graph at the given default-domain opset.
pub fn model(
    inputs: Vec<ValueInfo>,
    outputs: Vec<ValueInfo>,
    nodes: Vec<Node>,
    inits: Vec<Tensor>,
    opset: i64,
) -> Model {
    let mut graph = Graph {
        name: "test".into(),
        nodes,
        inputs,
        outputs,
        initializers: inits.into_iter().map(|t| (t.name.clone(), t)).collect(),
        value_info: Default::default(),
    };
    graph.sort_topologically().unwrap();
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![crate::onnx::proto::OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "shrink-test".into(),
        ..Default::default()
    };
    Model {
        graph,
        opset,
        proto,
    }
}

/// `n` seeded standard-normal values (Box–Muller).
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

pub fn bytes(m: &Model) -> Vec<u8> {
    prost::Message::encode_to_vec(&m.to_proto())
}

/// Every output of `m` on one batch `x` of shape `shape`, on one thread.
pub fn run(
    m: &Model,
    backend: BackendKind,
    shape: &[usize],
    x: &[f32],
) -> Result<Vec<runtime::Output>> {
    let opts = RuntimeOptions {
        backend,
        threads: 1,
        ..Default::default()
    };
    runtime::open(&bytes(m), shape, &opts)?.run(x)
}

/// Calibration over fixed batches through a real backend.
pub struct BatchRunner {
    pub batches: Vec<(Vec<usize>, Vec<f32>)>,
    pub backend: BackendKind,
}

impl Runner for BatchRunner {
    fn run(&mut self, model: &Model, sink: &mut crate::quant::qdq::OutputSink<'_>) -> Result<()> {
        let names: Vec<String> = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        for (shape, x) in &self.batches {
            let outs = run(model, self.backend, shape, x)?;
            for (name, o) in names.iter().zip(&outs) {
                sink(name, &o.shape, &o.data)?;
            }
        }
        Ok(())
    }
}

/// Loads, prepares and quantizes a fixture with the default options.
pub fn quantize_fixture(name: &str, batches: Vec<(Vec<usize>, Vec<f32>)>) -> (Model, Model) {
    let mut float = Model::load(&fixture(name)).unwrap();
    prepare(&mut float).unwrap();
    let mut runner = BatchRunner {
        batches,
        backend: BackendKind::Tract,
    };
    let (q, _) = quantize(&float, &QuantOptions::default(), &mut runner, &()).unwrap();
    (float, q)
}

/// The first `n` digits of `file` as one NCHW batch, with their labels.
pub fn digits(file: &str, n: usize) -> (Vec<usize>, Vec<f32>, Vec<i64>) {
    let ds = Dataset::open(&fixture(file), &Preprocess::default(), [1, 28, 28]).unwrap();
    let b = ds.load_all().unwrap();
    let n = n.min(b.len());
    let y = b.y.unwrap();
    (vec![n, 1, 28, 28], b.x[..n * 784].to_vec(), y[..n].to_vec())
}

/// The prepared float teacher and its QDQ model, calibrated on 300 training digits as
/// `shrink quantize` does by default.
pub fn teacher() -> &'static (Model, Model) {
    static M: OnceLock<(Model, Model)> = OnceLock::new();
    M.get_or_init(|| {
        let ds = Dataset::open(
            &fixture("digits_train.npz"),
            &Preprocess::default(),
            [1, 28, 28],
        )
        .unwrap();
        let mut batches = Vec::new();
        ds.for_each_subset_batch(&ds.sample_indices(300, 0), 32, |b| {
            batches.push((b.shape.to_vec(), b.x));
            Ok(())
        })
        .unwrap();
        quantize_fixture("teacher.onnx", batches)
    })
}

/// The prepared float mbv2_tiny and its QDQ model, calibrated on 128 standard-normal
/// inputs (the fixture is untrained and was exported for such inputs).
pub fn mbv2() -> &'static (Model, Model) {
    static M: OnceLock<(Model, Model)> = OnceLock::new();
    M.get_or_init(|| {
        let batches = (0..4)
            .map(|i| (vec![32, 3, 32, 32], normal(32 * 3 * 32 * 32, 100 + i)))
            .collect();
        quantize_fixture("mbv2_tiny.onnx", batches)
    })
}

pub fn argmax_rows(v: &[f32], classes: usize) -> Vec<usize> {
    v.chunks(classes)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap_or(0)
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `scripts/check_onnx.py` (onnx.checker, full check) on `paths`; panics with its output
/// when a model is refused or Python cannot run it.
pub fn onnx_check(paths: &[PathBuf]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check_onnx.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(paths)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); install Python 3 with `pip install onnx==1.23.2`")
        });
    assert!(
        out.status.success(),
        "onnx.checker refused a model (or `onnx` is missing: pip install onnx==1.23.2):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `Cast(from) → to` with ONNX data type `to_type`.
pub fn cast(from: &str, to: &str, to_type: i32) -> Node {
    let mut n = node(&format!("{to}/Cast"), "Cast", &[from], &[to]);
    n.attributes
        .push(crate::onnx::ir::make_attr_int("to", i64::from(to_type)));
    n
}
