//! Integer quantization arithmetic with ONNX `QuantizeLinear`/`DequantizeLinear` semantics.
//!
//! `quantize` is `saturate(round_half_even(x / scale) + zero_point)` computed in `f32`, and
//! `dequantize` is `(q - zero_point) * scale`, as in the ONNX operator specification
//! (QuantizeLinear-19, DequantizeLinear-19). Parameter choice follows ONNX Runtime's
//! `quant_utils.compute_scale_zp`, so a model quantized here gets the same scales and zero
//! points as one quantized by `onnxruntime.quantization` from the same ranges.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// Integer element type of a quantized tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QType {
    U8,
    I8,
}

impl QType {
    /// Smallest value of the type; `quantize` saturates to it.
    pub const fn qmin(self) -> i32 {
        match self {
            QType::U8 => 0,
            QType::I8 => -128,
        }
    }

    /// Largest value of the type; `quantize` saturates to it.
    pub const fn qmax(self) -> i32 {
        match self {
            QType::U8 => 255,
            QType::I8 => 127,
        }
    }

    /// The integer interval a float range is mapped onto when choosing parameters.
    ///
    /// Symmetric int8 uses [-127, 127], not [-128, 127]: that keeps the zero point at
    /// exactly 0 with `scale = absmax / 127`, and is what ONNX Runtime does
    /// (`ONNX_INT_TYPE_SYMMETRIC_RANGE` in `quant_utils.py`). Every other case uses the
    /// full range of the type.
    pub const fn param_range(self, symmetry: Symmetry) -> (i32, i32) {
        match (self, symmetry) {
            (QType::I8, Symmetry::Symmetric) => (-127, 127),
            _ => (self.qmin(), self.qmax()),
        }
    }
}

/// Whether a float range is made symmetric around zero before choosing parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Symmetry {
    /// `[-absmax, absmax]`; the zero point is the middle of the integer range
    /// (0 for int8, 128 for uint8).
    Symmetric,
    /// `[rmin, rmax]` mapped onto the whole integer range.
    Asymmetric,
}

/// Scale and zero point of a per-tensor (or one channel's) affine quantization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
}

impl QParams {
    /// Parameters that map `[rmin, rmax]` onto `qtype`, as ONNX Runtime's `compute_scale_zp`.
    ///
    /// The range is first extended to include 0, so that 0 (padding, ReLU output) is exactly
    /// representable. Asymmetric: `scale = (rmax - rmin) / (qmax - qmin)`,
    /// `zero_point = round_half_even(qmin - rmin / scale)`. Symmetric:
    /// `absmax = max(|rmin|, |rmax|)`, int8 gives `scale = absmax / 127, zero_point = 0`,
    /// uint8 gives `scale = 2 absmax / 255, zero_point = 128`. Scale and zero point are
    /// computed in `f64` and the scale rounded to `f32` last, as ONNX Runtime does.
    ///
    /// A degenerate range (both ends 0, or a scale below `f32::MIN_POSITIVE`) gives
    /// `scale = 1.0` instead of 0 (which would make `x / scale` NaN or infinite). Its zero
    /// point is 0, except uint8 symmetric which keeps 128: a per-channel symmetric weight
    /// needs the same zero point in every channel (ONNX Runtime's QLinearConv requires it),
    /// even for an all-zero channel. ONNX Runtime itself returns 0 there.
    ///
    /// Errors when an end is NaN or infinite, or when `rmin > rmax`.
    pub fn from_range(rmin: f32, rmax: f32, qtype: QType, symmetry: Symmetry) -> Result<QParams> {
        ensure!(
            rmin.is_finite() && rmax.is_finite(),
            "cannot quantize the range [{rmin}, {rmax}]: both ends must be finite"
        );
        ensure!(
            rmin <= rmax,
            "cannot quantize the range [{rmin}, {rmax}]: its minimum is above its maximum"
        );
        let (qmin, qmax) = qtype.param_range(symmetry);
        let mut lo = f64::from(rmin.min(0.0));
        let mut hi = f64::from(rmax.max(0.0));
        if symmetry == Symmetry::Symmetric {
            let absmax = lo.abs().max(hi.abs());
            lo = -absmax;
            hi = absmax;
        }
        let symmetric_zero_point = (f64::from(qmin + qmax) / 2.0).round_ties_even() as i32;
        let scale = (hi - lo) / f64::from(qmax - qmin);
        if scale < f64::from(f32::MIN_POSITIVE) {
            let zero_point = match symmetry {
                Symmetry::Symmetric => symmetric_zero_point,
                Symmetry::Asymmetric => 0,
            };
            return Ok(QParams {
                scale: 1.0,
                zero_point,
            });
        }
        let zero_point = match symmetry {
            Symmetry::Symmetric => symmetric_zero_point,
            Symmetry::Asymmetric => (f64::from(qmin) - lo / scale)
                .round_ties_even()
                .clamp(f64::from(qmin), f64::from(qmax)) as i32,
        };
        Ok(QParams {
            scale: scale as f32,
            zero_point,
        })
    }

