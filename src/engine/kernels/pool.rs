//! Max and average pooling over NCHW planes (overlapping windows, padding, ceil mode) and
//! global average pooling.

use rayon::prelude::*;

use super::window::Phased;
use super::{for_each_group, group_len};
use crate::engine::simd::multiversion;

/// Resolved pooling window over `n * c` planes of `h x w`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub pt: usize,
    pub pl: usize,
    pub pb: usize,
    pub pr: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    pub fn planes(&self) -> usize {
        self.n * self.c
    }
    pub fn in_plane(&self) -> usize {
        self.h * self.w
    }
    pub fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
}

/// Max over each window; `argmax` receives the index within the input plane of the first
/// maximum in window order (PyTorch's tie rule), which the backward pass routes the gradient
/// to. Works on stride-phase runs (see `window::Phased`) so the inner loops vectorise.
pub fn max_forward(g: &PoolGeom, x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
    let (ohw, ihw) = (g.out_plane(), g.in_plane());
    let ph = Phased::new(
        g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.pt, g.pl,
    );
    let group = group_len(g.planes(), ohw * g.kh * g.kw);
    // Non-overlapping windows without padding (2x2 stride 2 and the like) read each input
    // once; the phase layout would only add copies.
    let tiled = g.kh == g.sh
        && g.kw == g.sw
        && g.dh == 1
        && g.dw == 1
        && g.pt == 0
        && g.pl == 0
        && g.oh * g.kh <= g.h
        && g.ow * g.kw <= g.w;
    let run_group = |first: usize, ys: &mut [f32], am: &mut [u32]| {
        if tiled {
            for (i, (yp, ap)) in ys.chunks_mut(ohw).zip(am.chunks_mut(ohw)).enumerate() {
                max_plane_tiled(g, &x[(first + i) * ihw..][..ihw], yp, ap);
            }
            return;
        }
        let mut q = vec![0.0; ph.len()];
        let mut best = vec![0.0; ph.run()];
        let mut tap = vec![0u32; ph.run()];
        for (i, (yp, ap)) in ys.chunks_mut(ohw).zip(am.chunks_mut(ohw)).enumerate() {
            max_plane(
                g,
                &ph,
                &mut q,
                &mut best,
                &mut tap,
                &x[(first + i) * ihw..][..ihw],
                yp,
                ap,
            );
        }
    };
    let chunk = (ohw * group).max(1);
    if y.len() <= chunk {
        run_group(0, y, argmax);
    } else {
        y.par_chunks_mut(chunk)
            .zip(argmax.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(i, (ys, am))| run_group(i * group, ys, am));
    }
}

multiversion! {
    fn max_plane_tiled(g: &PoolGeom, x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let first = oy * g.kh * g.w + ox * g.kw;
                let (mut best, mut at) = (x[first], first);
                for ky in 0..g.kh {
                    let row = (oy * g.kh + ky) * g.w + ox * g.kw;
                    for (kx, &v) in x[row..row + g.kw].iter().enumerate() {
                        if v > best {
                            best = v;
                            at = row + kx;
                        }
                    }
                }
                y[oy * g.ow + ox] = best;
                argmax[oy * g.ow + ox] = at as u32;
            }
        }
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn max_plane(g: &PoolGeom, ph: &Phased, q: &mut [f32], best: &mut [f32], tap: &mut [u32], x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
        let pl = ph.phase_len();
        ph.scatter_input(x, q, f32::NEG_INFINITY);
        let (p0, o0) = ph.taps[0];
        best.copy_from_slice(&q[p0 * pl + o0..][..ph.run()]);
        tap.fill(0);
        for (t, &(phase, off)) in ph.taps.iter().enumerate().skip(1) {
            for ((b, k), &v) in best.iter_mut().zip(tap.iter_mut()).zip(&q[phase * pl + off..][..ph.run()]) {
                if v > *b {
                    *b = v;
                    *k = t as u32;
                }
            }
        }
        ph.extract(best, y);
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let (ro, co) = ph.tap_rc[tap[oy * ph.qw + ox] as usize];
                let (r, c) = ((oy * g.sh) as isize + ro, (ox * g.sw) as isize + co);
                argmax[oy * g.ow + ox] = if r >= 0 && c >= 0 && (r as usize) < g.h && (c as usize) < g.w { (r as usize * g.w + c as usize) as u32 } else { u32::MAX };
            }
        }
    }
}

