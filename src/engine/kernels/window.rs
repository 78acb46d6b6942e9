//! Stride-phase layout for sliding-window kernels on small planes (depthwise convolution,
//! max pooling). The padded input plane is split into `sh x sw` phase planes so that, for
//! every kernel tap, the values read by all outputs form one contiguous run: output `(oy, ox)`
//! lives at flat position `oy * qw + ox` and tap `t` reads `phase[t][offset[t] + oy * qw + ox]`.
//! Positions with `ox >= ow` are scratch lanes whose results are discarded, which keeps the
//! inner loops branch-free and long enough to vectorise even on 4x4 planes.

use super::valid_range;
use crate::engine::simd::multiversion;

#[derive(Debug, Clone)]
pub struct Phased {
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    sh: usize,
    sw: usize,
    pt: usize,
    pl: usize,
    /// Rows and row length of each phase plane.
    qh: usize,
    pub qw: usize,
    /// Per tap (row-major over the kernel): phase plane index and flat offset.
    pub taps: Vec<(usize, usize)>,
    /// Per tap: the input-plane offset `(ky*dh - pt) * w + (kx*dw - pl)` of that tap at output
    /// (0, 0), as (row offset, column offset).
    pub tap_rc: Vec<(isize, isize)>,
}

impl Phased {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        h: usize,
        w: usize,
        oh: usize,
        ow: usize,
        kh: usize,
        kw: usize,
        sh: usize,
        sw: usize,
        dh: usize,
        dw: usize,
        pt: usize,
        pl: usize,
    ) -> Phased {
        let rows = (oh.max(1) - 1) * sh + (kh - 1) * dh + 1;
        let cols = (ow.max(1) - 1) * sw + (kw - 1) * dw + 1;
        // One spare row: scratch lanes of the last output row read past the last used row.
        let qh = rows.div_ceil(sh) + 1;
        let qw = cols.div_ceil(sw);
        let mut taps = Vec::with_capacity(kh * kw);
        let mut tap_rc = Vec::with_capacity(kh * kw);
        for ky in 0..kh {
            for kx in 0..kw {
                let (ry, rx) = (ky * dh, kx * dw);
                taps.push(((ry % sh) * sw + rx % sw, (ry / sh) * qw + rx / sw));
                tap_rc.push((ry as isize - pt as isize, rx as isize - pl as isize));
            }
        }
        Phased {
            h,
            w,
            oh,
            ow,
            sh,
            sw,
            pt,
            pl,
            qh,
            qw,
            taps,
            tap_rc,
        }
    }

    /// Values per phase plane.
    pub fn phase_len(&self) -> usize {
        self.qh * self.qw
    }
    /// Length of the scratch output run (`oh * qw`).
    pub fn run(&self) -> usize {
        self.oh * self.qw
    }
    /// Total length of all phase planes.
    pub fn len(&self) -> usize {
        self.sh * self.sw * self.phase_len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits an input plane into phases, `fill` where the window reads padding.
    pub fn scatter_input(&self, x: &[f32], q: &mut [f32], fill: f32) {
        scatter_input(self, x, q, fill)
    }

    /// Inverse of `scatter_input` for gradients: `dx[r][c]` takes the phase value its input
    /// position maps to (0 where no window reads it).
    pub fn gather_input(&self, q: &[f32], dx: &mut [f32]) {
        gather_input(self, q, dx)
    }

    #[inline(always)]
    fn scatter_input_impl(&self, x: &[f32], q: &mut [f32], fill: f32) {
        let pl = self.phase_len();
        for a in 0..self.sh {
            for b in 0..self.sw {
                let phase = &mut q[(a * self.sw + b) * pl..][..pl];
                let off = b as isize - self.pl as isize;
                let (lo, hi) = valid_range(self.qw, self.sw, off, self.w);
                for i in 0..self.qh {
                    let row = &mut phase[i * self.qw..][..self.qw];
                    let r = (i * self.sh + a) as isize - self.pt as isize;
                    if r < 0 || r >= self.h as isize {
                        row.fill(fill);
                        continue;
                    }
                    let src = &x[r as usize * self.w..][..self.w];
                    row[..lo].fill(fill);
                    row[hi..].fill(fill);
                    if self.sw == 1 {
                        if lo < hi {
                            let s = (lo as isize + off) as usize;
                            row[lo..hi].copy_from_slice(&src[s..s + hi - lo]);
                        }
                    } else if lo < hi {
                        let st = (lo as isize * self.sw as isize + off) as usize;
                        let s = &src[st..st + (hi - lo - 1) * self.sw + 1];
                        match self.sw {
                            2 => load_every::<2>(&mut row[lo..hi], s),
                            sw => {
                                for (k, d) in row[lo..hi].iter_mut().enumerate() {
                                    *d = s[k * sw];
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn gather_input_impl(&self, q: &[f32], dx: &mut [f32]) {
        let pl = self.phase_len();
        for r in 0..self.h {
            let pr = r + self.pt;
            let (a, i) = (pr % self.sh, pr / self.sh);
            let row = &mut dx[r * self.w..][..self.w];
            if i >= self.qh {
                row.fill(0.0);
                continue;
            }
            for b in 0..self.sw {
                let src = &q[(a * self.sw + b) * pl + i * self.qw..][..self.qw];
                // Columns c = j*sw + b - pl of this phase; the others belong to other phases.
                let off = b as isize - self.pl as isize;
                let (lo, hi) = valid_range(self.qw, self.sw, off, self.w);
                if self.sw == 1 {
                    row.fill(0.0);
                    if lo < hi {
                        let s = (lo as isize + off) as usize;
                        row[s..s + hi - lo].copy_from_slice(&src[lo..hi]);
                    }
                } else {
                    if b == 0 {
                        row.fill(0.0);
                    }
                    if lo < hi {
                        let st = (lo as isize * self.sw as isize + off) as usize;
                        let d = &mut row[st..st + (hi - lo - 1) * self.sw + 1];
                        match self.sw {
                            2 => store_every::<2>(d, &src[lo..hi]),
                            sw => {
                                for (k, v) in src[lo..hi].iter().enumerate() {
                                    d[k * sw] = *v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Copies the `oh x ow` outputs out of a scratch run.
    #[inline]
    pub fn extract(&self, run: &[f32], y: &mut [f32]) {
        for oy in 0..self.oh {
            y[oy * self.ow..][..self.ow].copy_from_slice(&run[oy * self.qw..][..self.ow]);
        }
    }

    /// Lays `oh x ow` outputs (a gradient) out as a scratch run with zero scratch lanes.
    #[inline]
    pub fn spread(&self, y: &[f32], run: &mut [f32]) {
        for oy in 0..self.oh {
            let row = &mut run[oy * self.qw..][..self.qw];
            row[..self.ow].copy_from_slice(&y[oy * self.ow..][..self.ow]);
            row[self.ow..].fill(0.0);
        }
    }
}

/// Zeroes columns `a..b` of every row. A 3x3 kernel zeroes one column: a plain store per
/// row, where `fill` would call `memset` for each.
#[inline(always)]
fn zero_columns(plane: &mut [f32], w: usize, a: usize, b: usize) {
    if b == a + 1 {
        for row in plane.chunks_exact_mut(w) {
            row[a] = 0.0;
        }
    } else {
        for row in plane.chunks_mut(w) {
            row[a..b].fill(0.0);
        }
    }
}

/// `dst[k] = src[k * S]`, with `src` exactly `(dst.len() - 1) * S + 1` long. A constant
/// stride over whole `[f32; S]` chunks lets LLVM vectorise the strided load.
#[inline(always)]
fn load_every<const S: usize>(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    let (chunks, _) = src[..(n - 1) * S].as_chunks::<S>();
    for (d, c) in dst.iter_mut().zip(chunks) {
        *d = c[0];
    }
    dst[n - 1] = src[(n - 1) * S];
}

/// `dst[k * S] = src[k]`, with `dst` exactly `(src.len() - 1) * S + 1` long.
#[inline(always)]
fn store_every<const S: usize>(dst: &mut [f32], src: &[f32]) {
    let n = src.len();
    let (chunks, _) = dst[..(n - 1) * S].as_chunks_mut::<S>();
    for (c, v) in chunks.iter_mut().zip(src) {
        c[0] = *v;
    }
    dst[(n - 1) * S] = src[n - 1];
}

multiversion! {
    fn scatter_input(ph: &Phased, x: &[f32], q: &mut [f32], fill: f32) {
        ph.scatter_input_impl(x, q, fill)
    }
}

multiversion! {
    fn gather_input(ph: &Phased, q: &[f32], dx: &mut [f32]) {
        ph.gather_input_impl(q, dx)
    }
}

/// Unit-stride windows whose output rows are as wide as the input rows (`ow == w`, e.g. 3x3
/// with padding 1): output `i` of a tap reads input `i + shift` of the flat plane, so each
/// tap is one contiguous run over the plane with no copy into phases. The outputs near the
/// left or right edge would read the neighbouring row instead of padding; reading from a copy
/// of the plane with those columns zeroed (`mask_input`, or `mask_output` on the gradient
/// side) makes them read zeros.
#[derive(Debug, Clone)]
pub struct Flat {
    pub w: usize,
    /// Values per input plane and per output plane.
    pub in_len: usize,
    pub out_len: usize,
    pub taps: Vec<FlatTap>,
    /// The distinct non-zero column offsets; `FlatTap::mask` indexes this list.
    pub masks: Vec<isize>,
}

#[derive(Debug, Clone, Copy)]
pub struct FlatTap {
    pub shift: isize,
    /// Output positions `lo..hi` read inside the plane (empty when the tap only reads
    /// padding).
    pub lo: usize,
    pub hi: usize,
    pub mask: Option<usize>,
}

impl Flat {
    #[allow(clippy::too_many_arguments)]
    pub fn new(h: usize, w: usize, oh: usize, kh: usize, kw: usize, dh: usize, dw: usize, pt: usize, pl: usize) -> Flat {
        let (in_len, out_len) = (h * w, oh * w);
        let mut masks: Vec<isize> = Vec::new();
        let mut taps = Vec::with_capacity(kh * kw);
        for ky in 0..kh {
            for kx in 0..kw {
                let offy = (ky * dh) as isize - pt as isize;
                let offx = (kx * dw) as isize - pl as isize;
                let (ylo, yhi) = valid_range(oh, 1, offy, h);
                let shift = offy * w as isize + offx;
                let (lo, hi) = if offx.unsigned_abs() >= w {
                    (0, 0)
                } else {
                    let lo = ((ylo * w) as isize).max(-shift).min((yhi * w) as isize) as usize;
                    let hi = ((yhi * w) as isize).min(in_len as isize - shift).max(lo as isize) as usize;
                    (lo, hi)
                };
                let mask = (offx != 0 && lo < hi).then(|| match masks.iter().position(|&m| m == offx) {
                    Some(i) => i,
                    None => {
                        masks.push(offx);
                        masks.len() - 1
                    }
                });
                taps.push(FlatTap { shift, lo, hi, mask });
            }
        }
        Flat { w, in_len, out_len, taps, masks }
    }

    /// `src` (an input plane) with the columns that only wrapped-around reads of taps with
    /// column offset `c` reach set to zero.
    #[inline]
    pub fn mask_input(&self, src: &[f32], c: isize, dst: &mut [f32]) {
        dst.copy_from_slice(src);
        let (a, b) = if c < 0 { (self.w - c.unsigned_abs(), self.w) } else { (0, c as usize) };
        zero_columns(dst, self.w, a, b);
    }

    /// `src` (an output-gradient plane) with the outputs whose reads wrap around, for taps
    /// with column offset `c`, set to zero.
    #[inline]
    pub fn mask_output(&self, src: &[f32], c: isize, dst: &mut [f32]) {
        dst.copy_from_slice(src);
        let (a, b) = if c < 0 { (0, c.unsigned_abs()) } else { (self.w - c as usize, self.w) };
        zero_columns(dst, self.w, a, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every tap of every output reads exactly the input value (or padding) it should.
        #[test]
        fn taps_read_the_right_inputs(h in 1usize..7, w in 1usize..7, k in 1usize..4, s in 1usize..4, d in 1usize..3, pt in 0usize..3, pl in 0usize..3, pb in 0usize..3, pr in 0usize..3) {
            let eff = (k - 1) * d + 1;
            prop_assume!(h + pt + pb >= eff && w + pl + pr >= eff);
            let (oh, ow) = ((h + pt + pb - eff) / s + 1, (w + pl + pr - eff) / s + 1);
            let p = Phased::new(h, w, oh, ow, k, k, s, s, d, d, pt, pl);
            let x: Vec<f32> = (0..h * w).map(|i| i as f32 + 1.0).collect();
            let mut q = vec![f32::NAN; p.len()];
            p.scatter_input(&x, &mut q, 0.0);
            for (t, &(phase, off)) in p.taps.iter().enumerate() {
                let (ky, kx) = (t / k, t % k);
                for oy in 0..oh {
                    for ox in 0..ow {
                        let r = (oy * s + ky * d) as isize - pt as isize;
                        let c = (ox * s + kx * d) as isize - pl as isize;
                        let want = if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w { x[r as usize * w + c as usize] } else { 0.0 };
                        prop_assert_eq!(q[phase * p.phase_len() + off + oy * p.qw + ox], want);
                    }
                }
                // Scratch lanes stay inside the phase plane.
                prop_assert!(off + p.run() <= p.phase_len());
            }
            if s == 1 && ow == w {
                let fl = Flat::new(h, w, oh, k, k, d, d, pt, pl);
                for (t, tap) in fl.taps.iter().enumerate() {
                    let (ky, kx) = (t / k, t % k);
                    let mut src = x.clone();
                    if let Some(m) = tap.mask {
                        fl.mask_input(&x, fl.masks[m], &mut src);
                    }
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let i = oy * ow + ox;
                            let r = (oy + ky * d) as isize - pt as isize;
                            let c = (ox + kx * d) as isize - pl as isize;
                            let want = if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w { x[r as usize * w + c as usize] } else { 0.0 };
                            let got = if (tap.lo..tap.hi).contains(&i) { src[(i as isize + tap.shift) as usize] } else { 0.0 };
                            prop_assert_eq!(got, want, "tap {} output ({}, {})", t, oy, ox);
                        }
                    }
                }
            }
            let mut back = vec![f32::NAN; h * w];
            p.gather_input(&q, &mut back);
            for (i, (&b, &v)) in back.iter().zip(&x).enumerate() {
                prop_assert!(b == v || b == 0.0, "input {i}: {b} vs {v}");
            }
        }
    }
}
