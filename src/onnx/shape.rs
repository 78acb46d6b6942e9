//! Shape inference with concrete sizes for the ops CNNs use, plus constant folding of the
//! small integer subgraphs (Shape → Gather → Concat → Reshape) that exporters emit.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};

use super::ir::{Graph, Node};
use super::tensor::{Data, Tensor};

/// Concrete shapes of every value, and the values that are known before run time.
#[derive(Debug, Clone, Default)]
pub struct Shapes {
    pub shapes: HashMap<String, Vec<usize>>,
    /// Initializers and everything computable from them and from shapes alone.
    pub consts: HashMap<String, Tensor>,
}

impl Shapes {
    pub fn get(&self, name: &str) -> Result<&[usize]> {
        self.shapes
            .get(name)
            .map(Vec::as_slice)
            .with_context(|| format!("no shape is known for `{name}`"))
    }

    fn const_i64(&self, name: &str, node: &Node) -> Result<Vec<i64>> {
        self.consts
            .get(name)
            .and_then(Tensor::to_i64_vec)
            .ok_or_else(|| node.unsupported(format!("input `{name}` must be a constant integer tensor (computed from data at run time is not supported)")))
    }
}

/// Ops whose shapes this module infers.
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
    "Resize",
    "Softmax",
    "LogSoftmax",
    "Dropout",
    "Identity",
    "Constant",
    "Shape",
    "Gather",
    "ReduceMean",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
    "Erf",
    "Sqrt",
    "Pow",
    "Exp",
    "Neg",
    "Abs",
    "GlobalMaxPool",
];

/// Infers shapes for all values given concrete shapes of the graph inputs.
pub fn infer(graph: &Graph, inputs: &HashMap<String, Vec<usize>>) -> Result<Shapes> {
    let mut s = Shapes::default();
    for v in &graph.inputs {
        let shape = inputs
            .get(&v.name)
            .with_context(|| format!("no shape given for graph input `{}`", v.name))?;
        check_size(shape, || format!("graph input `{}`", v.name))?;
        s.shapes.insert(v.name.clone(), shape.clone());
    }
    for (name, t) in &graph.initializers {
        s.shapes.insert(name.clone(), t.dims.clone());
        s.consts.insert(name.clone(), t.clone());
    }
    for node in &graph.nodes {
        let context = || {
            format!(
                "shape inference failed at node `{}` ({})",
                node.name, node.op_type
            )
        };
        infer_node(node, &mut s).with_context(context)?;
        for o in node.outputs.iter().filter(|o| !o.is_empty()) {
            if let Some(shape) = s.shapes.get(o) {
                check_size(shape, || format!("output `{o}` of shape {shape:?}"))
                    .with_context(context)?;
            }
        }
    }
    Ok(s)
}

/// Refuses a value whose size, as float32, overflows or exceeds the memory available: a
/// runtime would try to allocate it (hostile models declare such sizes to exhaust memory).
fn check_size(shape: &[usize], what: impl FnOnce() -> String) -> Result<()> {
    let bytes = crate::util::byte_size(shape.iter().map(|&d| d as u64), 4);
    crate::util::ensure_fits_in_memory(bytes, || format!("{} (as float32)", what()))
}

/// Graph input shapes with the batch axis set to `batch`.
pub fn input_shapes(graph: &Graph, batch: usize) -> Result<HashMap<String, Vec<usize>>> {
    graph
        .inputs
        .iter()
        .map(|v| Ok((v.name.clone(), v.concrete_shape(batch)?)))
        .collect()
}

/// Element count, None when it overflows (a zero dimension anywhere still makes it 0:
/// a dimension list such as [2^40, 2^40, 0] is valid and empty).
fn numel(s: &[usize]) -> Option<usize> {
    if s.contains(&0) {
        return Some(0);
    }
    s.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Converts attribute or constant values to sizes, refusing negative ones.
fn sizes(v: &[i64], what: &str, node: &Node) -> Result<Vec<usize>> {
    v.iter()
        .map(|&x| {
            usize::try_from(x)
                .map_err(|_| node.unsupported(format!("{what} {v:?} has a negative value")))
        })
        .collect()
}

/// NumPy-style broadcast of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Normalises a possibly negative axis against `rank`. A scalar (rank 0) has no axis: the
/// result always indexes the shape.
pub fn axis(a: i64, rank: usize, node: &Node) -> Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    ensure!(
        (0..r).contains(&v),
        node.unsupported(format!("axis {a} is out of range for rank {rank}"))
    );
    Ok(v as usize)
}

/// Spatial geometry of a Conv or pooling window, resolved from attributes and input size.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Begin pads then end pads, as in ONNX.
    pub pads: Vec<usize>,
    pub out: Vec<usize>,
}