/// Routes each output gradient to its window's maximum; `dx` is overwritten.
pub fn max_backward(g: &PoolGeom, dy: &[f32], argmax: &[u32], dx: &mut [f32]) {
    let (ohw, ihw) = (g.out_plane(), g.in_plane());
    let group = group_len(g.planes(), ohw + ihw);
    for_each_group(dx, ihw, group, |first, dxs| {
        for (i, dp) in dxs.chunks_mut(ihw).enumerate() {
            dp.fill(0.0);
            let p = first + i;
            for (&d, &a) in dy[p * ohw..][..ohw].iter().zip(&argmax[p * ohw..][..ohw]) {
                if let Some(t) = dp.get_mut(a as usize) {
                    *t += d;
                }
            }
        }
    });
}

/// Window bounds along one axis: the clipped input range and the divisor's extent when
/// padding counts (window clipped to the padded input, as PyTorch and ONNX Runtime do).
#[inline]
fn bounds(o: usize, s: usize, k: usize, p0: usize, p1: usize, n: usize) -> (usize, usize, usize) {
    let start = (o * s) as isize - p0 as isize;
    let end_padded = (start + k as isize).min((n + p1) as isize);
    let padded_len = (end_padded - start) as usize;
    let lo = start.max(0) as usize;
    let hi = (start + k as isize).min(n as isize).max(0) as usize;
    (lo, hi.max(lo), padded_len)
}

fn avg_divisor(
    g: &PoolGeom,
    oy: usize,
    ox: usize,
    count_include_pad: bool,
) -> (usize, usize, usize, usize, f32) {
    let (y0, y1, ph) = bounds(oy, g.sh, g.kh, g.pt, g.pb, g.h);
    let (x0, x1, pw) = bounds(ox, g.sw, g.kw, g.pl, g.pr, g.w);
    let count = if count_include_pad {
        ph * pw
    } else {
        (y1 - y0) * (x1 - x0)
    };
    (y0, y1, x0, x1, 1.0 / count.max(1) as f32)
}

/// Average over each window (no dilation); `count_include_pad` divides by the window size
/// clipped to the padded input, otherwise by the number of real inputs in the window.
pub fn avg_forward(g: &PoolGeom, count_include_pad: bool, x: &[f32], y: &mut [f32]) {
    let (ohw, ihw) = (g.out_plane(), g.in_plane());
    let group = group_len(g.planes(), ohw * g.kh * g.kw);
    for_each_group(y, ohw, group, |first, ys| {
        for (i, yp) in ys.chunks_mut(ohw).enumerate() {
            let xp = &x[(first + i) * ihw..][..ihw];
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let (y0, y1, x0, x1, inv) = avg_divisor(g, oy, ox, count_include_pad);
                    let mut s = 0f32;
                    for iy in y0..y1 {
                        for v in &xp[iy * g.w + x0..iy * g.w + x1] {
                            s += v;
                        }
                    }
                    yp[oy * g.ow + ox] = s * inv;
                }
            }
        }
    });
}

/// Spreads each output gradient evenly over its window; `dx` is overwritten.
pub fn avg_backward(g: &PoolGeom, count_include_pad: bool, dy: &[f32], dx: &mut [f32]) {
    let (ohw, ihw) = (g.out_plane(), g.in_plane());
    let group = group_len(g.planes(), ohw * g.kh * g.kw);
    for_each_group(dx, ihw, group, |first, dxs| {
        for (i, dp) in dxs.chunks_mut(ihw).enumerate() {
            dp.fill(0.0);
            let dyp = &dy[(first + i) * ohw..][..ohw];
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let (y0, y1, x0, x1, inv) = avg_divisor(g, oy, ox, count_include_pad);
                    let d = dyp[oy * g.ow + ox] * inv;
                    for iy in y0..y1 {
                        for v in &mut dp[iy * g.w + x0..iy * g.w + x1] {
                            *v += d;
                        }
                    }
                }
            }
        }
    });
}

