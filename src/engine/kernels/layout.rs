//! Data movement: strided copies (Transpose, Slice, Pad) and Concat / Split.

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// For every index `i` of a box of size `count`, copies (or adds, with `accumulate`)
/// `src[src_base + i . src_strides]` to `dst[dst_base + i . dst_strides]`.
#[allow(clippy::too_many_arguments)]
pub fn copy_strided(
    count: &[usize],
    src: &[f32],
    src_base: isize,
    src_strides: &[isize],
    dst: &mut [f32],
    dst_base: isize,
    dst_strides: &[isize],
    accumulate: bool,
) {
    let r = count.len();
    if count.contains(&0) {
        return;
    }
    if r == 0 {
        let (s, d) = (src_base as usize, dst_base as usize);
        if accumulate {
            dst[d] += src[s]
        } else {
            dst[d] = src[s]
        }
        return;
    }
    let (len, ss, ds) = (count[r - 1], src_strides[r - 1], dst_strides[r - 1]);
    let outer: usize = count[..r - 1].iter().product();
    let mut idx = vec![0usize; r - 1];
    let (mut so, mut dof) = (src_base, dst_base);
    for _ in 0..outer {
        if ss == 1 && ds == 1 {
            let (s, d) = (so as usize, dof as usize);
            if accumulate {
                for (o, v) in dst[d..d + len].iter_mut().zip(&src[s..s + len]) {
                    *o += v;
                }
            } else {
                dst[d..d + len].copy_from_slice(&src[s..s + len]);
            }
        } else {
            for j in 0..len as isize {
                let (s, d) = ((so + j * ss) as usize, (dof + j * ds) as usize);
                if accumulate {
                    dst[d] += src[s]
                } else {
                    dst[d] = src[s]
                }
            }
        }
        // Advance the odometer over the outer axes.
        for d in (0..r - 1).rev() {
            idx[d] += 1;
            so += src_strides[d];
            dof += dst_strides[d];
            if idx[d] < count[d] {
                break;
            }
            so -= src_strides[d] * count[d] as isize;
            dof -= dst_strides[d] * count[d] as isize;
            idx[d] = 0;
        }
    }
}

fn istrides(shape: &[usize]) -> Vec<isize> {
    strides(shape).into_iter().map(|s| s as isize).collect()
}

/// `y = transpose(x, perm)` where `y.shape[i] = x.shape[perm[i]]`.
pub fn transpose(x: &[f32], shape: &[usize], perm: &[usize], y: &mut [f32]) {
    let xs = istrides(shape);
    let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let src: Vec<isize> = perm.iter().map(|&p| xs[p]).collect();
    copy_strided(&out, x, 0, &src, y, 0, &istrides(&out), false);
}

/// One axis of a slice: output position `k` reads input `start + k * step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range1 {
    pub start: usize,
    pub step: isize,
    pub count: usize,
}

/// `y = x[ranges]`.
pub fn slice(x: &[f32], shape: &[usize], ranges: &[Range1], y: &mut [f32]) {
    let xs = istrides(shape);
    let base: isize = ranges
        .iter()
        .zip(&xs)
        .map(|(r, s)| r.start as isize * s)
        .sum();
    let src: Vec<isize> = ranges.iter().zip(&xs).map(|(r, s)| r.step * s).collect();
    let count: Vec<usize> = ranges.iter().map(|r| r.count).collect();
    copy_strided(&count, x, base, &src, y, 0, &istrides(&count), false);
}

/// Gradient of `slice`: `dx` is overwritten with zeros outside the slice.
pub fn slice_backward(dy: &[f32], shape: &[usize], ranges: &[Range1], dx: &mut [f32]) {
    dx.fill(0.0);
    let xs = istrides(shape);
    let base: isize = ranges
        .iter()
        .zip(&xs)
        .map(|(r, s)| r.start as isize * s)
        .sum();
    let dst: Vec<isize> = ranges.iter().zip(&xs).map(|(r, s)| r.step * s).collect();
    let count: Vec<usize> = ranges.iter().map(|r| r.count).collect();
    copy_strided(&count, dy, 0, &istrides(&count), dx, base, &dst, true);
}

