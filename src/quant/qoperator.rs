//! QDQ → QOperator: rewrites a model written by [`super::qdq`] into ONNX's operator-oriented
//! quantized format, with standard-domain operators only.
//!
//! - `DequantizeLinear → Conv → [Relu|Clip] → QuantizeLinear` becomes one `QLinearConv`.
//! - `MatMul`, and `Gemm` without a bias, become `QLinearMatMul` (a `transB` weight is
//!   transposed as int8).
//! - `Gemm` with a bias becomes `Reshape → QLinearConv (1×1) → Reshape`. `QLinearMatMul` has
//!   no bias input, and a separate `Add` would round the output twice, through an
//!   intermediate scale no calibration chose; the 1×1 convolution adds the int32 bias to the
//!   int32 accumulator before the one rounding, as the QDQ model specifies.
//! - Every other quantized op (Add, Mul, pooling, Concat, Flatten, ...) stays a QDQ island
//!   (DequantizeLinear → float op → QuantizeLinear): their QLinear forms exist only in the
//!   `com.microsoft` domain.
//!
//! A Relu/Clip between the op and its QuantizeLinear is folded only when the output's
//! saturation already performs it: QuantizeLinear maps the lower bound to the type's minimum
//! and the upper bound to its maximum (for Relu: the zero point is the type's minimum). Then
//! `Q(clip(x)) = Q(x)` for every `x`, since QuantizeLinear is monotonic. Otherwise the QLinear
//! op writes the activation's own scale and zero point and the activation runs on
//! dequantized values (`QLinearConv → DequantizeLinear → Clip → QuantizeLinear`), which is
//! also exact: `Q(clip(DQ(Q(x)))) = Q(clip(x))` for a monotonic `Q` with `Q(DQ(q)) = q`.
//!
//! The QLinear ops take the QDQ model's integers unchanged: int8 weights (with explicit zero
//! zero points, which QLinearConv and QLinearMatMul require), int32 biases whose scale is
//! input scale × weight scale (requantized if another tool chose a different one; a float
//! bias is quantized with that scale, as ONNX Runtime does when it fuses a QDQ Conv).

use std::collections::HashMap;

use anyhow::{ensure, Result};
use serde::Serialize;

use super::arith::{quantize, quantize_bias, QParams, QType};
use super::patch::Patch;
use crate::onnx::ir::{Graph, Model, Node};
use crate::onnx::{Data, Tensor};

/// The first opset with QLinearConv and QLinearMatMul.
const MIN_OPSET: i64 = 10;

/// What [`to_qoperator`] did, node by node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QOperatorReport {
    /// Nodes that became QLinear operators.
    pub converted: Vec<ConvertedNode>,
    /// Float nodes left between DequantizeLinear and QuantizeLinear, and why.
    pub qdq_islands: Vec<Island>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConvertedNode {
    pub node: String,
    pub op: String,
    /// `QLinearConv` or `QLinearMatMul`.
    pub qlinear_op: String,
    /// The Relu/Clip that the integer output's saturation performs.
    pub folded_activation: Option<String>,
    /// The Relu/Clip kept after the QLinear op, on dequantized values.
    pub unfolded_activation: Option<String>,
    pub bias: BiasOrigin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasOrigin {
    None,
    /// The QDQ model's int32 bias, used as is.
    Int32,
    /// An int32 bias whose scale was not input scale × weight scale, requantized to it.
    Requantized,
    /// A float bias, quantized with scale input scale × weight scale.
    QuantizedFromFloat,
}

#[derive(Debug, Clone, Serialize)]
pub struct Island {
    pub node: String,
    pub op: String,
    pub reason: String,
}

const NO_QLINEAR_FORM: &str = "no standard-domain QLinear operator; runs in float between DequantizeLinear and QuantizeLinear";

/// Converts a QDQ model into QOperator form; see the module documentation for what becomes
/// what. Nodes that cannot be converted stay as QDQ islands and are listed with the reason.
pub fn to_qoperator(qdq: &Model) -> Result<(Model, QOperatorReport)> {
    ensure!(
        qdq.opset >= MIN_OPSET,
        "the model imports opset {}; QLinearConv and QLinearMatMul need opset {MIN_OPSET} or later",
        qdq.opset
    );
    let g = &qdq.graph;
    ensure!(
        g.nodes.iter().any(|n| is(n, "DequantizeLinear")),
        "the model has no DequantizeLinear node, so it is not a QDQ model; quantize it first with `shrink quantize`"
    );
    let ctx = Ctx {
        g,
        producers: g.producers(),
        consumers: g.consumers(),
    };
    let mut patch = Patch::new(g);
    let mut report = QOperatorReport::default();
    let mut reasons: HashMap<String, String> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let converted = match n.op_type.as_str() {
            _ if !n.domain.is_empty() => continue,
            "Conv" => ctx.conv(i, &mut patch),
            "Gemm" => ctx.gemm(i, &mut patch),
            "MatMul" => ctx.matmul(i, &mut patch),
            _ => continue,
        };
        match converted {
            Ok(c) => {
                if let Some(a) = &c.unfolded_activation {
                    reasons.insert(
                        a.clone(),
                        format!("kept after {} `{}`: the output's saturation does not perform it exactly, so it runs on dequantized values", c.qlinear_op, c.node),
                    );
                }
                report.converted.push(c);
            }
            Err(why) => {
                reasons.insert(n.name.clone(), why);
            }
        }
    }
    let mut m = qdq.clone();
    patch.apply(&mut m.graph)?;
    report.qdq_islands = islands(&m.graph, &reasons);
    Ok((m, report))
}