/// Resolves Conv/Pool window geometry for spatial `input` dims.
pub fn window(node: &Node, input: &[usize], kernel: Vec<usize>, ceil_mode: bool) -> Result<Window> {
    let r = kernel.len();
    ensure!(
        kernel.iter().all(|&k| k > 0),
        node.unsupported(format!("kernel {kernel:?} must be positive"))
    );
    ensure!(
        input.len() == r,
        node.unsupported(format!(
            "input has {} spatial dims but the kernel has {r}",
            input.len()
        ))
    );
    let strides = pos_list(node, "strides", r, 1)?;
    let dilations = pos_list(node, "dilations", r, 1)?;
    let auto_pad = node.attr_string("auto_pad", "NOTSET")?;
    let mut pads = match node.attr_ints("pads")? {
        Some(p) => {
            ensure!(
                p.len() == 2 * r && p.iter().all(|&x| x >= 0),
                node.unsupported(format!("pads {p:?} must be {} non-negative values", 2 * r))
            );
            p.iter().map(|&x| x as usize).collect()
        }
        None => vec![0; 2 * r],
    };
    let mut out = vec![0; r];
    for i in 0..r {
        let eff = (kernel[i] - 1)
            .checked_mul(dilations[i])
            .and_then(|e| e.checked_add(1))
            .with_context(|| node.unsupported("kernel size times dilation overflows"))?;
        match auto_pad.as_str() {
            "NOTSET" => {
                let span = input[i]
                    .checked_add(pads[i])
                    .and_then(|v| v.checked_add(pads[i + r]))
                    .with_context(|| node.unsupported("input size plus pads overflows"))?;
                ensure!(span >= eff, node.unsupported(format!("the kernel ({eff}) is larger than the padded input ({span})")));
                out[i] = if ceil_mode {
                    let o = (span - eff).div_ceil(strides[i]) + 1;
                    // The last window must start inside the input or left padding (ONNX, PyTorch).
                    if (o - 1) * strides[i] >= input[i] + pads[i] { o - 1 } else { o }
                } else {
                    (span - eff) / strides[i] + 1
                };
            }
            "VALID" => {
                ensure!(input[i] >= eff, node.unsupported("the kernel is larger than the input"));
                out[i] = (input[i] - eff) / strides[i] + 1;
                pads[i] = 0;
                pads[i + r] = 0;
            }
            "SAME_UPPER" | "SAME_LOWER" => {
                ensure!(input[i] > 0, node.unsupported("the input has an empty spatial axis"));
                out[i] = input[i].div_ceil(strides[i]);
                let total = ((out[i] - 1) * strides[i])
                    .checked_add(eff)
                    .with_context(|| node.unsupported("padding overflows"))?
                    .saturating_sub(input[i]);
                let small = total / 2;
                let (b, e) = if auto_pad == "SAME_UPPER" { (small, total - small) } else { (total - small, small) };
                pads[i] = b;
                pads[i + r] = e;
            }
            other => bail!(node.unsupported(format!("auto_pad `{other}` is not an ONNX value; use NOTSET, VALID, SAME_UPPER or SAME_LOWER"))),
        }
    }
    Ok(Window {
        kernel,
        strides,
        dilations,
        pads,
        out,
    })
}

fn pos_list(node: &Node, name: &str, r: usize, default: usize) -> Result<Vec<usize>> {
    match node.attr_ints(name)? {
        Some(v) => {
            ensure!(
                v.len() == r && v.iter().all(|&x| x > 0),
                node.unsupported(format!("{name} {v:?} must be {r} positive values"))
            );
            Ok(v.iter().map(|&x| x as usize).collect())
        }
        None => Ok(vec![default; r]),
    }
}

fn set(s: &mut Shapes, node: &Node, i: usize, shape: Vec<usize>) {
    if let Some(o) = node.outputs.get(i).filter(|o| !o.is_empty()) {
        s.shapes.insert(o.clone(), shape);
    }
}

fn set_const(s: &mut Shapes, node: &Node, t: Tensor) {
    let Some(name) = node.outputs.first().filter(|o| !o.is_empty()).cloned() else {
        return;
    };
    s.shapes.insert(name.clone(), t.dims.clone());
    s.consts.insert(name.clone(), Tensor { name, ..t });
}

fn i64_const(dims: Vec<usize>, v: Vec<i64>) -> Tensor {
    Tensor::new("", dims, Data::I64(v))
}

