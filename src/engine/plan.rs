//! Plans: an ONNX graph resolved, for concrete input shapes, into a list of steps over a
//! closed set of ops. Shapes, attributes and constant inputs are all settled here, so
//! running a plan only moves numbers; everything unsupported is refused here, naming the
//! node.
//!
//! Each ONNX op has a small builder (registered by name in `BUILDERS`) that reads its
//! attributes with ONNX defaults and refuses unsupported cases.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, ensure, Context, Result};

use super::kernels::{
    act::Act,
    binary::{Bcast, BinOp},
    bn::BnGeom,
    conv::ConvGeom,
    layout::Range1,
    matmul::{GemmGeom, MatMulGeom},
    pool::PoolGeom,
    quant::QuantGeom,
    reduce::ReduceGeom,
    softmax::SoftmaxGeom,
};
use super::Tensor;
use crate::onnx::{self, shape::Shapes, Graph, Node};

/// Where a step reads an input from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    /// A value computed at run time (or a graph input), by slot.
    Val(usize),
    /// A parameter in the `ParamStore`, by index.
    Param(usize),
    /// A state tensor (BatchNorm running statistics), by index.
    State(usize),
    /// A constant of the plan, by index.
    Const(usize),
}

/// The closed set of operations a plan is made of, with everything resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Inputs: x, w, [b].
    Conv {
        geom: ConvGeom,
        bias: bool,
    },
    /// Inputs: x, w, [b]. `geom` is the convolution whose input gradient this op computes:
    /// its input is this op's output and its output is this op's input.
    ConvTranspose {
        geom: ConvGeom,
        bias: bool,
    },
    /// Inputs: x, scale, bias, running mean, running var.
    BatchNorm {
        geom: BnGeom,
        eps: f32,
        momentum: f32,
    },
    Relu,
    Clip {
        lo: f32,
        hi: f32,
    },
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Tanh,
    Add(Bcast),
    Sub(Bcast),
    Mul(Bcast),
    Div(Bcast),
    MaxPool(PoolGeom),
    AveragePool {
        geom: PoolGeom,
        count_include_pad: bool,
    },
    GlobalAveragePool {
        planes: usize,
        plane: usize,
    },
    /// Inputs: a, b, [c].
    Gemm(GemmGeom),
    MatMul(MatMulGeom),
    /// Flatten, Reshape, Squeeze, Unsqueeze, Identity and float-to-float Cast: same values,
    /// new shape.
    Reshape {
        shape: Vec<usize>,
    },
    Transpose {
        in_shape: Vec<usize>,
        perm: Vec<usize>,
    },
    Concat {
        outer: usize,
        inner: Vec<usize>,
    },
    Split {
        outer: usize,
        inner: Vec<usize>,
    },
    Slice {
        in_shape: Vec<usize>,
        ranges: Vec<Range1>,
    },
    Pad {
        in_shape: Vec<usize>,
        pads: Vec<i64>,
        value: f32,
    },
    Softmax(SoftmaxGeom),
    LogSoftmax(SoftmaxGeom),
    Dropout {
        ratio: f32,
    },
    ReduceMean(ReduceGeom),
    QuantizeLinear(QuantGeom),
    DequantizeLinear(QuantGeom),
}

impl Op {
    /// The activation this op applies element-wise, if it is one.
    pub fn act(&self) -> Option<Act> {
        Some(match *self {
            Op::Relu => Act::Relu,
            Op::Clip { lo, hi } => Act::Clip { lo, hi },
            Op::LeakyRelu { alpha } => Act::LeakyRelu { alpha },
            Op::Sigmoid => Act::Sigmoid,
            Op::HardSigmoid { alpha, beta } => Act::HardSigmoid { alpha, beta },
            Op::HardSwish => Act::HardSwish,
            Op::Tanh => Act::Tanh,
            _ => return None,
        })
    }

    pub fn binary(&self) -> Option<(BinOp, &Bcast)> {
        match self {
            Op::Add(b) => Some((BinOp::Add, b)),
            Op::Sub(b) => Some((BinOp::Sub, b)),
            Op::Mul(b) => Some((BinOp::Mul, b)),
            Op::Div(b) => Some((BinOp::Div, b)),
            _ => None,
        }
    }

    /// Whether gradients flow through this op.
    pub fn has_backward(&self) -> bool {
        !matches!(self, Op::QuantizeLinear(_) | Op::DequantizeLinear(_))
    }
}

/// One node of the graph, resolved.
#[derive(Debug, Clone)]
pub struct Step {
    /// The ONNX node's name, for error messages.
    pub node: String,
    pub op_type: String,
    pub op: Op,
    pub inputs: Vec<Src>,
    pub outputs: Vec<usize>,
}

/// A graph resolved for one set of input shapes.
#[derive(Debug)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Name and shape of each value slot.
    pub values: Vec<(String, Vec<usize>)>,
    /// Every named value the plan knows, by name.
    pub index: HashMap<String, Src>,
    /// Graph inputs: name and slot.
    pub inputs: Vec<(String, usize)>,
    pub outputs: Vec<(String, Src)>,
    pub consts: Vec<Tensor>,
    /// For each value slot, the last step reading it (`usize::MAX` when only an output).
    pub last_use: Vec<usize>,
}

