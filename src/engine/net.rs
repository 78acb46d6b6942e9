//! `Net`: a trainable network built from an ONNX model — parameters, BatchNorm state, plans
//! cached per input shape, the forward pass and write-back into the model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, RngCore};

use super::backprop::{self, GradStore};
use super::buffers::Buffers;
use super::kernels::{act, binary, bn, conv, layout, matmul, pool, quant, reduce, softmax};
use super::plan::{self, Op, Plan, Roles, Src, Step};
use super::Tensor;
use crate::onnx::{self, Graph, Model};

/// Training mode uses batch statistics in BatchNorm (and updates the running ones) and
/// applies Dropout; evaluation mode uses running statistics and skips Dropout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// A parameter as the training layer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub trainable: bool,
}

/// Named tensors in a fixed order (the graph's), looked up by name or index.
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    fn push(&mut self, name: String, t: Tensor) {
        self.index.insert(name.clone(), self.names.len());
        self.names.push(name);
        self.tensors.push(t);
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index_of(name).map(|i| &self.tensors[i])
    }
    /// Mutable access for optimizers. The shape must stay the same; the next forward pass
    /// checks it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.index_of(name).map(|i| &mut self.tensors[i])
    }
    pub fn by_index(&self, i: usize) -> &Tensor {
        &self.tensors[i]
    }
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.tensors.iter_mut())
    }
}

/// What the forward pass kept for the backward pass besides the values themselves.
#[derive(Debug, Clone)]
pub(crate) enum Saved {
    None,
    /// Training-mode BatchNorm: batch mean and 1/sqrt(var + eps).
    BatchNorm {
        mean: Vec<f32>,
        invstd: Vec<f32>,
    },
    MaxPool {
        argmax: Vec<u32>,
    },
    /// Dropout's per-element factor: 0 or 1/(1 - ratio).
    Dropout {
        mask: Vec<f32>,
    },
}

/// The result of a forward pass: graph outputs, every named intermediate value, and what the
/// backward pass needs. Owns its data, so the net may be used again while it is alive
/// (but parameters must not change between a forward pass and its backward pass).
pub struct Forward {
    pub(crate) plan: Arc<Plan>,
    pub(crate) mode: Mode,
    pub(crate) values: Vec<Option<Tensor>>,
    pub(crate) saved: Vec<Saved>,
    bufs: Arc<Buffers>,
}

impl Drop for Forward {
    /// Hands the buffers back to the net for the next step.
    fn drop(&mut self) {
        for t in self.values.drain(..).flatten() {
            self.bufs.give(t.data);
        }
        for s in self.saved.drain(..) {
            match s {
                Saved::MaxPool { argmax } => self.bufs.give_u32(argmax),
                Saved::Dropout { mask } => self.bufs.give(mask),
                _ => {}
            }
        }
    }
}

impl Forward {
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Graph outputs, in the graph's order.
    pub fn outputs(&self) -> Vec<&Tensor> {
        self.plan
            .outputs
            .iter()
            .filter_map(|(n, _)| self.get(n))
            .collect()
    }
    /// The first graph output (the logits of a classifier).
    pub fn output(&self) -> &Tensor {
        let (name, _) = &self.plan.outputs[0];
        self.get(name).expect("graph outputs are computed values")
    }
    /// Any value computed in this pass (graph inputs, intermediates, outputs) by its ONNX
    /// name, e.g. a feature map for a hint loss.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        match self.plan.index.get(name)? {
            Src::Val(v) => self.values[*v].as_ref(),
            _ => None,
        }
    }
    /// The graph outputs, moved out (in the graph's order).
    pub fn into_outputs(mut self) -> Vec<Tensor> {
        let plan = self.plan.clone();
        plan.outputs
            .iter()
            .filter_map(|(_, s)| match s {
                Src::Val(v) => self.values[*v].take(),
                _ => None,
            })
            .collect()
    }
    /// Names of all values this pass computed, in execution order.
    pub fn value_names(&self) -> impl Iterator<Item = &str> {
        self.plan.values.iter().map(|(n, _)| n.as_str())
    }
}

