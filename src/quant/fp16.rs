//! Float32 → float16 conversion of a float model: initializers stored as float16 (with the
//! `half` crate), nodes computing in float16, Cast nodes where a value changes precision.
//!
//! What stays float32:
//! - inputs ONNX types as float32 whatever the data type: Resize `roi` and `scales`,
//!   Upsample `scales`;
//! - shape computations: nodes whose float outputs only end up in such inputs or in a Cast
//!   to an integer type (`Shape → Cast → Mul → Cast(int64) → Reshape`), so sizes are not
//!   rounded to float16's 11-bit precision;
//! - ops a target runtime cannot run in float16, measured (see [`FLOAT32_OPS`]): they keep
//!   float16 weights, cast to float32 in the graph, and a Cast pair around them.
//!
//! What the runtimes run in float16, measured with one single-op model per op (Cast →
//! op → Cast, opset 18) on x86-64:
//! - ONNX Runtime 1.31.1, CPU execution provider: every op tried loads and runs. It has
//!   float16 kernels for data movement (Reshape, Flatten, Transpose, Concat, Split, Slice,
//!   Squeeze, Unsqueeze, Expand), Clip, Relu, Max/Min and LayerNormalization; for the rest
//!   (Conv, Gemm, MatMul, Add/Mul, pooling, BatchNormalization, Resize, Softmax, ...) its
//!   InsertCastTransformer computes the node in float32 between Casts of its own. No op needs
//!   Casts from us.
//! - tract 0.23.9: every op tried runs in float16 except Gemm, which fails to build
//!   (its expansion yields float32: "Output mismatch after rewiring expansion").
//!
//! Ops tried: Abs, Add, ArgMax, AveragePool, BatchNormalization, Clip, Concat, Conv
//! (depthwise too), ConvTranspose, DepthToSpace, Div, Dropout, Einsum, Elu, Erf, Exp, Expand,
//! Flatten, Floor, Gelu, Gemm, GlobalAveragePool, GlobalMaxPool, Greater, HardSigmoid,
//! HardSwish, Identity, InstanceNormalization, LRN, LayerNormalization, LeakyRelu, Log,
//! MatMul, Max, MaxPool, Mish, Mul, Neg, PRelu, Pad, Pow, Reciprocal, ReduceMax, ReduceMean,
//! ReduceSum, Relu, Reshape, Resize (nearest, linear), Shape, Sigmoid, Sin, Slice, Softmax,
//! Softplus, Split, Sqrt, Squeeze, Sub, Sum, Tanh, Tile, TopK, Transpose, Unsqueeze, Where.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, ensure, Result};
use half::f16;
use serde::Serialize;

use super::patch::Patch;
use crate::onnx::ir::{make_attr_int, Graph, Model, Node};
use crate::onnx::proto::{attribute_proto::AttributeType, tensor_proto::DataType};
use crate::onnx::{Data, Tensor};

/// Ops that run in float32 between Casts because a target runtime has no float16 form.
pub const FLOAT32_OPS: &[(&str, &str)] = &[(
    "Gemm",
    "tract 0.23.9 cannot build a float16 Gemm (its expansion yields float32)",
)];

const FLOAT: i32 = DataType::Float as i32;
const FLOAT16: i32 = DataType::Float16 as i32;

/// What [`to_fp16`] changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fp16Report {
    pub keep_io_types: bool,
    /// Serialized model sizes.
    pub size_before_bytes: u64,
    pub size_after_bytes: u64,
    pub size_ratio: f64,
    pub converted_initializers: usize,
    /// Initializer values beyond float16's range, stored as ±65504.
    pub clamped_values: usize,
    /// Initializers kept in float32: inputs ONNX requires in float32, shape computations.
    pub float32_initializers: Vec<String>,
    /// Nodes computing in float32, and why.
    pub float32_nodes: Vec<Float32Node>,
    pub casts_inserted: usize,
    /// Largest |float32 output − float16 output| over the batches given to
    /// [`Fp16Report::compare`]; None until then.
    pub output_max_abs_diff: Option<f32>,
    /// Largest |float32 output| over the same batches, the scale the difference is read
    /// against.
    pub output_max_abs: Option<f32>,
    pub compared_values: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Float32Node {
    pub node: String,
    pub op: String,
    pub reason: String,
}

