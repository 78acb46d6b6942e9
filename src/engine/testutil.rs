//! Helpers shared by the engine's tests: seeded data, tolerant comparison and numeric
//! gradients of f64 reference implementations.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1).
pub fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Asserts `|got - want| <= atol + rtol * |want|` element-wise.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            g as f64 == w || (err <= atol + rtol * w.abs() && g.is_finite() == w.is_finite()),
            "{what}: element {i}: got {g}, want {w} (|diff| {err:e} > {atol:e} + {rtol:e}*|want|)"
        );
    }
}

/// Gradient of `sum(dy * f(x))` with respect to `x` by central differences on an f64
/// reference `f` (step 1e-6, so f64 rounding stays far below the tolerances used).
pub fn numeric_grad(f: impl Fn(&[f64]) -> Vec<f64>, x: &[f32], dy: &[f32]) -> Vec<f64> {
    let h = 1e-6;
    let mut xs = f64s(x);
    let dy = f64s(dy);
    let mut g = vec![0.0; x.len()];
    for i in 0..x.len() {
        let keep = xs[i];
        xs[i] = keep + h;
        let up: f64 = f(&xs).iter().zip(&dy).map(|(a, b)| a * b).sum();
        xs[i] = keep - h;
        let down: f64 = f(&xs).iter().zip(&dy).map(|(a, b)| a * b).sum();
        xs[i] = keep;
        g[i] = (up - down) / (2.0 * h);
    }
    g
}
