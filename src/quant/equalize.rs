//! Data-free quantization helpers from Nagel et al. 2019, "Data-Free Quantization Through
//! Weight Equalization and Bias Correction" (arXiv:1906.04721): cross-layer equalization
//! of two consecutive layers' weight ranges, and the bias correction that removes the
//! mean shift weight quantization causes.

use anyhow::{bail, ensure, Result};

use super::arith::channel_layout;

/// A weight tensor in row-major layout with the axis its channels run along: 0 for the
/// output channels of a Conv (`[M, C/group, kH, kW]`), 1 for the input channels of a
/// Conv, 1 for the output features of a MatMul weight `[K, N]`.
#[derive(Debug)]
pub struct Weight<'a> {
    pub data: &'a mut [f32],
    pub shape: &'a [usize],
    pub axis: usize,
}

/// Largest `|w|` of each channel along `axis`.
pub fn channel_ranges(data: &[f32], shape: &[usize], axis: usize) -> Result<Vec<f32>> {
    let (channels, inner) = channel_layout(data.len(), shape, axis)?;
    let mut ranges = vec![0.0f32; channels];
    for (i, &w) in data.iter().enumerate() {
        ensure!(
            w.is_finite(),
            "weight element {i} is {w}; only finite weights can be equalized"
        );
        let c = (i / inner) % channels;
        ranges[c] = ranges[c].max(w.abs());
    }
    Ok(ranges)
}

/// Equalization scales `s_i = sqrt(r1_i r2_i) / r2_i` (Nagel et al. 2019, eq. 8), where
/// `r1` are the ranges of the first layer's output channels and `r2` those of the second
/// layer's matching input channels. Dividing the first by `s` and multiplying the second by
/// it leaves both with range `sqrt(r1 r2)`. A channel where either range is 0 gets 1: it
/// carries nothing, and any other value would divide by zero.
pub fn equalization_scales(r1: &[f32], r2: &[f32]) -> Result<Vec<f32>> {
    ensure!(
        r1.len() == r2.len(),
        "the first layer has {} output channels but the second has {} input channels",
        r1.len(),
        r2.len()
    );
    Ok(r1
        .iter()
        .zip(r2)
        .map(|(&a, &b)| {
            if a > 0.0 && b > 0.0 {
                // In f64: the product of two large f32 ranges can overflow f32.
                ((f64::from(a) * f64::from(b)).sqrt() / f64::from(b)) as f32
            } else {
                1.0
            }
        })
        .collect())
}

/// Multiply each channel along `axis` by `factors[c]`.
pub fn scale_channels(
    data: &mut [f32],
    shape: &[usize],
    axis: usize,
    factors: &[f32],
) -> Result<()> {
    let (channels, inner) = channel_layout(data.len(), shape, axis)?;
    ensure!(
        factors.len() == channels,
        "{} scale factors for {channels} channels along axis {axis} of shape {shape:?}",
        factors.len()
    );
    for (i, w) in data.iter_mut().enumerate() {
        *w *= factors[(i / inner) % channels];
    }
    Ok(())
}

/// Equalize two consecutive layers in place and return the scales used: the first
/// layer's channels and bias are divided by `s`, the second's matching channels multiplied
/// by it.
///
/// The float function is unchanged only when what lies between the two layers is
/// positively homogeneous, `f(x / s) = f(x) / s` for `s > 0`: identity, ReLU, PReLU and
/// LeakyReLU are; ReLU6, Clip, Sigmoid, and any BatchNormalization that was not folded
/// into the first layer are not. Checking that is the caller's job.
pub fn equalize(
    first: Weight<'_>,
    first_bias: Option<&mut [f32]>,
    second: Weight<'_>,
) -> Result<Vec<f32>> {
    let r1 = channel_ranges(first.data, first.shape, first.axis)?;
    let r2 = channel_ranges(second.data, second.shape, second.axis)?;
    let scales = equalization_scales(&r1, &r2)?;
    if let Some(bias) = &first_bias {
        ensure!(
            bias.len() == scales.len(),
            "the first layer's bias has {} elements for {} output channels",
            bias.len(),
            scales.len()
        );
    }
    let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
    scale_channels(first.data, first.shape, first.axis, &inverse)?;
    if let Some(bias) = first_bias {
        for (b, s) in bias.iter_mut().zip(&inverse) {
            *b *= s;
        }
    }
    scale_channels(second.data, second.shape, second.axis, &scales)?;
    Ok(scales)
}