    /// The smallest value `dequantize` can return for `qtype`.
    pub fn grid_min(self, qtype: QType) -> f32 {
        dequantize(qtype.qmin(), self)
    }

    /// The largest value `dequantize` can return for `qtype`.
    pub fn grid_max(self, qtype: QType) -> f32 {
        dequantize(qtype.qmax(), self)
    }
}

/// `saturate(round_half_even(x / scale) + zero_point)` to the range of `qtype`.
///
/// NaN maps to the zero point (it dequantizes to 0); ONNX leaves NaN unspecified for
/// integer outputs, and calibration rejects NaN before it gets here.
pub fn quantize(x: f32, p: QParams, qtype: QType) -> i32 {
    quantize_clamped(x, p, qtype.qmin(), qtype.qmax())
}

fn quantize_clamped(x: f32, p: QParams, qmin: i32, qmax: i32) -> i32 {
    // The division and the addition are done in f32 as in the ONNX reference
    // (`np.rint(x / y_scale) + zero_point` on float32); adding an integer after rounding
    // is exact below 2^24 and saturation makes larger magnitudes irrelevant.
    let v = (x / p.scale).round_ties_even() + p.zero_point as f32;
    if v.is_nan() {
        return p.zero_point.clamp(qmin, qmax);
    }
    v.clamp(qmin as f32, qmax as f32) as i32
}

/// `(q - zero_point) * scale`, in `f32` as ONNX `DequantizeLinear`.
pub fn dequantize(q: i32, p: QParams) -> f32 {
    (q - p.zero_point) as f32 * p.scale
}

/// `quantize` over a slice into uint8 storage.
pub fn quantize_u8(xs: &[f32], p: QParams) -> Vec<u8> {
    xs.iter()
        .map(|&x| quantize(x, p, QType::U8) as u8)
        .collect()
}

/// `quantize` over a slice into int8 storage.
pub fn quantize_i8(xs: &[f32], p: QParams) -> Vec<i8> {
    xs.iter()
        .map(|&x| quantize(x, p, QType::I8) as i8)
        .collect()
}

/// A weight quantized symmetrically to int8 with one scale per channel along `axis`.
/// Every zero point is 0.
#[derive(Debug, Clone, PartialEq)]
pub struct PerChannel {
    pub axis: usize,
    pub scales: Vec<f32>,
    pub data: Vec<i8>,
}

impl PerChannel {
    /// The float tensor the quantized one stands for, in the original layout.
    pub fn dequantize(&self, shape: &[usize]) -> Vec<f32> {
        let inner: usize = shape[self.axis + 1..].iter().product();
        let channels = shape[self.axis];
        self.data
            .iter()
            .enumerate()
            .map(|(i, &q)| f32::from(q) * self.scales[(i / inner) % channels])
            .collect()
    }
}

