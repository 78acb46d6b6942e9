//! ONNX Gemm (`alpha * op(A) @ op(B) + beta * C`) and MatMul (NumPy batched matmul with
//! broadcast batch axes), forward and backward, on the `gemm` crate.

use crate::engine::linalg::{matmul, Mat, Par};

/// A resolved Gemm: `op(A)` is `m x k`, `op(B)` is `k x n`, `C` broadcasts to `m x n`
/// from `c_rows x c_cols` (each 1 or full).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmGeom {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub c_rows: usize,
    pub c_cols: usize,
}

impl GemmGeom {
    fn a<'a>(&self, a: &'a [f32]) -> Mat<'a> {
        if self.trans_a {
            Mat::rows_t(a, self.m)
        } else {
            Mat::rows(a, self.k)
        }
    }
    fn b<'a>(&self, b: &'a [f32]) -> Mat<'a> {
        if self.trans_b {
            Mat::rows_t(b, self.k)
        } else {
            Mat::rows(b, self.n)
        }
    }
}

fn t(m: Mat) -> Mat {
    Mat {
        data: m.data,
        rs: m.cs,
        cs: m.rs,
    }
}

pub fn gemm_forward(g: &GemmGeom, a: &[f32], b: &[f32], c: Option<&[f32]>, y: &mut [f32]) {
    let acc = match c {
        Some(c) if g.beta != 0.0 => {
            for i in 0..g.m {
                let cr = if g.c_rows == 1 { 0 } else { i };
                for j in 0..g.n {
                    let cc = if g.c_cols == 1 { 0 } else { j };
                    y[i * g.n + j] = g.beta * c[cr * g.c_cols + cc];
                }
            }
            true
        }
        _ => false,
    };
    matmul(
        g.m,
        g.n,
        g.k,
        y,
        g.n,
        g.a(a),
        g.b(b),
        g.alpha,
        acc,
        Par::Pool,
    );
}

/// Gradients of a Gemm; each requested output is overwritten.
pub fn gemm_backward(
    g: &GemmGeom,
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dc: Option<&mut [f32]>,
) {
    let dym = Mat::rows(dy, g.n);
    if let Some(da) = da {
        if g.trans_a {
            // A is stored k x m: dA = alpha * op(B) @ dY^T.
            matmul(
                g.k,
                g.m,
                g.n,
                da,
                g.m,
                g.b(b),
                t(dym),
                g.alpha,
                false,
                Par::Pool,
            );
        } else {
            matmul(
                g.m,
                g.k,
                g.n,
                da,
                g.k,
                dym,
                t(g.b(b)),
                g.alpha,
                false,
                Par::Pool,
            );
        }
    }
    if let Some(db) = db {
        if g.trans_b {
            // B is stored n x k: dB = alpha * dY^T @ op(A).
            matmul(
                g.n,
                g.k,
                g.m,
                db,
                g.k,
                t(dym),
                g.a(a),
                g.alpha,
                false,
                Par::Pool,
            );
        } else {
            matmul(
                g.k,
                g.n,
                g.m,
                db,
                g.n,
                t(g.a(a)),
                dym,
                g.alpha,
                false,
                Par::Pool,
            );
        }
    }
    if let Some(dc) = dc {
        dc.fill(0.0);
        for i in 0..g.m {
            let cr = if g.c_rows == 1 { 0 } else { i };
            for j in 0..g.n {
                let cc = if g.c_cols == 1 { 0 } else { j };
                dc[cr * g.c_cols + cc] += g.beta * dy[i * g.n + j];
            }
        }
    }
}

/// A resolved MatMul: for each output batch `i`, `Y[i] = A[a_off[i]] @ B[b_off[i]]` with
/// `m x k` and `k x n` blocks (1-D operands already promoted to matrices).
#[derive(Debug, Clone, PartialEq)]
pub struct MatMulGeom {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Block offsets (in blocks, not values) of A and B for each output block.
    pub offsets: Vec<(usize, usize)>,
}

