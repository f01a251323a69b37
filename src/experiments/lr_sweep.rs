//! `lisa lr-sweep`: where does ControlNet's convergence event happen, as a function of the learning
//! rate? Reads baseline runs (`lisa train --baseline`, one per learning rate, in sub-folders of one
//! folder) and reports, for each, when its fidelity and held-out loss gain reach 10%, 50% and 90% of
//! their own gain from step 0 to their plateau: a table, a JSON file and two plots.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::control_config::ControlConfig;
use crate::eval::curves::read_curve;
use crate::eval::curves::EventTiming;
use crate::eval::fidelity::higher_is_better;
use crate::eval::plot::{line_plot, PlotSpec, Series};
use crate::{Error, Result};

/// One learning rate of the sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    /// The run folder.
    pub run: PathBuf,
    /// Its learning rate.
    pub learning_rate: f64,
    /// Steps it trained (its last evaluation).
    pub steps: u64,
    /// The fidelity metric's name.
    pub metric: String,
    /// The sampled fidelity's event.
    pub fidelity: EventTiming,
    /// The held-out loss gain's event (when measured).
    pub loss_gain: Option<EventTiming>,
    /// The curves, for the plots: `(step, fidelity)` and `(step, loss gain)`.
    pub fidelity_curve: Vec<(u64, f64)>,
    /// See `fidelity_curve`.
    pub loss_gain_curve: Vec<(u64, f64)>,
}

/// Reads every run folder under `dir` (those holding `config.toml` and `fidelity.csv`), sorted by
/// decreasing learning rate, and writes `lr-sweep.md`, `lr-sweep.json`, `lr-sweep-events.png` and
/// `lr-sweep-curves.png` into `dir`.
pub fn lr_sweep(dir: &Path) -> Result<Vec<SweepPoint>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut points = Vec::new();
    for entry in entries {
        let run = entry.map_err(|e| Error::io(dir, e))?.path();
        if !(run.join("config.toml").is_file() && run.join("fidelity.csv").is_file()) {
            continue;
        }
        points.push(read_point(&run)?);
    }
    if points.is_empty() {
        return Err(Error::Config(format!(
            "{} holds no run folders (each with config.toml and fidelity.csv, from `lisa train --baseline`)",
            dir.display()
        )));
    }
    points.sort_by(|a, b| b.learning_rate.total_cmp(&a.learning_rate));
    let table = sweep_table(&points);
    std::fs::write(dir.join("lr-sweep.md"), &table).map_err(|e| Error::io(dir.join("lr-sweep.md"), e))?;
    let json = serde_json::to_string_pretty(&points).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(dir.join("lr-sweep.json"), json).map_err(|e| Error::io(dir.join("lr-sweep.json"), e))?;
    plot_sweep(dir, &points)?;
    Ok(points)
}

fn read_point(run: &Path) -> Result<SweepPoint> {
    let cfg: ControlConfig = crate::config::load(Some(&run.join("config.toml")), &[])?;
    if cfg.lisa.enabled {
        return Err(Error::Config(format!(
            "{} is a LISA run; the learning-rate sweep reads baseline runs (`lisa train --baseline`)",
            run.display()
        )));
    }
    let kind = cfg.condition_set()?.primary();
    let metric = crate::eval::fidelity::metric_name(kind).to_string();
    let csv = run.join("fidelity.csv");
    let fidelity_curve = read_curve(&csv, &metric)?;
    let loss_gain_curve = read_curve(&csv, "loss_gain").unwrap_or_default();
    let fidelity = EventTiming::of(&fidelity_curve, higher_is_better(kind))
        .ok_or_else(|| Error::format(&csv, "no fidelity evaluations"))?;
    Ok(SweepPoint {
        run: run.to_path_buf(),
        learning_rate: cfg.train.learning_rate,
        steps: fidelity_curve.last().map_or(0, |p| p.0),
        metric,
        fidelity,
        loss_gain: EventTiming::of(&loss_gain_curve, true),
        fidelity_curve,
        loss_gain_curve,
    })
}

