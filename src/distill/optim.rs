//! Optimizers (SGD with momentum/Nesterov, AdamW) and global-norm gradient clipping, each
//! following the update rules of its `torch.optim` / `torch.nn.utils` namesake step for step,
//! so that hyperparameters carry over from PyTorch recipes unchanged.
//!
//! Parameters and gradients are named tensors in a `BTreeMap`, so every loop over them runs
//! in the same order on every run (clipping sums in that order, and checkpoints list state
//! in that order).

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::Tensor;

/// Named tensors: parameters, their gradients, or optimizer buffers.
pub type Named = BTreeMap<String, Tensor>;

/// An optimizer's internal state, enough to continue bit for bit after a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// Per-parameter buffers keyed `"<kind>/<parameter>"`, e.g. `momentum/fc.weight`.
    #[serde(skip)]
    pub buffers: BTreeMap<String, Vec<f32>>,
    /// Per-parameter update counts (AdamW's bias correction uses them).
    pub steps: BTreeMap<String, u64>,
}

/// Updates parameters from their gradients.
pub trait Optimizer {
    /// One update of every parameter in `params` that has a gradient in `grads`;
    /// parameters without one are left alone (as PyTorch skips `grad is None`).
    fn step(&mut self, params: &mut Named, grads: &Named) -> Result<()>;
    fn set_lr(&mut self, lr: f64);
    fn lr(&self) -> f64;
    fn state(&self) -> OptimizerState;
    fn load_state(&mut self, state: OptimizerState) -> Result<()>;
}

fn check_grad<'a>(name: &str, p: &Tensor, grads: &'a Named) -> Result<Option<&'a Tensor>> {
    let Some(g) = grads.get(name) else {
        return Ok(None);
    };
    ensure!(
        g.shape == p.shape,
        "the gradient of `{name}` has shape {:?} but the parameter has shape {:?}",
        g.shape,
        p.shape
    );
    Ok(Some(g))
}

/// `torch.optim.SGD` with `dampening=0`: weight decay is added to the gradient (L2), the
/// momentum buffer starts as the first gradient, and Nesterov uses `g + momentum·buf`.
#[derive(Debug, Clone)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    buffers: BTreeMap<String, Vec<f32>>,
}

impl Sgd {
    pub fn new(lr: f64, momentum: f64, nesterov: bool, weight_decay: f64) -> Result<Sgd> {
        ensure!(
            lr >= 0.0 && lr.is_finite(),
            "the learning rate must be a finite number >= 0, got {lr}"
        );
        ensure!(
            (0.0..1.0).contains(&momentum),
            "SGD momentum must be in [0, 1), got {momentum}"
        );
        ensure!(
            weight_decay >= 0.0,
            "weight decay must be >= 0, got {weight_decay}"
        );
        ensure!(
            !nesterov || momentum > 0.0,
            "Nesterov momentum needs --momentum greater than 0"
        );
        Ok(Sgd {
            lr,
            momentum,
            nesterov,
            weight_decay,
            buffers: BTreeMap::new(),
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut Named, grads: &Named) -> Result<()> {
        let (lr, wd, mom) = (
            self.lr as f32,
            self.weight_decay as f32,
            self.momentum as f32,
        );
        for (name, p) in params.iter_mut() {
            let Some(g) = check_grad(name, p, grads)? else {
                continue;
            };
            let mut d: Vec<f32> = if wd != 0.0 {
                g.data
                    .iter()
                    .zip(&p.data)
                    .map(|(&g, &p)| g + wd * p)
                    .collect()
            } else {
                g.data.clone()
            };
            if mom != 0.0 {
                match self.buffers.get_mut(name) {
                    Some(buf) => {
                        for (b, &g) in buf.iter_mut().zip(&d) {
                            *b = *b * mom + g;
                        }
                    }
                    None => {
                        self.buffers.insert(name.clone(), d.clone());
                    }
                }
                let buf = &self.buffers[name];
                if self.nesterov {
                    for (g, &b) in d.iter_mut().zip(buf) {
                        *g += mom * b;
                    }
                } else {
                    d.copy_from_slice(buf);
                }
            }
            for (p, g) in p.data.iter_mut().zip(&d) {
                *p += -lr * g;
            }
        }
        Ok(())
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            buffers: self
                .buffers
                .iter()
                .map(|(k, v)| (format!("momentum/{k}"), v.clone()))
                .collect(),
            steps: BTreeMap::new(),
        }
    }

    fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        self.buffers.clear();
        for (k, v) in state.buffers {
            let Some(name) = k.strip_prefix("momentum/") else {
                bail!("optimizer state `{k}` does not belong to SGD")
            };
            self.buffers.insert(name.to_string(), v);
        }
        Ok(())
    }
}

