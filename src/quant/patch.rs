//! Graph patches: a rewrite is planned against an unchanged graph, recorded as nodes to
//! remove, nodes and initializers to add, then applied in one step that also drops the
//! QuantizeLinear/DequantizeLinear nodes it left unused and re-sorts the graph.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::{ensure, Context, Result};

use crate::onnx::ir::{Graph, Node};
use crate::onnx::Tensor;

pub struct Patch {
    remove: BTreeSet<usize>,
    nodes: Vec<Node>,
    initializers: BTreeMap<String, Tensor>,
    /// Initializers added once per key: key → name.
    once: HashMap<String, String>,
    /// Every value, node and initializer name of the graph plus those this patch took.
    taken: HashSet<String>,
}

impl Patch {
    pub fn new(g: &Graph) -> Patch {
        let mut taken: HashSet<String> = g
            .nodes
            .iter()
            .flat_map(|n| {
                n.inputs
                    .iter()
                    .chain(&n.outputs)
                    .chain(std::iter::once(&n.name))
            })
            .cloned()
            .collect();
        taken.extend(g.initializers.keys().cloned());
        taken.extend(g.inputs.iter().map(|v| v.name.clone()));
        taken.extend(g.outputs.iter().map(|v| v.name.clone()));
        Patch {
            remove: BTreeSet::new(),
            nodes: Vec::new(),
            initializers: BTreeMap::new(),
            once: HashMap::new(),
            taken,
        }
    }

    /// A name derived from `base` that neither the graph nor this patch uses yet.
    pub fn fresh(&mut self, base: &str) -> String {
        let name = if self.taken.contains(base) {
            (1..)
                .map(|i| format!("{base}_{i}"))
                .find(|c| !self.taken.contains(c))
                .expect("unbounded")
        } else {
            base.to_string()
        };
        self.taken.insert(name.clone());
        name
    }

    /// Removes node `i` (an index into the graph the patch was made for).
    pub fn remove(&mut self, i: usize) {
        self.remove.insert(i);
    }

    pub fn add_node(&mut self, n: Node) {
        self.nodes.push(n);
    }

    /// Adds `t` under a fresh name derived from `base`; returns the name.
    pub fn add_initializer(&mut self, base: &str, mut t: Tensor) -> String {
        let name = self.fresh(base);
        t.name = name.clone();
        self.initializers.insert(name.clone(), t);
        name
    }

    /// Adds an initializer once per `key`: later calls with the same key return the first
    /// name (a weight shared by several nodes is converted once).
    pub fn add_initializer_once(
        &mut self,
        key: &str,
        base: &str,
        make: impl FnOnce() -> Tensor,
    ) -> String {
        if let Some(name) = self.once.get(key) {
            return name.clone();
        }
        let name = self.add_initializer(base, make());
        self.once.insert(key.to_string(), name.clone());
        name
    }

    pub fn apply(self, g: &mut Graph) -> Result<()> {
        let n = g.nodes.len();
        ensure!(
            self.remove.iter().all(|&i| i < n),
            "a patch removes a node the graph does not have"
        );
        let mut i = 0;
        g.nodes.retain(|_| {
            let keep = !self.remove.contains(&i);
            i += 1;
            keep
        });
        g.nodes.extend(self.nodes);
        g.initializers.extend(self.initializers);
        remove_unused_qdq(g);
        g.prune_initializers();
        g.value_info.clear();
        g.sort_topologically()
            .context("the rewritten graph is not valid")
    }
}

/// Drops QuantizeLinear/DequantizeLinear nodes whose outputs nobody reads, repeatedly (a
/// DequantizeLinear removed can leave its QuantizeLinear unused).
fn remove_unused_qdq(g: &mut Graph) {
    loop {
        let read: HashSet<&str> = g
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().map(String::as_str))
            .chain(g.outputs.iter().map(|o| o.name.as_str()))
            .collect();
        let dead: Vec<usize> = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.domain.is_empty()
                    && matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear")
                    && n.outputs.iter().all(|o| !read.contains(o.as_str()))
            })
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            return;
        }
        let mut i = 0;
        g.nodes.retain(|_| {
            let keep = !dead.contains(&i);
            i += 1;
            keep
        });
    }
}