/// The sweep's Markdown table.
pub fn sweep_table(points: &[SweepPoint]) -> String {
    let step = |s: &Option<f64>| s.map_or("—".to_string(), |v| format!("{v:.0}"));
    let timing = |t: &EventTiming| {
        format!(
            "{:.4} → {:.4} | {:+.0}% | {} | {} | {} | {}",
            t.start,
            t.plateau,
            100.0 * t.late_change,
            step(&t.steps[0]),
            step(&t.steps[1]),
            step(&t.steps[2]),
            t.points_in_event
        )
    };
    let metric = points.first().map_or("fidelity", |p| p.metric.as_str());
    let mut s = format!(
        "Baseline ControlNet, one seed per learning rate: when each curve reaches 10% / 50% / 90% of its own gain \
         from step 0 to its plateau (the mean of its last fifth), interpolated between evaluations; \"last fifth\" = \
         how much the curve still changed over its last fifth, in % of its gain (near 0: flattened); \"points\" = \
         evaluations inside the 10–90% span.\n\n\
         | learning rate | steps | {metric}: step 0 → plateau | last fifth | 10% | 50% | 90% | points | loss gain: \
         step 0 → plateau | last fifth | 10% | 50% | 90% | points |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for p in points {
        let gain = p.loss_gain.as_ref().map_or("— | — | — | — | — | —".to_string(), timing);
        s += &format!("| {:e} | {} | {} | {gain} |\n", p.learning_rate, p.steps, timing(&p.fidelity));
    }
    s
}

fn plot_sweep(dir: &Path, points: &[SweepPoint]) -> Result<()> {
    const COLORS: [[u8; 3]; 6] =
        [[60, 110, 200], [220, 90, 40], [40, 160, 90], [150, 80, 180], [200, 160, 30], [90, 90, 90]];
    let color = |i: usize| COLORS[i % COLORS.len()];
    // The event's middle (50%) against the learning rate, both on log10 scales.
    let event = |pick: &dyn Fn(&SweepPoint) -> Option<f64>, label: &str, c: [u8; 3]| {
        let (x, y): (Vec<f64>, Vec<f64>) = points
            .iter()
            .filter_map(|p| pick(p).filter(|s| *s > 0.0).map(|s| (p.learning_rate.log10(), s.log10())))
            .unzip();
        Series { label: label.into(), color: c, x, mean: y, band: None }
    };
    let mut series = vec![event(&|p| p.fidelity.steps[1], &format!("{} 50%", points[0].metric), color(0))];
    if points.iter().any(|p| p.loss_gain.is_some()) {
        series.push(event(&|p| p.loss_gain.as_ref().and_then(|t| t.steps[1]), "loss gain 50%", color(1)));
    }
    series.retain(|s| !s.x.is_empty());
    if !series.is_empty() {
        line_plot(
            &dir.join("lr-sweep-events.png"),
            &PlotSpec {
                title: "Baseline: step of the convergence event vs learning rate",
                x_label: "log10 learning rate",
                y_label: "log10 step (50% of gain)",
                width: 720,
                height: 440,
            },
            &series,
        )?;
    }
    // Each run's loss gain (or fidelity, where the gain was not measured) against log10(step + 1).
    let curves: Vec<Series> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = if p.loss_gain_curve.is_empty() { &p.fidelity_curve } else { &p.loss_gain_curve };
            Series {
                label: format!("lr {:e}", p.learning_rate),
                color: color(i),
                x: c.iter().map(|q| ((q.0 + 1) as f64).log10()).collect(),
                mean: c.iter().map(|q| q.1).collect(),
                band: None,
            }
        })
        .collect();
    let gain = points.iter().all(|p| !p.loss_gain_curve.is_empty());
    line_plot(
        &dir.join("lr-sweep-curves.png"),
        &PlotSpec {
            title: if gain {
                "Baseline: held-out loss gain by learning rate"
            } else {
                "Baseline: fidelity by learning rate"
            },
            x_label: "log10 (step + 1)",
            y_label: if gain { "1 - L(ctrl)/L(main)" } else { &points[0].metric },
            width: 720,
            height: 440,
        },
        &curves,
    )
}
