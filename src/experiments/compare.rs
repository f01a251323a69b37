//! `lisa compare`: the baseline and LISA trained from the same main network with the same seeds,
//! data order, initialisation and evaluation noise — every setting shared but the LISA switch —
//! then curves, grids and a summary of what LISA changed.
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::arm::{ArmSummary, FINAL_SAMPLES};
use super::control_config::ControlConfig;
use super::protocol::save_triptych;
use super::study::{paired_step_overhead_percent, ArmAggregate, Study};
use crate::control::NUM_TIME_BUCKETS;
use crate::eval::curves::{read_curve, EventTiming, SpeedUp, FINAL_MEASURES, SPEEDUP_LEGEND};
use crate::eval::seeds::{arm_speedups, paired_difference};
use crate::eval::plot::{line_plot, PlotSpec, Series};
use crate::{Error, Result};

/// The comparison's result (`summary.json`; `summary.md` holds the table).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    /// The condition.
    pub condition: String,
    /// The fidelity metric.
    pub metric: String,
    /// Whether larger is better.
    pub higher_is_better: bool,
    /// The baseline over seeds.
    pub baseline: ArmAggregate,
    /// LISA over seeds.
    pub lisa: ArmAggregate,
    /// Held-out images each point of the training curves is sampled on (`fidelity.num_images`).
    #[serde(default)]
    pub curve_images: i64,
    /// LISA's training-step time over the baseline's, minus one, in percent: the mean over seeds of each
    /// seed's ratio (a seed's two arms share a machine; seeds may not).
    pub step_overhead_percent: f64,
    /// `L_lisa / mean(r²)` per timestep bucket (t/T in tenths) over the last fifth of training, mean over
    /// seeds: the fraction of the likelihood residual the decoder leaves unexplained.
    pub lisa_ratio_by_bucket: Vec<f64>,
    /// LISA's speed-up over the baseline per seed and over seeds (Student-t intervals, k of n, sign tests), on
    /// the sampled fidelity and, where measured, the held-out loss gain (see [`crate::eval::curves`]). Written
    /// for the reader; never read back: readers recompute it from the curves, so an older summary gets
    /// today's statistics.
    #[serde(default, skip_deserializing)]
    pub speedups: Vec<SpeedUp>,
}

