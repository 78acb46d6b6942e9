//! Batch normalization over NCHW data: training form (batch statistics) and inference form
//! (running statistics), with gradients for the input, scale and bias.

use rayon::prelude::*;

use super::{for_each_group, group_len, threads};
use crate::engine::simd::multiversion;

/// `n` images of `c` channels with `plane` values per channel (H*W; 1 for 2-D input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnGeom {
    pub n: usize,
    pub c: usize,
    pub plane: usize,
}

impl BnGeom {
    pub fn len(&self) -> usize {
        self.n * self.c * self.plane
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values per channel.
    pub fn count(&self) -> usize {
        self.n * self.plane
    }
}

/// Running `(sum(a), sum(a * (b - shift)))` over the planes of one channel: sixteen f32
/// lanes, flushed into f64 every 1024 values, so long channels keep full precision and tiny
/// planes (4x4 late in a network) do not pay a flush each. With `a == b` and `shift` the mean
/// this is the centred second moment, free of the cancellation of `E[x^2] - E[x]^2`.
#[derive(Default)]
struct Sums {
    lanes: [f32; 16],
    lanes_p: [f32; 16],
    pending: usize,
    total: f64,
    total_p: f64,
}

impl Sums {
    #[inline(always)]
    fn add(&mut self, a: &[f32], b: &[f32], shift: f32) {
        // Lanes in locals (not behind `&mut self`) so they stay in vector registers.
        let (mut acc, mut accp) = (self.lanes, self.lanes_p);
        let (ca, ra) = a.as_chunks::<16>();
        let (cb, rb) = b[..a.len()].as_chunks::<16>();
        for (x, y) in ca.iter().zip(cb) {
            for l in 0..16 {
                acc[l] += x[l];
                accp[l] += x[l] * (y[l] - shift);
            }
        }
        // The tail goes to lane 0: indexing the lanes by a variable would force them into
        // memory and undo the vectorisation of the loop above.
        let (mut t, mut tp) = (0f32, 0f32);
        for (x, y) in ra.iter().zip(rb) {
            t += x;
            tp += x * (y - shift);
        }
        acc[0] += t;
        accp[0] += tp;
        (self.lanes, self.lanes_p) = (acc, accp);
        self.pending += a.len();
        if self.pending >= 1024 {
            self.flush();
        }
    }
    /// Adds `sum((a - shift)^2)` to the product total.
    #[inline(always)]
    fn add_sq_dev(&mut self, a: &[f32], shift: f32) {
        let mut accp = self.lanes_p;
        let (ca, ra) = a.as_chunks::<16>();
        for x in ca {
            for l in 0..16 {
                let d = x[l] - shift;
                accp[l] += d * d;
            }
        }
        let mut tp = 0f32;
        for x in ra {
            let d = x - shift;
            tp += d * d;
        }
        accp[0] += tp;
        self.lanes_p = accp;
        self.pending += a.len();
        if self.pending >= 1024 {
            self.flush();
        }
    }
    // Kept out of line: inlined into `add`, its f64 reduction of the lanes stops LLVM from
    // keeping the lanes in vector registers.
    #[inline(never)]
    fn flush(&mut self) {
        self.total += self.lanes.iter().map(|&v| v as f64).sum::<f64>();
        self.total_p += self.lanes_p.iter().map(|&v| v as f64).sum::<f64>();
        self.lanes = [0.0; 16];
        self.lanes_p = [0.0; 16];
        self.pending = 0;
    }
    fn finish(mut self) -> (f64, f64) {
        self.flush();
        (self.total, self.total_p)
    }
}

/// Per-channel `f(channel) -> T`, channels in parallel, results in channel order.
fn per_channel<T: Send>(g: &BnGeom, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    let min = g.c.div_ceil(threads()).max(1);
    if g.len() < super::PAR_MIN_ELEMS {
        (0..g.c).map(f).collect()
    } else {
        (0..g.c).into_par_iter().with_min_len(min).map(f).collect()
    }
}

multiversion! {
    /// `y = x * scale[c] + shift[c]` for consecutive planes starting at plane `first`.
    fn affine_planes(x: &[f32], first: usize, c: usize, plane: usize, scale: &[f32], shift: &[f32], ys: &mut [f32]) {
        for (i, yp) in ys.chunks_mut(plane).enumerate() {
            let p = first + i;
            let (s, t) = (scale[p % c], shift[p % c]);
            for (o, &v) in yp.iter_mut().zip(&x[p * plane..][..plane]) {
                *o = v * s + t;
            }
        }
    }
}

/// `y = x * scale[c] + shift[c]`.
pub fn affine(g: &BnGeom, x: &[f32], scale: &[f32], shift: &[f32], y: &mut [f32]) {
    let group = group_len(g.n * g.c, g.plane);
    for_each_group(y, g.plane, group, |first, ys| {
        affine_planes(x, first, g.c, g.plane, scale, shift, ys)
    });
}

multiversion! {
    /// Mean and biased variance of channel `ch`: two passes, the mean then squared deviations.
    fn channel_moments(x: &[f32], n: usize, c: usize, plane: usize, ch: usize) -> (f64, f64) {
        let m = (n * plane) as f64;
        let mut acc = Sums::default();
        for i in 0..n {
            let p = &x[(i * c + ch) * plane..][..plane];
            acc.add(p, p, 0.0);
        }
        let mu = acc.finish().0 / m;
        let mut acc = Sums::default();
        for i in 0..n {
            acc.add_sq_dev(&x[(i * c + ch) * plane..][..plane], mu as f32);
        }
        // Centred on the f32 mean, off the exact one by `d`: subtract the `d^2` this adds.
        let d = mu as f32 as f64 - mu;
        (mu, (acc.finish().1 / m - d * d).max(0.0))
    }
}

multiversion! {
    /// `(sum(dy), sum(dy * (x - mean)))` of channel `ch`.
    fn channel_grad_sums(x: &[f32], dy: &[f32], n: usize, c: usize, plane: usize, ch: usize, mean: f32) -> (f64, f64) {
        let mut acc = Sums::default();
        for i in 0..n {
            let o = (i * c + ch) * plane;
            acc.add(&dy[o..][..plane], &x[o..][..plane], mean);
        }
        acc.finish()
    }
}

/// Batch mean and biased variance of each channel.
pub fn batch_stats(g: &BnGeom, x: &[f32], mean: &mut [f32], var: &mut [f32]) {
    let stats = per_channel(g, |ch| channel_moments(x, g.n, g.c, g.plane, ch));
    for (ch, (mu, v)) in stats.into_iter().enumerate() {
        mean[ch] = mu as f32;
        var[ch] = v as f32;
    }
}

/// Training-mode forward: normalises with the batch statistics, which it also returns
/// (`mean`, biased `var`, and `invstd = 1/sqrt(var + eps)` for the backward pass).
#[allow(clippy::too_many_arguments)]
pub fn train_forward(
    g: &BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    var: &mut [f32],
    invstd: &mut [f32],
) {
    batch_stats(g, x, mean, var);
    let mut scale = vec![0.0; g.c];
    let mut shift = vec![0.0; g.c];
    for ch in 0..g.c {
        invstd[ch] = (1.0 / (var[ch] as f64 + eps as f64).sqrt()) as f32;
        scale[ch] = gamma[ch] * invstd[ch];
        shift[ch] = beta[ch] - mean[ch] * scale[ch];
    }
    affine(g, x, &scale, &shift, y);
}

/// Folds running statistics into a per-channel `scale` and `shift`.
pub fn eval_coefficients(
    gamma: &[f32],
    beta: &[f32],
    rmean: &[f32],
    rvar: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .iter()
        .zip(rvar)
        .map(|(&gm, &v)| (gm as f64 / (v as f64 + eps as f64).sqrt()) as f32)
        .collect();
    let shift = beta
        .iter()
        .zip(rmean)
        .zip(&scale)
        .map(|((&b, &m), &s)| b - m * s)
        .collect();
    (scale, shift)
}

/// Inference-mode forward with running statistics.
pub fn eval_forward(
    g: &BnGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rmean: &[f32],
    rvar: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    let (scale, shift) = eval_coefficients(gamma, beta, rmean, rvar, eps);
    affine(g, x, &scale, &shift, y);
}

/// Per channel: `(sum(dy), sum(dy * (x - mean)))`.
fn grad_sums(g: &BnGeom, x: &[f32], dy: &[f32], mean: &[f32]) -> Vec<(f64, f64)> {
    // The shift is the f32 mean, which is what the backward formula uses.
    per_channel(g, |ch| {
        channel_grad_sums(x, dy, g.n, g.c, g.plane, ch, mean[ch])
    })
}

/// Training-mode gradients (batch statistics are functions of `x`). `dgamma`, `dbeta` and
/// `dx` (when asked for) are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn train_backward(
    g: &BnGeom,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let sums = grad_sums(g, x, dy, mean);
    let m = g.count() as f64;
    // dx = gamma*invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = a*dy + b*x + c per channel.
    let mut ka = vec![0f32; g.c];
    let mut kb = vec![0f32; g.c];
    let mut kc = vec![0f32; g.c];
    for ch in 0..g.c {
        let (sdy, sdyxc) = sums[ch];
        let inv = invstd[ch] as f64;
        dbeta[ch] = sdy as f32;
        dgamma[ch] = (sdyxc * inv) as f32;
        let gi = gamma[ch] as f64 * inv;
        let mdx = sdyxc * inv / m;
        ka[ch] = gi as f32;
        kb[ch] = (-gi * inv * mdx) as f32;
        kc[ch] = (gi * (-sdy / m + mean[ch] as f64 * inv * mdx)) as f32;
    }
    if let Some(dx) = dx {
        let group = group_len(g.n * g.c, g.plane);
        for_each_group(dx, g.plane, group, |first, dxs| {
            dx_planes(x, dy, first, g.c, g.plane, &ka, &kb, &kc, dxs)
        });
    }
}