/// Running per-channel mean of a layer's outputs over calibration batches, in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMeans {
    sums: Vec<f64>,
    counts: Vec<u64>,
}

impl ChannelMeans {
    pub fn new(channels: usize) -> Self {
        ChannelMeans {
            sums: vec![0.0; channels],
            counts: vec![0; channels],
        }
    }

    /// Add a batch of outputs of `shape` whose channels run along `axis` (1 for NCHW).
    pub fn observe(&mut self, data: &[f32], shape: &[usize], axis: usize) -> Result<()> {
        let (channels, inner) = channel_layout(data.len(), shape, axis)?;
        ensure!(
            channels == self.sums.len(),
            "a batch with {channels} channels along axis {axis} for means of {} channels",
            self.sums.len()
        );
        if inner == 0 {
            return Ok(());
        }
        for (j, run) in data.chunks(inner).enumerate() {
            let c = j % channels;
            let mut acc = [0f64; 8];
            let mut finite = true;
            let mut chunks = run.chunks_exact(8);
            for q in &mut chunks {
                for l in 0..8 {
                    acc[l] += f64::from(q[l]);
                    finite &= q[l].is_finite();
                }
            }
            for &x in chunks.remainder() {
                acc[0] += f64::from(x);
                finite &= x.is_finite();
            }
            if !finite {
                let k = run.iter().position(|x| !x.is_finite()).unwrap_or(0);
                bail!(
                    "output element {} is {}; only finite outputs can be averaged",
                    j * inner + k,
                    run[k]
                );
            }
            self.sums[c] += acc.iter().sum::<f64>();
            self.counts[c] += run.len() as u64;
        }
        Ok(())
    }

    /// The mean of each channel; 0 for a channel nothing was observed in.
    pub fn means(&self) -> Vec<f32> {
        self.sums
            .iter()
            .zip(&self.counts)
            .map(|(&s, &n)| if n == 0 { 0.0 } else { (s / n as f64) as f32 })
            .collect()
    }
}

