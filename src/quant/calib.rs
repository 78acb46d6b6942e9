//! Streaming calibration statistics per tensor, and the choice of a quantization range
//! from them (minmax, percentile, entropy, mse, auto).
//!
//! A [`TensorStats`] is fed one batch of activations at a time and keeps only a fixed
//! amount of state: running min/max, moving-average min/max and a histogram.
//!
//! The histogram is of `x`, stored as two histograms of `|x|` (one for positive values,
//! one for negative values) that share one bin width, plus a count of exact zeros. The
//! magnitude histogram TensorRT's entropy calibration works on is their sum, and the
//! signed one still gives asymmetric ranges for uint8 activations. Exact zeros are
//! kept apart because every quantization grid represents 0 exactly: they never add error,
//! and the spike ReLU puts at 0 would otherwise dominate the first bin (pytorch-quantization
//! works around the same spike with `bins[0] = bins[1]`).
//!
//! The bin width is always a power of two, the smallest one for which `num_bins` bins
//! cover the largest magnitude seen. When a later batch exceeds that, the width doubles
//! and bins merge pairwise, so a value's bin is `floor(|x| / width)` whatever the order
//! the batches came in: the final histogram depends only on the multiset of values, not
//! on batching or order. ONNX Runtime's `HistogramCollector` instead appends bins of the
//! first batch's width, which makes its result depend on which batch came first. The price
//! is resolution: the data fills between half and all of the bins.

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};

use super::arith::{QParams, QType, Symmetry};

/// Number of histogram bins, as TensorRT's entropy calibration.
pub const DEFAULT_BINS: usize = 2048;
/// Percentile kept by [`Method::Percentile`] unless told otherwise.
pub const DEFAULT_PERCENTILE: f64 = 99.99;
/// Weight of a new batch in the moving-average min/max; ONNX Runtime's default.
pub const DEFAULT_AVERAGING_CONSTANT: f32 = 0.01;

/// How a tensor's quantization range is chosen from its calibration statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Observed min and max (or their moving averages).
    MinMax,
    /// Drop the most extreme values beyond a percentile.
    Percentile,
    /// TensorRT's KL-divergence threshold.
    Entropy,
    /// The range with the least expected quantization error.
    Mse,
    /// Whichever of the others has the least expected quantization error.
    Auto,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::MinMax,
        Method::Percentile,
        Method::Entropy,
        Method::Mse,
        Method::Auto,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Method::MinMax => "minmax",
            Method::Percentile => "percentile",
            Method::Entropy => "entropy",
            Method::Mse => "mse",
            Method::Auto => "auto",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
                anyhow!(
                    "unknown calibration method `{s}`; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The integer grid a range is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub qtype: QType,
    pub symmetry: Symmetry,
}

/// Settings of the methods that take any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RangeOptions {
    /// Percentile kept by [`Method::Percentile`], in (0, 100].
    pub percentile: f64,
    /// [`Method::MinMax`] uses the moving-average min/max instead of the extremes.
    pub moving_average: bool,
}

impl Default for RangeOptions {
    fn default() -> Self {
        RangeOptions {
            percentile: DEFAULT_PERCENTILE,
            moving_average: false,
        }
    }
}

/// A chosen range and how it was chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    /// The method that produced the range: never `Auto`, which reports its winner.
    pub method: Method,
    pub rmin: f32,
    pub rmax: f32,
    /// Mean squared quantization error of the calibration data on this range, estimated
    /// from the histogram (see [`TensorStats::expected_mse`]).
    pub expected_mse: f64,
}

/// Counts of `x` in power-of-two-wide bins; see the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// log2 of the bin width; `None` until a nonzero value is added.
    exponent: Option<i32>,
    /// `positive[k]` counts `x > 0` with `k * width <= x < (k + 1) * width`.
    positive: Vec<u64>,
    /// `negative[k]` counts `x < 0` with `k * width <= -x < (k + 1) * width`.
    negative: Vec<u64>,
    zeros: u64,
}

/// `2^e` for exponents of normal `f64`s, exactly.
fn pow2(e: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&e));
    f64::from_bits(((e + 1023) as u64) << 52)
}

impl Histogram {
    /// An empty histogram with `num_bins` bins per sign, between 128 and 2^24.
    pub fn new(num_bins: usize) -> Result<Self> {
        ensure!(
            (128..=1 << 24).contains(&num_bins),
            "a calibration histogram needs between 128 and 16777216 bins, not {num_bins}"
        );
        Ok(Histogram {
            exponent: None,
            positive: vec![0; num_bins],
            negative: vec![0; num_bins],
            zeros: 0,
        })
    }

    pub fn num_bins(&self) -> usize {
        self.positive.len()
    }

    /// Width of every bin; `None` while only zeros have been seen.
    pub fn bin_width(&self) -> Option<f64> {
        self.exponent.map(pow2)
    }

    pub fn positive(&self) -> &[u64] {
        &self.positive
    }

    pub fn negative(&self) -> &[u64] {
        &self.negative
    }

    /// Number of values exactly 0 (either sign).
    pub fn zeros(&self) -> u64 {
        self.zeros
    }

    /// Number of values counted, zeros included.
    pub fn total(&self) -> u64 {
        self.zeros + self.positive.iter().sum::<u64>() + self.negative.iter().sum::<u64>()
    }

    /// Histogram of `|x|` for nonzero `x`: `positive[k] + negative[k]`.
    pub fn magnitude(&self) -> Vec<u64> {
        self.positive
            .iter()
            .zip(&self.negative)
            .map(|(p, n)| p + n)
            .collect()
    }

    /// The smallest exponent `e` with `amax < num_bins * 2^e`.
    fn exponent_for(&self, amax: f32) -> i32 {
        let n = self.num_bins() as f64;
        let amax = f64::from(amax);
        let mut e = (amax / n).log2().floor() as i32;
        while amax >= n * pow2(e) {
            e += 1;
        }
        while amax < n * pow2(e - 1) {
            e -= 1;
        }
        e
    }

    /// Widen the bins to `2^exponent`; bin `k` of the old width falls in bin `k >> shift`.
    fn grow_to(&mut self, exponent: i32) {
        let Some(old) = self.exponent else {
            self.exponent = Some(exponent);
            return;
        };
        if exponent <= old {
            return;
        }
        let shift = (exponent - old) as u32;
        for bins in [&mut self.positive, &mut self.negative] {
            for k in 1..bins.len() {
                let to = k.checked_shr(shift).unwrap_or(0);
                if to != k {
                    bins[to] += bins[k];
                    bins[k] = 0;
                }
            }
        }
        self.exponent = Some(exponent);
    }