/// A network built from an ONNX model, ready to train or evaluate.
pub struct Net {
    graph: Graph,
    opset: i64,
    roles: Roles,
    params: ParamStore,
    trainable: Vec<bool>,
    state: ParamStore,
    plans: Mutex<HashMap<Vec<Vec<usize>>, Arc<Plan>>>,
    /// Nodes without a backward pass that lie downstream of a parameter.
    no_backward: Vec<String>,
    bufs: Arc<Buffers>,
}

impl Net {
    /// Builds the network. Fails, naming the node, for operators, attributes or data types the
    /// engine does not support, checked by planning once for a batch of one.
    pub fn from_model(model: &Model) -> Result<Net> {
        let graph = model.graph.clone();
        ensure!(!graph.outputs.is_empty(), "the graph has no outputs");
        let (param_names, state_names) = plan::classify(&graph)?;
        let mut roles = Roles::default();
        let mut params = ParamStore::default();
        let mut state = ParamStore::default();
        for name in param_names {
            roles.params.insert(name.clone(), params.len());
            params.push(name.clone(), Tensor::from_onnx(&graph.initializers[&name])?);
        }
        for name in state_names {
            roles.state.insert(name.clone(), state.len());
            state.push(name.clone(), Tensor::from_onnx(&graph.initializers[&name])?);
        }
        let trainable = vec![true; params.len()];
        let mut net = Net {
            graph,
            opset: model.opset,
            roles,
            params,
            trainable,
            state,
            plans: Mutex::new(HashMap::new()),
            no_backward: Vec::new(),
            bufs: Arc::default(),
        };
        // Plan once with batch 1 so unsupported ops and attributes fail now.
        let shapes = onnx::shape::input_shapes(&net.graph, 1)?;
        let plan = net.plan_for(
            net.graph
                .inputs
                .iter()
                .map(|v| shapes[&v.name].clone())
                .collect(),
        )?;
        net.no_backward = downstream_without_backward(&plan, &net.roles);
        Ok(net)
    }

    /// Trainable parameters and their shapes, in graph order.
    pub fn parameters(&self) -> Vec<ParamInfo> {
        self.params
            .iter()
            .zip(&self.trainable)
            .map(|((name, t), &trainable)| ParamInfo {
                name: name.to_string(),
                shape: t.shape.clone(),
                trainable,
            })
            .collect()
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }
    /// BatchNorm running means and variances.
    pub fn state(&self) -> &ParamStore {
        &self.state
    }
    pub fn state_mut(&mut self) -> &mut ParamStore {
        &mut self.state
    }

    /// Makes exactly `names` trainable and freezes every other parameter.
    pub fn set_trainable(&mut self, names: &[&str]) -> Result<()> {
        let mut t = vec![false; self.params.len()];
        for n in names {
            let i = self.params.index_of(n).with_context(|| {
                format!(
                    "`{n}` is not a parameter of this model; parameters: {}",
                    self.params.names.join(", ")
                )
            })?;
            t[i] = true;
        }
        self.trainable = t;
        Ok(())
    }

    /// Freezes (or unfreezes) the named parameters.
    pub fn freeze(&mut self, names: &[&str], frozen: bool) -> Result<()> {
        for n in names {
            let i = self
                .params
                .index_of(n)
                .with_context(|| format!("`{n}` is not a parameter of this model"))?;
            self.trainable[i] = !frozen;
        }
        Ok(())
    }

    pub(crate) fn trainable_mask(&self) -> &[bool] {
        &self.trainable
    }

    pub(crate) fn buffers(&self) -> &Arc<Buffers> {
        &self.bufs
    }

    /// Names of the graph inputs, in order.
    pub fn input_names(&self) -> Vec<&str> {
        self.graph.inputs.iter().map(|v| v.name.as_str()).collect()
    }
    pub fn output_names(&self) -> Vec<&str> {
        self.graph.outputs.iter().map(|v| v.name.as_str()).collect()
    }

    /// Errors, naming the nodes, when a parameter's gradient would have to flow through an op
    /// without a backward pass. Called by `forward` in training mode; call it before training
    /// to fail early.
    pub fn check_trainable(&self) -> Result<()> {
        ensure!(
            self.no_backward.is_empty(),
            "cannot train this model: {} have no backward pass; train the float model and quantize afterwards",
            self.no_backward.join(", ")
        );
        Ok(())
    }

