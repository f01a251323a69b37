//! `lisa guidance`: control fidelity and Fréchet distance of the finished side networks of a
//! `lisa compare` run under classifier-free guidance on the label, at several guidance scales.
//!
//! Every arm and seed samples the same held-out conditions and labels with the same noise and sampler
//! as the comparison's final evaluation, so guidance scale 1 reproduces each arm's `final_fidelity`
//! exactly (the side network's residuals enter both guidance branches, as in diffusers' pipelines).
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::protocol::{check_classifier_fits, frechet_skipped_note, held_out_subset, load_main, FrechetFeatures};
use super::control_config::ControlConfig;
use crate::control::sampling::{sample_controlled_chunked, Control, ControlOptions};
use crate::control::side::SideNetwork;
use crate::eval::fidelity::{fidelity, metric_name};
use crate::eval::frechet::frechet_distance;
use crate::{Error, Result};

/// What `lisa guidance` measures; every field has the default shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuidanceConfig {
    /// Classifier-free guidance scales (1 = no guidance). Default 1, 2, 4.
    pub guidance_scales: Vec<f64>,
    /// Held-out images sampled per arm and scale; `None` = the run's final evaluation size.
    pub num_images: Option<i64>,
    /// Arms measured (folder names under `seed-S/`). Default baseline and lisa.
    pub arms: Vec<String>,
}

impl Default for GuidanceConfig {
    fn default() -> Self {
        Self { guidance_scales: vec![1.0, 2.0, 4.0], num_images: None, arms: vec!["baseline".into(), "lisa".into()] }
    }
}

/// One arm, seed and guidance scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuidancePoint {
    /// The arm.
    pub arm: String,
    /// The run's seed.
    pub seed: u64,
    /// The guidance scale.
    pub guidance_scale: f64,
    /// Control fidelity of the samples against their conditions.
    pub fidelity: f64,
    /// Fréchet distance of the samples to the held-out images, on the features of the comparison's classifier
    /// (`final_eval.classifier`, else the shipped Fashion-MNIST one); `None` for an imagefolder without one.
    pub frechet: Option<f64>,
}

/// Everything `lisa guidance` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuidanceReport {
    /// The condition.
    pub condition: String,
    /// The fidelity metric.
    pub metric: String,
    /// Images per arm, seed and scale.
    pub num_images: i64,
    /// The settings.
    pub config: GuidanceConfig,
    /// One point per arm, seed and scale.
    pub points: Vec<GuidancePoint>,
}

impl GuidanceReport {
    fn values(&self, arm: &str, scale: f64, f: impl Fn(&GuidancePoint) -> Option<f64>) -> Vec<f64> {
        self.points.iter().filter(|p| p.arm == arm && p.guidance_scale == scale).filter_map(f).collect()
    }

    /// A markdown table: fidelity and Fréchet distance per arm and scale (mean ± sd over seeds), and
    /// each arm's difference to the baseline paired by seed.
    pub fn table(&self) -> String {
        let mut s = format!(
            "condition `{}`, {} held-out images per arm, seed and guidance scale; {} and Fréchet distance (mean ± \
             sd over seeds)\n\n| arm | guidance scale | {} | Fréchet distance | {} − baseline (paired) | Fréchet − \
             baseline (paired) |\n|---|---|---|---|---|---|\n",
            self.condition, self.num_images, self.metric, self.metric, self.metric
        );
        for arm in &self.config.arms {
            for &g in &self.config.guidance_scales {
                let fid = self.values(arm, g, |p| Some(p.fidelity));
                if fid.is_empty() {
                    continue;
                }
                let fd = self.values(arm, g, |p| p.frechet);
                let (dfid, dfd) = if arm == "baseline" {
                    ("".to_string(), "".to_string())
                } else {
                    (mean_sd(&self.paired(arm, g, |p| Some(p.fidelity)), 4), mean_sd(&self.paired(arm, g, |p| p.frechet), 2))
                };
                s += &format!("| {arm} | {g} | {} | {} | {dfid} | {dfd} |\n", mean_sd(&fid, 4), mean_sd(&fd, 2));
            }
        }
        s
    }

    /// `f(arm) − f(baseline)` per seed at scale `g`, where both have a value.
    pub fn paired(&self, arm: &str, g: f64, f: impl Fn(&GuidancePoint) -> Option<f64>) -> Vec<f64> {
        let find = |a: &str, seed: u64| {
            self.points.iter().find(|p| p.arm == a && p.seed == seed && p.guidance_scale == g).and_then(&f)
        };
        self.points
            .iter()
            .filter(|p| p.arm == arm && p.guidance_scale == g)
            .filter_map(|p| Some(find(arm, p.seed)? - find("baseline", p.seed)?))
            .collect()
    }
}

fn mean_sd(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "—".into();
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() == 1 {
        return format!("{m:.digits$}");
    }
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
    format!("{m:.digits$} ± {sd:.digits$}")
}