/// Per-channel symmetric int8 quantization of a row-major tensor of `shape` along `axis`
/// (axis 0 for Conv weights `[M, C/group, kH, kW]`), as ONNX Runtime quantizes weights
/// with `per_channel=True`: `scale[c] = max|w[c]| / 127`, zero point 0, values clipped to
/// [-127, 127]. An all-zero channel gets scale 1.0.
///
/// Errors on a shape that does not match the data, an axis out of range, or a NaN or
/// infinite weight; callers add the tensor's name with `.context()`.
pub fn quantize_per_channel(data: &[f32], shape: &[usize], axis: usize) -> Result<PerChannel> {
    let (channels, inner) = channel_layout(data.len(), shape, axis)?;
    let mut absmax = vec![0.0f32; channels];
    for (i, &x) in data.iter().enumerate() {
        if !x.is_finite() {
            bail!("weight element {i} is {x}; only finite weights can be quantized");
        }
        let c = (i / inner) % channels;
        absmax[c] = absmax[c].max(x.abs());
    }
    let params = absmax
        .iter()
        .map(|&m| QParams::from_range(-m, m, QType::I8, Symmetry::Symmetric))
        .collect::<Result<Vec<_>>>()?;
    let (qmin, qmax) = QType::I8.param_range(Symmetry::Symmetric);
    let data = data
        .iter()
        .enumerate()
        .map(|(i, &x)| quantize_clamped(x, params[(i / inner) % channels], qmin, qmax) as i8)
        .collect();
    Ok(PerChannel {
        axis,
        scales: params.iter().map(|p| p.scale).collect(),
        data,
    })
}

/// Number of channels along `axis` and number of contiguous elements per channel run.
pub(crate) fn channel_layout(len: usize, shape: &[usize], axis: usize) -> Result<(usize, usize)> {
    ensure!(
        axis < shape.len(),
        "axis {axis} is out of range for a tensor of rank {} (shape {shape:?})",
        shape.len()
    );
    let elements: usize = shape.iter().product();
    ensure!(
        elements == len,
        "shape {shape:?} holds {elements} elements but the data has {len}"
    );
    Ok((shape[axis], shape[axis + 1..].iter().product()))
}

/// A bias quantized to int32 with zero point 0.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedBias {
    pub data: Vec<i32>,
    /// `input_scale * weight_scale[c]`, one per output channel (or one when the weight
    /// was quantized per tensor).
    pub scales: Vec<f32>,
    /// How many values were clipped to the int32 range; nonzero means the scales are too
    /// small for this bias and the layer will be inaccurate.
    pub saturated: usize,
}

/// Quantize a Conv/Gemm bias for integer accumulation: `scale[c] = input_scale *
/// weight_scales[c]` (product in `f32`), `q = round_half_even(b / scale)` in `f64`,
/// saturated to int32, as ONNX Runtime's `quantize_bias_static_impl`.
///
/// `weight_scales` has one entry (per-tensor weight) or one per bias element.
pub fn quantize_bias(
    bias: &[f32],
    input_scale: f32,
    weight_scales: &[f32],
) -> Result<QuantizedBias> {
    ensure!(
        weight_scales.len() == 1 || weight_scales.len() == bias.len(),
        "the bias has {} elements but there are {} weight scales; expected 1 or one per output channel",
        bias.len(),
        weight_scales.len()
    );
    let scales: Vec<f32> = weight_scales.iter().map(|&w| input_scale * w).collect();
    if let Some((c, s)) = scales
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        bail!(
            "bias scale {s} for channel {c} (input scale {input_scale} x weight scale {}) must be positive and finite",
            weight_scales[c]
        );
    }
    let mut saturated = 0;
    let mut data = Vec::with_capacity(bias.len());
    for (i, &b) in bias.iter().enumerate() {
        ensure!(
            b.is_finite(),
            "bias element {i} is {b}; only finite biases can be quantized"
        );
        let s = scales[if scales.len() == 1 { 0 } else { i }];
        let q = (f64::from(b) / f64::from(s)).round_ties_even();
        if q < f64::from(i32::MIN) || q > f64::from(i32::MAX) {
            saturated += 1;
        }
        data.push(q.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32);
    }
    Ok(QuantizedBias {
        data,
        scales,
        saturated,
    })
}