fn infer_node(node: &Node, s: &mut Shapes) -> Result<()> {
    ensure!(
        node.domain.is_empty() || node.domain == "ai.onnx",
        node.unsupported(format!(
            "operators of domain `{}` are not supported",
            node.domain
        ))
    );
    let in_shape = |s: &Shapes, i: usize| -> Result<Vec<usize>> {
        let name = node
            .input(i)
            .with_context(|| node.unsupported(format!("input {i} is missing")))?;
        Ok(s.get(name)?.to_vec())
    };
    match node.op_type.as_str() {
        "Relu" | "Clip" | "LeakyRelu" | "Sigmoid" | "HardSigmoid" | "HardSwish" | "Tanh"
        | "Softmax" | "LogSoftmax" | "Identity" | "Erf" | "Sqrt" | "Exp" | "Neg" | "Abs"
        | "QuantizeLinear" | "DequantizeLinear" => {
            let x = in_shape(s, 0)?;
            if node.op_type == "Identity" {
                if let Some(c) = s.consts.get(&node.inputs[0]).cloned() {
                    set_const(s, node, c);
                    return Ok(());
                }
            }
            set(s, node, 0, x);
        }
        "Dropout" => {
            let x = in_shape(s, 0)?;
            set(s, node, 0, x.clone());
            set(s, node, 1, x);
        }
        "Cast" => {
            let x = in_shape(s, 0)?;
            let to = node.attr_int("to", 1)?;
            if let Some(c) = s.consts.get(&node.inputs[0]).cloned() {
                let data = match to {
                    7 => c.to_i64_vec().map(Data::I64),
                    1 => Some(Data::F32(c.to_f32_vec())),
                    6 => c
                        .to_i64_vec()
                        .map(|v| Data::I32(v.into_iter().map(|x| x as i32).collect())),
                    _ => None,
                };
                if let Some(d) = data {
                    set_const(s, node, Tensor::new("", c.dims.clone(), d));
                    return Ok(());
                }
            }
            set(s, node, 0, x);
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" => {
            let a = in_shape(s, 0)?;
            let b = in_shape(s, 1)?;
            let out = broadcast(&a, &b).with_context(|| {
                node.unsupported(format!("shapes {a:?} and {b:?} do not broadcast"))
            })?;
            let ca = s.consts.get(&node.inputs[0]).and_then(|t| {
                matches!(t.data, Data::I64(_))
                    .then(|| t.to_i64_vec())
                    .flatten()
            });
            let cb = s.consts.get(&node.inputs[1]).and_then(|t| {
                matches!(t.data, Data::I64(_))
                    .then(|| t.to_i64_vec())
                    .flatten()
            });
            if let (Some(x), Some(y)) = (ca, cb) {
                if numel(&out) == Some(x.len().max(y.len()))
                    && (x.len() == 1 || y.len() == 1 || x.len() == y.len())
                {
                    let n = x.len().max(y.len());
                    let v: Option<Vec<i64>> = (0..n)
                        .map(|i| {
                            let (p, q) = (
                                x[if x.len() == 1 { 0 } else { i }],
                                y[if y.len() == 1 { 0 } else { i }],
                            );
                            match node.op_type.as_str() {
                                "Add" => p.checked_add(q),
                                "Sub" => p.checked_sub(q),
                                "Mul" => p.checked_mul(q),
                                "Div" => p.checked_div(q),
                                _ => None,
                            }
                        })
                        .collect();
                    if let Some(v) = v {
                        set_const(s, node, i64_const(out, v));
                        return Ok(());
                    }
                }
            }
            set(s, node, 0, out);
        }
        "Conv" => {
            let x = in_shape(s, 0)?;
            let w = in_shape(s, 1)?;
            ensure!(
                x.len() >= 3 && w.len() == x.len(),
                node.unsupported(format!(
                    "input {x:?} and weight {w:?} ranks do not fit a convolution"
                ))
            );
            let group = node.attr_int("group", 1)?;
            ensure!(group >= 1, node.unsupported("group must be positive"));
            let channels = w[1].checked_mul(group as usize);
            ensure!(
                channels == Some(x[1]),
                node.unsupported(format!(
                    "input has {} channels but weight {w:?} with group {group} expects {}",
                    x[1],
                    channels.map_or("more".to_string(), |c| c.to_string())
                ))
            );
            let kernel = match node.attr_ints("kernel_shape")? {
                Some(k) => sizes(&k, "kernel_shape", node)?,
                None => w[2..].to_vec(),
            };
            let win = window(node, &x[2..], kernel, false)?;
            let mut out = vec![x[0], w[0]];
            out.extend(win.out);
            set(s, node, 0, out);
        }
        "ConvTranspose" => {
            let x = in_shape(s, 0)?;
            let w = in_shape(s, 1)?;
            ensure!(
                x.len() >= 3 && w.len() == x.len(),
                node.unsupported("input and weight ranks do not fit a transposed convolution")
            );
            let r = x.len() - 2;
            let group = node.attr_int("group", 1)?;
            ensure!(group >= 1, node.unsupported("group must be positive"));
            let strides = pos_list(node, "strides", r, 1)?;
            let dil = pos_list(node, "dilations", r, 1)?;
            let kernel: Vec<usize> = w[2..].to_vec();
            let outpad = node
                .attr_ints("output_padding")?
                .unwrap_or_else(|| vec![0; r]);
            let outpad = sizes(&outpad, "output_padding", node)?;
            let overflow = || node.unsupported("the output size overflows");
            let mut out = vec![
                x[0],
                w[1].checked_mul(group as usize).with_context(overflow)?,
            ];
            if let Some(os) = node.attr_ints("output_shape")? {
                // Spatial sizes, or (as some exporters write it) the full N, C, spatial shape.
                let spatial = if os.len() == r + 2 { &os[2..] } else { &os[..] };
                ensure!(
                    spatial.len() == r,
                    node.unsupported(format!("output_shape {os:?} must have {r} values"))
                );
                out.extend(sizes(spatial, "output_shape", node)?);
            } else {
                let pads = node.attr_ints("pads")?.unwrap_or_else(|| vec![0; 2 * r]);
                let pads = sizes(&pads, "pads", node)?;
                ensure!(
                    pads.len() == 2 * r && outpad.len() == r,
                    node.unsupported("pads/output_padding have the wrong length")
                );
                for i in 0..r {
                    ensure!(
                        x[2 + i] > 0 && kernel[i] > 0,
                        node.unsupported("input and kernel must have non-empty spatial axes")
                    );
                    let full = strides[i]
                        .checked_mul(x[2 + i] - 1)
                        .and_then(|v| v.checked_add(outpad[i]))
                        .and_then(|v| v.checked_add((kernel[i] - 1).checked_mul(dil[i])?))
                        .and_then(|v| v.checked_add(1))
                        .with_context(overflow)?;
                    let p = pads[i].checked_add(pads[i + r]).with_context(overflow)?;
                    ensure!(
                        full > p,
                        node.unsupported("padding removes the whole output")
                    );
                    out.push(full - p);
                }
            }
            set(s, node, 0, out);
        }
        "BatchNormalization" => {
            let x = in_shape(s, 0)?;
            ensure!(
                x.len() >= 2,
                node.unsupported("input must have a channel axis")
            );
            let c = x[1];
            for i in 1..5 {
                let p = in_shape(s, i)?;
                ensure!(
                    p == [c],
                    node.unsupported(format!("parameter {i} has shape {p:?}, expected [{c}]"))
                );
            }
            set(s, node, 0, x);
            set(s, node, 1, vec![c]);
            set(s, node, 2, vec![c]);
        }
        "MaxPool" | "AveragePool" => {
            let x = in_shape(s, 0)?;
            ensure!(
                x.len() >= 3,
                node.unsupported(format!("input {x:?} must be N,C,spatial..."))
            );
            let kernel = node
                .attr_ints("kernel_shape")?
                .with_context(|| node.unsupported("kernel_shape is required"))?;
            let kernel = sizes(&kernel, "kernel_shape", node)?;
            ensure!(
                kernel.iter().all(|&k| k > 0),
                node.unsupported("kernel_shape must be positive")
            );
            let ceil = node.attr_int("ceil_mode", 0)? != 0;
            let win = window(node, &x[2..], kernel, ceil)?;
            let mut out = x[..2].to_vec();
            out.extend(win.out);
            set(s, node, 0, out.clone());
            set(s, node, 1, out);
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let x = in_shape(s, 0)?;
            ensure!(
                x.len() >= 3,
                node.unsupported("input must be N,C,spatial...")
            );
            let mut out = x[..2].to_vec();
            out.extend(std::iter::repeat_n(1, x.len() - 2));
            set(s, node, 0, out);
        }
        "Gemm" => {
            let a = in_shape(s, 0)?;
            let b = in_shape(s, 1)?;
            ensure!(
                a.len() == 2 && b.len() == 2,
                node.unsupported(format!("Gemm needs 2-D inputs, got {a:?} and {b:?}"))
            );
            let (m, ka) = if node.attr_int("transA", 0)? != 0 {
                (a[1], a[0])
            } else {
                (a[0], a[1])
            };
            let (kb, n) = if node.attr_int("transB", 0)? != 0 {
                (b[1], b[0])
            } else {
                (b[0], b[1])
            };
            ensure!(
                ka == kb,
                node.unsupported(format!("inner dimensions differ: {a:?} x {b:?}"))
            );
            set(s, node, 0, vec![m, n]);
        }
        "MatMul" => {
            let a = in_shape(s, 0)?;
            let b = in_shape(s, 1)?;
            ensure!(
                !a.is_empty() && !b.is_empty(),
                node.unsupported("MatMul of scalars")
            );
            let a2 = if a.len() == 1 {
                vec![1, a[0]]
            } else {
                a.clone()
            };
            let b2 = if b.len() == 1 {
                vec![b[0], 1]
            } else {
                b.clone()
            };
            let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
            let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
            ensure!(
                k == k2,
                node.unsupported(format!("inner dimensions differ: {a:?} x {b:?}"))
            );
            let batch = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])
                .with_context(|| node.unsupported("batch dims do not broadcast"))?;
            let mut out = batch;
            if a.len() > 1 {
                out.push(m);
            }
            if b.len() > 1 {
                out.push(n);
            }
            set(s, node, 0, out);
        }
        "Flatten" => {
            let x = in_shape(s, 0)?;
            let ax = node.attr_int("axis", 1)?;
            let a = if ax < 0 { ax + x.len() as i64 } else { ax };
            ensure!(
                (0..=x.len() as i64).contains(&a),
                node.unsupported(format!("axis {ax} out of range"))
            );
            let a = a as usize;
            let (outer, inner) = numel(&x[..a])
                .zip(numel(&x[a..]))
                .with_context(|| node.unsupported(format!("flattening {x:?} overflows")))?;
            set(s, node, 0, vec![outer, inner]);
        }
        "Reshape" => {
            let x = in_shape(s, 0)?;
            let shape = node
                .input(1)
                .with_context(|| node.unsupported("input 1 (shape) is missing"))?;
            let target = s.const_i64(shape, node)?;
            let allowzero = node.attr_int("allowzero", 0)? != 0;
            let out = reshape_dims(&x, &target, allowzero).map_err(|e| node.unsupported(e))?;
            if let Some(c) = s.consts.get(&node.inputs[0]).cloned() {
                set_const(s, node, Tensor { dims: out, ..c });
            } else {
                set(s, node, 0, out);
            }
        }
        "Transpose" => {
            let x = in_shape(s, 0)?;
            let perm: Vec<usize> = match node.attr_ints("perm")? {
                Some(p) => p
                    .iter()
                    .map(|&v| axis(v, x.len(), node))
                    .collect::<Result<_>>()?,
                None => (0..x.len()).rev().collect(),
            };
            let mut sorted = perm.clone();
            sorted.sort();
            ensure!(
                sorted == (0..x.len()).collect::<Vec<_>>(),
                node.unsupported(format!(
                    "perm {perm:?} is not a permutation of rank {}",
                    x.len()
                ))
            );
            set(s, node, 0, perm.iter().map(|&p| x[p]).collect());
        }
        "Concat" => {
            let shapes: Vec<Vec<usize>> = (0..node.inputs.len())
                .map(|i| in_shape(s, i))
                .collect::<Result<_>>()?;
            ensure!(!shapes.is_empty(), node.unsupported("Concat needs inputs"));
            let rank = shapes[0].len();
            let ax = axis(node.attr_int("axis", 0)?, rank, node)?;
            let mut out = shapes[0].clone();
            for sh in &shapes[1..] {
                ensure!(
                    sh.len() == rank,
                    node.unsupported("inputs have different ranks")
                );
                for d in 0..rank {
                    if d != ax {
                        ensure!(
                            sh[d] == out[d],
                            node.unsupported(format!(
                                "shapes {:?} and {sh:?} differ outside axis {ax}",
                                shapes[0]
                            ))
                        );
                    }
                }
                out[ax] = out[ax]
                    .checked_add(sh[ax])
                    .with_context(|| node.unsupported("the concatenated size overflows"))?;
            }
            let cs: Option<Vec<Vec<i64>>> = node
                .inputs
                .iter()
                .map(|i| s.consts.get(i).and_then(Tensor::to_i64_vec))
                .collect();
            match cs {
                Some(parts) if rank == 1 => set_const(s, node, i64_const(out, parts.concat())),
                _ => set(s, node, 0, out),
            }
        }
        "Split" => {
            let x = in_shape(s, 0)?;
            let ax = axis(node.attr_int("axis", 0)?, x.len(), node)?;
            let n = node.outputs.len();
            ensure!(n > 0, node.unsupported("Split needs outputs"));
            let parts: Vec<usize> = if let Some(sp) = node.input(1) {
                sizes(&s.const_i64(sp, node)?, "split", node)?
            } else if let Some(sp) = node.attr_ints("split")? {
                sizes(&sp, "split", node)?
            } else {
                let k = x[ax].div_ceil(n);
                (0..n)
                    .map(|i| k.min(x[ax].saturating_sub(i.saturating_mul(k))))
                    .collect()
            };
            let total = parts.iter().try_fold(0usize, |a, &p| a.checked_add(p));
            ensure!(
                parts.len() == n && total == Some(x[ax]),
                node.unsupported(format!("split sizes {parts:?} do not add up to {}", x[ax]))
            );
            for (i, sz) in parts.into_iter().enumerate() {
                let mut o = x.clone();
                o[ax] = sz;
                set(s, node, i, o);
            }
        }
        "Slice" => {
            let x = in_shape(s, 0)?;
            let (starts, ends, axes, steps) = if node.input(1).is_some() {
                let st = s.const_i64(&node.inputs[1], node)?;
                let ends = node
                    .input(2)
                    .with_context(|| node.unsupported("input 2 (ends) is missing"))?;
                let en = s.const_i64(ends, node)?;
                let ax = match node.input(3) {
                    Some(a) => Some(s.const_i64(a, node)?),
                    None => None,
                };
                let sp = match node.input(4) {
                    Some(a) => Some(s.const_i64(a, node)?),
                    None => None,
                };
                (st, en, ax, sp)
            } else {
                (
                    node.attr_ints("starts")?.unwrap_or_default(),
                    node.attr_ints("ends")?.unwrap_or_default(),
                    node.attr_ints("axes")?,
                    None,
                )
            };
            let ranges = slice_ranges(&x, &starts, &ends, axes.as_deref(), steps.as_deref())
                .map_err(|e| node.unsupported(e))?;
            let out: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            if let (Some(c), 1) = (
                s.consts.get(&node.inputs[0]).and_then(Tensor::to_i64_vec),
                x.len(),
            ) {
                let v: Option<Vec<i64>> = ranges[0].indices().map(|i| c.get(i).copied()).collect();
                let v = v.with_context(|| node.unsupported("slice of a constant out of range"))?;
                set_const(s, node, i64_const(out, v));
            } else {
                set(s, node, 0, out);
            }
        }
        "Squeeze" | "Unsqueeze" => {
            let x = in_shape(s, 0)?;
            let axes = match node.input(1) {
                Some(a) => Some(s.const_i64(a, node)?),
                None => node.attr_ints("axes")?,
            };
            let out = if node.op_type == "Squeeze" {
                match axes {
                    Some(a) => {
                        let ax: Vec<usize> = a
                            .iter()
                            .map(|&v| axis(v, x.len(), node))
                            .collect::<Result<_>>()?;
                        for &a in &ax {
                            ensure!(
                                x[a] == 1,
                                node.unsupported(format!(
                                    "cannot squeeze axis {a} of size {}",
                                    x[a]
                                ))
                            );
                        }
                        x.iter()
                            .enumerate()
                            .filter(|(i, _)| !ax.contains(i))
                            .map(|(_, &d)| d)
                            .collect()
                    }
                    None => x.iter().copied().filter(|&d| d != 1).collect(),
                }
            } else {
                let a = axes.with_context(|| node.unsupported("axes are required"))?;
                let r = x.len() + a.len();
                let mut ax: Vec<usize> =
                    a.iter().map(|&v| axis(v, r, node)).collect::<Result<_>>()?;
                ax.sort();
                let mut it = x.iter();
                (0..r)
                    .map(|i| {
                        if ax.contains(&i) {
                            1
                        } else {
                            *it.next().unwrap_or(&1)
                        }
                    })
                    .collect()
            };
            if let Some(c) = s.consts.get(&node.inputs[0]).cloned() {
                set_const(s, node, Tensor { dims: out, ..c });
            } else {
                set(s, node, 0, out);
            }
        }
        "Pad" => {
            let x = in_shape(s, 0)?;
            let pads = match node.input(1) {
                Some(p) => s.const_i64(p, node)?,
                None => node
                    .attr_ints("pads")?
                    .with_context(|| node.unsupported("pads are required"))?,
            };
            let axes: Vec<usize> = match node.input(3) {
                Some(a) => s
                    .const_i64(a, node)?
                    .iter()
                    .map(|&v| axis(v, x.len(), node))
                    .collect::<Result<_>>()?,
                None => (0..x.len()).collect(),
            };
            ensure!(
                pads.len() == 2 * axes.len(),
                node.unsupported(format!(
                    "pads has {} values, expected {}",
                    pads.len(),
                    2 * axes.len()
                ))
            );
            let mut out = x.clone();
            for (i, &a) in axes.iter().enumerate() {
                let d = i64::try_from(x[a])
                    .ok()
                    .and_then(|d| d.checked_add(pads[i])?.checked_add(pads[i + axes.len()]))
                    .with_context(|| node.unsupported("the padded size overflows"))?;
                ensure!(
                    d >= 0,
                    node.unsupported("negative pads remove more than the axis")
                );
                out[a] = d as usize;
            }
            set(s, node, 0, out);
        }
        "Resize" | "Upsample" => {
            let x = in_shape(s, 0)?;
            let (scales_in, sizes_in) = if node.op_type == "Upsample" {
                (1, usize::MAX)
            } else {
                (2, 3)
            };
            let out: Vec<usize> = if let Some(sz) = node
                .input(sizes_in)
                .filter(|n| s.consts.get(*n).is_some_and(|t| t.numel() > 0))
            {
                s.const_i64(sz, node)?.iter().map(|&v| v as usize).collect()
            } else {
                let sc = node
                    .input(scales_in)
                    .and_then(|n| s.consts.get(n))
                    .map(Tensor::to_f32_vec);
                let sc = match sc {
                    Some(v) if v.len() == x.len() => v,
                    _ => match node.attr_floats("scales")? {
                        Some(v) => v,
                        None => bail!(node
                            .unsupported("needs constant `scales` or `sizes` of the input's rank")),
                    },
                };
                x.iter()
                    .zip(&sc)
                    .map(|(&d, &f)| (d as f32 * f).floor() as usize)
                    .collect()
            };
            ensure!(
                out.len() == x.len(),
                node.unsupported("output rank differs from input rank")
            );
            set(s, node, 0, out);
        }
        "Shape" => {
            let x = in_shape(s, 0)?;
            let r = x.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(node.attr_int("start", 0)?);
            let end = clamp(node.attr_int("end", r)?);
            let v: Vec<i64> = x[start..end.max(start)].iter().map(|&d| d as i64).collect();
            set_const(s, node, i64_const(vec![v.len()], v));
        }
        "Gather" => {
            let x = in_shape(s, 0)?;
            let idx = in_shape(s, 1)?;
            ensure!(
                !x.is_empty(),
                node.unsupported("cannot gather from a scalar")
            );
            let ax = axis(node.attr_int("axis", 0)?, x.len(), node)?;
            let mut out = x[..ax].to_vec();
            out.extend(&idx);
            out.extend(&x[ax + 1..]);
            let data = s.consts.get(&node.inputs[0]).and_then(Tensor::to_i64_vec);
            let ids = s.consts.get(&node.inputs[1]).and_then(Tensor::to_i64_vec);
            match (data, ids) {
                (Some(d), Some(i)) if x.len() == 1 => {
                    let n = d.len() as i64;
                    let v: Option<Vec<i64>> = i
                        .iter()
                        .map(|&k| {
                            let k = if k < 0 { k + n } else { k };
                            (0..n).contains(&k).then(|| d[k as usize])
                        })
                        .collect();
                    let v = v.with_context(|| node.unsupported("index out of range"))?;
                    set_const(s, node, i64_const(out, v));
                }
                _ => set(s, node, 0, out),
            }
        }
        "ReduceMean" => {
            let x = in_shape(s, 0)?;
            let axes = match node.input(1) {
                Some(a) => Some(s.const_i64(a, node)?),
                None => node.attr_ints("axes")?,
            };
            let keep = node.attr_int("keepdims", 1)? != 0;
            let ax: Vec<usize> = match axes {
                Some(a) if !a.is_empty() => a
                    .iter()
                    .map(|&v| axis(v, x.len(), node))
                    .collect::<Result<_>>()?,
                _ => (0..x.len()).collect(),
            };
            let out = x
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| {
                    if ax.contains(&i) {
                        keep.then_some(1)
                    } else {
                        Some(d)
                    }
                })
                .collect();
            set(s, node, 0, out);
        }
        "Constant" => {
            bail!(node.unsupported("only tensor-valued Constant nodes are supported (value, value_float(s), value_int(s))"))
        }
        other => bail!(
            "operator `{other}` is not supported by shrink (node `{}`); supported: {}",
            node.name,
            SUPPORTED_OPS.join(", ")
        ),
    }
    Ok(())
}

