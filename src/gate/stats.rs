//! Statistics for latency gates: medians, a one-sided Mann–Whitney U test and a seeded
//! bootstrap interval for a ratio of medians.
//!
//! Written here rather than taken from a crate: the well-kept statistics crates (statrs) have
//! distributions but no rank tests, and the test needs scipy's exact conventions (midranks, tie
//! correction, continuity correction) so that its p-values can be checked against scipy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::bench::report::percentile;

/// Median with linear interpolation between the two middle order statistics (NumPy's
/// `median`), NaN for an empty slice.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    median_in_place(&mut v)
}

/// Median of `v`, reordering it; linear in `v.len()`, which keeps the bootstrap cheap.
fn median_in_place(v: &mut [f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    let mid = n / 2;
    let (left, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = *m;
    if n % 2 == 1 {
        upper
    } else {
        let lower = left.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lower + upper) / 2.0
    }
}

/// The result of a one-sided Mann–Whitney U test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U statistic of the first sample (scipy's `statistic`).
    pub u: f64,
    /// Standardised statistic after tie and continuity corrections.
    pub z: f64,
    /// One-sided p-value for "the first sample is stochastically greater".
    pub p_value: f64,
}

/// One-sided Mann–Whitney U test of `x` against `y` with the alternative that `x` is
/// stochastically greater, using the normal approximation with tie correction and continuity
/// correction. Matches `scipy.stats.mannwhitneyu(x, y, alternative="greater",
/// method="asymptotic", use_continuity=True)`; the approximation is good for n ≥ 8 per side.
pub fn mann_whitney_greater(x: &[f64], y: &[f64]) -> MannWhitney {
    let n1 = x.len() as f64;
    let n2 = y.len() as f64;
    let mut all: Vec<(f64, bool)> = x
        .iter()
        .map(|&v| (v, true))
        .chain(y.iter().map(|&v| (v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));

    // Midranks for ties; `tie_term` is Σ(t³ − t) over groups of equal values.
    let mut rank_sum_x = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i + 1;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let t = (j - i) as f64;
        // Ranks are 1-based: the group covers ranks i+1 ..= j.
        let midrank = (i + 1 + j) as f64 / 2.0;
        rank_sum_x += midrank * all[i..j].iter().filter(|e| e.1).count() as f64;
        tie_term += t * t * t - t;
        i = j;
    }

    let u = rank_sum_x - n1 * (n1 + 1.0) / 2.0;
    let n = n1 + n2;
    let mu = n1 * n2 / 2.0;
    let sigma = (n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)))).sqrt();
    let z = (u - mu - 0.5) / sigma;
    let p_value = if sigma > 0.0 && z.is_finite() {
        normal_sf(z)
    } else {
        // Every value tied (or too few values): no evidence either way.
        1.0
    };
    MannWhitney { u, z, p_value }
}

/// Survival function of the standard normal distribution, P(Z > z).
pub fn normal_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// A percentile-bootstrap confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// Coverage, e.g. 0.95.
    pub confidence: f64,
}

