//! Static int8 quantization of a prepared float graph into QDQ form: QuantizeLinear /
//! DequantizeLinear pairs on activations, int8 per-channel weights and int32 biases behind
//! DequantizeLinear, as ONNX Runtime's and tract's QDQ fusions expect.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::arith::{
    quantize_bias, quantize_per_channel, sqnr_db, PerChannel, QParams, QType, Symmetry,
};
use super::calib::{Method, RangeOptions, Target, TensorStats};
use super::equalize::ChannelMeans;
use crate::onnx::ir::{make_attr_int, make_attr_ints, Graph, Model, Node, ValueInfo};
use crate::onnx::{Data, Tensor};

/// The runtime a quantized model is tuned for; [`QuantTarget::rules`] says what changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuantTarget {
    /// ONNX Runtime: uint8 asymmetric activations by default, Q/DQ around every op below.
    #[default]
    Ort,
    /// tract: as ORT, and Softmax outputs stay float (tract 0.23 computes them wrongly).
    Tract,
    /// TensorRT: int8 symmetric activations, Q/DQ on the inputs of weighted layers, pooling
    /// and residual Adds only, float32 biases.
    Tensorrt,
}

/// Ops whose inputs (and outputs) are quantized for ONNX Runtime and tract.
const QUANT_OPS: &[&str] = &[
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
];

/// Ops TensorRT runs in int8 from Q/DQ on their inputs. MaxPool and Concat are left out: Q/DQ
/// commute with them and TensorRT propagates the neighbouring scales through; Mul is not a
/// fused int8 op there.
const TENSORRT_OPS: &[&str] = &[
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "AveragePool",
    "GlobalAveragePool",
];

/// What a target runtime needs of a QDQ model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRules {
    /// Ops that get Q/DQ on their activations.
    pub ops: &'static [&'static str],
    /// Q/DQ on the outputs of quantized ops as well as their inputs (ORT and tract read and
    /// write int8 between integer kernels), or on inputs only (TensorRT chooses output
    /// precision itself when it fuses; an output Q/DQ would pin it).
    pub quantize_outputs: bool,
    /// Add: quantize only inputs that no weighted layer produces, so TensorRT can fuse the
    /// Add into that layer (its residual-connection rule).
    pub residual_add_only: bool,
    /// Biases as int32 behind DequantizeLinear (scale = input scale × weight scale), or kept
    /// float32 (TensorRT's parser takes DequantizeLinear of int8 only).
    pub int32_bias: bool,
    /// Activations must be int8 with zero point 0.
    pub symmetric_activations: bool,
    /// Ops never quantized on this target although otherwise quantizable, and why.
    pub float_ops: &'static [(&'static str, &'static str)],
}

impl QuantTarget {
    pub fn rules(self) -> TargetRules {
        match self {
            QuantTarget::Ort => TargetRules {
                ops: QUANT_OPS,
                quantize_outputs: true,
                residual_add_only: false,
                int32_bias: true,
                symmetric_activations: false,
                float_ops: &[],
            },
            QuantTarget::Tract => TargetRules {
                float_ops: &[(
                    "Softmax",
                    "tract 0.23 gives wrong results for a quantized Softmax",
                )],
                ..QuantTarget::Ort.rules()
            },
            QuantTarget::Tensorrt => TargetRules {
                ops: TENSORRT_OPS,
                quantize_outputs: false,
                residual_add_only: true,
                int32_bias: false,
                symmetric_activations: true,
                float_ops: &[],
            },
        }
    }

    /// One line per rule, for reports.
    pub fn describe(self) -> Vec<String> {
        let r = self.rules();
        let mut v = vec![format!("quantized ops: {}", r.ops.join(", "))];
        v.push(if r.quantize_outputs {
            "Q/DQ on inputs and outputs of quantized ops".into()
        } else {
            "Q/DQ on inputs of quantized ops only".into()
        });
        if r.residual_add_only {
            v.push("Add: only inputs no weighted layer produces (residual branch)".into());
        }
        v.push(if r.int32_bias {
            "biases int32 (input scale × weight scale)".into()
        } else {
            "biases float32".into()
        });
        if r.symmetric_activations {
            v.push("activations int8 symmetric (zero point 0)".into());
        }
        for (op, why) in r.float_ops {
            v.push(format!("{op} stays float: {why}"));
        }
        v
    }
}
/// Activations that runtimes fuse into the producing Conv/Gemm: the fused output is quantized.
const FUSED_ACTIVATIONS: &[&str] = &["Relu", "Clip"];

#[derive(Debug, Clone)]
pub struct QuantOptions {
    pub method: Method,
    pub range: RangeOptions,
    pub per_channel: bool,
    pub activation: QType,
    pub target: QuantTarget,
    pub exclude_nodes: Vec<String>,
    pub exclude_ops: Vec<String>,
    pub bias_correction: bool,
    /// When set, only these nodes are quantized (sensitivity analysis).
    pub only_nodes: Option<Vec<String>>,
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            method: Method::Auto,
            range: RangeOptions::default(),
            per_channel: true,
            activation: QType::U8,
            target: QuantTarget::Ort,
            exclude_nodes: vec![],
            exclude_ops: vec![],
            bias_correction: true,
            only_nodes: None,
        }
    }
}

impl QuantOptions {
    pub fn activation_target(&self) -> Target {
        let symmetric = self.target.rules().symmetric_activations;
        match (symmetric, self.activation) {
            (true, _) | (_, QType::I8) => Target {
                qtype: QType::I8,
                symmetry: Symmetry::Symmetric,
            },
            (_, QType::U8) => Target {
                qtype: QType::U8,
                symmetry: Symmetry::Asymmetric,
            },
        }
    }
}

