//! An owned graph IR: nodes in topological order, initializers, value infos, and lookups.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{bail, ensure, Context, Result};

use super::proto::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension::Value as DimValue, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use super::tensor::{Data, Tensor};

/// A graph input, output or intermediate value with its declared type and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    /// ONNX `TensorProto.DataType` code; 0 when not declared.
    pub elem_type: i32,
    /// None when the rank is unknown.
    pub shape: Option<Vec<Dim>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A symbolic dimension such as `batch`.
    Param(String),
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<AttributeProto>,
}

/// The main graph of a model. `nodes` are kept in topological order.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    /// Inputs that are fed at run time (initializers listed as inputs are left out).
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub initializers: BTreeMap<String, Tensor>,
    pub value_info: HashMap<String, ValueInfo>,
}

/// A model: the graph plus the header fields we keep when writing it back.
#[derive(Debug, Clone)]
pub struct Model {
    pub graph: Graph,
    /// The default-domain opset version.
    pub opset: i64,
    /// The original proto; `to_proto` keeps its header fields and replaces the graph.
    pub proto: ModelProto,
}

impl Model {
    pub fn from_proto(proto: ModelProto) -> Result<Model> {
        let opset = proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .context("the model imports no default-domain (ai.onnx) opset")?;
        let g = proto.graph.as_ref().context("the model has no graph")?;
        let graph = Graph::from_proto(g)?;
        Ok(Model {
            graph,
            opset,
            proto,
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Model> {
        let proto = super::load::load_model(path)?;
        Model::from_proto(proto)
            .with_context(|| format!("cannot read the graph of {}", path.display()))
    }

    pub fn to_proto(&self) -> ModelProto {
        let mut p = self.proto.clone();
        p.graph = Some(self.graph.to_proto(p.graph.as_ref()));
        for o in p.opset_import.iter_mut() {
            if o.domain.is_empty() || o.domain == "ai.onnx" {
                o.version = self.opset;
            }
        }
        p
    }

    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        super::load::save_model(&self.to_proto(), path)
    }
}

fn value_info_from_proto(v: &ValueInfoProto) -> ValueInfo {
    let mut elem_type = 0;
    let mut shape = None;
    if let Some(TypeProto {
        value: Some(type_proto::Value::TensorType(tt)),
        ..
    }) = &v.r#type
    {
        elem_type = tt.elem_type;
        if let Some(s) = &tt.shape {
            shape = Some(
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(DimValue::DimValue(x)) => Dim::Fixed(*x),
                        Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Param(p.clone()),
                        _ => Dim::Unknown,
                    })
                    .collect(),
            );
        }
    }
    ValueInfo {
        name: v.name.clone(),
        elem_type,
        shape,
    }
}

impl ValueInfo {
    pub fn to_proto(&self) -> ValueInfoProto {
        use super::proto::{tensor_shape_proto::Dimension, type_proto::Tensor as TT};
        let shape = self.shape.as_ref().map(|dims| TensorShapeProto {
            dim: dims
                .iter()
                .map(|d| Dimension {
                    value: match d {
                        Dim::Fixed(x) => Some(DimValue::DimValue(*x)),
                        Dim::Param(p) => Some(DimValue::DimParam(p.clone())),
                        Dim::Unknown => None,
                    },
                    denotation: String::new(),
                })
                .collect(),
        });
        ValueInfoProto {
            name: self.name.clone(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(TT {
                    elem_type: self.elem_type,
                    shape,
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        }
    }

    /// Dims with symbolic or unknown entries replaced by `batch` for the first axis and
    /// an error elsewhere.
    pub fn concrete_shape(&self, batch: usize) -> Result<Vec<usize>> {
        let dims = self
            .shape
            .as_ref()
            .with_context(|| format!("input `{}` has no declared shape", self.name))?;
        dims.iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Fixed(x) if *x > 0 => Ok(*x as usize),
                Dim::Fixed(x) if *x <= 0 && i == 0 => Ok(batch),
                _ if i == 0 => Ok(batch),
                _ => bail!(
                    "input `{}` has a symbolic dimension at axis {i}; only the batch axis may be symbolic",
                    self.name
                ),
            })
            .collect()
    }
}

impl Node {
    fn from_proto(n: &NodeProto, index: usize) -> Node {
        Node {
            name: if n.name.is_empty() {
                format!("{}_{index}", n.op_type)
            } else {
                n.name.clone()
            },
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            inputs: n.input.clone(),
            outputs: n.output.clone(),
            attributes: n.attribute.clone(),
        }
    }

    pub fn to_proto(&self) -> NodeProto {
        NodeProto {
            name: self.name.clone(),
            op_type: self.op_type.clone(),
            domain: self.domain.clone(),
            input: self.inputs.clone(),
            output: self.outputs.clone(),
            attribute: self.attributes.clone(),
            ..Default::default()
        }
    }

    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attributes.iter().find(|a| a.name == name)
    }

