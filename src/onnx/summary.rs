//! What a model is made of: inputs, outputs, op histogram, parameters and MACs per layer.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use super::ir::{Dim, Model, ValueInfo};
use super::shape;
use super::tensor::dtype_name;

/// Ops the quantizer rewrites to int8 (others stay float).
pub const QUANTIZABLE_OPS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Concat",
    "Relu",
    "Clip",
    "Flatten",
    "Reshape",
    "Transpose",
    "Resize",
    "Sigmoid",
    "LeakyRelu",
];

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ir_version: i64,
    pub opset: i64,
    pub producer: String,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
    pub params: u64,
    pub weight_bytes: u64,
    /// Parameter count and bytes by data type.
    pub params_by_dtype: BTreeMap<String, DtypeParams>,
    /// Multiply-accumulates for one sample.
    pub macs: u64,
    pub layers: Vec<LayerMacs>,
    pub quantizable_nodes: usize,
    pub quantizable_ops: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IoInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct DtypeParams {
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerMacs {
    pub node: String,
    pub op: String,
    pub output_shape: Vec<usize>,
    pub macs: u64,
}

fn io(v: &ValueInfo) -> IoInfo {
    IoInfo {
        name: v.name.clone(),
        dtype: dtype_name(v.elem_type),
        shape: match &v.shape {
            None => vec!["?".into()],
            Some(d) => d
                .iter()
                .map(|d| match d {
                    Dim::Fixed(x) => x.to_string(),
                    Dim::Param(p) => p.clone(),
                    Dim::Unknown => "?".into(),
                })
                .collect(),
        },
    }
}

/// Summarises a model; shape inference (batch 1) must succeed for MACs to be counted.
pub fn summarize(model: &Model) -> Result<Summary> {
    let g = &model.graph;
    let mut op_histogram = BTreeMap::new();
    for n in &g.nodes {
        *op_histogram.entry(n.op_type.clone()).or_insert(0) += 1;
    }
    let mut params_by_dtype: BTreeMap<String, DtypeParams> = BTreeMap::new();
    let (mut params, mut weight_bytes) = (0u64, 0u64);
    for t in g.initializers.values() {
        let e = params_by_dtype
            .entry(dtype_name(t.data.dtype() as i32))
            .or_default();
        e.count = e.count.saturating_add(t.numel() as u64);
        e.bytes = e.bytes.saturating_add(t.byte_size() as u64);
        params = params.saturating_add(t.numel() as u64);
        weight_bytes = weight_bytes.saturating_add(t.byte_size() as u64);
    }
    let shapes = shape::infer(g, &shape::input_shapes(g, 1)?)?;
    let mut layers = Vec::new();
    for n in &g.nodes {
        let out = match n.outputs.first().and_then(|o| shapes.shapes.get(o)) {
            Some(s) => s.clone(),
            None => continue,
        };
        // Saturating: a shape such as [2^40, 2^40, 0] is valid (and empty), and a hostile
        // model's MAC count must not overflow.
        let product = |s: &[usize]| -> u64 {
            if s.contains(&0) {
                return 0;
            }
            s.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64))
        };
        let out_n = product(&out);
        let macs = match n.op_type.as_str() {
            "Conv" | "ConvTranspose" | "QLinearConv" => {
                let w = if n.op_type == "QLinearConv" {
                    n.input(3)
                } else {
                    n.input(1)
                };
                match w.and_then(|w| shapes.shapes.get(w)) {
                    Some(ws) if ws.len() >= 3 => {
                        let k = product(&ws[2..]);
                        if n.op_type == "ConvTranspose" {
                            let x = n
                                .input(0)
                                .and_then(|i| shapes.shapes.get(i))
                                .map(|s| product(s))
                                .unwrap_or(0);
                            x.saturating_mul(ws[1] as u64).saturating_mul(k)
                        } else {
                            out_n.saturating_mul(ws[1] as u64).saturating_mul(k)
                        }
                    }
                    _ => 0,
                }
            }
            "Gemm" | "MatMul" | "QLinearMatMul" => {
                let a = n.input(0).and_then(|a| shapes.shapes.get(a));
                let k = match (n.op_type.as_str(), a) {
                    ("Gemm", Some(a)) if n.attr_int("transA", 0)? != 0 => {
                        a.first().copied().unwrap_or(0)
                    }
                    (_, Some(a)) => *a.last().unwrap_or(&0),
                    _ => 0,
                };
                out_n.saturating_mul(k as u64)
            }
            _ => 0,
        };
        if macs > 0 {
            layers.push(LayerMacs {
                node: n.name.clone(),
                op: n.op_type.clone(),
                output_shape: out,
                macs,
            });
        }
    }
    let quantizable_ops: BTreeMap<String, usize> = op_histogram
        .iter()
        .filter(|(k, _)| QUANTIZABLE_OPS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    Ok(Summary {
        ir_version: model.proto.ir_version,
        opset: model.opset,
        producer: format!(
            "{} {}",
            model.proto.producer_name, model.proto.producer_version
        )
        .trim()
        .to_string(),
        inputs: g.inputs.iter().map(io).collect(),
        outputs: g.outputs.iter().map(io).collect(),
        nodes: g.nodes.len(),
        macs: layers.iter().fold(0u64, |a, l| a.saturating_add(l.macs)),
        layers,
        quantizable_nodes: quantizable_ops.values().sum(),
        quantizable_ops,
        op_histogram,
        params,
        weight_bytes,
        params_by_dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn student_summary() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/student.onnx");
        let s = summarize(&Model::load(&p).unwrap()).unwrap();
        assert_eq!(s.op_histogram["Conv"], 2);
        assert_eq!(s.op_histogram["BatchNormalization"], 2);
        // conv1 8x1x3x3 (+0 bias), bn1 4x8, conv2 16x8x3x3, bn2 4x16, fc 10x784 + 10
        assert_eq!(s.params, 72 + 32 + 1152 + 64 + 7840 + 10);
        // conv1: 28*28*8 outputs x 9; conv2: 14*14*16 x 72; fc: 10 x 784
        assert_eq!(s.macs, 28 * 28 * 8 * 9 + 14 * 14 * 16 * 72 + 10 * 784);
    }
}