impl CompareReport {
    /// The summary table (Markdown).
    pub fn table(&self) -> String {
        let dir = if self.higher_is_better { "higher is better" } else { "lower is better" };
        let (b, l) = (&self.baseline, &self.lisa);
        let seeds = b.runs.len();
        // Imagefolders say which held-out set they were scored on (Fashion-MNIST: its test split).
        let held = b.runs[0].held_out.as_ref().map_or(String::new(), |h| format!(" ({h})"));
        let mut s = format!(
            "condition `{}`, fidelity = {} ({dir}), {seeds} seed(s), {} steps, {} held-out images{held} in the final \
             evaluation\n\n| | baseline | LISA | LISA − baseline, paired by seed |\n|---|---|---|---|\n",
            self.condition,
            self.metric,
            b.steps.last().unwrap_or(&0),
            b.runs[0].final_eval_images
        );
        let row = |name: &str, f: &dyn Fn(&ArmSummary) -> f64, prec: usize| {
            let (bm, bs) = b.mean_sd(f);
            let (lm, ls) = l.mean_sd(f);
            let (dm, ds) = paired_difference(&b.runs, &l.runs, f);
            if seeds == 1 {
                // One seed has no spread to report.
                return format!("| {name} | {bm:.prec$} | {lm:.prec$} | {dm:+.prec$} |\n");
            }
            format!("| {name} | {bm:.prec$} ± {bs:.prec$} | {lm:.prec$} ± {ls:.prec$} | {dm:+.prec$} ± {ds:.prec$} |\n")
        };
        s += &row("final fidelity", &|r| r.final_fidelity, 4);
        s += &row("mAUCC (mean fidelity over training)", &|r| r.mean_aucc, 4);
        s += &row("fidelity at step 0 (no control)", &|r| r.curve[0].1, 4);
        s += &row("final samples vs shuffled conditions", &|r| r.final_fidelity_shuffled, 4);
        let runs = || b.runs.iter().chain(&l.runs);
        let blind = runs().all(|r| {
            (r.final_fidelity - r.final_fidelity_shuffled).abs() <= BLIND_TOLERANCE * r.final_fidelity.abs().max(1e-9)
        });
        if runs().all(|r| r.frechet.is_some()) {
            s += &row("Fréchet distance to held-out images", &|r| r.frechet.unwrap_or(f64::NAN), 2);
        } else {
            let why = if runs().all(|r| r.frechet.is_none()) {
                "no classifier for this data: `lisa classifier --data DIR`, then `--classifier`"
            } else {
                "not measured in every run"
            };
            s += &format!("| Fréchet distance to held-out images | skipped ({why}) | | |\n");
        }
        if b.runs.iter().chain(&l.runs).all(|r| r.temporal_flicker.is_some()) {
            s += &row("temporal flicker (0 = rigid motion)", &|r| r.temporal_flicker.unwrap_or(f64::NAN), 4);
        }
        s += &row("training step (s)", &|r| r.step_seconds, 3);
        let (om, os) = paired_step_overhead_percent(&b.runs, &l.runs);
        s += &if seeds == 1 {
            format!("| training step, LISA over baseline | | | {om:+.1}% |\n")
        } else {
            format!("| training step, LISA over baseline | | | {om:+.1}% ± {os:.1}% |\n")
        };
        // The curves are sampled on `fidelity.num_images` held-out images at every evaluation, the final
        // evaluation on more: two sets, so the curves' last values differ from the table's final fidelity.
        let crossing = self
            .speedups
            .iter()
            .find(|x| x.signal == self.metric && x.measure == FINAL_MEASURES[1])
            .map_or("—".to_string(), SpeedUp::estimate_text);
        s += &format!(
            "\nDuring training the fidelity is sampled on {} held-out images (the final evaluation uses {}, so the \
             curves end elsewhere than the final fidelity above): the baseline's curve ends at {:.4}, LISA's at {:.4} \
             (means over seeds), and LISA first reaches the baseline's last value {crossing} sooner than the \
             baseline itself (both arms' first crossings, interpolated, per seed; row \"{}\" below). LISA's step \
             costs {:+.1}% vs the baseline's (decoder: {} parameters, side network: {}; the decoder is not \
             saved).\n{}",
            self.curve_images,
            b.runs[0].final_eval_images,
            b.mean.last().unwrap_or(&f64::NAN),
            l.mean.last().unwrap_or(&f64::NAN),
            FINAL_MEASURES[1],
            self.step_overhead_percent,
            l.runs[0].decoder_parameters,
            l.runs[0].side_parameters,
            if seeds > 1 { "(± = standard deviation over seeds.)\n" } else { "" },
        );
        if blind {
            s += "\n**Warning: the fidelity metric cannot see control here.** In every run the final samples score the \
                  same against shuffled conditions as against their own, so the fidelity figures above do not measure \
                  how well the samples obey their conditions (e.g. a mask metric on samples whose backgrounds are not \
                  black); look at samples.png before reading them.\n";
        }
        // With a classifier of the user's: where the Fréchet distances lie between real data and noise.
        let first = &b.runs[0];
        if let (Some(floor), Some(ceiling), Some(dir)) =
            (first.frechet_floor, first.frechet_ceiling, first.frechet_classifier.as_ref())
        {
            s += &format!(
                "Fréchet distances on the features of the classifier in {dir}: real training images {floor:.2} \
                 (floor), uniform noise {ceiling:.2} (ceiling), as many images each, vs the same held-out images.\n"
            );
        }
        // How finely the baseline's event was resolved: evaluations strictly inside its 10–90% span.
        let points = |curve: &dyn Fn(&ArmSummary) -> &[(u64, f64)], hib: bool| -> String {
            let n: Vec<String> = b
                .runs
                .iter()
                .map(|r| EventTiming::of(curve(r), hib).map_or("—".into(), |t| t.points_in_event.to_string()))
                .collect();
            n.join(" · ")
        };
        s += &format!(
            "\nEvaluations inside the baseline's convergence event (10–90% of its gain), per seed: {} {}",
            self.metric,
            points(&|r| r.curve.as_slice(), self.higher_is_better)
        );
        if b.runs.iter().all(|r| !r.loss_gain_curve.is_empty()) {
            s += &format!("; loss gain {}", points(&|r| r.loss_gain_curve.as_slice(), true));
        }
        s += ".\n";
        if !self.speedups.is_empty() {
            s += &format!("\n{SPEEDUP_LEGEND}\n\n{}", SpeedUp::ROW_HEADER);
            for su in &self.speedups {
                s += &su.row();
            }
            s += "\n";
        }
        let ratios: Vec<String> = self.lisa_ratio_by_bucket.iter().map(|r| format!("{r:.3}")).collect();
        s += &format!(
            "L_lisa / mean(r²) over the last fifth of training, by t/T bucket 0–0.1 … 0.9–1: {}\n",
            ratios.join(" · ")
        );
        s
    }
}