fn is(n: &Node, op: &str) -> bool {
    n.domain.is_empty() && n.op_type == op
}

/// Float nodes that read a DequantizeLinear output or feed a QuantizeLinear.
fn islands(g: &Graph, reasons: &HashMap<String, String>) -> Vec<Island> {
    let producers = g.producers();
    let consumers = g.consumers();
    g.nodes
        .iter()
        .filter(|n| {
            !(is(n, "QuantizeLinear")
                || is(n, "DequantizeLinear")
                || n.op_type.starts_with("QLinear"))
        })
        .filter(|n| {
            let reads_dq = n.inputs.iter().any(|i| {
                producers
                    .get(i.as_str())
                    .is_some_and(|&p| is(&g.nodes[p], "DequantizeLinear"))
            });
            let feeds_q = n.outputs.iter().any(|o| {
                consumers
                    .get(o.as_str())
                    .is_some_and(|cs| cs.iter().any(|&c| is(&g.nodes[c], "QuantizeLinear")))
            });
            reads_dq || feeds_q
        })
        .map(|n| Island {
            node: n.name.clone(),
            op: n.op_type.clone(),
            reason: reasons
                .get(&n.name)
                .cloned()
                .unwrap_or_else(|| NO_QLINEAR_FORM.to_string()),
        })
        .collect()
}

struct Ctx<'a> {
    g: &'a Graph,
    producers: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
}

/// A per-tensor quantized value: its integer tensor and parameter initializers.
#[derive(Debug, Clone)]
struct QValue {
    q: String,
    scale: String,
    zero_point: String,
    params: QParams,
    qtype: QType,
}

/// An int8 initializer behind DequantizeLinear with a zero point of 0, per tensor (`axis`
/// None) or per channel.
#[derive(Debug, Clone)]
struct Int8Const {
    name: String,
    dims: Vec<usize>,
    data: Vec<i8>,
    scale: String,
    scale_dims: Vec<usize>,
    scales: Vec<f32>,
    axis: Option<usize>,
}

/// The QuantizeLinear after an op, possibly through a Relu/Clip.
#[derive(Debug, Clone)]
struct Output {
    q_node: usize,
    y: QValue,
    activation: Option<usize>,
    fold: bool,
}

enum MatMulB {
    Weight(Int8Const),
    Value(QValue),
}

enum Bias {
    /// An int32 initializer of the right shape and scale, read directly.
    Reuse(String),
    New(Vec<i32>),
}

type Plan<T> = std::result::Result<T, String>;

