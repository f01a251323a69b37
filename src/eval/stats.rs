//! Statistics over a handful of seeds: the geometric mean of per-seed ratios, its Student-t interval
//! (the headline interval), a percentile bootstrap interval (kept only as a labelled secondary figure:
//! over 3–5 seeds it is far narrower than its nominal level), and a two-sided sign test.
//!
//! Ratios are compared on the log scale, where ×2 and ×½ are symmetric: the estimate is
//! `exp(mean(ln ratio))` and its interval `exp(mean ± t(n−1) · sd / √n)`.
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// The confidence level of every interval the reports print.
pub const LEVEL: f64 = 0.95;
/// Bootstrap resamples of the secondary interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;
/// Seed of the bootstrap's resampling (fixed: the same curves give the same interval).
pub const BOOTSTRAP_SEED: u64 = 20_261_206;

/// The geometric mean (the natural mean of ratios: ×2 and ×½ average to ×1); NaN for none.
pub fn geometric_mean(values: &[f64]) -> f64 {
    (values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp()
}

/// Mean and sample standard deviation (n − 1); the deviation is 0 for one value.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let m = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

/// The `p` quantile of Student's t distribution with `df` degrees of freedom.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    // df > 0 and a unit scale are always valid parameters.
    StudentsT::new(0.0, 1.0, df).map(|t| t.inverse_cdf(p)).unwrap_or(f64::NAN)
}

/// The Student-t interval at `level` of the geometric mean of `ratios` (all > 0): `exp(m ± t·s/√n)` with
/// `m`, `s` the mean and sample deviation of `ln ratio` and `t` the quantile with n − 1 degrees of
/// freedom; `None` for fewer than 2 ratios. Identical ratios give a zero-width interval.
pub fn t_interval(ratios: &[f64], level: f64) -> Option<(f64, f64)> {
    if ratios.len() < 2 {
        return None;
    }
    let logs: Vec<f64> = ratios.iter().map(|r| r.ln()).collect();
    let (m, s) = mean_sd(&logs);
    let half = t_quantile(0.5 + level / 2.0, (logs.len() - 1) as f64) * s / (logs.len() as f64).sqrt();
    Some(((m - half).exp(), (m + half).exp()))
}

