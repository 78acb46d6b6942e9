//! Add, Sub, Mul and Div with NumPy broadcasting; gradients are summed over the broadcast
//! axes back to each operand's shape.

use rayon::prelude::*;

use super::{group_len, threads, PAR_MIN_ELEMS};
use crate::engine::simd::multiversion;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    #[inline(always)]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
        }
    }
    /// d(a op b)/da.
    #[inline(always)]
    fn da(self, _a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add | BinOp::Sub => 1.0,
            BinOp::Mul => b,
            BinOp::Div => 1.0 / b,
        }
    }
    /// d(a op b)/db.
    #[inline(always)]
    fn db(self, a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add => 1.0,
            BinOp::Sub => -1.0,
            BinOp::Mul => a,
            BinOp::Div => -a / (b * b),
        }
    }
}

/// How two shapes broadcast, with runs of axes that broadcast alike merged so that the
/// innermost loop is as long as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bcast {
    pub a_shape: Vec<usize>,
    pub b_shape: Vec<usize>,
    pub out_shape: Vec<usize>,
    dims: Vec<usize>,
    sa: Vec<usize>,
    sb: Vec<usize>,
}

impl Bcast {
    /// None when the shapes do not broadcast.
    pub fn new(a: &[usize], b: &[usize]) -> Option<Bcast> {
        let out = crate::onnx::shape::broadcast(a, b)?;
        let r = out.len();
        let pad = |s: &[usize]| -> Vec<usize> {
            std::iter::repeat_n(1, r - s.len())
                .chain(s.iter().copied())
                .collect()
        };
        let (pa, pb) = (pad(a), pad(b));
        // Merge neighbouring axes with the same (a broadcast, b broadcast) pattern.
        let mut dims: Vec<(usize, bool, bool)> = Vec::new();
        for d in 0..r {
            if out[d] == 1 {
                continue;
            }
            let key = (pa[d] == 1, pb[d] == 1);
            match dims.last_mut() {
                Some(last) if (last.1, last.2) == key => last.0 *= out[d],
                _ => dims.push((out[d], key.0, key.1)),
            }
        }
        let strides = |pick: fn(&(usize, bool, bool)) -> bool| {
            let mut s = vec![0; dims.len()];
            let mut acc = 1;
            for d in (0..dims.len()).rev() {
                if !pick(&dims[d]) {
                    s[d] = acc;
                    acc *= dims[d].0;
                }
            }
            s
        };
        let sa = strides(|d| d.1);
        let sb = strides(|d| d.2);
        Some(Bcast {
            a_shape: a.to_vec(),
            b_shape: b.to_vec(),
            out_shape: out,
            dims: dims.iter().map(|d| d.0).collect(),
            sa,
            sb,
        })
    }

    pub fn out_len(&self) -> usize {
        self.out_shape.iter().product()
    }

    fn inner(&self) -> (usize, usize, usize) {
        match self.dims.len() {
            0 => (1, 0, 0),
            k => (self.dims[k - 1], self.sa[k - 1], self.sb[k - 1]),
        }
    }

    /// Offsets into `a` and `b` of the first element of output row `r`.
    #[inline]
    fn row_offsets(&self, mut r: usize) -> (usize, usize) {
        let (mut oa, mut ob) = (0, 0);
        for d in (0..self.dims.len().saturating_sub(1)).rev() {
            let i = r % self.dims[d];
            r /= self.dims[d];
            oa += i * self.sa[d];
            ob += i * self.sb[d];
        }
        (oa, ob)
    }
}

multiversion! {
    /// Output rows `first..` of `a op b` into `chunk`.
    fn forward_rows(op: BinOp, bc: &Bcast, a: &[f32], b: &[f32], first: usize, chunk: &mut [f32]) {
        let (len, sa, sb) = bc.inner();
        for (i, row) in chunk.chunks_mut(len).enumerate() {
            let (oa, ob) = bc.row_offsets(first + i);
            macro_rules! rowloop {
                ($op:expr) => {
                    match (sa, sb) {
                        (0, _) => {
                            let av = a[oa];
                            for (o, &bv) in row.iter_mut().zip(&b[ob..ob + len]) {
                                *o = $op.apply(av, bv);
                            }
                        }
                        (_, 0) => {
                            let bv = b[ob];
                            for (o, &av) in row.iter_mut().zip(&a[oa..oa + len]) {
                                *o = $op.apply(av, bv);
                            }
                        }
                        _ => {
                            for ((o, &av), &bv) in
                                row.iter_mut().zip(&a[oa..oa + len]).zip(&b[ob..ob + len])
                            {
                                *o = $op.apply(av, bv);
                            }
                        }
                    }
                };
            }
            match op {
                BinOp::Add => rowloop!(BinOp::Add),
                BinOp::Sub => rowloop!(BinOp::Sub),
                BinOp::Mul => rowloop!(BinOp::Mul),
                BinOp::Div => rowloop!(BinOp::Div),
            }
        }
    }
}

