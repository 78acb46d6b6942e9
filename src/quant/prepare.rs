//! Graph preparation before quantization: BatchNormalization folded into the preceding
//! Conv/Gemm, Identity and Dropout removed, and the opset raised to at least 13 so that a
//! per-channel DequantizeLinear axis can be expressed (ONNX Runtime's tool writes an invalid
//! model for opset 11 in that case).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};

use crate::onnx::ir::{Graph, Model, Node};
use crate::onnx::{Data, Tensor};

/// What preparation changed, for the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Prepared {
    pub folded_batchnorms: Vec<String>,
    pub removed_nodes: Vec<String>,
    pub opset_from: i64,
    pub opset_to: i64,
}

/// The lowest opset the quantized graph is written with.
pub const MIN_OPSET: i64 = 13;

pub fn prepare(model: &mut Model) -> Result<Prepared> {
    let mut p = Prepared {
        opset_from: model.opset,
        ..Default::default()
    };
    remove_passthrough(&mut model.graph, &mut p)?;
    fold_batchnorms(&mut model.graph, &mut p)?;
    raise_opset(model)?;
    p.opset_to = model.opset;
    model.graph.value_info.clear();
    model.graph.prune_initializers();
    Ok(p)
}

/// Replaces every use of `old` by `new` (node inputs and graph outputs).
pub fn rename_uses(g: &mut Graph, old: &str, new: &str) {
    for n in g.nodes.iter_mut() {
        for i in n.inputs.iter_mut() {
            if i == old {
                *i = new.to_string();
            }
        }
    }
}

fn remove_passthrough(g: &mut Graph, p: &mut Prepared) -> Result<()> {
    loop {
        let Some(idx) = g.nodes.iter().position(|n| {
            matches!(n.op_type.as_str(), "Identity" | "Dropout") && n.input(0).is_some()
        }) else {
            return Ok(());
        };
        let n = g.nodes.remove(idx);
        let (src, dst) = (n.inputs[0].clone(), n.outputs[0].clone());
        if let Some(mask) = n.outputs.get(1).filter(|m| !m.is_empty()) {
            ensure!(
                !g.nodes.iter().any(|m| m.inputs.contains(mask)) && !g.is_output(mask),
                "node `{}` ({}): its mask output `{mask}` is used; shrink cannot remove it",
                n.name,
                n.op_type
            );
        }
        if g.is_output(&dst) {
            // Keep the output's name: the producer of `src` writes `dst` directly, unless
            // `src` is itself a graph input or initializer (then keep the node).
            let producer = g.nodes.iter_mut().find(|m| m.outputs.contains(&src));
            match producer {
                Some(m) if !g_is_output_static(&g.outputs, &src) => {
                    for o in m.outputs.iter_mut() {
                        if *o == src {
                            *o = dst.clone();
                        }
                    }
                    rename_uses(g, &src, &dst);
                }
                _ => {
                    g.nodes.insert(idx, n);
                    return Ok(());
                }
            }
        } else {
            rename_uses(g, &dst, &src);
        }
        p.removed_nodes.push(n.name);
    }
}

fn g_is_output_static(outputs: &[crate::onnx::ValueInfo], name: &str) -> bool {
    outputs.iter().any(|o| o.name == name)
}

fn f32_init<'a>(g: &'a Graph, name: &str, node: &Node) -> Result<&'a [f32]> {
    g.initializers
        .get(name)
        .and_then(Tensor::as_f32)
        .with_context(|| {
            node.unsupported(format!("`{name}` must be a float32 initializer to fold"))
        })
}