/// Box shared by the input and a padded (or cropped, for negative pads) output: per axis
/// the first input index kept, the first output index it lands on, and the count.
fn pad_overlap(shape: &[usize], pads: &[i64]) -> (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>) {
    let r = shape.len();
    let out: Vec<usize> = (0..r)
        .map(|d| (shape[d] as i64 + pads[d] + pads[d + r]).max(0) as usize)
        .collect();
    let mut xin = vec![0; r];
    let mut yin = vec![0; r];
    let mut cnt = vec![0; r];
    for d in 0..r {
        let b = pads[d];
        let lo = (-b).max(0);
        let hi = (shape[d] as i64).min(out[d] as i64 - b);
        xin[d] = lo as usize;
        yin[d] = (lo + b) as usize;
        cnt[d] = (hi - lo).max(0) as usize;
    }
    (out, xin, yin, cnt)
}

/// Constant-mode Pad: `pads` holds begin pads for every axis then end pads (negative pads
/// crop).
pub fn pad(x: &[f32], shape: &[usize], pads: &[i64], value: f32, y: &mut [f32]) {
    let (out, xin, yin, cnt) = pad_overlap(shape, pads);
    y.fill(value);
    let (xs, ys) = (istrides(shape), istrides(&out));
    let xb: isize = xin.iter().zip(&xs).map(|(&i, s)| i as isize * s).sum();
    let yb: isize = yin.iter().zip(&ys).map(|(&i, s)| i as isize * s).sum();
    copy_strided(&cnt, x, xb, &xs, y, yb, &ys, false);
}

pub fn pad_backward(dy: &[f32], shape: &[usize], pads: &[i64], dx: &mut [f32]) {
    let (out, xin, yin, cnt) = pad_overlap(shape, pads);
    dx.fill(0.0);
    let (xs, ys) = (istrides(shape), istrides(&out));
    let xb: isize = xin.iter().zip(&xs).map(|(&i, s)| i as isize * s).sum();
    let yb: isize = yin.iter().zip(&ys).map(|(&i, s)| i as isize * s).sum();
    copy_strided(&cnt, dy, yb, &ys, dx, xb, &xs, false);
}

/// Concatenation along an axis, seen as `outer` rows where part `i` contributes `inner[i]`
/// contiguous values to each row.
pub fn concat(parts: &[&[f32]], outer: usize, inner: &[usize], y: &mut [f32]) {
    let row: usize = inner.iter().sum();
    for o in 0..outer {
        let mut off = o * row;
        for (p, &len) in parts.iter().zip(inner) {
            y[off..off + len].copy_from_slice(&p[o * len..][..len]);
            off += len;
        }
    }
}