multiversion! {
    /// `dx = a[c] * dy + b[c] * x + k[c]` for consecutive planes starting at plane `first`.
    #[allow(clippy::too_many_arguments)]
    fn dx_planes(x: &[f32], dy: &[f32], first: usize, c: usize, plane: usize, ka: &[f32], kb: &[f32], kc: &[f32], dxs: &mut [f32]) {
        for (i, dp) in dxs.chunks_mut(plane).enumerate() {
            let p = first + i;
            let (a, b, k) = (ka[p % c], kb[p % c], kc[p % c]);
            let o = p * plane;
            for ((d, &gv), &xv) in dp.iter_mut().zip(&dy[o..][..plane]).zip(&x[o..][..plane]) {
                *d = a * gv + b * xv + k;
            }
        }
    }
}

/// Inference-mode gradients (running statistics are constants).
#[allow(clippy::too_many_arguments)]
pub fn eval_backward(
    g: &BnGeom,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    rmean: &[f32],
    rvar: &[f32],
    eps: f32,
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let sums = grad_sums(g, x, dy, rmean);
    let mut scale = vec![0f32; g.c];
    for ch in 0..g.c {
        let inv = 1.0 / (rvar[ch] as f64 + eps as f64).sqrt();
        dbeta[ch] = sums[ch].0 as f32;
        dgamma[ch] = (sums[ch].1 * inv) as f32;
        scale[ch] = (gamma[ch] as f64 * inv) as f32;
    }
    if let Some(dx) = dx {
        affine(g, dy, &scale, &vec![0.0; g.c], dx);
    }
}

