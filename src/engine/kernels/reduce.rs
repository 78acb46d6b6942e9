//! ReduceMean over any set of axes.

/// Which axes of `shape` are averaged away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReduceGeom {
    pub shape: Vec<usize>,
    pub axes: Vec<bool>,
}

impl ReduceGeom {
    /// Number of outputs (the kept axes' product).
    pub fn out_len(&self) -> usize {
        self.shape
            .iter()
            .zip(&self.axes)
            .filter(|(_, &r)| !r)
            .map(|(&d, _)| d)
            .product()
    }
    /// Values averaged into each output.
    pub fn count(&self) -> usize {
        self.shape
            .iter()
            .zip(&self.axes)
            .filter(|(_, &r)| r)
            .map(|(&d, _)| d)
            .product()
    }
    /// Stride into the output of each input axis (0 for reduced axes).
    fn out_strides(&self) -> Vec<usize> {
        let mut s = vec![0; self.shape.len()];
        let mut acc = 1;
        for d in (0..self.shape.len()).rev() {
            if !self.axes[d] {
                s[d] = acc;
                acc *= self.shape[d];
            }
        }
        s
    }
    /// Calls `f(input_index, output_index)` for every input element in order.
    fn walk(&self, mut f: impl FnMut(usize, usize)) {
        let os = self.out_strides();
        let r = self.shape.len();
        let n: usize = self.shape.iter().product();
        let mut idx = vec![0; r];
        let mut o = 0;
        for i in 0..n {
            f(i, o);
            for d in (0..r).rev() {
                idx[d] += 1;
                o += os[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                o -= os[d] * self.shape[d];
                idx[d] = 0;
            }
        }
    }
}

pub fn mean_forward(g: &ReduceGeom, x: &[f32], y: &mut [f32]) {
    let mut acc = vec![0f64; g.out_len()];
    g.walk(|i, o| acc[o] += x[i] as f64);
    let inv = 1.0 / g.count().max(1) as f64;
    for (v, a) in y.iter_mut().zip(acc) {
        *v = (a * inv) as f32;
    }
}

/// `dx` is overwritten with each output's gradient spread evenly over its inputs.
pub fn mean_backward(g: &ReduceGeom, dy: &[f32], dx: &mut [f32]) {
    let inv = 1.0 / g.count().max(1) as f32;
    g.walk(|i, o| dx[i] = dy[o] * inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_naive_and_finite_differences(dims in prop::collection::vec((1usize..4, any::<bool>()), 0..5), seed in any::<u64>()) {
            let g = ReduceGeom { shape: dims.iter().map(|d| d.0).collect(), axes: dims.iter().map(|d| d.1).collect() };
            let n: usize = g.shape.iter().product();
            let naive = |x: &[f64]| -> Vec<f64> {
                let mut out = vec![0.0; g.out_len()];
                for (i, &v) in x.iter().enumerate() {
                    // Output index: drop the reduced coordinates.
                    let mut rem = i;
                    let mut coords = vec![0; g.shape.len()];
                    for d in (0..g.shape.len()).rev() { coords[d] = rem % g.shape[d]; rem /= g.shape[d]; }
                    let o = (0..g.shape.len()).filter(|&d| !g.axes[d]).fold(0, |a, d| a * g.shape[d] + coords[d]);
                    out[o] += v / g.count() as f64;
                }
                out
            };
            let mut r = rng(seed);
            let x = rand_vec(&mut r, n);
            let dy = rand_vec(&mut r, g.out_len());
            let mut y = vec![f32::NAN; g.out_len()];
            mean_forward(&g, &x, &mut y);
            assert_close(&y, &naive(&f64s(&x)), 1e-6, 1e-6, "reduce mean");
            let mut dx = vec![f32::NAN; n];
            mean_backward(&g, &dy, &mut dx);
            assert_close(&dx, &numeric_grad(naive, &x, &dy), 1e-5, 1e-5, "reduce mean dx");
        }
    }
}