    fn attr_typed(&self, name: &str, want: AttributeType) -> Result<Option<&AttributeProto>> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) => {
                let ty = AttributeType::try_from(a.r#type).unwrap_or(AttributeType::Undefined);
                // Some exporters leave `type` unset; accept when the matching field is filled.
                ensure!(
                    ty == want || ty == AttributeType::Undefined,
                    "node `{}` ({}): attribute `{name}` is {:?}, expected {:?}",
                    self.name,
                    self.op_type,
                    ty,
                    want
                );
                Ok(Some(a))
            }
        }
    }

    pub fn attr_int(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self
            .attr_typed(name, AttributeType::Int)?
            .map(|a| a.i)
            .unwrap_or(default))
    }

    pub fn attr_float(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self
            .attr_typed(name, AttributeType::Float)?
            .map(|a| a.f)
            .unwrap_or(default))
    }

    pub fn attr_ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        Ok(self
            .attr_typed(name, AttributeType::Ints)?
            .map(|a| a.ints.clone()))
    }

    pub fn attr_floats(&self, name: &str) -> Result<Option<Vec<f32>>> {
        Ok(self
            .attr_typed(name, AttributeType::Floats)?
            .map(|a| a.floats.clone()))
    }

    pub fn attr_string(&self, name: &str, default: &str) -> Result<String> {
        Ok(self
            .attr_typed(name, AttributeType::String)?
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .unwrap_or_else(|| default.to_string()))
    }

    pub fn attr_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        match self.attr_typed(name, AttributeType::Tensor)? {
            Some(a) => {
                let t = a.t.as_ref().with_context(|| {
                    format!("node `{}`: attribute `{name}` holds no tensor", self.name)
                })?;
                Ok(Some(
                    Tensor::from_proto(t).with_context(|| format!("node `{}`", self.name))?,
                ))
            }
            None => Ok(None),
        }
    }

    /// Input `i` if present and not the empty name ONNX uses for a skipped optional input.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Error naming this node, for unsupported cases.
    pub fn unsupported(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("node `{}` ({}): {what}", self.name, self.op_type)
    }
}

pub fn make_attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

pub fn make_attr_ints(name: &str, v: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v,
        ..Default::default()
    }
}

pub fn make_attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

/// Value of a `Constant` node as a tensor, whichever of its `value*` attributes is set.
fn constant_value(n: &Node) -> Result<Option<Tensor>> {
    let out = n.outputs.first().cloned().unwrap_or_default();
    if let Some(mut t) = n.attr_tensor("value")? {
        t.name = out;
        return Ok(Some(t));
    }
    if let Some(a) = n.attr("value_float") {
        return Ok(Some(Tensor::new(out, vec![], Data::F32(vec![a.f]))));
    }
    if let Some(a) = n.attr("value_floats") {
        return Ok(Some(Tensor::new(
            out,
            vec![a.floats.len()],
            Data::F32(a.floats.clone()),
        )));
    }
    if let Some(a) = n.attr("value_int") {
        return Ok(Some(Tensor::new(out, vec![], Data::I64(vec![a.i]))));
    }
    if let Some(a) = n.attr("value_ints") {
        return Ok(Some(Tensor::new(
            out,
            vec![a.ints.len()],
            Data::I64(a.ints.clone()),
        )));
    }
    Ok(None)
}

impl Graph {
    /// Builds the IR: decodes initializers, turns `Constant` nodes into initializers, checks
    /// that every input is produced, and sorts nodes topologically (refusing cycles).
    pub fn from_proto(g: &GraphProto) -> Result<Graph> {
        let mut initializers = BTreeMap::new();
        for t in &g.initializer {
            let t = Tensor::from_proto(t).context("cannot decode an initializer")?;
            initializers.insert(t.name.clone(), t);
        }
        let mut nodes = Vec::with_capacity(g.node.len());
        for (i, n) in g.node.iter().enumerate() {
            let node = Node::from_proto(n, i);
            if node.op_type == "Constant" && node.domain.is_empty() {
                if let Some(t) = constant_value(&node)? {
                    ensure!(
                        node.outputs.len() == 1,
                        node.unsupported("a Constant must have one output")
                    );
                    initializers.insert(t.name.clone(), t);
                    continue;
                }
            }
            nodes.push(node);
        }
        let inputs = g
            .input
            .iter()
            .filter(|v| !initializers.contains_key(&v.name))
            .map(value_info_from_proto)
            .collect();
        let outputs = g.output.iter().map(value_info_from_proto).collect();
        let value_info = g
            .value_info
            .iter()
            .map(|v| (v.name.clone(), value_info_from_proto(v)))
            .collect();
        let mut graph = Graph {
            name: g.name.clone(),
            nodes,
            inputs,
            outputs,
            initializers,
            value_info,
        };
        graph.sort_topologically()?;
        Ok(graph)
    }