impl MatMulGeom {
    /// None when the shapes are not a valid MatMul (ONNX / NumPy `matmul` rules).
    pub fn new(a: &[usize], b: &[usize]) -> Option<(MatMulGeom, Vec<usize>)> {
        if a.is_empty() || b.is_empty() {
            return None;
        }
        let a2: Vec<usize> = if a.len() == 1 {
            vec![1, a[0]]
        } else {
            a.to_vec()
        };
        let b2: Vec<usize> = if b.len() == 1 {
            vec![b[0], 1]
        } else {
            b.to_vec()
        };
        let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
        let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
        if k != k2 {
            return None;
        }
        let (ab, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
        let batch = crate::onnx::shape::broadcast(ab, bb)?;
        let total: usize = batch.iter().product();
        let r = batch.len();
        let pad = |s: &[usize]| -> Vec<usize> {
            std::iter::repeat_n(1, r - s.len())
                .chain(s.iter().copied())
                .collect()
        };
        let (pa, pb) = (pad(ab), pad(bb));
        let offsets = (0..total)
            .map(|mut i| {
                let (mut oa, mut ob, mut sa, mut sb) = (0, 0, 1, 1);
                for d in (0..r).rev() {
                    let idx = i % batch[d];
                    i /= batch[d];
                    if pa[d] != 1 {
                        oa += idx * sa;
                    }
                    if pb[d] != 1 {
                        ob += idx * sb;
                    }
                    sa *= pa[d];
                    sb *= pb[d];
                }
                (oa, ob)
            })
            .collect();
        let mut out = batch;
        if a.len() > 1 {
            out.push(m);
        }
        if b.len() > 1 {
            out.push(n);
        }
        Some((MatMulGeom { m, n, k, offsets }, out))
    }
}

pub fn matmul_forward(g: &MatMulGeom, a: &[f32], b: &[f32], y: &mut [f32]) {
    let (mk, kn, mn) = (g.m * g.k, g.k * g.n, g.m * g.n);
    for (i, &(oa, ob)) in g.offsets.iter().enumerate() {
        matmul(
            g.m,
            g.n,
            g.k,
            &mut y[i * mn..][..mn],
            g.n,
            Mat::rows(&a[oa * mk..][..mk], g.k),
            Mat::rows(&b[ob * kn..][..kn], g.n),
            1.0,
            false,
            Par::Pool,
        );
    }
}

/// Gradients of a MatMul, summed over broadcast batch blocks in block order; each requested
/// output is overwritten.
pub fn matmul_backward(
    g: &MatMulGeom,
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let (mk, kn, mn) = (g.m * g.k, g.k * g.n, g.m * g.n);
    if let Some(da) = da {
        let mut seen = vec![false; da.len() / mk.max(1)];
        for (i, &(oa, ob)) in g.offsets.iter().enumerate() {
            let dym = Mat::rows(&dy[i * mn..][..mn], g.n);
            let bt = Mat::rows_t(&b[ob * kn..][..kn], g.n);
            matmul(
                g.m,
                g.k,
                g.n,
                &mut da[oa * mk..][..mk],
                g.k,
                dym,
                bt,
                1.0,
                seen[oa],
                Par::Pool,
            );
            seen[oa] = true;
        }
    }
    if let Some(db) = db {
        let mut seen = vec![false; db.len() / kn.max(1)];
        for (i, &(oa, ob)) in g.offsets.iter().enumerate() {
            let dym = Mat::rows(&dy[i * mn..][..mn], g.n);
            let at = Mat::rows_t(&a[oa * mk..][..mk], g.k);
            matmul(
                g.k,
                g.n,
                g.m,
                &mut db[ob * kn..][..kn],
                g.n,
                at,
                dym,
                1.0,
                seen[ob],
                Par::Pool,
            );
            seen[ob] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    fn naive_gemm(g: &GemmGeom, a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; g.m * g.n];
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0.0;
                for p in 0..g.k {
                    let av = if g.trans_a {
                        a[p * g.m + i]
                    } else {
                        a[i * g.k + p]
                    };
                    let bv = if g.trans_b {
                        b[j * g.k + p]
                    } else {
                        b[p * g.n + j]
                    };
                    s += av * bv;
                }
                let cv = c[(if g.c_rows == 1 { 0 } else { i }) * g.c_cols
                    + if g.c_cols == 1 { 0 } else { j }];
                y[i * g.n + j] = g.alpha as f64 * s + g.beta as f64 * cv;
            }
        }
        y
    }