/// Runs (or, with `resume`, completes) the comparison in `cfg.output_dir`: `seed-S/{baseline,lisa}/`
/// run folders, `fidelity.png`, `samples.png`, `summary.md` and `summary.json`.
pub fn compare(cfg: &ControlConfig, resume: bool, quiet: bool) -> Result<CompareReport> {
    let recorded = ControlConfig { data: cfg.data.as_applied(), ..cfg.clone() };
    let mut study = Study::open(cfg, "config.toml", &recorded, resume, quiet)?;
    let out = &cfg.output_dir;
    let (mut baseline, mut lisa) = (Vec::new(), Vec::new());
    for i in 0..cfg.compare.seeds {
        for enabled in [false, true] {
            let mut arm = cfg.clone();
            arm.lisa.enabled = enabled;
            arm.train.seed = cfg.train.seed + i;
            arm.output_dir = out.join(format!("seed-{}", arm.train.seed)).join(arm.arm());
            let summary = study.run_arm(arm.arm(), &arm)?;
            if enabled {
                lisa.push(summary)
            } else {
                baseline.push(summary)
            }
        }
    }
    let mut report = aggregate(cfg, baseline, lisa)?;
    if !study.main_process {
        return Ok(report);
    }
    let per_seed: Vec<Vec<f64>> = report
        .lisa
        .runs
        .iter()
        .map(|r| late_bucket_ratios(&out.join(format!("seed-{}", r.seed)).join("lisa").join("metrics.csv")))
        .collect::<Result<_>>()?;
    report.lisa_ratio_by_bucket =
        (0..NUM_TIME_BUCKETS).map(|b| per_seed.iter().map(|v| v[b]).sum::<f64>() / per_seed.len() as f64).collect();
    let x: Vec<f64> = (0..NUM_TIME_BUCKETS).map(|b| (b as f64 + 0.5) / NUM_TIME_BUCKETS as f64).collect();
    let band = (per_seed.len() > 1).then(|| {
        let f = |init: f64, pick: fn(f64, f64) -> f64| -> Vec<f64> {
            (0..NUM_TIME_BUCKETS).map(|b| per_seed.iter().map(|v| v[b]).fold(init, pick)).collect()
        };
        (f(f64::INFINITY, f64::min), f(f64::NEG_INFINITY, f64::max))
    });
    line_plot(
        &out.join("lisa-ratio.png"),
        &PlotSpec {
            title: "LISA: unexplained part of r by t (last 1/5 of training)",
            x_label: "t / T",
            y_label: "L_lisa / r_sq",
            width: 720,
            height: 440,
        },
        &[Series { label: "LISA".into(), color: [220, 90, 40], x, mean: report.lisa_ratio_by_bucket.clone(), band }],
    )?;
    let (eval_images, _, eval_conditions) = study.data.held_out()?;
    write_outputs(cfg, &report, &eval_conditions, &eval_images)?;
    Ok(report)
}

/// Mean of each `lisa_ratio_b{i}` column over the last fifth of a LISA run's metric rows (NaN cells skipped).
fn late_bucket_ratios(metrics: &Path) -> Result<Vec<f64>> {
    (0..NUM_TIME_BUCKETS)
        .map(|b| {
            let rows = read_curve(metrics, &format!("lisa_ratio_b{b}"))?;
            let tail = &rows[rows.len() - (rows.len() / 5).max(1).min(rows.len())..];
            let vals: Vec<f64> = tail.iter().map(|p| p.1).filter(|v| v.is_finite()).collect();
            Ok(if vals.is_empty() { f64::NAN } else { vals.iter().sum::<f64>() / vals.len() as f64 })
        })
        .collect()
}