    /// The plan for these input shapes, built on first use.
    pub(crate) fn plan_for(&self, shapes: Vec<Vec<usize>>) -> Result<Arc<Plan>> {
        let mut cache = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&shapes) {
            return Ok(p.clone());
        }
        let by_name: HashMap<String, Vec<usize>> = self
            .graph
            .inputs
            .iter()
            .map(|v| v.name.clone())
            .zip(shapes.iter().cloned())
            .collect();
        let plan = Arc::new(plan::build(&self.graph, self.opset, &self.roles, &by_name)?);
        for (name, src) in &plan.outputs {
            ensure!(
                matches!(src, Src::Val(_)),
                "graph output `{name}` is a constant; only computed outputs are supported"
            );
        }
        cache.insert(shapes, plan.clone());
        Ok(plan)
    }

    fn plan_for_inputs(&self, inputs: &[(&str, &Tensor)]) -> Result<Arc<Plan>> {
        ensure!(
            inputs.len() == self.graph.inputs.len(),
            "the model takes {} input(s) ({}), {} given",
            self.graph.inputs.len(),
            self.input_names().join(", "),
            inputs.len()
        );
        let mut shapes = Vec::new();
        for v in &self.graph.inputs {
            let t = inputs
                .iter()
                .find(|(n, _)| *n == v.name)
                .with_context(|| format!("no tensor given for graph input `{}`", v.name))?
                .1;
            if let Some(dims) = &v.shape {
                ensure!(
                    dims.len() == t.shape.len()
                        && dims
                            .iter()
                            .zip(&t.shape)
                            .enumerate()
                            .all(|(i, (d, &s))| i == 0
                                || !matches!(d, onnx::Dim::Fixed(x) if *x > 0 && *x as usize != s)),
                    "input `{}` has shape {:?} but the model declares {:?}",
                    v.name,
                    t.shape,
                    dims
                );
            }
            shapes.push(t.shape.clone());
        }
        self.plan_for(shapes)
    }

    fn check_param_shapes(&self) -> Result<()> {
        for (name, t) in self.params.iter().chain(self.state.iter()) {
            let want = &self.graph.initializers[name].dims;
            ensure!(
                &t.shape == want && t.data.len() == t.numel_of_shape(),
                "parameter `{name}` has shape {:?} but the model needs {want:?}",
                t.shape
            );
        }
        Ok(())
    }

    /// Forward pass on the single graph input.
    pub fn forward(
        &mut self,
        input: &Tensor,
        mode: Mode,
        rng: &mut dyn RngCore,
    ) -> Result<Forward> {
        ensure!(
            self.graph.inputs.len() == 1,
            "the model has {} inputs ({}); use forward_inputs",
            self.graph.inputs.len(),
            self.input_names().join(", ")
        );
        let name = self.graph.inputs[0].name.clone();
        self.forward_inputs(&[(&name, input)], mode, rng)
    }

    /// Forward pass with every graph input given by name. In training mode BatchNorm uses
    /// batch statistics and updates its running statistics, and Dropout draws its mask from
    /// `rng` (in a fixed order, so the same seed gives the same masks).
    pub fn forward_inputs(
        &mut self,
        inputs: &[(&str, &Tensor)],
        mode: Mode,
        rng: &mut dyn RngCore,
    ) -> Result<Forward> {
        if mode == Mode::Train {
            self.check_trainable()?;
        }
        self.check_param_shapes()?;
        let plan = self.plan_for_inputs(inputs)?;
        let mut values: Vec<Option<Tensor>> = vec![None; plan.values.len()];
        for (name, slot) in &plan.inputs {
            let t = inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .context("input was checked")?;
            values[*slot] = Some(self.bufs.copy_of(t));
        }
        let mut saved = Vec::with_capacity(plan.steps.len());
        for step in &plan.steps {
            let (outs, s, running) = {
                let ins: Vec<&Tensor> = step
                    .inputs
                    .iter()
                    .map(|&s| source(s, &values, &self.params, &self.state, &plan))
                    .collect();
                let shapes: Vec<&[usize]> = step
                    .outputs
                    .iter()
                    .map(|&o| plan.values[o].1.as_slice())
                    .collect();
                run_step(step, &ins, &shapes, mode, rng, &self.bufs)
                    .with_context(|| format!("node `{}` ({})", step.node, step.op_type))?
            };
            if let Some((mean, var)) = running {
                self.update_running(step, &mean, &var);
            }
            for (slot, t) in step.outputs.iter().zip(outs) {
                values[*slot] = Some(t);
            }
            saved.push(s);
        }
        Ok(Forward {
            plan,
            mode,
            values,
            saved,
            bufs: self.bufs.clone(),
        })
    }

    fn update_running(&mut self, step: &Step, mean: &[f32], var: &[f32]) {
        let Op::BatchNorm { geom, momentum, .. } = &step.op else {
            return;
        };
        // Running statistics computed by the graph (not initializers) have nowhere to go.
        let (Src::State(im), Src::State(iv)) = (step.inputs[3], step.inputs[4]) else {
            return;
        };
        let mut rm = std::mem::take(&mut self.state.tensors[im].data);
        let mut rv = std::mem::take(&mut self.state.tensors[iv].data);
        bn::update_running(geom, *momentum, mean, var, &mut rm, &mut rv);
        self.state.tensors[im].data = rm;
        self.state.tensors[iv].data = rv;
    }

    /// Gradients of the trainable parameters, given gradients of the loss with respect to
    /// graph outputs and, for hint losses, any named intermediate value (gradients given for
    /// the same value add up).
    pub fn backward(&self, fwd: &Forward, grads: &[(&str, &Tensor)]) -> Result<GradStore> {
        backprop::backward(self, fwd, grads, false)
    }

    /// Like `backward`, also returning gradients with respect to the graph inputs
    /// (`GradStore::input`).
    pub fn backward_with_inputs(
        &self,
        fwd: &Forward,
        grads: &[(&str, &Tensor)],
    ) -> Result<GradStore> {
        backprop::backward(self, fwd, grads, true)
    }

    /// Inference forward pass that shows every float value (graph inputs, intermediates and
    /// outputs, in execution order) to `observe` and frees each value after its last use.
    /// Returns the graph outputs. Quantized (integer) values are not shown.
    pub fn run_observed(
        &self,
        input: &Tensor,
        observe: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        ensure!(
            self.graph.inputs.len() == 1,
            "the model has {} inputs; run_observed takes one",
            self.graph.inputs.len()
        );
        self.check_param_shapes()?;
        let name = self.graph.inputs[0].name.clone();
        let plan = self.plan_for_inputs(&[(&name, input)])?;
        let mut values: Vec<Option<Tensor>> = vec![None; plan.values.len()];
        let slot = plan.inputs[0].1;
        observe(&name, input)?;
        values[slot] = Some(self.bufs.copy_of(input));
        // Evaluation mode draws nothing; the generator only satisfies the signature.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        for (i, step) in plan.steps.iter().enumerate() {
            let (outs, _, _) = {
                let ins: Vec<&Tensor> = step
                    .inputs
                    .iter()
                    .map(|&s| source(s, &values, &self.params, &self.state, &plan))
                    .collect();
                let shapes: Vec<&[usize]> = step
                    .outputs
                    .iter()
                    .map(|&o| plan.values[o].1.as_slice())
                    .collect();
                run_step(step, &ins, &shapes, Mode::Eval, &mut rng, &self.bufs)
                    .with_context(|| format!("node `{}` ({})", step.node, step.op_type))?
            };
            for (&o, t) in step.outputs.iter().zip(outs) {
                if !matches!(step.op, Op::QuantizeLinear(_)) {
                    observe(&plan.values[o].0, &t)
                        .with_context(|| format!("observing `{}`", plan.values[o].0))?;
                }
                values[o] = Some(t);
            }
            for src in &step.inputs {
                if let Src::Val(v) = src {
                    if plan.last_use[*v] == i {
                        if let Some(t) = values[*v].take() {
                            self.bufs.give(t.data);
                        }
                    }
                }
            }
        }
        plan.outputs
            .iter()
            .map(|(n, s)| match s {
                Src::Val(v) => values[*v]
                    .take()
                    .with_context(|| format!("output `{n}` was not computed")),
                _ => bail!("graph output `{n}` is a constant"),
            })
            .collect()
    }

    /// Writes parameters and BatchNorm running statistics back into `model`'s initializers
    /// (same graph, new numbers).
    pub fn write_back(&self, model: &mut Model) -> Result<()> {
        for (name, t) in self.params.iter().chain(self.state.iter()) {
            let slot = model.graph.initializers.get_mut(name).with_context(|| format!("the model has no initializer `{name}` to write back to; is it the model this net was built from?"))?;
            ensure!(
                slot.dims == t.shape,
                "initializer `{name}` has shape {:?} in the model but {:?} here",
                slot.dims,
                t.shape
            );
            *slot = t.to_onnx(name);
        }
        Ok(())
    }
}