    /// Writes the graph back, keeping `base`'s doc string and metadata when given.
    pub fn to_proto(&self, base: Option<&GraphProto>) -> GraphProto {
        let mut g = base.cloned().unwrap_or_default();
        g.name = self.name.clone();
        g.node = self.nodes.iter().map(Node::to_proto).collect();
        g.initializer = self.initializers.values().map(Tensor::to_proto).collect();
        g.input = self.inputs.iter().map(ValueInfo::to_proto).collect();
        g.output = self.outputs.iter().map(ValueInfo::to_proto).collect();
        let mut vi: Vec<_> = self.value_info.values().collect();
        vi.sort_by(|a, b| a.name.cmp(&b.name));
        g.value_info = vi.into_iter().map(ValueInfo::to_proto).collect();
        g.sparse_initializer.clear();
        g
    }

    /// Sorts `nodes` so that each comes after the producers of its inputs (stable: keeps the
    /// file's order where it is already valid). Errors on cycles and on inputs nobody produces.
    pub fn sort_topologically(&mut self) -> Result<()> {
        let order = self.topological_order()?;
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        self.nodes = order
            .into_iter()
            .map(|j| old[j].take().expect("each index once"))
            .collect();
        Ok(())
    }

    fn topological_order(&self) -> Result<Vec<usize>> {
        let mut available: HashSet<&str> = self.inputs.iter().map(|v| v.name.as_str()).collect();
        available.extend(self.initializers.keys().map(String::as_str));
        available.insert("");
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in &n.outputs {
                if o.is_empty() {
                    continue;
                }
                if let Some(prev) = producer.insert(o.as_str(), i) {
                    bail!(
                        "value `{o}` is produced twice, by nodes `{}` and `{}`",
                        self.nodes[prev].name,
                        n.name
                    );
                }
                ensure!(
                    !available.contains(o.as_str()),
                    "node `{}` ({}) writes `{o}`, which is already a graph input or initializer",
                    n.name,
                    n.op_type
                );
            }
        }
        for n in &self.nodes {
            for i in n.inputs.iter().filter(|i| !i.is_empty()) {
                ensure!(
                    available.contains(i.as_str()) || producer.contains_key(i.as_str()),
                    "node `{}` ({}) reads `{i}`, which no node, input or initializer provides",
                    n.name,
                    n.op_type
                );
            }
        }
        // Kahn's algorithm; the ready set is a min-heap on original index for stability.
        let n = self.nodes.len();
        let mut indeg = vec![0usize; n];
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (j, node) in self.nodes.iter().enumerate() {
            let mut seen = HashSet::new();
            for i in &node.inputs {
                if let Some(&p) = producer.get(i.as_str()) {
                    if seen.insert(p) {
                        indeg[j] += 1;
                        users[p].push(j);
                    }
                }
            }
        }
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..n)
            .filter(|&j| indeg[j] == 0)
            .map(std::cmp::Reverse)
            .collect();
        let mut order = Vec::with_capacity(n);
        while let Some(std::cmp::Reverse(j)) = ready.pop() {
            order.push(j);
            for &u in &users[j] {
                indeg[u] -= 1;
                if indeg[u] == 0 {
                    ready.push(std::cmp::Reverse(u));
                }
            }
        }
        if order.len() != n {
            let stuck: Vec<_> = (0..n)
                .filter(|&j| indeg[j] > 0)
                .map(|j| self.nodes[j].name.as_str())
                .take(5)
                .collect();
            bail!("the graph has a cycle through nodes {}", stuck.join(", "));
        }
        for o in &self.outputs {
            ensure!(
                producer.contains_key(o.name.as_str()) || available.contains(o.name.as_str()),
                "graph output `{}` is not produced by any node",
                o.name
            );
        }
        Ok(order)
    }

    /// Index of the node producing each value.
    pub fn producers(&self) -> HashMap<&str, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for o in &n.outputs {
                m.insert(o.as_str(), i);
            }
        }
        m
    }

    /// Indices of the nodes reading each value.
    pub fn consumers(&self) -> HashMap<&str, Vec<usize>> {
        let mut m: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
                m.entry(inp.as_str()).or_default().push(i);
            }
        }
        m
    }

    pub fn node_by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Whether `name` is a graph output.
    pub fn is_output(&self, name: &str) -> bool {
        self.outputs.iter().any(|o| o.name == name)
    }

    /// A value name not used yet, derived from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        let used: HashSet<&str> = self
            .nodes
            .iter()
            .flat_map(|n| {
                n.outputs
                    .iter()
                    .chain(n.inputs.iter())
                    .chain(std::iter::once(&n.name))
            })
            .map(String::as_str)
            .chain(self.initializers.keys().map(String::as_str))
            .chain(self.inputs.iter().map(|v| v.name.as_str()))
            .collect();
        if !used.contains(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|c| !used.contains(c.as_str()))
            .expect("unbounded")
    }

    /// Removes initializers no node reads and that are not outputs.
    pub fn prune_initializers(&mut self) {
        let used: HashSet<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().cloned())
            .chain(self.outputs.iter().map(|o| o.name.clone()))
            .collect();
        self.initializers.retain(|k, _| used.contains(k));
    }
}
