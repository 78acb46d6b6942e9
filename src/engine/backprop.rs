//! Reverse-mode autodiff over a plan: one reverse walk over the steps, one match arm per op,
//! each calling that op's backward kernel. Gradients of values that several steps read are
//! summed in reverse step order, so the result does not depend on thread scheduling.

use anyhow::{bail, ensure, Context, Result};

use std::sync::Arc;

use super::buffers::Buffers;
use super::kernels::{act, binary, bn, conv, layout, matmul, pool, reduce, softmax};
use super::net::{source, Forward, Mode, Net, Saved};
use super::plan::{Op, Src, Step};
use super::Tensor;

/// Gradients of the trainable parameters by name (and, when asked for, of graph inputs).
#[derive(Debug, Clone, Default)]
pub struct GradStore {
    names: Vec<String>,
    grads: Vec<Option<Tensor>>,
    inputs: Vec<(String, Tensor)>,
    bufs: Option<Arc<Buffers>>,
}

impl Drop for GradStore {
    /// Hands the buffers back to the net for the next step.
    fn drop(&mut self) {
        if let Some(b) = &self.bufs {
            for t in self.grads.drain(..).flatten() {
                b.give(t.data);
            }
        }
    }
}

impl GradStore {
    /// Gradient of a parameter; None when it is frozen or the loss does not depend on it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        let i = self.names.iter().position(|n| n == name)?;
        self.grads[i].as_ref()
    }
    /// Parameters with a gradient, in graph order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names
            .iter()
            .zip(&self.grads)
            .filter_map(|(n, g)| g.as_ref().map(|g| (n.as_str(), g)))
    }
    /// Takes a parameter's gradient out of the store.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let i = self.names.iter().position(|n| n == name)?;
        self.grads[i].take()
    }
    /// Gradient with respect to a graph input (from `Net::backward_with_inputs`).
    pub fn input(&self, name: &str) -> Option<&Tensor> {
        self.inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

fn add_into(slot: &mut Option<Tensor>, g: Tensor, bufs: &Buffers) {
    match slot {
        Some(acc) => {
            for (a, b) in acc.data.iter_mut().zip(&g.data) {
                *a += b;
            }
            bufs.give(g.data);
        }
        None => *slot = Some(g),
    }
}

pub(crate) fn backward(
    net: &Net,
    fwd: &Forward,
    seeds: &[(&str, &Tensor)],
    want_inputs: bool,
) -> Result<GradStore> {
    let plan = &fwd.plan;
    let bufs: &Buffers = net.buffers();
    let params = net.params();
    let trainable = net.trainable_mask();
    // Which values carry a gradient somebody wants: downstream of a trainable parameter
    // (or of a graph input, when input gradients are asked for).
    let mut needs = vec![false; plan.values.len()];
    if want_inputs {
        for (_, slot) in &plan.inputs {
            needs[*slot] = true;
        }
    }
    let src_needs = |s: &Src, needs: &[bool]| match *s {
        Src::Val(v) => needs[v],
        Src::Param(i) => trainable[i],
        _ => false,
    };
    for step in &plan.steps {
        if step.inputs.iter().any(|s| src_needs(s, &needs)) {
            for &o in &step.outputs {
                needs[o] = true;
            }
        }
    }
    let mut grads: Vec<Option<Tensor>> = vec![None; plan.values.len()];
    for (name, g) in seeds {
        let src = plan.index.get(*name).with_context(|| {
            format!("cannot take a gradient at `{name}`: the model has no such value")
        })?;
        let Src::Val(v) = *src else {
            bail!("cannot take a gradient at `{name}`: it is a parameter or constant, not a computed value")
        };
        let shape = &plan.values[v].1;
        ensure!(
            &g.shape == shape,
            "the gradient given for `{name}` has shape {:?}, but the value has shape {shape:?}",
            g.shape
        );
        add_into(&mut grads[v], bufs.copy_of(g), bufs);
    }
    let mut pgrads: Vec<Option<Tensor>> = vec![None; params.len()];
    for (i, step) in plan.steps.iter().enumerate().rev() {
        let mut dys: Vec<Option<Tensor>> = step.outputs.iter().map(|&o| grads[o].take()).collect();
        if dys.iter().all(Option::is_none) {
            continue;
        }
        let need: Vec<bool> = step.inputs.iter().map(|s| src_needs(s, &needs)).collect();
        if !need.iter().any(|&n| n) {
            dys.into_iter().flatten().for_each(|t| bufs.give(t.data));
            continue;
        }
        let ins: Vec<&Tensor> = step
            .inputs
            .iter()
            .map(|&s| source(s, &fwd.values, params, net.state(), plan))
            .collect();
        let outs: Vec<&Tensor> = step
            .outputs
            .iter()
            .map(|&o| fwd.values[o].as_ref().expect("forward values are kept"))
            .collect();
        let dins = step_backward(
            step,
            &fwd.saved[i],
            fwd.mode,
            &ins,
            &outs,
            &mut dys,
            &need,
            bufs,
        )
        .with_context(|| format!("backward of node `{}` ({})", step.node, step.op_type))?;
        dys.into_iter().flatten().for_each(|t| bufs.give(t.data));
        for ((src, d), n) in step.inputs.iter().zip(dins).zip(&need) {
            let Some(d) = d else { continue };
            match (*src, *n) {
                (Src::Val(v), true) => add_into(&mut grads[v], d, bufs),
                (Src::Param(p), true) => add_into(&mut pgrads[p], d, bufs),
                _ => bufs.give(d.data),
            }
        }
    }
    let mut inputs = Vec::new();
    if want_inputs {
        for (name, slot) in &plan.inputs {
            let g = grads[*slot]
                .take()
                .unwrap_or_else(|| Tensor::zeros(&plan.values[*slot].1));
            inputs.push((name.clone(), g));
        }
    }
    grads.into_iter().flatten().for_each(|t| bufs.give(t.data));
    // Frozen parameters never get a gradient, even when they feed a step that computes one.
    for (g, &t) in pgrads.iter_mut().zip(trainable) {
        if !t {
            if let Some(g) = g.take() {
                bufs.give(g.data);
            }
        }
    }
    Ok(GradStore {
        names: (0..params.len())
            .map(|i| params.name(i).to_string())
            .collect(),
        grads: pgrads,
        inputs,
        bufs: Some(net.buffers().clone()),
    })
}

/// Input gradients of one step, `None` where not needed. `dys` holds the output gradients
/// (`None` for outputs nothing downstream depends on).
///
/// Buffers for results come from `bufs` with stale contents: every kernel used here writes
/// all of its output. Output gradients left in `dys` go back to `bufs` afterwards.
#[allow(clippy::too_many_arguments)]
fn step_backward(
    step: &Step,
    saved: &Saved,
    mode: Mode,
    ins: &[&Tensor],
    outs: &[&Tensor],
    dys: &mut [Option<Tensor>],
    need: &[bool],
    bufs: &Buffers,
) -> Result<Vec<Option<Tensor>>> {
    let x = ins[0];
    let n_in = ins.len();
    let mut res: Vec<Option<Tensor>> = vec![None; n_in];
    let zeros_like = |t: &Tensor| bufs.tensor(&t.shape);
    if dys.len() == 1 && dys[0].is_none() {
        dys[0] = Some(bufs.zeros_tensor(&outs[0].shape));
    }
    // The output gradient of single-output ops, borrowed or (for in-place ops) taken.
    let single = |dys: &mut [Option<Tensor>]| -> Tensor { dys[0].take().expect("set above") };
    match &step.op {
        Op::Conv { geom, bias } => {
            let dy = dys[0].as_ref().expect("set above");
            if need[0] {
                let mut dx = zeros_like(x);
                conv::backward_data(geom, &dy.data, &ins[1].data, &mut dx.data);
                res[0] = Some(dx);
            }
            if need[1] {
                let mut dw = zeros_like(ins[1]);
                conv::backward_weight(geom, &x.data, &dy.data, &mut dw.data);
                res[1] = Some(dw);
            }
            if *bias && need[2] {
                let mut db = zeros_like(ins[2]);
                conv::channel_sums(&dy.data, geom.n, geom.c_out, geom.out_plane(), &mut db.data);
                res[2] = Some(db);
            }
        }
        Op::ConvTranspose { geom, bias } => {
            // `geom` maps this op's output space to its input space, so the roles swap.
            let dy = dys[0].as_ref().expect("set above");
            if need[0] {
                let mut dx = zeros_like(x);
                conv::forward(geom, &dy.data, &ins[1].data, None, &mut dx.data);
                res[0] = Some(dx);
            }
            if need[1] {
                let mut dw = zeros_like(ins[1]);
                conv::backward_weight(geom, &dy.data, &x.data, &mut dw.data);
                res[1] = Some(dw);
            }
            if *bias && need[2] {
                let mut db = zeros_like(ins[2]);
                conv::channel_sums(&dy.data, geom.n, geom.c_in, geom.in_plane(), &mut db.data);
                res[2] = Some(db);
            }
        }
        Op::BatchNorm { geom, eps, .. } => {
            let dy = dys[0].as_ref().expect("set above");
            let (mut dg, mut db) = (zeros_like(ins[1]), zeros_like(ins[2]));
            let mut dx = need[0].then(|| zeros_like(x));
            match (mode, saved) {
                (Mode::Train, Saved::BatchNorm { mean, invstd }) => bn::train_backward(
                    geom,
                    &x.data,
                    &dy.data,
                    &ins[1].data,
                    mean,
                    invstd,
                    dx.as_mut().map(|t| t.data.as_mut_slice()),
                    &mut dg.data,
                    &mut db.data,
                ),
                (Mode::Eval, _) => bn::eval_backward(
                    geom,
                    &x.data,
                    &dy.data,
                    &ins[1].data,
                    &ins[3].data,
                    &ins[4].data,
                    *eps,
                    dx.as_mut().map(|t| t.data.as_mut_slice()),
                    &mut dg.data,
                    &mut db.data,
                ),
                _ => bail!("the forward pass kept no batch statistics"),
            }
            res[0] = dx;
            res[1] = need[1].then_some(dg);
            res[2] = need[2].then_some(db);
        }
        Op::Relu
        | Op::Clip { .. }
        | Op::LeakyRelu { .. }
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::HardSwish
        | Op::Tanh => {
            let mut g = single(dys);
            act::backward_in_place(
                step.op.act().context("an activation")?,
                &x.data,
                &outs[0].data,
                &mut g.data,
            );
            res[0] = Some(g);
        }
        Op::Add(bc) | Op::Sub(bc) | Op::Mul(bc) | Op::Div(bc) => {
            let (kind, _) = step.op.binary().context("a binary op")?;
            let dy = dys[0].as_ref().expect("set above");
            let mut da = need[0].then(|| zeros_like(ins[0]));
            let mut db = need[1].then(|| zeros_like(ins[1]));
            binary::backward(
                kind,
                bc,
                &ins[0].data,
                &ins[1].data,
                &dy.data,
                da.as_mut().map(|t| t.data.as_mut_slice()),
                db.as_mut().map(|t| t.data.as_mut_slice()),
            );
            res[0] = da;
            res[1] = db;
        }
        Op::MaxPool(g) => {
            let dy = dys[0].as_ref().expect("set above");
            let Saved::MaxPool { argmax } = saved else {
                bail!("the forward pass kept no argmax")
            };
            let mut dx = zeros_like(x);
            pool::max_backward(g, &dy.data, argmax, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::AveragePool {
            geom,
            count_include_pad,
        } => {
            let dy = dys[0].as_ref().expect("set above");
            let mut dx = zeros_like(x);
            pool::avg_backward(geom, *count_include_pad, &dy.data, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::GlobalAveragePool { planes, plane } => {
            let dy = dys[0].as_ref().expect("set above");
            let mut dx = zeros_like(x);
            pool::global_avg_backward(*planes, *plane, &dy.data, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::Gemm(g) => {
            let dy = dys[0].as_ref().expect("set above");
            let mut da = need[0].then(|| zeros_like(ins[0]));
            let mut db = need[1].then(|| zeros_like(ins[1]));
            let mut dc = (n_in > 2 && need[2]).then(|| zeros_like(ins[2]));
            matmul::gemm_backward(
                g,
                &ins[0].data,
                &ins[1].data,
                &dy.data,
                da.as_mut().map(|t| t.data.as_mut_slice()),
                db.as_mut().map(|t| t.data.as_mut_slice()),
                dc.as_mut().map(|t| t.data.as_mut_slice()),
            );
            res[0] = da;
            res[1] = db;
            if n_in > 2 {
                res[2] = dc;
            }
        }
        Op::MatMul(g) => {
            let dy = dys[0].as_ref().expect("set above");
            let mut da = need[0].then(|| zeros_like(ins[0]));
            let mut db = need[1].then(|| zeros_like(ins[1]));
            matmul::matmul_backward(
                g,
                &ins[0].data,
                &ins[1].data,
                &dy.data,
                da.as_mut().map(|t| t.data.as_mut_slice()),
                db.as_mut().map(|t| t.data.as_mut_slice()),
            );
            res[0] = da;
            res[1] = db;
        }
        Op::Reshape { .. } => {
            let dy = single(dys);
            res[0] = Some(Tensor {
                shape: x.shape.clone(),
                data: dy.data,
            });
        }
        Op::Transpose { in_shape, perm } => {
            let dy = dys[0].as_ref().expect("set above");
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            let out_shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
            let mut dx = zeros_like(x);
            layout::transpose(&dy.data, &out_shape, &inv, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::Concat { outer, inner } => {
            let dy = dys[0].as_ref().expect("set above");
            let mut parts: Vec<Tensor> = ins.iter().map(|t| zeros_like(t)).collect();
            let mut refs: Vec<&mut [f32]> =
                parts.iter_mut().map(|t| t.data.as_mut_slice()).collect();
            layout::split(&dy.data, *outer, inner, &mut refs);
            for (i, p) in parts.into_iter().enumerate() {
                res[i] = need[i].then_some(p);
            }
        }
        Op::Split { outer, inner } => {
            for (d, o) in dys.iter_mut().zip(outs) {
                if d.is_none() {
                    *d = Some(bufs.zeros_tensor(&o.shape));
                }
            }
            let refs: Vec<&[f32]> = dys
                .iter()
                .map(|t| t.as_ref().expect("filled above").data.as_slice())
                .collect();
            let mut dx = zeros_like(x);
            layout::concat(&refs, *outer, inner, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::Slice { in_shape, ranges } => {
            let dy = dys[0].as_ref().expect("set above");
            let mut dx = zeros_like(x);
            layout::slice_backward(&dy.data, in_shape, ranges, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::Pad { in_shape, pads, .. } => {
            let dy = dys[0].as_ref().expect("set above");
            let mut dx = zeros_like(x);
            layout::pad_backward(&dy.data, in_shape, pads, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::Softmax(g) | Op::LogSoftmax(g) => {
            let dy = dys[0].as_ref().expect("set above");
            let mut dx = zeros_like(x);
            softmax::backward(
                g,
                matches!(step.op, Op::LogSoftmax(_)),
                &outs[0].data,
                &dy.data,
                &mut dx.data,
            );
            res[0] = Some(dx);
        }
        Op::Dropout { .. } => {
            let mut g = single(dys);
            if let Saved::Dropout { mask } = saved {
                for (d, m) in g.data.iter_mut().zip(mask) {
                    *d *= m;
                }
            }
            res[0] = Some(g);
        }
        Op::ReduceMean(g) => {
            let dy = dys[0].as_ref().expect("set above");
            let mut dx = zeros_like(x);
            reduce::mean_backward(g, &dy.data, &mut dx.data);
            res[0] = Some(dx);
        }
        Op::QuantizeLinear(_) | Op::DequantizeLinear(_) => {
            bail!(
                "{} has no backward pass; train the float model and quantize afterwards",
                step.op_type
            )
        }
    }
    Ok(res)
}
