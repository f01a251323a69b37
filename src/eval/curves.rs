//! Reading training curves: from a run's CSV logs, their mean level (mAUCC), the step at which a curve first reaches a level
//! (interpolated between evaluations), the plateau it settles at, and the speed-up of one arm over
//! another over seeds, with a Student-t interval, k of n and a sign test (see [`crate::eval::stats`]).
//!
//! The speed-up estimator is built to be robust to noise on the plateau: the baseline's gain is
//! measured from step 0 to the mean of its last evaluations (not its last point), and each arm's
//! time is the first crossing of a fixed fraction of that gain, interpolated linearly between the
//! two evaluations around it.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::eval::stats::{
    bootstrap_interval, geometric_mean, t_interval, SignTest, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL,
};
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
    /// The level the reference is timed to (`None` when the reference did not improve, so there is none).
    pub level: Option<f64>,
    /// The level the candidate is timed to, where it differs from the reference's (own-gain timing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_level: Option<f64>,
    /// The reference's step at its level (`None`: not reached).
    pub reference_step: Option<f64>,
    /// The candidate's step at its level (`None`: not reached).
    pub candidate_step: Option<f64>,
    /// `reference_step / candidate_step` (> 1: the candidate got there sooner), as it enters the estimate: an
    /// arm that never reached its level is timed at its last step (see [`Self::censored`]); `None` when there
    /// is no level.
    pub ratio: Option<f64>,
    /// One arm never reached its level. The candidate's ratio is then an upper bound (it would have needed
    /// longer), at most 1 when the reference got there within the same steps, so a censored candidate can
    /// only count against it; a censored reference gives a lower bound.
    #[serde(default)]
    pub censored: bool,
}

impl SeedTimes {
    /// Times both arms to their levels; `last` holds each arm's last evaluated step, where an arm that
    /// never reached its level is timed.
    pub fn new(
        seed: u64,
        level: Option<f64>,
        reference_step: Option<f64>,
        candidate_step: Option<f64>,
        last: (u64, u64),
    ) -> Self {
        let censored = level.is_some() && (reference_step.is_none() || candidate_step.is_none());
        let b = reference_step.unwrap_or(last.0 as f64);
        let l = candidate_step.unwrap_or(last.1 as f64);
        let ratio = (level.is_some() && b > 0.0 && l > 0.0).then(|| b / l);
        Self { seed, level, candidate_level: None, reference_step, candidate_step, ratio, censored }
    }

    /// The ratio as the tables print it: `1.09`, `≤0.85` (censored candidate), `≥1.20` (censored reference),
    /// `~1.00` (both censored) or `—` (no level).
    pub fn ratio_text(&self) -> String {
        match (self.ratio, self.censored, self.reference_step.is_some(), self.candidate_step.is_some()) {
            (None, ..) => "—".into(),
            (Some(r), false, ..) => format!("{r:.2}"),
            (Some(r), true, true, false) => format!("≤{r:.2}"),
            (Some(r), true, false, true) => format!("≥{r:.2}"),
            (Some(r), true, ..) => format!("~{r:.2}"),
        }
    }
}

/// A speed-up over seeds: per-seed times, their geometric-mean ratio with its Student-t interval (the
/// headline), a percentile bootstrap interval (secondary: it undercovers over few seeds), how many seeds
/// reached the level, and a sign test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedUp {
    /// What is timed, e.g. `50% of the reference's gain` or `50% of each arm's own gain`.
    pub measure: String,
    /// The curve it is read from (a fidelity metric or `loss_gain`).
    pub signal: String,
    /// Per seed.
    pub seeds: Vec<SeedTimes>,
    /// Geometric mean of the ratios over every seed with a level, censored seeds included.
    pub estimate: Option<f64>,
    /// The 95% Student-t interval of that mean (on log ratios, n − 1 degrees of freedom).
    pub t_interval: Option<(f64, f64)>,
    /// The 95% percentile bootstrap interval of that mean, resampling seeds (secondary).
    pub bootstrap_interval: Option<(f64, f64)>,
    /// The sign test over the seeds with a ratio.
    pub sign_test: SignTest,
}

