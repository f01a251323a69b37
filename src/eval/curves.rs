//! Reading training curves: from a run's CSV logs, their mean level (mAUCC), the step at which a curve first reaches a level
//! (interpolated between evaluations), the plateau it settles at, and the speed-up of one arm over
//! another with a bootstrap interval over seeds.
//!
//! The speed-up estimator is built to be robust to noise on the plateau: the baseline's gain is
//! measured from step 0 to the mean of its last evaluations (not its last point), and each arm's
//! time is the first crossing of a fixed fraction of that gain, interpolated linearly between the
//! two evaluations around it.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The part of a curve's step range, counted from its end, whose mean is its plateau.
pub const PLATEAU_FRACTION: f64 = 0.2;

/// The fractions of the baseline's gain at which the arms' times are compared.
pub const GAIN_FRACTIONS: [f64; 3] = [0.5, 0.8, 0.9];

/// The area under `curve` (trapezoids) divided by its step range; the single value for one point.
pub fn mean_aucc(curve: &[(u64, f64)]) -> f64 {
    match curve {
        [] => f64::NAN,
        [(_, v)] => *v,
        _ => {
            let area: f64 = curve.windows(2).map(|w| (w[1].0 - w[0].0) as f64 * (w[0].1 + w[1].1) / 2.0).sum();
            area / (curve[curve.len() - 1].0 - curve[0].0) as f64
        }
    }
}

/// First step of `steps` at which `curve` is at least as good as `target` (no interpolation).
pub fn first_reaching(steps: &[u64], curve: &[f64], target: f64, higher_is_better: bool) -> Option<u64> {
    steps.iter().zip(curve).find(|(_, &v)| reaches(v, target, higher_is_better)).map(|(s, _)| *s)
}

fn reaches(v: f64, target: f64, higher_is_better: bool) -> bool {
    if higher_is_better {
        v >= target
    } else {
        v <= target
    }
}

/// The step at which `curve` first reaches `target`, interpolated linearly between the last
/// evaluation short of it and the first at or beyond it; the first step if it starts there; `None`
/// if it never gets there.
pub fn crossing_step(curve: &[(u64, f64)], target: f64, higher_is_better: bool) -> Option<f64> {
    let i = curve.iter().position(|&(_, v)| reaches(v, target, higher_is_better))?;
    if i == 0 {
        return Some(curve[0].0 as f64);
    }
    let ((s0, v0), (s1, v1)) = (curve[i - 1], curve[i]);
    // v0 is short of the target and v1 reaches it, so v1 ≠ v0.
    Some(s0 as f64 + (target - v0) / (v1 - v0) * (s1 - s0) as f64)
}

/// The mean of the values at steps in the last `fraction` of the curve's step range (at least the
/// last point).
pub fn plateau(curve: &[(u64, f64)], fraction: f64) -> f64 {
    let Some(&(last, last_v)) = curve.last() else {
        return f64::NAN;
    };
    let first = curve[0].0;
    let from = last as f64 - fraction * (last - first) as f64;
    let tail: Vec<f64> = curve.iter().filter(|p| p.0 as f64 >= from).map(|p| p.1).collect();
    if tail.is_empty() {
        last_v
    } else {
        tail.iter().sum::<f64>() / tail.len() as f64
    }
}