/// Signal-to-quantization-noise ratio in dB: `10 log10(sum r^2 / sum (r - a)^2)`,
/// accumulated in `f64`. `+inf` when the two are equal (including both empty); `-inf`
/// when the reference is all zeros and the approximation is not.
///
/// # Panics
/// When the slices differ in length: comparing tensors of different shapes is a bug in
/// the caller.
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    assert_eq!(
        reference.len(),
        approx.len(),
        "sqnr_db compares tensors of equal length"
    );
    let (signal, noise) =
        reference
            .iter()
            .zip(approx)
            .fold((0.0f64, 0.0f64), |(s, n), (&r, &a)| {
                let (r, a) = (f64::from(r), f64::from(a));
                (s + r * r, n + (r - a) * (r - a))
            });
    if noise == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (signal / noise).log10()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(scale: f32, zero_point: i32) -> QParams {
        QParams { scale, zero_point }
    }

    /// Rounding written out with floor, independent of `round_ties_even`.
    fn naive_round_half_even(v: f64) -> f64 {
        let f = v.floor();
        let d = v - f;
        if d > 0.5 || (d == 0.5 && f % 2.0 != 0.0) {
            f + 1.0
        } else {
            f
        }
    }

    /// ONNX QuantizeLinear reference: the quotient is float32 (numpy float32 in the ONNX
    /// reference implementation); everything after it in f64.
    fn naive_quantize(x: f32, p: QParams, qmin: i32, qmax: i32) -> i32 {
        let v = naive_round_half_even(f64::from(x / p.scale)) + f64::from(p.zero_point);
        v.max(f64::from(qmin)).min(f64::from(qmax)) as i32
    }

    /// ONNX Runtime's compute_scale_zp, written out in f64.
    fn naive_params(rmin: f32, rmax: f32, qmin: i32, qmax: i32, symmetric: bool) -> (f32, i32) {
        let (mut lo, mut hi) = (f64::from(rmin).min(0.0), f64::from(rmax).max(0.0));
        if symmetric {
            let m = lo.abs().max(hi.abs());
            (lo, hi) = (-m, m);
        }
        let scale = (hi - lo) / f64::from(qmax - qmin);
        if scale < f64::from(f32::MIN_POSITIVE) {
            return (
                1.0,
                if symmetric {
                    naive_round_half_even(f64::from(qmin + qmax) / 2.0) as i32
                } else {
                    0
                },
            );
        }
        let zp = if symmetric {
            naive_round_half_even(f64::from(qmin + qmax) / 2.0)
        } else {
            naive_round_half_even(f64::from(qmin) - lo / scale)
        };
        (scale as f32, zp as i32)
    }

    #[test]
    fn rounds_half_to_even() {
        let one = p(1.0, 0);
        let got: Vec<i32> = [2.5f32, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5]
            .iter()
            .map(|&x| quantize(x, one, QType::I8))
            .collect();
        assert_eq!(got, [2, 4, -2, -4, 0, 2, 0]);
    }

    /// Numbers printed by ONNX Runtime 1.x running QuantizeLinear then DequantizeLinear
    /// (opset 19, CPU provider) on the same inputs:
    ///
    /// ```python
    /// x = [2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5, 1000.0, -1000.0, 0.49999997]
    /// # scale 1.0: int8 zp 0, uint8 zp 128, int8 zp -3 -> q
    /// # [2, 4, -2, -4, 0, 2, 0, 127, -128, 0]
    /// # [130, 132, 126, 124, 128, 130, 128, 255, 0, 128]
    /// # [-1, 1, -5, -7, -3, -1, -3, 127, -128, -3]
    /// # uint8 scale 0.007843138 zp 128 on [0.1, -0.37, 1.0, 0.7]
    /// # q [141, 81, 255, 217], y [0.10196079313755035, -0.3686274588108063, 0.9960784912109375, 0.6980392336845398]
    /// ```
    #[test]
    fn matches_onnx_runtime_quantize_linear() {
        let x = [
            2.5f32,
            3.5,
            -2.5,
            -3.5,
            0.5,
            1.5,
            -0.5,
            1000.0,
            -1000.0,
            0.499_999_97,
        ];
        let q = |p: QParams, t: QType| x.iter().map(|&v| quantize(v, p, t)).collect::<Vec<_>>();
        assert_eq!(
            q(p(1.0, 0), QType::I8),
            [2, 4, -2, -4, 0, 2, 0, 127, -128, 0]
        );
        assert_eq!(
            q(p(1.0, 128), QType::U8),
            [130, 132, 126, 124, 128, 130, 128, 255, 0, 128]
        );
        assert_eq!(
            q(p(1.0, -3), QType::I8),
            [-1, 1, -5, -7, -3, -1, -3, 127, -128, -3]
        );

        let pu = p(0.007_843_138, 128);
        let xs = [0.1f32, -0.37, 1.0, 0.7];
        assert_eq!(quantize_u8(&xs, pu), [141, 81, 255, 217]);
        let y: Vec<f32> = quantize_u8(&xs, pu)
            .iter()
            .map(|&q| dequantize(i32::from(q), pu))
            .collect();
        assert_eq!(y, [0.101_960_79, -0.368_627_46, 0.996_078_5, 0.698_039_24]);
    }

    #[test]
    fn nan_quantizes_to_the_zero_point() {
        assert_eq!(quantize(f32::NAN, p(0.5, 7), QType::U8), 7);
        assert_eq!(quantize(f32::INFINITY, p(0.5, 7), QType::U8), 255);
        assert_eq!(quantize(f32::NEG_INFINITY, p(0.5, 7), QType::I8), -128);
    }

    /// Scales and zero points printed by ONNX Runtime's `compute_scale_zp` with
    /// `get_qmin_qmax_for_qType(qt, symmetric=sym)` on float32 ranges:
    ///
    /// ```python
    /// from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType
    /// zp, s = compute_scale_zp(np.float32(a), np.float32(b), qmin, qmax, symmetric=sym)
    /// ```
    #[test]
    fn params_match_onnx_runtime() {
        use QType::*;
        use Symmetry::*;
        #[rustfmt::skip]
        let cases: &[(QType, Symmetry, f32, f32, i32, f32)] = &[
            (U8, Asymmetric, -1.0, 1.0, 128, 0.007_843_138),
            (U8, Asymmetric, 0.0, 6.0, 0, 0.023_529_412),
            (U8, Asymmetric, -0.3, 2.7, 26, 0.011_764_706),
            (U8, Asymmetric, 0.5, 3.0, 0, 0.011_764_706),
            (U8, Asymmetric, -5.0, -1.0, 255, 0.019_607_844),
            (U8, Asymmetric, 0.0, 0.0, 0, 1.0),
            (U8, Asymmetric, -1e-3, 7.25, 0, 0.028_435_294),
            (U8, Symmetric, -1.0, 1.0, 128, 0.007_843_138),
            (U8, Symmetric, 0.0, 6.0, 128, 0.047_058_824),
            (U8, Symmetric, -0.3, 2.7, 128, 0.021_176_47),
            (U8, Symmetric, -5.0, -1.0, 128, 0.039_215_688),
            (I8, Asymmetric, -1.0, 1.0, 0, 0.007_843_138),
            (I8, Asymmetric, 0.0, 6.0, -128, 0.023_529_412),
            (I8, Asymmetric, -0.3, 2.7, -102, 0.011_764_706),
            (I8, Asymmetric, -5.0, -1.0, 127, 0.019_607_844),
            (I8, Asymmetric, 0.0, 0.0, 0, 1.0),
            (I8, Symmetric, -1.0, 1.0, 0, 0.007_874_016),
            (I8, Symmetric, 0.0, 6.0, 0, 0.047_244_094),
            (I8, Symmetric, -0.3, 2.7, 0, 0.021_259_842),
            (I8, Symmetric, -5.0, -1.0, 0, 0.039_370_08),
            (I8, Symmetric, 0.0, 0.0, 0, 1.0),
            (I8, Symmetric, -1e-3, 7.25, 0, 0.057_086_613),
        ];
        for &(qt, sym, a, b, zp, scale) in cases {
            let got = QParams::from_range(a, b, qt, sym).unwrap();
            assert_eq!(got, p(scale, zp), "{qt:?} {sym:?} [{a}, {b}]");
        }
    }

    #[test]
    fn degenerate_range_gets_unit_scale() {
        use Symmetry::*;
        assert_eq!(
            QParams::from_range(0.0, 0.0, QType::U8, Asymmetric).unwrap(),
            p(1.0, 0)
        );
        assert_eq!(
            QParams::from_range(0.0, 0.0, QType::I8, Asymmetric).unwrap(),
            p(1.0, 0)
        );
        assert_eq!(
            QParams::from_range(0.0, 0.0, QType::I8, Symmetric).unwrap(),
            p(1.0, 0)
        );
        // ONNX Runtime returns zero point 0 here; 128 keeps per-channel zero points uniform.
        assert_eq!(
            QParams::from_range(0.0, 0.0, QType::U8, Symmetric).unwrap(),
            p(1.0, 128)
        );
        // Below the smallest normal f32 the scale would be denormal: treated as degenerate.
        let tiny = QParams::from_range(0.0, 1e-37, QType::U8, Asymmetric).unwrap();
        assert_eq!(tiny, p(1.0, 0));
        // A range whose width overflows f32 still gives a finite scale.
        let huge = QParams::from_range(-f32::MAX, f32::MAX, QType::U8, Asymmetric).unwrap();
        assert!(huge.scale.is_finite() && huge.scale > 0.0);
        assert_eq!(huge.zero_point, 128);
        for zero in [0.0f32, -0.0] {
            assert_eq!(dequantize(quantize(zero, tiny, QType::U8), tiny), 0.0);
        }
    }

    #[test]
    fn bad_ranges_are_errors() {
        let e = QParams::from_range(f32::NAN, 1.0, QType::U8, Symmetry::Asymmetric).unwrap_err();
        assert!(e.to_string().contains("finite"), "{e}");
        assert!(QParams::from_range(0.0, f32::INFINITY, QType::U8, Symmetry::Asymmetric).is_err());
        let e = QParams::from_range(2.0, 1.0, QType::I8, Symmetry::Symmetric).unwrap_err();
        assert!(e.to_string().contains("above its maximum"), "{e}");
    }

    #[test]
    fn per_channel_along_axis_0_and_1() {
        // Shape [2, 3]: channel 0 = [1, -2, 0.5], channel 1 = [0, 0, 0].
        let w = [1.0f32, -2.0, 0.5, 0.0, 0.0, 0.0];
        let q = quantize_per_channel(&w, &[2, 3], 0).unwrap();
        assert_eq!(q.scales, [2.0 / 127.0, 1.0]);
        assert_eq!(q.data, [64, -127, 32, 0, 0, 0]);
        // Along axis 1 the channels are the columns [1, 0], [-2, 0], [0.5, 0].
        let q = quantize_per_channel(&w, &[2, 3], 1).unwrap();
        assert_eq!(q.scales, [1.0 / 127.0, 2.0 / 127.0, 0.5 / 127.0]);
        assert_eq!(q.data, [127, -127, 127, 0, 0, 0]);
        assert_eq!(q.dequantize(&[2, 3])[..3], [1.0, -2.0, 0.5]);
    }

    #[test]
    fn per_channel_rejects_bad_input() {
        let e = quantize_per_channel(&[1.0, 2.0], &[3], 0).unwrap_err();
        assert!(e.to_string().contains("holds 3 elements"), "{e}");
        let e = quantize_per_channel(&[1.0, 2.0], &[2], 1).unwrap_err();
        assert!(e.to_string().contains("axis 1 is out of range"), "{e}");
        let e = quantize_per_channel(&[1.0, f32::NAN], &[2], 0).unwrap_err();
        assert!(e.to_string().contains("element 1 is NaN"), "{e}");
    }

    #[test]
    fn bias_uses_product_scale_and_saturates() {
        let b = quantize_bias(&[1.0, -0.5, 3e9], 0.5, &[0.25, 0.5, 1.0]).unwrap();
        assert_eq!(b.scales, [0.125, 0.25, 0.5]);
        assert_eq!(b.data, [8, -2, i32::MAX]);
        assert_eq!(b.saturated, 1);
        // Ties round to even, as numpy.round does.
        let b = quantize_bias(&[0.25, 0.75, -0.25], 0.5, &[1.0]).unwrap();
        assert_eq!(b.data, [0, 2, 0]);
        assert_eq!(b.saturated, 0);
        assert!(quantize_bias(&[1.0, 2.0], 1.0, &[1.0, 1.0, 1.0]).is_err());
        assert!(quantize_bias(&[1.0], 0.0, &[1.0]).is_err());
        assert!(quantize_bias(&[f32::INFINITY], 1.0, &[1.0]).is_err());
    }

    #[test]
    fn sqnr_cases() {
        assert_eq!(sqnr_db(&[1.0, 2.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(sqnr_db(&[], &[]), f64::INFINITY);
        assert_eq!(sqnr_db(&[0.0], &[1.0]), f64::NEG_INFINITY);
        // signal 1 + 9 = 10, noise 0.01 + 0.09 = 0.1: 10 log10(100) = 20 dB.
        assert!((sqnr_db(&[1.0, 3.0], &[1.1, 2.7]) - 20.0).abs() < 1e-5);
    }

    fn qtype() -> impl Strategy<Value = QType> {
        prop_oneof![Just(QType::U8), Just(QType::I8)]
    }

    fn symmetry() -> impl Strategy<Value = Symmetry> {
        prop_oneof![Just(Symmetry::Symmetric), Just(Symmetry::Asymmetric)]
    }

    proptest! {
        #[test]
        fn quantize_matches_naive(x in -1e4f32..1e4, scale in 1e-4f32..10.0, zp in -128i32..=255, qt in qtype()) {
            let p = p(scale, zp);
            prop_assert_eq!(quantize(x, p, qt), naive_quantize(x, p, qt.qmin(), qt.qmax()));
        }

        #[test]
        fn ties_round_to_even(k in -200i32..200, scale in prop_oneof![Just(1.0f32), Just(0.5), Just(0.25), Just(2.0)]) {
            // x / scale = k + 0.5 exactly (powers of two keep the division exact).
            let x = (k as f32 + 0.5) * scale;
            let q = quantize(x, p(scale, 0), QType::I8);
            let even = if k % 2 == 0 { k } else { k + 1 };
            prop_assert_eq!(q, even.clamp(-128, 127));
        }

        #[test]
        fn params_match_naive(a in -1e3f32..1e3, b in -1e3f32..1e3, qt in qtype(), sym in symmetry()) {
            let (rmin, rmax) = (a.min(b), a.max(b));
            let got = QParams::from_range(rmin, rmax, qt, sym).unwrap();
            let (qmin, qmax) = qt.param_range(sym);
            let (scale, zp) = naive_params(rmin, rmax, qmin, qmax, sym == Symmetry::Symmetric);
            prop_assert_eq!(got, p(scale, zp));
            prop_assert!((qt.qmin()..=qt.qmax()).contains(&got.zero_point));
        }

        /// Inside the range the round trip is within half a step (plus 1e-6 relative for
        /// the f32 division and product); zero is exact.
        #[test]
        fn round_trip_within_half_step(a in -1e3f32..1e3, b in -1e3f32..1e3, t in 0.0f32..=1.0, qt in qtype(), sym in symmetry()) {
            let (rmin, rmax) = (a.min(b).min(0.0), a.max(b).max(0.0));
            let p = QParams::from_range(rmin, rmax, qt, sym).unwrap();
            let (lo, hi) = if sym == Symmetry::Symmetric {
                let m = rmin.abs().max(rmax.abs());
                (-m, m)
            } else {
                (rmin, rmax)
            };
            let x = lo + (hi - lo) * t;
            let x = x.clamp(lo, hi);
            let err = (dequantize(quantize(x, p, qt), p) - x).abs();
            prop_assert!(err <= p.scale * 0.5 + 1e-6 * x.abs().max(p.scale), "x {} err {} scale {}", x, err, p.scale);
            prop_assert_eq!(dequantize(quantize(0.0, p, qt), p), 0.0);
        }

        #[test]
        fn saturates_outside_the_grid(scale in 1e-3f32..10.0, zp in -128i32..=255, qt in qtype(), over in 1.0f32..1e6) {
            let p = p(scale, zp);
            let hi = p.grid_max(qt) + scale * over;
            let lo = p.grid_min(qt) - scale * over;
            prop_assert_eq!(quantize(hi, p, qt), qt.qmax());
            prop_assert_eq!(quantize(lo, p, qt), qt.qmin());
        }

        #[test]
        fn per_channel_matches_naive(
            (w, shape, axis) in (1usize..4, 1usize..4, 1usize..4).prop_flat_map(|(a, b, c)| {
                (proptest::collection::vec(-100f32..100.0, a * b * c), Just(vec![a, b, c]), 0usize..3)
            })
        ) {
            let q = quantize_per_channel(&w, &shape, axis).unwrap();
            let inner: usize = shape[axis + 1..].iter().product();
            let channels = shape[axis];
            for c in 0..channels {
                let m = w.iter().enumerate().filter(|(i, _)| (i / inner) % channels == c).fold(0.0f32, |m, (_, x)| m.max(x.abs()));
                let expect = if m == 0.0 { 1.0 } else { (f64::from(m) / 127.0) as f32 };
                prop_assert_eq!(q.scales[c], expect);
            }
            let deq = q.dequantize(&shape);
            for (i, (&x, &q8)) in w.iter().zip(&q.data).enumerate() {
                let s = q.scales[(i / inner) % channels];
                prop_assert!((-127..=127).contains(&i32::from(q8)));
                prop_assert_eq!(i32::from(q8), naive_quantize(x, p(s, 0), -127, 127));
                prop_assert!((deq[i] - x).abs() <= s * 0.5 * (1.0 + 1e-6));
            }
        }

        #[test]
        fn bias_matches_naive(b in proptest::collection::vec(-1e3f32..1e3, 1..8), si in 1e-4f32..1.0, sw in 1e-4f32..1.0) {
            let q = quantize_bias(&b, si, &[sw]).unwrap();
            let s = si * sw;
            for (x, got) in b.iter().zip(&q.data) {
                let expect = naive_round_half_even(f64::from(*x) / f64::from(s));
                prop_assert_eq!(f64::from(*got), expect.max(f64::from(i32::MIN)).min(f64::from(i32::MAX)));
            }
        }

        #[test]
        fn sqnr_matches_naive(r in proptest::collection::vec(-10f32..10.0, 1..32), noise in -0.1f32..0.1) {
            let a: Vec<f32> = r.iter().enumerate().map(|(i, x)| x + if i % 2 == 0 { noise } else { -noise }).collect();
            let s: f64 = r.iter().map(|&x| f64::from(x).powi(2)).sum();
            let n: f64 = r.iter().zip(&a).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
            let got = sqnr_db(&r, &a);
            if n == 0.0 {
                prop_assert_eq!(got, f64::INFINITY);
            } else {
                let expect = 10.0 * (s / n).log10();
                prop_assert!((got - expect).abs() <= 1e-9 * expect.abs().max(1.0));
            }
        }
    }
}
