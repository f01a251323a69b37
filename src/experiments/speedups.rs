//! `lisa speedups`: LISA's speed-up over the baseline at several operating points, side by side. Reads
//! finished `lisa compare` folders. Each folder's `config.toml` names its operating point: task, learning
//! rate, hook, label, steps. Its `summary.json` gives the speed-ups with their intervals and the paired
//! final difference. Writes one Markdown table, a JSON file and a forest plot per gain level, so that
//! the verdict's table is generated from the runs instead of copied by hand.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::compare::CompareReport;
use crate::eval::curves::SPEEDUP_LEGEND;
use crate::eval::seeds::{arm_speedups, paired_difference};
use super::control_config::ControlConfig;
use super::bench::arm_cost::{ArmCostReport, ArmKind};
use crate::eval::curves::{shared_measure, EventTiming, SpeedUp};
use crate::eval::plot::{line_plot, PlotSpec, Series};
use crate::{Error, Result};

/// One comparison: where it was measured and what it found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// The comparison's folder name (its row's name).
    pub name: String,
    /// The folder.
    pub run: PathBuf,
    /// The condition (task).
    pub condition: String,
    /// The fidelity metric.
    pub metric: String,
    /// The learning rate both arms trained at.
    pub learning_rate: f64,
    /// LISA's hook.
    pub hook: String,
    /// The label the main network sees (`class` or `null`).
    pub label: String,
    /// Training steps per arm.
    pub steps: u64,
    /// Seeds per arm.
    pub seeds: usize,
    /// Examples per step.
    #[serde(default)]
    pub batch: i64,
    /// The main network as configured ([`ControlConfig::main_network_name`]).
    #[serde(default)]
    pub main_network: String,
    /// Final fidelity, LISA − baseline paired by seed: mean and standard deviation over seeds.
    pub final_difference: (f64, f64),
    /// The fewest evaluations inside a seed's baseline event (10–90% of its gain): sampled fidelity, then the
    /// held-out loss gain (`None` where it was not measured).
    pub fewest_points_in_event: (Option<usize>, Option<usize>),
    /// The comparison's speed-ups (see [`crate::eval::curves::speedups`]).
    pub speedups: Vec<SpeedUp>,
    /// LISA's step cost over the baseline's at this point, from an idle `lisa bench --config` (`None`: not
    /// measured here).
    #[serde(default)]
    pub lisa_step_cost: Option<f64>,
}

/// LISA's step cost over the baseline's at one operating point, from a `lisa bench --config` result.
#[derive(Debug, Clone)]
pub struct StepCost {
    /// The bench's result.
    pub report: ArmCostReport,
    /// Where it was read from.
    pub path: PathBuf,
}

impl StepCost {
    /// Reads a `lisa bench --config ... --out FILE` result that timed the baseline and LISA.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let report: ArmCostReport = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not a `lisa bench --config` result ({e})")))?;
        if report.relative(ArmKind::Baseline).is_none() || report.relative(ArmKind::Lisa).is_none() {
            return Err(Error::format(path, "the bench timed no baseline or no LISA arm; run it with both"));
        }
        Ok(Self { report, path: path.to_path_buf() })
    }

    /// LISA's cost over the baseline's where the point runs the step the bench timed: the same hook, main
    /// network and batch (the task changes the condition's content, not the step's shapes).
    pub fn applies_to(&self, p: &OperatingPoint) -> Option<f64> {
        let r = &self.report;
        (r.hook == p.hook && r.batch == p.batch && r.main_network == p.main_network)
            .then(|| r.relative(ArmKind::Lisa).zip(r.relative(ArmKind::Baseline)).map(|(l, b)| l / b))
            .flatten()
    }
}

impl OperatingPoint {
    /// The speed-up at `measure` on `signal` (the fidelity metric or `loss_gain`).
    pub fn speedup(&self, signal: &str, measure: &str) -> Option<&SpeedUp> {
        self.speedups.iter().find(|s| s.signal == signal && s.measure == measure)
    }
}