/// Running-statistics update with the ONNX convention `running = momentum * running +
/// (1 - momentum) * batch`; the variance fed in is unbiased (`var * m / (m - 1)`), as PyTorch
/// does.
pub fn update_running(
    g: &BnGeom,
    momentum: f32,
    mean: &[f32],
    var: &[f32],
    rmean: &mut [f32],
    rvar: &mut [f32],
) {
    let m = g.count() as f64;
    let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
    let mo = momentum as f64;
    for ch in 0..g.c {
        rmean[ch] = (mo * rmean[ch] as f64 + (1.0 - mo) * mean[ch] as f64) as f32;
        rvar[ch] = (mo * rvar[ch] as f64 + (1.0 - mo) * var[ch] as f64 * unbias) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    fn naive_train(g: &BnGeom, x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
        let mut y = vec![0.0; g.len()];
        for ch in 0..g.c {
            let idx: Vec<usize> = (0..g.n)
                .flat_map(|i| (0..g.plane).map(move |k| (i * g.c + ch) * g.plane + k))
                .collect();
            let m = idx.len() as f64;
            let mu = idx.iter().map(|&i| x[i]).sum::<f64>() / m;
            let var = idx.iter().map(|&i| (x[i] - mu).powi(2)).sum::<f64>() / m;
            for &i in &idx {
                y[i] = (x[i] - mu) / (var + eps).sqrt() * gamma[ch] + beta[ch];
            }
        }
        y
    }

    fn naive_eval(
        g: &BnGeom,
        x: &[f64],
        gamma: &[f64],
        beta: &[f64],
        rm: &[f64],
        rv: &[f64],
        eps: f64,
    ) -> Vec<f64> {
        (0..g.len())
            .map(|i| {
                let ch = (i / g.plane) % g.c;
                (x[i] - rm[ch]) / (rv[ch] + eps).sqrt() * gamma[ch] + beta[ch]
            })
            .collect()
    }

    fn check(g: BnGeom, seed: u64) {
        let mut r = rng(seed);
        let x: Vec<f32> = rand_vec(&mut r, g.len())
            .iter()
            .map(|v| v * 3.0 + 0.5)
            .collect();
        let gamma = rand_vec(&mut r, g.c);
        let beta = rand_vec(&mut r, g.c);
        let rm = rand_vec(&mut r, g.c);
        let rv: Vec<f32> = rand_vec(&mut r, g.c)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect();
        let dy = rand_vec(&mut r, g.len());
        let eps = 1e-5;
        let (mut y, mut mean, mut var, mut inv) = (
            vec![0.0; g.len()],
            vec![0.0; g.c],
            vec![0.0; g.c],
            vec![0.0; g.c],
        );
        train_forward(
            &g, &x, &gamma, &beta, eps, &mut y, &mut mean, &mut var, &mut inv,
        );
        let want = naive_train(&g, &f64s(&x), &f64s(&gamma), &f64s(&beta), eps as f64);
        assert_close(&y, &want, 1e-4, 1e-4, "bn train forward");
        let (mut dx, mut dg, mut db) = (vec![0.0; g.len()], vec![0.0; g.c], vec![0.0; g.c]);
        train_backward(
            &g,
            &x,
            &dy,
            &gamma,
            &mean,
            &inv,
            Some(&mut dx),
            &mut dg,
            &mut db,
        );
        let fx = numeric_grad(
            |xv| naive_train(&g, xv, &f64s(&gamma), &f64s(&beta), eps as f64),
            &x,
            &dy,
        );
        let fg = numeric_grad(
            |gv| naive_train(&g, &f64s(&x), gv, &f64s(&beta), eps as f64),
            &gamma,
            &dy,
        );
        let fb = numeric_grad(
            |bv| naive_train(&g, &f64s(&x), &f64s(&gamma), bv, eps as f64),
            &beta,
            &dy,
        );
        // When a channel has one value per batch its output is constant, so dx is ~0 and the
        // finite difference is dominated by rounding: compare absolutely.
        assert_close(&dx, &fx, 2e-4, 1e-3, "bn train dx");
        assert_close(&dg, &fg, 1e-4, 1e-4, "bn train dgamma");
        assert_close(&db, &fb, 1e-4, 1e-4, "bn train dbeta");

        eval_forward(&g, &x, &gamma, &beta, &rm, &rv, eps, &mut y);
        let ev = |xv: &[f64], gv: &[f64], bv: &[f64]| {
            naive_eval(&g, xv, gv, bv, &f64s(&rm), &f64s(&rv), eps as f64)
        };
        assert_close(
            &y,
            &ev(&f64s(&x), &f64s(&gamma), &f64s(&beta)),
            1e-5,
            1e-5,
            "bn eval forward",
        );
        eval_backward(
            &g,
            &x,
            &dy,
            &gamma,
            &rm,
            &rv,
            eps,
            Some(&mut dx),
            &mut dg,
            &mut db,
        );
        assert_close(
            &dx,
            &numeric_grad(|xv| ev(xv, &f64s(&gamma), &f64s(&beta)), &x, &dy),
            1e-4,
            1e-4,
            "bn eval dx",
        );
        assert_close(
            &dg,
            &numeric_grad(|gv| ev(&f64s(&x), gv, &f64s(&beta)), &gamma, &dy),
            1e-4,
            1e-4,
            "bn eval dgamma",
        );
        assert_close(
            &db,
            &numeric_grad(|bv| ev(&f64s(&x), &f64s(&gamma), bv), &beta, &dy),
            1e-4,
            1e-4,
            "bn eval dbeta",
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_naive_and_finite_differences(n in 1usize..4, c in 1usize..5, plane in 1usize..10, seed in any::<u64>()) {
            prop_assume!(n * plane > 1);
            check(BnGeom { n, c, plane }, seed);
        }
    }

    #[test]
    fn parallel_path() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            check(
                BnGeom {
                    n: 3,
                    c: 5,
                    plane: 40,
                },
                9,
            )
        });
        // Large enough for channels in parallel; compare forward only (finite differences
        // over 40k inputs would be slow) against the single-thread result bit for bit.
        let g = BnGeom {
            n: 8,
            c: 16,
            plane: 300,
        };
        let mut r = rng(1);
        let x = rand_vec(&mut r, g.len());
        let run = || {
            let (mut y, mut m, mut v, mut i) = (
                vec![0.0; g.len()],
                vec![0.0; g.c],
                vec![0.0; g.c],
                vec![0.0; g.c],
            );
            train_forward(
                &g,
                &x,
                &vec![1.0; g.c],
                &vec![0.0; g.c],
                1e-5,
                &mut y,
                &mut m,
                &mut v,
                &mut i,
            );
            y
        };
        assert_eq!(pool.install(run), run());
    }

    #[test]
    fn running_update_uses_unbiased_variance() {
        let g = BnGeom {
            n: 2,
            c: 1,
            plane: 2,
        };
        let (mut rm, mut rv) = (vec![1.0], vec![1.0]);
        update_running(&g, 0.9, &[2.0], &[3.0], &mut rm, &mut rv);
        assert!((rm[0] - 1.1).abs() < 1e-6);
        assert!((rv[0] - (0.9 + 0.1 * 4.0)).abs() < 1e-6);
    }
}