/// `out = a op b` with broadcasting.
pub fn forward(op: BinOp, bc: &Bcast, a: &[f32], b: &[f32], out: &mut [f32]) {
    let (len, _, _) = bc.inner();
    let rows_per = rows_per_task(out.len(), len);
    par_rows(out, len, rows_per, |first, chunk| {
        forward_rows(op, bc, a, b, first, chunk)
    });
}

/// Gradients of `a op b`: `da` and `db` (when asked for) are overwritten with `dy` times the
/// partial derivative, summed over the axes along which that operand was broadcast.
pub fn backward(
    op: BinOp,
    bc: &Bcast,
    a: &[f32],
    b: &[f32],
    dy: &[f32],
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    if let Some(da) = da {
        operand_grad(bc, dy, da, true, |av, bv| op.da(av, bv), a, b);
    }
    if let Some(db) = db {
        operand_grad(bc, dy, db, false, |av, bv| op.db(av, bv), a, b);
    }
}

fn operand_grad(
    bc: &Bcast,
    dy: &[f32],
    d: &mut [f32],
    for_a: bool,
    f: impl Fn(f32, f32) -> f32 + Sync,
    a: &[f32],
    b: &[f32],
) {
    let (len, sa, sb) = bc.inner();
    let full = d.len() == dy.len();
    if full {
        // No broadcast on this side: element-wise, rows in parallel.
        let rows_per = rows_per_task(dy.len(), len);
        par_rows(d, len, rows_per, |first, chunk| {
            for (i, row) in chunk.chunks_mut(len).enumerate() {
                let r = first + i;
                let (oa, ob) = bc.row_offsets(r);
                let g = &dy[r * len..][..len];
                for (j, o) in row.iter_mut().enumerate() {
                    *o = g[j] * f(a[oa + j * sa], b[ob + j * sb]);
                }
            }
        });
        return;
    }
    // Broadcast side: sums in row order, one thread, so the order is fixed.
    d.fill(0.0);
    let s_own = if for_a { sa } else { sb };
    for r in 0..dy.len() / len.max(1) {
        let (oa, ob) = bc.row_offsets(r);
        let g = &dy[r * len..][..len];
        let own = if for_a { oa } else { ob };
        if s_own == 0 {
            let mut acc = 0f32;
            for (j, &gv) in g.iter().enumerate() {
                acc += gv * f(a[oa + j * sa], b[ob + j * sb]);
            }
            d[own] += acc;
        } else {
            for (j, &gv) in g.iter().enumerate() {
                d[own + j] += gv * f(a[oa + j * sa], b[ob + j * sb]);
            }
        }
    }
}

fn rows_per_task(total: usize, len: usize) -> usize {
    let rows = total / len.max(1);
    if total < PAR_MIN_ELEMS || threads() == 1 {
        rows.max(1)
    } else {
        group_len(rows, len)
    }
}