/// Samples every finished `seed-S/<arm>/side-network` of the `lisa compare` folder `run_dir` at each
/// guidance scale, scores the samples, writes `guidance.md` and `guidance.json` there and returns the report.
pub fn guidance_sweep(run_dir: &Path, cfg: &GuidanceConfig, log: &mut dyn FnMut(&str)) -> Result<GuidanceReport> {
    let cfg_path = run_dir.join("config.toml");
    if !cfg_path.is_file() {
        return Err(Error::Config(format!(
            "{} has no config.toml: pass the folder of a `lisa compare` run",
            run_dir.display()
        )));
    }
    if cfg.guidance_scales.is_empty() || cfg.guidance_scales.iter().any(|g| !(g.is_finite() && *g >= 0.0)) {
        return Err(Error::Config("guidance scales must be finite and ≥ 0 (1 = no guidance)".into()));
    }
    let ctl: ControlConfig = crate::config::load(Some(&cfg_path), &[])?;
    if ctl.threads > 0 {
        tch::set_num_threads(ctl.threads);
    }
    let main = load_main(&ctl)?;
    let kind = ctl.condition_set()?.primary();
    let (images, labels, conditions) = held_out_subset(&ctl)?;
    let n = cfg.num_images.unwrap_or(ctl.final_eval.num_images).min(images.size()[0]);
    if n < 2 {
        return Err(Error::Config(format!("at least 2 images are needed, got {n}")));
    }
    let (y, c, x) = (labels.narrow(0, 0, n), conditions.narrow(0, 0, n), images.narrow(0, 0, n));
    let features = FrechetFeatures::load(&ctl)?;
    if let Some(note) = frechet_skipped_note(&ctl) {
        log(&note);
    }
    let reference = match &features {
        Some(f) => {
            if let Some(info) = &f.own {
                check_classifier_fits(&ctl, info, &x, None)?;
            }
            Some(f.stats(&ctl, &x.to_device(tch::Device::Cpu))?)
        }
        None => None,
    };

    let mut points = Vec::new();
    for seed in 0..ctl.compare.seeds as u64 {
        let seed = ctl.train.seed + seed;
        for arm in &cfg.arms {
            let dir = run_dir.join(format!("seed-{seed}")).join(arm).join("side-network");
            if !dir.is_dir() {
                log(&format!("{}: not finished, skipped", dir.display()));
                continue;
            }
            let side = SideNetwork::load(&dir, &main)?;
            for &g in &cfg.guidance_scales {
                let t0 = std::time::Instant::now();
                let control = Control { side: &side, condition: c.shallow_clone(), options: ControlOptions::default() };
                let samples = sample_controlled_chunked(
                    &main,
                    &[control],
                    &y,
                    &super::protocol::fidelity_sampler(&ctl, &main),
                    g,
                    ctl.fidelity.seed,
                    ctl.final_eval.chunk,
                )?;
                let score = fidelity(kind, &samples, &side.condition.channels_of(&c, kind)?)?;
                let frechet = match (&features, &reference) {
                    (Some(f), Some(r)) => Some(frechet_distance(&f.stats(&ctl, &samples)?, r)?),
                    _ => None,
                };
                log(&format!(
                    "seed {seed} {arm} guidance {g}: {} {:.4}, Fréchet {} ({:.0} s)",
                    metric_name(kind),
                    score.mean,
                    frechet.map_or("skipped".into(), |d| format!("{d:.2}")),
                    t0.elapsed().as_secs_f64()
                ));
                points.push(GuidancePoint { arm: arm.clone(), seed, guidance_scale: g, fidelity: score.mean, frechet });
            }
        }
    }
    if points.is_empty() {
        return Err(Error::Config(format!("no finished side networks under {}/seed-S/<arm>/", run_dir.display())));
    }
    let report = GuidanceReport {
        condition: ctl.condition.clone(),
        metric: metric_name(kind).into(),
        num_images: n,
        config: cfg.clone(),
        points,
    };
    let write = |name: &str, text: String| {
        let p = run_dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("guidance.md", report.table())?;
    write("guidance.json", serde_json::to_string_pretty(&report).map_err(|e| Error::Config(e.to_string()))?)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_pairs_each_arm_with_the_baseline_by_seed() {
        let p = |arm: &str, seed: u64, g: f64, fidelity: f64| GuidancePoint {
            arm: arm.into(),
            seed,
            guidance_scale: g,
            fidelity,
            frechet: Some(10.0 * fidelity),
        };
        let report = GuidanceReport {
            condition: "edges".into(),
            metric: "edge_f1".into(),
            num_images: 8,
            config: GuidanceConfig { guidance_scales: vec![1.0, 2.0], ..Default::default() },
            points: vec![
                p("baseline", 0, 1.0, 0.5),
                p("baseline", 1, 1.0, 0.7),
                p("lisa", 0, 1.0, 0.6),
                p("lisa", 1, 1.0, 0.6),
                p("baseline", 0, 2.0, 0.8),
                p("lisa", 0, 2.0, 0.9),
            ],
        };
        let d = report.paired("lisa", 1.0, |q| Some(q.fidelity));
        assert_eq!(d.len(), 2);
        assert!((d[0] - 0.1).abs() < 1e-12 && (d[1] + 0.1).abs() < 1e-12);
        let t = report.table();
        assert!(t.contains("| baseline | 1 | 0.6000 ± 0.1414 | 6.00 ± 1.41 |  |  |"), "{t}");
        assert!(t.contains("| lisa | 2 | 0.9000 | 9.00 | 0.1000 | 1.00 |"), "{t}");
    }
}
