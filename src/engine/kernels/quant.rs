//! QuantizeLinear and DequantizeLinear (per-tensor or per-axis, int8 or uint8), forward
//! only. Quantized values are carried as f32 holding exact integers.

/// Scales and zero points laid out as `outer x len x inner` around the quantization axis
/// (`len == 1` for per-tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantGeom {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    pub scale: Vec<f32>,
    pub zero_point: Vec<f32>,
    /// Saturation range of the integer type: [0, 255] for uint8, [-128, 127] for int8.
    pub qmin: f32,
    pub qmax: f32,
}

impl QuantGeom {
    fn for_each(&self, x: &[f32], y: &mut [f32], f: impl Fn(f32, f32, f32) -> f32) {
        for o in 0..self.outer {
            for k in 0..self.len {
                let (s, z) = (self.scale[k], self.zero_point[k]);
                let base = (o * self.len + k) * self.inner;
                for (d, &v) in y[base..base + self.inner]
                    .iter_mut()
                    .zip(&x[base..base + self.inner])
                {
                    *d = f(v, s, z);
                }
            }
        }
    }
}

/// `y = saturate(round_half_to_even(x / scale) + zero_point)`, as ONNX Runtime computes it
/// (the division in f32).
pub fn quantize(g: &QuantGeom, x: &[f32], y: &mut [f32]) {
    let (lo, hi) = (g.qmin, g.qmax);
    g.for_each(x, y, |v, s, z| {
        ((v / s).round_ties_even() + z).clamp(lo, hi)
    });
}

/// `y = (x - zero_point) * scale`.
pub fn dequantize(g: &QuantGeom, x: &[f32], y: &mut [f32]) {
    g.for_each(x, y, |v, s, z| (v - z) * s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testutil::*;
    use proptest::prelude::*;

    #[test]
    fn rounds_half_to_even_and_saturates() {
        let g = QuantGeom {
            outer: 1,
            len: 1,
            inner: 6,
            scale: vec![0.5],
            zero_point: vec![10.0],
            qmin: 0.0,
            qmax: 255.0,
        };
        let mut y = vec![0.0; 6];
        quantize(&g, &[0.25, 0.75, -0.25, 1000.0, -1000.0, 1.25], &mut y);
        assert_eq!(y, vec![10.0, 12.0, 10.0, 255.0, 0.0, 12.0]);
        let g8 = QuantGeom {
            qmin: -128.0,
            qmax: 127.0,
            zero_point: vec![0.0],
            ..g
        };
        quantize(&g8, &[-1000.0, 1000.0, -0.75, 0.0, 63.25, -64.25], &mut y);
        assert_eq!(y, vec![-128.0, 127.0, -2.0, 0.0, 126.0, -128.0]);
    }

    proptest! {
        #[test]
        fn per_axis_matches_naive(outer in 1usize..3, len in 1usize..4, inner in 1usize..4, signed: bool, seed in any::<u64>()) {
            let mut r = rng(seed);
            let scale: Vec<f32> = rand_vec(&mut r, len).iter().map(|v| v.abs() * 0.1 + 0.01).collect();
            let zero_point: Vec<f32> = (0..len).map(|k| if signed { k as f32 - 1.0 } else { 100.0 + k as f32 }).collect();
            let (qmin, qmax) = if signed { (-128.0, 127.0) } else { (0.0, 255.0) };
            let g = QuantGeom { outer, len, inner, scale: scale.clone(), zero_point: zero_point.clone(), qmin, qmax };
            let x: Vec<f32> = rand_vec(&mut r, outer * len * inner).iter().map(|v| v * 20.0).collect();
            let mut q = vec![0.0; x.len()];
            quantize(&g, &x, &mut q);
            let mut d = vec![0.0; x.len()];
            dequantize(&g, &q, &mut d);
            for i in 0..x.len() {
                let k = (i / inner) % len;
                let want = ((x[i] / scale[k]).round_ties_even() + zero_point[k]).clamp(qmin, qmax);
                prop_assert_eq!(q[i], want);
                prop_assert_eq!(d[i], (want - zero_point[k]) * scale[k]);
            }
        }
    }
}