impl Fp16Report {
    /// Records one batch of outputs of the float32 model and of the float16 model on the
    /// same inputs (outputs flattened in the same order).
    pub fn compare(&mut self, float32: &[f32], float16: &[f32]) -> Result<()> {
        ensure!(
            float32.len() == float16.len(),
            "the float32 model returned {} values and the float16 model {}",
            float32.len(),
            float16.len()
        );
        let diff = float32
            .iter()
            .zip(float16)
            .map(|(a, b)| (a - b).abs())
            .fold(self.output_max_abs_diff.unwrap_or(0.0), f32::max);
        let scale = float32
            .iter()
            .map(|a| a.abs())
            .fold(self.output_max_abs.unwrap_or(0.0), f32::max);
        self.output_max_abs_diff = Some(diff);
        self.output_max_abs = Some(scale);
        self.compared_values += float32.len();
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Prec {
    F16,
    F32,
}

impl Prec {
    fn code(self) -> i32 {
        match self {
            Prec::F16 => FLOAT16,
            Prec::F32 => FLOAT,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Prec::F16 => "fp16",
            Prec::F32 => "fp32",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Computes in float16.
    Half,
    /// Part of a shape computation: float32 throughout.
    Shape,
    /// A runtime lacks the float16 op: float32 between Casts.
    CastPair,
}

/// Converts a float32 model to float16. With `keep_io_types` the graph's float inputs and
/// outputs stay float32 and Casts convert them inside the graph; otherwise they become
/// float16. See the module documentation for what stays float32.
pub fn to_fp16(model: &Model, keep_io_types: bool) -> Result<(Model, Fp16Report)> {
    let g = &model.graph;
    refuse_unsupported(g)?;
    let types = elem_types(g);
    let is_float = |v: &str| types.get(v) == Some(&FLOAT);
    let modes = modes(g, &is_float);

    let mut report = Fp16Report {
        keep_io_types,
        size_before_bytes: encoded_len(model),
        ..Default::default()
    };
    for (n, &mode) in g.nodes.iter().zip(&modes) {
        let reason = match mode {
            Mode::Half => continue,
            Mode::Shape => "shape computation".to_string(),
            Mode::CastPair => FLOAT32_OPS
                .iter()
                .find(|(op, _)| *op == n.op_type)
                .map(|(_, why)| why.to_string())
                .unwrap_or_default(),
        };
        report.float32_nodes.push(Float32Node {
            node: n.name.clone(),
            op: n.op_type.clone(),
            reason,
        });
    }

    // Which precision each use of a float value wants.
    let want = |n: &Node, mode: Mode, i: usize| -> Option<Prec> {
        let v = n.input(i)?;
        if !is_float(v) || takes_any_type(n, i) {
            return None;
        }
        Some(match mode {
            Mode::Half if !float32_input(n, i) => Prec::F16,
            _ => Prec::F32,
        })
    };
    let io = if keep_io_types { Prec::F32 } else { Prec::F16 };

    // Storage of float32 initializers: float16 wherever a float16 op or a Cast pair reads
    // them, float32 (under a new name if both) where ONNX or a shape computation needs it.
    let mut stored16: HashSet<&str> = HashSet::new();
    let mut stored32: HashSet<&str> = HashSet::new();
    for (n, &mode) in g.nodes.iter().zip(&modes) {
        for i in 0..n.inputs.len() {
            let Some(w) = want(n, mode, i) else { continue };
            let v = n.inputs[i].as_str();
            if !g.initializers.contains_key(v) {
                continue;
            }
            let exact32 = mode == Mode::Shape || float32_input(n, i);
            if w == Prec::F16 || !exact32 {
                stored16.insert(v);
            } else {
                stored32.insert(v);
            }
        }
    }
    for o in &g.outputs {
        if g.initializers.contains_key(&o.name) && is_float(&o.name) {
            match io {
                Prec::F16 => stored16.insert(o.name.as_str()),
                Prec::F32 => stored32.insert(o.name.as_str()),
            };
        }
    }

    let mut p = Patch::new(g);
    let mut m = model.clone();
    let mut avail: HashMap<String, Vec<(Prec, String)>> = HashMap::new();
    for (name, t) in &g.initializers {
        let Data::F32(v) = &t.data else { continue };
        let mut versions = Vec::new();
        if stored16.contains(name.as_str()) {
            let (data, clamped) = to_half(v);
            report.clamped_values += clamped;
            report.converted_initializers += 1;
            m.graph.initializers.insert(
                name.clone(),
                Tensor::new(name.clone(), t.dims.clone(), Data::F16(data)),
            );
            versions.push((Prec::F16, name.clone()));
            if stored32.contains(name.as_str()) {
                let n32 = p.add_initializer(&format!("{name}_fp32"), t.clone());
                versions.push((Prec::F32, n32));
            }
        } else {
            versions.push((Prec::F32, name.clone()));
        }
        if stored32.contains(name.as_str()) {
            report.float32_initializers.push(name.clone());
        }
        avail.insert(name.clone(), versions);
    }
    for v in m.graph.inputs.iter_mut().filter(|v| v.elem_type == FLOAT) {
        v.elem_type = io.code();
        avail.insert(v.name.clone(), vec![(io, v.name.clone())]);
    }
    for v in m.graph.outputs.iter_mut().filter(|v| v.elem_type == FLOAT) {
        v.elem_type = io.code();
    }

    let mut casts = Casts::default();
    let mut nodes = Vec::with_capacity(g.nodes.len());
    for (n, &mode) in g.nodes.iter().zip(&modes) {
        let mut n = n.clone();
        for i in 0..n.inputs.len() {
            if let Some(w) = want(&n, mode, i) {
                n.inputs[i] = casts.get(&mut p, &mut avail, &mut nodes, &n.inputs[i], w)?;
            } else if let Some(v) = n.input(i).and_then(|v| avail.get(v)) {
                // A value read in any type (Shape, Cast): take the one there is.
                n.inputs[i] = v[0].1.clone();
            }
        }
        let out_prec = if mode == Mode::Half {
            Prec::F16
        } else {
            Prec::F32
        };
        if n.op_type == "Cast" && mode == Mode::Half && n.attr_int("to", 0)? == i64::from(FLOAT) {
            n.attributes.retain(|a| a.name != "to");
            n.attributes.push(make_attr_int("to", FLOAT16 as i64));
        }
        if n.op_type == "ConstantOfShape" && mode == Mode::Half {
            if let Some(t) = n.attr_tensor("value")? {
                if let (Data::F32(v), Some(a)) =
                    (&t.data, n.attributes.iter_mut().find(|a| a.name == "value"))
                {
                    let (v, _) = to_half(v);
                    a.t =
                        Some(Tensor::new(t.name.clone(), t.dims.clone(), Data::F16(v)).to_proto());
                }
            }
        }
        for o in n.outputs.iter_mut().filter(|o| is_float(o)) {
            let name = if g.is_output(o) && out_prec != io {
                p.fresh(&format!("{o}_{}", out_prec.suffix()))
            } else {
                o.clone()
            };
            avail.insert(o.clone(), vec![(out_prec, name.clone())]);
            *o = name;
        }
        nodes.push(n);
    }
    // A float output whose producer computes in the other precision wrote a renamed value.
    for o in g.outputs.iter().filter(|o| is_float(&o.name)) {
        let Some(versions) = avail.get(&o.name) else {
            continue;
        };
        if !versions.iter().any(|(_, name)| *name == o.name) {
            nodes.push(cast_node(&mut p, &versions[0].1, &o.name, io));
            casts.count += 1;
        }
    }
    m.graph.nodes = nodes;
    report.casts_inserted = casts.count;
    p.apply(&mut m.graph)?;
    report.size_after_bytes = encoded_len(&m);
    report.size_ratio = report.size_after_bytes as f64 / report.size_before_bytes.max(1) as f64;
    Ok((m, report))
}

/// Casts inserted so far, one per value and precision.
#[derive(Default)]
struct Casts {
    count: usize,
}

impl Casts {
    /// The name of `value` in precision `want`, adding a Cast the first time it is needed.
    fn get(
        &mut self,
        p: &mut Patch,
        avail: &mut HashMap<String, Vec<(Prec, String)>>,
        nodes: &mut Vec<Node>,
        value: &str,
        want: Prec,
    ) -> Result<String> {
        let Some(versions) = avail.get_mut(value) else {
            bail!("value `{value}` is read before any node writes it")
        };
        if let Some((_, name)) = versions.iter().find(|(pr, _)| *pr == want) {
            return Ok(name.clone());
        }
        let from = versions[0].1.clone();
        let to = p.fresh(&format!("{value}_{}", want.suffix()));
        versions.push((want, to.clone()));
        nodes.push(cast_node(p, &from, &to, want));
        self.count += 1;
        Ok(to)
    }
}

fn cast_node(p: &mut Patch, from: &str, to: &str, prec: Prec) -> Node {
    Node {
        name: p.fresh(&format!("{to}/Cast")),
        op_type: "Cast".into(),
        domain: String::new(),
        inputs: vec![from.to_string()],
        outputs: vec![to.to_string()],
        attributes: vec![make_attr_int("to", prec.code() as i64)],
    }
}

fn encoded_len(m: &Model) -> u64 {
    prost::Message::encoded_len(&m.to_proto()) as u64
}

/// float16 values, clamping finite values beyond its range to ±65504 (not ±∞); returns how
/// many were clamped.
fn to_half(v: &[f32]) -> (Vec<f16>, usize) {
    let max = f16::MAX.to_f32();
    let mut clamped = 0;
    let out = v
        .iter()
        .map(|&x| {
            if x.is_finite() && x.abs() > max {
                clamped += 1;
                f16::from_f32(x.clamp(-max, max))
            } else {
                f16::from_f32(x)
            }
        })
        .collect();
    (out, clamped)
}

fn refuse_unsupported(g: &Graph) -> Result<()> {
    for n in &g.nodes {
        if matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear") {
            bail!(n.unsupported(
                "the model is quantized; float16 conversion takes the float model (convert it instead of quantizing, or before)"
            ));
        }
        if n.attributes.iter().any(|a| {
            matches!(
                AttributeType::try_from(a.r#type),
                Ok(AttributeType::Graph | AttributeType::Graphs)
            )
        }) {
            bail!(n.unsupported(
                "control flow with subgraphs is not converted to float16; keep the model in float32"
            ));
        }
        if n.attr("dtype").is_some() || (n.op_type == "Constant" && n.domain.is_empty()) {
            bail!(n.unsupported(
                "its output type comes from an attribute float16 conversion does not rewrite; keep the model in float32"
            ));
        }
    }
    let f64s: Vec<&str> = g
        .initializers
        .values()
        .filter(|t| matches!(t.data, Data::F64(_)))
        .map(|t| t.name.as_str())
        .collect();
    ensure!(
        f64s.is_empty(),
        "initializers {} are float64; float16 conversion handles float32 models",
        f64s.join(", ")
    );
    Ok(())
}

/// Inputs typed float32 by the ONNX spec whatever the data type (Resize-11+ `roi` may be
/// float16 too, but is left alone with `scales`).
fn float32_input(n: &Node, i: usize) -> bool {
    matches!((n.op_type.as_str(), i), ("Resize", 1 | 2) | ("Upsample", 1))
}

/// Inputs of any type whose data is not computed on: nothing to cast.
fn takes_any_type(n: &Node, i: usize) -> bool {
    matches!(
        (n.op_type.as_str(), i),
        ("Cast" | "Shape" | "Size" | "CastLike", 0)
    )
}

/// ONNX data type of every value whose type follows from the graph (0 where unknown).
fn elem_types(g: &Graph) -> HashMap<String, i32> {
    let mut t: HashMap<String, i32> = HashMap::new();
    for v in &g.inputs {
        t.insert(v.name.clone(), v.elem_type);
    }
    for (name, tensor) in &g.initializers {
        t.insert(name.clone(), tensor.data.dtype() as i32);
    }
    const INT64: i32 = DataType::Int64 as i32;
    const BOOL: i32 = DataType::Bool as i32;
    for n in &g.nodes {
        let of = |i: usize| n.input(i).and_then(|v| t.get(v)).copied().unwrap_or(0);
        let first = n
            .inputs
            .iter()
            .filter(|v| !v.is_empty())
            .find_map(|v| t.get(v).copied())
            .unwrap_or(0);
        let mut types = Vec::with_capacity(n.outputs.len());
        for k in 0..n.outputs.len() {
            let ty = match (n.op_type.as_str(), k) {
                ("Cast", _) => n.attr_int("to", 0).unwrap_or(0) as i32,
                ("CastLike", _) => of(1),
                ("Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" | "NonMaxSuppression", _) => {
                    INT64
                }
                ("MaxPool" | "TopK" | "Unique", k) if k > 0 => INT64,
                ("Dropout", 1) => BOOL,
                (
                    "Equal" | "Greater" | "GreaterOrEqual" | "Less" | "LessOrEqual" | "Not" | "And"
                    | "Or" | "Xor" | "IsNaN" | "IsInf",
                    _,
                ) => BOOL,
                ("Where", _) => of(1),
                ("OneHot", _) => of(2),
                ("ConstantOfShape", _) => n
                    .attr_tensor("value")
                    .ok()
                    .flatten()
                    .map(|v| v.data.dtype() as i32)
                    .unwrap_or(FLOAT),
                _ => first,
            };
            types.push(ty);
        }
        for (o, ty) in n.outputs.iter().zip(types) {
            t.insert(o.clone(), ty);
        }
    }
    t
}

/// The precision each node computes in.
fn modes(g: &Graph, is_float: &dyn Fn(&str) -> bool) -> Vec<Mode> {
    let consumers = g.consumers();
    let mut modes = vec![Mode::Half; g.nodes.len()];
    // Backwards, so every reader of a value is decided before the value's producer.
    for j in (0..g.nodes.len()).rev() {
        let n = &g.nodes[j];
        let shape_value = |o: &str| {
            if g.is_output(o) {
                return false;
            }
            let Some(readers) = consumers.get(o) else {
                return false;
            };
            readers.iter().all(|&r| {
                let c = &g.nodes[r];
                modes[r] == Mode::Shape
                    || c.inputs.iter().enumerate().all(|(i, v)| {
                        v != o
                            || float32_input(c, i)
                            || (c.op_type == "Cast"
                                && !matches!(
                                    c.attr_int("to", 0).map(|to| to as i32),
                                    Ok(FLOAT | FLOAT16)
                                ))
                    })
            })
        };
        let float_outputs: Vec<&String> = n.outputs.iter().filter(|o| is_float(o)).collect();
        modes[j] = if !float_outputs.is_empty() && float_outputs.iter().all(|o| shape_value(o)) {
            Mode::Shape
        } else if FLOAT32_OPS.iter().any(|(op, _)| *op == n.op_type) && n.domain.is_empty() {
            Mode::CastPair
        } else {
            Mode::Half
        };
    }
    modes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::{
        self, argmax_rows, digits, max_abs_diff, model, node, run, value,
    };
    use crate::runtime::BackendKind;

    /// `m` with float16 inputs and outputs wrapped in Casts from and to float32, so that the
    /// float32 sessions of `runtime` can feed it.
    fn wrap_float32_io(m: &Model) -> Model {
        let mut m = m.clone();
        let g = &mut m.graph;
        for v in g.inputs.iter_mut().filter(|v| v.elem_type == FLOAT16) {
            let outer = format!("{}_f32", v.name);
            g.nodes.push(testutil::cast(&outer, &v.name, FLOAT16));
            v.name = outer;
            v.elem_type = FLOAT;
        }
        for v in g.outputs.iter_mut().filter(|v| v.elem_type == FLOAT16) {
            let outer = format!("{}_f32", v.name);
            g.nodes.push(testutil::cast(&v.name, &outer, FLOAT));
            v.name = outer;
            v.elem_type = FLOAT;
        }
        g.sort_topologically().unwrap();
        m
    }

    fn float_bytes(m: &Model) -> (usize, usize) {
        let g = &m.graph;
        let f32b = g
            .initializers
            .values()
            .filter(|t| t.as_f32().is_some())
            .map(Tensor::byte_size)
            .sum();
        let f16b = g
            .initializers
            .values()
            .filter(|t| matches!(t.data, Data::F16(_)))
            .map(Tensor::byte_size)
            .sum();
        (f32b, f16b)
    }

    /// Top-1 flips between two logit batches.
    fn flips(a: &[f32], b: &[f32]) -> usize {
        argmax_rows(a, 10)
            .iter()
            .zip(&argmax_rows(b, 10))
            .filter(|(p, q)| p != q)
            .count()
    }

    // Measured max |float32 − float16| over the logits, relative to the largest float32
    // logit: teacher (1000 digits) ORT 5.3e-4, tract 1.5e-3; mbv2_tiny (64 normal inputs)
    // ORT 2.7e-4, tract 2.8e-4. No top-1 change on any input. The bound below is 5e-3.
    #[test]
    fn fixtures_in_fp16_run_in_ort_and_tract_close_to_float32() {
        let (shape, digits_x, _) = digits("digits_val.npz", 1000);
        let cases = [
            ("teacher.onnx", shape, digits_x, 2),
            (
                "mbv2_tiny.onnx",
                vec![64, 3, 32, 32],
                testutil::normal(64 * 3 * 32 * 32, 5),
                0,
            ),
        ];
        for (file, shape, x, max_flips) in cases {
            let f = Model::load(&testutil::fixture(file)).unwrap();
            let (h, mut report) = to_fp16(&f, true).unwrap();
            let (h_io16, _) = to_fp16(&f, false).unwrap();
            for backend in [BackendKind::Ort, BackendKind::Tract] {
                let a = &run(&f, backend, &shape, &x).unwrap()[0].data;
                let b = &run(&h, backend, &shape, &x).unwrap()[0].data;
                let c = &run(&wrap_float32_io(&h_io16), backend, &shape, &x).unwrap()[0].data;
                report.compare(a, b).unwrap();
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (io, out) in [("float32 io", b), ("float16 io", c)] {
                    let d = max_abs_diff(a, out);
                    assert!(
                        d <= 5e-3 * scale,
                        "{file} {backend} {io}: max diff {d} at logit scale {scale}"
                    );
                    let n = flips(a, out);
                    assert!(
                        n <= max_flips,
                        "{file} {backend} {io}: top-1 changed on {n} inputs"
                    );
                }
            }
            assert!(report.output_max_abs_diff.unwrap() <= 5e-3 * report.output_max_abs.unwrap());
            assert_eq!(report.compared_values, 2 * shape[0] * 10);
        }
    }

    // Float initializer bytes halve exactly; the file shrinks a little less because names
    // and graph structure stay: measured 0.521 (teacher) and 0.556 (mbv2_tiny, whose 17
    // BatchNormalizations bring many small named tensors).
    #[test]
    fn weights_halve_and_io_types_follow_the_flag() {
        for (file, max_ratio) in [("teacher.onnx", 0.53), ("mbv2_tiny.onnx", 0.56)] {
            let f = Model::load(&testutil::fixture(file)).unwrap();
            let (before, _) = float_bytes(&f);
            for keep_io_types in [true, false] {
                let (h, report) = to_fp16(&f, keep_io_types).unwrap();
                let g = &h.graph;
                assert_eq!(float_bytes(&h), (0, before / 2), "{file}");
                assert!(
                    report.size_ratio < max_ratio,
                    "{file}: {}",
                    report.size_ratio
                );
                assert_eq!(report.size_before_bytes, encoded_len(&f));
                assert_eq!(report.size_after_bytes, encoded_len(&h));
                assert!(report.float32_initializers.is_empty());
                assert!(g.value_info.is_empty());
                // Gemm computes in float32 from float16 weights cast in the graph.
                assert_eq!(report.float32_nodes.len(), 1);
                assert_eq!(report.float32_nodes[0].op, "Gemm");
                let gemm = g.nodes.iter().find(|n| n.op_type == "Gemm").unwrap();
                let producers = g.producers();
                for v in &gemm.inputs {
                    assert_eq!(
                        g.nodes[producers[v.as_str()]].op_type,
                        "Cast",
                        "{file}: {v}"
                    );
                }
                let io = if keep_io_types { FLOAT } else { FLOAT16 };
                assert!(g.inputs.iter().chain(&g.outputs).all(|v| v.elem_type == io));
                let input = &g.inputs[0].name;
                let readers: Vec<_> = g
                    .nodes
                    .iter()
                    .filter(|n| n.inputs.contains(input))
                    .collect();
                if keep_io_types {
                    assert!(readers.len() == 1 && readers[0].op_type == "Cast");
                    assert_eq!(readers[0].attr_int("to", 0).unwrap(), i64::from(FLOAT16));
                } else {
                    assert!(readers.iter().all(|n| n.op_type != "Cast"));
                }
            }
        }
    }

    /// x → Conv → Add(S) → Resize(scales S) → Reshape(Cast_int64(Cast_float(Shape) × K)) →
    /// Flatten → Gemm: an initializer read both as data and as Resize scales, and a shape
    /// computation in float.
    fn resize_model() -> Model {
        let f32t =
            |name: &str, dims: Vec<usize>, v: Vec<f32>| Tensor::new(name, dims, Data::F32(v));
        let mut to_float = testutil::cast("s", "sf", FLOAT);
        to_float.name = "shape_to_float".into();
        let mut to_int = testutil::cast("sk", "shp", DataType::Int64 as i32);
        to_int.name = "shape_to_int".into();
        let mut gemm = node("gemm", "Gemm", &["flat", "w2", "b2"], &["y"]);
        gemm.attributes.push(make_attr_int("transB", 1));
        model(
            vec![value("x", FLOAT, &[1, 2, 4, 4])],
            vec![value("y", FLOAT, &[1, 3])],
            vec![
                node("conv", "Conv", &["x", "w1"], &["c"]),
                node("add", "Add", &["c", "s_init"], &["a"]),
                node("resize", "Resize", &["a", "", "s_init"], &["r"]),
                node("shape", "Shape", &["r"], &["s"]),
                to_float,
                node("scale_shape", "Mul", &["sf", "k"], &["sk"]),
                to_int,
                node("reshape", "Reshape", &["r", "shp"], &["rs"]),
                node("flatten", "Flatten", &["rs"], &["flat"]),
                gemm,
            ],
            vec![
                f32t("w1", vec![2, 2, 1, 1], testutil::normal(4, 1)),
                f32t("s_init", vec![4], vec![1.0, 1.0, 2.0, 2.0]),
                f32t("k", vec![4], vec![1.0, 4.0, 0.5, 0.5]),
                f32t("w2", vec![3, 128], testutil::normal(384, 2)),
                f32t("b2", vec![3], vec![0.1, -0.2, 0.3]),
            ],
            13,
        )
    }

    #[test]
    fn resize_scales_and_shape_computations_stay_float32() {
        let f = resize_model();
        let (h, report) = to_fp16(&f, true).unwrap();
        let g = &h.graph;
        let resize = g.nodes.iter().find(|n| n.op_type == "Resize").unwrap();
        let add = g.nodes.iter().find(|n| n.op_type == "Add").unwrap();
        // The data use reads float16 `s_init`, the scales a float32 copy.
        assert!(matches!(g.initializers[&add.inputs[1]].data, Data::F16(_)));
        assert_eq!(add.inputs[1], "s_init");
        assert_eq!(
            g.initializers[&resize.inputs[2]].as_f32().unwrap(),
            [1.0, 1.0, 2.0, 2.0]
        );
        assert!(g.initializers["k"].as_f32().is_some());
        assert_eq!(report.float32_initializers, ["k", "s_init"]);
        let mut kept: Vec<_> = report
            .float32_nodes
            .iter()
            .map(|n| (n.node.as_str(), n.reason.as_str()))
            .collect();
        kept.sort();
        assert_eq!(
            kept[1..],
            [
                ("scale_shape", "shape computation"),
                ("shape_to_float", "shape computation")
            ]
        );
        assert_eq!(kept[0].0, "gemm");
        let cast = g.nodes.iter().find(|n| n.name == "shape_to_float").unwrap();
        assert_eq!(cast.attr_int("to", 0).unwrap(), i64::from(FLOAT));

        let x = testutil::normal(32, 3);
        for backend in [BackendKind::Ort, BackendKind::Tract] {
            let a = &run(&f, backend, &[1, 2, 4, 4], &x).unwrap()[0].data;
            let b = &run(&h, backend, &[1, 2, 4, 4], &x).unwrap()[0].data;
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                max_abs_diff(a, b) <= 5e-3 * scale,
                "{backend}: {a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn onnx_checker_accepts_the_fp16_models() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        let models = [
            (
                "teacher",
                Model::load(&testutil::fixture("teacher.onnx")).unwrap(),
            ),
            (
                "mbv2_tiny",
                Model::load(&testutil::fixture("mbv2_tiny.onnx")).unwrap(),
            ),
            ("resize", resize_model()),
        ];
        for (name, f) in models {
            for keep_io_types in [true, false] {
                let p = dir.path().join(format!("{name}_{keep_io_types}.onnx"));
                to_fp16(&f, keep_io_types).unwrap().0.save(&p).unwrap();
                paths.push(p);
            }
        }
        testutil::onnx_check(&paths);
    }

    #[test]
    fn a_quantized_model_is_refused() {
        let (_, q) = testutil::teacher();
        let e = to_fp16(q, true).unwrap_err().to_string();
        assert!(e.contains("quantized") && e.contains("float model"), "{e}");
    }

    #[test]
    fn values_beyond_float16_range_are_clamped_not_infinite() {
        let (v, clamped) = to_half(&[1e6, -1e6, 1.0, f32::INFINITY]);
        assert_eq!(clamped, 2);
        assert_eq!(v[0], f16::MAX);
        assert_eq!(v[1], f16::MIN);
        assert_eq!(v[2], f16::ONE);
        assert!(v[3].is_infinite());
    }
}