/// Runs a float model over the calibration data and shows named outputs to a sink.
/// Implemented above this layer with a runtime (tract or ONNX Runtime).
pub trait Runner {
    /// Runs `model` (whose outputs have been set to `outputs`) over every calibration batch,
    /// calling `sink(name, shape, values)` for each output of each batch.
    fn run(&mut self, model: &Model, sink: &mut OutputSink<'_>) -> Result<()>;
}

/// Receives one output of one calibration batch: its name, shape and values.
pub type OutputSink<'a> = dyn FnMut(&str, &[usize], &[f32]) -> Result<()> + 'a;

/// Progress of calibration passes.
pub trait QuantProgress {
    fn pass(&self, _label: &str) {}
}
impl QuantProgress for () {}

/// What the quantizer decided, per weight-carrying layer and per activation.
#[derive(Debug, Clone, Serialize, Default)]
pub struct QuantReport {
    pub method: String,
    pub per_channel: bool,
    pub activation_type: String,
    pub target: String,
    /// The target's rules, as applied.
    pub target_rules: Vec<String>,
    pub layers: Vec<LayerReport>,
    pub activations: Vec<ActivationReport>,
    pub float_nodes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub node: String,
    pub op: String,
    pub weight: String,
    pub weight_sqnr_db: f64,
    pub bias_correction_max_abs: Option<f32>,
    pub bias_saturated: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActivationReport {
    pub tensor: String,
    pub method: String,
    pub observed_min: f32,
    pub observed_max: f32,
    pub range_min: f32,
    pub range_max: f32,
    pub scale: f32,
    pub zero_point: i32,
    /// Estimated from the calibration histogram: signal power over expected quantization MSE.
    pub sqnr_db: f64,
}

/// Which nodes are quantized and which tensors carry a Q/DQ pair.
#[derive(Debug, Clone)]
struct Decisions {
    nodes: Vec<usize>,
    /// Activation tensors, in graph order.
    tensors: Vec<String>,
    /// Outputs of weight layers (before any fused activation), for bias correction.
    raw_outputs: Vec<(usize, String)>,
}

fn weight_axis(node: &Node, w: &Tensor) -> Result<usize> {
    Ok(match node.op_type.as_str() {
        "Conv" => 0,
        "Gemm" => {
            if node.attr_int("transB", 0)? != 0 {
                0
            } else {
                1
            }
        }
        "MatMul" => w.dims.len().saturating_sub(1),
        _ => bail!(node.unsupported("has no weight")),
    })
}

fn decide(g: &Graph, opts: &QuantOptions) -> Result<Decisions> {
    for name in &opts.exclude_nodes {
        ensure!(
            g.node_by_name(name).is_some(),
            "--exclude names node `{name}`, which the model does not have"
        );
    }
    let rules = opts.target.rules();
    let consumers = g.consumers();
    let producers: HashMap<&str, &Node> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let is_float_activation = |t: &str| !t.is_empty() && !g.initializers.contains_key(t);
    let mut nodes = Vec::new();
    let mut tensors: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut raw_outputs = Vec::new();
    let mut add = |t: &str, tensors: &mut Vec<String>| {
        if seen.insert(t.to_string()) {
            tensors.push(t.to_string());
        }
    };
    for (i, n) in g.nodes.iter().enumerate() {
        if !rules.ops.contains(&n.op_type.as_str())
            || rules.float_ops.iter().any(|(op, _)| *op == n.op_type)
            || opts.exclude_nodes.contains(&n.name)
            || opts.exclude_ops.contains(&n.op_type)
        {
            continue;
        }
        if opts
            .only_nodes
            .as_ref()
            .is_some_and(|o| !o.contains(&n.name))
        {
            continue;
        }
        if matches!(n.op_type.as_str(), "Conv" | "Gemm")
            && !n.input(1).is_some_and(|w| g.initializers.contains_key(w))
        {
            continue;
        }
        nodes.push(i);
        for inp in n.inputs.iter().filter(|t| is_float_activation(t)) {
            if matches!(n.op_type.as_str(), "Conv" | "Gemm") && Some(inp.as_str()) != n.input(0) {
                continue;
            }
            if rules.residual_add_only
                && n.op_type == "Add"
                && producers
                    .get(inp.as_str())
                    .is_some_and(|p| matches!(p.op_type.as_str(), "Conv" | "Gemm" | "MatMul"))
            {
                continue;
            }
            add(inp, &mut tensors);
        }
        let out = n.outputs[0].clone();
        if matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul") {
            raw_outputs.push((i, out.clone()));
        }
        if !rules.quantize_outputs {
            continue;
        }
        let users = consumers.get(out.as_str()).cloned().unwrap_or_default();
        let fused = match users.as_slice() {
            [u] if FUSED_ACTIVATIONS.contains(&g.nodes[*u].op_type.as_str())
                && !g.is_output(&out)
                && !opts.exclude_nodes.contains(&g.nodes[*u].name) =>
            {
                Some(*u)
            }
            _ => None,
        };
        match fused {
            Some(u) => add(&g.nodes[u].outputs[0], &mut tensors),
            None => add(&out, &mut tensors),
        }
    }
    // Outputs of ops the target must run in float stay float wherever they are read.
    tensors.retain(|t| {
        !producers
            .get(t.as_str())
            .is_some_and(|p| rules.float_ops.iter().any(|(op, _)| *op == p.op_type))
    });
    Ok(Decisions {
        nodes,
        tensors,
        raw_outputs,
    })
}

/// The model with its outputs replaced by `names` (float tensors), for calibration passes.
pub fn with_outputs(model: &Model, names: &[String]) -> Model {
    let mut m = model.clone();
    set_outputs(&mut m, names);
    m
}

/// Replaces the outputs of `m` by `names` (float tensors).
fn set_outputs(m: &mut Model, names: &[String]) {
    m.graph.outputs = names
        .iter()
        .map(|n| ValueInfo {
            name: n.clone(),
            elem_type: 1,
            shape: None,
        })
        .collect();
    m.graph.value_info.clear();
}

fn f32_tensor(name: &str, dims: Vec<usize>, v: Vec<f32>) -> Tensor {
    Tensor::new(name, dims, Data::F32(v))
}

fn zero_point_tensor(name: &str, qtype: QType, zps: &[i32], dims: Vec<usize>) -> Tensor {
    match qtype {
        QType::U8 => Tensor::new(name, dims, Data::U8(zps.iter().map(|&z| z as u8).collect())),
        QType::I8 => Tensor::new(name, dims, Data::I8(zps.iter().map(|&z| z as i8).collect())),
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

/// Quantizes a prepared model (see [`super::prepare`]); `runner` runs calibration passes.
pub fn quantize(
    model: &Model,
    opts: &QuantOptions,
    runner: &mut dyn Runner,
    progress: &dyn QuantProgress,
) -> Result<(Model, QuantReport)> {
    let g = &model.graph;
    let d = decide(g, opts)?;
    ensure!(
        !d.nodes.is_empty(),
        "no node of the model can be quantized (quantizable ops for target {:?}: {})",
        opts.target,
        opts.target.rules().ops.join(", ")
    );
    let act = opts.activation_target();
    let mut report = QuantReport {
        method: opts.method.to_string(),
        per_channel: opts.per_channel,
        activation_type: format!("{:?}", act.qtype).to_lowercase(),
        target: format!("{:?}", opts.target).to_lowercase(),
        target_rules: opts.target.describe(),
        ..Default::default()
    };

    // Weights: symmetric int8, per channel unless asked otherwise. They need no calibration,
    // so they are quantized first and bias correction can measure them in the same pass.
    let mut qweights: HashMap<String, (PerChannel, Vec<usize>)> = HashMap::new();
    let mut dequantized: HashMap<String, Vec<f32>> = HashMap::new();
    for &i in &d.nodes {
        let n = &g.nodes[i];
        if !matches!(n.op_type.as_str(), "Conv" | "Gemm" | "MatMul") {
            continue;
        }
        let Some(w) = n.input(1).and_then(|w| g.initializers.get(w)) else {
            continue;
        };
        let data = w
            .as_f32()
            .with_context(|| n.unsupported("weights must be float32 to quantize"))?;
        if qweights.contains_key(&w.name) {
            continue;
        }
        let axis = weight_axis(n, w)?;
        let pc = if opts.per_channel {
            quantize_per_channel(data, &w.dims, axis)
        } else {
            quantize_per_channel(data, &[1, data.len()], 0).map(|p| PerChannel { axis, ..p })
        }
        .with_context(|| {
            format!(
                "cannot quantize the weights `{}` of node `{}`",
                w.name, n.name
            )
        })?;
        let deq = if opts.per_channel {
            pc.dequantize(&w.dims)
        } else {
            pc.data.iter().map(|&q| q as f32 * pc.scales[0]).collect()
        };
        report.layers.push(LayerReport {
            node: n.name.clone(),
            op: n.op_type.clone(),
            weight: w.name.clone(),
            weight_sqnr_db: sqnr_db(data, &deq),
            bias_correction_max_abs: None,
            bias_saturated: 0,
        });
        if opts.bias_correction {
            dequantized.insert(w.name.clone(), deq);
        }
        qweights.insert(w.name.clone(), (pc, w.dims.clone()));
    }

    // Bias correction (Nagel et al., "Data-Free Quantization", 2019, §4.2, empirical form):
    // the mean shift that rounding its weights causes in each output channel of a layer,
    // measured on the calibration data, is added back to the layer's bias. Each layer is
    // measured on its own: a shadow copy with the rounded weights reads the same float input,
    // so a shift caused upstream (which that layer's own correction removes) is not counted
    // twice. The graph itself subtracts the two outputs and averages over space, so only
    // [batch, channels] per layer leaves the runtime.
    let mut shadows: Vec<(usize, String)> = Vec::new(); // (node, per-sample channel shift)
                                                        // The model the calibration pass runs: the float model with its outputs replaced, and
                                                        // the shadow layers when correcting biases.
    let mut calib_model = model.clone();
    if opts.bias_correction {
        for (i, out) in &d.raw_outputs {
            let n = &g.nodes[*i];
            if n.op_type == "MatMul" {
                continue; // No bias input to correct.
            }
            let Some(deq) = n.input(1).and_then(|w| dequantized.get(w).cloned()) else {
                continue;
            };
            let cg = &mut calib_model.graph;
            let w = cg.fresh_name(&format!("{}_wq", n.name));
            let dims = g.initializers[n.input(1).expect("weight")].dims.clone();
            let spatial_rank = dims.len().saturating_sub(2) as i64;
            cg.initializers.insert(w.clone(), f32_tensor(&w, dims, deq));
            let shadow_out = cg.fresh_name(&format!("{out}_wq"));
            let mut shadow = n.clone();
            shadow.name = cg.fresh_name(&format!("{}_wq", n.name));
            shadow.inputs[1] = w;
            shadow.outputs = vec![shadow_out.clone()];
            cg.nodes.push(shadow);
            let diff = cg.fresh_name(&format!("{out}_shift"));
            cg.nodes.push(node(
                cg.fresh_name(&format!("{}_shift", n.name)),
                "Sub",
                vec![out.clone(), shadow_out],
                vec![diff.clone()],
            ));
            // Conv outputs are [N, C, spatial...]: the mean over space; Gemm's are [N, C].
            let shift = if n.op_type == "Conv" {
                let mean = cg.fresh_name(&format!("{out}_shift_mean"));
                let axes: Vec<i64> = (2..2 + spatial_rank).collect();
                let mut r = node(
                    cg.fresh_name(&format!("{}_shift_mean", n.name)),
                    "ReduceMean",
                    vec![diff],
                    vec![mean.clone()],
                );
                r.attributes.push(make_attr_int("keepdims", 0));
                if calib_model.opset >= 18 {
                    let a = cg.fresh_name(&format!("{}_axes", n.name));
                    cg.initializers.insert(
                        a.clone(),
                        Tensor::new(a.clone(), vec![axes.len()], Data::I64(axes)),
                    );
                    r.inputs.push(a);
                } else {
                    r.attributes.push(make_attr_ints("axes", axes));
                }
                cg.nodes.push(r);
                mean
            } else {
                diff
            };
            shadows.push((*i, shift));
        }
        calib_model
            .graph
            .sort_topologically()
            .context("cannot add the bias-correction layers")?;
    }

    // One pass: activation statistics, and per-channel means of the float and shadow outputs.
    progress.pass("calibration");
    let mut stats: HashMap<String, TensorStats> = d
        .tensors
        .iter()
        .map(|t| (t.clone(), TensorStats::new(t.clone())))
        .collect();
    let mut power: HashMap<String, (f64, u64)> = HashMap::new();
    let mut means: HashMap<String, ChannelMeans> = HashMap::new();
    let mut outputs: Vec<String> = d.tensors.clone();
    outputs.extend(shadows.iter().map(|(_, shift)| shift.clone()));
    let averaged: HashSet<&str> = shadows.iter().map(|(_, shift)| shift.as_str()).collect();
    runner.run(
        &{
            drop(dequantized);
            set_outputs(&mut calib_model, &outputs);
            calib_model
        },
        &mut |name, shape, values| {
            if let Some(s) = stats.get_mut(name) {
                s.observe(values)?;
                let e = power.entry(name.to_string()).or_default();
                e.0 += super::calib::sum_squares(values);
                e.1 += values.len() as u64;
            }
            if averaged.contains(name) && shape.len() >= 2 {
                means
                    .entry(name.to_string())
                    .or_insert_with(|| ChannelMeans::new(shape[1]))
                    .observe(values, shape, 1)?;
            }
            Ok(())
        },
    )?;

    let mut params: BTreeMap<String, QParams> = BTreeMap::new();
    for t in &d.tensors {
        let s = &stats[t];
        let sel = s
            .select(opts.method, act, &opts.range)
            .with_context(|| format!("cannot choose a range for tensor `{t}`"))?;
        let p = QParams::from_range(sel.rmin, sel.rmax, act.qtype, act.symmetry)?;
        let (lo, hi) = s.min_max().unwrap_or((0.0, 0.0));
        if lo == hi {
            crate::printer::warn(format!(
                "tensor `{t}` is constant ({lo}) on every calibration sample; its scale is arbitrary — check that the calibration data is representative"
            ));
        }
        let (pw, n) = power.get(t).copied().unwrap_or((0.0, 1));
        let signal = pw / n.max(1) as f64;
        report.activations.push(ActivationReport {
            tensor: t.clone(),
            method: sel.method.to_string(),
            observed_min: lo,
            observed_max: hi,
            range_min: sel.rmin,
            range_max: sel.rmax,
            scale: p.scale,
            zero_point: p.zero_point,
            sqnr_db: if sel.expected_mse > 0.0 {
                10.0 * (signal / sel.expected_mse).log10()
            } else {
                f64::INFINITY
            },
        });
        params.insert(t.clone(), p);
    }

    let mut model = model.clone();
    for (i, shift) in &shadows {
        let n = model.graph.nodes[*i].clone();
        let Some(m) = means.get(shift) else {
            continue;
        };
        let delta = m.means();
        if let Some(bad) = delta.iter().find(|v| !v.is_finite()) {
            bail!(n.unsupported(format!("its bias correction is {bad}")));
        }
        let c = delta.len();
        let bias_name = match n.input(2) {
            Some(b) => b.to_string(),
            None => {
                let b = model.graph.fresh_name(&format!("{}_bias", n.name));
                model
                    .graph
                    .initializers
                    .insert(b.clone(), f32_tensor(&b, vec![c], vec![0.0; c]));
                model.graph.nodes[*i].inputs.resize(2, String::new());
                model.graph.nodes[*i].inputs.push(b.clone());
                b
            }
        };
        let b = model
            .graph
            .initializers
            .get_mut(&bias_name)
            .with_context(|| n.unsupported("its bias is not an initializer"))?;
        let Data::F32(v) = &mut b.data else {
            bail!(n.unsupported("its bias is not float32"))
        };
        if v.len() != c {
            continue; // A broadcast Gemm bias: leave it.
        }
        for (x, dlt) in v.iter_mut().zip(&delta) {
            *x += dlt;
        }
        if let Some(l) = report.layers.iter_mut().find(|l| l.node == n.name) {
            l.bias_correction_max_abs = Some(delta.iter().fold(0.0f32, |m, x| m.max(x.abs())));
        }
    }

    let qmodel = build_qdq(&model, &d, &params, &qweights, opts, &mut report)?;
    let quantized: HashSet<usize> = d.nodes.iter().copied().collect();
    report.float_nodes = g
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| !quantized.contains(i) && !FUSED_ACTIVATIONS.contains(&n.op_type.as_str()))
        .map(|(_, n)| n.name.clone())
        .collect();
    Ok((qmodel, report))
}

fn build_qdq(
    model: &Model,
    d: &Decisions,
    params: &BTreeMap<String, QParams>,
    qweights: &HashMap<String, (PerChannel, Vec<usize>)>,
    opts: &QuantOptions,
    report: &mut QuantReport,
) -> Result<Model> {
    let mut m = model.clone();
    let act = opts.activation_target();
    let g = &mut m.graph;
    let graph_inputs: HashSet<String> = g.inputs.iter().map(|v| v.name.clone()).collect();
    // A quantized graph input is read through a renamed DequantizeLinear output; biases look
    // up the input's parameters under its original name.
    let mut original_name: HashMap<String, String> = HashMap::new();
    let mut new_nodes = Vec::new();
    // Short generated names: on small models, names repeated per Q/DQ pair are a visible
    // share of the file; the original tensor names stay on the dequantized values.
    for (k, t) in d.tensors.iter().enumerate() {
        let p = params[t];
        let scale = g.fresh_name(&format!("a{k}_scale"));
        g.initializers
            .insert(scale.clone(), f32_tensor(&scale, vec![], vec![p.scale]));
        let zp = g.fresh_name(&format!("a{k}_zero_point"));
        g.initializers.insert(
            zp.clone(),
            zero_point_tensor(&zp, act.qtype, &[p.zero_point], vec![]),
        );
        let q = g.fresh_name(&format!("a{k}_q"));
        let (src, dst) = if graph_inputs.contains(t) {
            let dq = g.fresh_name(&format!("a{k}_dq"));
            super::prepare::rename_uses(g, t, &dq);
            original_name.insert(dq.clone(), t.clone());
            (t.clone(), dq)
        } else {
            // The producer writes `t_float`; the DequantizeLinear output keeps the name `t`,
            // so consumers and graph outputs see the quantized value.
            let f = g.fresh_name(&format!("a{k}_float"));
            let prod = g
                .nodes
                .iter_mut()
                .find(|n| n.outputs.contains(t))
                .with_context(|| format!("tensor `{t}` has no producer"))?;
            for o in prod.outputs.iter_mut() {
                if o == t {
                    *o = f.clone();
                }
            }
            (f, t.clone())
        };
        new_nodes.push(node(
            String::new(),
            "QuantizeLinear",
            vec![src, scale.clone(), zp.clone()],
            vec![q.clone()],
        ));
        new_nodes.push(node(
            String::new(),
            "DequantizeLinear",
            vec![q, scale, zp],
            vec![dst],
        ));
    }
    // Weights and biases behind DequantizeLinear.
    let mut done: HashMap<String, String> = HashMap::new();
    for &i in &d.nodes {
        let n = g.nodes[i].clone();
        let Some(wname) = n.input(1).map(str::to_string) else {
            continue;
        };
        let Some((pc, dims)) = qweights.get(&wname) else {
            continue;
        };
        let deq_name = match done.get(&wname) {
            Some(x) => x.clone(),
            None => {
                let qn = g.fresh_name(&format!("w{}_q", done.len()));
                g.initializers.insert(
                    qn.clone(),
                    Tensor::new(qn.clone(), dims.clone(), Data::I8(pc.data.clone())),
                );
                let sdims = if opts.per_channel {
                    vec![pc.scales.len()]
                } else {
                    vec![]
                };
                let sn = g.fresh_name(&format!("w{}_scale", done.len()));
                g.initializers
                    .insert(sn.clone(), f32_tensor(&sn, sdims, pc.scales.clone()));
                // Symmetric: the zero point is 0, DequantizeLinear's default, so it is left out.
                let dq = g.fresh_name(&format!("w{}_dq", done.len()));
                let mut dqn = node(
                    String::new(),
                    "DequantizeLinear",
                    vec![qn, sn],
                    vec![dq.clone()],
                );
                if opts.per_channel {
                    dqn.attributes.push(make_attr_int("axis", pc.axis as i64));
                }
                new_nodes.push(dqn);
                done.insert(wname.clone(), dq.clone());
                dq
            }
        };
        g.nodes[i].inputs[1] = deq_name;
        // Bias: int32 with scale = input scale × weight scale, zero point 0.
        if !opts.target.rules().int32_bias {
            continue;
        }
        let x = n.inputs[0].clone();
        let x = original_name.get(&x).unwrap_or(&x);
        if let (Some(bname), Some(px)) = (n.input(2).map(str::to_string), params.get(x)) {
            let b = g.initializers.get(&bname).cloned();
            if let Some(b) = b.filter(|b| {
                b.dims.len() == 1 && (!opts.per_channel || b.numel() == pc.scales.len())
            }) {
                let bv = b
                    .as_f32()
                    .with_context(|| n.unsupported("bias must be float32"))?;
                let ws: Vec<f32> = if opts.per_channel {
                    pc.scales.clone()
                } else {
                    vec![pc.scales[0]]
                };
                let qb = quantize_bias(bv, px.scale, &ws)
                    .with_context(|| format!("cannot quantize the bias of node `{}`", n.name))?;
                if let Some(l) = report.layers.iter_mut().find(|l| l.node == n.name) {
                    l.bias_saturated = qb.saturated;
                }
                let c = bv.len();
                let scales = if qb.scales.len() == 1 {
                    vec![qb.scales[0]; c]
                } else {
                    qb.scales.clone()
                };
                let qn = g.fresh_name(&format!("b{}_q", done.len()));
                g.initializers.insert(
                    qn.clone(),
                    Tensor::new(qn.clone(), vec![c], Data::I32(qb.data)),
                );
                let sn = g.fresh_name(&format!("b{}_scale", done.len()));
                g.initializers
                    .insert(sn.clone(), f32_tensor(&sn, vec![c], scales));
                let dq = g.fresh_name(&format!("b{}_dq", done.len()));
                let mut dqn = node(
                    String::new(),
                    "DequantizeLinear",
                    vec![qn, sn],
                    vec![dq.clone()],
                );
                dqn.attributes.push(make_attr_int("axis", 0));
                new_nodes.push(dqn);
                g.nodes[i].inputs[2] = dq;
            }
        }
    }
    g.nodes.extend(new_nodes);
    g.value_info.clear();
    g.prune_initializers();
    g.sort_topologically()
        .context("the quantized graph is not valid")?;
    Ok(m)
}

/// Every graph output of `model` over the calibration data, concatenated in graph order.
fn collect_outputs(model: &Model, runner: &mut dyn Runner) -> Result<Vec<f32>> {
    let mut all = Vec::new();
    runner.run(model, &mut |_, _, v| {
        all.extend_from_slice(v);
        Ok(())
    })?;
    Ok(all)
}

/// Sensitivity of each quantized node: the SQNR (dB) of the model's outputs when that node
/// alone is quantized, lowest (most sensitive) first.
pub fn sensitivity(
    model: &Model,
    opts: &QuantOptions,
    runner: &mut dyn Runner,
) -> Result<Vec<(String, f64)>> {
    let reference = collect_outputs(model, runner)?;
    let candidates: Vec<String> = decide(&model.graph, opts)?
        .nodes
        .iter()
        .map(|&i| &model.graph.nodes[i])
        .map(|n| n.name.clone())
        .collect();
    let mut out = Vec::new();
    for name in candidates {
        let single = QuantOptions {
            only_nodes: Some(vec![name.clone()]),
            bias_correction: false,
            ..opts.clone()
        };
        let (m, _) = quantize(model, &single, runner, &())?;
        let got = collect_outputs(&m, runner)?;
        ensure!(
            got.len() == reference.len(),
            "the quantized model's outputs differ in size from the float model's"
        );
        out.push((name, sqnr_db(&reference, &got)));
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{open, BackendKind, RuntimeOptions};

    /// Calibration over fixed in-memory batches with tract.
    struct Batches(Vec<Vec<f32>>, [usize; 4]);

    impl Runner for Batches {
        fn run(
            &mut self,
            model: &Model,
            sink: &mut crate::quant::qdq::OutputSink<'_>,
        ) -> Result<()> {
            let bytes = prost::Message::encode_to_vec(&model.to_proto());
            let opts = RuntimeOptions {
                backend: BackendKind::Tract,
                threads: 1,
                ..Default::default()
            };
            let mut s = open(&bytes, &self.1, &opts)?;
            let names: Vec<String> = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
            for b in &self.0 {
                for (n, o) in names.iter().zip(s.run(b)?) {
                    sink(n, &o.shape, &o.data)?;
                }
            }
            Ok(())
        }
    }

    fn digits() -> (Vec<usize>, Vec<f32>) {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/digits_small_f32.npz");
        crate::data::npy::read_npz_array(&p, "x").unwrap()
    }

    // One QDQ layer (the stem Conv with its fused ReLU): the engine's fake-quantized forward
    // and ONNX Runtime's int8 kernels must agree. Their float accumulations differ in the last
    // bits, so a value lying on a rounding boundary may land one step apart; the tolerance is
    // one quantization step, and at most 0.1% of values may differ at all.
    #[test]
    fn engine_fake_quant_matches_onnx_runtime_on_a_single_qdq_layer() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/teacher.onnx");
        let mut model = Model::load(&path).unwrap();
        super::super::prepare::prepare(&mut model).unwrap();
        let (shape, x) = digits();
        let shape4 = [shape[0], shape[1], shape[2], shape[3]];
        let opts = QuantOptions {
            only_nodes: Some(vec!["/conv1/Conv".into()]),
            ..Default::default()
        };
        let (q, report) =
            quantize(&model, &opts, &mut Batches(vec![x.clone()], shape4), &()).unwrap();
        let relu = "/Relu_output_0";
        let step = report
            .activations
            .iter()
            .find(|a| a.tensor == relu)
            .unwrap()
            .scale;
        let probe = with_outputs(&q, &[relu.to_string()]);

        let bytes = prost::Message::encode_to_vec(&probe.to_proto());
        let ort_opts = RuntimeOptions {
            backend: BackendKind::Ort,
            threads: 1,
            ..Default::default()
        };
        let ort_out = open(&bytes, &shape, &ort_opts)
            .unwrap()
            .run(&x)
            .unwrap()
            .remove(0)
            .data;

        let mut net = crate::engine::Net::from_model(&probe).unwrap();
        let input = crate::engine::Tensor::new(shape.clone(), x.clone()).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        use rand::SeedableRng;
        let fwd = net
            .forward(&input, crate::engine::Mode::Eval, &mut rng)
            .unwrap();
        let eng = &fwd.output().data;

        assert_eq!(eng.len(), ort_out.len());
        let differ = eng.iter().zip(&ort_out).filter(|(a, b)| a != b).count();
        let worst = eng
            .iter()
            .zip(&ort_out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= step * 1.0001,
            "max diff {worst} exceeds one step {step}"
        );
        assert!(
            differ * 1000 <= eng.len(),
            "{differ} of {} values differ",
            eng.len()
        );
    }
}

#[cfg(test)]
mod graph_tests {
    use super::*;
    use crate::quant::testutil::{model, node, value};

    /// Shows the same spread of values for every requested output.
    struct Synthetic;

    impl Runner for Synthetic {
        fn run(
            &mut self,
            model: &Model,
            sink: &mut crate::quant::qdq::OutputSink<'_>,
        ) -> Result<()> {
            let v: Vec<f32> = (0..64).map(|i| i as f32 / 16.0 - 2.0).collect();
            for o in &model.graph.outputs {
                sink(&o.name, &[1, 64], &v)?;
            }
            Ok(())
        }
    }

    /// Per-output-channel mean of an NCHW tensor.
    fn channel_means(shape: &[usize], v: &[f32]) -> Vec<f64> {
        let (c, inner) = (shape[1], shape[2..].iter().product::<usize>());
        let mut m = vec![0f64; c];
        for (j, run) in v.chunks(inner).enumerate() {
            m[j % c] += run.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
        m.iter().map(|s| s / (v.len() / c) as f64).collect()
    }

    /// Two convs with coarse per-tensor weights: each layer's bias moves by the mean shift
    /// its own rounded weights cause on the float model's input to it, E[W·x] − E[Wq·x],
    /// computed here independently by running float models with one weight swapped.
    /// (The TensorRT target keeps biases float, so the corrected values can be read back.)
    #[test]
    fn bias_correction_removes_each_layers_own_mean_shift() {
        use crate::quant::testutil::{normal, run};
        use crate::runtime::BackendKind;
        let w1: Vec<f32> = normal(4 * 3 * 3, 1).iter().map(|v| v * 0.7 + 0.2).collect();
        let w2: Vec<f32> = normal(3 * 4 * 3 * 3, 2)
            .iter()
            .map(|v| v * 0.3 + 0.05)
            .collect();
        let conv = |name: &str, i: &str, w: &str, b: &str, o: &str| {
            let mut n = node(name, "Conv", &[i, w, b], &[o]);
            n.attributes.push(make_attr_ints("pads", vec![1, 1, 1, 1]));
            n
        };
        let m = model(
            vec![value("x", 1, &[2, 1, 8, 8])],
            vec![value("y", 1, &[2, 3, 8, 8])],
            vec![
                conv("conv1", "x", "w1", "b1", "c1"),
                node("relu", "Relu", &["c1"], &["r1"]),
                conv("conv2", "r1", "w2", "b2", "y"),
            ],
            vec![
                Tensor::new("w1", vec![4, 1, 3, 3], Data::F32(w1)),
                Tensor::new("b1", vec![4], Data::F32(vec![0.1, -0.2, 0.0, 0.3])),
                Tensor::new("w2", vec![3, 4, 3, 3], Data::F32(w2)),
                Tensor::new("b2", vec![3], Data::F32(vec![0.0, 0.5, -0.5])),
            ],
            17,
        );
        let batches: Vec<(Vec<usize>, Vec<f32>)> = (0..3)
            .map(|k| {
                let x = normal(2 * 64, 10 + k).iter().map(|v| v.abs()).collect();
                (vec![2, 1, 8, 8], x)
            })
            .collect();
        let mut runner = crate::quant::testutil::BatchRunner {
            batches: batches.clone(),
            backend: BackendKind::Tract,
        };
        let opts = QuantOptions {
            per_channel: false,
            target: QuantTarget::Tensorrt,
            ..Default::default()
        };
        let (q, report) = quantize(&m, &opts, &mut runner, &()).unwrap();
        let g = &q.graph;
        let node_of = |name: &str| g.nodes.iter().find(|n| n.name == name).unwrap();
        // The dequantized weights the quantized model uses.
        let deq = |conv: &str| -> Vec<f32> {
            let dq = &g.nodes[g.producers()[node_of(conv).inputs[1].as_str()]];
            let Data::I8(w) = &g.initializers[&dq.inputs[0]].data else {
                panic!()
            };
            let s = g.initializers[&dq.inputs[1]].as_f32().unwrap()[0];
            w.iter().map(|&v| f32::from(v) * s).collect()
        };
        let mean_of = |model: &Model, output: &str| -> Vec<f64> {
            let mut mm = with_outputs(model, &[output.to_string()]);
            mm.graph.outputs[0].elem_type = 1;
            let mut sums = vec![];
            for (shape, x) in &batches {
                let o = &run(&mm, BackendKind::Tract, shape, x).unwrap()[0];
                sums.push(channel_means(&o.shape, &o.data));
            }
            (0..sums[0].len())
                .map(|c| sums.iter().map(|s| s[c]).sum::<f64>() / sums.len() as f64)
                .collect()
        };
        let swapped = |w: &str, conv: &str| {
            let mut mm = m.clone();
            let dims = mm.graph.initializers[w].dims.clone();
            mm.graph
                .initializers
                .insert(w.into(), Tensor::new(w, dims, Data::F32(deq(conv))));
            mm
        };
        for (conv, w, b, out) in [("conv1", "w1", "b1", "c1"), ("conv2", "w2", "b2", "y")] {
            let want: Vec<f64> = mean_of(&m, out)
                .iter()
                .zip(mean_of(&swapped(w, conv), out))
                .map(|(f, q)| f - q)
                .collect();
            assert!(
                want.iter().any(|d| d.abs() > 1e-3),
                "{conv}: no shift to correct"
            );
            let before = m.graph.initializers[b].as_f32().unwrap();
            let after = g.initializers[&node_of(conv).inputs[2]].as_f32().unwrap();
            for c in 0..want.len() {
                let got = f64::from(after[c] - before[c]);
                assert!(
                    (got - want[c]).abs() < 1e-4,
                    "{conv} channel {c}: {got} vs {}",
                    want[c]
                );
            }
            let l = report.layers.iter().find(|l| l.node == conv).unwrap();
            assert!(l.bias_correction_max_abs.unwrap() > 1e-3);
        }
    }

    /// x → Conv → Softmax → MatMul(weight) → y, then Add with a residual from the Softmax.
    fn conv_softmax_matmul() -> Model {
        model(
            vec![value("x", 1, &[1, 1, 4, 4])],
            vec![value("y", 1, &[1, 2, 4, 3])],
            vec![
                node("conv", "Conv", &["x", "w", "b"], &["c"]),
                node("softmax", "Softmax", &["c"], &["s"]),
                node("matmul", "MatMul", &["s", "m"], &["mm"]),
                node("add", "Add", &["mm", "r"], &["y"]),
                node("slice", "Slice", &["s", "st", "en", "ax"], &["r"]),
            ],
            vec![
                Tensor::new("w", vec![2, 1, 1, 1], Data::F32(vec![0.5, -0.25])),
                Tensor::new("b", vec![2], Data::F32(vec![0.1, -0.2])),
                Tensor::new(
                    "m",
                    vec![4, 3],
                    Data::F32((0..12).map(|i| i as f32 / 7.0 - 0.8).collect()),
                ),
                Tensor::new("st", vec![1], Data::I64(vec![0])),
                Tensor::new("en", vec![1], Data::I64(vec![3])),
                Tensor::new("ax", vec![1], Data::I64(vec![3])),
            ],
            17,
        )
    }

    fn quantized_tensors(q: &Model) -> Vec<String> {
        let g = &q.graph;
        let mut v: Vec<String> = g
            .nodes
            .iter()
            .filter(|n| n.op_type == "DequantizeLinear")
            .filter(|n| !g.initializers.contains_key(&n.inputs[0]))
            .map(|n| n.outputs[0].clone())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn each_target_applies_its_rules() {
        let m = conv_softmax_matmul();
        let run = |target| {
            let opts = QuantOptions {
                target,
                bias_correction: false,
                ..Default::default()
            };
            quantize(&m, &opts, &mut Synthetic, &()).unwrap()
        };
        // ORT: inputs and outputs of Conv, MatMul and Add, the Softmax output included.
        let (ort, r) = run(QuantTarget::Ort);
        assert_eq!(quantized_tensors(&ort), ["a0_dq", "c", "mm", "r", "s", "y"]);
        assert!(r.target_rules.iter().any(|l| l.contains("int32")));
        // tract: the same but the Softmax output stays float, for MatMul and the Slice alike.
        let (tract, r) = run(QuantTarget::Tract);
        assert_eq!(quantized_tensors(&tract), ["a0_dq", "c", "mm", "r", "y"]);
        assert!(r
            .target_rules
            .iter()
            .any(|l| l.starts_with("Softmax stays float")));
        let g = &tract.graph;
        let sm = g.nodes.iter().find(|n| n.op_type == "Softmax").unwrap();
        assert!(g.consumers()[sm.outputs[0].as_str()]
            .iter()
            .all(|&c| g.nodes[c].op_type != "QuantizeLinear"));
        // TensorRT: inputs only (no Q/DQ on the Conv or Add outputs), the Add input that the
        // MatMul produces left float, int8 zero points of 0, float biases.
        let (trt, _) = run(QuantTarget::Tensorrt);
        assert_eq!(quantized_tensors(&trt), ["a0_dq", "r", "s"]);
        let g = &trt.graph;
        for n in g.nodes.iter().filter(|n| n.op_type == "QuantizeLinear") {
            assert_eq!(g.initializers[&n.inputs[2]].data, Data::I8(vec![0]));
        }
        assert!(!g
            .initializers
            .values()
            .any(|t| matches!(t.data, Data::I32(_))));
        let conv = g.nodes.iter().find(|n| n.op_type == "Conv").unwrap();
        assert!(g.initializers.contains_key(&conv.inputs[2]), "float bias");
    }

    // The Conv reading the graph input sees it through a renamed DequantizeLinear output; its
    // bias used to stay float because the input's parameters were looked up under that name.
    #[test]
    fn bias_of_a_conv_reading_the_graph_input_is_int32() {
        let m = model(
            vec![value("x", 1, &[1, 1, 4, 4])],
            vec![value("y", 1, &[1, 2, 4, 4])],
            vec![node("conv", "Conv", &["x", "w", "b"], &["y"])],
            vec![
                Tensor::new("w", vec![2, 1, 1, 1], Data::F32(vec![0.5, -0.25])),
                Tensor::new("b", vec![2], Data::F32(vec![0.1, -0.2])),
            ],
            17,
        );
        let opts = QuantOptions {
            bias_correction: false,
            ..Default::default()
        };
        let (q, _) = quantize(&m, &opts, &mut Synthetic, &()).unwrap();
        let g = &q.graph;
        let conv = g.nodes.iter().find(|n| n.op_type == "Conv").unwrap();
        let dq = &g.nodes[g.producers()[conv.inputs[2].as_str()]];
        assert_eq!(dq.op_type, "DequantizeLinear");
        assert!(matches!(g.initializers[&dq.inputs[0]].data, Data::I32(_)));
    }
}