    /// Count `xs`, which must be finite and whose largest magnitude is `amax`. Large
    /// batches are counted in parallel chunks.
    fn add(&mut self, xs: &[f32], amax: f32) {
        if amax > 0.0 {
            let e = self.exponent_for(amax);
            if self.exponent.is_none_or(|old| e > old) {
                self.grow_to(e);
            }
        }
        let Some(e) = self.exponent else {
            self.zeros += xs.len() as u64;
            return;
        };
        let n = self.num_bins();
        let counts = if xs.len() < 2 * PAR_CHUNK {
            let mut c = vec![0u64; 2 * n];
            count_bins(xs, e, n, &mut c);
            c
        } else {
            use rayon::prelude::*;
            xs.par_chunks(PAR_CHUNK)
                .fold(
                    || vec![0u64; 2 * n],
                    |mut c, chunk| {
                        count_bins(chunk, e, n, &mut c);
                        c
                    },
                )
                .reduce_with(|mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                })
                .unwrap_or_else(|| vec![0u64; 2 * n])
        };
        for (dst, src) in self
            .positive
            .iter_mut()
            .chain(self.negative.iter_mut())
            .zip(&counts)
        {
            *dst += src;
        }
        // count_bins put +0.0 in positive[0] and -0.0 in negative[0].
        let (pz, nz) = count_zeros(xs);
        self.positive[0] -= pz;
        self.negative[0] -= nz;
        self.zeros += pz + nz;
    }

    /// Add the counts of `other`, widening bins as needed; the result is the histogram of
    /// both sets of values together, exactly.
    pub fn merge(&mut self, other: &Histogram) -> Result<()> {
        ensure!(
            self.num_bins() == other.num_bins(),
            "cannot merge histograms with {} and {} bins",
            self.num_bins(),
            other.num_bins()
        );
        let mut other = other.clone();
        if let Some(e) = other.exponent {
            if self.exponent.is_none_or(|old| e > old) {
                self.grow_to(e);
            }
        }
        if let Some(e) = self.exponent {
            other.grow_to(e);
        }
        for (a, b) in self.positive.iter_mut().zip(&other.positive) {
            *a += b;
        }
        for (a, b) in self.negative.iter_mut().zip(&other.negative) {
            *a += b;
        }
        self.zeros += other.zeros;
        Ok(())
    }
}

/// Batches of at least twice this many values are scanned and counted in parallel chunks.
const PAR_CHUNK: usize = 1 << 16;

/// Adds to `counts` (`2 * n` bins: `|x|` bins of positive values, then of negative ones) the
/// bin of every value of `xs` for bins of width `2^e`; zeros land in bin 0 of their sign.
///
/// Four sub-histograms take consecutive values, so that runs of equal bins (the zeros after a
/// ReLU) do not wait on one counter; u32 counters stay exact for chunks under 2^32 values.
fn count_bins(xs: &[f32], e: i32, n: usize, counts: &mut [u64]) {
    // Multiplying by a power of two is exact, so the bin index is exactly
    // floor(|x| / width), and below n by the choice of the exponent.
    let inv = pow2(-e);
    let slot = |x: f32| {
        let k = ((f64::from(x.abs()) * inv) as usize).min(n - 1);
        k + n * (x.to_bits() >> 31) as usize
    };
    for part in xs.chunks(u32::MAX as usize) {
        let mut sub = vec![[0u32; 4]; 2 * n];
        let mut quads = part.chunks_exact(4);
        for q in &mut quads {
            sub[slot(q[0])][0] += 1;
            sub[slot(q[1])][1] += 1;
            sub[slot(q[2])][2] += 1;
            sub[slot(q[3])][3] += 1;
        }
        for &x in quads.remainder() {
            sub[slot(x)][0] += 1;
        }
        for (c, s) in counts.iter_mut().zip(&sub) {
            *c += s.iter().map(|&v| u64::from(v)).sum::<u64>();
        }
    }
}

/// Number of `+0.0` and of `-0.0` values.
fn count_zeros(xs: &[f32]) -> (u64, u64) {
    let (mut p, mut m) = (0u64, 0u64);
    for c in xs.chunks(1 << 20) {
        let (mut cp, mut cm) = (0u32, 0u32);
        for &x in c {
            let b = x.to_bits();
            cp += u32::from(b == 0);
            cm += u32::from(b == 0x8000_0000);
        }
        p += u64::from(cp);
        m += u64::from(cm);
    }
    (p, m)
}

/// Minimum, maximum and whether every value is finite; written without an early exit so
/// that it vectorises. Infinities and NaN leave min/max meaningless but clear the flag.
fn scan(xs: &[f32]) -> (f32, f32, bool) {
    const L: usize = 8;
    let mut lo = [f32::INFINITY; L];
    let mut hi = [f32::NEG_INFINITY; L];
    let mut bad = [0u32; L];
    let mut chunks = xs.chunks_exact(L);
    for c in &mut chunks {
        for j in 0..L {
            let x = c[j];
            lo[j] = if x < lo[j] { x } else { lo[j] };
            hi[j] = if x > hi[j] { x } else { hi[j] };
            bad[j] |= u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
    }
    let (mut min, mut max, mut ok) = (f32::INFINITY, f32::NEG_INFINITY, true);
    for &x in chunks.remainder() {
        min = min.min(x);
        max = max.max(x);
        ok &= x.is_finite();
    }
    for j in 0..L {
        min = min.min(lo[j]);
        max = max.max(hi[j]);
        ok &= bad[j] == 0;
    }
    (min, max, ok)
}

/// [`scan`] in parallel chunks for large batches.
fn scan_par(xs: &[f32]) -> (f32, f32, bool) {
    if xs.len() < 2 * PAR_CHUNK {
        return scan(xs);
    }
    use rayon::prelude::*;
    xs.par_chunks(PAR_CHUNK).map(scan).reduce(
        || (f32::INFINITY, f32::NEG_INFINITY, true),
        |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 && b.2),
    )
}

/// Sum of squares in f64, in eight lanes so that it vectorises (and in parallel chunks for
/// large batches).
pub fn sum_squares(xs: &[f32]) -> f64 {
    fn lanes(xs: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            for j in 0..8 {
                let v = f64::from(c[j]);
                acc[j] += v * v;
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        acc.iter().sum::<f64>() + tail
    }
    if xs.len() < 2 * PAR_CHUNK {
        return lanes(xs);
    }
    use rayon::prelude::*;
    xs.par_chunks(PAR_CHUNK).map(lanes).sum()
}

/// Streaming statistics of one tensor over calibration batches.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    name: String,
    averaging_constant: f32,
    /// Calls to `observe`, empty batches included, to number batches in messages.
    calls: u64,
    /// Nonempty batches.
    batches: u64,
    min: f32,
    max: f32,
    average_min: f32,
    average_max: f32,
    histogram: Histogram,
}

impl TensorStats {
    /// Statistics for the tensor `name` (used in error messages), with
    /// [`DEFAULT_BINS`] bins and [`DEFAULT_AVERAGING_CONSTANT`].
    pub fn new(name: impl Into<String>) -> Self {
        TensorStats::with_options(name, DEFAULT_BINS, DEFAULT_AVERAGING_CONSTANT)
            .expect("the default options are valid")
    }

