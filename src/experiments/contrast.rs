//! `lisa contrast`: the arms of one operating point against each other over seeds — every arm against the
//! reference (the baseline), and the candidate (LISA) against every other arm — per training step and, with
//! each arm's step cost from `lisa bench --config`, per second of compute.
//!
//! The arms are run folders `DIR/seed-S/NAME/` (each with its `summary.json`), gathered from one or more
//! folders: a `lisa compare` output holds `baseline` and `lisa`; `scripts/converge.sh control` writes the
//! controls beside them (`random`, `condition`, `raw`, `lr1.12`, `sub8`, …). Arms are paired by seed.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bench::arm_cost::{ArmCostReport, ArmKind};
use crate::eval::curves::SPEEDUP_LEGEND;
use crate::eval::seeds::arm_speedups;
use super::arm::ArmSummary;
use crate::eval::curves::{own_measure, shared_measure, SpeedUp};
use crate::{Error, Result};

/// Every arm found: name → seed → its summary.
pub type Arms = BTreeMap<String, BTreeMap<u64, ArmSummary>>;

/// Reads every `DIR/seed-S/NAME/summary.json` of `dirs`; the same arm and seed in two folders is an error.
pub fn read_arms(dirs: &[PathBuf]) -> Result<Arms> {
    let mut arms = Arms::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for seed_dir in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let Some(seed) = seed_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("seed-"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            for arm_dir in std::fs::read_dir(&seed_dir).map_err(|e| Error::io(&seed_dir, e))?.filter_map(|e| e.ok()) {
                let path = arm_dir.path().join("summary.json");
                if !path.is_file() {
                    continue;
                }
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let summary: ArmSummary = serde_json::from_str(&text)
                    .map_err(|e| Error::format(&path, format!("not an arm's summary ({e})")))?;
                let name = arm_dir.file_name().to_string_lossy().into_owned();
                if arms.entry(name.clone()).or_default().insert(seed, summary).is_some() {
                    return Err(Error::Config(format!(
                        "arm {name} of seed {seed} is in two of the folders given; give each arm once"
                    )));
                }
            }
        }
    }
    if arms.is_empty() {
        return Err(Error::Config(format!(
            "no arms found: expected DIR/seed-S/ARM/summary.json under {}",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(arms)
}

/// The step cost, relative to the bench's first arm, of the arm named `name` that trained `steps` steps:
/// a baseline at another learning rate (`lr…`) costs the baseline's step; LISA switched off after step N
/// (`untilN`, `lisa.last_step = N`) LISA's for N steps and the baseline's after; any other arm the bench's
/// arm of that name. `None` where the bench did not time what is needed.
pub fn relative_cost(costs: &ArmCostReport, name: &str, steps: u64) -> Option<f64> {
    if name.starts_with("lr") {
        return costs.relative(ArmKind::Baseline);
    }
    if let Some(n) = name.strip_prefix("until").and_then(|n| n.parse::<u64>().ok()) {
        let (on, off) = (costs.relative(ArmKind::Lisa)?, costs.relative(ArmKind::Baseline)?);
        let (n, t) = (n.min(steps) as f64, steps.max(1) as f64);
        return Some((n * on + (t - n) * off) / t);
    }
    costs.relative(ArmKind::parse(name).ok()?)
}

/// One arm against another over the seeds both ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contrast {
    /// The arm timed against (the denominator's steps: > 1 means the candidate got there sooner).
    pub reference: String,
    /// The arm timed.
    pub candidate: String,
    /// The seeds both arms ran.
    pub seeds: Vec<u64>,
    /// Final fidelity, candidate − reference, paired by seed: mean and standard deviation.
    pub final_difference: (f64, f64),
    /// The candidate's step cost over the reference's, from the bench (`None` without one, or where the bench
    /// did not time one of the two).
    pub cost_ratio: Option<f64>,
    /// The speed-ups per step (see [`crate::eval::curves::speedups`]).
    pub speedups: Vec<SpeedUp>,
}

impl Contrast {
    /// The speed-up at `measure` on `signal`.
    pub fn speedup(&self, signal: &str, measure: &str) -> Option<&SpeedUp> {
        self.speedups.iter().find(|s| s.signal == signal && s.measure == measure)
    }

    /// A cell: the per-step estimate with its t-interval and k/n, and the per-second one where the cost is
    /// known (`×1.09 [1.03, 1.16] 4/4 · /s ×0.78 [0.74, 0.83]`).
    pub fn cell(&self, signal: &str, measure: &str) -> String {
        let Some(s) = self.speedup(signal, measure) else { return "—".into() };
        match self.cost_ratio {
            Some(k) => format!("{} · /s {}", s.headline_text(), s.per_second_text(k)),
            None => s.headline_text(),
        }
    }
}

/// Every contrast of the arms: each arm but `reference` against it, then `candidate` against each arm but
/// those two. `costs` gives the per-second figures.
pub fn contrasts(arms: &Arms, reference: &str, candidate: &str, costs: Option<&ArmCostReport>) -> Result<Vec<Contrast>> {
    for name in [reference, candidate] {
        if !arms.contains_key(name) {
            let found: Vec<&str> = arms.keys().map(String::as_str).collect();
            return Err(Error::Config(format!("no arm {name:?} among the arms found ({})", found.join(", "))));
        }
    }
    let mut pairs: Vec<(&str, &str)> =
        arms.keys().filter(|n| *n != reference).map(|n| (reference, n.as_str())).collect();
    pairs.extend(arms.keys().filter(|n| *n != reference && *n != candidate).map(|n| (n.as_str(), candidate)));
    pairs
        .into_iter()
        .map(|(r, c)| {
            let (rr, cc) = (&arms[r], &arms[c]);
            let seeds: Vec<u64> = rr.keys().filter(|s| cc.contains_key(s)).copied().collect();
            if seeds.is_empty() {
                return Err(Error::Config(format!("arms {r} and {c} share no seed; run them with the same seeds")));
            }
            let rs: Vec<ArmSummary> = seeds.iter().map(|s| rr[s].clone()).collect();
            let cs: Vec<ArmSummary> = seeds.iter().map(|s| cc[s].clone()).collect();
            let hib = rs[0].higher_is_better;
            let d: Vec<f64> = rs.iter().zip(&cs).map(|(a, b)| b.final_fidelity - a.final_fidelity).collect();
            let cost_ratio = costs.and_then(|k| {
                Some(relative_cost(k, c, cs[0].steps)? / relative_cost(k, r, rs[0].steps)?)
            });
            Ok(Contrast {
                reference: r.into(),
                candidate: c.into(),
                final_difference: crate::eval::stats::mean_sd(&d),
                cost_ratio,
                speedups: arm_speedups(&rs, &cs, hib),
                seeds,
            })
        })
        .collect()
}

/// The report: a headline table (one row per contrast), then every speed-up in full.
pub fn contrast_table(contrasts: &[Contrast], costs: Option<&ArmCostReport>) -> String {
    let Some(first) = contrasts.first() else { return String::new() };
    let metric = first.speedups.first().map_or("fidelity", |s| s.signal.as_str()).to_string();
    let mut s = format!(
        "Arms against each other, paired by seed: the reference's steps over the candidate's to reach a level \
         (> 1: the candidate sooner), the geometric mean over seeds [95% Student-t interval] and k/n, the seeds at \
         which both reached it. \"shared\": both timed to a fraction of the reference's gain; \"own\": each to a \
         fraction of its own gain. {}\n\n\
         | candidate over reference | seeds | final {metric}, paired | 50% shared: {metric} | 50% shared: loss gain \
         | 80% shared: {metric} | 90% shared: {metric} | 80% own: {metric} | 90% own: {metric} | 90% own: loss gain \
         | step cost |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        match costs {
            Some(k) => format!(
                "\"/s\": the same per second of compute, the per-step speed-up over the step-cost ratio measured by \
                 `lisa bench --config` at {} (treated as exact; its spread is in the bench's table).",
                k.operating_point
            ),
            None => "No step costs were given: per step only.".into(),
        }
    );
    for c in contrasts {
        let cells = [
            c.cell(&metric, &shared_measure(0.5)),
            c.cell("loss_gain", &shared_measure(0.5)),
            c.cell(&metric, &shared_measure(0.8)),
            c.cell(&metric, &shared_measure(0.9)),
            c.cell(&metric, &own_measure(0.8)),
            c.cell(&metric, &own_measure(0.9)),
            c.cell("loss_gain", &own_measure(0.9)),
        ];
        s += &format!(
            "| {} over {} | {} | {:+.4} ± {:.4} | {} | {} |\n",
            c.candidate,
            c.reference,
            c.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
            c.final_difference.0,
            c.final_difference.1,
            cells.join(" | "),
            c.cost_ratio.map_or("—".into(), |k| format!("×{k:.3}"))
        );
    }
    s += &format!("\n## Every speed-up in full\n\n{SPEEDUP_LEGEND}\n");
    for c in contrasts {
        s += &format!("\n### {} over {} (seeds {:?})\n\n{}", c.candidate, c.reference, c.seeds, SpeedUp::ROW_HEADER);
        for su in &c.speedups {
            s += &su.row();
        }
    }
    s
}

/// Reads the arms of `dirs`, writes `contrast.md` and `contrast.json` into `out`, returns the contrasts.
pub fn contrast(
    dirs: &[PathBuf],
    reference: &str,
    candidate: &str,
    step_costs: Option<&Path>,
    out: &Path,
) -> Result<Vec<Contrast>> {
    let arms = read_arms(dirs)?;
    let costs = match step_costs {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            Some(
                serde_json::from_str::<ArmCostReport>(&text)
                    .map_err(|e| Error::format(p, format!("not a `lisa bench --config` result ({e})")))?,
            )
        }
    };
    let list = contrasts(&arms, reference, candidate, costs.as_ref())?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let md = out.join("contrast.md");
    std::fs::write(&md, contrast_table(&list, costs.as_ref())).map_err(|e| Error::io(&md, e))?;
    let json = out.join("contrast.json");
    let text = serde_json::to_string_pretty(&list).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&json, text).map_err(|e| Error::io(&json, e))?;
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::bench::arm_cost::ArmCost;
    use crate::experiments::bench::TimingStats;
    use crate::experiments::arm::example_summary;

    /// An arm whose event (a logistic rise) is centred at `centre` steps.
    fn arm(seed: u64, centre: f64) -> ArmSummary {
        let curve: Vec<(u64, f64)> =
            (0..=40).map(|i| (i * 25, 0.7 + 0.2 / (1.0 + (-(i as f64 * 25.0 - centre) / 40.0).exp()))).collect();
        ArmSummary { curve, steps: 1000, ..example_summary(seed, 0.9) }
    }

    fn write(dir: &Path, name: &str, a: &ArmSummary) {
        let d = dir.join(format!("seed-{}", a.seed)).join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("summary.json"), serde_json::to_string(a).unwrap()).unwrap();
    }

    #[test]
    fn arms_from_two_folders_are_contrasted_per_step_and_per_second() {
        let tmp = tempfile::tempdir().unwrap();
        let (cmp, ctl) = (tmp.path().join("compare"), tmp.path().join("controls"));
        for seed in 0..3 {
            // The baseline's event at 400 steps, LISA's at 320 (×1.25), the random target's at 360.
            write(&cmp, "baseline", &arm(seed, 400.0 + seed as f64 * 10.0));
            write(&cmp, "lisa", &arm(seed, (400.0 + seed as f64 * 10.0) / 1.25));
            write(&ctl, "random", &arm(seed, (400.0 + seed as f64 * 10.0) / 1.1));
        }
        write(&ctl, "lr1.12", &arm(0, 380.0));
        write(&ctl, "until250", &arm(0, 330.0));
        let stats = |m: f64| TimingStats::from_times(vec![m]);
        let costs = ArmCostReport {
            operating_point: "test".into(),
            hook: "down_3".into(),
            main_network: "assets/main-network".into(),
            batch: 32,
            warmup: 0,
            reps: 1,
            arms: vec![
                ArmCost { arm: ArmKind::Baseline, stats: stats(1.0), relative: 1.0 },
                ArmCost { arm: ArmKind::Lisa, stats: stats(1.4), relative: 1.4 },
                ArmCost { arm: ArmKind::Random, stats: stats(1.4), relative: 1.4 },
            ],
        };
        let costs_path = tmp.path().join("costs.json");
        std::fs::write(&costs_path, serde_json::to_string(&costs).unwrap()).unwrap();
        let out = tmp.path().join("out");
        let list = contrast(&[cmp.clone(), ctl.clone()], "baseline", "lisa", Some(&costs_path), &out).unwrap();
        let names: Vec<(String, String)> = list.iter().map(|c| (c.reference.clone(), c.candidate.clone())).collect();
        let pair = |r: &str, c: &str| (r.to_string(), c.to_string());
        assert_eq!(
            names,
            vec![
                pair("baseline", "lisa"),
                pair("baseline", "lr1.12"),
                pair("baseline", "random"),
                pair("baseline", "until250"),
                pair("lr1.12", "lisa"),
                pair("random", "lisa"),
                pair("until250", "lisa")
            ]
        );
        let half = shared_measure(0.5);
        let est = |i: usize| list[i].speedup("edge_f1", &half).unwrap().estimate.unwrap();
        assert!((est(0) - 1.25).abs() < 0.02, "{}", est(0));
        assert!((est(2) - 1.1).abs() < 0.02, "{}", est(2));
        assert!((est(5) - 1.25 / 1.1).abs() < 0.02, "{}", est(5));
        // lr1.12 ran one seed: its contrasts pair that seed only; it costs the baseline's step.
        assert_eq!((list[1].seeds.clone(), list[1].cost_ratio), (vec![0], Some(1.0)));
        assert_eq!(list[4].cost_ratio, Some(1.4));
        // LISA over random: the same cost, so per second equals per step.
        assert_eq!(list[5].cost_ratio, Some(1.0));
        // LISA for the first 250 of 1,000 steps: a quarter at LISA's cost, the rest at the baseline's.
        let until = (250.0 * 1.4 + 750.0) / 1000.0;
        assert!((list[3].cost_ratio.unwrap() - until).abs() < 1e-12, "{:?}", list[3].cost_ratio);
        assert!((list[6].cost_ratio.unwrap() - 1.4 / until).abs() < 1e-12);
        // Per second over the baseline: ×1.25 / 1.4.
        let table = std::fs::read_to_string(out.join("contrast.md")).unwrap();
        let row = table.lines().find(|l| l.starts_with("| lisa over baseline |")).unwrap();
        assert!(row.contains(&format!("/s ×{:.2}", est(0) / 1.4)), "{row}");
        assert!(out.join("contrast.json").is_file());
        // Errors a user can act on.
        let err = contrast(&[cmp.clone()], "baseline", "random", None, &out).unwrap_err().to_string();
        assert!(err.contains("no arm \"random\"") && err.contains("baseline, lisa"), "{err}");
        let err = contrast(&[cmp.clone(), cmp], "baseline", "lisa", None, &out).unwrap_err().to_string();
        assert!(err.contains("in two of the folders"), "{err}");
        let err = contrast(&[tmp.path().join("out")], "baseline", "lisa", None, &out).unwrap_err().to_string();
        assert!(err.contains("no arms found"), "{err}");
    }
}