/// Output dims of an ONNX Reshape.
pub fn reshape_dims(
    x: &[usize],
    target: &[i64],
    allowzero: bool,
) -> std::result::Result<Vec<usize>, String> {
    let total = numel(x).ok_or_else(|| format!("the size of {x:?} overflows"))?;
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err("reshape target has more than one -1".into());
                }
                out.push(1);
            }
            0 if !allowzero => out.push(*x.get(i).ok_or_else(|| {
                format!("reshape target {target:?} copies axis {i} which the input {x:?} lacks")
            })?),
            t if t >= 0 => out.push(t as usize),
            _ => return Err(format!("reshape target {target:?} has a negative size")),
        }
    }
    if let Some(i) = infer {
        let others: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, &d)| d)
            .collect();
        let known = numel(&others).unwrap_or(0);
        if known == 0 || total % known != 0 {
            return Err(format!("cannot reshape {x:?} to {target:?}"));
        }
        out[i] = total / known;
    }
    if numel(&out) != Some(total) {
        return Err(format!(
            "cannot reshape {x:?} ({total} values) to {target:?}"
        ));
    }
    Ok(out)
}

/// A resolved slice along one axis: `start + k*step` for `k < len`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceRange {
    pub start: i64,
    pub step: i64,
    pub count: usize,
}