/// How each initializer is used, decided once per model.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    /// Initializer name to parameter index.
    pub params: HashMap<String, usize>,
    /// Initializer name to state index.
    pub state: HashMap<String, usize>,
}

/// Follows Identity nodes back from `name` to the initializer they forward, if any.
fn through_identity<'g>(
    graph: &'g Graph,
    producers: &HashMap<&str, usize>,
    mut name: &'g str,
) -> &'g str {
    for _ in 0..graph.nodes.len() {
        match producers.get(name).map(|&i| &graph.nodes[i]) {
            Some(n) if n.op_type == "Identity" => name = n.inputs[0].as_str(),
            _ => break,
        }
    }
    name
}

/// Parameters are float initializers feeding Conv, ConvTranspose, Gemm or MatMul (weights and
/// biases) or BatchNormalization's scale and bias; BatchNormalization's running mean and
/// variance are state. Returns names in graph order.
pub fn classify(graph: &Graph) -> Result<(Vec<String>, Vec<String>)> {
    let producers = graph.producers();
    let mut params = Vec::new();
    let mut state = Vec::new();
    let mut seen = HashSet::new();
    for n in &graph.nodes {
        let slots: &[(usize, bool)] = match n.op_type.as_str() {
            "Conv" | "ConvTranspose" | "Gemm" | "MatMul" => &[(0, false), (1, false), (2, false)],
            "BatchNormalization" => &[(1, false), (2, false), (3, true), (4, true)],
            _ => continue,
        };
        for &(i, is_state) in slots {
            let Some(inp) = n.input(i) else { continue };
            let name = through_identity(graph, &producers, inp);
            let Some(t) = graph.initializers.get(name) else {
                continue;
            };
            if !matches!(t.data, onnx::Data::F32(_)) {
                continue;
            }
            if seen.insert(name.to_string()) {
                if is_state {
                    state.push(name.to_string())
                } else {
                    params.push(name.to_string())
                }
            } else {
                let was_state = state.iter().any(|s| s == name);
                ensure!(
                    was_state == is_state,
                    n.unsupported(format!("initializer `{name}` is used both as a trainable weight and as BatchNormalization running statistics"))
                );
            }
        }
    }
    Ok((params, state))
}

/// Operators a plan can contain (the ones in `BUILDERS` plus shape-only ones folded away).
pub const SUPPORTED_OPS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Gemm",
    "MatMul",
    "Flatten",
    "Reshape",
    "Transpose",
    "Concat",
    "Split",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Pad",
    "Softmax",
    "LogSoftmax",
    "Dropout",
    "Identity",
    "ReduceMean",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
    "Shape",
    "Gather",
    "Constant",
];

/// Builds the plan for `input_shapes` (graph input name to concrete shape).
pub fn build(
    graph: &Graph,
    opset: i64,
    roles: &Roles,
    input_shapes: &HashMap<String, Vec<usize>>,
) -> Result<Plan> {
    let shapes = onnx::shape::infer(graph, input_shapes)?;
    let mut plan = Plan {
        steps: Vec::new(),
        values: Vec::new(),
        index: HashMap::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        consts: Vec::new(),
        last_use: Vec::new(),
    };
    for v in &graph.inputs {
        let slot = plan.values.len();
        plan.values
            .push((v.name.clone(), shapes.get(&v.name)?.to_vec()));
        plan.index.insert(v.name.clone(), Src::Val(slot));
        plan.inputs.push((v.name.clone(), slot));
    }
    for (name, &i) in &roles.params {
        plan.index.insert(name.clone(), Src::Param(i));
    }
    for (name, &i) in &roles.state {
        plan.index.insert(name.clone(), Src::State(i));
    }
    // Values that depend on run-time data or on parameters; everything else is constant.
    let mut live: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    live.extend(roles.params.keys().map(String::as_str));
    live.extend(roles.state.keys().map(String::as_str));
    for node in &graph.nodes {
        let reads_live = node.inputs.iter().any(|i| live.contains(i.as_str()));
        let all_const = node
            .outputs
            .iter()
            .filter(|o| !o.is_empty())
            .all(|o| shapes.consts.contains_key(o));
        // Shape reads only its input's (concrete) shape. Initializers also count as constants
        // for shape inference, so a node reading a parameter is never folded.
        if all_const && (node.op_type == "Shape" || !reads_live) {
            // Shape-only subgraph (Shape -> Gather -> Concat -> Reshape and friends): its
            // outputs are known now and never computed per batch.
            continue;
        }
        if reads_live {
            live.extend(node.outputs.iter().map(String::as_str));
        }
        let step = build_step(node, opset, &shapes, &mut plan)
            .with_context(|| format!("cannot plan node `{}` ({})", node.name, node.op_type))?;
        plan.steps.push(step);
    }
    for o in &graph.outputs {
        let src = resolve(&o.name, &shapes, &mut plan)
            .with_context(|| format!("graph output `{}`", o.name))?;
        plan.outputs.push((o.name.clone(), src));
    }
    let mut last_use = vec![0usize; plan.values.len()];
    for (i, s) in plan.steps.iter().enumerate() {
        for src in &s.inputs {
            if let Src::Val(v) = src {
                last_use[*v] = i;
            }
        }
    }
    for (_, src) in &plan.outputs {
        if let Src::Val(v) = src {
            last_use[*v] = usize::MAX;
        }
    }
    plan.last_use = last_use;
    Ok(plan)
}