/// `torch.optim.AdamW` (`amsgrad=False`): decoupled weight decay `p ← p·(1 - lr·wd)` before
/// the Adam update, per-parameter bias correction, `eps` added after the square root.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    exp_avg: BTreeMap<String, Vec<f32>>,
    exp_avg_sq: BTreeMap<String, Vec<f32>>,
    steps: BTreeMap<String, u64>,
}

impl AdamW {
    pub fn new(lr: f64, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<AdamW> {
        ensure!(
            lr >= 0.0 && lr.is_finite(),
            "the learning rate must be a finite number >= 0, got {lr}"
        );
        ensure!(
            (0.0..1.0).contains(&betas.0) && (0.0..1.0).contains(&betas.1),
            "AdamW betas must be in [0, 1)"
        );
        ensure!(eps > 0.0, "AdamW eps must be positive");
        ensure!(
            weight_decay >= 0.0,
            "weight decay must be >= 0, got {weight_decay}"
        );
        Ok(AdamW {
            lr,
            betas,
            eps,
            weight_decay,
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
            steps: BTreeMap::new(),
        })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut Named, grads: &Named) -> Result<()> {
        let (b1, b2) = self.betas;
        for (name, p) in params.iter_mut() {
            let Some(g) = check_grad(name, p, grads)? else {
                continue;
            };
            let n = p.data.len();
            let step = self.steps.entry(name.clone()).or_insert(0);
            *step += 1;
            let t = *step as i32;
            let m = self
                .exp_avg
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; n]);
            let v = self
                .exp_avg_sq
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; n]);
            let decay = (1.0 - self.lr * self.weight_decay) as f32;
            let w1 = (1.0 - b1) as f32;
            let (b2f, w2) = (b2 as f32, (1.0 - b2) as f32);
            // Scalars are computed in f64 as Python floats are, then applied in f32.
            let step_size = (self.lr / (1.0 - b1.powi(t))) as f32;
            let bc2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
            let eps = self.eps as f32;
            for i in 0..n {
                let gi = g.data[i];
                p.data[i] *= decay;
                // `lerp_(grad, 1 - beta1)` is `m + w·(g - m)`.
                m[i] += w1 * (gi - m[i]);
                v[i] = v[i] * b2f + w2 * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p.data[i] += -step_size * (m[i] / denom);
            }
        }
        Ok(())
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn state(&self) -> OptimizerState {
        let mut buffers = BTreeMap::new();
        for (k, v) in &self.exp_avg {
            buffers.insert(format!("exp_avg/{k}"), v.clone());
        }
        for (k, v) in &self.exp_avg_sq {
            buffers.insert(format!("exp_avg_sq/{k}"), v.clone());
        }
        OptimizerState {
            buffers,
            steps: self.steps.clone(),
        }
    }

    fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        self.exp_avg.clear();
        self.exp_avg_sq.clear();
        for (k, v) in state.buffers {
            if let Some(name) = k.strip_prefix("exp_avg/") {
                self.exp_avg.insert(name.to_string(), v);
            } else if let Some(name) = k.strip_prefix("exp_avg_sq/") {
                self.exp_avg_sq.insert(name.to_string(), v);
            } else {
                bail!("optimizer state `{k}` does not belong to AdamW");
            }
        }
        self.steps = state.steps;
        for name in self.steps.keys() {
            ensure!(
                self.exp_avg.contains_key(name) && self.exp_avg_sq.contains_key(name),
                "AdamW state for `{name}` is incomplete"
            );
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient by
/// `min(1, max_norm / (norm + 1e-6))`, where `norm` is the L2 norm of all gradients
/// together. Returns that norm (before clipping); a non-finite norm is an error, since
/// scaling by it would silently turn every weight into NaN.
pub fn clip_grad_norm(grads: &mut Named, max_norm: f64) -> Result<f64> {
    ensure!(
        max_norm > 0.0,
        "--clip-grad-norm must be positive, got {max_norm}"
    );
    let norm = grad_norm(grads);
    ensure!(norm.is_finite(), "the gradient norm is {norm}");
    let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        for g in grads.values_mut() {
            for v in &mut g.data {
                *v *= coef;
            }
        }
    }
    Ok(norm)
}

