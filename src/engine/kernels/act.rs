//! Element-wise activations and their derivatives.

use super::{map_into, zip_into};
use crate::engine::simd::multiversion;

/// An element-wise activation with its attributes resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    Relu,
    /// `min(max(x, lo), hi)`; ReLU6 is `Clip { lo: 0, hi: 6 }`.
    Clip {
        lo: f32,
        hi: f32,
    },
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    /// `max(0, min(1, alpha * x + beta))`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * max(0, min(1, x / 6 + 1/2))`.
    HardSwish,
    Tanh,
}

impl Act {
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::Relu => {
                if v > 0.0 {
                    v
                } else {
                    0.0
                }
            }
            Act::Clip { lo, hi } => v.max(lo).min(hi),
            Act::LeakyRelu { alpha } => {
                if v > 0.0 {
                    v
                } else {
                    alpha * v
                }
            }
            Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Act::HardSigmoid { alpha, beta } => (alpha * v + beta).clamp(0.0, 1.0),
            Act::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
            Act::Tanh => v.tanh(),
        }
    }

    /// Derivative at input `x` with output `y`. At the kinks the derivative follows PyTorch:
    /// zero at ReLU's 0 and at Clip's bounds (hardtanh), HardSwish's slope at +-3 as PyTorch's
    /// `hardswish_backward`.
    #[inline(always)]
    pub fn derivative(self, x: f32, y: f32) -> f32 {
        match self {
            Act::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Clip { lo, hi } => {
                if x > lo && x < hi {
                    1.0
                } else {
                    0.0
                }
            }
            Act::LeakyRelu { alpha } => {
                if x > 0.0 {
                    1.0
                } else {
                    alpha
                }
            }
            Act::Sigmoid => y * (1.0 - y),
            Act::HardSigmoid { alpha, beta } => {
                let t = alpha * x + beta;
                if t > 0.0 && t < 1.0 {
                    alpha
                } else {
                    0.0
                }
            }
            Act::HardSwish => {
                if x < -3.0 {
                    0.0
                } else if x <= 3.0 {
                    x / 3.0 + 0.5
                } else {
                    1.0
                }
            }
            Act::Tanh => 1.0 - y * y,
        }
    }
}

multiversion! {
    fn forward_chunk(act: Act, x: &[f32], y: &mut [f32]) {
        // One loop per variant so each inner loop is branch-free on the variant and vectorises.
        macro_rules! run {
            ($a:expr) => {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = $a.apply(v);
                }
            };
        }
        match act {
            Act::Relu => run!(Act::Relu),
            Act::Clip { lo, hi } => run!(Act::Clip { lo, hi }),
            Act::LeakyRelu { alpha } => run!(Act::LeakyRelu { alpha }),
            Act::Sigmoid => run!(Act::Sigmoid),
            Act::HardSigmoid { alpha, beta } => run!(Act::HardSigmoid { alpha, beta }),
            Act::HardSwish => run!(Act::HardSwish),
            Act::Tanh => run!(Act::Tanh),
        }
    }
}

multiversion! {
    fn backward_chunk(act: Act, x: &[f32], y: &[f32], g: &mut [f32]) {
        macro_rules! run {
            ($a:expr) => {
                for ((d, &xv), &yv) in g.iter_mut().zip(x).zip(y) {
                    *d *= $a.derivative(xv, yv);
                }
            };
        }
        match act {
            Act::Relu => run!(Act::Relu),
            Act::Clip { lo, hi } => run!(Act::Clip { lo, hi }),
            Act::LeakyRelu { alpha } => run!(Act::LeakyRelu { alpha }),
            Act::Sigmoid => run!(Act::Sigmoid),
            Act::HardSigmoid { alpha, beta } => run!(Act::HardSigmoid { alpha, beta }),
            Act::HardSwish => run!(Act::HardSwish),
            Act::Tanh => run!(Act::Tanh),
        }
    }
}

/// `y = act(x)`.
pub fn forward(act: Act, x: &[f32], y: &mut [f32]) {
    map_into(x, y, |x, y| forward_chunk(act, x, y));
}

/// `g = g * act'(x)` in place: `g` holds the output gradient and becomes the input gradient.
pub fn backward_in_place(act: Act, x: &[f32], y: &[f32], g: &mut [f32]) {
    debug_assert!(x.len() == g.len() && y.len() == g.len());
    zip_into(x, y, g, |x, y, g| backward_chunk(act, x, y, g));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    /// The textbook definitions in f64.
    fn naive(act: Act, v: f64) -> f64 {
        match act {
            Act::Relu => v.max(0.0),
            Act::Clip { lo, hi } => v.max(lo as f64).min(hi as f64),
            Act::LeakyRelu { alpha } => {
                if v >= 0.0 {
                    v
                } else {
                    alpha as f64 * v
                }
            }
            Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Act::HardSigmoid { alpha, beta } => (alpha as f64 * v + beta as f64).clamp(0.0, 1.0),
            Act::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
            Act::Tanh => v.tanh(),
        }
    }

    fn all() -> Vec<Act> {
        vec![
            Act::Relu,
            Act::Clip { lo: 0.0, hi: 6.0 },
            Act::Clip { lo: -0.5, hi: 0.25 },
            Act::LeakyRelu { alpha: 0.1 },
            Act::Sigmoid,
            Act::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            Act::HardSwish,
            Act::Tanh,
        ]
    }

    proptest! {
        #[test]
        fn forward_matches_naive(len in 0usize..300, seed in any::<u64>()) {
            let mut r = rng(seed);
            let x: Vec<f32> = rand_vec(&mut r, len).iter().map(|v| v * 8.0).collect();
            for act in all() {
                let mut y = vec![f32::NAN; len];
                forward(act, &x, &mut y);
                let want: Vec<f64> = x.iter().map(|&v| naive(act, v as f64)).collect();
                assert_close(&y, &want, 1e-6, 1e-6, &format!("{act:?}"));
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut r = rng(5);
        // Large enough to take the parallel path; values away from the kinks.
        let x: Vec<f32> = rand_vec(&mut r, 40_000)
            .iter()
            .map(|v| v * 8.0)
            .map(|v| {
                if [-3.0f32, 0.0, 0.25, -0.5, 3.0, 6.0, -2.5, 2.5]
                    .iter()
                    .any(|k| (v - k).abs() < 1e-3)
                {
                    v + 0.01
                } else {
                    v
                }
            })
            .collect();
        let dy = rand_vec(&mut r, x.len());
        for act in all() {
            let mut y = vec![0.0; x.len()];
            forward(act, &x, &mut y);
            let mut g = dy.clone();
            backward_in_place(act, &x, &y, &mut g);
            // The reference is element-wise, so one numeric derivative per element suffices.
            let want: Vec<f64> = x
                .iter()
                .zip(&dy)
                .map(|(&v, &d)| {
                    d as f64 * (naive(act, v as f64 + 1e-6) - naive(act, v as f64 - 1e-6)) / 2e-6
                })
                .collect();
            assert_close(&g, &want, 1e-5, 1e-4, &format!("{act:?} gradient"));
        }
    }
}