impl Tensor {
    fn numel_of_shape(&self) -> usize {
        self.shape.iter().product()
    }
}

pub(crate) fn source<'a>(
    s: Src,
    values: &'a [Option<Tensor>],
    params: &'a ParamStore,
    state: &'a ParamStore,
    plan: &'a Plan,
) -> &'a Tensor {
    match s {
        Src::Val(v) => values[v]
            .as_ref()
            .expect("plans order steps after the steps producing their inputs"),
        Src::Param(i) => &params.tensors[i],
        Src::State(i) => &state.tensors[i],
        Src::Const(i) => &plan.consts[i],
    }
}

/// Steps (as "`node` (op)") without a backward pass that read, directly or not, a parameter.
fn downstream_without_backward(plan: &Plan, roles: &Roles) -> Vec<String> {
    let _ = roles;
    let mut tainted = vec![false; plan.values.len()];
    let mut out = Vec::new();
    for s in &plan.steps {
        let reads = s.inputs.iter().any(|src| match src {
            Src::Param(_) => true,
            Src::Val(v) => tainted[*v],
            _ => false,
        });
        if reads {
            if !s.op.has_backward() {
                out.push(format!("`{}` ({})", s.node, s.op_type));
            }
            for &o in &s.outputs {
                tainted[o] = true;
            }
        }
    }
    out
}