/// Folds `BatchNormalization` (inference form) into a Conv that only feeds it.
fn fold_batchnorms(g: &mut Graph, p: &mut Prepared) -> Result<()> {
    let consumers: HashMap<String, usize> = {
        let mut m = HashMap::new();
        for n in &g.nodes {
            for i in &n.inputs {
                *m.entry(i.clone()).or_insert(0) += 1;
            }
        }
        m
    };
    let mut i = 0;
    while i < g.nodes.len() {
        let bn = &g.nodes[i];
        if bn.op_type != "BatchNormalization" || bn.attr_int("training_mode", 0)? != 0 {
            i += 1;
            continue;
        }
        let x = bn.inputs[0].clone();
        let Some(ci) = g
            .nodes
            .iter()
            .position(|n| n.op_type == "Conv" && n.outputs.first() == Some(&x))
        else {
            i += 1;
            continue;
        };
        if consumers.get(&x).copied().unwrap_or(0) != 1
            || g.is_output(&x)
            || !g.initializers.contains_key(&g.nodes[ci].inputs[1])
        {
            i += 1;
            continue;
        }
        let bn = g.nodes[i].clone();
        let eps = bn.attr_float("epsilon", 1e-5)?;
        let gamma = f32_init(g, &bn.inputs[1], &bn)?.to_vec();
        let beta = f32_init(g, &bn.inputs[2], &bn)?.to_vec();
        let mean = f32_init(g, &bn.inputs[3], &bn)?.to_vec();
        let var = f32_init(g, &bn.inputs[4], &bn)?.to_vec();
        let conv = g.nodes[ci].clone();
        let w_name = conv.inputs[1].clone();
        let w = g
            .initializers
            .get(&w_name)
            .cloned()
            .context("weight checked above")?;
        let wdata = w
            .as_f32()
            .with_context(|| conv.unsupported("weights must be float32"))?;
        let c = w.dims[0];
        ensure!(
            gamma.len() == c,
            bn.unsupported(format!(
                "has {} channels but conv `{}` has {c}",
                gamma.len(),
                conv.name
            ))
        );
        let inner = w.numel() / c.max(1);
        let mut new_w = wdata.to_vec();
        let bias_name = conv.input(2).map(str::to_string);
        let old_bias: Vec<f32> = match &bias_name {
            Some(b) => f32_init(g, b, &conv)?.to_vec(),
            None => vec![0.0; c],
        };
        let mut new_b = vec![0.0f32; c];
        for k in 0..c {
            // f64 keeps the fold exact enough that ORT's float model and ours agree to 1e-5.
            let s = gamma[k] as f64 / (var[k] as f64 + eps as f64).sqrt();
            for v in &mut new_w[k * inner..(k + 1) * inner] {
                *v = (*v as f64 * s) as f32;
            }
            new_b[k] = ((old_bias[k] as f64 - mean[k] as f64) * s + beta[k] as f64) as f32;
        }
        let wn = g.fresh_name(&format!("{w_name}_bnfolded"));
        let bn_name = g.fresh_name(&format!("{}_bias_bnfolded", conv.name));
        g.initializers.insert(
            wn.clone(),
            Tensor::new(wn.clone(), w.dims.clone(), Data::F32(new_w)),
        );
        g.initializers.insert(
            bn_name.clone(),
            Tensor::new(bn_name.clone(), vec![c], Data::F32(new_b)),
        );
        let out = bn.outputs[0].clone();
        let convm = &mut g.nodes[ci];
        convm.inputs.truncate(2);
        convm.inputs[1] = wn;
        convm.inputs.push(bn_name);
        convm.outputs[0] = out;
        p.folded_batchnorms.push(bn.name.clone());
        g.nodes.remove(i);
    }
    Ok(())
}