/// Mean of each of `planes` planes of `plane` values.
pub fn global_avg_forward(planes: usize, plane: usize, x: &[f32], y: &mut [f32]) {
    let inv = 1.0 / plane.max(1) as f64;
    let group = group_len(planes, plane);
    for_each_group(y, 1, group, |first, ys| {
        for (i, o) in ys.iter_mut().enumerate() {
            *o = (super::sum_f64(&x[(first + i) * plane..][..plane]) * inv) as f32;
        }
    });
}

pub fn global_avg_backward(planes: usize, plane: usize, dy: &[f32], dx: &mut [f32]) {
    let inv = 1.0 / plane.max(1) as f32;
    let group = group_len(planes, plane);
    for_each_group(dx, plane, group, |first, dxs| {
        for (i, dp) in dxs.chunks_mut(plane).enumerate() {
            dp.fill(dy[first + i] * inv);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    fn window_out(
        n: usize,
        k: usize,
        s: usize,
        d: usize,
        p0: usize,
        p1: usize,
        ceil: bool,
    ) -> Option<usize> {
        let eff = (k - 1) * d + 1;
        let span = n + p0 + p1;
        if span < eff {
            return None;
        }
        Some(if ceil {
            let o = (span - eff).div_ceil(s) + 1;
            if (o - 1) * s >= n + p0 {
                o - 1
            } else {
                o
            }
        } else {
            (span - eff) / s + 1
        })
    }

    fn naive_max(g: &PoolGeom, x: &[f64]) -> Vec<f64> {
        let mut y = vec![f64::NEG_INFINITY; g.planes() * g.out_plane()];
        for p in 0..g.planes() {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let iy = (oy * g.sh + ky * g.dh) as isize - g.pt as isize;
                            let ix = (ox * g.sw + kx * g.dw) as isize - g.pl as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                let v = x[p * g.in_plane() + iy as usize * g.w + ix as usize];
                                let o = &mut y[p * g.out_plane() + oy * g.ow + ox];
                                *o = o.max(v);
                            }
                        }
                    }
                }
            }
        }
        y
    }

    /// PyTorch's avg_pool2d definition, written out.
    fn naive_avg(g: &PoolGeom, x: &[f64], include: bool) -> Vec<f64> {
        let mut y = vec![0.0; g.planes() * g.out_plane()];
        for p in 0..g.planes() {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let hs = (oy * g.sh) as isize - g.pt as isize;
                    let ws = (ox * g.sw) as isize - g.pl as isize;
                    let he = (hs + g.kh as isize).min((g.h + g.pb) as isize);
                    let we = (ws + g.kw as isize).min((g.w + g.pr) as isize);
                    let pool = (he - hs) * (we - ws);
                    let (hs, ws) = (hs.max(0), ws.max(0));
                    let (he, we) = (he.min(g.h as isize), we.min(g.w as isize));
                    let mut s = 0.0;
                    let mut cnt = 0;
                    for iy in hs..he {
                        for ix in ws..we {
                            s += x[p * g.in_plane() + iy as usize * g.w + ix as usize];
                            cnt += 1;
                        }
                    }
                    y[p * g.out_plane() + oy * g.ow + ox] = s / if include {
                        pool as f64
                    } else {
                        cnt.max(1) as f64
                    };
                }
            }
        }
        y
    }

    fn strategy() -> impl Strategy<Value = (PoolGeom, bool)> {
        (
            (1usize..3, 1usize..4, 1usize..9, 1usize..9),
            (1usize..4, 1usize..4, 1usize..3, 1usize..3, 1usize..3),
            (0usize..2, 0usize..2, 0usize..2, 0usize..2, any::<bool>()),
        )
            .prop_filter_map(
                "window does not fit",
                |((n, c, h, w), (kh, kw, sh, sw, d), (pt, pl, pb, pr, ceil))| {
                    // ONNX and PyTorch require pads smaller than the kernel.
                    if pt >= kh || pb >= kh || pl >= kw || pr >= kw {
                        return None;
                    }
                    let oh = window_out(h, kh, sh, d, pt, pb, ceil)?;
                    let ow = window_out(w, kw, sw, d, pl, pr, ceil)?;
                    Some((
                        PoolGeom {
                            n,
                            c,
                            h,
                            w,
                            kh,
                            kw,
                            sh,
                            sw,
                            dh: d,
                            dw: d,
                            pt,
                            pl,
                            pb,
                            pr,
                            oh,
                            ow,
                        },
                        ceil,
                    ))
                },
            )
    }

    proptest! {
        #[test]
        fn max_matches_naive_and_finite_differences((g, _ceil) in strategy(), seed in any::<u64>()) {
            // Windows lying wholly in padding have no maximum; ONNX Runtime and PyTorch reject them.
            prop_assume!(naive_max(&g, &vec![0.0; g.planes() * g.in_plane()]).iter().all(|v| v.is_finite()));
            let mut r = rng(seed);
            let x = rand_vec(&mut r, g.planes() * g.in_plane());
            let dy = rand_vec(&mut r, g.planes() * g.out_plane());
            let mut y = vec![0.0; dy.len()];
            let mut am = vec![0; dy.len()];
            max_forward(&g, &x, &mut y, &mut am);
            assert_close(&y, &naive_max(&g, &f64s(&x)), 0.0, 0.0, "maxpool forward");
            let mut dx = vec![f32::NAN; x.len()];
            max_backward(&g, &dy, &am, &mut dx);
            assert_close(&dx, &numeric_grad(|xv| naive_max(&g, xv), &x, &dy), 1e-4, 1e-4, "maxpool dx");
        }

        #[test]
        fn avg_matches_naive_and_finite_differences((g, _ceil) in strategy(), include: bool, seed in any::<u64>()) {
            prop_assume!(g.dh == 1);
            let mut r = rng(seed);
            let x = rand_vec(&mut r, g.planes() * g.in_plane());
            let dy = rand_vec(&mut r, g.planes() * g.out_plane());
            let mut y = vec![0.0; dy.len()];
            avg_forward(&g, include, &x, &mut y);
            assert_close(&y, &naive_avg(&g, &f64s(&x), include), 1e-6, 1e-6, "avgpool forward");
            let mut dx = vec![f32::NAN; x.len()];
            avg_backward(&g, include, &dy, &mut dx);
            assert_close(&dx, &numeric_grad(|xv| naive_avg(&g, xv, include), &x, &dy), 1e-4, 1e-4, "avgpool dx");
        }

        #[test]
        fn global_avg_matches_naive(planes in 1usize..6, plane in 1usize..50, seed in any::<u64>()) {
            let mut r = rng(seed);
            let x = rand_vec(&mut r, planes * plane);
            let dy = rand_vec(&mut r, planes);
            let naive = |xv: &[f64]| -> Vec<f64> { xv.chunks(plane).map(|c| c.iter().sum::<f64>() / plane as f64).collect() };
            let mut y = vec![0.0; planes];
            global_avg_forward(planes, plane, &x, &mut y);
            assert_close(&y, &naive(&f64s(&x)), 1e-6, 1e-6, "global avg");
            let mut dx = vec![0.0; x.len()];
            global_avg_backward(planes, plane, &dy, &mut dx);
            assert_close(&dx, &numeric_grad(naive, &x, &dy), 1e-5, 1e-4, "global avg dx");
        }
    }
}