impl SliceRange {
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.count).map(move |k| (self.start + k as i64 * self.step) as usize)
    }
}

/// Per-axis ranges of an ONNX Slice (clamping as the spec says).
pub fn slice_ranges(
    x: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> std::result::Result<Vec<SliceRange>, String> {
    let r = x.len() as i64;
    let mut ranges: Vec<SliceRange> = x
        .iter()
        .map(|&d| SliceRange {
            start: 0,
            step: 1,
            count: d,
        })
        .collect();
    if starts.len() != ends.len() {
        return Err("starts and ends differ in length".into());
    }
    if axes.is_some_and(|a| a.len() != starts.len())
        || steps.is_some_and(|s| s.len() != starts.len())
    {
        return Err("axes and steps must have as many values as starts".into());
    }
    for i in 0..starts.len() {
        let a = axes.map(|a| a[i]).unwrap_or(i as i64);
        let a = if a < 0 { a + r } else { a };
        if !(0..r).contains(&a) {
            return Err(format!("slice axis {a} out of range"));
        }
        let d = i64::try_from(x[a as usize])
            .map_err(|_| format!("axis {a} of size {} is too large to slice", x[a as usize]))?;
        let step = steps.map(|s| s[i]).unwrap_or(1);
        if step == 0 {
            return Err("slice step 0".into());
        }
        let fix = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (s, e) = (fix(starts[i]), fix(ends[i]));
        let (s, e) = if step > 0 {
            (s.clamp(0, d), e.clamp(0, d))
        } else {
            (s.clamp(-1, d - 1), e.clamp(-1, d - 1))
        };
        // In i128: `step` may be as large as i64::MAX (or as small as i64::MIN).
        let (span, stride) = if step > 0 {
            ((e - s).max(0) as i128, step as i128)
        } else {
            ((s - e).max(0) as i128, -(step as i128))
        };
        let count = (span + stride - 1) / stride;
        ranges[a as usize] = SliceRange {
            start: s,
            step,
            count: count as usize,
        };
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_rules() {
        assert_eq!(
            reshape_dims(&[2, 3, 4], &[0, -1], false).unwrap(),
            vec![2, 12]
        );
        assert_eq!(reshape_dims(&[2, 3, 4], &[-1], false).unwrap(), vec![24]);
        assert!(reshape_dims(&[2, 3, 4], &[5, -1], false).is_err());
        assert!(reshape_dims(&[2, 3], &[-1, -1], false).is_err());
    }

    #[test]
    fn slice_clamps_like_numpy() {
        let r = slice_ranges(&[10], &[2], &[i64::MAX], None, None).unwrap();
        assert_eq!(
            r[0].indices().collect::<Vec<_>>(),
            (2..10).collect::<Vec<_>>()
        );
        let r = slice_ranges(&[5], &[-1], &[i64::MIN], None, Some(&[-2])).unwrap();
        assert_eq!(r[0].indices().collect::<Vec<_>>(), vec![4, 2, 0]);
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: "n".into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attributes: vec![],
        }
    }

    fn infer_one(n: Node, shapes: &[(&str, Vec<usize>)]) -> Result<Shapes> {
        let mut s = Shapes::default();
        for (k, v) in shapes {
            s.shapes.insert(k.to_string(), v.clone());
        }
        infer_node(&n, &mut s).map(|_| s)
    }

    /// Found by fuzzing (`graph_shape`): constant folding wrote to `outputs[0]` of a node
    /// that had none.
    #[test]
    fn constant_folding_node_without_outputs_is_not_a_panic() {
        infer_one(node("Shape", &["x"], &[]), &[("x", vec![1, 2])]).unwrap();
    }

    /// Found by fuzzing (`onnx_bytes`): a Conv weight with a zero-sized spatial axis made
    /// the kernel extent `(k - 1) * dilation + 1` underflow.
    #[test]
    fn zero_sized_kernel_is_an_error() {
        let e = infer_one(
            node("Conv", &["x", "w"], &["y"]),
            &[("x", vec![1, 1, 4, 4]), ("w", vec![1, 1, 0, 3])],
        )
        .unwrap_err();
        assert!(e.to_string().contains("must be positive"), "{e}");
    }

    #[test]
    fn scalar_has_no_axis() {
        let n = node("Concat", &["x"], &["y"]);
        assert!(axis(0, 0, &n).is_err());
        assert!(infer_one(n, &[("x", vec![])]).is_err());
    }

    #[test]
    fn size_arithmetic_overflow_is_an_error() {
        let mut pad = node("Pad", &["x"], &["y"]);
        pad.attributes.push(crate::onnx::ir::make_attr_ints(
            "pads",
            vec![0, i64::MAX, 0, 1],
        ));
        assert!(infer_one(pad, &[("x", vec![2, 2])]).is_err());
        // Valid and empty, but the product of the other axes overflows.
        let flat = node("Flatten", &["x"], &["y"]);
        assert!(infer_one(flat, &[("x", vec![0, 1 << 40, 1 << 40])]).is_err());
        let r = slice_ranges(&[10], &[0], &[10], None, Some(&[i64::MAX])).unwrap();
        assert_eq!(r[0].len(), 1);
        let r = slice_ranges(&[10], &[9], &[-20], None, Some(&[i64::MIN])).unwrap();
        assert_eq!(r[0].len(), 1);
        assert!(slice_ranges(&[10], &[0, 0], &[1, 1], Some(&[0]), None).is_err());
        assert!(reshape_dims(&[2], &[1 << 40, 1 << 40, -1], false).is_err());
        assert!(reshape_dims(&[2], &[1 << 40, 1 << 40], false).is_err());
    }

    #[test]
    fn broadcasting() {
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[2, 3], &[4, 3]), None);
    }
}