impl Ctx<'_> {
    fn dequantize_node(&self, value: &str) -> Option<&Node> {
        self.producers
            .get(value)
            .map(|&i| &self.g.nodes[i])
            .filter(|n| is(n, "DequantizeLinear"))
    }

    fn qvalue(&self, q: &str, scale: Option<&str>, zero_point: Option<&str>) -> Plan<QValue> {
        let inits = &self.g.initializers;
        let scale = scale.ok_or_else(|| format!("`{q}` has no scale"))?;
        let s = inits
            .get(scale)
            .filter(|t| t.numel() == 1)
            .and_then(Tensor::as_f32)
            .map(|v| v[0])
            .ok_or_else(|| format!("the scale of `{q}` is not a scalar float initializer"))?;
        let zp = zero_point.ok_or_else(|| {
            format!("`{q}` has no zero point input; QLinear operators need it explicit")
        })?;
        let (z, qtype) = match inits.get(zp).filter(|t| t.numel() == 1).map(|t| &t.data) {
            Some(Data::U8(v)) => (v[0] as i32, QType::U8),
            Some(Data::I8(v)) => (v[0] as i32, QType::I8),
            _ => {
                return Err(format!(
                    "the zero point of `{q}` is not a scalar uint8/int8 initializer"
                ))
            }
        };
        Ok(QValue {
            q: q.to_string(),
            scale: scale.to_string(),
            zero_point: zp.to_string(),
            params: QParams {
                scale: s,
                zero_point: z,
            },
            qtype,
        })
    }

    /// `value` as the output of a per-tensor DequantizeLinear.
    fn activation(&self, value: &str) -> Plan<QValue> {
        let dq = self
            .dequantize_node(value)
            .ok_or_else(|| format!("`{value}` is not read through DequantizeLinear"))?;
        self.qvalue(dq.input(0).unwrap_or_default(), dq.input(1), dq.input(2))
    }

    /// `value` as the output of a DequantizeLinear of an int8 initializer.
    fn int8_const(&self, value: &str) -> Plan<Int8Const> {
        let inits = &self.g.initializers;
        let dq = self
            .dequantize_node(value)
            .ok_or_else(|| format!("`{value}` is not read through DequantizeLinear"))?;
        let name = dq.input(0).unwrap_or_default();
        let t = inits
            .get(name)
            .ok_or_else(|| format!("`{name}` is not an initializer"))?;
        let Data::I8(data) = &t.data else {
            return Err(format!(
                "weight `{name}` is {:?}; only int8 weights are converted",
                t.data.dtype()
            ));
        };
        let scale = dq
            .input(1)
            .ok_or_else(|| format!("`{name}` has no scale"))?;
        let st = inits
            .get(scale)
            .filter(|t| t.dims.len() <= 1)
            .ok_or_else(|| format!("the scale of `{name}` is not a 0-D or 1-D initializer"))?;
        let scales = st
            .as_f32()
            .ok_or_else(|| format!("the scale of `{name}` is not float32"))?
            .to_vec();
        let axis = if scales.len() == 1 {
            None
        } else {
            let rank = t.dims.len() as i64;
            let a = dq.attr_int("axis", 1).map_err(|e| e.to_string())?;
            let a = if a < 0 { a + rank } else { a };
            if !(0..rank).contains(&a) || t.dims[a as usize] != scales.len() {
                return Err(format!(
                    "`{name}` of shape {:?} has {} scales along axis {a}",
                    t.dims,
                    scales.len()
                ));
            }
            Some(a as usize)
        };
        if let Some(zp) = dq.input(2) {
            let zero = matches!(inits.get(zp).map(|t| &t.data), Some(Data::I8(v)) if v.iter().all(|&z| z == 0));
            if !zero {
                return Err(format!(
                    "weight `{name}` has a zero point other than int8 zeros"
                ));
            }
        }
        Ok(Int8Const {
            name: name.to_string(),
            dims: t.dims.clone(),
            data: data.clone(),
            scale: scale.to_string(),
            scale_dims: st.dims.clone(),
            scales,
            axis,
        })
    }

    /// The int32 bias of `channels` outputs for an op with input scale `x_scale` and weight
    /// scales `w_scales` (one, or one per channel).
    fn bias(
        &self,
        value: &str,
        x_scale: f32,
        w_scales: &[f32],
        channels: usize,
    ) -> Plan<(Bias, BiasOrigin)> {
        let inits = &self.g.initializers;
        let per = |v: &[f32], c: usize| v[if v.len() == 1 { 0 } else { c }];
        let fits = |n: usize| n == 1 || n == channels;
        if let Some(t) = inits.get(value) {
            let v = t
                .as_f32()
                .filter(|v| fits(v.len()))
                .ok_or_else(|| format!("bias `{value}` is not float32 with {channels} values"))?;
            let v: Vec<f32> = (0..channels).map(|c| per(v, c)).collect();
            let qb = quantize_bias(&v, x_scale, w_scales).map_err(|e| e.to_string())?;
            if qb.saturated > 0 {
                return Err(format!(
                    "bias `{value}` does not fit int32 at scale input scale × weight scale"
                ));
            }
            return Ok((Bias::New(qb.data), BiasOrigin::QuantizedFromFloat));
        }
        let dq = self.dequantize_node(value).ok_or_else(|| {
            format!("bias `{value}` is neither an initializer nor read through DequantizeLinear")
        })?;
        let name = dq.input(0).unwrap_or_default();
        let t = inits
            .get(name)
            .ok_or_else(|| format!("bias `{name}` is not an initializer"))?;
        let Data::I32(q) = &t.data else {
            return Err(format!("bias `{name}` is not int32"));
        };
        let scales = dq
            .input(1)
            .and_then(|s| inits.get(s))
            .and_then(Tensor::as_f32)
            .filter(|s| fits(s.len()))
            .ok_or_else(|| format!("the scale of bias `{name}` is not a float initializer with 1 or {channels} values"))?;
        if !fits(q.len()) {
            return Err(format!(
                "bias `{name}` has {} values for {channels} outputs",
                q.len()
            ));
        }
        if let Some(zp) = dq.input(2) {
            if !matches!(inits.get(zp).map(|t| &t.data), Some(Data::I32(v)) if v.iter().all(|&z| z == 0))
            {
                return Err(format!("bias `{name}` has a nonzero zero point"));
            }
        }
        let expected = |c: usize| x_scale * per(w_scales, c);
        let same_scale = (0..channels).all(|c| {
            let (s, e) = (per(scales, c), expected(c));
            (s - e).abs() <= 1e-6 * e.abs()
        });
        if same_scale {
            if t.dims == [channels] {
                return Ok((Bias::Reuse(name.to_string()), BiasOrigin::Int32));
            }
            let v = (0..channels)
                .map(|c| q[if q.len() == 1 { 0 } else { c }])
                .collect();
            return Ok((Bias::New(v), BiasOrigin::Int32));
        }
        let v: Vec<f32> = (0..channels)
            .map(|c| {
                (f64::from(q[if q.len() == 1 { 0 } else { c }]) * f64::from(per(scales, c))) as f32
            })
            .collect();
        let qb = quantize_bias(&v, x_scale, w_scales).map_err(|e| e.to_string())?;
        if qb.saturated > 0 {
            return Err(format!(
                "bias `{name}` does not fit int32 at scale input scale × weight scale"
            ));
        }
        Ok((Bias::New(qb.data), BiasOrigin::Requantized))
    }

    /// The only reader of `value`, unless `value` is a graph output.
    fn sole_reader(&self, value: &str) -> Option<usize> {
        if self.g.is_output(value) {
            return None;
        }
        match self.consumers.get(value).map(Vec::as_slice) {
            Some([c]) => Some(*c),
            _ => None,
        }
    }

    /// The QuantizeLinear that `value` (an op's output) feeds, directly or through a Relu/Clip.
    fn output(&self, value: &str) -> Plan<Output> {
        let no = || {
            format!("its output `{value}` is not read by one QuantizeLinear alone (directly or through one Relu/Clip)")
        };
        let c = self.sole_reader(value).ok_or_else(no)?;
        let n = &self.g.nodes[c];
        let (activation, q_node) = if is(n, "Relu") || is(n, "Clip") {
            let q = self
                .sole_reader(&n.outputs[0])
                .filter(|&q| is(&self.g.nodes[q], "QuantizeLinear"))
                .ok_or_else(no)?;
            (Some(c), q)
        } else if is(n, "QuantizeLinear") {
            (None, c)
        } else {
            return Err(no());
        };
        let q = &self.g.nodes[q_node];
        let y = self.qvalue(&q.outputs[0], q.input(1), q.input(2))?;
        let fold = match activation {
            None => true,
            Some(a) => match self.bounds(&self.g.nodes[a]) {
                Some((lo, hi)) => {
                    quantize(lo, y.params, y.qtype) == y.qtype.qmin()
                        && quantize(hi, y.params, y.qtype) == y.qtype.qmax()
                }
                None => false,
            },
        };
        Ok(Output {
            q_node,
            y,
            activation,
            fold,
        })
    }

    /// The bounds a Relu/Clip clamps to, when they are constants.
    fn bounds(&self, n: &Node) -> Option<(f32, f32)> {
        if n.op_type == "Relu" {
            return Some((0.0, f32::INFINITY));
        }
        // Clip-11 and later take the bounds as optional inputs, Clip-6 as attributes.
        let bound = |i: usize, attr: &str, default: f32| -> Option<f32> {
            match n.input(i) {
                Some(v) => self
                    .g
                    .initializers
                    .get(v)
                    .filter(|t| t.numel() == 1)
                    .and_then(Tensor::as_f32)
                    .map(|v| v[0]),
                None => n.attr_float(attr, default).ok(),
            }
        };
        Some((
            bound(1, "min", f32::NEG_INFINITY)?,
            bound(2, "max", f32::INFINITY)?,
        ))
    }

    /// Removes the op's output chain as far as the QLinear op replaces it; returns the name
    /// the QLinear op must write.
    fn replace_output(&self, p: &mut Patch, op: &Node, out: &Output) -> String {
        match out.activation {
            Some(_) if !out.fold => {
                let q = p.fresh(&format!("{}_quantized", op.outputs[0]));
                let name = p.fresh(&format!("{}/DequantizeLinear", op.name));
                p.add_node(node(
                    name,
                    "DequantizeLinear",
                    vec![q.clone(), out.y.scale.clone(), out.y.zero_point.clone()],
                    vec![op.outputs[0].clone()],
                ));
                q
            }
            _ => {
                p.remove(out.q_node);
                if let Some(a) = out.activation {
                    p.remove(a);
                }
                out.y.q.clone()
            }
        }
    }

    fn converted(&self, op: &Node, qlinear: &str, out: &Output, bias: BiasOrigin) -> ConvertedNode {
        let act = out.activation.map(|a| self.g.nodes[a].name.clone());
        ConvertedNode {
            node: op.name.clone(),
            op: op.op_type.clone(),
            qlinear_op: qlinear.to_string(),
            folded_activation: act.clone().filter(|_| out.fold),
            unfolded_activation: act.filter(|_| !out.fold),
            bias,
        }
    }

    fn conv(&self, i: usize, p: &mut Patch) -> Plan<ConvertedNode> {
        let n = &self.g.nodes[i];
        let x = self.activation(n.input(0).unwrap_or_default())?;
        let w = self.int8_const(n.input(1).unwrap_or_default())?;
        if w.dims.len() < 3 {
            return Err(format!("weight `{}` has rank {}", w.name, w.dims.len()));
        }
        if w.axis.is_some_and(|a| a != 0) {
            return Err(format!(
                "weight `{}` is quantized per channel along axis {:?}; QLinearConv takes scales per output channel (axis 0)",
                w.name, w.axis
            ));
        }
        let bias = n
            .input(2)
            .map(|b| self.bias(b, x.params.scale, &w.scales, w.dims[0]))
            .transpose()?;
        let out = self.output(&n.outputs[0])?;

        p.remove(i);
        let w_zp = weight_zero_point(p, &w);
        let y = self.replace_output(p, n, &out);
        let mut inputs = vec![
            x.q,
            x.scale,
            x.zero_point,
            w.name.clone(),
            w.scale.clone(),
            w_zp,
            out.y.scale.clone(),
            out.y.zero_point.clone(),
        ];
        let origin = match bias {
            Some((b, origin)) => {
                inputs.push(bias_input(p, n, b));
                origin
            }
            None => BiasOrigin::None,
        };
        p.add_node(Node {
            name: n.name.clone(),
            op_type: "QLinearConv".into(),
            domain: String::new(),
            inputs,
            outputs: vec![y],
            attributes: n.attributes.clone(),
        });
        Ok(self.converted(n, "QLinearConv", &out, origin))
    }

    fn gemm(&self, i: usize, p: &mut Patch) -> Plan<ConvertedNode> {
        let n = &self.g.nodes[i];
        let attr_f = |k: &str| n.attr_float(k, 1.0).map_err(|e| e.to_string());
        let attr_i = |k: &str| n.attr_int(k, 0).map_err(|e| e.to_string());
        if attr_f("alpha")? != 1.0 || attr_i("transA")? != 0 {
            return Err("alpha ≠ 1 or transA set; only Gemm(A, B) + C converts".into());
        }
        if n.input(2).is_some() && attr_f("beta")? != 1.0 {
            return Err("beta ≠ 1; only Gemm(A, B) + C converts".into());
        }
        let trans_b = attr_i("transB")? != 0;
        let x = self.activation(n.input(0).unwrap_or_default())?;
        let w = self.int8_const(n.input(1).unwrap_or_default())?;
        if w.dims.len() != 2 {
            return Err(format!("weight `{}` has rank {}", w.name, w.dims.len()));
        }
        let (cols, k) = if trans_b {
            (w.dims[0], w.dims[1])
        } else {
            (w.dims[1], w.dims[0])
        };
        let out_axis = if trans_b { 0 } else { 1 };
        if w.axis.is_some_and(|a| a != out_axis) {
            return Err(format!(
                "weight `{}` is quantized per channel along its input axis",
                w.name
            ));
        }
        let bias = n
            .input(2)
            .map(|b| self.bias(b, x.params.scale, &w.scales, cols))
            .transpose()?;
        let out = self.output(&n.outputs[0])?;

        p.remove(i);
        let w_zp = weight_zero_point(p, &w);
        let y = self.replace_output(p, n, &out);
        let Some((b, origin)) = bias else {
            // B as [K, N] with per-column scales.
            let b = if trans_b {
                p.add_initializer_once(
                    &format!("kn:{}", w.name),
                    &format!("{}_transposed", w.name),
                    || Tensor::new("", vec![k, cols], Data::I8(transpose(&w.data, cols, k))),
                )
            } else {
                w.name.clone()
            };
            p.add_node(node(
                n.name.clone(),
                "QLinearMatMul",
                vec![
                    x.q,
                    x.scale,
                    x.zero_point,
                    b,
                    w.scale.clone(),
                    w_zp,
                    out.y.scale.clone(),
                    out.y.zero_point.clone(),
                ],
                vec![y],
            ));
            return Ok(self.converted(n, "QLinearMatMul", &out, BiasOrigin::None));
        };
        // [M, K] → [M, K, 1, 1] → QLinearConv with [N, K, 1, 1] → [M, N, 1, 1] → [M, N].
        let w11 = p.add_initializer_once(
            &format!("nk11:{}", w.name),
            &format!("{}_1x1", w.name),
            || {
                let data = if trans_b {
                    w.data.clone()
                } else {
                    transpose(&w.data, k, cols)
                };
                Tensor::new("", vec![cols, k, 1, 1], Data::I8(data))
            },
        );
        let to_4d = p.add_initializer_once("shape:nchw", "gemm_as_conv_input_shape", || {
            Tensor::new("", vec![4], Data::I64(vec![0, -1, 1, 1]))
        });
        let to_2d = p.add_initializer_once("shape:nc", "gemm_as_conv_output_shape", || {
            Tensor::new("", vec![2], Data::I64(vec![0, -1]))
        });
        let x4 = p.fresh(&format!("{}_nchw", x.q));
        let y4 = p.fresh(&format!("{y}_nchw"));
        let reshape_in = p.fresh(&format!("{}/Reshape_input", n.name));
        p.add_node(node(
            reshape_in,
            "Reshape",
            vec![x.q.clone(), to_4d],
            vec![x4.clone()],
        ));
        let b = bias_input(p, n, b);
        p.add_node(node(
            n.name.clone(),
            "QLinearConv",
            vec![
                x4,
                x.scale,
                x.zero_point,
                w11,
                w.scale.clone(),
                w_zp,
                out.y.scale.clone(),
                out.y.zero_point.clone(),
                b,
            ],
            vec![y4.clone()],
        ));
        let reshape_out = p.fresh(&format!("{}/Reshape_output", n.name));
        p.add_node(node(reshape_out, "Reshape", vec![y4, to_2d], vec![y]));
        Ok(self.converted(n, "QLinearConv", &out, origin))
    }

    fn matmul(&self, i: usize, p: &mut Patch) -> Plan<ConvertedNode> {
        let n = &self.g.nodes[i];
        let a = self.activation(n.input(0).unwrap_or_default())?;
        let b_value = n.input(1).unwrap_or_default();
        // B is an int8 weight, or a second quantized activation.
        let b = match self.int8_const(b_value) {
            Ok(w) => {
                if w.axis.is_some() && !(w.dims.len() == 2 && w.axis == Some(1)) {
                    return Err(format!(
                        "weight `{}` of shape {:?} is quantized per channel along axis {:?}; QLinearMatMul takes per-column scales of a 2-D weight",
                        w.name, w.dims, w.axis
                    ));
                }
                MatMulB::Weight(w)
            }
            Err(_) => MatMulB::Value(self.activation(b_value)?),
        };
        let out = self.output(&n.outputs[0])?;

        p.remove(i);
        let (b, b_scale, b_zp) = match b {
            MatMulB::Weight(w) => {
                let zp = weight_zero_point(p, &w);
                (w.name, w.scale, zp)
            }
            MatMulB::Value(v) => (v.q, v.scale, v.zero_point),
        };
        let y = self.replace_output(p, n, &out);
        p.add_node(node(
            n.name.clone(),
            "QLinearMatMul",
            vec![
                a.q,
                a.scale,
                a.zero_point,
                b,
                b_scale,
                b_zp,
                out.y.scale.clone(),
                out.y.zero_point.clone(),
            ],
            vec![y],
        ));
        Ok(self.converted(n, "QLinearMatMul", &out, BiasOrigin::None))
    }
}