impl SpeedUp {
    /// Combines per-seed times.
    pub fn new(measure: &str, signal: &str, seeds: Vec<SeedTimes>) -> Self {
        let ratios: Vec<f64> = seeds.iter().filter_map(|s| s.ratio).collect();
        let estimate = (!ratios.is_empty()).then(|| geometric_mean(&ratios));
        Self {
            measure: measure.into(),
            signal: signal.into(),
            estimate,
            t_interval: t_interval(&ratios, LEVEL),
            bootstrap_interval: bootstrap_interval(&ratios, geometric_mean, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL),
            sign_test: SignTest::of(&ratios),
            seeds,
        }
    }

    /// Seeds at which both arms reached their levels (the k of "k of n").
    pub fn reached(&self) -> usize {
        self.seeds.iter().filter(|s| s.ratio.is_some() && !s.censored).count()
    }

    /// Seeds that entered the estimate with an arm censored.
    pub fn censored(&self) -> usize {
        self.seeds.iter().filter(|s| s.ratio.is_some() && s.censored).count()
    }

    /// "k of n" (n = every seed), naming the censored seeds: `4 of 5 (1 censored)`.
    pub fn reached_text(&self) -> String {
        let c = self.censored();
        let censored = if c > 0 { format!(" ({c} censored)") } else { String::new() };
        format!("{} of {}{censored}", self.reached(), self.seeds.len())
    }

    /// The estimate and its t-interval as the tables print them: `×1.09 [0.98, 1.22]`, `×1.09` (one seed) or `—`.
    pub fn estimate_text(&self) -> String {
        interval_text(self.estimate, self.t_interval)
    }

    /// A table cell: the estimate, its t-interval and k/n, censored seeds named: `×1.09 [0.98, 1.22] 4/5, 1 censored`.
    pub fn headline_text(&self) -> String {
        let c = self.censored();
        let censored = if c > 0 { format!(", {c} censored") } else { String::new() };
        format!("{} {}/{}{censored}", self.estimate_text(), self.reached(), self.seeds.len())
    }

    /// The speed-up per second of compute when a step of the candidate costs `cost` of the reference's: the
    /// estimate and its t-interval divided by it.
    pub fn per_second_text(&self, cost: f64) -> String {
        interval_text(self.estimate.map(|e| e / cost), self.t_interval.map(|(lo, hi)| (lo / cost, hi / cost)))
    }

    /// The secondary bootstrap interval: `[1.03, 1.18]` or `—`.
    pub fn bootstrap_text(&self) -> String {
        self.bootstrap_interval.map_or("—".into(), |(lo, hi)| format!("[{lo:.2}, {hi:.2}]"))
    }

    /// The header of [`Self::row`]'s table.
    pub const ROW_HEADER: &'static str = "| level | curve | per seed | over seeds [95% t-interval] | k of n | \
        sign test | bootstrap 95% (secondary) |\n|---|---|---|---|---|---|---|\n";

    /// One Markdown table row under [`Self::ROW_HEADER`].
    pub fn row(&self) -> String {
        let per_seed: Vec<String> = self.seeds.iter().map(SeedTimes::ratio_text).collect();
        format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            self.measure,
            self.signal,
            per_seed.join(" · "),
            self.estimate_text(),
            self.reached_text(),
            self.sign_test.text(),
            self.bootstrap_text()
        )
    }
}

/// An estimate and its interval: `×1.09 [0.98, 1.22]`, `×1.09` (no interval) or `—`.
pub fn interval_text(estimate: Option<f64>, interval: Option<(f64, f64)>) -> String {
    match (estimate, interval) {
        (Some(e), Some((lo, hi))) => format!("×{e:.2} [{lo:.2}, {hi:.2}]"),
        (Some(e), None) => format!("×{e:.2}"),
        _ => "—".into(),
    }
}

/// One seed's pair of curves: `(seed, reference, candidate)`, each `(step, value)` points.
pub type SeedCurves<'a> = (u64, &'a [(u64, f64)], &'a [(u64, f64)]);