/// L2 norm of all gradients together (accumulated in f64).
pub fn grad_norm(grads: &Named) -> f64 {
    grads
        .values()
        .flat_map(|g| &g.data)
        .map(|&v| v as f64 * v as f64)
        .sum::<f64>()
        .sqrt()
}

/// Which optimizer to build, with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum OptimizerConfig {
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// PyTorch's defaults for betas and eps.
    Adamw { weight_decay: f64 },
}

impl OptimizerConfig {
    pub fn build(&self, lr: f64) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => Box::new(
                Sgd::new(lr, momentum, nesterov, weight_decay).context("invalid SGD settings")?,
            ),
            OptimizerConfig::Adamw { weight_decay } => Box::new(
                AdamW::new(lr, (0.9, 0.999), 1e-8, weight_decay)
                    .context("invalid AdamW settings")?,
            ),
        })
    }
}

#[cfg(test)]
// Reference values are pasted as PyTorch printed them.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    // Reference trajectories from PyTorch 2.15: three steps on two parameters with
    // step-dependent gradients, optionally clipped.
    //
    //   import torch
    //   def run(make, steps=3, clip=None):
    //       p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    //       q = torch.nn.Parameter(torch.tensor([[1.0, -0.25], [3.0, 0.125]]))
    //       opt = make([p, q])
    //       for k in range(steps):
    //           opt.zero_grad()
    //           loss = ((p - 0.3 * k) ** 2 * torch.tensor([1.0, 2.0, 0.5, 3.0])).sum() \
    //                  + (q ** 3).sum() * 0.1 + (p.sum() * q.sum())
    //           loss.backward()
    //           if clip is not None:
    //               torch.nn.utils.clip_grad_norm_([p, q], clip)
    //           opt.step()
    //       return p.detach().flatten().tolist() + q.detach().flatten().tolist()
    //   run(lambda ps: torch.optim.SGD(ps, lr=0.1))                                  # sgd_plain
    //   run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4)) # sgd_mom_wd
    //   run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2,
    //                                  nesterov=True))                               # sgd_nesterov
    //   run(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05))             # adamw
    //   run(lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6,
    //                                    weight_decay=0.1), clip=1.0)                 # adamw_clip
    //   run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), clip=0.5)          # sgd_clip
    const SGD_PLAIN: [f32; 8] = [
        -0.33460524678230286,
        -0.4946520924568176,
        0.6907932758331299,
        -0.021698959171772003,
        0.8024066686630249,
        -0.3902742564678192,
        2.232576370239258,
        -0.003984863869845867,
    ];
    const SGD_MOM_WD: [f32; 8] = [
        -0.5411335825920105,
        -0.653050422668457,
        0.5782501101493835,
        -0.4080912470817566,
        0.6607449650764465,
        -0.5241595506668091,
        2.0564258098602295,
        -0.14156484603881836,
    ];
    const SGD_NESTEROV: [f32; 8] = [
        -0.7125058174133301,
        -0.3881123661994934,
        0.17499159276485443,
        -0.16967181861400604,
        0.7038377523422241,
        -0.46272948384284973,
        1.9117411375045776,
        -0.07443977147340775,
    ];
    const ADAMW: [f32; 8] = [
        0.46951940655708313,
        -0.9719327092170715,
        1.967095136642456,
        -0.02666923590004444,
        0.9685315489768982,
        -0.27959689497947693,
        2.965526819229126,
        0.09484264999628067,
    ];
    const ADAMW_CLIP: [f32; 8] = [
        0.4686720371246338,
        -0.9696913957595825,
        1.963985800743103,
        -0.026252008974552155,
        0.966913640499115,
        -0.2793431282043457,
        2.9609131813049316,
        0.0945349708199501,
    ];
    const SGD_CLIP: [f32; 8] = [
        0.4335239827632904,
        -0.9842004179954529,
        1.914810299873352,
        -0.037262190133333206,
        0.973220944404602,
        -0.2725590765476227,
        2.937041997909546,
        0.10266656428575516,
    ];

    fn run(opt: &mut dyn Optimizer, clip: Option<f64>) -> Vec<f32> {
        let mut params = Named::new();
        params.insert(
            "p".into(),
            Tensor::new(vec![4], vec![0.5, -1.0, 2.0, 0.0]).unwrap(),
        );
        params.insert(
            "q".into(),
            Tensor::new(vec![2, 2], vec![1.0, -0.25, 3.0, 0.125]).unwrap(),
        );
        let w = [1.0f32, 2.0, 0.5, 3.0];
        for k in 0..3 {
            let (p, q) = (&params["p"].data, &params["q"].data);
            let (sp, sq): (f32, f32) = (p.iter().sum(), q.iter().sum());
            let gp = p
                .iter()
                .zip(w)
                .map(|(&v, w)| 2.0 * (v - 0.3 * k as f32) * w + sq)
                .collect();
            let gq = q.iter().map(|&v| 0.3 * v * v + sp).collect();
            let mut grads = Named::new();
            grads.insert("p".into(), Tensor::new(vec![4], gp).unwrap());
            grads.insert("q".into(), Tensor::new(vec![2, 2], gq).unwrap());
            if let Some(c) = clip {
                clip_grad_norm(&mut grads, c).unwrap();
            }
            opt.step(&mut params, &grads).unwrap();
        }
        params.values().flat_map(|t| t.data.clone()).collect()
    }

    /// Both sides compute in f32 but may order or fuse operations differently: a few ulps.
    fn assert_close(got: &[f32], want: &[f32]) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-6 * w.abs().max(1.0),
                "value {i}: {g} vs PyTorch {w}"
            );
        }
    }

    #[test]
    fn sgd_matches_pytorch() {
        assert_close(
            &run(&mut Sgd::new(0.1, 0.0, false, 0.0).unwrap(), None),
            &SGD_PLAIN,
        );
        assert_close(
            &run(&mut Sgd::new(0.05, 0.9, false, 5e-4).unwrap(), None),
            &SGD_MOM_WD,
        );
        assert_close(
            &run(&mut Sgd::new(0.05, 0.9, true, 1e-2).unwrap(), None),
            &SGD_NESTEROV,
        );
        assert_close(
            &run(&mut Sgd::new(0.05, 0.9, false, 0.0).unwrap(), Some(0.5)),
            &SGD_CLIP,
        );
    }

    #[test]
    fn adamw_matches_pytorch() {
        assert_close(
            &run(
                &mut AdamW::new(0.01, (0.9, 0.999), 1e-8, 0.05).unwrap(),
                None,
            ),
            &ADAMW,
        );
        assert_close(
            &run(
                &mut AdamW::new(0.01, (0.8, 0.99), 1e-6, 0.1).unwrap(),
                Some(1.0),
            ),
            &ADAMW_CLIP,
        );
    }

    #[test]
    fn state_round_trip_continues_identically() {
        for cfg in [
            OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-3,
            },
            OptimizerConfig::Adamw { weight_decay: 0.01 },
        ] {
            let mut params = Named::new();
            params.insert(
                "w".into(),
                Tensor::new(vec![3], vec![1.0, -2.0, 0.5]).unwrap(),
            );
            let grads_at = |k: f32| {
                let mut g = Named::new();
                g.insert(
                    "w".into(),
                    Tensor::new(vec![3], vec![0.1 * k, -0.2, 0.3 + k]).unwrap(),
                );
                g
            };
            let mut a = cfg.build(0.1).unwrap();
            a.step(&mut params, &grads_at(1.0)).unwrap();
            let mut b = cfg.build(0.1).unwrap();
            b.load_state(a.state()).unwrap();
            let mut pb = params.clone();
            a.step(&mut params, &grads_at(2.0)).unwrap();
            b.step(&mut pb, &grads_at(2.0)).unwrap();
            assert_eq!(params, pb);
        }
    }

    #[test]
    fn missing_gradients_leave_parameters_alone() {
        let mut params = Named::new();
        params.insert("frozen".into(), Tensor::new(vec![1], vec![1.0]).unwrap());
        let mut opt = Sgd::new(0.1, 0.9, false, 0.1).unwrap();
        opt.step(&mut params, &Named::new()).unwrap();
        assert_eq!(params["frozen"].data, vec![1.0]);
    }

    #[test]
    fn clipping_leaves_small_gradients_alone_and_rejects_nan() {
        let mut g = Named::new();
        g.insert("a".into(), Tensor::new(vec![2], vec![3.0, 4.0]).unwrap());
        assert_eq!(clip_grad_norm(&mut g, 10.0).unwrap(), 5.0);
        assert_eq!(g["a"].data, vec![3.0, 4.0]);
        clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((grad_norm(&g) - 1.0).abs() < 1e-6);
        g.insert("b".into(), Tensor::new(vec![1], vec![f32::NAN]).unwrap());
        assert!(clip_grad_norm(&mut g, 1.0).is_err());
    }
}
