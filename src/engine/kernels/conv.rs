//! 2-D convolution (groups, stride, padding, dilation): im2col + GEMM in general, direct
//! loops for depthwise (one input channel per group). Transposed convolution reuses the
//! same three kernels with the roles of input and output swapped.

use super::window::{Flat, Phased};
use super::{for_each_group, group_len, threads, valid_range};
use crate::engine::linalg::{matmul, Mat, Par};
use crate::engine::simd::multiversion;
use rayon::prelude::*;

/// Resolved geometry of one convolution over NCHW data (a 1-D convolution is `h = kh = 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    /// Top and left padding; bottom and right padding only enter `oh` and `ow`.
    pub pt: usize,
    pub pl: usize,
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    pub fn cig(&self) -> usize {
        self.c_in / self.groups
    }
    pub fn cog(&self) -> usize {
        self.c_out / self.groups
    }
    /// Rows of the im2col matrix of one group: input channels x kernel taps.
    pub fn kdim(&self) -> usize {
        self.cig() * self.kh * self.kw
    }
    pub fn in_plane(&self) -> usize {
        self.h * self.w
    }
    pub fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
    pub fn input_len(&self) -> usize {
        self.n * self.c_in * self.in_plane()
    }
    pub fn output_len(&self) -> usize {
        self.n * self.c_out * self.out_plane()
    }
    pub fn weight_len(&self) -> usize {
        self.c_out * self.kdim()
    }
    /// A 1x1, stride-1, unpadded convolution reads its input as the im2col matrix directly.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.sh == 1
            && self.sw == 1
            && self.pt == 0
            && self.pl == 0
            && self.oh == self.h
            && self.ow == self.w
    }
    /// One input channel per group: the direct kernels beat im2col here.
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.cig() == 1
    }
    fn flops_per_image(&self) -> usize {
        self.c_out * self.kdim() * self.out_plane()
    }
}

/// With unit strides and `ow == w`, output position `i` of a tap reads input `i + shift`:
/// each tap's im2col row is one shifted copy of the plane, then its out-of-range rows and
/// wrapped-around columns are zeroed.
fn flat_shift(g: &ConvGeom) -> bool {
    g.sh == 1 && g.sw == 1 && g.ow == g.w
}

/// The part of `lo..hi` whose shifted positions `i + shift` fall inside `0..len`, as a
/// sub-range `start..end` with `lo <= start <= end <= hi`.
#[inline]
fn shifted_span(lo: usize, hi: usize, shift: isize, len: usize) -> (usize, usize) {
    let start = (lo as isize).max(-shift).min(hi as isize) as usize;
    let end = (hi as isize).min(len as isize - shift).max(start as isize) as usize;
    (start, end)
}

