//! CPU kernels: each op's forward and backward on plain slices with explicit geometry.
//!
//! Kernels parallelise over the rayon pool the caller installed (`pool.install(..)`), and
//! matrix products use the same pool (see `linalg::Par::Pool`), so one knob sets the thread
//! count. Work is split into a number of contiguous groups that depends only on the sizes and
//! on `rayon::current_num_threads()`, and every reduction adds in a fixed order, so results
//! are bit-identical across runs with the same thread count.

pub mod act;
pub mod binary;
pub mod bn;
pub mod conv;
pub mod layout;
pub mod matmul;
pub mod pool;
pub mod quant;
pub mod reduce;
pub mod softmax;
pub mod window;

use rayon::prelude::*;

/// Below this many values an element-wise pass is not worth handing to other threads.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Items per parallel group so that `items` split into at most `threads()` groups, or into
/// one group when the whole job (`work_per_item * items`) is too small to share.
pub(crate) fn group_len(items: usize, work_per_item: usize) -> usize {
    let t = threads();
    if t == 1 || items <= 1 || work_per_item.saturating_mul(items) < PAR_MIN_ELEMS {
        return items.max(1);
    }
    items.div_ceil(t)
}

/// Calls `f(first_item, chunk)` for consecutive groups of items, where each item owns
/// `per_item` values of `out`; groups run in parallel.
pub(crate) fn for_each_group(
    out: &mut [f32],
    per_item: usize,
    group: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let chunk = (per_item * group).max(1);
    if out.len() <= chunk {
        f(0, out);
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * group, c));
    }
}

/// `y[i] = f(x[i])` over chunks, in parallel for large inputs.
pub(crate) fn map_into(x: &[f32], y: &mut [f32], f: impl Fn(&[f32], &mut [f32]) + Sync + Send) {
    debug_assert_eq!(x.len(), y.len());
    let chunk = elem_chunk(x.len());
    if chunk >= x.len() {
        f(x, y);
    } else {
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| f(x, y));
    }
}

/// `out[i] = f(a[i], b[i])` over chunks, in parallel for large inputs.
pub(crate) fn zip_into(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync + Send,
) {
    debug_assert!(a.len() == out.len() && b.len() == out.len());
    let chunk = elem_chunk(out.len());
    if chunk >= out.len() {
        f(a, b, out);
    } else {
        out.par_chunks_mut(chunk)
            .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
            .for_each(|(o, (a, b))| f(a, b, o));
    }
}

fn elem_chunk(len: usize) -> usize {
    if len < PAR_MIN_ELEMS || threads() == 1 {
        len.max(1)
    } else {
        // A few chunks per thread balance load; sizes stay a multiple of 16 lanes.
        (len.div_ceil(threads() * 4)).next_multiple_of(16)
    }
}

/// Range of output positions `o` in `0..out_len` whose input index `o * stride + offset`
/// falls inside `0..in_len`.
#[inline]
pub(crate) fn valid_range(
    out_len: usize,
    stride: usize,
    offset: isize,
    in_len: usize,
) -> (usize, usize) {
    let lo = if offset < 0 {
        ((-offset) as usize).div_ceil(stride)
    } else {
        0
    };
    let hi = if (in_len as isize) <= offset {
        0
    } else {
        (in_len as isize - offset) as usize
    }
    .div_ceil(stride);
    let hi = hi.min(out_len);
    (lo.min(hi), hi)
}

/// Sum of a slice with eight f64 lanes, in a fixed order.
#[inline]
pub(crate) fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += c[l] as f64;
        }
    }
    let tail: f64 = it.remainder().iter().map(|&v| v as f64).sum();
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for out_len in 0..7 {
            for stride in 1..4 {
                for offset in -5isize..6 {
                    for in_len in 0..8 {
                        let ok: Vec<usize> = (0..out_len)
                            .filter(|&o| {
                                (0..in_len as isize)
                                    .contains(&(o as isize * stride as isize + offset))
                            })
                            .collect();
                        let (lo, hi) = valid_range(out_len, stride, offset, in_len);
                        assert_eq!(
                            (lo..hi).collect::<Vec<_>>(),
                            ok,
                            "{out_len} {stride} {offset} {in_len}"
                        );
                    }
                }
            }
        }
    }
}