fn node(name: String, op: &str, inputs: Vec<String>, outputs: Vec<String>) -> Node {
    Node {
        name,
        op_type: op.into(),
        domain: String::new(),
        inputs,
        outputs,
        attributes: vec![],
    }
}

/// int8 zeros shaped like the weight's scale: QLinearConv and QLinearMatMul take the weight
/// zero point as a required input, where DequantizeLinear defaulted it to 0.
fn weight_zero_point(p: &mut Patch, w: &Int8Const) -> String {
    p.add_initializer_once(
        &format!("zp:{}", w.scale),
        &format!("{}_zero_point", w.name),
        || Tensor::new("", w.scale_dims.clone(), Data::I8(vec![0; w.scales.len()])),
    )
}

fn bias_input(p: &mut Patch, op: &Node, b: Bias) -> String {
    match b {
        Bias::Reuse(name) => name,
        Bias::New(v) => p.add_initializer(
            &format!("{}_bias_int32", op.name),
            Tensor::new("", vec![v.len()], Data::I32(v)),
        ),
    }
}

/// `data` of shape `[rows, cols]` transposed to `[cols, rows]`.
fn transpose(data: &[i8], rows: usize, cols: usize) -> Vec<i8> {
    let mut out = vec![0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::ir::make_attr_int;
    use crate::quant::qdq::{quantize as quantize_qdq, QuantOptions};
    use crate::quant::testutil::{
        self, argmax_rows, digits, max_abs_diff, model, node, run, value,
    };
    use crate::runtime::BackendKind;

    fn count(m: &Model, op: &str) -> usize {
        m.graph.nodes.iter().filter(|n| n.op_type == op).count()
    }

    /// Elements that differ, and the largest difference in units of `step`.
    fn steps(a: &[f32], b: &[f32], step: f32) -> (usize, f32) {
        let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
        (n, max_abs_diff(a, b) / step)
    }

    fn output_scale(q: &Model, output: &str) -> f32 {
        let g = &q.graph;
        let dq = &g.nodes[g.producers()[output]];
        assert_eq!(dq.op_type, "DequantizeLinear");
        g.initializers[&dq.inputs[1]].as_f32().unwrap()[0]
    }

    /// MatMul → Relu → Gemm(transB, no bias) → Clip → Gemm(bias), and a MatMul of two
    /// activations: every QLinearMatMul path and the Gemm-as-1×1-convolution path.
    fn dense_model() -> Model {
        let w = |name: &str, dims: Vec<usize>, seed| {
            let n = dims.iter().product();
            let v = testutil::normal(n, seed).iter().map(|x| x * 0.3).collect();
            Tensor::new(name, dims, Data::F32(v))
        };
        let scalar = |name: &str, v: f32| Tensor::new(name, vec![], Data::F32(vec![v]));
        let mut g2 = node("gemm_nobias", "Gemm", &["r1", "w2"], &["h2"]);
        g2.attributes.push(make_attr_int("transB", 1));
        model(
            vec![value("x", 1, &[8, 16])],
            vec![value("y", 1, &[8, 4]), value("z", 1, &[8, 8])],
            vec![
                node("matmul", "MatMul", &["x", "w1"], &["h1"]),
                node("relu", "Relu", &["h1"], &["r1"]),
                g2,
                node("clip", "Clip", &["h2", "lo", "hi"], &["c2"]),
                node("gemm_bias", "Gemm", &["c2", "w3", "b3"], &["y"]),
                node("transpose", "Transpose", &["r1"], &["t1"]),
                node("matmul_act", "MatMul", &["r1", "t1"], &["z"]),
            ],
            vec![
                w("w1", vec![16, 12], 1),
                w("w2", vec![6, 12], 2),
                w("w3", vec![6, 4], 3),
                w("b3", vec![4], 4),
                scalar("lo", -0.5),
                scalar("hi", 0.5),
            ],
            17,
        )
    }

    fn quantize_dense(activation: crate::quant::QType) -> Model {
        let f = dense_model();
        let mut runner = testutil::BatchRunner {
            batches: (0..4)
                .map(|i| (vec![8, 16], testutil::normal(128, 10 + i)))
                .collect(),
            backend: BackendKind::Tract,
        };
        // Bias correction would give the bias-free Gemm a bias.
        let opts = QuantOptions {
            activation,
            bias_correction: false,
            ..Default::default()
        };
        quantize_qdq(&f, &opts, &mut runner, &()).unwrap().0
    }

    // ONNX Runtime fuses the QDQ model's Conv groups into the same QLinearConv kernel, so the
    // two forms agree exactly there; where it runs a QDQ group in float (Gemm, MatMul, an
    // unfused activation) the integer op can round an output to the neighbouring step.
    #[test]
    fn teacher_qoperator_matches_qdq_in_onnx_runtime() {
        let (_, q) = testutil::teacher();
        let (qo, report) = to_qoperator(q).unwrap();
        let converted: Vec<_> = report
            .converted
            .iter()
            .map(|c| (c.op.as_str(), c.qlinear_op.as_str()))
            .collect();
        assert_eq!(converted.len(), 7, "{report:?}");
        assert!(converted.contains(&("Gemm", "QLinearConv")));
        assert_eq!((count(&qo, "Conv"), count(&qo, "Gemm")), (0, 0));
        assert_eq!(count(&qo, "QLinearConv"), 7);
        // conv1, layer1.conv1 and layer2.conv1 end in a Relu that uint8 zero point 0 performs.
        assert_eq!(
            report
                .converted
                .iter()
                .filter(|c| c.folded_activation.is_some())
                .count(),
            3
        );
        let mut islands: Vec<_> = report.qdq_islands.iter().map(|i| i.op.as_str()).collect();
        islands.sort();
        assert_eq!(
            islands,
            [
                "Add",
                "Add",
                "Flatten",
                "GlobalAveragePool",
                "MaxPool",
                "Relu",
                "Relu"
            ]
        );

        let (shape, x, labels) = digits("digits_val.npz", 1000);
        let a = &run(q, BackendKind::Ort, &shape, &x).unwrap()[0].data;
        let b = &run(&qo, BackendKind::Ort, &shape, &x).unwrap()[0].data;
        let (differing, worst) = steps(a, b, output_scale(q, "logits"));
        // Measured: 0 of 10000 logits differ.
        assert!(
            worst <= 1.0 && differing <= 10,
            "{differing} logits differ, by up to {worst} steps"
        );
        let (ta, tb) = (argmax_rows(a, 10), argmax_rows(b, 10));
        let flips = ta.iter().zip(&tb).filter(|(p, q)| p != q).count();
        assert!(flips <= 1, "top-1 differs on {flips} of 1000 digits");
        let correct = tb
            .iter()
            .zip(&labels)
            .filter(|(p, y)| **p as i64 == **y)
            .count();
        assert!(correct >= 975, "QOperator top-1 {correct}/1000");
    }

    #[test]
    fn mbv2_qoperator_matches_qdq_in_onnx_runtime() {
        let (_, q) = testutil::mbv2();
        let (qo, report) = to_qoperator(q).unwrap();
        // 17 Convs (depthwise included) and the Gemm; every ReLU6 Clip folds.
        assert_eq!(report.converted.len(), 18, "{report:?}");
        assert_eq!((count(&qo, "Conv"), count(&qo, "Clip")), (0, 0));
        assert_eq!(
            report
                .converted
                .iter()
                .filter(|c| c.folded_activation.is_some())
                .count(),
            12
        );
        let shape = [64, 3, 32, 32];
        let x = testutil::normal(64 * 3 * 32 * 32, 7);
        let a = &run(q, BackendKind::Ort, &shape, &x).unwrap()[0].data;
        let b = &run(&qo, BackendKind::Ort, &shape, &x).unwrap()[0].data;
        let (differing, worst) = steps(a, b, output_scale(q, "logits"));
        // Measured: identical.
        assert!(
            worst <= 1.0 && differing <= 6,
            "{differing} logits differ, by up to {worst} steps"
        );
    }

    #[test]
    fn matmul_and_gemm_paths_match_qdq_with_uint8_and_int8_activations() {
        let x = testutil::normal(128, 99);
        for (qtype, folded) in [(crate::quant::QType::U8, 2), (crate::quant::QType::I8, 0)] {
            let q = quantize_dense(qtype);
            let (qo, report) = to_qoperator(&q).unwrap();
            let mut ops: Vec<_> = report
                .converted
                .iter()
                .map(|c| (c.node.as_str(), c.qlinear_op.as_str()))
                .collect();
            ops.sort();
            assert_eq!(
                ops,
                [
                    ("gemm_bias", "QLinearConv"),
                    ("gemm_nobias", "QLinearMatMul"),
                    ("matmul", "QLinearMatMul"),
                    ("matmul_act", "QLinearMatMul"),
                ],
                "{qtype:?}"
            );
            let f = report
                .converted
                .iter()
                .filter(|c| c.folded_activation.is_some())
                .count();
            assert_eq!(f, folded, "{qtype:?}: {report:?}");
            // Symmetric int8 has zero point 0, not -128: Relu and Clip stay, on dequantized values.
            if qtype == crate::quant::QType::I8 {
                assert_eq!((count(&qo, "Relu"), count(&qo, "Clip")), (1, 1));
                assert!(report
                    .qdq_islands
                    .iter()
                    .any(|i| i.node == "relu" && i.reason.contains("kept after")));
            }
            let a = run(&q, BackendKind::Ort, &[8, 16], &x).unwrap();
            let b = run(&qo, BackendKind::Ort, &[8, 16], &x).unwrap();
            for (k, name) in ["y", "z"].iter().enumerate() {
                let (differing, worst) = steps(&a[k].data, &b[k].data, output_scale(&q, name));
                eprintln!("{qtype:?} {name}: {differing} differ, {worst} steps");
                assert!(
                    worst <= 1.0 && differing * 20 <= a[k].data.len(),
                    "{qtype:?} `{name}`: {differing} differ, by up to {worst} steps"
                );
            }
        }
    }

    #[test]
    fn a_float_model_is_refused() {
        let m = Model::load(&testutil::fixture("teacher.onnx")).unwrap();
        let e = to_qoperator(&m).unwrap_err().to_string();
        assert!(
            e.contains("not a QDQ model") && e.contains("shrink quantize"),
            "{e}"
        );
    }

    /// The QOperator models the tests check: the fixtures and the dense model in both types.
    fn qoperator_models() -> Vec<(String, Model)> {
        let mut v = vec![
            (
                "teacher".to_string(),
                to_qoperator(&testutil::teacher().1).unwrap().0,
            ),
            (
                "mbv2_tiny".to_string(),
                to_qoperator(&testutil::mbv2().1).unwrap().0,
            ),
        ];
        for qtype in [crate::quant::QType::U8, crate::quant::QType::I8] {
            let q = quantize_dense(qtype);
            v.push((format!("dense_{qtype:?}"), to_qoperator(&q).unwrap().0));
        }
        v
    }

    // tract 0.23 runs QLinearConv with per-channel weight scales and QLinearMatMul with
    // per-column ones, and rounds some outputs to the neighbouring step where ORT does not.
    // Measured: teacher 70 of 10000 logits one step apart, top-1 identical on all 1000
    // digits; mbv2_tiny and the dense model identical.
    #[test]
    fn tract_runs_the_qoperator_models_like_onnx_runtime() {
        let (_, q) = testutil::teacher();
        let (qo, _) = to_qoperator(q).unwrap();
        let (shape, x, _) = digits("digits_val.npz", 1000);
        let a = &run(&qo, BackendKind::Ort, &shape, &x).unwrap()[0].data;
        let b = &run(&qo, BackendKind::Tract, &shape, &x).unwrap()[0].data;
        let (differing, worst) = steps(a, b, output_scale(q, "logits"));
        let flips = argmax_rows(a, 10)
            .iter()
            .zip(&argmax_rows(b, 10))
            .filter(|(p, q)| p != q)
            .count();
        eprintln!("teacher tract: {differing} differ, {worst} steps, {flips} top-1 flips");
        assert!(
            worst <= 1.0 + 1e-4,
            "tract differs from ORT by {worst} steps"
        );
        assert!(flips <= 1, "top-1 differs on {flips} of 1000 digits");

        let (_, q) = testutil::mbv2();
        let (qo, _) = to_qoperator(q).unwrap();
        let shape = [8, 3, 32, 32];
        let x = testutil::normal(8 * 3 * 32 * 32, 8);
        let a = &run(&qo, BackendKind::Ort, &shape, &x).unwrap()[0].data;
        let b = &run(&qo, BackendKind::Tract, &shape, &x).unwrap()[0].data;
        let (differing, worst) = steps(a, b, output_scale(q, "logits"));
        eprintln!("mbv2 tract: {differing} differ, {worst} steps");
        assert!(
            worst <= 1.0 + 1e-4,
            "tract differs from ORT by {worst} steps"
        );

        for qtype in [crate::quant::QType::U8, crate::quant::QType::I8] {
            let q = quantize_dense(qtype);
            let (qo, _) = to_qoperator(&q).unwrap();
            let x = testutil::normal(128, 99);
            let a = run(&qo, BackendKind::Ort, &[8, 16], &x).unwrap();
            let b = run(&qo, BackendKind::Tract, &[8, 16], &x).unwrap();
            for (k, name) in ["y", "z"].iter().enumerate() {
                let (differing, worst) = steps(&a[k].data, &b[k].data, output_scale(&q, name));
                eprintln!("dense {qtype:?} {name} tract: {differing} differ, {worst} steps");
                assert!(
                    worst <= 1.0 + 1e-4,
                    "{qtype:?} `{name}`: tract differs by {worst} steps"
                );
            }
        }
    }

    /// What `onnx.checker` checks that matters here, without Python: standard-domain ops,
    /// and each QLinear op's constant inputs typed and shaped as the ONNX spec requires.
    #[test]
    fn qlinear_inputs_have_the_types_and_shapes_onnx_requires() {
        for (name, m) in qoperator_models() {
            let g = &m.graph;
            let init = |v: &str| {
                g.initializers
                    .get(v)
                    .unwrap_or_else(|| panic!("{name}: `{v}` is not an initializer"))
            };
            let scalar_f32 = |v: &str| {
                let t = init(v);
                assert!(t.numel() == 1 && t.as_f32().is_some(), "{name}: `{v}`");
            };
            let zero_point_of = |zp: &str| init(zp).data.dtype();
            assert!(g.nodes.iter().all(|n| n.domain.is_empty()), "{name}");
            assert!(g.value_info.is_empty());
            for n in g.nodes.iter().filter(|n| n.op_type.starts_with("QLinear")) {
                let i = &n.inputs;
                let (x_scale, w, w_scale, w_zp, y_scale) = (&i[1], &i[3], &i[4], &i[5], &i[6]);
                scalar_f32(x_scale);
                scalar_f32(y_scale);
                assert!(init(&i[2]).numel() == 1 && init(&i[7]).numel() == 1);
                // A weight (not a second activation) has int8 zeros shaped like its scale.
                if let Some(wt) = g.initializers.get(w) {
                    let (s, zp) = (init(w_scale), init(w_zp));
                    assert_eq!(zp.dims, s.dims, "{name}: {}", n.name);
                    assert_eq!(zp.data, Data::I8(vec![0; s.numel()]), "{name}: {}", n.name);
                    assert_eq!(wt.data.dtype(), zero_point_of(w_zp));
                    let channels = if n.op_type == "QLinearConv" {
                        wt.dims[0]
                    } else {
                        wt.dims[1]
                    };
                    assert!(
                        s.numel() == 1 || s.numel() == channels,
                        "{name}: {}",
                        n.name
                    );
                }
                match n.op_type.as_str() {
                    "QLinearConv" => {
                        assert!(i.len() == 8 || i.len() == 9);
                        if let Some(b) = i.get(8) {
                            let b = init(b);
                            assert!(matches!(b.data, Data::I32(_)));
                            assert_eq!(b.dims, [init(w).dims[0]]);
                        }
                    }
                    "QLinearMatMul" => assert_eq!(i.len(), 8),
                    other => panic!("{name}: unexpected {other}"),
                }
            }
        }
    }

    // The README's test command installs `onnx`; this fails rather than skips without it.
    #[test]
    fn onnx_checker_accepts_the_qoperator_models() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (name, m) in qoperator_models() {
            let p = dir.path().join(format!("{name}.onnx"));
            m.save(&p).unwrap();
            paths.push(p);
        }
        testutil::onnx_check(&paths);
    }
}