/// The measure of both arms' times to `fraction` of the reference's gain (one level for both).
pub fn shared_measure(fraction: f64) -> String {
    format!("{:.0}% of the reference's gain", fraction * 100.0)
}

/// The measure of each arm's time to `fraction` of its own gain.
pub fn own_measure(fraction: f64) -> String {
    format!("{:.0}% of each arm's own gain", fraction * 100.0)
}

/// The measures of the time to the reference's final value: from its last step, and from first crossings.
pub const FINAL_MEASURES: [&str; 2] =
    ["the reference's final value (its last step)", "the reference's final value (first crossings)"];

/// What the speed-up rows of a summary mean, printed above them.
pub const SPEEDUP_LEGEND: &str = "Speed-up of LISA (the candidate) over the baseline (the reference): the steps the \
    reference needs over the steps the candidate needs to reach a level, interpolated between evaluations, per seed \
    (> 1: LISA sooner). Levels are fractions of a gain from step 0 to the plateau, the mean of the evaluations in the \
    last fifth of the step range: of the reference's gain (one level for both arms), or of each arm's own gain (so \
    that a curve that only ends higher is not counted as faster). Over seeds: the geometric mean with its 95% \
    Student-t interval on the log ratios (n − 1 degrees of freedom). k of n: seeds at which both arms reached the \
    level; an arm that never reached it is timed at its last step and counted as censored (≤: an upper bound of \
    the seed's ratio), never dropped. Sign test: seeds faster (+), slower (−), tied (=) and the exact two-sided \
    binomial p-value. The percentile bootstrap interval is secondary: over 3–5 seeds it covers far less than 95%.";