/// Empirical bias correction (Nagel et al. 2019, section 4.2): per output channel, the
/// mean output of the float layer minus the mean output of the same layer with quantized
/// weights, over the same calibration inputs. Adding it to the layer's bias removes the
/// systematic shift weight quantization introduces.
pub fn bias_correction(float_mean: &[f32], quant_mean: &[f32]) -> Result<Vec<f32>> {
    ensure!(
        float_mean.len() == quant_mean.len(),
        "{} float channel means but {} quantized ones",
        float_mean.len(),
        quant_mean.len()
    );
    float_mean
        .iter()
        .zip(quant_mean)
        .enumerate()
        .map(|(c, (&f, &q))| {
            ensure!(
                f.is_finite() && q.is_finite(),
                "channel {c} has means {f} (float) and {q} (quantized); both must be finite"
            );
            Ok(f - q)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::arith::quantize_per_channel;
    use proptest::prelude::*;

    /// Naive reference: `y = W2 relu(W1 x + b1)` where W1 is a Conv `[m, c, k, k]` applied
    /// to one `[c, k, k]` patch (a 1x1 output) and W2 a 1x1 Conv `[n, m, 1, 1]`.
    fn conv_relu_conv(
        w1: &[f32],
        b1: &[f32],
        w2: &[f32],
        x: &[f32],
        m: usize,
        n: usize,
    ) -> Vec<f64> {
        let patch = x.len();
        let hidden: Vec<f64> = (0..m)
            .map(|o| {
                let z: f64 = (0..patch)
                    .map(|i| f64::from(w1[o * patch + i]) * f64::from(x[i]))
                    .sum::<f64>()
                    + f64::from(b1[o]);
                z.max(0.0)
            })
            .collect();
        (0..n)
            .map(|o| (0..m).map(|i| f64::from(w2[o * m + i]) * hidden[i]).sum())
            .collect()
    }

    #[test]
    fn scales_follow_the_paper() {
        let s = equalization_scales(&[4.0, 1.0, 0.0, 2.0], &[1.0, 4.0, 3.0, 0.0]).unwrap();
        // sqrt(4 * 1) / 1 = 2, sqrt(1 * 4) / 4 = 0.5, zero ranges keep 1.
        assert_eq!(s, [2.0, 0.5, 1.0, 1.0]);
        assert!(equalization_scales(&[1.0], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn depthwise_second_layer_uses_axis_0() {
        // First: Conv [2, 1, 1, 1]; second: depthwise Conv [2, 1, 1, 2] (group = 2), whose
        // channel c is input channel c.
        let mut w1 = [8.0f32, 0.5];
        let mut w2 = [0.5f32, -0.25, 2.0, 1.0];
        let s = equalize(
            Weight {
                data: &mut w1,
                shape: &[2, 1, 1, 1],
                axis: 0,
            },
            None,
            Weight {
                data: &mut w2,
                shape: &[2, 1, 1, 2],
                axis: 0,
            },
        )
        .unwrap();
        assert_eq!(s, [4.0, 0.5]);
        assert_eq!(w1, [2.0, 1.0]);
        assert_eq!(w2, [2.0, -1.0, 1.0, 0.5]);
    }

    #[test]
    fn mismatched_layers_are_errors() {
        let mut w1 = [1.0f32; 6];
        let mut w2 = [1.0f32; 6];
        let e = equalize(
            Weight {
                data: &mut w1,
                shape: &[3, 2],
                axis: 0,
            },
            None,
            Weight {
                data: &mut w2,
                shape: &[3, 2],
                axis: 1,
            },
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("3 output channels but the second has 2"),
            "{e}"
        );
        let mut bias = [0.0f32; 2];
        let e = equalize(
            Weight {
                data: &mut w1,
                shape: &[3, 2],
                axis: 0,
            },
            Some(&mut bias),
            Weight {
                data: &mut w2,
                shape: &[2, 3],
                axis: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("bias has 2 elements for 3"), "{e}");
        assert!(channel_ranges(&[f32::NAN], &[1], 0).is_err());
        assert!(scale_channels(&mut [1.0, 2.0], &[2], 0, &[1.0]).is_err());
    }

    #[test]
    fn channel_means_and_bias_correction() {
        let mut m = ChannelMeans::new(2);
        // NCHW [1, 2, 1, 2] then [2, 2, 1, 1].
        m.observe(&[1.0, 3.0, 10.0, 20.0], &[1, 2, 1, 2], 1)
            .unwrap();
        m.observe(&[2.0, 30.0, 6.0, 10.0], &[2, 2, 1, 1], 1)
            .unwrap();
        assert_eq!(m.means(), [3.0, 17.5]);
        assert!(m.observe(&[1.0; 3], &[1, 3], 1).is_err());
        assert_eq!(ChannelMeans::new(1).means(), [0.0]);
        // Spatial runs longer than the eight summing lanes, against a naive mean.
        let x: Vec<f32> = (0..2 * 3 * 5 * 7)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let mut m = ChannelMeans::new(3);
        m.observe(&x, &[2, 3, 5, 7], 1).unwrap();
        for (c, got) in m.means().iter().enumerate() {
            let vals: Vec<f64> = (0..2)
                .flat_map(|b| (0..35).map(move |k| (b * 3 + c) * 35 + k))
                .map(|i| f64::from(x[i]))
                .collect();
            let want = vals.iter().sum::<f64>() / vals.len() as f64;
            assert!(
                (f64::from(*got) - want).abs() < 1e-6,
                "{c}: {got} vs {want}"
            );
        }
        let mut bad = x.clone();
        bad[40] = f32::INFINITY;
        let e = m.observe(&bad, &[2, 3, 5, 7], 1).unwrap_err().to_string();
        assert!(e.contains("output element 40 is inf"), "{e}");

        assert_eq!(
            bias_correction(&[3.0, 17.5], &[2.5, 18.0]).unwrap(),
            [0.5, -0.5]
        );
        assert!(bias_correction(&[1.0], &[1.0, 2.0]).is_err());
        assert!(bias_correction(&[f32::NAN], &[1.0]).is_err());
    }

    /// Bias correction cancels the mean output shift of per-channel weight quantization
    /// for a linear layer on inputs with nonzero mean.
    #[test]
    fn bias_correction_removes_the_mean_shift() {
        let (m, k) = (4usize, 16usize);
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.3)
            .collect();
        let q = quantize_per_channel(&w, &[m, k], 0).unwrap();
        let wq = q.dequantize(&[m, k]);
        let inputs: Vec<Vec<f32>> = (0..64)
            .map(|n| {
                (0..k)
                    .map(|i| 1.0 + ((n * 13 + i * 7) % 17) as f32 / 17.0)
                    .collect()
            })
            .collect();
        let (mut fm, mut qm) = (ChannelMeans::new(m), ChannelMeans::new(m));
        let out = |w: &[f32], x: &[f32]| {
            (0..m)
                .map(|o| (0..k).map(|i| w[o * k + i] * x[i]).sum())
                .collect::<Vec<f32>>()
        };
        for x in &inputs {
            fm.observe(&out(&w, x), &[m], 0).unwrap();
            qm.observe(&out(&wq, x), &[m], 0).unwrap();
        }
        let delta = bias_correction(&fm.means(), &qm.means()).unwrap();
        let (f, q) = (fm.means(), qm.means());
        let before: f32 = f.iter().zip(&q).map(|(f, q)| (f - q).abs()).sum();
        let after: f32 = f
            .iter()
            .zip(&q)
            .zip(&delta)
            .map(|((f, q), d)| (f - (q + d)).abs())
            .sum();
        assert!(
            before > 1e-5,
            "the test needs a visible shift, got {before}"
        );
        assert!(after <= 1e-6, "{after}");
    }

    proptest! {
        /// The conv-ReLU-conv function is preserved to 1e-5 of the sum of the absolute
        /// terms of each output (the rescaled weights are rounded to f32) and the equalized
        /// ranges are equal to 1e-6 relative.
        #[test]
        fn equalization_preserves_the_function(
            (m, n, c, w1, b1, w2, x) in (1usize..6, 1usize..5, 1usize..3).prop_flat_map(|(m, n, c)| {
                let spread = prop_oneof![Just(0.01f32), Just(1.0), Just(100.0)];
                (
                    Just(m), Just(n), Just(c),
                    (proptest::collection::vec(-1f32..1.0, m * c * 9), proptest::collection::vec(spread.clone(), m))
                        .prop_map(move |(w, f)| w.iter().enumerate().map(|(i, v)| v * f[i / (c * 9)]).collect::<Vec<f32>>()),
                    proptest::collection::vec(-1f32..1.0, m),
                    (proptest::collection::vec(-1f32..1.0, n * m), proptest::collection::vec(spread, m))
                        .prop_map(move |(w, f)| w.iter().enumerate().map(|(i, v)| v * f[i % m]).collect::<Vec<f32>>()),
                    proptest::collection::vec(-1f32..1.0, c * 9),
                )
            })
        ) {
            let before = conv_relu_conv(&w1, &b1, &w2, &x, m, n);
            let (mut e1, mut eb, mut e2) = (w1.clone(), b1.clone(), w2.clone());
            let s = equalize(
                Weight { data: &mut e1, shape: &[m, c, 3, 3], axis: 0 },
                Some(&mut eb),
                Weight { data: &mut e2, shape: &[n, m, 1, 1], axis: 1 },
            ).unwrap();
            prop_assert!(s.iter().all(|&s| s > 0.0 && s.is_finite()));
            let after = conv_relu_conv(&e1, &eb, &e2, &x, m, n);
            let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
            let bound = conv_relu_conv(&abs(&w1), &abs(&b1), &abs(&w2), &abs(&x), m, n);
            for ((a, b), t) in before.iter().zip(&after).zip(&bound) {
                prop_assert!((a - b).abs() <= 1e-5 * t, "{} vs {} (terms {})", a, b, t);
            }
            let r1 = channel_ranges(&e1, &[m, c, 3, 3], 0).unwrap();
            let r2 = channel_ranges(&e2, &[n, m, 1, 1], 1).unwrap();
            for (a, b) in r1.iter().zip(&r2) {
                if *a > 0.0 && *b > 0.0 {
                    prop_assert!((a - b).abs() <= 1e-6 * a.max(*b), "{} vs {}", a, b);
                }
            }
        }
    }
}
