//! Softmax and LogSoftmax along one axis, seen as `outer x len x inner`.

/// Geometry of a softmax: `outer` blocks of `len` values along the axis, `inner` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftmaxGeom {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

fn lanes(g: &SoftmaxGeom) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..g.outer).flat_map(move |o| (0..g.inner).map(move |i| (o * g.len * g.inner + i, g.inner)))
}

/// `y = softmax(x)` or, with `log`, `y = log_softmax(x)`.
pub fn forward(g: &SoftmaxGeom, log: bool, x: &[f32], y: &mut [f32]) {
    for (base, st) in lanes(g) {
        let at = |k: usize| base + k * st;
        let mx = (0..g.len)
            .map(|k| x[at(k)])
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = (0..g.len).map(|k| ((x[at(k)] - mx) as f64).exp()).sum();
        if log {
            let ls = sum.ln() as f32;
            for k in 0..g.len {
                y[at(k)] = x[at(k)] - mx - ls;
            }
        } else {
            let inv = 1.0 / sum;
            for k in 0..g.len {
                y[at(k)] = (((x[at(k)] - mx) as f64).exp() * inv) as f32;
            }
        }
    }
}

/// Gradient from the output `y`: softmax `dx = y * (dy - sum(dy * y))`, log-softmax
/// `dx = dy - exp(y) * sum(dy)`. `dx` is overwritten.
pub fn backward(g: &SoftmaxGeom, log: bool, y: &[f32], dy: &[f32], dx: &mut [f32]) {
    for (base, st) in lanes(g) {
        let at = |k: usize| base + k * st;
        if log {
            let s: f64 = (0..g.len).map(|k| dy[at(k)] as f64).sum();
            for k in 0..g.len {
                dx[at(k)] = (dy[at(k)] as f64 - (y[at(k)] as f64).exp() * s) as f32;
            }
        } else {
            let s: f64 = (0..g.len).map(|k| dy[at(k)] as f64 * y[at(k)] as f64).sum();
            for k in 0..g.len {
                dx[at(k)] = (y[at(k)] as f64 * (dy[at(k)] as f64 - s)) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    fn naive(g: &SoftmaxGeom, log: bool, x: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for o in 0..g.outer {
            for i in 0..g.inner {
                let idx: Vec<usize> = (0..g.len).map(|k| (o * g.len + k) * g.inner + i).collect();
                let z: f64 = idx.iter().map(|&j| x[j].exp()).sum();
                for &j in &idx {
                    y[j] = if log { x[j] - z.ln() } else { x[j].exp() / z };
                }
            }
        }
        y
    }

    proptest! {
        #[test]
        fn matches_naive_and_finite_differences(outer in 1usize..4, len in 1usize..6, inner in 1usize..4, log: bool, seed in any::<u64>()) {
            let g = SoftmaxGeom { outer, len, inner };
            let mut r = rng(seed);
            let x: Vec<f32> = rand_vec(&mut r, outer * len * inner).iter().map(|v| v * 5.0).collect();
            let dy = rand_vec(&mut r, x.len());
            let mut y = vec![f32::NAN; x.len()];
            forward(&g, log, &x, &mut y);
            assert_close(&y, &naive(&g, log, &f64s(&x)), 1e-6, 1e-5, "softmax");
            let mut dx = vec![f32::NAN; x.len()];
            backward(&g, log, &y, &dy, &mut dx);
            assert_close(&dx, &numeric_grad(|v| naive(&g, log, v), &x, &dy), 1e-4, 1e-4, "softmax dx");
        }
    }
}