/// Inverse of `concat`: part `i` of each row goes to `outs[i]` (Split's forward, Concat's
/// backward).
pub fn split(x: &[f32], outer: usize, inner: &[usize], outs: &mut [&mut [f32]]) {
    let row: usize = inner.iter().sum();
    for o in 0..outer {
        let mut off = o * row;
        for (p, &len) in outs.iter_mut().zip(inner) {
            p[o * len..][..len].copy_from_slice(&x[off..off + len]);
            off += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        for d in (0..shape.len()).rev() {
            idx[d] = i % shape[d];
            i /= shape[d];
        }
        idx
    }
    fn ravel(idx: &[usize], shape: &[usize]) -> usize {
        idx.iter().zip(shape).fold(0, |a, (&i, &s)| a * s + i)
    }

    fn shape() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(1usize..4, 0..5)
    }

    proptest! {
        #[test]
        fn transpose_matches_naive(shape in shape(), seed in any::<u64>()) {
            let mut r = rng(seed);
            let mut perm: Vec<usize> = (0..shape.len()).collect();
            use rand::seq::SliceRandom;
            perm.shuffle(&mut r);
            let x = rand_vec(&mut r, shape.iter().product());
            let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let mut y = vec![f32::NAN; x.len()];
            transpose(&x, &shape, &perm, &mut y);
            let want: Vec<f64> = (0..x.len()).map(|i| {
                let oi = unravel(i, &out);
                let mut ii = vec![0; shape.len()];
                for (d, &p) in perm.iter().enumerate() { ii[p] = oi[d]; }
                x[ravel(&ii, &shape)] as f64
            }).collect();
            assert_close(&y, &want, 0.0, 0.0, "transpose");
        }

        #[test]
        fn slice_matches_naive_and_its_adjoint(shape in shape(), picks in prop::collection::vec((0usize..4, 1isize..3, any::<bool>(), 0usize..4), 5), seed in any::<u64>()) {
            let ranges: Vec<Range1> = shape.iter().zip(&picks).map(|(&d, &(s, st, neg, c))| {
                let start = s.min(d - 1);
                let step = if neg { -st } else { st };
                let avail = if step > 0 { (d - start).div_ceil(step as usize) } else { (start + 1).div_ceil((-step) as usize) };
                Range1 { start, step, count: c.min(avail) }
            }).collect();
            let count: Vec<usize> = ranges.iter().map(|r| r.count).collect();
            let mut r = rng(seed);
            let x = rand_vec(&mut r, shape.iter().product());
            let n: usize = count.iter().product();
            let naive = |xv: &[f64]| -> Vec<f64> {
                (0..n).map(|i| {
                    let oi = unravel(i, &count);
                    let ii: Vec<usize> = oi.iter().zip(&ranges).map(|(&o, r)| (r.start as isize + o as isize * r.step) as usize).collect();
                    xv[ravel(&ii, &shape)]
                }).collect()
            };
            let mut y = vec![f32::NAN; n];
            slice(&x, &shape, &ranges, &mut y);
            assert_close(&y, &naive(&f64s(&x)), 0.0, 0.0, "slice");
            let dy = rand_vec(&mut r, n);
            let mut dx = vec![f32::NAN; x.len()];
            slice_backward(&dy, &shape, &ranges, &mut dx);
            assert_close(&dx, &numeric_grad(naive, &x, &dy), 1e-6, 1e-6, "slice dx");
        }

        #[test]
        fn pad_matches_naive_and_its_adjoint(shape in shape(), raw in prop::collection::vec(-2i64..3, 10), value in -1.0f32..1.0, seed in any::<u64>()) {
            let rk = shape.len();
            let mut pads: Vec<i64> = raw[..2 * rk].to_vec();
            for d in 0..rk {
                // Keep every output axis non-empty.
                while shape[d] as i64 + pads[d] + pads[d + rk] < 1 { pads[d] += 1; }
            }
            let out: Vec<usize> = (0..rk).map(|d| (shape[d] as i64 + pads[d] + pads[d + rk]) as usize).collect();
            let n: usize = out.iter().product();
            let naive = |xv: &[f64]| -> Vec<f64> {
                (0..n).map(|i| {
                    let oi = unravel(i, &out);
                    let ii: Vec<i64> = oi.iter().enumerate().map(|(d, &o)| o as i64 - pads[d]).collect();
                    if ii.iter().zip(&shape).all(|(&v, &s)| v >= 0 && (v as usize) < s) {
                        xv[ravel(&ii.iter().map(|&v| v as usize).collect::<Vec<_>>(), &shape)]
                    } else { value as f64 }
                }).collect()
            };
            let mut r = rng(seed);
            let x = rand_vec(&mut r, shape.iter().product());
            let mut y = vec![f32::NAN; n];
            pad(&x, &shape, &pads, value, &mut y);
            assert_close(&y, &naive(&f64s(&x)), 0.0, 0.0, "pad");
            let dy = rand_vec(&mut r, n);
            let mut dx = vec![f32::NAN; x.len()];
            pad_backward(&dy, &shape, &pads, &mut dx);
            assert_close(&dx, &numeric_grad(naive, &x, &dy), 1e-6, 1e-6, "pad dx");
        }

        #[test]
        fn concat_then_split_round_trips(outer in 1usize..4, inner in prop::collection::vec(0usize..5, 1..4), seed in any::<u64>()) {
            let mut r = rng(seed);
            let parts: Vec<Vec<f32>> = inner.iter().map(|&l| rand_vec(&mut r, outer * l)).collect();
            let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
            let mut y = vec![f32::NAN; outer * inner.iter().sum::<usize>()];
            concat(&refs, outer, &inner, &mut y);
            for o in 0..outer {
                let row: Vec<f32> = parts.iter().zip(&inner).flat_map(|(p, &l)| p[o * l..(o + 1) * l].to_vec()).collect();
                prop_assert_eq!(&y[o * row.len()..(o + 1) * row.len()], &row[..]);
            }
            let mut back: Vec<Vec<f32>> = inner.iter().map(|&l| vec![f32::NAN; outer * l]).collect();
            let mut outs: Vec<&mut [f32]> = back.iter_mut().map(|b| b.as_mut_slice()).collect();
            split(&y, outer, &inner, &mut outs);
            prop_assert_eq!(back, parts);
        }
    }
}