/// Speed-ups of a candidate arm over a reference arm from paired per-seed curves `(seed, reference,
/// candidate)`, in this order:
/// - for each of [`GAIN_FRACTIONS`], both arms timed to that fraction of the reference's gain (one shared
///   level: a candidate whose curve only ends higher reaches it sooner at equal speed);
/// - for each of them, each arm timed to that fraction of its own gain (the same time course ending
///   higher is ×1);
/// - the time to the reference's final value, twice: the reference's last step over the candidate's first
///   crossing of it, and both arms' first crossings of it. They differ when the reference reached that
///   value long before its last step: a last point that dips below the plateau makes the first large
///   although neither arm got there sooner.
///
/// An arm that never reaches its level is timed at its last step and its seed marked censored, never dropped.
pub fn speedups(signal: &str, pairs: &[SeedCurves], higher_is_better: bool) -> Vec<SpeedUp> {
    let last = |c: &[(u64, f64)]| c.last().map_or(0, |p| p.0);
    let cross = |c: &[(u64, f64)], level: f64| crossing_step(c, level, higher_is_better);
    let mut out = Vec::new();
    for &f in &GAIN_FRACTIONS {
        // A seed whose reference did not improve has no level and so no ratio.
        let seeds = pairs
            .iter()
            .map(|&(seed, b, l)| {
                let level = gain_level(b, f, higher_is_better);
                let (bs, ls) = level.map_or((None, None), |v| (cross(b, v), cross(l, v)));
                SeedTimes::new(seed, level, bs, ls, (last(b), last(l)))
            })
            .collect();
        out.push(SpeedUp::new(&shared_measure(f), signal, seeds));
    }
    for &f in &GAIN_FRACTIONS {
        // A candidate that did not improve has no level of its own: censored at its last step.
        let seeds = pairs
            .iter()
            .map(|&(seed, b, l)| {
                let (level, own) = (gain_level(b, f, higher_is_better), gain_level(l, f, higher_is_better));
                let (bs, ls) = (level.and_then(|v| cross(b, v)), own.and_then(|v| cross(l, v)));
                SeedTimes { candidate_level: own, ..SeedTimes::new(seed, level, bs, ls, (last(b), last(l))) }
            })
            .collect();
        out.push(SpeedUp::new(&own_measure(f), signal, seeds));
    }
    let (mut last_step, mut first_crossing) = (Vec::new(), Vec::new());
    for &(seed, b, l) in pairs {
        let Some(&(end, level)) = b.last() else { continue };
        let ls = cross(l, level);
        last_step.push(SeedTimes::new(seed, Some(level), Some(end as f64), ls, (end, last(l))));
        first_crossing.push(SeedTimes::new(seed, Some(level), cross(b, level), ls, (end, last(l))));
    }
    out.push(SpeedUp::new(FINAL_MEASURES[0], signal, last_step));
    out.push(SpeedUp::new(FINAL_MEASURES[1], signal, first_crossing));
    out
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

    /// Index of the first final-value row in [`speedups`]' output.
    const FINAL: usize = 2 * GAIN_FRACTIONS.len();

    #[test]
    fn the_interval_covers_a_known_speed_up() {
        // Five seeds whose reference events sit at different steps; the candidate's are the same curves with
        // time compressed by a factor whose geometric mean over seeds is exactly 2 (2·1.1, 2/1.1, 2·1.05,
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
        assert_eq!(s.len(), FINAL + 2);
        for su in &s[..FINAL] {
            let (lo, hi) = su.t_interval.unwrap();
            assert!(lo <= 2.0 && 2.0 <= hi, "{}: [{lo}, {hi}] misses the true ×2", su.measure);
            assert!(hi - lo < 0.6, "{}: [{lo}, {hi}] too wide to say anything", su.measure);
            assert!((su.estimate.unwrap() - 2.0).abs() < 0.15, "{}: {:?}", su.measure, su.estimate);
            assert_eq!((su.reached(), su.censored()), (5, 0));
            assert_eq!((su.sign_test.faster, su.sign_test.slower), (5, 0));
            // The bootstrap interval lies inside the t-interval here (it undercovers).
            let (blo, bhi) = su.bootstrap_interval.unwrap();
            assert!(lo <= blo && bhi <= hi, "{}: bootstrap [{blo}, {bhi}] vs t [{lo}, {hi}]", su.measure);
        }
        // Identical arms: ×1 exactly, every seed a tie.
        let same: Vec<SeedCurves> =
            curves.iter().enumerate().map(|(i, (b, _))| (i as u64, b.as_slice(), b.as_slice())).collect();
        for su in &speedups("edge_f1", &same, true)[..FINAL] {
            assert_eq!((su.estimate, su.t_interval), (Some(1.0), Some((1.0, 1.0))), "{}", su.measure);
            assert_eq!((su.sign_test.ties, su.sign_test.p_value), (5, 1.0));
        }
    }

    #[test]
    fn a_curve_that_only_ends_higher_is_not_faster_on_its_own_gain() {
        // The candidate follows the reference's time course exactly but rises to a higher plateau: the
        // shared level (a fraction of the reference's gain) is reached sooner, its own fractions at the
        // same steps.
        let shape = |s: u64| 1.0 / (1.0 + (-(s as f64 - 500.0) / 60.0).exp());
        let b: Curve = (0..=100).map(|i| (i * 10, 0.7 + 0.2 * shape(i * 10))).collect();
        let l: Curve = (0..=100).map(|i| (i * 10, 0.7 + 0.26 * shape(i * 10))).collect();
        let s = speedups("x", &[(0, &b, &l)], true);
        for (k, &f) in GAIN_FRACTIONS.iter().enumerate() {
            let (shared, own) = (&s[k], &s[GAIN_FRACTIONS.len() + k]);
            assert_eq!((shared.measure.clone(), own.measure.clone()), (shared_measure(f), own_measure(f)));
            assert!(shared.estimate.unwrap() > 1.05, "{f}: shared level {:?}", shared.estimate);
            assert!((own.estimate.unwrap() - 1.0).abs() < 0.01, "{f}: own gain {:?}", own.estimate);
            assert!(own.seeds[0].candidate_level.unwrap() > own.seeds[0].level.unwrap());
        }
    }

    #[test]
    fn the_final_value_is_timed_from_the_last_step_and_from_first_crossings() {
        // The reference reaches 0.9 at step 18 (interpolated) and ends on a dip to 0.9 at step 30; the
        // candidate crosses 0.9 at step 9.
        let b = [(0, 0.0), (10, 0.5), (20, 1.0), (30, 0.9)];
        let l = [(0, 0.0), (10, 1.0), (20, 1.0), (30, 1.0)];
        let s = speedups("x", &[(0, &b, &l)], true);
        let (last, first) = (&s[FINAL], &s[FINAL + 1]);
        assert_eq!(last.measure, FINAL_MEASURES[0]);
        assert_eq!(first.measure, FINAL_MEASURES[1]);
        assert_eq!((last.seeds[0].level, first.seeds[0].level), (Some(0.9), Some(0.9)));
        assert_eq!((last.seeds[0].reference_step, last.seeds[0].candidate_step), (Some(30.0), Some(9.0)));
        assert!((last.estimate.unwrap() - 30.0 / 9.0).abs() < 1e-12, "{last:?}");
        assert!((first.seeds[0].reference_step.unwrap() - 18.0).abs() < 1e-12, "{first:?}");
        assert!((first.estimate.unwrap() - 2.0).abs() < 1e-12, "{first:?}");
        // Identical arms: the last step still gives a "speed-up", first crossings ×1.
        let s = speedups("x", &[(0, &b, &b)], true);
        assert!((s[FINAL].estimate.unwrap() - 30.0 / 18.0).abs() < 1e-12);
        assert_eq!(s[FINAL + 1].estimate, Some(1.0));
        // Lower is better: the same timing on a falling curve.
        let down: Vec<(u64, f64)> = b.iter().map(|&(t, v)| (t, 1.0 - v)).collect();
        let s = speedups("x", &[(0, &down, &down)], false);
        assert_eq!(s[FINAL + 1].seeds[0].reference_step.map(|x| x.round()), Some(18.0));
    }

    #[test]
    fn a_censored_seed_is_counted_not_dropped() {
        // Seed 0: the candidate never reaches the reference's level. Seed 1: it is twice as fast.
        let b = [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.0)];
        let stuck = [(0, 0.0), (10, 0.1), (20, 0.2), (30, 0.3)];
        let fast = [(0, 0.0), (5, 0.5), (10, 1.0), (30, 1.0)];
        let s = speedups("x", &[(0, &b, &stuck), (1, &b, &fast)], true);
        let half = &s[0];
        // Seed 0 is timed at its last step: 10 / 30, marked censored, and counts as slower.
        assert_eq!((half.seeds[0].candidate_step, half.seeds[0].censored), (None, true));
        assert!((half.seeds[0].ratio.unwrap() - 10.0 / 30.0).abs() < 1e-12);
        assert!((half.estimate.unwrap() - (10.0f64 / 30.0 * 2.0).sqrt()).abs() < 1e-12, "{:?}", half.estimate);
        assert_eq!((half.reached(), half.censored(), half.reached_text()), (1, 1, "1 of 2 (1 censored)".into()));
        assert_eq!((half.sign_test.faster, half.sign_test.slower), (1, 1));
        assert!(half.row().contains("| ≤0.33 · 2.00 |"), "{}", half.row());
        // Dropping seed 0 (as an estimator over the seeds that reached would) would have claimed ×2.
        assert!(half.estimate.unwrap() < 1.0);
        // One seed: an estimate, no interval.
        let s = speedups("x", &[(0, &b, &b)], true);
        assert_eq!((s[0].estimate, s[0].t_interval, s[0].bootstrap_interval), (Some(1.0), None, None));
        // A reference that did not improve gives its seed no level, still listed.
        let flat = [(0, 0.5), (10, 0.4), (20, 0.45)];
        let s = speedups("x", &[(0, &flat, &b)], true);
        assert!(s[0].seeds[0].level.is_none() && s[0].seeds[0].ratio.is_none() && !s[0].seeds[0].censored);
        assert!(s[0].row().contains("| — | — | 0 of 1 |"), "{}", s[0].row());
        // A reference that never reaches its own level (a late dip far below) is censored the other way.
        let dip = SeedTimes::new(0, Some(0.5), None, Some(10.0), (30, 30));
        assert_eq!((dip.ratio, dip.ratio_text()), (Some(3.0), "≥3.00".into()));
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