/// The gain levels the table and the plots report: short name and fraction.
const LEVELS: [(&str, f64); 3] = [("50%", 0.5), ("80%", 0.8), ("90%", 0.9)];

/// Reads the comparisons in `runs` (in that order), writes `speedups.md`, `speedups.json`,
/// `speedups-50.png` and `speedups-80.png` into `out` and returns the operating points. With `step_costs` (a
/// `lisa bench --config` result), the points it applies to (see [`StepCost::applies_to`]) also get their
/// speed-ups per second.
pub fn speedups(runs: &[PathBuf], out: &Path, step_costs: Option<&Path>) -> Result<Vec<OperatingPoint>> {
    if runs.is_empty() {
        return Err(Error::Config("no comparison folders given; pass the output folders of `lisa compare`".into()));
    }
    let costs = step_costs.map(StepCost::read).transpose()?;
    let mut points = runs.iter().map(|r| read_point(r)).collect::<Result<Vec<_>>>()?;
    for p in &mut points {
        p.lisa_step_cost = costs.as_ref().and_then(|c| c.applies_to(p));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let table = speedup_table(&points, costs.as_ref());
    std::fs::write(out.join("speedups.md"), &table).map_err(|e| Error::io(out.join("speedups.md"), e))?;
    let json = serde_json::to_string_pretty(&points).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(out.join("speedups.json"), json).map_err(|e| Error::io(out.join("speedups.json"), e))?;
    for (short, f) in &LEVELS[..2] {
        let name = format!("speedups-{}.png", short.trim_end_matches('%'));
        plot_level(&out.join(name), &points, short, &shared_measure(*f))?;
    }
    Ok(points)
}

fn read_point(run: &Path) -> Result<OperatingPoint> {
    let summary = run.join("summary.json");
    let config = run.join("config.toml");
    if !summary.is_file() || !config.is_file() {
        return Err(Error::Config(format!(
            "{} holds no finished comparison (summary.json and config.toml); pass a `lisa compare` output folder",
            run.display()
        )));
    }
    let text = std::fs::read_to_string(&summary).map_err(|e| Error::io(&summary, e))?;
    let report: CompareReport = serde_json::from_str(&text)
        .map_err(|e| Error::format(&summary, format!("not a `lisa compare` summary ({e})")))?;
    let cfg: ControlConfig = crate::config::load(Some(&config), &[])?;
    let label = serde_json::to_value(cfg.label).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    let (b, l) = (&report.baseline.runs, &report.lisa.runs);
    let fewest = |curve: &dyn Fn(&super::arm::ArmSummary) -> &[(u64, f64)], hib: bool| {
        b.iter().map(|r| EventTiming::of(curve(r), hib).map(|t| t.points_in_event)).min().flatten()
    };
    let gain_measured = b.iter().all(|r| !r.loss_gain_curve.is_empty());
    // Recomputed from the curves, so that a summary written by an older version gets today's statistics.
    let speedups = arm_speedups(b, l, report.higher_is_better);
    Ok(OperatingPoint {
        name: run.file_name().map_or_else(|| run.display().to_string(), |n| n.to_string_lossy().into_owned()),
        run: run.to_path_buf(),
        condition: report.condition.clone(),
        metric: report.metric.clone(),
        learning_rate: cfg.train.learning_rate,
        hook: cfg.lisa.hook.to_string(),
        label,
        steps: cfg.train.steps,
        seeds: b.len(),
        batch: cfg.train.batch_size as i64,
        main_network: cfg.main_network_name(),
        lisa_step_cost: None,
        final_difference: paired_difference(b, l, |r| r.final_fidelity),
        fewest_points_in_event: (
            fewest(&|r| r.curve.as_slice(), report.higher_is_better),
            if gain_measured { fewest(&|r| r.loss_gain_curve.as_slice(), true) } else { None },
        ),
        speedups,
    })
}

/// The Markdown report: one row per operating point with the headline cells, then every speed-up of every
/// point in full (shared-level and own-gain timing, per-seed ratios, t-interval, k of n, sign test, bootstrap).
pub fn speedup_table(points: &[OperatingPoint], costs: Option<&StepCost>) -> String {
    let count = |n: Option<usize>| n.map_or("—".to_string(), |n| n.to_string());
    let mut s = String::from(
        "LISA's speed-up over the baseline: the baseline's steps over LISA's to reach a level (a fraction of the \
         baseline's gain from step 0 to its plateau), per seed, then the geometric mean over seeds [95% Student-t \
         interval on the log ratios] and k/n, the seeds at which both arms reached the level (an arm that never did \
         is timed at its last step and counted as censored, never dropped); > 1: LISA gets there sooner. \
         \"fidelity\" is the sampled control fidelity (the task's metric), \"loss gain\" the held-out \
         diffusion-loss gain. \"points\": the fewest evaluations inside a seed's baseline event (10–90% of its \
         gain), fidelity / loss gain. \"final\": final fidelity, LISA − baseline paired by seed (mean ± sd). Below \
         the table: every speed-up in full, with the sign test, the secondary bootstrap interval and the timing of \
         each arm to its own gain.\n\n\
         | comparison | task (metric) | lr | hook | label | steps | seeds | points | final | 50%: fidelity | 50%: \
         loss gain | 80%: fidelity | 80%: loss gain | 90%: fidelity | 90%: loss gain | LISA's step cost | 50% per \
         second: fidelity / loss gain |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    if let Some(c) = costs {
        s.insert_str(
            s.find("\n\n|").unwrap_or(s.len()),
            &format!(
                " \"LISA's step cost\": LISA's training step over the baseline's, measured idle by `lisa bench --config` \
                 at {} ({}), given where a point runs the same step (hook, main network and batch); \"per second\": \
                 the per-step speed-up and its interval divided by that cost (> 1: LISA sooner per second of compute).",
                c.report.operating_point,
                c.path.display()
            ),
        );
    }
    for p in points {
        let mut cells = Vec::new();
        for (_, f) in LEVELS {
            for signal in [p.metric.as_str(), "loss_gain"] {
                cells.push(p.speedup(signal, &shared_measure(f)).map_or("—".into(), SpeedUp::headline_text));
            }
        }
        let per_second = |signal: &str| -> String {
            let (Some(k), Some(su)) = (p.lisa_step_cost, p.speedup(signal, &shared_measure(0.5))) else {
                return "—".into();
            };
            su.per_second_text(k)
        };
        cells.push(p.lisa_step_cost.map_or("—".into(), |k| format!("×{k:.2}")));
        cells.push(format!("{} / {}", per_second(&p.metric), per_second("loss_gain")));
        s += &format!(
            "| {} | {} ({}) | {:e} | `{}` | {} | {} | {} | {} / {} | {:+.4} ± {:.4} | {} |\n",
            p.name,
            p.condition,
            p.metric,
            p.learning_rate,
            p.hook,
            p.label,
            p.steps,
            p.seeds,
            count(p.fewest_points_in_event.0),
            count(p.fewest_points_in_event.1),
            p.final_difference.0,
            p.final_difference.1,
            cells.join(" | ")
        );
    }
    s += &format!("\n## Every speed-up in full\n\n{SPEEDUP_LEGEND}\n");
    for p in points {
        s += &format!(
            "\n### {} ({}, lr {:e}, `{}`, {} label, {} steps, {} seeds)\n\n{}",
            p.name,
            p.condition,
            p.learning_rate,
            p.hook,
            p.label,
            p.steps,
            p.seeds,
            SpeedUp::ROW_HEADER
        );
        for su in &p.speedups {
            s += &su.row();
        }
    }
    s
}

/// A forest plot at one level: per operating point (x = its row, 1-based), the estimate and its interval on
/// the sampled fidelity (left) and the loss gain (right), and the line of no speed-up.
fn plot_level(path: &Path, points: &[OperatingPoint], short: &str, measure: &str) -> Result<()> {
    const FIDELITY: [u8; 3] = [60, 110, 200];
    const LOSS_GAIN: [u8; 3] = [220, 90, 40];
    const NONE: [u8; 3] = [150, 150, 150];
    // Each operating point draws as a vertical segment from low to high and, between gaps, the estimate as a
    // larger marker.
    let whiskers = |label: &str, color: [u8; 3], offset: f64, pick: &dyn Fn(&OperatingPoint) -> Option<&SpeedUp>| {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, p) in points.iter().enumerate() {
            let Some(s) = pick(p) else { continue };
            let Some(e) = s.estimate else { continue };
            let (lo, hi) = s.t_interval.unwrap_or((e, e));
            let at = (i + 1) as f64 + offset;
            x.extend([at, at, at, at, at]);
            y.extend([lo, hi, f64::NAN, e, f64::NAN]);
        }
        Series { label: label.into(), color, x, mean: y, band: None }
    };
    let mut series = vec![
        Series {
            label: "no speed-up".into(),
            color: NONE,
            x: vec![0.5, points.len() as f64 + 0.5],
            mean: vec![1.0, 1.0],
            band: None,
        },
        whiskers("sampled control fidelity", FIDELITY, -0.1, &|p| p.speedup(&p.metric, measure)),
        whiskers("held-out loss gain", LOSS_GAIN, 0.1, &|p| p.speedup("loss_gain", measure)),
    ];
    series.retain(|s| !s.x.is_empty());
    let title = format!("LISA's speed-up to {short} of the baseline's gain (95% t-interval over seeds)");
    line_plot(
        path,
        &PlotSpec {
            title: &title,
            x_label: "comparison (row of speedups.md)",
            y_label: "baseline's steps / LISA's steps",
            width: 720,
            height: 440,
        },
        &series,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::arm::example_summary;
use crate::experiments::compare::aggregate;

    /// A finished comparison folder: `config.toml` at `lr` and hook `down_3`, and a summary in which LISA's
    /// curve is the baseline's reached in `1/factor` of the steps.
    fn comparison(dir: &Path, lr: f64, factor: f64) -> CompareReport {
        let mut cfg = ControlConfig::default();
        cfg.train.learning_rate = lr;
        cfg.lisa.hook = "down_3".parse().unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.toml"), crate::config::to_toml(&cfg).unwrap()).unwrap();
        let curve = |seed: u64, f: f64| -> Vec<(u64, f64)> {
            (0..=20).map(|i| (i * 10, 0.5 + 0.4 / (1.0 + (-(i as f64 * 10.0 * f - 100.0 - seed as f64) / 10.0).exp()))).collect()
        };
        let arm = |seed: u64, f: f64| {
            let mut r = example_summary(seed, curve(seed, f).last().unwrap().1);
            r.curve = curve(seed, f);
            r.steps = 200;
            r
        };
        let baseline = (0..3).map(|s| arm(s, 1.0)).collect();
        let lisa = (0..3).map(|s| arm(s, factor)).collect();
        let report = aggregate(&cfg, baseline, lisa).unwrap();
        std::fs::write(dir.join("summary.json"), serde_json::to_string(&report).unwrap()).unwrap();
        report
    }

    #[test]
    fn the_table_names_each_operating_point_and_its_speedups() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("slow"), tmp.path().join("fast"));
        let ra = comparison(&a, 1e-4, 1.25);
        comparison(&b, 3e-5, 1.0);
        let out = tmp.path().join("out");
        let points = speedups(&[a, b], &out, None).unwrap();
        assert_eq!(points.len(), 2);
        assert_eq!((points[0].learning_rate, points[0].hook.as_str(), points[0].label.as_str()), (1e-4, "down_3", "class"));
        assert_eq!(points[0].seeds, 3);
        // The row carries the summary's estimate, which recovers the known factor.
        let s = points[0].speedup("edge_f1", &shared_measure(0.5)).unwrap();
        assert_eq!(s.estimate, ra.speedups.iter().find(|x| x.measure == s.measure && x.signal == "edge_f1").unwrap().estimate);
        assert!((s.estimate.unwrap() - 1.25).abs() < 0.03, "{:?}", s.estimate);
        assert!((points[1].speedup("edge_f1", &shared_measure(0.5)).unwrap().estimate.unwrap() - 1.0).abs() < 1e-9);
        let table = std::fs::read_to_string(out.join("speedups.md")).unwrap();
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| slow") || l.starts_with("| fast")).collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert!(rows[0].contains("| 1e-4 | `down_3` | class |") && rows[0].contains(&s.estimate_text()), "{}", rows[0]);
        assert!(rows[1].starts_with("| fast | edges (edge_f1) | 3e-5 |"), "{}", rows[1]);
        // Given LISA's step cost where these points ran (hook down_3, the default network and batch), the
        // per-second speed-up is the per-step one over the cost.
        let cfg = ControlConfig::default();
        let report = ArmCostReport {
            operating_point: "test".into(),
            hook: "down_3".into(),
            main_network: cfg.main_network_name(),
            batch: cfg.train.batch_size as i64,
            warmup: 0,
            reps: 1,
            arms: [(ArmKind::Baseline, 1.0), (ArmKind::Lisa, 1.4)]
                .into_iter()
                .map(|(arm, t)| crate::experiments::bench::arm_cost::ArmCost {
                    arm,
                    stats: crate::experiments::bench::TimingStats::from_times(vec![t]),
                    relative: t,
                })
                .collect(),
        };
        let costs = tmp.path().join("costs.json");
        std::fs::write(&costs, serde_json::to_string(&report).unwrap()).unwrap();
        let points = speedups(&[tmp.path().join("slow")], &out, Some(&costs)).unwrap();
        assert_eq!(points[0].lisa_step_cost, Some(1.4));
        let table = std::fs::read_to_string(out.join("speedups.md")).unwrap();
        let row = table.lines().find(|l| l.starts_with("| slow")).unwrap();
        let per_second = format!("| ×1.40 | ×{:.2}", s.estimate.unwrap() / 1.4);
        assert!(row.contains(&per_second), "{row}");
        assert!(table.contains("divided by that cost"), "{table}");
        let mut elsewhere = report.clone();
        elsewhere.hook = "mid".into();
        std::fs::write(&costs, serde_json::to_string(&elsewhere).unwrap()).unwrap();
        assert_eq!(speedups(&[tmp.path().join("slow")], &out, Some(&costs)).unwrap()[0].lisa_step_cost, None);
        // No loss gain was measured: its cells are dashes, and both forest plots exist.
        assert!(rows[0].contains("| — |"));
        for f in ["speedups.json", "speedups-50.png", "speedups-80.png"] {
            assert!(out.join(f).is_file(), "{f}");
        }
    }

    #[test]
    fn a_folder_without_a_finished_comparison_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = speedups(&[tmp.path().to_path_buf()], &tmp.path().join("out"), None).unwrap_err().to_string();
        assert!(err.contains("no finished comparison"), "{err}");
        assert!(speedups(&[], tmp.path(), None).is_err());
        std::fs::write(tmp.path().join("summary.json"), "{}").unwrap();
        std::fs::write(tmp.path().join("config.toml"), "").unwrap();
        let err = speedups(&[tmp.path().to_path_buf()], &tmp.path().join("out"), None).unwrap_err().to_string();
        assert!(err.contains("not a `lisa compare` summary"), "{err}");
    }
}