pub(crate) fn aggregate(cfg: &ControlConfig, baseline: Vec<ArmSummary>, lisa: Vec<ArmSummary>) -> Result<CompareReport> {
    let (b, l) = (ArmAggregate::new("baseline", baseline)?, ArmAggregate::new("lisa", lisa)?);
    let hib = b.runs[0].higher_is_better;
    Ok(CompareReport {
        condition: cfg.condition.clone(),
        metric: b.runs[0].metric.clone(),
        higher_is_better: hib,
        curve_images: cfg.fidelity.num_images,
        step_overhead_percent: paired_step_overhead_percent(&b.runs, &l.runs).0,
        lisa_ratio_by_bucket: vec![],
        speedups: arm_speedups(&b.runs, &l.runs, hib),
        baseline: b,
        lisa: l,
    })
}

/// Plot colours of the two arms.
const BASELINE_COLOR: [u8; 3] = [60, 110, 200];
const LISA_COLOR: [u8; 3] = [220, 90, 40];

fn write_outputs(cfg: &ControlConfig, report: &CompareReport, conditions: &Tensor, truth: &Tensor) -> Result<()> {
    let out = &cfg.output_dir;
    let seeds = report.baseline.runs.len();
    // Mean over seeds with a min–max band when there are several.
    let series = |steps: &[u64], mean: &[f64], min: &[f64], max: &[f64], label: &str, color: [u8; 3]| Series {
        label: label.into(),
        color,
        x: steps.iter().map(|&s| s as f64).collect(),
        mean: mean.to_vec(),
        band: (seeds > 1).then(|| (min.to_vec(), max.to_vec())),
    };
    let title = |what: &str| {
        format!("{}: {what} vs step ({seeds} seed{})", cfg.condition, if seeds > 1 { "s, band = min-max" } else { "" })
    };
    let (b, l) = (&report.baseline, &report.lisa);
    line_plot(
        &out.join("fidelity.png"),
        &PlotSpec { title: &title("fidelity"), x_label: "training step", y_label: &report.metric, width: 720, height: 440 },
        &[
            series(&b.steps, &b.mean, &b.min, &b.max, "baseline", BASELINE_COLOR),
            series(&l.steps, &l.mean, &l.min, &l.max, "LISA", LISA_COLOR),
        ],
    )?;
    if let (Some(bg), Some(lg)) = (&b.loss_gain, &l.loss_gain) {
        line_plot(
            &out.join("loss-gain.png"),
            &PlotSpec {
                title: &title("held-out loss gain"),
                x_label: "training step",
                y_label: "1 - L(ctrl)/L(main)",
                width: 720,
                height: 440,
            },
            &[
                series(&bg.steps, &bg.mean, &bg.min, &bg.max, "baseline", BASELINE_COLOR),
                series(&lg.steps, &lg.mean, &lg.min, &lg.max, "LISA", LISA_COLOR),
            ],
        )?;
    }
    // condition | baseline | LISA | ground truth, from the first seed whose arms both kept their final
    // samples (an arm aggregated from its collected logs alone has none).
    let load = |arm: &str, seed: u64| -> Result<Option<Tensor>> {
        let path = out.join(format!("seed-{seed}")).join(arm).join(FINAL_SAMPLES);
        if !path.is_file() {
            return Ok(None);
        }
        let t = Tensor::read_safetensors(&path).map_err(|e| Error::format(&path, e.to_string()))?;
        t.into_iter().next().map(|(_, t)| Some(t)).ok_or_else(|| Error::format(&path, "empty"))
    };
    let mut pair = None;
    for run in &report.baseline.runs {
        if let (Some(bs), Some(ls)) = (load(&report.baseline.arm, run.seed)?, load(&report.lisa.arm, run.seed)?) {
            pair = Some((bs, ls));
            break;
        }
    }
    match pair {
        Some((bs, ls)) => {
            let k = bs.size()[0].min(ls.size()[0]).min(12);
            save_triptych(
                &conditions.narrow(0, 0, k),
                &[bs.narrow(0, 0, k), ls.narrow(0, 0, k)],
                &truth.narrow(0, 0, k),
                &out.join("samples.png"),
            )?;
        }
        None => eprintln!("note: no seed kept both arms' {FINAL_SAMPLES}; samples.png not written"),
    }
    let table = report.table();
    std::fs::write(out.join("summary.md"), &table).map_err(|e| Error::io(out.join("summary.md"), e))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(out.join("summary.json"), json).map_err(|e| Error::io(out.join("summary.json"), e))?;
    Ok(())
}