/// The change of `curve` over the last [`PLATEAU_FRACTION`] of its step range by a least-squares line
/// through those evaluations (slope × their step range); 0 for fewer than two of them.
pub fn late_change(curve: &[(u64, f64)]) -> f64 {
    let (Some(&(first, _)), Some(&(last, _))) = (curve.first(), curve.last()) else { return 0.0 };
    let from = last as f64 - PLATEAU_FRACTION * (last - first) as f64;
    let tail: Vec<(f64, f64)> = curve.iter().filter(|p| p.0 as f64 >= from).map(|p| (p.0 as f64, p.1)).collect();
    if tail.len() < 2 {
        return 0.0;
    }
    let n = tail.len() as f64;
    let (mx, my) = (tail.iter().map(|p| p.0).sum::<f64>() / n, tail.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = tail.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = tail.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx > 0.0 {
        sxy / sxx * (tail[tail.len() - 1].0 - tail[0].0)
    } else {
        0.0
    }
}

/// The level at `fraction` of `baseline`'s gain from its first value to its plateau; `None` when the
/// baseline did not improve (its plateau is no better than its start).
pub fn gain_level(baseline: &[(u64, f64)], fraction: f64, higher_is_better: bool) -> Option<f64> {
    let start = baseline.first()?.1;
    let gain = plateau(baseline, PLATEAU_FRACTION) - start;
    let improved = if higher_is_better { gain > 0.0 } else { gain < 0.0 };
    improved.then_some(start + fraction * gain)
}

/// One seed's times to a level and their ratio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedTimes {
    /// The seed.
    pub seed: u64,
    /// The level both arms are timed to (`None` when the baseline did not improve, so there is none).
    pub level: Option<f64>,
    /// The baseline's step at that level (`None`: not reached).
    pub baseline_step: Option<f64>,
    /// LISA's step at that level (`None`: not reached).
    pub lisa_step: Option<f64>,
    /// `baseline_step / lisa_step` (> 1: LISA got there sooner); `None` unless both reached it.
    pub ratio: Option<f64>,
}

impl SeedTimes {
    /// Times both arms to `level`.
    pub fn new(seed: u64, level: Option<f64>, baseline_step: Option<f64>, lisa_step: Option<f64>) -> Self {
        let ratio = match (baseline_step, lisa_step) {
            (Some(b), Some(l)) if l > 0.0 => Some(b / l),
            _ => None,
        };
        Self { seed, level, baseline_step, lisa_step, ratio }
    }
}

/// A speed-up over seeds: per-seed times, their geometric-mean ratio and its bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedUp {
    /// What is timed, e.g. `50% of the baseline's gain` or `the baseline's final value`.
    pub measure: String,
    /// The curve it is read from (a fidelity metric or `loss_gain`).
    pub signal: String,
    /// Per seed.
    pub seeds: Vec<SeedTimes>,
    /// Geometric mean over the seeds with a ratio.
    pub estimate: Option<f64>,
    /// 95% percentile bootstrap interval of that mean, resampling seeds.
    pub interval: Option<(f64, f64)>,
}

impl SpeedUp {
    /// Combines per-seed times.
    pub fn new(measure: &str, signal: &str, seeds: Vec<SeedTimes>) -> Self {
        let ratios: Vec<f64> = seeds.iter().filter_map(|s| s.ratio).collect();
        let estimate = (!ratios.is_empty()).then(|| geometric_mean(&ratios));
        let interval = bootstrap_interval(&ratios, geometric_mean, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, 0.95);
        Self { measure: measure.into(), signal: signal.into(), seeds, estimate, interval }
    }

    /// Seeds at which both arms reached the level.
    pub fn reached(&self) -> usize {
        self.seeds.iter().filter(|s| s.ratio.is_some()).count()
    }

    /// The estimate and its interval as the tables print them: `×1.09 [1.03, 1.18]`, `×1.09` (one seed) or `—`.
    pub fn estimate_text(&self) -> String {
        match (self.estimate, self.interval) {
            (Some(e), Some((lo, hi))) => format!("×{e:.2} [{lo:.2}, {hi:.2}]"),
            (Some(e), None) => format!("×{e:.2}"),
            _ => "—".into(),
        }
    }

    /// One Markdown table row: measure | signal | per-seed ratios | estimate [interval] | seeds reached.
    pub fn row(&self) -> String {
        let per_seed: Vec<String> =
            self.seeds.iter().map(|s| s.ratio.map_or("—".to_string(), |r| format!("{r:.2}"))).collect();
        format!(
            "| {} | {} | {} | {} | {} of {} |\n",
            self.measure,
            self.signal,
            per_seed.join(" · "),
            self.estimate_text(),
            self.reached(),
            self.seeds.len()
        )
    }
}