/// The source of a value read by a step: computed, parameter, state, or a constant taken from
/// shape inference's folded values (initializers included).
fn resolve(name: &str, shapes: &Shapes, plan: &mut Plan) -> Result<Src> {
    if let Some(&s) = plan.index.get(name) {
        return Ok(s);
    }
    let c = shapes
        .consts
        .get(name)
        .with_context(|| format!("value `{name}` is not computed before it is read"))?;
    let t = Tensor::from_onnx(c)?;
    let src = Src::Const(plan.consts.len());
    plan.consts.push(t);
    plan.index.insert(name.to_string(), src);
    Ok(src)
}

/// What a builder sees of a node: its attributes, input and output shapes, and constants.
pub struct Ctx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    shapes: &'a Shapes,
}

impl Ctx<'_> {
    pub fn in_shape(&self, i: usize) -> Result<&[usize]> {
        let name = self
            .node
            .input(i)
            .with_context(|| self.node.unsupported(format!("input {i} is missing")))?;
        self.shapes.get(name)
    }
    pub fn out_shape(&self, i: usize) -> Result<&[usize]> {
        self.shapes.get(&self.node.outputs[i])
    }
    /// Constant value of input `i`, if that input is given and constant.
    pub fn const_input(&self, i: usize) -> Option<&onnx::Tensor> {
        self.node.input(i).and_then(|n| self.shapes.consts.get(n))
    }
    /// Input `i` as constant floats; an error naming the node when it is computed at run time.
    pub fn const_f32(&self, i: usize, what: &str) -> Result<Option<Vec<f32>>> {
        match self.node.input(i) {
            None => Ok(None),
            Some(n) => match self.shapes.consts.get(n) {
                Some(t) => Ok(Some(t.to_f32_vec())),
                None => bail!(self.node.unsupported(format!("{what} (input `{n}`) must be a constant; values computed at run time are not supported"))),
            },
        }
    }
    pub fn const_i64(&self, i: usize, what: &str) -> Result<Option<Vec<i64>>> {
        match self.node.input(i) {
            None => Ok(None),
            Some(n) => match self.shapes.consts.get(n).and_then(onnx::Tensor::to_i64_vec) {
                Some(v) => Ok(Some(v)),
                None => bail!(self.node.unsupported(format!(
                    "{what} (input `{n}`) must be a constant integer tensor"
                ))),
            },
        }
    }
    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        self.node.unsupported(msg)
    }
}

/// A builder's result: the op and which of the node's inputs it reads at run time.
pub struct Built {
    pub op: Op,
    pub inputs: Vec<usize>,
}

type Builder = fn(&Ctx) -> Result<Built>;

/// One builder per ONNX op type.
const BUILDERS: &[(&str, Builder)] = &[
    ("Conv", build_conv),
    ("ConvTranspose", build_conv_transpose),
    ("BatchNormalization", build_batch_norm),
    ("Relu", |_| {
        Ok(Built {
            op: Op::Relu,
            inputs: vec![0],
        })
    }),
    ("Clip", build_clip),
    ("LeakyRelu", |c| {
        Ok(Built {
            op: Op::LeakyRelu {
                alpha: c.node.attr_float("alpha", 0.01)?,
            },
            inputs: vec![0],
        })
    }),
    ("Sigmoid", |_| {
        Ok(Built {
            op: Op::Sigmoid,
            inputs: vec![0],
        })
    }),
    ("HardSigmoid", |c| {
        Ok(Built {
            op: Op::HardSigmoid {
                alpha: c.node.attr_float("alpha", 0.2)?,
                beta: c.node.attr_float("beta", 0.5)?,
            },
            inputs: vec![0],
        })
    }),
    ("HardSwish", |_| {
        Ok(Built {
            op: Op::HardSwish,
            inputs: vec![0],
        })
    }),
    ("Tanh", |_| {
        Ok(Built {
            op: Op::Tanh,
            inputs: vec![0],
        })
    }),
    ("Add", build_binary),
    ("Sub", build_binary),
    ("Mul", build_binary),
    ("Div", build_binary),
    ("MaxPool", build_pool),
    ("AveragePool", build_pool),
    ("GlobalAveragePool", build_global_avg),
    ("Gemm", build_gemm),
    ("MatMul", build_matmul),
    ("Flatten", build_reshape),
    ("Reshape", build_reshape),
    ("Squeeze", build_reshape),
    ("Unsqueeze", build_reshape),
    ("Identity", build_reshape),
    ("Cast", build_cast),
    ("Transpose", build_transpose),
    ("Concat", build_concat),
    ("Split", build_split),
    ("Slice", build_slice),
    ("Pad", build_pad),
    ("Softmax", build_softmax),
    ("LogSoftmax", build_softmax),
    ("Dropout", build_dropout),
    ("ReduceMean", build_reduce_mean),
    ("QuantizeLinear", build_quant),
    ("DequantizeLinear", build_quant),
];