/// Final fidelity within this fraction of the shuffled-condition score, in every run: the metric is blind to
/// the conditions on these samples, and the summary says so.
const BLIND_TOLERANCE: f64 = 0.01;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::curves::{first_reaching, mean_aucc};
    use crate::eval::seeds::paired_difference;
    use crate::experiments::arm::example_summary as run;

    #[test]
    fn a_metric_blind_to_the_conditions_is_flagged() {
        let report = |shuffled: f64| {
            let arm = |name: &str| ArmSummary { arm: name.into(), final_fidelity_shuffled: shuffled, ..run(0, 0.356) };
            aggregate(&ControlConfig::default(), vec![arm("baseline")], vec![arm("lisa")]).unwrap().table()
        };
        assert!(report(0.3559).contains("the fidelity metric cannot see control here"));
        assert!(!report(0.2).contains("cannot see control"));
    }

    #[test]
    fn summaries_by_hand() {
        // Trapezoids: (0.5+0.7)/2·50 + (0.7+0.8)/2·50 = 67.5 over 100 steps.
        assert!((mean_aucc(&[(0, 0.5), (50, 0.7), (100, 0.8)]) - 0.675).abs() < 1e-12);
        assert_eq!(mean_aucc(&[(10, 0.3)]), 0.3);
        assert_eq!(first_reaching(&[0, 50, 100], &[0.5, 0.7, 0.8], 0.7, true), Some(50));
        assert_eq!(first_reaching(&[0, 50, 100], &[0.5, 0.7, 0.8], 0.9, true), None);
        assert_eq!(first_reaching(&[0, 50, 100], &[0.5, 0.3, 0.2], 0.3, false), Some(50));
        // Paired by seed, whatever the order: differences 0.1, 0.3 → mean 0.2, sd √0.02.
        let (m, s) = paired_difference(&[run(0, 0.5), run(1, 0.6)], &[run(1, 0.9), run(0, 0.6)], |r| r.final_fidelity);
        assert!((m - 0.2).abs() < 1e-12 && (s - 0.02f64.sqrt()).abs() < 1e-12, "{m} {s}");
        // Step overhead paired by seed: seed 0 ran 1.0 → 1.2 s (+20%), seed 1 on a slower machine 4.0 → 6.0 s
        // (+50%): +35% ± 21.2%, where the ratio of mean step times would say +44%.
        let timed = |seed: u64, secs: f64| ArmSummary { step_seconds: secs, ..run(seed, 0.5) };
        let (b, l) = (vec![timed(0, 1.0), timed(1, 4.0)], vec![timed(1, 6.0), timed(0, 1.2)]);
        let (m, s) = paired_step_overhead_percent(&b, &l);
        assert!((m - 35.0).abs() < 1e-9 && (s - 450f64.sqrt()).abs() < 1e-9, "{m} {s}");
        let report = aggregate(
            &ControlConfig::default(),
            b.into_iter().map(|r| ArmSummary { arm: "baseline".into(), ..r }).collect(),
            l.into_iter().map(|r| ArmSummary { arm: "lisa".into(), ..r }).collect(),
        )
        .unwrap();
        assert!((report.step_overhead_percent - 35.0).abs() < 1e-9);
        let table = report.table();
        assert!(table.contains("| training step, LISA over baseline | | | +35.0% ± 21.2% |"), "{table}");
        assert!(table.contains("LISA's step costs +35.0% vs the baseline's"), "{table}");
    }

    #[test]
    fn the_summary_times_the_final_value_by_first_crossings_as_its_table_does() {
        // The baseline reaches 0.8 at step 50 and ends there after a peak; LISA follows the same curve. The
        // baseline's last step over LISA's crossing would claim ×3; first crossings give ×1, and the sentence
        // quotes the same row as the table, with both image counts.
        let arm = |name: &str, curve: Vec<(u64, f64)>| ArmSummary { arm: name.into(), curve, ..run(0, 0.8) };
        let dip = vec![(0, 0.5), (50, 0.8), (100, 0.9), (150, 0.8)];
        let report =
            aggregate(&ControlConfig::default(), vec![arm("baseline", dip.clone())], vec![arm("lisa", dip)]).unwrap();
        let row = |m: &str| report.speedups.iter().find(|s| s.signal == "edge_f1" && s.measure == m).unwrap();
        assert!((row(FINAL_MEASURES[0]).estimate.unwrap() - 3.0).abs() < 1e-12);
        assert_eq!(row(FINAL_MEASURES[1]).estimate, Some(1.0));
        let table = report.table();
        let images = ControlConfig::default().fidelity.num_images;
        assert!(
            table.contains(&format!("sampled on {images} held-out images (the final evaluation uses 10,")),
            "{table}"
        );
        assert!(table.contains("LISA first reaches the baseline's last value ×1.00 sooner"), "{table}");
        assert!(table.contains(&format!("| {} | edge_f1 | 1.00 | ×1.00 | 1 of 1 | 0+ 0− 1= p=1.000 | — |", FINAL_MEASURES[1])), "{table}");
        // A summary written by an older version, with speed-ups of another form, still reads; its speed-ups are
        // recomputed from the curves by the readers.
        let mut old = serde_json::to_value(&report).unwrap();
        old["speedups"] = serde_json::json!([{"measure": "50% of the baseline's gain", "interval": [1.0, 2.0]}]);
        old.as_object_mut().unwrap().remove("curve_images");
        let read: CompareReport = serde_json::from_value(old).unwrap();
        assert!(read.speedups.is_empty());
        assert_eq!(read.curve_images, 0);
    }

    #[test]
    fn a_skipped_frechet_distance_and_old_summaries() {
        let report = |frechet: [Option<f64>; 2], floor: Option<f64>| {
            let arm = |name: &str, f: Option<f64>| ArmSummary {
                arm: name.into(),
                frechet: f,
                frechet_floor: floor,
                frechet_ceiling: floor.map(|x| x * 10.0),
                frechet_classifier: floor.map(|_| "my-classifier".into()),
                ..run(0, 0.5)
            };
            aggregate(&ControlConfig::default(), vec![arm("baseline", frechet[0])], vec![arm("lisa", frechet[1])])
                .unwrap()
                .table()
        };
        let measured = report([Some(10.0), Some(12.0)], None);
        assert!(measured.contains("| Fréchet distance to held-out images | 10.00 | 12.00 | +2.00 |"), "{measured}");
        assert!(!measured.contains("floor"), "{measured}");
        let skipped = report([None, None], None);
        assert!(
            skipped.contains("| Fréchet distance to held-out images | skipped (no classifier for this data"),
            "{skipped}"
        );
        assert!(report([Some(1.0), None], None).contains("skipped (not measured in every run)"));
        let own = report([Some(10.0), Some(12.0)], Some(2.0));
        assert!(
            own.contains("classifier in my-classifier: real training images 2.00 (floor), uniform noise 20.00"),
            "{own}"
        );
        // A skipped distance is left out of summary.json; one written before it could be skipped still reads.
        let json = serde_json::to_value(ArmSummary { frechet: None, ..run(0, 0.5) }).unwrap();
        assert!(json.get("frechet").is_none() && json.get("frechet_floor").is_none(), "{json}");
        let mut old = serde_json::to_value(run(0, 0.5)).unwrap();
        assert_eq!(old["frechet"], 10.0);
        old.as_object_mut().unwrap().remove("frechet_floor");
        let read: ArmSummary = serde_json::from_value(old.clone()).unwrap();
        assert_eq!((read.frechet, read.frechet_floor), (Some(10.0), None));
        old["frechet"] = serde_json::Value::Null;
        assert_eq!(serde_json::from_value::<ArmSummary>(old).unwrap().frechet, None);
    }
}