/// Bootstrap resamples of a speed-up interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;
/// Seed of the bootstrap's resampling (fixed: the same curves give the same interval).
pub const BOOTSTRAP_SEED: u64 = 20_261_206;

/// One seed's pair of curves: `(seed, baseline, lisa)`, each `(step, value)` points.
pub type SeedCurves<'a> = (u64, &'a [(u64, f64)], &'a [(u64, f64)]);

/// Speed-ups of LISA over the baseline, from paired per-seed curves `(seed, baseline, lisa)`: the
/// times to [`GAIN_FRACTIONS`] of the baseline's gain, then the time to the baseline's final value,
/// twice: the baseline's last step over LISA's first crossing of it (the usual "steps to the baseline's
/// final fidelity"), and both arms' first crossings of it. The two differ when the baseline's curve
/// reached that value long before its last step; a last point that dips below the plateau's mean makes
/// the first ratio large although neither arm got there sooner.
pub fn speedups(signal: &str, pairs: &[SeedCurves], higher_is_better: bool) -> Vec<SpeedUp> {
    let mut out: Vec<SpeedUp> = GAIN_FRACTIONS
        .iter()
        .map(|&f| {
            // A seed whose baseline did not improve has no level and so no ratio.
            let seeds = pairs
                .iter()
                .map(|&(seed, b, l)| match gain_level(b, f, higher_is_better) {
                    Some(level) => SeedTimes::new(
                        seed,
                        Some(level),
                        crossing_step(b, level, higher_is_better),
                        crossing_step(l, level, higher_is_better),
                    ),
                    None => SeedTimes::new(seed, None, None, None),
                })
                .collect();
            SpeedUp::new(&format!("{:.0}% of the baseline's gain", f * 100.0), signal, seeds)
        })
        .collect();
    let (mut last_step, mut first_crossing) = (Vec::new(), Vec::new());
    for &(seed, b, l) in pairs {
        let Some(&(last, level)) = b.last() else { continue };
        let lisa_step = crossing_step(l, level, higher_is_better);
        last_step.push(SeedTimes::new(seed, Some(level), Some(last as f64), lisa_step));
        first_crossing.push(SeedTimes::new(seed, Some(level), crossing_step(b, level, higher_is_better), lisa_step));
    }
    out.push(SpeedUp::new("the baseline's final value (its last step)", signal, last_step));
    out.push(SpeedUp::new("the baseline's final value (first crossings)", signal, first_crossing));
    out
}

/// The geometric mean (the natural mean of ratios: ×2 and ×½ average to ×1).
pub fn geometric_mean(values: &[f64]) -> f64 {
    (values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp()
}

/// The percentile bootstrap interval at `level` of `statistic` over `values`, resampled with
/// replacement `resamples` times from a generator seeded with `seed`; `None` for fewer than 2 values.
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

/// The fractions of a run's own gain at which its event is timed: start, middle, end.
pub const EVENT_FRACTIONS: [f64; 3] = [0.1, 0.5, 0.9];

/// When one curve of one run reaches [`EVENT_FRACTIONS`] of its gain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventTiming {
    /// Value at step 0.
    pub start: f64,
    /// Mean of the last fifth of the curve's steps.
    pub plateau: f64,
    /// Interpolated steps at 10%, 50% and 90% of `plateau − start` (`None`: not reached, or no gain).
    pub steps: Vec<Option<f64>>,
    /// Evaluations strictly between the 10% and the 90% steps: how finely the event was resolved.
    pub points_in_event: usize,
    /// How much the curve still moves over its last fifth, as a fraction of its gain (least-squares
    /// slope over those evaluations × their step range ÷ `plateau − start`): near 0 when it has flattened.
    pub late_change: f64,
}

