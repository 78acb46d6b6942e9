//! Training losses with their gradients with respect to the logits: cross-entropy (with
//! label smoothing), Hinton knowledge distillation, and mean squared error for hint losses.
//!
//! Every loss is a mean over the batch, as PyTorch's defaults are (`cross_entropy` with
//! `reduction="mean"`, `kl_div` with `reduction="batchmean"`, `mse_loss` with
//! `reduction="mean"`), so the same learning rate means the same step size. Rows are
//! evaluated in f64 with the log-sum-exp shift, so logits of ±1e4 neither overflow nor lose
//! the small probabilities.

use anyhow::{ensure, Result};

/// A loss value and its gradient with respect to the first argument (same layout).
#[derive(Debug, Clone, PartialEq)]
pub struct LossGrad {
    pub loss: f64,
    pub grad: Vec<f32>,
}

/// Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": the soft-target term
/// is scaled by T² so its gradients keep their size as the temperature changes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KdConfig {
    pub temperature: f64,
    /// Weight of the soft-target term; `1 - alpha` weighs the hard-label cross-entropy.
    pub alpha: f64,
    pub label_smoothing: f64,
}

/// `log_softmax(row * scale)` into `out`.
fn log_softmax(row: &[f32], scale: f64, out: &mut [f64]) {
    let max = row
        .iter()
        .map(|&v| v as f64 * scale)
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|&v| (v as f64 * scale - max).exp()).sum();
    let lse = max + sum.ln();
    for (o, &v) in out.iter_mut().zip(row) {
        *o = v as f64 * scale - lse;
    }
}

fn check_shapes(logits: &[f32], classes: usize, labels: &[i64]) -> Result<usize> {
    ensure!(classes > 0, "the model's output has no classes");
    ensure!(
        !logits.is_empty() && logits.len().is_multiple_of(classes),
        "{} logits do not split into rows of {classes} classes",
        logits.len()
    );
    let n = logits.len() / classes;
    ensure!(
        labels.len() == n,
        "{n} rows of logits but {} labels",
        labels.len()
    );
    for (i, &y) in labels.iter().enumerate() {
        ensure!(
            (0..classes as i64).contains(&y),
            "label {y} of sample {i} is outside the model's {classes} classes (0..{})",
            classes - 1
        );
    }
    Ok(n)
}

/// Cross-entropy of `logits` (`[n, classes]`, row-major) against integer `labels`, averaged
/// over the batch. With label smoothing ε the target is `(1-ε)·onehot + ε/classes`, as in
/// `torch.nn.functional.cross_entropy(..., label_smoothing=ε)`.
pub fn cross_entropy(
    logits: &[f32],
    classes: usize,
    labels: &[i64],
    smoothing: f64,
) -> Result<LossGrad> {
    ensure!(
        (0.0..1.0).contains(&smoothing),
        "label smoothing must be in [0, 1), got {smoothing}"
    );
    let n = check_shapes(logits, classes, labels)?;
    let mut grad = vec![0f32; logits.len()];
    let mut lp = vec![0f64; classes];
    let mut total = 0.0;
    let off = smoothing / classes as f64;
    for ((row, g), &y) in logits
        .chunks(classes)
        .zip(grad.chunks_mut(classes))
        .zip(labels)
    {
        log_softmax(row, 1.0, &mut lp);
        let y = y as usize;
        total += -(1.0 - smoothing) * lp[y] - off * lp.iter().sum::<f64>();
        for (k, (gk, &l)) in g.iter_mut().zip(&lp).enumerate() {
            let target = off + if k == y { 1.0 - smoothing } else { 0.0 };
            *gk = ((l.exp() - target) / n as f64) as f32;
        }
    }
    Ok(LossGrad {
        loss: total / n as f64,
        grad,
    })
}

/// `alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-alpha)·CE(s, y)`, batch-averaged, with its
/// gradient with respect to the student logits `s`.
pub fn distillation(
    student: &[f32],
    teacher: &[f32],
    classes: usize,
    labels: &[i64],
    cfg: &KdConfig,
) -> Result<LossGrad> {
    ensure!(
        cfg.temperature > 0.0,
        "the temperature must be positive, got {}",
        cfg.temperature
    );
    ensure!(
        (0.0..=1.0).contains(&cfg.alpha),
        "alpha must be in [0, 1], got {}",
        cfg.alpha
    );
    ensure!(
        student.len() == teacher.len(),
        "student logits ({}) and teacher logits ({}) differ in size",
        student.len(),
        teacher.len()
    );
    let n = check_shapes(student, classes, labels)?;
    let t = cfg.temperature;
    let mut out = if cfg.alpha < 1.0 {
        cross_entropy(student, classes, labels, cfg.label_smoothing)?
    } else {
        LossGrad {
            loss: 0.0,
            grad: vec![0.0; student.len()],
        }
    };
    out.loss *= 1.0 - cfg.alpha;
    for g in &mut out.grad {
        *g = (*g as f64 * (1.0 - cfg.alpha)) as f32;
    }
    let (mut ls, mut lt) = (vec![0f64; classes], vec![0f64; classes]);
    let mut kl = 0.0;
    // d/ds of T²·KL(p_t ‖ p_s) is T·(p_s - p_t); the 1/n is the batch mean.
    let scale = cfg.alpha * t / n as f64;
    for ((s, tt), g) in student
        .chunks(classes)
        .zip(teacher.chunks(classes))
        .zip(out.grad.chunks_mut(classes))
    {
        log_softmax(s, 1.0 / t, &mut ls);
        log_softmax(tt, 1.0 / t, &mut lt);
        for k in 0..classes {
            let pt = lt[k].exp();
            // xlogy semantics: a zero teacher probability contributes nothing.
            if pt > 0.0 {
                kl += pt * (lt[k] - ls[k]);
            }
            g[k] = (g[k] as f64 + scale * (ls[k].exp() - pt)) as f32;
        }
    }
    out.loss += cfg.alpha * t * t * kl / n as f64;
    Ok(out)
}

