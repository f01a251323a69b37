//! Statistics over the seeds of an experiment's arms: the mean curve with its min–max band, differences and
//! speed-ups of one arm over another. Two arms' runs are paired by seed: a seed fixes initialisation, data
//! order and evaluation noise, so pairing removes their variance from a comparison.
use serde::{Deserialize, Serialize};

use crate::eval::curves::{speedups, SeedCurves, SpeedUp};

/// One seed's run of an arm, as the statistics over seeds see it.
pub trait SeedRun {
    /// The run's seed; runs of two arms with the same seed are paired.
    fn seed(&self) -> u64;
    /// The fidelity metric's name.
    fn metric(&self) -> &str;
    /// `(step, fidelity)` measured during training.
    fn fidelity_curve(&self) -> &[(u64, f64)];
    /// `(step, held-out diffusion-loss gain)` measured during training; empty when it was not measured.
    fn loss_gain_curve(&self) -> &[(u64, f64)];
}

/// Mean, minimum and maximum over seeds of curves measured at the same steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurveBand {
    /// The steps.
    pub steps: Vec<u64>,
    /// Mean over seeds at each step.
    pub mean: Vec<f64>,
    /// Minimum over seeds.
    pub min: Vec<f64>,
    /// Maximum over seeds.
    pub max: Vec<f64>,
}

impl CurveBand {
    /// The band of `curves`; `None` when they are empty or were measured at different steps.
    pub fn new(curves: &[&[(u64, f64)]]) -> Option<Self> {
        let steps: Vec<u64> = curves.first()?.iter().map(|p| p.0).collect();
        if steps.is_empty() || curves.iter().any(|c| c.iter().map(|p| p.0).ne(steps.iter().copied())) {
            return None;
        }
        let at = |i: usize| curves.iter().map(move |c| c[i].1);
        let n = curves.len() as f64;
        Some(Self {
            mean: (0..steps.len()).map(|i| at(i).sum::<f64>() / n).collect(),
            min: (0..steps.len()).map(|i| at(i).fold(f64::INFINITY, f64::min)).collect(),
            max: (0..steps.len()).map(|i| at(i).fold(f64::NEG_INFINITY, f64::max)).collect(),
            steps,
        })
    }
}

/// Mean and sample standard deviation (n − 1) of `values`: NaN for none, a deviation of 0 for one.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = values.iter().sum::<f64>() / values.len() as f64;
    let n = values.len();
    let var = if n > 1 { values.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

/// Mean and sample standard deviation over seeds of `g(reference run, candidate run)`, for the seeds both
/// arms ran (in any order).
pub fn paired_by_seed<R: SeedRun>(reference: &[R], candidate: &[R], g: impl Fn(&R, &R) -> f64) -> (f64, f64) {
    let d: Vec<f64> = pairs(reference, candidate).into_iter().map(|(r, c)| g(r, c)).collect();
    mean_sd(&d)
}

/// The runs of both arms with the same seed, in the reference's order (seeds one arm lacks are left out).
fn pairs<'a, R: SeedRun>(reference: &'a [R], candidate: &'a [R]) -> Vec<(&'a R, &'a R)> {
    reference.iter().filter_map(|r| candidate.iter().find(|c| c.seed() == r.seed()).map(|c| (r, c))).collect()
}

/// Mean and sample standard deviation over seeds of `f(candidate) − f(reference)`, paired by seed.
pub fn paired_difference<R: SeedRun>(reference: &[R], candidate: &[R], f: impl Fn(&R) -> f64) -> (f64, f64) {
    paired_by_seed(reference, candidate, |r, c| f(c) - f(r))
}

/// Speed-ups of `candidate` over `reference` on the sampled fidelity and on the held-out loss gain (where both
/// runs of a seed measured it), pairing runs by seed (see [`speedups`]).
pub fn arm_speedups<R: SeedRun>(reference: &[R], candidate: &[R], higher_is_better: bool) -> Vec<SpeedUp> {
    let paired = pairs(reference, candidate);
    let Some((first, _)) = paired.first() else {
        return vec![];
    };
    let fidelity: Vec<SeedCurves> = paired.iter().map(|(r, c)| (r.seed(), r.fidelity_curve(), c.fidelity_curve())).collect();
    let mut out = speedups(first.metric(), &fidelity, higher_is_better);
    let gain: Vec<SeedCurves> = paired
        .iter()
        .filter(|(r, c)| !r.loss_gain_curve().is_empty() && !c.loss_gain_curve().is_empty())
        .map(|(r, c)| (r.seed(), r.loss_gain_curve(), c.loss_gain_curve()))
        .collect();
    if !gain.is_empty() {
        out.extend(speedups("loss_gain", &gain, true));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Run {
        seed: u64,
        value: f64,
        curve: Vec<(u64, f64)>,
        gain: Vec<(u64, f64)>,
    }

    impl SeedRun for Run {
        fn seed(&self) -> u64 {
            self.seed
        }
        fn metric(&self) -> &str {
            "m"
        }
        fn fidelity_curve(&self) -> &[(u64, f64)] {
            &self.curve
        }
        fn loss_gain_curve(&self) -> &[(u64, f64)] {
            &self.gain
        }
    }

    fn run(seed: u64, value: f64) -> Run {
        Run { seed, value, curve: vec![(0, 0.0), (100, value)], gain: vec![] }
    }

    #[test]
    fn bands_and_moments_by_hand() {
        let (a, b) = ([(0, 1.0), (10, 3.0)], [(0, 3.0), (10, 2.0)]);
        let band = CurveBand::new(&[&a, &b]).unwrap();
        assert_eq!((band.steps, band.mean, band.min, band.max), (vec![0, 10], vec![2.0, 2.5], vec![1.0, 2.0], vec![3.0, 3.0]));
        assert!(CurveBand::new(&[&a, &[(0, 1.0), (20, 1.0)]]).is_none(), "different steps");
        assert!(CurveBand::new(&[]).is_none());
        let (m, s) = mean_sd(&[1.0, 2.0, 6.0]);
        assert!((m - 3.0).abs() < 1e-12 && (s - 7f64.sqrt()).abs() < 1e-12);
        assert_eq!(mean_sd(&[4.0]), (4.0, 0.0));
        assert!(mean_sd(&[]).0.is_nan());
    }

    #[test]
    fn pairs_by_seed_whatever_the_order() {
        // Differences 0.1 and 0.3 (seed 2 ran in one arm only): mean 0.2, sd √0.02.
        let (m, s) = paired_difference(&[run(0, 0.5), run(1, 0.6), run(2, 9.0)], &[run(1, 0.9), run(0, 0.6)], |r| r.value);
        assert!((m - 0.2).abs() < 1e-12 && (s - 0.02f64.sqrt()).abs() < 1e-12, "{m} {s}");
        assert!(paired_difference(&[run(0, 0.5)], &[run(1, 0.5)], |r| r.value).0.is_nan(), "no shared seed");
        // Only the fidelity is timed unless both runs of a seed measured the loss gain.
        let rows = arm_speedups(&[run(0, 1.0)], &[run(0, 1.0)], true);
        assert!(!rows.is_empty() && rows.iter().all(|r| r.signal == "m"));
        let with_gain = |seed| Run { gain: vec![(0, 0.0), (100, 1.0)], ..run(seed, 1.0) };
        let rows = arm_speedups(&[with_gain(0)], &[with_gain(0)], true);
        assert!(rows.iter().any(|r| r.signal == "loss_gain"));
        assert!(arm_speedups::<Run>(&[], &[], true).is_empty());
    }
}