impl EventTiming {
    /// Times `curve` (`higher_is_better` says which way is a gain).
    pub fn of(curve: &[(u64, f64)], higher_is_better: bool) -> Option<Self> {
        let start = curve.first()?.1;
        let steps: Vec<Option<f64>> = EVENT_FRACTIONS
            .iter()
            .map(|&f| crossing_step(curve, gain_level(curve, f, higher_is_better)?, higher_is_better))
            .collect();
        let points_in_event = match (steps[0], steps[EVENT_FRACTIONS.len() - 1]) {
            (Some(a), Some(b)) => curve.iter().filter(|p| (p.0 as f64) > a && (p.0 as f64) < b).count(),
            _ => 0,
        };
        let plateau = plateau(curve, PLATEAU_FRACTION);
        Some(Self { start, plateau, steps, points_in_event, late_change: late_change(curve) / (plateau - start) })
    }
}

/// Reads `(step, value)` pairs of column `name` from a CSV log; rows in which the column was not
/// measured (NaN, e.g. a loss-gain-only row of `fidelity.csv`) are skipped.
pub fn read_curve(path: &Path, name: &str) -> Result<Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = header.iter().position(|h| *h == name).ok_or_else(|| Error::format(path, format!("no column {name}")))?;
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let step =
            f.first().and_then(|s| s.parse().ok()).ok_or_else(|| Error::format(path, format!("bad row {line:?}")))?;
        let v: f64 =
            f.get(col).and_then(|s| s.parse().ok()).ok_or_else(|| Error::format(path, format!("bad row {line:?}")))?;
        if !v.is_nan() {
            out.push((step, v));
        }
    }
    Ok(out)
}