multiversion! {
    /// Copies the receptive fields of `cig` input planes into `col` (`kdim x oh*ow`), zeros
    /// where the window reads padding.
    fn im2col(g: &ConvGeom, x: &[f32], col: &mut [f32]) {
        let (ow, ohw, ihw) = (g.ow, g.out_plane(), g.in_plane());
        for c in 0..g.cig() {
            let plane = &x[c * ihw..(c + 1) * ihw];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = &mut col[((c * g.kh + ky) * g.kw + kx) * ohw..][..ohw];
                    let offx = (kx * g.dw) as isize - g.pl as isize;
                    let offy = (ky * g.dh) as isize - g.pt as isize;
                    let (lo, hi) = valid_range(ow, g.sw, offx, g.w);
                    if flat_shift(g) {
                        let (ylo, yhi) = valid_range(g.oh, 1, offy, g.h);
                        let shift = offy * g.w as isize + offx;
                        row[..ylo * ow].fill(0.0);
                        row[yhi * ow..].fill(0.0);
                        // Clip the copy to the plane; what falls outside is a wrapped column.
                        let (start, end) = shifted_span(ylo * ow, yhi * ow, shift, ihw);
                        row[ylo * ow..start].fill(0.0);
                        row[end..yhi * ow].fill(0.0);
                        if start < end {
                            row[start..end].copy_from_slice(&plane[(start as isize + shift) as usize..(end as isize + shift) as usize]);
                        }
                        if lo > 0 || hi < ow {
                            for oy in ylo..yhi {
                                row[oy * ow..oy * ow + lo].fill(0.0);
                                row[oy * ow + hi..(oy + 1) * ow].fill(0.0);
                            }
                        }
                        continue;
                    }
                    for oy in 0..g.oh {
                        let dst = &mut row[oy * ow..(oy + 1) * ow];
                        let iy = (oy * g.sh) as isize + offy;
                        if iy < 0 || iy >= g.h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * g.w..][..g.w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        if g.sw == 1 && lo < hi {
                            let s = (lo as isize + offx) as usize;
                            dst[lo..hi].copy_from_slice(&src[s..s + (hi - lo)]);
                        } else {
                            for ox in lo..hi {
                                dst[ox] = src[(ox as isize * g.sw as isize + offx) as usize];
                            }
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Adds `col` (`kdim x oh*ow`) back onto the `cig` input planes it was read from. `col`
    /// is scratch: its entries for padding positions are zeroed on the way.
    fn col2im(g: &ConvGeom, col: &mut [f32], x: &mut [f32]) {
        let (ow, ohw, ihw) = (g.ow, g.out_plane(), g.in_plane());
        for c in 0..g.cig() {
            let plane = &mut x[c * ihw..(c + 1) * ihw];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = &mut col[((c * g.kh + ky) * g.kw + kx) * ohw..][..ohw];
                    let offx = (kx * g.dw) as isize - g.pl as isize;
                    let offy = (ky * g.dh) as isize - g.pt as isize;
                    let (lo, hi) = valid_range(ow, g.sw, offx, g.w);
                    if flat_shift(g) {
                        let (ylo, yhi) = valid_range(g.oh, 1, offy, g.h);
                        if lo > 0 || hi < ow {
                            for oy in ylo..yhi {
                                row[oy * ow..oy * ow + lo].fill(0.0);
                                row[oy * ow + hi..(oy + 1) * ow].fill(0.0);
                            }
                        }
                        let shift = offy * g.w as isize + offx;
                        let (start, end) = shifted_span(ylo * ow, yhi * ow, shift, ihw);
                        if start < end {
                            let dst = &mut plane[(start as isize + shift) as usize..(end as isize + shift) as usize];
                            for (d, v) in dst.iter_mut().zip(&row[start..end]) {
                                *d += v;
                            }
                        }
                        continue;
                    }
                    for oy in 0..g.oh {
                        let iy = (oy * g.sh) as isize + offy;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let src = &row[oy * ow..(oy + 1) * ow];
                        let dst = &mut plane[iy as usize * g.w..][..g.w];
                        if g.sw == 1 && lo < hi {
                            let s = (lo as isize + offx) as usize;
                            for (d, v) in dst[s..s + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                                *d += v;
                            }
                        } else {
                            for ox in lo..hi {
                                dst[(ox as isize * g.sw as isize + offx) as usize] += src[ox];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv(x, w) + b`; `y` is overwritten.
pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
    debug_assert!(
        x.len() == g.input_len() && w.len() == g.weight_len() && y.len() == g.output_len()
    );
    if g.is_depthwise() {
        return depthwise_forward(g, x, w, b, y);
    }
    let (kdim, ohw, cog, cig) = (g.kdim(), g.out_plane(), g.cog(), g.cig());
    let per_image_out = g.c_out * ohw;
    let group = group_len(g.n, g.flops_per_image());
    // Few images: let GEMM split the work instead of the images.
    let par = if group >= g.n && g.n < threads() {
        Par::Pool
    } else {
        Par::Seq
    };
    for_each_group(y, per_image_out, group, |first, ys| {
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![0.0; kdim * ohw]
        };
        for (i, yimg) in ys.chunks_mut(per_image_out).enumerate() {
            let ximg = &x[(first + i) * g.c_in * g.in_plane()..][..g.c_in * g.in_plane()];
            for gi in 0..g.groups {
                let xg = &ximg[gi * cig * g.in_plane()..][..cig * g.in_plane()];
                let rhs = if g.is_pointwise() {
                    xg
                } else {
                    im2col(g, xg, &mut col);
                    &col
                };
                let yg = &mut yimg[gi * cog * ohw..][..cog * ohw];
                if let Some(b) = b {
                    for (o, row) in yg.chunks_mut(ohw).enumerate() {
                        row.fill(b[gi * cog + o]);
                    }
                }
                let wg = &w[gi * cog * kdim..][..cog * kdim];
                matmul(
                    cog,
                    ohw,
                    kdim,
                    yg,
                    ohw,
                    Mat::rows(wg, kdim),
                    Mat::rows(rhs, ohw),
                    1.0,
                    b.is_some(),
                    par,
                );
            }
        }
    });
}

/// `dx = conv^T(dy, w)`, the gradient with respect to the input; `dx` is overwritten.
pub fn backward_data(g: &ConvGeom, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    debug_assert!(
        dx.len() == g.input_len() && w.len() == g.weight_len() && dy.len() == g.output_len()
    );
    if g.is_depthwise() {
        return depthwise_backward_data(g, dy, w, dx);
    }
    let (kdim, ohw, cog, cig) = (g.kdim(), g.out_plane(), g.cog(), g.cig());
    let per_image_in = g.c_in * g.in_plane();
    let group = group_len(g.n, g.flops_per_image());
    let par = if group >= g.n && g.n < threads() {
        Par::Pool
    } else {
        Par::Seq
    };
    for_each_group(dx, per_image_in, group, |first, dxs| {
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![0.0; kdim * ohw]
        };
        for (i, dximg) in dxs.chunks_mut(per_image_in).enumerate() {
            let dyimg = &dy[(first + i) * g.c_out * ohw..][..g.c_out * ohw];
            for gi in 0..g.groups {
                let dyg = &dyimg[gi * cog * ohw..][..cog * ohw];
                let wg = &w[gi * cog * kdim..][..cog * kdim];
                let dxg = &mut dximg[gi * cig * g.in_plane()..][..cig * g.in_plane()];
                if g.is_pointwise() {
                    matmul(
                        kdim,
                        ohw,
                        cog,
                        dxg,
                        ohw,
                        Mat::rows_t(wg, kdim),
                        Mat::rows(dyg, ohw),
                        1.0,
                        false,
                        par,
                    );
                } else {
                    matmul(
                        kdim,
                        ohw,
                        cog,
                        &mut col,
                        ohw,
                        Mat::rows_t(wg, kdim),
                        Mat::rows(dyg, ohw),
                        1.0,
                        false,
                        par,
                    );
                    dxg.fill(0.0);
                    col2im(g, &mut col, dxg);
                }
            }
        }
    });
}

/// `dw = sum over images of dy x im2col(x)^T`; `dw` is overwritten. Images are split into
/// the same groups for every call with the same sizes and thread count, and the partial
/// sums are added in group order, so the result is reproducible.
pub fn backward_weight(g: &ConvGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    debug_assert!(
        x.len() == g.input_len() && dw.len() == g.weight_len() && dy.len() == g.output_len()
    );
    if g.is_depthwise() {
        return depthwise_backward_weight(g, x, dy, dw);
    }
    let group = group_len(g.n, g.flops_per_image());
    let n_groups = g.n.div_ceil(group);
    let par = if n_groups == 1 && g.n < threads() {
        Par::Pool
    } else {
        Par::Seq
    };
    let partial = |first: usize, out: &mut [f32]| {
        let (kdim, ohw, cog, cig) = (g.kdim(), g.out_plane(), g.cog(), g.cig());
        let mut col = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![0.0; kdim * ohw]
        };
        for img in first..(first + group).min(g.n) {
            let ximg = &x[img * g.c_in * g.in_plane()..][..g.c_in * g.in_plane()];
            let dyimg = &dy[img * g.c_out * ohw..][..g.c_out * ohw];
            for gi in 0..g.groups {
                let xg = &ximg[gi * cig * g.in_plane()..][..cig * g.in_plane()];
                let rhs = if g.is_pointwise() {
                    xg
                } else {
                    im2col(g, xg, &mut col);
                    &col
                };
                let dyg = &dyimg[gi * cog * ohw..][..cog * ohw];
                let dwg = &mut out[gi * cog * kdim..][..cog * kdim];
                matmul(
                    cog,
                    kdim,
                    ohw,
                    dwg,
                    kdim,
                    Mat::rows(dyg, ohw),
                    Mat::rows_t(rhs, ohw),
                    1.0,
                    img != first,
                    par,
                );
            }
        }
    };
    if n_groups == 1 {
        return partial(0, dw);
    }
    let mut parts = vec![0.0f32; n_groups * dw.len()];
    parts
        .par_chunks_mut(dw.len())
        .enumerate()
        .for_each(|(i, p)| partial(i * group, p));
    dw.copy_from_slice(&parts[..dw.len()]);
    for p in parts.chunks(dw.len()).skip(1) {
        for (d, v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
}

/// Per-channel sums of an NCHW tensor (a bias gradient); `out` is overwritten.
pub fn channel_sums(x: &[f32], n: usize, c: usize, plane: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .enumerate()
        .with_min_len(c.div_ceil(threads()).max(1))
        .for_each(|(ch, o)| {
            let s: f64 = (0..n)
                .map(|i| super::sum_f64(&x[(i * c + ch) * plane..][..plane]))
                .sum();
            *o = s as f32;
        });
}

fn phased(g: &ConvGeom) -> Phased {
    Phased::new(
        g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.pt, g.pl,
    )
}

/// How a depthwise convolution's taps read their plane: shifted runs of the plane itself
/// (unit strides, `ow == w`) or runs of stride-phase copies (everything else).
enum DwLayout {
    Flat(Flat),
    Phased(Phased),
}

impl DwLayout {
    fn new(g: &ConvGeom) -> DwLayout {
        if flat_shift(g) {
            DwLayout::Flat(Flat::new(g.h, g.w, g.oh, g.kh, g.kw, g.dh, g.dw, g.pt, g.pl))
        } else {
            DwLayout::Phased(phased(g))
        }
    }
    /// Scratch for one task: masked copies, or phase planes and a run.
    fn scratch(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            DwLayout::Flat(f) => (vec![0.0; f.masks.len() * f.in_len.max(f.out_len)], Vec::new()),
            DwLayout::Phased(p) => (vec![0.0; p.len()], vec![0.0; p.run()]),
        }
    }
}

/// `y[i] += a * x[i]`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

multiversion! {
    /// One output plane of a depthwise convolution.
    fn dw_forward_plane(lay: &DwLayout, q: &mut [f32], run: &mut [f32], x: &[f32], wk: &[f32], bias: f32, y: &mut [f32]) {
        match lay {
            DwLayout::Flat(fl) => {
                let len = fl.in_len;
                for (m, &c) in fl.masks.iter().enumerate() {
                    fl.mask_input(x, c, &mut q[m * len..][..len]);
                }
                y.fill(bias);
                for (t, tap) in fl.taps.iter().enumerate().filter(|(_, t)| t.lo < t.hi) {
                    let src = match tap.mask {
                        Some(m) => &q[m * len..][..len],
                        None => x,
                    };
                    let s = (tap.lo as isize + tap.shift) as usize;
                    axpy(&mut y[tap.lo..tap.hi], wk[t], &src[s..s + (tap.hi - tap.lo)]);
                }
            }
            DwLayout::Phased(ph) => {
                ph.scatter_input(x, q, 0.0);
                run.fill(bias);
                let (pl, n) = (ph.phase_len(), run.len());
                for (t, &(phase, off)) in ph.taps.iter().enumerate() {
                    axpy(run, wk[t], &q[phase * pl + off..][..n]);
                }
                ph.extract(run, y);
            }
        }
    }
}

multiversion! {
    /// One input plane's gradient: the output planes `dys` (its `cog` channels) spread back
    /// through their kernels `wks`.
    fn dw_backward_data_plane(lay: &DwLayout, dq: &mut [f32], run: &mut [f32], dys: &[f32], wks: &[f32], dx: &mut [f32]) {
        match lay {
            DwLayout::Flat(fl) => {
                let (len, taps) = (fl.out_len, fl.taps.len());
                dx.fill(0.0);
                for (dy, wk) in dys.chunks(len).zip(wks.chunks(taps)) {
                    for (m, &c) in fl.masks.iter().enumerate() {
                        fl.mask_output(dy, c, &mut dq[m * len..][..len]);
                    }
                    for (t, tap) in fl.taps.iter().enumerate().filter(|(_, t)| t.lo < t.hi) {
                        let src = match tap.mask {
                            Some(m) => &dq[m * len..][..len],
                            None => dy,
                        };
                        let s = (tap.lo as isize + tap.shift) as usize;
                        axpy(&mut dx[s..s + (tap.hi - tap.lo)], wk[t], &src[tap.lo..tap.hi]);
                    }
                }
            }
            DwLayout::Phased(ph) => {
                dq.fill(0.0);
                let (pl, n, taps, ohw) = (ph.phase_len(), run.len(), ph.taps.len(), ph.oh * ph.ow);
                for (dy, wk) in dys.chunks(ohw).zip(wks.chunks(taps)) {
                    ph.spread(dy, run);
                    for (t, &(phase, off)) in ph.taps.iter().enumerate() {
                        axpy(&mut dq[phase * pl + off..][..n], wk[t], run);
                    }
                }
                ph.gather_input(dq, dx);
            }
        }
    }
}

multiversion! {
    /// Adds one image's contribution to one channel's kernel gradient.
    fn dw_backward_weight_plane(lay: &DwLayout, q: &mut [f32], run: &mut [f32], x: &[f32], dy: &[f32], acc: &mut [f64]) {
        match lay {
            DwLayout::Flat(fl) => {
                let len = fl.in_len;
                for (m, &c) in fl.masks.iter().enumerate() {
                    fl.mask_input(x, c, &mut q[m * len..][..len]);
                }
                for (t, tap) in fl.taps.iter().enumerate().filter(|(_, t)| t.lo < t.hi) {
                    let src = match tap.mask {
                        Some(m) => &q[m * len..][..len],
                        None => x,
                    };
                    let s = (tap.lo as isize + tap.shift) as usize;
                    acc[t] += dot32(&dy[tap.lo..tap.hi], &src[s..s + (tap.hi - tap.lo)]) as f64;
                }
            }
            DwLayout::Phased(ph) => {
                ph.scatter_input(x, q, 0.0);
                ph.spread(dy, run);
                let (pl, n) = (ph.phase_len(), run.len());
                for (t, &(phase, off)) in ph.taps.iter().enumerate() {
                    acc[t] += dot32(run, &q[phase * pl + off..][..n]) as f64;
                }
            }
        }
    }
}

/// Direct depthwise forward: per output plane, each tap adds one contiguous run (see
/// `window::Flat` and `window::Phased`).
fn depthwise_forward(g: &ConvGeom, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
    let (ohw, cog, taps) = (g.out_plane(), g.cog(), g.kh * g.kw);
    let lay = DwLayout::new(g);
    let group = group_len(g.n * g.c_out, ohw * taps);
    for_each_group(y, ohw, group, |first, ys| {
        let (mut q, mut run) = lay.scratch();
        for (i, yp) in ys.chunks_mut(ohw).enumerate() {
            let (img, oc) = ((first + i) / g.c_out, (first + i) % g.c_out);
            let xp = &x[(img * g.c_in + oc / cog) * g.in_plane()..][..g.in_plane()];
            let bias = b.map_or(0.0, |b| b[oc]);
            dw_forward_plane(&lay, &mut q, &mut run, xp, &w[oc * taps..][..taps], bias, yp);
        }
    });
}

fn depthwise_backward_data(g: &ConvGeom, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (ohw, cog, taps) = (g.out_plane(), g.cog(), g.kh * g.kw);
    let lay = DwLayout::new(g);
    let group = group_len(g.n * g.c_in, ohw * taps * cog);
    for_each_group(dx, g.in_plane(), group, |first, dxs| {
        let (mut dq, mut run) = lay.scratch();
        for (i, dxp) in dxs.chunks_mut(g.in_plane()).enumerate() {
            let (img, ic) = ((first + i) / g.c_in, (first + i) % g.c_in);
            let dys = &dy[(img * g.c_out + ic * cog) * ohw..][..cog * ohw];
            let wks = &w[ic * cog * taps..][..cog * taps];
            dw_backward_data_plane(&lay, &mut dq, &mut run, dys, wks, dxp);
        }
    });
}

fn depthwise_backward_weight(g: &ConvGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (ohw, cog, taps) = (g.out_plane(), g.cog(), g.kh * g.kw);
    let lay = DwLayout::new(g);
    let group = group_len(g.c_out, g.n * ohw * taps);
    // One output channel's taps depend on that channel's planes only: no cross-task sums.
    for_each_group(dw, taps, group, |first, dws| {
        let (mut q, mut run) = lay.scratch();
        let mut acc = vec![0f64; taps];
        for (i, wk) in dws.chunks_mut(taps).enumerate() {
            let oc = first + i;
            acc.fill(0.0);
            for img in 0..g.n {
                let xp = &x[(img * g.c_in + oc / cog) * g.in_plane()..][..g.in_plane()];
                let dyp = &dy[(img * g.c_out + oc) * ohw..][..ohw];
                dw_backward_weight_plane(&lay, &mut q, &mut run, xp, dyp, &mut acc);
            }
            for (d, a) in wk.iter_mut().zip(&acc) {
                *d = *a as f32;
            }
        }
    });
}

/// Dot product of one plane's run with sixteen f32 lanes (runs are a few hundred long).
#[inline(always)]
fn dot32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, ra) = a.as_chunks::<16>();
    let (cb, rb) = b[..a.len()].as_chunks::<16>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    for a in acc {
        s += a;
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    /// Direct-loop convolution in f64, the reference for every path above.
    pub fn naive_forward(g: &ConvGeom, x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
        let mut y = vec![0.0; g.output_len()];
        let (cig, cog) = (g.cig(), g.cog());
        for n in 0..g.n {
            for oc in 0..g.c_out {
                let gi = oc / cog;
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut s = b.map_or(0.0, |b| b[oc]);
                        for c in 0..cig {
                            let ic = gi * cig + c;
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.sh + ky * g.dh) as isize - g.pt as isize;
                                    let ix = (ox * g.sw + kx * g.dw) as isize - g.pl as isize;
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < g.h
                                        && (ix as usize) < g.w
                                    {
                                        s += x[((n * g.c_in + ic) * g.h + iy as usize) * g.w
                                            + ix as usize]
                                            * w[((oc * cig + c) * g.kh + ky) * g.kw + kx];
                                    }
                                }
                            }
                        }
                        y[((n * g.c_out + oc) * g.oh + oy) * g.ow + ox] = s;
                    }
                }
            }
        }
        y
    }

    /// Gradients of `sum(dy * conv(x, w))` by the same loops, transposed.
    pub fn naive_backward(g: &ConvGeom, x: &[f64], w: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut dx = vec![0.0; g.input_len()];
        let mut dw = vec![0.0; g.weight_len()];
        let (cig, cog) = (g.cig(), g.cog());
        for n in 0..g.n {
            for oc in 0..g.c_out {
                let gi = oc / cog;
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let d = dy[((n * g.c_out + oc) * g.oh + oy) * g.ow + ox];
                        for c in 0..cig {
                            let ic = gi * cig + c;
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.sh + ky * g.dh) as isize - g.pt as isize;
                                    let ix = (ox * g.sw + kx * g.dw) as isize - g.pl as isize;
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < g.h
                                        && (ix as usize) < g.w
                                    {
                                        let xi = ((n * g.c_in + ic) * g.h + iy as usize) * g.w
                                            + ix as usize;
                                        let wi = ((oc * cig + c) * g.kh + ky) * g.kw + kx;
                                        dx[xi] += d * w[wi];
                                        dw[wi] += d * x[xi];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        (dx, dw)
    }

    pub fn geom_strategy() -> impl Strategy<Value = ConvGeom> {
        (
            (
                1usize..4,
                1usize..4,
                1usize..4,
                1usize..4,
                1usize..8,
                1usize..8,
            ),
            (1usize..3, 1usize..3, 1usize..3, 1usize..3),
            (
                0usize..3,
                0usize..3,
                0usize..3,
                0usize..3,
                1usize..4,
                1usize..4,
            ),
        )
            .prop_filter_map(
                "kernel larger than padded input",
                |((n, groups, cig, cog, h, w), (sh, sw, dh, dw), (pt, pl, pb, pr, kh, kw))| {
                    let (eh, ew) = ((kh - 1) * dh + 1, (kw - 1) * dw + 1);
                    if h + pt + pb < eh || w + pl + pr < ew {
                        return None;
                    }
                    let (oh, ow) = ((h + pt + pb - eh) / sh + 1, (w + pl + pr - ew) / sw + 1);
                    Some(ConvGeom {
                        n,
                        c_in: groups * cig,
                        h,
                        w,
                        c_out: groups * cog,
                        kh,
                        kw,
                        sh,
                        sw,
                        dh,
                        dw,
                        pt,
                        pl,
                        groups,
                        oh,
                        ow,
                    })
                },
            )
    }

    fn check(g: &ConvGeom, seed: u64) {
        let mut r = rng(seed);
        let x = rand_vec(&mut r, g.input_len());
        let w = rand_vec(&mut r, g.weight_len());
        let b = rand_vec(&mut r, g.c_out);
        let dy = rand_vec(&mut r, g.output_len());
        let mut y = vec![f32::NAN; g.output_len()];
        forward(g, &x, &w, Some(&b), &mut y);
        assert_close(
            &y,
            &naive_forward(g, &f64s(&x), &f64s(&w), Some(&f64s(&b))),
            1e-5,
            1e-5,
            "conv forward",
        );
        let (want_dx, want_dw) = naive_backward(g, &f64s(&x), &f64s(&w), &f64s(&dy));
        let mut dx = vec![f32::NAN; g.input_len()];
        backward_data(g, &dy, &w, &mut dx);
        assert_close(&dx, &want_dx, 1e-5, 1e-5, "conv dx");
        let mut dw = vec![f32::NAN; g.weight_len()];
        backward_weight(g, &x, &dy, &mut dw);
        assert_close(&dw, &want_dw, 1e-4, 1e-5, "conv dw");
        let mut db = vec![f32::NAN; g.c_out];
        channel_sums(&dy, g.n, g.c_out, g.out_plane(), &mut db);
        let want_db: Vec<f64> = (0..g.c_out)
            .map(|c| {
                (0..g.n)
                    .flat_map(|n| dy[(n * g.c_out + c) * g.out_plane()..][..g.out_plane()].iter())
                    .map(|&v| v as f64)
                    .sum()
            })
            .collect();
        assert_close(&db, &want_db, 1e-5, 1e-5, "conv db");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn matches_naive(g in geom_strategy(), seed in any::<u64>()) {
            check(&g, seed);
        }
    }

    #[test]
    fn larger_cases_use_every_path() {
        let base = ConvGeom {
            n: 5,
            c_in: 6,
            h: 9,
            w: 11,
            c_out: 6,
            kh: 3,
            kw: 3,
            sh: 1,
            sw: 1,
            dh: 1,
            dw: 1,
            pt: 1,
            pl: 1,
            groups: 1,
            oh: 9,
            ow: 11,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (groups, sh, dh) in [(1, 1, 1), (6, 1, 1), (6, 2, 1), (3, 2, 2), (2, 1, 2)] {
            let eff = 2 * dh + 1;
            let oh = (9 + 2 - eff) / sh + 1;
            let ow = (11 + 2 - eff) / sh + 1;
            let g = ConvGeom {
                groups,
                sh,
                sw: sh,
                dh,
                dw: dh,
                oh,
                ow,
                n: 40,
                ..base.clone()
            };
            pool.install(|| check(&g, 7));
            check(&g, 8);
        }
        // Unit strides with `ow == w` take the shifted-copy im2col and, for depthwise, the
        // flat-run kernels; dilated and asymmetric, with channel multipliers 1 and 2.
        for (dh, pt, pl, oh) in [(2, 2, 2, 9), (1, 0, 1, 8), (1, 2, 1, 10)] {
            for (groups, c_out) in [(1, 6), (6, 6), (6, 12)] {
                let g = ConvGeom { n: 3, dh, dw: dh, pt, pl, oh, ow: 11, groups, c_out, ..base.clone() };
                assert!(flat_shift(&g));
                check(&g, 9);
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let g = ConvGeom {
            n: 2,
            c_in: 4,
            h: 5,
            w: 4,
            c_out: 4,
            kh: 3,
            kw: 2,
            sh: 2,
            sw: 1,
            dh: 1,
            dw: 2,
            pt: 1,
            pl: 1,
            groups: 2,
            oh: 3,
            ow: 3,
        };
        for g in [
            g.clone(),
            ConvGeom {
                groups: 4,
                c_out: 8,
                ..g
            },
        ] {
            let mut r = rng(3);
            let x = rand_vec(&mut r, g.input_len());
            let w = rand_vec(&mut r, g.weight_len());
            let dy = rand_vec(&mut r, g.output_len());
            let mut dx = vec![0.0; g.input_len()];
            backward_data(&g, &dy, &w, &mut dx);
            let fd = numeric_grad(|xv| naive_forward(&g, xv, &f64s(&w), None), &x, &dy);
            assert_close(&dx, &fd, 1e-4, 1e-4, "conv dx vs finite differences");
            let mut dw = vec![0.0; g.weight_len()];
            backward_weight(&g, &x, &dy, &mut dw);
            let fd = numeric_grad(|wv| naive_forward(&g, &f64s(&x), wv, None), &w, &dy);
            assert_close(&dw, &fd, 1e-4, 1e-4, "conv dw vs finite differences");
        }
    }
}