fn par_rows(
    out: &mut [f32],
    len: usize,
    rows_per: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let chunk = (len * rows_per).max(1);
    if chunk >= out.len() {
        f(0, out);
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * rows_per, c));
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

    /// Index of the operand element read for output index `idx` (NumPy rules).
    fn src(idx: &[usize], shape: &[usize]) -> usize {
        let off = idx.len() - shape.len();
        shape.iter().enumerate().fold(0, |acc, (d, &s)| {
            acc * s + if s == 1 { 0 } else { idx[off + d] }
        })
    }

    fn naive(op: BinOp, a_shape: &[usize], b_shape: &[usize], a: &[f64], b: &[f64]) -> Vec<f64> {
        let out = crate::onnx::shape::broadcast(a_shape, b_shape).unwrap();
        (0..out.iter().product())
            .map(|i| {
                let idx = unravel(i, &out);
                let (x, y) = (a[src(&idx, a_shape)], b[src(&idx, b_shape)]);
                match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                }
            })
            .collect()
    }

    /// Analytic gradients by the same index mapping, summed over broadcast positions.
    fn naive_grads(
        op: BinOp,
        a_shape: &[usize],
        b_shape: &[usize],
        a: &[f64],
        b: &[f64],
        dy: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        let out = crate::onnx::shape::broadcast(a_shape, b_shape).unwrap();
        let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
        for i in 0..dy.len() {
            let idx = unravel(i, &out);
            let (ia, ib) = (src(&idx, a_shape), src(&idx, b_shape));
            let (x, y) = (a[ia], b[ib]);
            let (ga, gb) = match op {
                BinOp::Add => (1.0, 1.0),
                BinOp::Sub => (1.0, -1.0),
                BinOp::Mul => (y, x),
                BinOp::Div => (1.0 / y, -x / (y * y)),
            };
            da[ia] += dy[i] * ga;
            db[ib] += dy[i] * gb;
        }
        (da, db)
    }

    fn shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        prop::collection::vec((1usize..4, any::<bool>(), any::<bool>()), 0..5).prop_flat_map(
            |dims| {
                let a: Vec<usize> = dims
                    .iter()
                    .map(|&(d, ba, _)| if ba { 1 } else { d })
                    .collect();
                let b: Vec<usize> = dims
                    .iter()
                    .map(|&(d, _, bb)| if bb { 1 } else { d })
                    .collect();
                (0..=a.len(), 0..=b.len())
                    .prop_map(move |(ca, cb)| (a[ca..].to_vec(), b[cb..].to_vec()))
            },
        )
    }

    fn check(a_shape: &[usize], b_shape: &[usize], seed: u64) {
        let bc = Bcast::new(a_shape, b_shape).unwrap();
        let mut r = rng(seed);
        let a = rand_vec(&mut r, a_shape.iter().product());
        // Keep divisors away from zero.
        let b: Vec<f32> = rand_vec(&mut r, b_shape.iter().product())
            .iter()
            .map(|v| v.signum() * (0.5 + v.abs()))
            .collect();
        let dy = rand_vec(&mut r, bc.out_len());
        for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
            let mut y = vec![f32::NAN; bc.out_len()];
            forward(op, &bc, &a, &b, &mut y);
            let want = naive(op, a_shape, b_shape, &f64s(&a), &f64s(&b));
            assert_close(
                &y,
                &want,
                1e-6,
                1e-6,
                &format!("{op:?} {a_shape:?} {b_shape:?}"),
            );
            let mut da = vec![f32::NAN; a.len()];
            let mut db = vec![f32::NAN; b.len()];
            backward(op, &bc, &a, &b, &dy, Some(&mut da), Some(&mut db));
            let (na, nb) = naive_grads(op, a_shape, b_shape, &f64s(&a), &f64s(&b), &f64s(&dy));
            assert_close(
                &da,
                &na,
                1e-5,
                1e-5,
                &format!("{op:?} da {a_shape:?} {b_shape:?}"),
            );
            assert_close(
                &db,
                &nb,
                1e-5,
                1e-5,
                &format!("{op:?} db {a_shape:?} {b_shape:?}"),
            );
            if bc.out_len() <= 256 {
                let fa = numeric_grad(|av| naive(op, a_shape, b_shape, av, &f64s(&b)), &a, &dy);
                let fb = numeric_grad(|bv| naive(op, a_shape, b_shape, &f64s(&a), bv), &b, &dy);
                assert_close(
                    &da,
                    &fa,
                    1e-4,
                    1e-4,
                    &format!("{op:?} da vs finite differences"),
                );
                assert_close(
                    &db,
                    &fb,
                    1e-4,
                    1e-4,
                    &format!("{op:?} db vs finite differences"),
                );
            }
        }
    }

    proptest! {
        #[test]
        fn matches_naive_and_finite_differences((a, b) in shapes(), seed in any::<u64>()) {
            check(&a, &b, seed);
        }
    }

    #[test]
    fn large_per_channel_and_same_shape() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            check(&[4, 16, 30, 30], &[1, 16, 1, 1], 1);
            check(&[4, 16, 30, 30], &[4, 16, 30, 30], 2);
            check(&[1], &[4, 16, 30, 30], 3);
        });
    }
}