/// The mean of column `name` of a CSV log over the rows where it was measured (0 for none).
pub fn mean_column(path: &Path, name: &str) -> Result<f64> {
    let c = read_curve(path, name)?;
    Ok(c.iter().map(|p| p.1).sum::<f64>() / c.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_read_from_csv_logs_skipping_unmeasured_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fidelity.csv");
        std::fs::write(&path, "step,edge_f1,loss_gain\n0,0.7,0\n10,NaN,0.01\n20,0.8,0.03\n").unwrap();
        assert_eq!(read_curve(&path, "edge_f1").unwrap(), vec![(0, 0.7), (20, 0.8)]);
        assert!((mean_column(&path, "loss_gain").unwrap() - 0.04 / 3.0).abs() < 1e-12);
        let err = read_curve(&path, "mask_iou").unwrap_err().to_string();
        assert!(err.contains("no column mask_iou") && err.contains("fidelity.csv"), "{err}");
        std::fs::write(&path, "step,edge_f1\nten,0.7\n").unwrap();
        assert!(read_curve(&path, "edge_f1").unwrap_err().to_string().contains("bad row"));
    }

    type Curve = Vec<(u64, f64)>;

    #[test]
    fn crossing_steps_are_interpolated_between_evaluations() {
        let c = [(0, 0.2), (10, 0.4), (20, 0.8), (30, 0.9)];
        // 0.6 lies halfway between 0.4 (step 10) and 0.8 (step 20).
        assert!((crossing_step(&c, 0.6, true).unwrap() - 15.0).abs() < 1e-12);
        assert!((crossing_step(&c, 0.85, true).unwrap() - 25.0).abs() < 1e-12);
        assert_eq!(crossing_step(&c, 0.8, true), Some(20.0), "an evaluation exactly at the level");
        assert_eq!(crossing_step(&c, 0.1, true), Some(0.0), "already there at the start");
        assert_eq!(crossing_step(&c, 0.95, true), None);
        // The first crossing counts, even if the curve falls back later.
        let dip = [(0, 0.0), (10, 1.0), (20, 0.2), (30, 1.0)];
        assert!((crossing_step(&dip, 0.5, true).unwrap() - 5.0).abs() < 1e-12);
        // Lower is better: a falling curve.
        let down = [(0, 1.0), (100, 0.5), (200, 0.0)];
        assert!((crossing_step(&down, 0.25, false).unwrap() - 150.0).abs() < 1e-12);
    }

    #[test]
    fn the_plateau_is_the_mean_of_the_last_fifth_and_levels_are_fractions_of_the_gain() {
        let c = [(0, 0.0), (40, 0.5), (80, 0.9), (90, 1.1), (100, 1.0)];
        // Steps ≥ 80: 0.9, 1.1, 1.0 → 1.0.
        assert!((plateau(&c, 0.2) - 1.0).abs() < 1e-12);
        assert!((gain_level(&c, 0.5, true).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(gain_level(&c, 0.5, false), None, "a rising curve is no gain when lower is better");
        assert_eq!(gain_level(&[(0, 1.0), (10, 0.9)], 0.5, true), None);
        assert!((mean_aucc(&[(0, 0.5), (50, 0.7), (100, 0.8)]) - 0.675).abs() < 1e-12);
    }

    /// A logistic convergence event centred at `centre` steps (width `centre / 8`), evaluated every 5
    /// steps, with plateau noise from `rng`.
    fn event(centre: f64, width: f64, noise: f64, rng: &mut crate::rng::SplitMix64) -> Vec<(u64, f64)> {
        (0..=400u64)
            .map(|i| {
                let s = i * 5;
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let v = 0.7 + 0.2 / (1.0 + (-(s as f64 - centre) / width).exp());
                (s, if s == 0 { 0.7 } else { v + noise * u })
            })
            .collect()
    }

    #[test]
    fn the_bootstrap_interval_covers_a_known_speed_up() {
        // Five seeds whose baseline events sit at different steps; LISA's are the same curves with time
        // compressed by a factor whose geometric mean over seeds is exactly 2 (2·1.1, 2/1.1, 2·1.05,
        // 2/1.05, 2: seeds differ, as real ones do), with independent plateau noise.
        let mut rng = crate::rng::SplitMix64::new(3);
        let centres = [500.0, 620.0, 450.0, 700.0, 560.0];
        let factors = [2.0 * 1.1, 2.0 / 1.1, 2.0 * 1.05, 2.0 / 1.05, 2.0];
        let curves: Vec<(Curve, Curve)> = centres
            .iter()
            .zip(factors)
            .map(|(&c, k)| (event(c, c / 8.0, 0.004, &mut rng), event(c / k, c / 8.0 / k, 0.004, &mut rng)))
            .collect();
        let pairs: Vec<SeedCurves> =
            curves.iter().enumerate().map(|(i, (b, l))| (i as u64, b.as_slice(), l.as_slice())).collect();
        let s = speedups("edge_f1", &pairs, true);
        assert_eq!(s.len(), GAIN_FRACTIONS.len() + 2);
        for su in &s[..GAIN_FRACTIONS.len()] {
            let (lo, hi) = su.interval.unwrap();
            assert!(lo <= 2.0 && 2.0 <= hi, "{}: [{lo}, {hi}] misses the true ×2", su.measure);
            assert!(hi - lo < 0.6, "{}: [{lo}, {hi}] too wide to say anything", su.measure);
            assert!((su.estimate.unwrap() - 2.0).abs() < 0.15, "{}: {:?}", su.measure, su.estimate);
            assert_eq!(su.reached(), 5);
        }
        // Identical arms: ×1 exactly.
        let same: Vec<SeedCurves> =
            curves.iter().enumerate().map(|(i, (b, _))| (i as u64, b.as_slice(), b.as_slice())).collect();
        for su in &speedups("edge_f1", &same, true)[..GAIN_FRACTIONS.len()] {
            assert_eq!((su.estimate, su.interval), (Some(1.0), Some((1.0, 1.0))), "{}", su.measure);
        }
    }

    #[test]
    fn the_final_value_is_timed_from_the_last_step_and_from_first_crossings() {
        // The baseline reaches 0.9 at step 18 (interpolated) and ends on a dip to 0.9 at step 30; LISA
        // crosses 0.9 at step 9.
        let b = [(0, 0.0), (10, 0.5), (20, 1.0), (30, 0.9)];
        let l = [(0, 0.0), (10, 1.0), (20, 1.0), (30, 1.0)];
        let s = speedups("x", &[(0, &b, &l)], true);
        let (last, first) = (&s[GAIN_FRACTIONS.len()], &s[GAIN_FRACTIONS.len() + 1]);
        assert_eq!(last.measure, "the baseline's final value (its last step)");
        assert_eq!(first.measure, "the baseline's final value (first crossings)");
        assert_eq!((last.seeds[0].level, first.seeds[0].level), (Some(0.9), Some(0.9)));
        assert_eq!((last.seeds[0].baseline_step, last.seeds[0].lisa_step), (Some(30.0), Some(9.0)));
        assert!((last.estimate.unwrap() - 30.0 / 9.0).abs() < 1e-12, "{last:?}");
        assert!((first.seeds[0].baseline_step.unwrap() - 18.0).abs() < 1e-12, "{first:?}");
        assert!((first.estimate.unwrap() - 2.0).abs() < 1e-12, "{first:?}");
        // Identical arms: the last step still gives a "speed-up", first crossings ×1.
        let s = speedups("x", &[(0, &b, &b)], true);
        assert!((s[GAIN_FRACTIONS.len()].estimate.unwrap() - 30.0 / 18.0).abs() < 1e-12);
        assert_eq!(s[GAIN_FRACTIONS.len() + 1].estimate, Some(1.0));
        // Lower is better: the same timing on a falling curve.
        let down: Vec<(u64, f64)> = b.iter().map(|&(t, v)| (t, 1.0 - v)).collect();
        let s = speedups("x", &[(0, &down, &down)], false);
        assert_eq!(s[GAIN_FRACTIONS.len() + 1].seeds[0].baseline_step.map(|x| x.round()), Some(18.0));
    }

    #[test]
    fn an_arm_that_never_reaches_the_level_has_no_ratio() {
        let b = [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.0)];
        let l = [(0, 0.0), (10, 0.1), (20, 0.2), (30, 0.3)];
        let s = speedups("x", &[(0, &b, &l)], true);
        assert_eq!(s[0].seeds[0].lisa_step, None);
        assert_eq!((s[0].estimate, s[0].reached()), (None, 0));
        assert!(s[0].row().contains("| — | 0 of 1 |"), "{}", s[0].row());
        // One seed: an estimate, no interval.
        let s = speedups("x", &[(0, &b, &b)], true);
        assert_eq!((s[0].estimate, s[0].interval), (Some(1.0), None));
        // A baseline that did not improve gives its seed no level, still listed.
        let flat = [(0, 0.5), (10, 0.4), (20, 0.45)];
        let s = speedups("x", &[(0, &flat, &b)], true);
        assert!(s[0].seeds[0].level.is_none() && s[0].seeds[0].ratio.is_none());
        assert!(s[0].row().contains("| — | — | 0 of 1 |"), "{}", s[0].row());
    }

    #[test]
    fn an_event_is_timed_against_its_own_gain() {
        // 0.2 → plateau 1.0 (steps ≥ 80 of 0..100): 10% = 0.28, 50% = 0.6, 90% = 0.92.
        let c = [(0, 0.2), (20, 0.2), (40, 0.6), (60, 1.0), (80, 1.0), (100, 1.0)];
        let t = EventTiming::of(&c, true).unwrap();
        assert!((t.plateau - 1.0).abs() < 1e-12);
        let s: Vec<f64> = t.steps.iter().map(|s| s.unwrap()).collect();
        assert!((s[0] - 24.0).abs() < 1e-9 && (s[1] - 40.0).abs() < 1e-9 && (s[2] - 56.0).abs() < 1e-9, "{s:?}");
        assert_eq!(t.points_in_event, 1, "only step 40 lies strictly inside 24..56");
        assert_eq!(t.late_change, 0.0, "flat over its last fifth");
        // Still rising by 0.1 per 20 steps over steps 80..100: 0.1 of a gain of ~0.85.
        let rising = [(0, 0.0), (40, 0.5), (80, 0.8), (90, 0.85), (100, 0.9)];
        let t = EventTiming::of(&rising, true).unwrap();
        assert!((t.late_change - 0.1 / 0.85).abs() < 1e-9, "{}", t.late_change);
        // A flat curve has no event.
        let flat = EventTiming::of(&[(0, 0.5), (10, 0.5)], true).unwrap();
        assert_eq!(flat.steps, vec![None, None, None]);
        assert!(EventTiming::of(&[], true).is_none());
    }
}