    proptest! {
        #[test]
        fn gemm_matches_naive_and_finite_differences(m in 1usize..6, n in 1usize..6, k in 1usize..6, ta: bool, tb: bool,
                                                     cr: bool, cc: bool, seed in any::<u64>()) {
            let g = GemmGeom { m, n, k, trans_a: ta, trans_b: tb, alpha: 0.7, beta: 1.3, c_rows: if cr { m } else { 1 }, c_cols: if cc { n } else { 1 } };
            let mut r = rng(seed);
            let a = rand_vec(&mut r, m * k);
            let b = rand_vec(&mut r, k * n);
            let c = rand_vec(&mut r, g.c_rows * g.c_cols);
            let dy = rand_vec(&mut r, m * n);
            let mut y = vec![f32::NAN; m * n];
            gemm_forward(&g, &a, &b, Some(&c), &mut y);
            assert_close(&y, &naive_gemm(&g, &f64s(&a), &f64s(&b), &f64s(&c)), 1e-5, 1e-5, "gemm");
            let (mut da, mut db, mut dc) = (vec![f32::NAN; a.len()], vec![f32::NAN; b.len()], vec![f32::NAN; c.len()]);
            gemm_backward(&g, &a, &b, &dy, Some(&mut da), Some(&mut db), Some(&mut dc));
            assert_close(&da, &numeric_grad(|v| naive_gemm(&g, v, &f64s(&b), &f64s(&c)), &a, &dy), 1e-4, 1e-4, "gemm da");
            assert_close(&db, &numeric_grad(|v| naive_gemm(&g, &f64s(&a), v, &f64s(&c)), &b, &dy), 1e-4, 1e-4, "gemm db");
            assert_close(&dc, &numeric_grad(|v| naive_gemm(&g, &f64s(&a), &f64s(&b), v), &c, &dy), 1e-4, 1e-4, "gemm dc");
        }

        #[test]
        fn matmul_matches_naive_and_finite_differences(batch in prop::collection::vec((1usize..3, any::<bool>(), any::<bool>()), 0..3),
                                                       m in 1usize..4, n in 1usize..4, k in 1usize..4, va: bool, vb: bool, seed in any::<u64>()) {
            let mut sa: Vec<usize> = batch.iter().map(|&(d, x, _)| if x { 1 } else { d }).collect();
            let mut sb: Vec<usize> = batch.iter().map(|&(d, _, x)| if x { 1 } else { d }).collect();
            sa.extend([m, k]);
            sb.extend([k, n]);
            // 1-D operands, as NumPy promotes them.
            if va && batch.is_empty() { sa = vec![k]; }
            if vb && batch.is_empty() { sb = vec![k]; }
            let (g, out) = MatMulGeom::new(&sa, &sb).unwrap();
            let naive = |a: &[f64], b: &[f64]| -> Vec<f64> {
                let mut y = vec![0.0; out.iter().product()];
                let (mk, kn, mn) = (g.m * g.k, g.k * g.n, g.m * g.n);
                for (i, &(oa, ob)) in g.offsets.iter().enumerate() {
                    for r in 0..g.m { for c in 0..g.n { for p in 0..g.k {
                        y[i * mn + r * g.n + c] += a[oa * mk + r * g.k + p] * b[ob * kn + p * g.n + c];
                    }}}
                }
                y
            };
            let mut r = rng(seed);
            let a = rand_vec(&mut r, sa.iter().product());
            let b = rand_vec(&mut r, sb.iter().product());
            let dy = rand_vec(&mut r, out.iter().product());
            let mut y = vec![f32::NAN; dy.len()];
            matmul_forward(&g, &a, &b, &mut y);
            assert_close(&y, &naive(&f64s(&a), &f64s(&b)), 1e-5, 1e-5, "matmul");
            let (mut da, mut db) = (vec![f32::NAN; a.len()], vec![f32::NAN; b.len()]);
            matmul_backward(&g, &a, &b, &dy, Some(&mut da), Some(&mut db));
            assert_close(&da, &numeric_grad(|v| naive(v, &f64s(&b)), &a, &dy), 1e-4, 1e-4, "matmul da");
            assert_close(&db, &numeric_grad(|v| naive(&f64s(&a), v), &b, &dy), 1e-4, 1e-4, "matmul db");
        }
    }

    #[test]
    fn matmul_shapes() {
        assert_eq!(
            MatMulGeom::new(&[2, 1, 3, 4], &[5, 4, 6]).unwrap().1,
            vec![2, 5, 3, 6]
        );
        assert_eq!(MatMulGeom::new(&[4], &[4, 6]).unwrap().1, vec![6]);
        assert_eq!(MatMulGeom::new(&[3, 4], &[4]).unwrap().1, vec![3]);
        assert!(MatMulGeom::new(&[3, 4], &[5, 6]).is_none());
    }
}