    /// Statistics with `num_bins` histogram bins per sign and the weight of a new batch in
    /// the moving-average min/max, in (0, 1].
    pub fn with_options(
        name: impl Into<String>,
        num_bins: usize,
        averaging_constant: f32,
    ) -> Result<Self> {
        let name = name.into();
        ensure!(
            averaging_constant > 0.0 && averaging_constant <= 1.0,
            "tensor `{name}`: the moving-average constant must be in (0, 1], not {averaging_constant}"
        );
        let histogram =
            Histogram::new(num_bins).map_err(|e| e.context(format!("tensor `{name}`")))?;
        Ok(TensorStats {
            name,
            averaging_constant,
            calls: 0,
            batches: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            average_min: 0.0,
            average_max: 0.0,
            histogram,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of nonempty batches observed.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Number of values observed.
    pub fn count(&self) -> u64 {
        self.histogram.total()
    }

    pub fn histogram(&self) -> &Histogram {
        &self.histogram
    }

    /// Smallest and largest value observed.
    pub fn min_max(&self) -> Option<(f32, f32)> {
        (self.batches > 0).then_some((self.min, self.max))
    }

    /// Per-batch min and max, averaged as ONNX Runtime's MinMax calibrator with
    /// `moving_average=True`: the first batch sets them, each later one moves them by
    /// `averaging_constant * (batch value - average)`.
    pub fn moving_average_min_max(&self) -> Option<(f32, f32)> {
        (self.batches > 0).then_some((self.average_min, self.average_max))
    }

    /// Add one batch. A NaN or infinite value is an error naming the tensor, the batch and
    /// the position, and leaves the statistics as they were. Empty batches are ignored.
    pub fn observe(&mut self, batch: &[f32]) -> Result<()> {
        self.calls += 1;
        let (min, max, finite) = scan_par(batch);
        if !finite {
            let (i, x) = batch
                .iter()
                .enumerate()
                .find(|(_, x)| !x.is_finite())
                .expect("scan saw a value that is not finite");
            bail!(
                "tensor `{}`: calibration batch {} has {x} at flat index {i}; \
                 calibration needs finite activations, so check the input data and that the float model runs cleanly on it",
                self.name,
                self.calls
            );
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.histogram.add(batch, min.abs().max(max.abs()));
        if self.batches == 0 {
            (self.average_min, self.average_max) = (min, max);
        } else {
            let c = self.averaging_constant;
            self.average_min += c * (min - self.average_min);
            self.average_max += c * (max - self.average_max);
        }
        self.min = self.min.min(min);
        self.max = self.max.max(max);
        self.batches += 1;
        Ok(())
    }

    fn observed(&self) -> Result<(f32, f32)> {
        self.min_max().ok_or_else(|| {
            anyhow!(
                "tensor `{}`: no calibration values were observed; give calibration data that reaches this tensor",
                self.name
            )
        })
    }

    /// Intersect `[lo, hi]` with the observed range extended to include 0.
    fn clip(&self, lo: f64, hi: f64) -> (f32, f32) {
        let (min, max) = (self.min.min(0.0), self.max.max(0.0));
        ((lo as f32).clamp(min, 0.0), (hi as f32).clamp(0.0, max))
    }

    /// The observed range extended to include 0, or its moving average.
    ///
    /// Every method returns `rmin <= 0 <= rmax` within that range; 0 is always included,
    /// as [`QParams::from_range`] would do anyway.
    pub fn minmax(&self, moving_average: bool) -> Result<(f32, f32)> {
        let (min, max) = self.observed()?;
        let (lo, hi) = if moving_average {
            (self.average_min, self.average_max)
        } else {
            (min, max)
        };
        Ok(self.clip(f64::from(lo), f64::from(hi)))
    }

    /// The narrowest range, on histogram bin edges, leaving out at most `100 - percentile`
    /// percent of the values.
    ///
    /// Symmetric: `[-t, t]` with at most that share of values having `|x| > t` (on the
    /// `|x|` histogram, as ONNX Runtime's symmetric percentile). Asymmetric: each tail may
    /// lose at most half of it, `(100 - percentile) / 2` percent below `rmin` and as much
    /// above `rmax` (as ONNX Runtime's asymmetric percentile); on one-sided data only one
    /// tail is cut. Bin edges are taken on the outer side, so a bin is kept whole.
    pub fn percentile(&self, percentile: f64, symmetry: Symmetry) -> Result<(f32, f32)> {
        ensure!(
            percentile > 0.0 && percentile <= 100.0,
            "tensor `{}`: the percentile must be in (0, 100], not {percentile}",
            self.name
        );
        self.observed()?;
        let Some(w) = self.histogram.bin_width() else {
            return Ok((0.0, 0.0));
        };
        let dropped = (1.0 - percentile / 100.0) * self.histogram.total() as f64;
        Ok(match symmetry {
            Symmetry::Symmetric => {
                let t = bins_kept(&self.histogram.magnitude(), dropped) as f64 * w;
                self.clip(-t, t)
            }
            Symmetry::Asymmetric => {
                let hi = bins_kept(&self.histogram.positive, dropped / 2.0) as f64 * w;
                let lo = bins_kept(&self.histogram.negative, dropped / 2.0) as f64 * w;
                self.clip(-lo, hi)
            }
        })
    }

    /// TensorRT's entropy calibration: the threshold `t` minimising the KL divergence
    /// between the `|x|` histogram clipped at `t` and its quantized version, then
    /// `[-t, t]` intersected with the observed range.
    ///
    /// The grid has 128 levels on `[0, t]`, the positive half of symmetric int8, and 256
    /// when the target is asymmetric and the data one-sided (uint8 after ReLU), as
    /// pytorch-quantization's `unsigned`. Candidates are the bin edges from bin `levels`
    /// up to the last nonempty bin. The search is MXNet's `_get_optimal_threshold`, which
    /// ONNX Runtime's `get_entropy_threshold` ports, over the `|x|` histogram: the
    /// clipped-off mass is added to the last kept bin, each level spreads its count evenly
    /// over its nonempty bins, zero bins are smoothed with `eps = 1e-4`, and the first
    /// minimum wins. Unlike ONNX Runtime's port, expanded levels are not truncated to
    /// integers, the last level covers the leftover bins, and empty bins of `p` stay empty
    /// in `q`, as in MXNet. Exact zeros are left out (see the module documentation).
    pub fn entropy(&self, target: Target) -> Result<(f32, f32)> {
        let (min, max) = self.observed()?;
        let Some(w) = self.histogram.bin_width() else {
            return Ok((0.0, 0.0));
        };
        let one_sided = min >= 0.0 || max <= 0.0;
        let levels = if target.symmetry == Symmetry::Asymmetric && one_sided {
            256
        } else {
            128
        };
        let t = kl_threshold_bins(&self.histogram.magnitude(), levels) as f64 * w;
        Ok(self.clip(-t, t))
    }

    /// The range whose quantization on `target` has the least expected squared error
    /// ([`TensorStats::expected_mse`]): rounding noise inside, clipping error outside.
    ///
    /// Symmetric: a search over `t` for `[-t, t]`. Asymmetric: the best point of a grid of
    /// about 33 x 33 `(rmin, rmax)` pairs, then alternating searches over `rmax` and `rmin`
    /// (at most four rounds). Candidates are the bin edges and the observed extremes,
    /// searched every `ceil(bins / 256)`-th edge and then edge by edge around the best; the
    /// observed range is always a candidate, so the result is never worse than minmax by
    /// this measure. Outliers are clipped only as far as that pays: one value at `o` in `N`
    /// costs `(o - t)^2 / N` when clipped to `t`, so rare outliers are cut to a fraction of
    /// their size and frequent ones are kept.
    pub fn mse(&self, target: Target) -> Result<(f32, f32)> {
        let (min, max) = self.observed()?;
        let Some(w) = self.histogram.bin_width() else {
            return Ok((0.0, 0.0));
        };
        let used = |bins: &[u64]| bins.iter().rposition(|&c| c > 0).map_or(0, |k| k + 1);
        let (lo, hi) = self.clip(f64::from(min), f64::from(max));
        let support = self.support();
        let cost = |lo: f64, hi: f64| {
            let (lo, hi) = self.clip(lo, hi);
            support.mse(lo, hi, target).unwrap_or(f64::INFINITY)
        };
        match target.symmetry {
            Symmetry::Symmetric => {
                let amax = f64::from(lo.abs().max(hi));
                let n = used(&self.histogram.magnitude());
                let t = search_edges(n, w, amax, |t| cost(-t, t));
                Ok(self.clip(-t, t))
            }
            Symmetry::Asymmetric => {
                // The two ends share one scale, so improving one end alone can stall far
                // from the optimum: start the alternating search from the best point of
                // a coarse grid over both ends.
                let (n_neg, n_pos) = (
                    used(&self.histogram.negative),
                    used(&self.histogram.positive),
                );
                let coarse = |n: usize, end: f64| -> Vec<f64> {
                    let stride = n.div_ceil(32).max(1);
                    (stride..=n)
                        .step_by(stride)
                        .map(|k| k as f64 * w)
                        .chain([end])
                        .collect()
                };
                let (mut lo, mut hi) = (f64::from(lo), f64::from(hi));
                let mut best = cost(lo, hi);
                for &h in &coarse(n_pos, hi) {
                    for &l in &coarse(n_neg, -lo) {
                        let c = cost(-l, h);
                        if c < best {
                            (best, lo, hi) = (c, -l, h);
                        }
                    }
                }
                for _ in 0..4 {
                    let new_hi = search_edges(n_pos, w, hi, |h| cost(lo, h));
                    let new_lo = -search_edges(n_neg, w, -lo, |l| cost(-l, new_hi));
                    let done = new_hi == hi && new_lo == lo;
                    (lo, hi) = (new_lo, new_hi);
                    if done {
                        break;
                    }
                }
                Ok(self.clip(lo, hi))
            }
        }
    }

    /// Mean squared error of quantizing the observed values with the parameters
    /// [`QParams::from_range`] gives `[rmin, rmax]` on `target`, with runtime saturation to
    /// the whole integer type.
    ///
    /// Estimated from the histogram by taking values uniform within each bin (bins cut to
    /// the observed min/max) and integrating the squared error of the quantizer exactly
    /// over each bin; exact zeros add nothing.
    pub fn expected_mse(&self, rmin: f32, rmax: f32, target: Target) -> Result<f64> {
        self.support()
            .mse(rmin, rmax, target)
            .map_err(|e| e.context(format!("tensor `{}`", self.name)))
    }

    /// The nonempty bins as intervals cut to the observed range.
    fn support(&self) -> Support {
        let mut bins = Vec::new();
        if let Some(w) = self.histogram.bin_width() {
            let (min, max) = (f64::from(self.min), f64::from(self.max));
            let h = &self.histogram;
            for (k, (&pos, &neg)) in h.positive.iter().zip(&h.negative).enumerate() {
                let (a, b) = (k as f64 * w, (k + 1) as f64 * w);
                if pos > 0 {
                    bins.push((a.max(min), b.min(max), pos as f64));
                }
                if neg > 0 {
                    bins.push(((-b).max(min), (-a).min(max), neg as f64));
                }
            }
        }
        Support {
            bins,
            total: self.histogram.total() as f64,
        }
    }

    /// The range `method` chooses for `target`. `Auto` evaluates minmax, percentile,
    /// entropy and mse and keeps the one with the least [`TensorStats::expected_mse`],
    /// the first in that order on a tie. Since mse minimises that same estimate and has
    /// the observed range among its candidates, auto only departs from mse on ties or when
    /// another method's range falls between mse's candidate edges.
    pub fn select(
        &self,
        method: Method,
        target: Target,
        options: &RangeOptions,
    ) -> Result<Selection> {
        let range = |m: Method| -> Result<(f32, f32)> {
            match m {
                Method::MinMax => self.minmax(options.moving_average),
                Method::Percentile => self.percentile(options.percentile, target.symmetry),
                Method::Entropy => self.entropy(target),
                Method::Mse => self.mse(target),
                Method::Auto => unreachable!("auto is resolved below"),
            }
        };
        let candidates: &[Method] = match method {
            Method::Auto => &[
                Method::MinMax,
                Method::Percentile,
                Method::Entropy,
                Method::Mse,
            ],
            m => &[m],
        };
        let mut best: Option<Selection> = None;
        for &m in candidates {
            let (rmin, rmax) = range(m)?;
            let expected_mse = self.expected_mse(rmin, rmax, target)?;
            if best.is_none_or(|b| expected_mse < b.expected_mse) {
                best = Some(Selection {
                    method: m,
                    rmin,
                    rmax,
                    expected_mse,
                });
            }
        }
        Ok(best.expect("at least one candidate method"))
    }
}

/// Where the observed values lie, for estimating quantization error: `(start, end,
/// count)` of each nonempty bin, and the number of values including zeros.
struct Support {
    bins: Vec<(f64, f64, f64)>,
    total: f64,
}

impl Support {
    /// See [`TensorStats::expected_mse`].
    fn mse(&self, rmin: f32, rmax: f32, target: Target) -> Result<f64> {
        let p = QParams::from_range(rmin, rmax, target.qtype, target.symmetry)?;
        if self.bins.is_empty() {
            return Ok(0.0);
        }
        let grid = Grid::new(p, target.qtype);
        let sum: f64 = self
            .bins
            .iter()
            .map(|&(a, b, n)| n * grid.mean_squared_error(a, b))
            .sum();
        Ok(sum / self.total)
    }
}

/// The number of leading bins to keep so that at most `dropped` values lie beyond them.
fn bins_kept(bins: &[u64], dropped: f64) -> usize {
    let mut beyond = 0u64;
    for k in (0..bins.len()).rev() {
        if (beyond + bins[k]) as f64 > dropped {
            return k + 1;
        }
        beyond += bins[k];
    }
    0
}

/// Minimise `cost` over the edges `k * width` (`k` in `1..=n`) and `extra`: every
/// `ceil(n / 256)`-th edge first, then each edge around the best. Returns the best value,
/// the first found on a tie; `extra` when `n` is 0.
fn search_edges(n: usize, width: f64, extra: f64, mut cost: impl FnMut(f64) -> f64) -> f64 {
    let mut best = (cost(extra), extra);
    let mut try_edge = |k: usize, best: &mut (f64, f64)| {
        let v = k as f64 * width;
        let c = cost(v);
        if c < best.0 {
            *best = (c, v);
        }
    };
    let stride = n.div_ceil(256).max(1);
    let mut coarse = (f64::INFINITY, 0.0);
    for k in (stride..=n).step_by(stride) {
        try_edge(k, &mut coarse);
    }
    if n > 0 {
        let k0 = (coarse.1 / width).round() as usize;
        for k in k0.saturating_sub(stride - 1).max(1)..=(k0 + stride - 1).min(n) {
            try_edge(k, &mut coarse);
        }
    }
    if coarse.0 < best.0 {
        best = coarse;
    }
    best.1
}

/// The number of bins `i` (threshold `i * width`) with the least KL divergence; see
/// [`TensorStats::entropy`].
fn kl_threshold_bins(hist: &[u64], levels: usize) -> usize {
    let used = hist.iter().rposition(|&c| c > 0).map_or(0, |k| k + 1);
    if used <= levels {
        return used;
    }
    let mut beyond = vec![0u64; used + 1];
    for k in (0..used).rev() {
        beyond[k] = beyond[k + 1] + hist[k];
    }
    let mut p = Vec::with_capacity(used);
    let mut q = Vec::with_capacity(used);
    let mut best = (f64::INFINITY, used);
    for i in levels..=used {
        p.clear();
        p.extend(hist[..i].iter().map(|&c| c as f64));
        p[i - 1] += beyond[i] as f64;
        q.clear();
        q.resize(i, 0.0);
        let merged = i / levels;
        for level in 0..levels {
            let start = level * merged;
            let stop = if level == levels - 1 {
                i
            } else {
                start + merged
            };
            let count: u64 = hist[start..stop].iter().sum();
            let nonzero = p[start..stop].iter().filter(|&&v| v != 0.0).count();
            if nonzero > 0 {
                let each = count as f64 / nonzero as f64;
                for j in start..stop {
                    if p[j] != 0.0 {
                        q[j] = each;
                    }
                }
            }
        }
        let kl = match (smooth(&mut p), smooth(&mut q)) {
            (true, true) => kl_divergence(&p, &q),
            _ => f64::INFINITY,
        };
        if kl < best.0 {
            best = (kl, i);
        }
    }
    best.1
}

/// Replace zeros by `eps` and take the same total off the nonzero entries, as MXNet's and
/// ONNX Runtime's `smooth_distribution`. False when there is nothing to smooth (all
/// zero) or smoothing would make an entry nonpositive (where those assert).
fn smooth(d: &mut [f64]) -> bool {
    const EPS: f64 = 1e-4;
    let zeros = d.iter().filter(|&&v| v == 0.0).count();
    let nonzeros = d.len() - zeros;
    if nonzeros == 0 {
        return false;
    }
    let eps1 = EPS * zeros as f64 / nonzeros as f64;
    for v in d.iter_mut() {
        *v = if *v == 0.0 { EPS } else { *v - eps1 };
    }
    d.iter().all(|&v| v > 0.0)
}

/// `sum p ln(p / q)` after normalising both, as `scipy.stats.entropy`.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    p.iter()
        .zip(q)
        .map(|(&p, &q)| {
            let (p, q) = (p / sp, q / sq);
            p * (p / q).ln()
        })
        .sum()
}

/// The values an affine quantizer can produce, in `f64`: `lo + j * step` for
/// `j` in `0..cells`.
struct Grid {
    lo: f64,
    hi: f64,
    step: f64,
    cells: f64,
}

impl Grid {
    fn new(p: QParams, qtype: QType) -> Self {
        let step = f64::from(p.scale);
        let lo = f64::from(qtype.qmin() - p.zero_point) * step;
        let hi = f64::from(qtype.qmax() - p.zero_point) * step;
        Grid {
            lo,
            hi,
            step,
            cells: f64::from(qtype.qmax() - qtype.qmin() + 1),
        }
    }

    /// Squared error at `x`: distance to the nearest grid value, or to the end it
    /// saturates to.
    fn squared_error(&self, x: f64) -> f64 {
        let j = ((x - self.lo) / self.step)
            .round()
            .clamp(0.0, self.cells - 1.0);
        (x - (self.lo + j * self.step)).powi(2)
    }

    /// Mean of the squared error over `x` uniform in `[a, b]`.
    fn mean_squared_error(&self, a: f64, b: f64) -> f64 {
        if b - a <= 0.0 {
            return self.squared_error(a);
        }
        let half = self.step / 2.0;
        let (c0, c1) = (self.lo - half, self.hi + half);
        // Below c0 and above c1 the error is x - lo and x - hi: integrate the parabola
        // with the factored difference of cubes, stable far from the grid.
        let outside = |a: f64, b: f64, g: f64| {
            let (u, v) = (a - g, b - g);
            (v - u) * (v * v + u * v + u * u) / 3.0
        };
        let mut integral = 0.0;
        if a < c0 {
            integral += outside(a, b.min(c0), self.lo);
        }
        if b > c1 {
            integral += outside(a.max(c1), b, self.hi);
        }
        let (ma, mb) = (a.max(c0), b.min(c1));
        if mb > ma {
            integral += self.sawtooth_integral(mb) - self.sawtooth_integral(ma);
        }
        integral / (b - a)
    }

    /// Integral from `c0 = lo - step/2` to `x` (within `[c0, hi + step/2]`) of the
    /// squared rounding error: each whole cell adds `step^3 / 12`, a partial one the
    /// integral of `y^2` from `-step/2` to its offset.
    fn sawtooth_integral(&self, x: f64) -> f64 {
        let half = self.step / 2.0;
        let from_c0 = x - (self.lo - half);
        let cells = (from_c0 / self.step).floor().clamp(0.0, self.cells);
        let r = from_c0 - cells * self.step - half;
        cells * self.step.powi(3) / 12.0 + (r.powi(3) + half.powi(3)) / 3.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const U8_ASYM: Target = Target {
        qtype: QType::U8,
        symmetry: Symmetry::Asymmetric,
    };
    const I8_SYM: Target = Target {
        qtype: QType::I8,
        symmetry: Symmetry::Symmetric,
    };
    const TARGETS: [Target; 2] = [U8_ASYM, I8_SYM];

    fn stats(batches: &[&[f32]]) -> TensorStats {
        let mut s = TensorStats::new("t");
        for b in batches {
            s.observe(b).unwrap();
        }
        s
    }

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                // Box-Muller; 1 - u keeps the logarithm finite.
                let (u, v): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }

    fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| lo + (hi - lo) * rng.random::<f32>())
            .collect()
    }

    /// A million standard normal values and one far outlier on each side. Clipping an
    /// outlier `o` to `t` costs `(o - t)^2 / N` of squared error and a range `R` has
    /// `(R / 255)^2 / 12` of rounding noise, so the least-error range cuts outliers this
    /// rare to a fraction of their size, and keeps ones a hundred times more frequent.
    fn gaussian_with_outliers() -> Vec<f32> {
        let mut x = gaussian(1_000_000, 1);
        x[1234] = 60.0;
        x[98_765] = -52.0;
        x
    }

    /// Mean squared error of actually quantizing `xs` on `[rmin, rmax]`.
    fn empirical_mse(xs: &[f32], rmin: f32, rmax: f32, t: Target) -> f64 {
        let p = QParams::from_range(rmin, rmax, t.qtype, t.symmetry).unwrap();
        let err: f64 = xs
            .iter()
            .map(|&x| {
                (f64::from(x)
                    - f64::from(crate::quant::dequantize(
                        crate::quant::quantize(x, p, t.qtype),
                        p,
                    )))
                .powi(2)
            })
            .sum();
        err / xs.len() as f64
    }

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
            let json = format!("\"{m}\"");
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        }
        assert_eq!(Method::MinMax.to_string(), "minmax");
        let e = "kl".parse::<Method>().unwrap_err().to_string();
        assert_eq!(e, "unknown calibration method `kl`; expected one of minmax, percentile, entropy, mse, auto");
        assert!(serde_json::from_str::<Method>("\"MinMax\"").is_err());
    }

    #[test]
    fn bin_width_is_the_smallest_power_of_two_covering_the_data() {
        let s = stats(&[&[1.0, -0.5]]);
        // 2048 * 2^-11 = 1 is not above 1.0, so the width is 2^-10.
        assert_eq!(s.histogram().bin_width(), Some(1.0 / 1024.0));
        assert_eq!(s.histogram().positive()[1024], 1);
        assert_eq!(s.histogram().negative()[512], 1);
        let s = stats(&[&[0.999]]);
        assert_eq!(s.histogram().bin_width(), Some(1.0 / 2048.0));
        assert_eq!(s.histogram().positive()[2045], 1);
    }

    #[test]
    fn growth_merges_bins_pairwise() {
        let mut s = stats(&[&[0.25, 0.5, -0.75, 0.0]]);
        assert_eq!(s.histogram().bin_width(), Some(1.0 / 2048.0));
        s.observe(&[3.0]).unwrap();
        let h = s.histogram();
        assert_eq!(h.bin_width(), Some(1.0 / 512.0));
        assert_eq!(
            (
                h.positive()[128],
                h.positive()[256],
                h.negative()[384],
                h.positive()[1536]
            ),
            (1, 1, 1, 1)
        );
        assert_eq!((h.zeros(), h.total()), (1, 5));
        // Growth by a large factor sends everything old to bin 0.
        s.observe(&[1e30]).unwrap();
        assert_eq!(s.histogram().positive()[0], 3);
        assert_eq!(s.histogram().negative()[0], 1);
        assert_eq!(s.count(), 6);
    }

    #[test]
    fn zeros_alone_leave_the_width_unset() {
        let mut s = stats(&[&[0.0, -0.0], &[]]);
        assert_eq!(s.histogram().bin_width(), None);
        assert_eq!((s.count(), s.batches()), (2, 1));
        s.observe(&[2.0]).unwrap();
        assert_eq!(s.histogram().zeros(), 2);
        assert_eq!(s.histogram().positive().iter().sum::<u64>(), 1);
    }

    #[test]
    fn non_finite_values_are_errors_naming_the_tensor() {
        let mut s = TensorStats::new("conv1_out");
        s.observe(&[1.0, 2.0]).unwrap();
        let before = (s.min_max(), s.histogram().clone());
        let e = s.observe(&[0.5, f32::NAN]).unwrap_err().to_string();
        assert!(
            e.starts_with("tensor `conv1_out`: calibration batch 2 has NaN at flat index 1"),
            "{e}"
        );
        let e = s.observe(&[f32::NEG_INFINITY]).unwrap_err().to_string();
        assert!(e.contains("batch 3 has -inf at flat index 0"), "{e}");
        assert_eq!((s.min_max(), s.histogram().clone()), before);
    }

    #[test]
    fn no_data_is_an_error_naming_the_tensor() {
        let s = TensorStats::new("fc.out");
        for m in Method::ALL {
            let e = s
                .select(m, U8_ASYM, &RangeOptions::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("tensor `fc.out`: no calibration values"),
                "{m}: {e}"
            );
        }
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(TensorStats::with_options("t", 64, 0.01).is_err());
        assert!(TensorStats::with_options("t", 2048, 0.0).is_err());
        assert!(TensorStats::with_options("t", 2048, f32::NAN).is_err());
        let s = stats(&[&[1.0]]);
        for p in [0.0, 100.5, f64::NAN] {
            assert!(s.percentile(p, Symmetry::Symmetric).is_err(), "{p}");
        }
    }

    #[test]
    fn moving_average_follows_onnx_runtime() {
        let mut s = TensorStats::with_options("t", 2048, 0.5).unwrap();
        s.observe(&[-1.0, 1.0]).unwrap();
        s.observe(&[-3.0, 5.0]).unwrap();
        s.observe(&[0.5, 2.0]).unwrap();
        // min: -1 -> -1 + 0.5 (-3 + 1) = -2 -> -2 + 0.5 (0.5 + 2) = -0.75
        // max:  1 ->  1 + 0.5 (5 - 1) = 3 -> 3 + 0.5 (2 - 3) = 2.5
        assert_eq!(s.moving_average_min_max(), Some((-0.75, 2.5)));
        assert_eq!(s.minmax(true).unwrap(), (-0.75, 2.5));
        assert_eq!(s.minmax(false).unwrap(), (-3.0, 5.0));
        assert_eq!(
            TensorStats::new("t").averaging_constant,
            DEFAULT_AVERAGING_CONSTANT
        );
    }

    #[test]
    fn uniform_data() {
        let x = uniform(100_000, -1.0, 3.0, 2);
        let s = stats(&x.chunks(1000).collect::<Vec<_>>());
        let (min, max) = s.min_max().unwrap();
        assert_eq!(s.minmax(false).unwrap(), (min, max));
        // 99% symmetric: |x| > t for 1% of the values; |x| is uniform on [0, 1] with
        // density 1/2 and on [1, 3] with density 1/4, so t = 3 - 0.04 = 2.96.
        let w = s.histogram().bin_width().unwrap() as f32;
        let (lo, hi) = s.percentile(99.0, Symmetry::Symmetric).unwrap();
        assert_eq!(lo, min);
        assert!((hi - 2.96).abs() <= 2.0 * w + 0.01, "{hi}");
        // Asymmetric: 0.5% off each end.
        let (lo, hi) = s.percentile(99.0, Symmetry::Asymmetric).unwrap();
        assert!(
            (lo + 0.98).abs() <= 2.0 * w + 0.01 && (hi - 2.98).abs() <= 2.0 * w + 0.01,
            "{lo} {hi}"
        );
        // Nothing to clip in a uniform distribution: entropy and mse stay near the ends.
        for t in TARGETS {
            let (_, hi) = s.entropy(t).unwrap();
            assert!(hi >= 0.97 * max, "entropy {t:?} {hi}");
            let (lo, hi) = s.mse(t).unwrap();
            assert!(hi >= 0.97 * max, "mse {t:?} {hi}");
            if t == U8_ASYM {
                assert!(lo <= 0.97 * min, "mse {t:?} {lo}");
            }
        }
    }

    #[test]
    fn outliers_are_clipped_by_all_but_minmax() {
        let x = gaussian_with_outliers();
        let s = stats(&x.chunks(4096).collect::<Vec<_>>());
        for t in TARGETS {
            let minmax = s.minmax(false).unwrap();
            assert_eq!(minmax, (-52.0, 60.0));
            let percentile = s.percentile(DEFAULT_PERCENTILE, t.symmetry).unwrap();
            let entropy = s.entropy(t).unwrap();
            let mse = s.mse(t).unwrap();
            for (name, (lo, hi)) in [("percentile", percentile), ("entropy", entropy)] {
                assert!(
                    hi > 2.0 && hi < 10.0 && lo < -2.0 && lo > -10.0,
                    "{name} {t:?} [{lo}, {hi}]"
                );
            }
            assert!(mse.1 < 30.0 && mse.0 > -26.0, "mse {t:?} {mse:?}");
            // 99.99% of a standard normal lies within +-3.9.
            assert!((percentile.1 - 3.9).abs() < 0.25, "{percentile:?}");
            let e_minmax = s.expected_mse(minmax.0, minmax.1, t).unwrap();
            let e_mse = s.expected_mse(mse.0, mse.1, t).unwrap();
            assert!(e_mse <= e_minmax / 2.0, "{t:?} {e_mse} {e_minmax}");
            assert!(empirical_mse(&x, mse.0, mse.1, t) < empirical_mse(&x, minmax.0, minmax.1, t));
        }
    }

    #[test]
    fn mse_is_never_worse_than_minmax_on_heavy_tails() {
        for seed in 0..4 {
            // Student-t-like: a normal divided by the root of a small chi-square.
            let a = gaussian(20_000, 10 + seed);
            let b = gaussian(20_000, 20 + seed);
            let c = gaussian(20_000, 30 + seed);
            let x: Vec<f32> = (0..20_000)
                .map(|i| a[i] / ((b[i] * b[i] + c[i] * c[i]) / 2.0).sqrt().max(1e-3))
                .collect();
            let relu: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
            for data in [&x, &relu] {
                let s = stats(&[data]);
                for t in TARGETS {
                    let (lo, hi) = s.minmax(false).unwrap();
                    let (mlo, mhi) = s.mse(t).unwrap();
                    let (e0, e1) = (
                        s.expected_mse(lo, hi, t).unwrap(),
                        s.expected_mse(mlo, mhi, t).unwrap(),
                    );
                    assert!(e1 <= e0, "seed {seed} {t:?}: {e1} > {e0}");
                    assert!(empirical_mse(data, mlo, mhi, t) <= empirical_mse(data, lo, hi, t));
                }
            }
        }
    }

    #[test]
    fn mse_keeps_outliers_that_are_not_rare() {
        // 5 outliers in 100k: clipping them would cost more than their rounding noise.
        let mut x = gaussian(100_000, 6);
        for (i, v) in [50.0f32, -45.0, 60.0, -52.0, 48.0].into_iter().enumerate() {
            x[i * 997] = v;
        }
        let s = stats(&[&x]);
        for t in TARGETS {
            let (lo, hi) = s.mse(t).unwrap();
            assert!(lo < -40.0 && hi > 40.0, "{t:?} [{lo}, {hi}]");
        }
    }

    /// One outlier at 100 in a million uniform values: clipping it to `t` costs
    /// `(100 - t)^2 / 1e6` and saves rounding noise `((t + 1) / 255)^2 / 12`, best near
    /// t = 45; the short side stays within two bins (1/16 wide) of -1.
    #[test]
    fn asymmetric_mse_clips_the_long_tail_only() {
        let mut x = uniform(1_000_000, -1.0, 1.0, 3);
        x[500] = 100.0;
        let s = stats(&[&x]);
        let (lo, hi) = s.mse(U8_ASYM).unwrap();
        assert!(lo <= -0.875, "{lo}");
        assert!(hi > 35.0 && hi < 55.0, "{hi}");
        let e = |lo, hi| s.expected_mse(lo, hi, U8_ASYM).unwrap();
        assert!(e(lo, hi) < 0.5 * e(-1.0, 100.0) && e(lo, hi) < 0.7 * e(-1.0, 1.0));
    }

    /// The estimate from the histogram agrees with actually quantizing the data, within
    /// 2% on smooth distributions (the estimate assumes values uniform within each bin).
    #[test]
    fn expected_mse_matches_empirical() {
        let x = gaussian(200_000, 4);
        let s = stats(&[&x]);
        for t in TARGETS {
            for (lo, hi) in [
                (-4.0, 4.0),
                (-2.0, 3.0),
                (-0.5, 0.5),
                (0.0, 1.0),
                (-5.0, 5.0),
            ] {
                let est = s.expected_mse(lo, hi, t).unwrap();
                let emp = empirical_mse(&x, lo, hi, t);
                assert!(
                    (est - emp).abs() <= 0.02 * emp,
                    "{t:?} [{lo}, {hi}]: {est} vs {emp}"
                );
            }
        }
    }

    #[test]
    fn grid_integral_matches_pointwise_average() {
        let grid = Grid::new(
            QParams {
                scale: 0.1,
                zero_point: 3,
            },
            QType::U8,
        );
        for (a, b) in [
            (-1.0, 1.0),
            (-0.5, -0.3),
            (24.0, 26.0),
            (-0.31, -0.29),
            (0.0, 30.0),
            (0.05, 0.05),
        ] {
            let n = 200_000;
            let avg: f64 = (0..n)
                .map(|i| grid.squared_error(a + (b - a) * (i as f64 + 0.5) / n as f64))
                .sum::<f64>()
                / n as f64;
            let got = grid.mean_squared_error(a, b);
            assert!(
                (got - avg).abs() <= 1e-6 * avg.max(1e-6),
                "[{a}, {b}]: {got} vs {avg}"
            );
        }
    }

    /// Reference: the same search in numpy on the same data and histogram, run with
    /// numpy 1.26 and printing
    /// `amax 6666.33349609375 width 4.0 used 1667`,
    /// `128 bins 239 threshold 956.0 kl 0.001258240333415923` and
    /// `256 bins 456 threshold 1824.0 kl 0.00031857062672671274`:
    ///
    /// ```python
    /// import numpy as np
    /// N = 20000
    /// u = (np.arange(N, dtype=np.float64) + 0.5) / N
    /// v = 2.0 * u - 1.0
    /// x = (v / (1.0001 - np.abs(v))).astype(np.float32)
    /// nb = 2048
    /// amax = float(np.abs(x).max())
    /// e = int(np.floor(np.log2(amax / nb)))
    /// while amax >= nb * 2.0**e: e += 1
    /// while amax < nb * 2.0**(e - 1): e -= 1
    /// w = 2.0**e
    /// a = np.abs(x.astype(np.float64)); a = a[a != 0]
    /// hist = np.bincount(np.floor(a / w).astype(np.int64), minlength=nb)
    ///
    /// def smooth(d, eps=1e-4):
    ///     z = d == 0
    ///     if z.all(): return None
    ///     d = np.where(z, eps, d - eps * z.sum() / (~z).sum())
    ///     return d if (d > 0).all() else None
    ///
    /// def threshold(hist, levels):
    ///     used = int(np.nonzero(hist)[0][-1]) + 1
    ///     if used <= levels: return used, 0.0
    ///     best = (np.inf, used)
    ///     for i in range(levels, used + 1):
    ///         p = hist[:i].astype(np.float64); p[i - 1] += hist[i:].sum()
    ///         q = np.zeros(i); m = i // levels
    ///         for lv in range(levels):
    ///             s = lv * m; t = i if lv == levels - 1 else s + m
    ///             nz = p[s:t] != 0
    ///             if nz.sum(): q[s:t][nz] = hist[s:t].sum() / nz.sum()
    ///         p, q = smooth(p), smooth(q)
    ///         kl = np.inf if p is None or q is None else float(np.sum((p / p.sum()) * np.log((p / p.sum()) / (q / q.sum()))))
    ///         if kl < best[0]: best = (kl, i)
    ///     return best[1], best[0]
    ///
    /// print("amax", repr(amax), "width", w, "used", int(np.nonzero(hist)[0][-1]) + 1)
    /// for levels in (128, 256):
    ///     i, kl = threshold(hist, levels)
    ///     print(levels, "bins", i, "threshold", i * w, "kl", kl)
    /// ```
    #[test]
    fn entropy_matches_numpy_reference() {
        const N: usize = 20_000;
        let x: Vec<f32> = (0..N)
            .map(|j| {
                let u = (j as f64 + 0.5) / N as f64;
                let v = 2.0 * u - 1.0;
                (v / (1.0001 - v.abs())) as f32
            })
            .collect();
        let s = stats(&[&x]);
        assert_eq!(s.min_max().unwrap().1, 6666.3335);
        assert_eq!(s.histogram().bin_width(), Some(4.0));
        assert_eq!(kl_threshold_bins(&s.histogram().magnitude(), 128), 239);
        assert_eq!(s.entropy(I8_SYM).unwrap(), (-956.0, 956.0));
        // Two-sided data keeps the 128-level grid for uint8 too.
        assert_eq!(s.entropy(U8_ASYM).unwrap(), (-956.0, 956.0));
        // The same magnitudes one-sided, for uint8: 256 levels.
        let abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let s = stats(&[&abs]);
        assert_eq!(s.entropy(U8_ASYM).unwrap(), (0.0, 1824.0));
        assert_eq!(s.entropy(I8_SYM).unwrap(), (0.0, 956.0));
    }

    #[test]
    fn degenerate_data() {
        let opts = RangeOptions::default();
        let cases: [(&[f32], (f32, f32)); 4] = [
            (&[0.0; 50], (0.0, 0.0)),
            (&[3.0; 50], (0.0, 3.0)),
            (&[-2.0; 50], (-2.0, 0.0)),
            (&[0.0, 0.0, 1.5], (0.0, 1.5)),
        ];
        for (data, expect) in cases {
            let s = stats(&[data]);
            for t in TARGETS {
                for m in Method::ALL {
                    let sel = s.select(m, t, &opts).unwrap();
                    assert_eq!(
                        (sel.rmin, sel.rmax),
                        expect,
                        "{m} {t:?} on {:?}",
                        &data[..3]
                    );
                    // Not exactly 0: the f32 scale puts the grid end a rounding error
                    // away from the constant.
                    assert!(sel.expected_mse <= 1e-12, "{m} {t:?} {}", sel.expected_mse);
                    let p = QParams::from_range(sel.rmin, sel.rmax, t.qtype, t.symmetry).unwrap();
                    assert!(p.scale.is_finite() && p.scale > 0.0);
                }
            }
        }
    }

    #[test]
    fn relu_output_keeps_rmin_at_zero() {
        let x: Vec<f32> = gaussian(50_000, 5)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        let s = stats(&[&x]);
        assert!(s.histogram().zeros() > 20_000);
        for t in TARGETS {
            for m in Method::ALL {
                let sel = s.select(m, t, &RangeOptions::default()).unwrap();
                assert_eq!(sel.rmin, 0.0, "{m} {t:?}");
                assert!(sel.rmax > 2.0, "{m} {t:?} {}", sel.rmax);
            }
        }
    }

    #[test]
    fn auto_reports_the_method_with_least_expected_error() {
        let x = gaussian_with_outliers();
        let s = stats(&[&x]);
        let opts = RangeOptions::default();
        for t in TARGETS {
            let auto = s.select(Method::Auto, t, &opts).unwrap();
            assert_ne!(auto.method, Method::Auto);
            let concrete = s.select(auto.method, t, &opts).unwrap();
            assert_eq!(concrete, auto);
            for m in [
                Method::MinMax,
                Method::Percentile,
                Method::Entropy,
                Method::Mse,
            ] {
                assert!(
                    auto.expected_mse <= s.select(m, t, &opts).unwrap().expected_mse,
                    "{m} {t:?}"
                );
            }
            assert_ne!(auto.method, Method::MinMax);
        }
        // Ties go to the simplest method.
        let s = stats(&[&[3.0; 10]]);
        assert_eq!(
            s.select(Method::Auto, U8_ASYM, &opts).unwrap().method,
            Method::MinMax
        );
    }

    /// Batches large enough for the parallel chunked path (over 2 * PAR_CHUNK values), with
    /// runs of zeros of both signs as after a ReLU: the same histogram, min/max, zero count
    /// and sum of squares as a naive serial pass, and a NaN is still found and named.
    #[test]
    fn large_batches_match_a_naive_count() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let n = 3 * PAR_CHUNK + 12_345;
        let x: Vec<f32> = (0..n)
            .map(|i| match (i / 1000) % 4 {
                0 => 0.0,
                1 => -0.0,
                _ => ((next() - 0.3) * 20.0) as f32,
            })
            .collect();
        let s = stats(&[&x[..n / 2], &x[n / 2..]]);
        let h = s.histogram();
        let w = h.bin_width().unwrap();
        let mut pos = vec![0u64; DEFAULT_BINS];
        let mut neg = vec![0u64; DEFAULT_BINS];
        let mut zeros = 0;
        for &v in &x {
            let k = (f64::from(v).abs() / w).floor() as usize;
            if v > 0.0 {
                pos[k] += 1
            } else if v < 0.0 {
                neg[k] += 1
            } else {
                zeros += 1
            }
        }
        assert_eq!(h.positive(), &pos[..]);
        assert_eq!(h.negative(), &neg[..]);
        assert_eq!(h.zeros(), zeros);
        let min = x.iter().copied().fold(f32::INFINITY, f32::min);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(s.min_max(), Some((min, max)));
        let naive: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!((sum_squares(&x) - naive).abs() <= 1e-9 * naive);

        let mut bad = x.clone();
        bad[2 * PAR_CHUNK + 7] = f32::NAN;
        let mut t = TensorStats::new("act");
        let e = format!("{:#}", t.observe(&bad).unwrap_err());
        assert!(
            e.contains(&format!("flat index {}", 2 * PAR_CHUNK + 7)),
            "{e}"
        );
        assert_eq!(t.count(), 0);
    }

    fn batches() -> impl Strategy<Value = Vec<Vec<f32>>> {
        let value = prop_oneof![
            4 => -10f32..10.0,
            1 => -1e6f32..1e6,
            1 => -1e-3f32..1e-3,
            1 => Just(0.0f32),
        ];
        proptest::collection::vec(proptest::collection::vec(value, 0..40), 1..6)
    }

    proptest! {
        #[test]
        fn histogram_does_not_depend_on_batch_order(b in batches()) {
            let forward = stats(&b.iter().map(Vec::as_slice).collect::<Vec<_>>());
            let reversed = stats(&b.iter().rev().map(Vec::as_slice).collect::<Vec<_>>());
            let all: Vec<f32> = b.concat();
            let single = stats(&[&all]);
            prop_assert_eq!(forward.histogram(), reversed.histogram());
            prop_assert_eq!(forward.histogram(), single.histogram());
            prop_assert_eq!(forward.min_max(), single.min_max());
            prop_assert_eq!(forward.count(), all.len() as u64);
        }

        #[test]
        fn merged_histograms_equal_one_pass(b in batches()) {
            let mut merged = Histogram::new(DEFAULT_BINS).unwrap();
            for batch in &b {
                merged.merge(stats(&[batch]).histogram()).unwrap();
            }
            let all: Vec<f32> = b.concat();
            let single = stats(&[&all]);
            prop_assert_eq!(&merged, single.histogram());
        }

        /// Every value falls in the bin its magnitude says, against a naive f64 count.
        #[test]
        fn histogram_matches_naive_binning(b in batches()) {
            let s = stats(&b.iter().map(Vec::as_slice).collect::<Vec<_>>());
            let h = s.histogram();
            if let Some(w) = h.bin_width() {
                let mut pos = vec![0u64; DEFAULT_BINS];
                let mut neg = vec![0u64; DEFAULT_BINS];
                for &x in b.iter().flatten() {
                    let k = (f64::from(x).abs() / w).floor() as usize;
                    if x > 0.0 { pos[k] += 1 } else if x < 0.0 { neg[k] += 1 }
                }
                prop_assert_eq!(h.positive(), &pos[..]);
                prop_assert_eq!(h.negative(), &neg[..]);
                let amax = b.iter().flatten().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
                prop_assert!(amax < w * DEFAULT_BINS as f64 && amax >= w * DEFAULT_BINS as f64 / 2.0);
            }
        }

        /// At most 100 - p percent of the values lie outside the percentile range (each
        /// tail at most half of it when asymmetric).
        #[test]
        fn percentile_drops_at_most_the_budget(b in batches(), p in 50.0f64..=100.0) {
            let s = stats(&b.iter().map(Vec::as_slice).collect::<Vec<_>>());
            prop_assume!(s.count() > 0);
            let all: Vec<f32> = b.concat();
            let n = all.len() as f64;
            let budget = (1.0 - p / 100.0) * n;
            let (lo, hi) = s.percentile(p, Symmetry::Symmetric).unwrap();
            let t = lo.abs().max(hi);
            prop_assert!(all.iter().filter(|x| x.abs() > t).count() as f64 <= budget + 1e-9);
            let (lo, hi) = s.percentile(p, Symmetry::Asymmetric).unwrap();
            prop_assert!(all.iter().filter(|&&x| x < lo).count() as f64 <= budget / 2.0 + 1e-9);
            prop_assert!(all.iter().filter(|&&x| x > hi).count() as f64 <= budget / 2.0 + 1e-9);
        }
    }

    proptest! {
        // Each case runs every method on both targets, entropy being quadratic in the bins.
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Every method's range contains 0 and stays within the observed range.
        #[test]
        fn ranges_stay_within_observed(b in batches()) {
            let s = stats(&b.iter().map(Vec::as_slice).collect::<Vec<_>>());
            prop_assume!(s.count() > 0);
            let (min, max) = s.min_max().unwrap();
            for t in TARGETS {
                for m in Method::ALL {
                    let sel = s.select(m, t, &RangeOptions::default()).unwrap();
                    prop_assert!(sel.rmin <= 0.0 && sel.rmax >= 0.0);
                    prop_assert!(sel.rmin >= min.min(0.0) && sel.rmax <= max.max(0.0));
                    prop_assert!(sel.expected_mse.is_finite() && sel.expected_mse >= 0.0);
                }
            }
        }
    }
}