fn raise_opset(model: &mut Model) -> Result<()> {
    if model.opset >= MIN_OPSET {
        return Ok(());
    }
    let from = model.opset;
    let g = &mut model.graph;
    for idx in 0..g.nodes.len() {
        let n = g.nodes[idx].clone();
        match n.op_type.as_str() {
            // Opset 13 moved `axes`/`split` from attributes to inputs.
            "Squeeze" | "Unsqueeze" | "Split" => {
                let attr = if n.op_type == "Split" { "split" } else { "axes" };
                if let Some(v) = n.attr_ints(attr)? {
                    let name = g.fresh_name(&format!("{}_{attr}", n.name));
                    g.initializers.insert(name.clone(), Tensor::new(name.clone(), vec![v.len()], Data::I64(v)));
                    let m = &mut g.nodes[idx];
                    m.attributes.retain(|a| a.name != attr);
                    m.inputs.truncate(1);
                    m.inputs.push(name);
                }
            }
            "Upsample" => bail!(n.unsupported(format!(
                "Upsample was removed in opset 10; the model is opset {from} and quantization needs opset {MIN_OPSET}: re-export the model with opset 13 or later"
            ))),
            "ReduceSum" if from < 13 => {
                if let Some(v) = n.attr_ints("axes")? {
                    let name = g.fresh_name(&format!("{}_axes", n.name));
                    g.initializers.insert(name.clone(), Tensor::new(name.clone(), vec![v.len()], Data::I64(v)));
                    let m = &mut g.nodes[idx];
                    m.attributes.retain(|a| a.name != "axes");
                    m.inputs.truncate(1);
                    m.inputs.push(name);
                }
            }
            "BatchNormalization" if from < 9 => {
                bail!(n.unsupported(format!("BatchNormalization of opset {from} has `spatial`; re-export with opset 13 or later")))
            }
            _ => {}
        }
    }
    model.opset = MIN_OPSET;
    if !model
        .proto
        .opset_import
        .iter()
        .any(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    {
        model
            .proto
            .opset_import
            .push(crate::onnx::proto::OperatorSetIdProto {
                domain: String::new(),
                version: MIN_OPSET,
            });
    }
    // ONNX IR 7 is the first to carry opset 13 (ONNX 1.8).
    if model.proto.ir_version < 7 {
        model.proto.ir_version = 7;
    }
    Ok(())
}

/// Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight
/// Equalization and Bias Correction", ICCV 2019, §4.1) of Conv → [Relu|LeakyRelu] → Conv
/// chains, so that per-tensor or per-channel int8 grids fit both layers' channel ranges.
/// Only positively homogeneous activations keep the float function unchanged; pairs across
/// Clip (ReLU6) and others are left alone and counted in the second value returned.
pub fn equalize_pairs(g: &mut Graph) -> Result<(Vec<(String, String)>, usize)> {
    let consumers = g.consumers();
    let mut pairs = Vec::new();
    let mut skipped = 0;
    let single = |t: &str| consumers.get(t).filter(|c| c.len() == 1).map(|c| c[0]);
    for (i, first) in g.nodes.iter().enumerate() {
        if first.op_type != "Conv" || g.is_output(&first.outputs[0]) {
            continue;
        }
        let Some(mut j) = single(&first.outputs[0]) else {
            continue;
        };
        let mid = &g.nodes[j];
        if matches!(mid.op_type.as_str(), "Relu" | "LeakyRelu" | "Clip") {
            if mid.op_type == "Clip" {
                skipped += 1;
                continue;
            }
            if g.is_output(&mid.outputs[0]) {
                continue;
            }
            match single(&mid.outputs[0]) {
                Some(k) => j = k,
                None => continue,
            }
        }
        let second = &g.nodes[j];
        if second.op_type != "Conv" || j == i {
            continue;
        }
        let (Some(w1), Some(w2)) = (
            g.initializers.get(&first.inputs[1]),
            g.initializers.get(&second.inputs[1]),
        ) else {
            continue;
        };
        if w1.as_f32().is_none() || w2.as_f32().is_none() || first.inputs[1] == second.inputs[1] {
            continue;
        }
        let g2 = second.attr_int("group", 1)? as usize;
        let axis2 = if g2 == 1 {
            1
        } else if g2 == w2.dims[0] && w2.dims[1] == 1 && w2.dims[0] == w1.dims[0] {
            0
        } else {
            continue;
        };
        if w2.dims[axis2] != w1.dims[0] {
            continue;
        }
        pairs.push((i, j, axis2));
    }
    let mut done = Vec::new();
    for (i, j, axis2) in pairs {
        let (n1, n2) = (g.nodes[i].clone(), g.nodes[j].clone());
        let mut w1 = g.initializers[&n1.inputs[1]].clone();
        let mut w2 = g.initializers[&n2.inputs[1]].clone();
        let mut b1 = n1.input(2).and_then(|b| g.initializers.get(b)).cloned();
        let (Data::F32(d1), Data::F32(d2)) = (&mut w1.data, &mut w2.data) else {
            continue;
        };
        let bias = match b1.as_mut().map(|b| &mut b.data) {
            Some(Data::F32(v)) => Some(v.as_mut_slice()),
            _ => None,
        };
        super::equalize::equalize(
            super::equalize::Weight {
                data: d1,
                shape: &w1.dims,
                axis: 0,
            },
            bias,
            super::equalize::Weight {
                data: d2,
                shape: &w2.dims,
                axis: axis2,
            },
        )
        .with_context(|| format!("cannot equalize `{}` and `{}`", n1.name, n2.name))?;
        g.initializers.insert(n1.inputs[1].clone(), w1);
        g.initializers.insert(n2.inputs[1].clone(), w2);
        if let Some(b) = b1 {
            g.initializers.insert(b.name.clone(), b);
        }
        done.push((n1.name, n2.name));
    }
    Ok((done, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name)
    }

    #[test]
    fn student_batchnorms_fold_into_convs() {
        let mut m = Model::load(&fixture("student.onnx")).unwrap();
        let p = prepare(&mut m).unwrap();
        assert_eq!(p.folded_batchnorms.len(), 2);
        assert!(!m
            .graph
            .nodes
            .iter()
            .any(|n| n.op_type == "BatchNormalization"));
        assert!(m
            .graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Conv")
            .all(|n| n.inputs.len() == 3));
    }

    // Non-trivial statistics (the fixture student's BN is freshly initialised: mean 0, var 1,
    // gamma 1, beta 0, which would hide a fold that ignored them).
    #[test]
    fn folding_keeps_outputs_with_nontrivial_batchnorm_statistics() {
        use crate::runtime::{open, BackendKind, RuntimeOptions};
        let mut m = Model::load(&fixture("student.onnx")).unwrap();
        let mut k = 0u32;
        let mut next = || {
            k = k.wrapping_mul(1664525).wrapping_add(1013904223);
            (k >> 8) as f32 / (1u32 << 24) as f32
        };
        for n in m
            .graph
            .nodes
            .clone()
            .iter()
            .filter(|n| n.op_type == "BatchNormalization")
        {
            for (i, lo, hi) in [(1, 0.5, 1.5), (2, -0.5, 0.5), (3, -0.3, 0.3), (4, 0.2, 2.0)] {
                let t = m.graph.initializers.get_mut(&n.inputs[i]).unwrap();
                if let Data::F32(v) = &mut t.data {
                    v.iter_mut().for_each(|x| *x = lo + (hi - lo) * next());
                }
            }
        }
        let mut folded = m.clone();
        prepare(&mut folded).unwrap();
        let x: Vec<f32> = (0..4 * 784).map(|_| next()).collect();
        let opts = RuntimeOptions {
            backend: BackendKind::Tract,
            threads: 1,
            ..Default::default()
        };
        let run = |m: &Model| {
            let bytes = prost::Message::encode_to_vec(&m.to_proto());
            open(&bytes, &[4, 1, 28, 28], &opts)
                .unwrap()
                .run(&x)
                .unwrap()
                .remove(0)
                .data
        };
        let (a, b) = (run(&m), run(&folded));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        let scale = a.iter().map(|p| p.abs()).fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "max abs diff {diff} (logit scale {scale})"
        );
    }

    #[test]
    fn opset11_is_raised_to_13() {
        let mut m = Model::load(&fixture("teacher_opset11_constants.onnx")).unwrap();
        let p = prepare(&mut m).unwrap();
        assert_eq!((p.opset_from, p.opset_to, m.opset), (11, 13, 13));
        assert!(m
            .to_proto()
            .opset_import
            .iter()
            .any(|o| o.domain.is_empty() && o.version == 13));
    }
}
