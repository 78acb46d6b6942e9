//! Learning-rate schedules, evaluated per optimizer step: a linear warm-up, then cosine
//! decay to zero, a step decay, or a constant rate.
//!
//! The rate of step `k` (0-based, the `k`-th call of `optimizer.step()`) is `base · f(k)`,
//! which is `torch.optim.lr_scheduler.LambdaLR` with `f` as the lambda. With `W` warm-up and
//! `N` total steps:
//! - warm-up, `k < W`: `f = (k + 1) / W`, as `LinearLR(start_factor=1/W, total_iters=W-1)`;
//! - `cosine`: `f = (1 + cos(π·(k - W)/(N - W))) / 2`, as `CosineAnnealingLR(T_max=N-W)`
//!   (chained after the warm-up with `SequentialLR(milestones=[W])`);
//! - `step`: `f = 0.1^m` where `m` counts the milestones `W + (N-W)/2` and `W + 3(N-W)/4`
//!   passed (integer division), as `MultiStepLR(gamma=0.1)`;
//! - `constant`: `f = 1`.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Step,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Schedule> {
        ensure!(
            base_lr > 0.0 && base_lr.is_finite(),
            "--lr must be a positive number, got {base_lr}"
        );
        ensure!(
            warmup_steps <= total_steps,
            "the warm-up ({warmup_steps} steps) is longer than the whole training ({total_steps} steps)"
        );
        Ok(Schedule {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        })
    }

    /// The learning rate of step `k` (0-based).
    pub fn lr(&self, k: u64) -> f64 {
        self.base_lr * self.factor(k)
    }

    fn factor(&self, k: u64) -> f64 {
        let w = self.warmup_steps;
        if k < w {
            return (k + 1) as f64 / w as f64;
        }
        let span = self.total_steps.saturating_sub(w).max(1);
        let done = k - w;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Cosine => {
                0.5 * (1.0 + (std::f64::consts::PI * done as f64 / span as f64).cos())
            }
            ScheduleKind::Step => {
                let passed = [span / 2, span * 3 / 4]
                    .iter()
                    .filter(|&&m| done >= m)
                    .count();
                0.1f64.powi(passed as i32)
            }
        }
    }
}

#[cfg(test)]
// Reference values are pasted as PyTorch printed them.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    // PyTorch 2.15, learning rate before each of 10 steps, base 0.1:
    //
    //   def lrs(make, n=10):
    //       p = torch.nn.Parameter(torch.zeros(1)); opt = torch.optim.SGD([p], lr=0.1)
    //       s = make(opt); out = []
    //       for _ in range(n):
    //           out.append(opt.param_groups[0]["lr"]); opt.step(); s.step()
    //       return out
    //   lrs(lambda o: CosineAnnealingLR(o, T_max=10))                       # COS
    //   lrs(lambda o: MultiStepLR(o, milestones=[5, 7], gamma=0.1))         # STEP
    //   lrs(lambda o: SequentialLR(o, [LinearLR(o, start_factor=1/3, end_factor=1.0,
    //       total_iters=2), CosineAnnealingLR(o, T_max=7)], milestones=[3])) # WARM_COS
    const COS: [f64; 10] = [
        0.1,
        0.09755282581475769,
        0.09045084971874738,
        0.07938926261462367,
        0.06545084971874739,
        0.05000000000000001,
        0.03454915028125264,
        0.020610737385376353,
        0.009549150281252635,
        0.002447174185242324,
    ];
    const STEP: [f64; 10] = [
        0.1,
        0.1,
        0.1,
        0.1,
        0.1,
        0.010000000000000002,
        0.010000000000000002,
        0.0010000000000000002,
        0.0010000000000000002,
        0.0010000000000000002,
    ];
    const WARM_COS: [f64; 10] = [
        0.03333333333333333,
        0.06666666666666667,
        0.1,
        0.1,
        0.09504844339512096,
        0.08117449009293669,
        0.061126046697815725,
        0.03887395330218429,
        0.018825509907063328,
        0.004951556604879048,
    ];

    fn check(s: Schedule, want: &[f64]) {
        for (k, w) in want.iter().enumerate() {
            let got = s.lr(k as u64);
            assert!(
                (got - w).abs() < 1e-12,
                "{:?} step {k}: {got} vs PyTorch {w}",
                s.kind
            );
        }
    }

    #[test]
    fn schedules_match_pytorch() {
        check(
            Schedule::new(ScheduleKind::Cosine, 0.1, 0, 10).unwrap(),
            &COS,
        );
        check(
            Schedule::new(ScheduleKind::Step, 0.1, 0, 10).unwrap(),
            &STEP,
        );
        check(
            Schedule::new(ScheduleKind::Cosine, 0.1, 3, 10).unwrap(),
            &WARM_COS,
        );
        check(
            Schedule::new(ScheduleKind::Constant, 0.1, 2, 10).unwrap(),
            &[0.05, 0.1, 0.1, 0.1],
        );
    }

    #[test]
    fn warmup_longer_than_training_is_an_error() {
        assert!(Schedule::new(ScheduleKind::Cosine, 0.1, 11, 10).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, 0.0, 0, 10).is_err());
    }
}