/// Percentile-bootstrap interval for median(`num`) / median(`den`), resampling both samples
/// independently with replacement `resamples` times from a ChaCha8 stream seeded by `seed`.
pub fn bootstrap_median_ratio(
    num: &[f64],
    den: &[f64],
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> Interval {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut a = vec![0.0; num.len()];
    let mut b = vec![0.0; den.len()];
    let mut ratios = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for slot in a.iter_mut() {
            *slot = num[rng.random_range(0..num.len())];
        }
        for slot in b.iter_mut() {
            *slot = den[rng.random_range(0..den.len())];
        }
        ratios.push(median_in_place(&mut a) / median_in_place(&mut b));
    }
    ratios.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence) / 2.0 * 100.0;
    Interval {
        low: percentile(&ratios, tail),
        high: percentile(&ratios, 100.0 - tail),
        confidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(f64::MIN_POSITIVE)
    }

    #[test]
    fn median_matches_numpy() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn normal_sf_matches_scipy() {
        // from scipy.stats import norm; [norm.sf(z) for z in (0, 1.0, 1.6448536269514722, 3.5, -2.0)]
        // -> 0.5, 0.15865525393145707, 0.050000000000000044, 0.00023262907903552502, 0.9772498680518208
        assert!(close(normal_sf(0.0), 0.5, 1e-14));
        assert!(close(normal_sf(1.0), 0.15865525393145707, 1e-13));
        assert!(close(normal_sf(1.6448536269514722), 0.05, 1e-13));
        assert!(close(normal_sf(3.5), 0.00023262907903552502, 1e-12));
        assert!(close(normal_sf(-2.0), 0.9772498680518208, 1e-13));
    }

    #[test]
    fn mann_whitney_without_ties_matches_scipy() {
        // from scipy.stats import mannwhitneyu
        // x = [10.2, 11.5, 9.8, 12.1, 10.9, 11.8, 12.4, 10.5, 11.1, 13.0]
        // y = [9.1, 10.0, 9.5, 10.8, 9.9, 10.3, 9.7, 10.1, 9.3]
        // r = mannwhitneyu(x, y, alternative="greater", method="asymptotic", use_continuity=True)
        // r.statistic, r.pvalue -> (82.0, 0.0014402423345135453)
        let x = [10.2, 11.5, 9.8, 12.1, 10.9, 11.8, 12.4, 10.5, 11.1, 13.0];
        let y = [9.1, 10.0, 9.5, 10.8, 9.9, 10.3, 9.7, 10.1, 9.3];
        let r = mann_whitney_greater(&x, &y);
        assert_eq!(r.u, 82.0);
        assert!(close(r.p_value, 0.0014402423345135453, 1e-9), "{r:?}");
    }

    #[test]
    fn mann_whitney_with_ties_matches_scipy() {
        // from scipy.stats import mannwhitneyu
        // x = [5, 6, 6, 7, 7, 7, 8, 9, 9, 10]
        // y = [4, 5, 5, 6, 6, 7, 7, 8, 8, 8, 9]
        // r = mannwhitneyu(x, y, alternative="greater", method="asymptotic", use_continuity=True)
        // r.statistic, r.pvalue -> (68.5, 0.17617484699534958)
        let x = [5.0, 6.0, 6.0, 7.0, 7.0, 7.0, 8.0, 9.0, 9.0, 10.0];
        let y = [4.0, 5.0, 5.0, 6.0, 6.0, 7.0, 7.0, 8.0, 8.0, 8.0, 9.0];
        let r = mann_whitney_greater(&x, &y);
        assert_eq!(r.u, 68.5);
        assert!(close(r.p_value, 0.17617484699534958, 1e-9), "{r:?}");
    }

    #[test]
    fn mann_whitney_less_direction_is_not_significant() {
        // mannwhitneyu(y, x, alternative="greater", method="asymptotic", use_continuity=True)
        // with x, y from the no-ties case -> (8.0, 0.9989001764694435)
        let x = [10.2, 11.5, 9.8, 12.1, 10.9, 11.8, 12.4, 10.5, 11.1, 13.0];
        let y = [9.1, 10.0, 9.5, 10.8, 9.9, 10.3, 9.7, 10.1, 9.3];
        let r = mann_whitney_greater(&y, &x);
        assert_eq!(r.u, 8.0);
        assert!(close(r.p_value, 0.9989001764694435, 1e-9), "{r:?}");
    }

    #[test]
    fn all_tied_is_no_evidence() {
        let r = mann_whitney_greater(&[1.0; 8], &[1.0; 8]);
        assert_eq!(r.p_value, 1.0);
    }

    #[test]
    fn bootstrap_is_seeded_and_covers_the_ratio() {
        let num: Vec<f64> = (0..40).map(|i| 12.0 + (i % 7) as f64 * 0.3).collect();
        let den: Vec<f64> = (0..40).map(|i| 10.0 + (i % 5) as f64 * 0.3).collect();
        let a = bootstrap_median_ratio(&num, &den, 2000, 0.95, 7);
        let b = bootstrap_median_ratio(&num, &den, 2000, 0.95, 7);
        assert_eq!(a, b);
        let point = median(&num) / median(&den);
        assert!(a.low <= point && point <= a.high, "{a:?} vs {point}");
        assert!(a.low > 1.0, "a clear 20% shift must exclude 1: {a:?}");
        let c = bootstrap_median_ratio(&num, &den, 2000, 0.95, 8);
        assert_ne!(a, c);
    }
}
