//! Safe wrapper over the `gemm` crate's strided f32 matrix product, the one place in the
//! engine that needs `unsafe`: `gemm::gemm` takes raw pointers and strides. Every call here
//! checks that each element the strides can address lies inside its slice, and the borrow
//! checker guarantees `dst` does not alias the operands, which is all the crate requires.
#![allow(unsafe_code)]

use gemm::Parallelism;

/// A read-only strided matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows x cols` matrix stored contiguously.
    pub fn rows(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns, without copying.
    pub fn rows_t(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// Whether the product may use the current rayon pool's threads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Par {
    /// Single-threaded: the caller already parallelises around this call.
    Seq,
    /// Split over `rayon::current_num_threads()` threads (of the pool the caller installed).
    Pool,
}

fn reach(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs
}

/// `dst = alpha * a @ b` (or `dst += alpha * a @ b` when `accumulate`), where `a` is `m x k`,
/// `b` is `k x n` and `dst` is row-major `m x n` with row stride `dst_rs`.
///
/// Panics when a stride addresses outside a slice: callers derive strides from shapes they
/// have checked, so that is an engine bug, not bad input.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    alpha: f32,
    accumulate: bool,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_rs >= n,
        "dst row stride {dst_rs} is shorter than a row of {n}"
    );
    assert!(
        reach(m, n, dst_rs, 1) < dst.len(),
        "dst ({} values) is too small for {m}x{n}",
        dst.len()
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        reach(m, k, a.rs, a.cs) < a.data.len(),
        "lhs ({} values) is too small for {m}x{k}",
        a.data.len()
    );
    assert!(
        reach(k, n, b.rs, b.cs) < b.data.len(),
        "rhs ({} values) is too small for {k}x{n}",
        b.data.len()
    );
    let parallelism = match par {
        Par::Pool if rayon::current_num_threads() > 1 => {
            Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => Parallelism::None,
    };
    // SAFETY: the asserts above keep every addressed element of dst, lhs and rhs inside its
    // slice; dst rows do not overlap (dst_rs >= n, column stride 1), so distinct (i, j) are
    // distinct elements; `&mut dst` cannot alias `a.data` or `b.data`. gemm reads dst only
    // when `read_dst` is true.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    out[i * n + j] +=
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_naive(m in 1usize..9, n in 1usize..9, k in 0usize..9, ta: bool, tb: bool, acc: bool,
                         seed in any::<u64>()) {
            let mut s = seed;
            let mut rnd = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5 };
            let av: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let a = if ta { Mat::rows_t(&av, m) } else { Mat::rows(&av, k) };
            let b = if tb { Mat::rows_t(&bv, k) } else { Mat::rows(&bv, n) };
            let init: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let mut dst = init.clone();
            matmul(m, n, k, &mut dst, n, a, b, 0.5, acc, Par::Pool);
            let want = naive(m, n, k, a, b);
            for i in 0..m * n {
                let w = 0.5 * want[i] + if acc { init[i] as f64 } else { 0.0 };
                prop_assert!((dst[i] as f64 - w).abs() < 1e-5, "{} vs {}", dst[i], w);
            }
        }
    }
}