/// The percentile bootstrap interval at `level` of `statistic` over `values`, resampled with
/// replacement `resamples` times from a generator seeded with `seed`; `None` for fewer than 2 values.
/// Over n seeds it cannot reach beyond the most extreme value (with 3 seeds its 95% interval of the
/// geometric mean is [min, max]), so it undercovers: see [`t_interval`].
pub fn bootstrap_interval(
    values: &[f64],
    statistic: impl Fn(&[f64]) -> f64,
    resamples: usize,
    seed: u64,
    level: f64,
) -> Option<(f64, f64)> {
    if values.len() < 2 || resamples == 0 {
        return None;
    }
    let mut rng = crate::rng::SplitMix64::new(seed);
    let n = values.len();
    let mut draw = vec![0.0; n];
    let mut stats: Vec<f64> = (0..resamples)
        .map(|_| {
            for d in draw.iter_mut() {
                *d = values[rng.below(n as u64) as usize];
            }
            statistic(&draw)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let q = |p: f64| stats[((p * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    let tail = (1.0 - level) / 2.0;
    Some((q(tail), q(1.0 - tail)))
}

/// A two-sided sign test over seeds: how many ratios lie above 1 and below it, and the exact binomial
/// p-value of a split at least that uneven if either direction were equally likely (ties dropped).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SignTest {
    /// Seeds whose ratio is above 1 (the candidate got there sooner).
    pub faster: usize,
    /// Seeds whose ratio is below 1.
    pub slower: usize,
    /// Seeds whose ratio is exactly 1 (left out of the test).
    pub ties: usize,
    /// Two-sided exact p-value (1 when no seed is untied).
    pub p_value: f64,
}

impl SignTest {
    /// The test over `ratios`.
    pub fn of(ratios: &[f64]) -> Self {
        let faster = ratios.iter().filter(|&&r| r > 1.0).count();
        let slower = ratios.iter().filter(|&&r| r < 1.0).count();
        let ties = ratios.len() - faster - slower;
        let n = faster + slower;
        // P(X ≤ k) for X ~ Binomial(n, ½), doubled for two sides.
        let k = faster.min(slower);
        let tail: f64 = (0..=k).map(|i| binomial(n, i)).sum::<f64>() / 2f64.powi(n as i32);
        Self { faster, slower, ties, p_value: (2.0 * tail).min(1.0) }
    }

    /// As the tables print it: `5+ 0− p=0.062`.
    pub fn text(&self) -> String {
        let ties = if self.ties > 0 { format!(" {}=", self.ties) } else { String::new() };
        format!("{}+ {}−{ties} p={:.3}", self.faster, self.slower, self.p_value)
    }
}

/// `n choose k` as a float (exact for the seed counts used here).
fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// A standard normal draw (Box–Muller) from `rng`.
    fn normal(rng: &mut SplitMix64) -> f64 {
        let u = |rng: &mut SplitMix64| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let (a, b) = (u(rng), u(rng));
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }

    #[test]
    fn t_quantiles_match_the_printed_tables() {
        // Two-sided 95% critical values of Student's t (any statistics table).
        for (df, t) in [(1.0, 12.706), (2.0, 4.303), (3.0, 3.182), (4.0, 2.776), (30.0, 2.042)] {
            assert!((t_quantile(0.975, df) - t).abs() < 1e-3, "df {df}: {}", t_quantile(0.975, df));
        }
    }

    #[test]
    fn the_t_interval_is_the_log_scale_interval_worked_by_hand() {
        // ln ratios 0, ln 2: mean ln √2, sd ln2/√2, half-width 12.706 · (ln2/√2)/√2 = 12.706 · ln2 / 2.
        let (lo, hi) = t_interval(&[1.0, 2.0], 0.95).unwrap();
        let half = 12.7062047 * std::f64::consts::LN_2 / 2.0;
        assert!((lo - (std::f64::consts::LN_2 / 2.0 - half).exp()).abs() < 1e-5, "{lo}");
        assert!((hi - (std::f64::consts::LN_2 / 2.0 + half).exp()).abs() < 1e-3, "{hi}");
        assert_eq!(t_interval(&[1.3, 1.3, 1.3], 0.95), Some((1.3, 1.3)));
        assert_eq!(t_interval(&[1.3], 0.95), None);
        // Three seeds: the bootstrap interval of the geometric mean is exactly [min, max].
        let b = bootstrap_interval(&[0.9, 1.1, 1.3], geometric_mean, 10_000, 1, 0.95).unwrap();
        assert_eq!(b, (0.9, 1.3));
    }

    /// Coverage of a nominal 95% interval of the geometric mean over `studies` simulated studies of `n`
    /// seeds whose ratios are log-normal around a true ×1.1 (sd 0.08 on the log scale).
    fn coverage(n: usize, studies: usize, interval: impl Fn(&[f64]) -> Option<(f64, f64)>) -> f64 {
        let truth: f64 = 1.1;
        let mut rng = SplitMix64::new(7 + n as u64);
        let hits = (0..studies)
            .filter(|_| {
                let ratios: Vec<f64> = (0..n).map(|_| (truth.ln() + 0.08 * normal(&mut rng)).exp()).collect();
                let (lo, hi) = interval(&ratios).unwrap();
                lo <= truth && truth <= hi
            })
            .count();
        hits as f64 / studies as f64
    }

    #[test]
    fn the_t_interval_keeps_its_coverage_where_the_bootstrap_does_not() {
        const STUDIES: usize = 4_000;
        for n in [3, 5] {
            let t = coverage(n, STUDIES, |r| t_interval(r, 0.95));
            assert!((0.93..=0.97).contains(&t), "t-interval at n = {n}: coverage {t}");
            let b = coverage(n, STUDIES, |r| bootstrap_interval(r, geometric_mean, 1_000, 11, 0.95));
            assert!(b < 0.93, "bootstrap at n = {n}: coverage {b}, expected to undercover");
        }
    }

    #[test]
    fn the_sign_test_is_the_exact_binomial_tail() {
        // 5 of 5 one way: 2 · (1/32).
        let s = SignTest::of(&[1.1, 1.2, 1.05, 1.3, 1.01]);
        assert_eq!((s.faster, s.slower, s.ties), (5, 0, 0));
        assert!((s.p_value - 0.0625).abs() < 1e-12);
        // 4 of 4: 0.125, never below 0.05 with 4 seeds.
        assert!((SignTest::of(&[1.1; 4]).p_value - 0.125).abs() < 1e-12);
        // 3 to 1: 2 · (1 + 4)/16.
        assert!((SignTest::of(&[1.1, 1.1, 1.1, 0.9]).p_value - 0.625).abs() < 1e-12);
        // A tie is left out: 2 to 0 over two untied seeds → 0.5.
        let s = SignTest::of(&[1.0, 1.2, 1.3]);
        assert_eq!((s.ties, s.p_value), (1, 0.5));
        assert_eq!(s.text(), "2+ 0− 1= p=0.500");
        assert_eq!(SignTest::of(&[]).p_value, 1.0);
        assert!((SignTest::of(&[0.9, 1.1]).p_value - 1.0).abs() < 1e-12);
    }
}