type StepResult = (Vec<Tensor>, Saved, Option<(Vec<f32>, Vec<f32>)>);

/// Runs one step's forward kernel. Returns the outputs, what backward needs, and for
/// training-mode BatchNorm the batch mean and variance for the running update.
fn run_step(
    step: &Step,
    ins: &[&Tensor],
    out_shapes: &[&[usize]],
    mode: Mode,
    rng: &mut dyn RngCore,
    bufs: &Buffers,
) -> Result<StepResult> {
    let x = ins[0];
    // Every kernel below writes all of its output, so stale buffer contents never leak.
    let y0 = || bufs.tensor(out_shapes[0]);
    let mut saved = Saved::None;
    let mut running = None;
    let outs = match &step.op {
        Op::Conv { geom, bias } => {
            let mut y = y0();
            conv::forward(
                geom,
                &x.data,
                &ins[1].data,
                bias.then(|| ins[2].data.as_slice()),
                &mut y.data,
            );
            vec![y]
        }
        Op::ConvTranspose { geom, bias } => {
            let mut y = y0();
            conv::backward_data(geom, &x.data, &ins[1].data, &mut y.data);
            if *bias {
                let plane = geom.in_plane();
                for (p, chunk) in y.data.chunks_mut(plane).enumerate() {
                    let b = ins[2].data[p % geom.c_in];
                    chunk.iter_mut().for_each(|v| *v += b);
                }
            }
            vec![y]
        }
        Op::BatchNorm { geom, eps, .. } => {
            let mut y = y0();
            let (gamma, beta) = (&ins[1].data, &ins[2].data);
            match mode {
                Mode::Train => {
                    let (mut mean, mut var, mut invstd) =
                        (vec![0.0; geom.c], vec![0.0; geom.c], vec![0.0; geom.c]);
                    bn::train_forward(
                        geom,
                        &x.data,
                        gamma,
                        beta,
                        *eps,
                        &mut y.data,
                        &mut mean,
                        &mut var,
                        &mut invstd,
                    );
                    running = Some((mean.clone(), var));
                    saved = Saved::BatchNorm { mean, invstd };
                }
                Mode::Eval => bn::eval_forward(
                    geom,
                    &x.data,
                    gamma,
                    beta,
                    &ins[3].data,
                    &ins[4].data,
                    *eps,
                    &mut y.data,
                ),
            }
            vec![y]
        }
        Op::Relu
        | Op::Clip { .. }
        | Op::LeakyRelu { .. }
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::HardSwish
        | Op::Tanh => {
            let mut y = y0();
            act::forward(
                step.op.act().context("an activation")?,
                &x.data,
                &mut y.data,
            );
            vec![y]
        }
        Op::Add(bc) | Op::Sub(bc) | Op::Mul(bc) | Op::Div(bc) => {
            let (kind, _) = step.op.binary().context("a binary op")?;
            let mut y = y0();
            binary::forward(kind, bc, &x.data, &ins[1].data, &mut y.data);
            vec![y]
        }
        Op::MaxPool(g) => {
            let mut y = y0();
            let mut argmax = bufs.take_u32(y.data.len());
            pool::max_forward(g, &x.data, &mut y.data, &mut argmax);
            saved = Saved::MaxPool { argmax };
            vec![y]
        }
        Op::AveragePool {
            geom,
            count_include_pad,
        } => {
            let mut y = y0();
            pool::avg_forward(geom, *count_include_pad, &x.data, &mut y.data);
            vec![y]
        }
        Op::GlobalAveragePool { planes, plane } => {
            let mut y = y0();
            pool::global_avg_forward(*planes, *plane, &x.data, &mut y.data);
            vec![y]
        }
        Op::Gemm(g) => {
            let mut y = y0();
            matmul::gemm_forward(
                g,
                &x.data,
                &ins[1].data,
                ins.get(2).map(|c| c.data.as_slice()),
                &mut y.data,
            );
            vec![y]
        }
        Op::MatMul(g) => {
            let mut y = y0();
            matmul::matmul_forward(g, &x.data, &ins[1].data, &mut y.data);
            vec![y]
        }
        Op::Reshape { .. } => {
            let mut y = y0();
            y.data.copy_from_slice(&x.data);
            vec![y]
        }
        Op::Transpose { in_shape, perm } => {
            let mut y = y0();
            layout::transpose(&x.data, in_shape, perm, &mut y.data);
            vec![y]
        }
        Op::Concat { outer, inner } => {
            let mut y = y0();
            let parts: Vec<&[f32]> = ins.iter().map(|t| t.data.as_slice()).collect();
            layout::concat(&parts, *outer, inner, &mut y.data);
            vec![y]
        }
        Op::Split { outer, inner } => {
            let mut outs: Vec<Tensor> = out_shapes.iter().map(|s| bufs.tensor(s)).collect();
            let mut refs: Vec<&mut [f32]> =
                outs.iter_mut().map(|o| o.data.as_mut_slice()).collect();
            layout::split(&x.data, *outer, inner, &mut refs);
            outs
        }
        Op::Slice { in_shape, ranges } => {
            let mut y = y0();
            layout::slice(&x.data, in_shape, ranges, &mut y.data);
            vec![y]
        }
        Op::Pad {
            in_shape,
            pads,
            value,
        } => {
            let mut y = y0();
            layout::pad(&x.data, in_shape, pads, *value, &mut y.data);
            vec![y]
        }
        Op::Softmax(g) | Op::LogSoftmax(g) => {
            let mut y = y0();
            softmax::forward(
                g,
                matches!(step.op, Op::LogSoftmax(_)),
                &x.data,
                &mut y.data,
            );
            vec![y]
        }
        Op::Dropout { ratio } => match mode {
            Mode::Train if *ratio > 0.0 => {
                let keep = 1.0 / (1.0 - ratio);
                let mut mask = bufs.take(x.data.len());
                for m in mask.iter_mut() {
                    *m = if rng.random::<f32>() < *ratio {
                        0.0
                    } else {
                        keep
                    };
                }
                let mut y = y0();
                for ((o, a), m) in y.data.iter_mut().zip(&x.data).zip(&mask) {
                    *o = a * m;
                }
                saved = Saved::Dropout { mask };
                vec![y]
            }
            _ => {
                let mut y = y0();
                y.data.copy_from_slice(&x.data);
                vec![y]
            }
        },
        Op::ReduceMean(g) => {
            let mut y = y0();
            reduce::mean_forward(g, &x.data, &mut y.data);
            vec![y]
        }
        Op::QuantizeLinear(g) => {
            let mut y = y0();
            quant::quantize(g, &x.data, &mut y.data);
            vec![y]
        }
        Op::DequantizeLinear(g) => {
            let mut y = y0();
            quant::dequantize(g, &x.data, &mut y.data);
            vec![y]
        }
    };
    Ok((outs, saved, running))
}