fn build_step(node: &Node, opset: i64, shapes: &Shapes, plan: &mut Plan) -> Result<Step> {
    ensure!(
        node.domain.is_empty() || node.domain == "ai.onnx",
        node.unsupported(format!(
            "operators of domain `{}` cannot be trained; only the default ONNX domain is supported",
            node.domain
        ))
    );
    let builder = BUILDERS.iter().find(|(n, _)| *n == node.op_type).map(|(_, b)| *b).with_context(|| {
        match node.op_type.as_str() {
            "Shape" | "Gather" | "Constant" => node.unsupported("is only supported on shapes and constants (folded when planning); here it reads values computed at run time"),
            other => anyhow::anyhow!(
                "operator `{other}` (node `{}`) is not supported by the training engine; supported: {}",
                node.name,
                SUPPORTED_OPS.join(", ")
            ),
        }
    })?;
    let ctx = Ctx {
        node,
        opset,
        shapes,
    };
    let built = builder(&ctx)?;
    let inputs = built
        .inputs
        .iter()
        .map(|&i| {
            let name = node
                .input(i)
                .with_context(|| node.unsupported(format!("input {i} is missing")))?;
            resolve(name, shapes, plan)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut outputs = Vec::new();
    for (i, o) in node.outputs.iter().enumerate() {
        if o.is_empty() {
            continue;
        }
        ensure!(
            i == 0 || matches!(built.op, Op::Split { .. }),
            node.unsupported(format!(
                "output {i} (`{o}`) is not supported; only the first output can be used"
            ))
        );
        let slot = plan.values.len();
        plan.values.push((o.clone(), shapes.get(o)?.to_vec()));
        plan.index.insert(o.clone(), Src::Val(slot));
        outputs.push(slot);
    }
    Ok(Step {
        node: node.name.clone(),
        op_type: node.op_type.clone(),
        op: built.op,
        inputs,
        outputs,
    })
}

/// Spatial rank of an N, C, spatial... tensor, refusing what the kernels do not cover.
fn spatial_2d(c: &Ctx, x: &[usize]) -> Result<()> {
    ensure!(
        x.len() == 3 || x.len() == 4,
        c.err(format!(
            "input has shape {x:?}; only 1-D and 2-D spatial data (N,C,L or N,C,H,W) is supported"
        ))
    );
    Ok(())
}

/// Expands 1-D window geometry to 2-D with a unit height.
fn to_2d(v: &[usize], fill: usize) -> [usize; 2] {
    if v.len() == 1 {
        [fill, v[0]]
    } else {
        [v[0], v[1]]
    }
}

fn build_conv(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    let w = c.in_shape(1)?.to_vec();
    spatial_2d(c, &x)?;
    let group = c.node.attr_int("group", 1)?;
    ensure!(
        group >= 1 && w.len() == x.len() && (w[0] as i64) % group == 0,
        c.err(format!(
            "weight {w:?} does not fit input {x:?} with group {group}"
        ))
    );
    let kernel: Vec<usize> = w[2..].to_vec();
    if let Some(k) = c.node.attr_ints("kernel_shape")? {
        ensure!(
            k.iter().map(|&v| v as usize).collect::<Vec<_>>() == kernel,
            c.err(format!(
                "kernel_shape {k:?} differs from the weight's {kernel:?}"
            ))
        );
    }
    let win = onnx::shape::window(c.node, &x[2..], kernel.clone(), false)?;
    let r = kernel.len();
    let [kh, kw] = to_2d(&kernel, 1);
    let [sh, sw] = to_2d(&win.strides, 1);
    let [dh, dw] = to_2d(&win.dilations, 1);
    let [pt, pl] = to_2d(&win.pads[..r], 0);
    let [oh, ow] = to_2d(&win.out, 1);
    let [h, wd] = to_2d(&x[2..], 1);
    let geom = ConvGeom {
        n: x[0],
        c_in: x[1],
        h,
        w: wd,
        c_out: w[0],
        kh,
        kw,
        sh,
        sw,
        dh,
        dw,
        pt,
        pl,
        groups: group as usize,
        oh,
        ow,
    };
    let bias = c.node.input(2).is_some();
    if bias {
        ensure!(
            c.in_shape(2)? == [w[0]],
            c.err(format!(
                "bias has shape {:?}, expected [{}]",
                c.in_shape(2)?,
                w[0]
            ))
        );
    }
    Ok(Built {
        op: Op::Conv { geom, bias },
        inputs: if bias { vec![0, 1, 2] } else { vec![0, 1] },
    })
}

fn build_conv_transpose(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    let w = c.in_shape(1)?.to_vec();
    let y = c.out_shape(0)?.to_vec();
    spatial_2d(c, &x)?;
    let group = c.node.attr_int("group", 1)? as usize;
    ensure!(
        group >= 1 && w.len() == x.len() && w[0] == x[1] && x[1] % group == 0,
        c.err(format!(
            "weight {w:?} does not fit input {x:?} with group {group}"
        ))
    );
    let r = x.len() - 2;
    let list = |name: &str| -> Result<Vec<usize>> {
        Ok(match c.node.attr_ints(name)? {
            Some(v) => {
                ensure!(
                    v.len() == r && v.iter().all(|&s| s > 0),
                    c.err(format!("{name} {v:?} must be {r} positive values"))
                );
                v.iter().map(|&s| s as usize).collect()
            }
            None => vec![1; r],
        })
    };
    let strides = list("strides")?;
    let dil = list("dilations")?;
    let kernel: Vec<usize> = w[2..].to_vec();
    let auto_pad = c.node.attr_string("auto_pad", "NOTSET")?;
    let out_pad: Vec<i64> = c
        .node
        .attr_ints("output_padding")?
        .unwrap_or_else(|| vec![0; r]);
    let has_output_shape = c.node.attr_ints("output_shape")?.is_some();
    let mut pads = vec![0usize; 2 * r];
    if has_output_shape || auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER" {
        ensure!(has_output_shape, c.err("auto_pad SAME_* without output_shape is not supported; give explicit pads or output_shape"));
        for i in 0..r {
            let full =
                strides[i] * (x[2 + i] - 1) + out_pad[i] as usize + (kernel[i] - 1) * dil[i] + 1;
            ensure!(
                full >= y[2 + i],
                c.err(format!(
                    "output_shape {:?} is larger than the transposed convolution produces",
                    &y[2..]
                ))
            );
            let total = full - y[2 + i];
            let (b, e) = if auto_pad == "SAME_UPPER" {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            };
            pads[i] = b;
            pads[i + r] = e;
        }
    } else if let Some(p) = c.node.attr_ints("pads")? {
        ensure!(
            p.len() == 2 * r && p.iter().all(|&v| v >= 0),
            c.err(format!("pads {p:?} must be {} non-negative values", 2 * r))
        );
        pads = p.iter().map(|&v| v as usize).collect();
    }
    ensure!(
        auto_pad != "VALID" || pads.iter().all(|&p| p == 0),
        c.err("auto_pad VALID with pads")
    );
    let [kh, kw] = to_2d(&kernel, 1);
    let [sh, sw] = to_2d(&strides, 1);
    let [dh, dw] = to_2d(&dil, 1);
    let [pt, pl] = to_2d(&pads[..r], 0);
    let [h, wd] = to_2d(&y[2..], 1);
    let [oh, ow] = to_2d(&x[2..], 1);
    // The convolution that maps this op's output space back to its input space.
    let geom = ConvGeom {
        n: x[0],
        c_in: y[1],
        h,
        w: wd,
        c_out: x[1],
        kh,
        kw,
        sh,
        sw,
        dh,
        dw,
        pt,
        pl,
        groups: group,
        oh,
        ow,
    };
    ensure!(
        y[1] == w[1] * group,
        c.err(format!(
            "output has {} channels, expected {}",
            y[1],
            w[1] * group
        ))
    );
    let bias = c.node.input(2).is_some();
    Ok(Built {
        op: Op::ConvTranspose { geom, bias },
        inputs: if bias { vec![0, 1, 2] } else { vec![0, 1] },
    })
}

fn build_batch_norm(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?;
    ensure!(
        x.len() >= 2,
        c.err(format!("input {x:?} has no channel axis"))
    );
    ensure!(
        c.node.attr_int("spatial", 1)? == 1,
        c.err("spatial=0 (per-activation statistics) is not supported")
    );
    for o in 1..c.node.outputs.len() {
        ensure!(c.node.outputs[o].is_empty(), c.err("running-statistics outputs (a training-mode export) are not supported; export the model in eval mode"));
    }
    let geom = BnGeom {
        n: x[0],
        c: x[1],
        plane: x[2..].iter().product(),
    };
    Ok(Built {
        op: Op::BatchNorm {
            geom,
            eps: c.node.attr_float("epsilon", 1e-5)?,
            momentum: c.node.attr_float("momentum", 0.9)?,
        },
        inputs: vec![0, 1, 2, 3, 4],
    })
}

fn build_clip(c: &Ctx) -> Result<Built> {
    let (lo, hi) = if c.opset < 11 {
        (
            c.node.attr_float("min", f32::MIN)?,
            c.node.attr_float("max", f32::MAX)?,
        )
    } else {
        let one = |i: usize, what: &str, default: f32| -> Result<f32> {
            match c.const_f32(i, what)? {
                None => Ok(default),
                Some(v) if v.len() == 1 => Ok(v[0]),
                Some(v) => bail!(c.err(format!("{what} must be a scalar, got {} values", v.len()))),
            }
        };
        (one(1, "min", f32::MIN)?, one(2, "max", f32::MAX)?)
    };
    Ok(Built {
        op: Op::Clip { lo, hi },
        inputs: vec![0],
    })
}

fn build_binary(c: &Ctx) -> Result<Built> {
    let (a, b) = (c.in_shape(0)?, c.in_shape(1)?);
    let bc = Bcast::new(a, b)
        .with_context(|| c.err(format!("shapes {a:?} and {b:?} do not broadcast")))?;
    let op = match c.node.op_type.as_str() {
        "Add" => Op::Add(bc),
        "Sub" => Op::Sub(bc),
        "Mul" => Op::Mul(bc),
        _ => Op::Div(bc),
    };
    Ok(Built {
        op,
        inputs: vec![0, 1],
    })
}

fn build_pool(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    spatial_2d(c, &x)?;
    let kernel: Vec<usize> = c
        .node
        .attr_ints("kernel_shape")?
        .with_context(|| c.err("kernel_shape is required"))?
        .iter()
        .map(|&k| k as usize)
        .collect();
    ensure!(
        kernel.len() == x.len() - 2 && kernel.iter().all(|&k| k > 0),
        c.err(format!("kernel_shape {kernel:?} does not fit input {x:?}"))
    );
    let ceil = c.node.attr_int("ceil_mode", 0)? != 0;
    let win = onnx::shape::window(c.node, &x[2..], kernel.clone(), ceil)?;
    if c.node.outputs.len() > 1 {
        ensure!(
            c.node.outputs[1].is_empty(),
            c.err("the Indices output is not supported")
        );
    }
    let r = kernel.len();
    let [kh, kw] = to_2d(&kernel, 1);
    let [sh, sw] = to_2d(&win.strides, 1);
    let [dh, dw] = to_2d(&win.dilations, 1);
    let [pt, pl] = to_2d(&win.pads[..r], 0);
    let [pb, pr] = to_2d(&win.pads[r..], 0);
    let [oh, ow] = to_2d(&win.out, 1);
    let [h, w] = to_2d(&x[2..], 1);
    let geom = PoolGeom {
        n: x[0],
        c: x[1],
        h,
        w,
        kh,
        kw,
        sh,
        sw,
        dh,
        dw,
        pt,
        pl,
        pb,
        pr,
        oh,
        ow,
    };
    let op = if c.node.op_type == "MaxPool" {
        Op::MaxPool(geom)
    } else {
        ensure!(
            dh == 1 && dw == 1,
            c.err("dilated AveragePool is not supported")
        );
        Op::AveragePool {
            geom,
            count_include_pad: c.node.attr_int("count_include_pad", 0)? != 0,
        }
    };
    Ok(Built {
        op,
        inputs: vec![0],
    })
}

fn build_global_avg(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?;
    ensure!(
        x.len() >= 3,
        c.err(format!("input {x:?} must be N,C,spatial..."))
    );
    Ok(Built {
        op: Op::GlobalAveragePool {
            planes: x[0] * x[1],
            plane: x[2..].iter().product(),
        },
        inputs: vec![0],
    })
}

fn build_gemm(c: &Ctx) -> Result<Built> {
    let (a, b) = (c.in_shape(0)?, c.in_shape(1)?);
    ensure!(
        a.len() == 2 && b.len() == 2,
        c.err(format!("Gemm needs 2-D inputs, got {a:?} and {b:?}"))
    );
    let trans_a = c.node.attr_int("transA", 0)? != 0;
    let trans_b = c.node.attr_int("transB", 0)? != 0;
    let (m, k) = if trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
    let n = if trans_b { b[0] } else { b[1] };
    let (mut c_rows, mut c_cols) = (1, 1);
    let has_c = c.node.input(2).is_some();
    if has_c {
        let cs = c.in_shape(2)?;
        let padded: Vec<usize> = std::iter::repeat_n(1, 2usize.saturating_sub(cs.len()))
            .chain(cs.iter().copied())
            .collect();
        ensure!(
            padded.len() == 2
                && (padded[0] == 1 || padded[0] == m)
                && (padded[1] == 1 || padded[1] == n),
            c.err(format!(
                "C of shape {cs:?} does not broadcast to [{m}, {n}]"
            ))
        );
        (c_rows, c_cols) = (padded[0], padded[1]);
    }
    let geom = GemmGeom {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha: c.node.attr_float("alpha", 1.0)?,
        beta: c.node.attr_float("beta", 1.0)?,
        c_rows,
        c_cols,
    };
    Ok(Built {
        op: Op::Gemm(geom),
        inputs: if has_c { vec![0, 1, 2] } else { vec![0, 1] },
    })
}

fn build_matmul(c: &Ctx) -> Result<Built> {
    let (a, b) = (c.in_shape(0)?, c.in_shape(1)?);
    let (g, _) = MatMulGeom::new(a, b)
        .with_context(|| c.err(format!("shapes {a:?} and {b:?} cannot be multiplied")))?;
    Ok(Built {
        op: Op::MatMul(g),
        inputs: vec![0, 1],
    })
}

fn build_reshape(c: &Ctx) -> Result<Built> {
    Ok(Built {
        op: Op::Reshape {
            shape: c.out_shape(0)?.to_vec(),
        },
        inputs: vec![0],
    })
}

fn build_cast(c: &Ctx) -> Result<Built> {
    let to = c.node.attr_int("to", 1)?;
    ensure!(to == 1, c.err(format!("Cast to data type {} of values computed at run time is not supported; the engine computes in float32", onnx::tensor::dtype_name(to as i32))));
    build_reshape(c)
}

fn build_transpose(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    let perm: Vec<usize> = match c.node.attr_ints("perm")? {
        Some(p) => p
            .iter()
            .map(|&v| onnx::shape::axis(v, x.len(), c.node))
            .collect::<Result<_>>()?,
        None => (0..x.len()).rev().collect(),
    };
    Ok(Built {
        op: Op::Transpose { in_shape: x, perm },
        inputs: vec![0],
    })
}

/// `outer` rows and each part's contiguous run per row, for Concat and Split along `axis`.
fn concat_layout(shapes: &[&[usize]], axis: usize) -> (usize, Vec<usize>) {
    let outer = shapes[0][..axis].iter().product();
    let inner = shapes.iter().map(|s| s[axis..].iter().product()).collect();
    (outer, inner)
}

fn build_concat(c: &Ctx) -> Result<Built> {
    let n = c.node.inputs.len();
    let shapes: Vec<&[usize]> = (0..n).map(|i| c.in_shape(i)).collect::<Result<_>>()?;
    let axis = onnx::shape::axis(c.node.attr_int("axis", 0)?, shapes[0].len(), c.node)?;
    let (outer, inner) = concat_layout(&shapes, axis);
    Ok(Built {
        op: Op::Concat { outer, inner },
        inputs: (0..n).collect(),
    })
}

fn build_split(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?;
    let axis = onnx::shape::axis(c.node.attr_int("axis", 0)?, x.len(), c.node)?;
    let outs: Vec<&[usize]> = c
        .node
        .outputs
        .iter()
        .map(|o| c.shapes.get(o))
        .collect::<Result<_>>()?;
    ensure!(
        c.node.outputs.iter().all(|o| !o.is_empty()),
        c.err("unnamed Split outputs are not supported")
    );
    let (outer, inner) = concat_layout(&outs, axis);
    Ok(Built {
        op: Op::Split { outer, inner },
        inputs: vec![0],
    })
}

fn build_slice(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    let (starts, ends, axes, steps) = if c.opset >= 10 {
        (
            c.const_i64(1, "starts")?
                .with_context(|| c.err("starts is required"))?,
            c.const_i64(2, "ends")?
                .with_context(|| c.err("ends is required"))?,
            c.const_i64(3, "axes")?,
            c.const_i64(4, "steps")?,
        )
    } else {
        (
            c.node.attr_ints("starts")?.unwrap_or_default(),
            c.node.attr_ints("ends")?.unwrap_or_default(),
            c.node.attr_ints("axes")?,
            None,
        )
    };
    let ranges = onnx::shape::slice_ranges(&x, &starts, &ends, axes.as_deref(), steps.as_deref())
        .map_err(|e| c.err(e))?;
    let ranges = ranges
        .iter()
        .map(|r| Range1 {
            start: r.start.max(0) as usize,
            step: r.step as isize,
            count: r.count,
        })
        .collect();
    Ok(Built {
        op: Op::Slice {
            in_shape: x,
            ranges,
        },
        inputs: vec![0],
    })
}

fn build_pad(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    let mode = c.node.attr_string("mode", "constant")?;
    ensure!(
        mode == "constant",
        c.err(format!(
            "mode `{mode}` is not supported; only constant padding is"
        ))
    );
    let r = x.len();
    let (pads, value, axes) = if c.opset >= 11 {
        let pads = c
            .const_i64(1, "pads")?
            .with_context(|| c.err("pads is required"))?;
        let value = match c.const_f32(2, "constant_value")? {
            Some(v) if v.len() == 1 => v[0],
            Some(_) => bail!(c.err("constant_value must be a scalar")),
            None => 0.0,
        };
        let axes = match c.const_i64(3, "axes")? {
            Some(a) => a
                .iter()
                .map(|&v| onnx::shape::axis(v, r, c.node))
                .collect::<Result<Vec<_>>>()?,
            None => (0..r).collect(),
        };
        (pads, value, axes)
    } else {
        (
            c.node
                .attr_ints("pads")?
                .with_context(|| c.err("pads is required"))?,
            c.node.attr_float("value", 0.0)?,
            (0..r).collect(),
        )
    };
    ensure!(
        pads.len() == 2 * axes.len(),
        c.err(format!(
            "pads has {} values, expected {}",
            pads.len(),
            2 * axes.len()
        ))
    );
    let mut full = vec![0i64; 2 * r];
    for (i, &a) in axes.iter().enumerate() {
        full[a] = pads[i];
        full[a + r] = pads[i + axes.len()];
    }
    Ok(Built {
        op: Op::Pad {
            in_shape: x,
            pads: full,
            value,
        },
        inputs: vec![0],
    })
}

fn build_softmax(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?;
    let geom = if c.opset >= 13 {
        let a = onnx::shape::axis(c.node.attr_int("axis", -1)?, x.len(), c.node)?;
        SoftmaxGeom {
            outer: x[..a].iter().product(),
            len: x[a],
            inner: x[a + 1..].iter().product(),
        }
    } else {
        // Before opset 13 the input is flattened to 2-D at `axis` (default 1).
        let a = c.node.attr_int("axis", 1)?;
        let a = if a < 0 { a + x.len() as i64 } else { a };
        ensure!(
            (0..=x.len() as i64).contains(&a),
            c.err(format!("axis {a} out of range"))
        );
        let a = a as usize;
        SoftmaxGeom {
            outer: x[..a].iter().product(),
            len: x[a..].iter().product(),
            inner: 1,
        }
    };
    let op = if c.node.op_type == "Softmax" {
        Op::Softmax(geom)
    } else {
        Op::LogSoftmax(geom)
    };
    Ok(Built {
        op,
        inputs: vec![0],
    })
}

fn build_dropout(c: &Ctx) -> Result<Built> {
    let ratio = if c.opset >= 12 {
        match c.const_f32(1, "ratio")? {
            Some(v) if v.len() == 1 => v[0],
            Some(_) => bail!(c.err("ratio must be a scalar")),
            None => 0.5,
        }
    } else {
        c.node.attr_float("ratio", 0.5)?
    };
    ensure!(
        (0.0..1.0).contains(&ratio),
        c.err(format!("ratio {ratio} must be in [0, 1)"))
    );
    if c.node.outputs.len() > 1 {
        ensure!(
            c.node.outputs[1].is_empty(),
            c.err("the mask output is not supported")
        );
    }
    Ok(Built {
        op: Op::Dropout { ratio },
        inputs: vec![0],
    })
}

fn build_reduce_mean(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    let axes = if c.opset >= 18 {
        c.const_i64(1, "axes")?
    } else {
        c.node.attr_ints("axes")?
    };
    let noop = c.node.attr_int("noop_with_empty_axes", 0)? != 0;
    let axes = axes.unwrap_or_default();
    if axes.is_empty() && noop {
        return build_reshape(c);
    }
    let mut mask = vec![axes.is_empty(); x.len()];
    for &a in &axes {
        mask[onnx::shape::axis(a, x.len(), c.node)?] = true;
    }
    Ok(Built {
        op: Op::ReduceMean(ReduceGeom {
            shape: x,
            axes: mask,
        }),
        inputs: vec![0],
    })
}

fn build_quant(c: &Ctx) -> Result<Built> {
    let x = c.in_shape(0)?.to_vec();
    ensure!(
        c.node.attr_int("block_size", 0)? == 0,
        c.err(
            "blocked quantization (block_size) is not supported; use per-tensor or per-axis scales"
        )
    );
    let scale = c
        .const_f32(1, "scale")?
        .with_context(|| c.err("scale is required"))?;
    let zp_t = c.const_input(2);
    if c.node.input(2).is_some() && zp_t.is_none() {
        bail!(c.err("zero_point must be a constant"));
    }
    let signed = match zp_t.map(|t| &t.data) {
        Some(onnx::Data::I8(_)) => true,
        Some(onnx::Data::U8(_)) => false,
        Some(other) => bail!(c.err(format!(
            "zero point of type {} is not supported; use uint8 or int8",
            onnx::tensor::dtype_name(other.dtype() as i32)
        ))),
        None => match c.node.attr_int("output_dtype", 0)? {
            0 | 2 => false,
            3 => true,
            d => bail!(c.err(format!(
                "output_dtype {} is not supported; use uint8 or int8",
                onnx::tensor::dtype_name(d as i32)
            ))),
        },
    };
    let zero_point = zp_t
        .map(|t| t.to_f32_vec())
        .unwrap_or_else(|| vec![0.0; scale.len()]);
    ensure!(
        zero_point.len() == scale.len(),
        c.err("scale and zero_point differ in size")
    );
    let (outer, len, inner) = if scale.len() == 1
        && c.const_input(1)
            .is_some_and(|t| t.dims.iter().product::<usize>() == 1 && t.dims.len() <= 1)
    {
        (1, 1, x.iter().product())
    } else {
        let a = onnx::shape::axis(c.node.attr_int("axis", 1)?, x.len(), c.node)?;
        ensure!(
            x[a] == scale.len(),
            c.err(format!(
                "{} scales for axis {a} of size {}",
                scale.len(),
                x[a]
            ))
        );
        (x[..a].iter().product(), x[a], x[a + 1..].iter().product())
    };
    ensure!(
        scale.iter().all(|&s| s > 0.0 && s.is_finite()),
        c.err("scales must be positive and finite")
    );
    let (qmin, qmax) = if signed {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    let geom = QuantGeom {
        outer,
        len,
        inner,
        scale,
        zero_point,
        qmin,
        qmax,
    };
    let op = if c.node.op_type == "QuantizeLinear" {
        Op::QuantizeLinear(geom)
    } else {
        Op::DequantizeLinear(geom)
    };
    Ok(Built {
        op,
        inputs: vec![0],
    })
}