/// `mean((a - b)²)` and its gradient with respect to `a`.
pub fn mse(a: &[f32], b: &[f32]) -> Result<LossGrad> {
    ensure!(
        a.len() == b.len(),
        "tensors of {} and {} values cannot be compared",
        a.len(),
        b.len()
    );
    ensure!(!a.is_empty(), "mean squared error of empty tensors");
    let n = a.len() as f64;
    let mut loss = 0.0;
    let grad = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            loss += d * d;
            (2.0 * d / n) as f32
        })
        .collect();
    Ok(LossGrad {
        loss: loss / n,
        grad,
    })
}

/// Index of the largest value of each row (the first on ties, as `torch.argmax`).
pub fn argmax_rows(logits: &[f32], classes: usize) -> Vec<usize> {
    logits
        .chunks(classes.max(1))
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// How many rows' argmax equals their label.
pub fn correct(logits: &[f32], classes: usize, labels: &[i64]) -> usize {
    argmax_rows(logits, classes)
        .iter()
        .zip(labels)
        .filter(|(&p, &y)| p as i64 == y)
        .count()
}

#[cfg(test)]
// Reference values are pasted as PyTorch printed them.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    const S: [f32; 12] = [
        1.0, -2.0, 0.5, 3.0, 0.0, 0.1, -0.3, 2.5, 10.0, -10.0, 4.0, 0.0,
    ];
    const T: [f32; 12] = [
        2.0, -1.0, 0.0, 1.0, 0.5, 0.5, -1.0, 3.0, 9.0, -8.0, 5.0, 1.0,
    ];
    const Y: [i64; 3] = [3, 1, 0];

    // Reference values from PyTorch 2.15 (float32):
    //
    //   import torch, torch.nn.functional as F
    //   s = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 0.1, -0.3, 2.5], [10.0, -10.0, 4.0, 0.0]],
    //                    requires_grad=True)
    //   t = torch.tensor([[2.0, -1.0, 0.0, 1.0], [0.5, 0.5, -1.0, 3.0], [9.0, -8.0, 5.0, 1.0]])
    //   y = torch.tensor([3, 1, 0])
    //   l = F.cross_entropy(s, y)                                    # "ce"
    //   l = F.cross_entropy(s, y, label_smoothing=0.1)               # "ce_ls"
    //   T, a = 4.0, 0.9                                              # "kd"
    //   kl = F.kl_div(F.log_softmax(s/T, 1), F.softmax(t/T, 1), reduction="batchmean") * T * T
    //   l = a*kl + (1-a)*F.cross_entropy(s, y)
    //   T, a = 2.0, 0.5                                              # "kd2"
    //   kl = F.kl_div(F.log_softmax(s/T, 1), F.softmax(t/T, 1), reduction="batchmean") * T * T
    //   l = a*kl + (1-a)*F.cross_entropy(s, y, label_smoothing=0.2)
    //   l.backward(); print(l.item(), s.grad.flatten().tolist())
    const CE: (f64, [f32; 12]) = (
        0.9382407069206238,
        [
            0.036851245909929276,
            0.001834715949371457,
            0.02235141023993492,
            -0.06103738397359848,
            0.02218010276556015,
            -0.30882054567337036,
            0.016431426629424095,
            0.27020901441574097,
            -0.0008392533054575324,
            6.853210221535733e-10,
            0.000824170361738652,
            1.5095213711902034e-05,
        ],
    );
    const CE_LS: (f64, [f32; 12]) = (
        1.3015739917755127,
        [
            0.028517909348011017,
            -0.006498618051409721,
            0.014018073678016663,
            -0.036037370562553406,
            0.013846765272319317,
            -0.2838205099105835,
            0.008098090067505836,
            0.26187562942504883,
            0.02416072227060795,
            -0.00833333283662796,
            -0.007509163580834866,
            -0.008318238891661167,
        ],
    );
    const KD: (f64, [f32; 12]) = (
        0.5088432431221008,
        [
            -0.11650191247463226,
            -0.05658889561891556,
            0.012053733691573143,
            0.16103693842887878,
            -0.012302514165639877,
            -0.03910180181264877,
            0.0515112541615963,
            -0.00010703504085540771,
            0.12379748374223709,
            -0.00511696795001626,
            -0.08674147725105286,
            -0.03193921968340874,
        ],
    );
    const KD2: (f64, [f32; 12]) = (
        1.0228009223937988,
        [
            -0.07097417116165161,
            -0.025504350662231445,
            0.002038246253505349,
            0.09444025903940201,
            -0.0010818338487297297,
            -0.13057944178581238,
            0.018287958577275276,
            0.11337333172559738,
            0.051179684698581696,
            -0.008377790451049805,
            -0.03131069988012314,
            -0.011491203680634499,
        ],
    );

    /// PyTorch computes in f32, we in f64: agreement to a few f32 ulps of the largest value.
    fn assert_matches(got: &LossGrad, want: &(f64, [f32; 12])) {
        assert!(
            (got.loss - want.0).abs() < 1e-6 * want.0.abs().max(1.0),
            "loss {} vs {}",
            got.loss,
            want.0
        );
        for (i, (g, w)) in got.grad.iter().zip(&want.1).enumerate() {
            assert!((g - w).abs() < 2e-7, "grad[{i}] {g} vs {w}");
        }
    }

    #[test]
    fn cross_entropy_matches_pytorch() {
        assert_matches(&cross_entropy(&S, 4, &Y, 0.0).unwrap(), &CE);
        assert_matches(&cross_entropy(&S, 4, &Y, 0.1).unwrap(), &CE_LS);
    }

    #[test]
    fn distillation_matches_pytorch() {
        let kd = KdConfig {
            temperature: 4.0,
            alpha: 0.9,
            label_smoothing: 0.0,
        };
        assert_matches(&distillation(&S, &T, 4, &Y, &kd).unwrap(), &KD);
        let kd2 = KdConfig {
            temperature: 2.0,
            alpha: 0.5,
            label_smoothing: 0.2,
        };
        assert_matches(&distillation(&S, &T, 4, &Y, &kd2).unwrap(), &KD2);
    }

    /// Central differences in f64 around each logit; the step is large enough that f32
    /// rounding of the perturbed logit (~1e-7 relative) stays far below the tolerance.
    fn check_fd(f: impl Fn(&[f32]) -> LossGrad, x: &[f32]) {
        let analytic = f(x).grad;
        let h = 1e-2f32;
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
            xp[i] += h;
            xm[i] -= h;
            let num = (f(&xp).loss - f(&xm).loss) / (xp[i] as f64 - xm[i] as f64);
            assert!(
                (num - analytic[i] as f64).abs() < 1e-4,
                "d/dx[{i}]: numeric {num}, analytic {}",
                analytic[i]
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_fd(|s| cross_entropy(s, 4, &Y, 0.15).unwrap(), &S);
        let kd = KdConfig {
            temperature: 3.0,
            alpha: 0.7,
            label_smoothing: 0.05,
        };
        check_fd(|s| distillation(s, &T, 4, &Y, &kd).unwrap(), &S);
        check_fd(|a| mse(a, &T).unwrap(), &S);
    }

    #[test]
    fn huge_logits_stay_finite() {
        let s = [1e4f32, -1e4, 0.0, 3e4, -3e4, 5.0];
        let l = cross_entropy(&s, 3, &[1, 2], 0.1).unwrap();
        assert!(l.loss.is_finite() && l.grad.iter().all(|g| g.is_finite()));
        let kd = KdConfig {
            temperature: 1.0,
            alpha: 0.5,
            label_smoothing: 0.0,
        };
        let l = distillation(&s, &[-1e4, 1e4, 0.0, 0.0, 0.0, 3e4], 3, &[0, 0], &kd).unwrap();
        assert!(l.loss.is_finite() && l.grad.iter().all(|g| g.is_finite()));
    }

    #[test]
    fn equal_logits_give_zero_distillation_loss() {
        let kd = KdConfig {
            temperature: 4.0,
            alpha: 1.0,
            label_smoothing: 0.0,
        };
        let l = distillation(&S, &S, 4, &Y, &kd).unwrap();
        assert!(l.loss.abs() < 1e-12);
        assert!(l.grad.iter().all(|g| g.abs() < 1e-7));
    }

    #[test]
    fn bad_labels_are_errors_naming_the_sample() {
        let e = cross_entropy(&S, 4, &[3, 4, 0], 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 4 of sample 1"), "{e}");
        assert!(cross_entropy(&S, 4, &[0, 1], 0.0).is_err());
        assert!(cross_entropy(&S, 5, &Y, 0.0).is_err());
    }

    #[test]
    fn mse_and_accuracy() {
        let l = mse(&[1.0, 2.0], &[0.0, 4.0]).unwrap();
        assert_eq!(l.loss, 2.5);
        assert_eq!(l.grad, vec![1.0, -2.0]);
        assert_eq!(argmax_rows(&S, 4), vec![3, 3, 0]);
        assert_eq!(correct(&S, 4, &Y), 2);
    }
}
