//! `lisa compose`: several side networks trained separately steer one sample together (their residuals
//! summed, as diffusers' MultiControlNet), and each condition's fidelity is measured on the composed
//! samples against samples steered by that condition alone, by the other conditions alone, and by none.
//! Optionally a side network trained on the conditions stacked as channels (with condition dropout) is
//! measured on the same images and noise: given all conditions, and given each alone (the others zero).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::protocol::{held_out_subset, load_main};
use super::control_config::ControlConfig;
use crate::control::sampling::{sample_controlled_chunked, Control, ControlOptions};
use crate::control::side::SideNetwork;
use crate::data::conditions::ConditionKind;
use crate::eval::fidelity::{fidelity, metric_name};
use crate::{Error, Result};

/// What `lisa compose` does; every field has the default shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComposeConfig {
    /// `lisa compare` folders of different conditions on the same main network (at least two).
    pub runs: Vec<PathBuf>,
    /// Arms composed with each other (never across arms). Default baseline and lisa.
    pub arms: Vec<String>,
    /// The seed whose side networks are used. Default 0.
    pub seed: u64,
    /// Held-out images sampled per sample set. Default 200.
    pub num_images: i64,
    /// Conditioning scale of each side network when composed (one per run, or one for all). Default 1.
    pub conditioning_scales: Vec<f64>,
    /// A `lisa compare` folder of one side network trained on stacked conditions (`condition =
    /// "edges+mask"`, with `condition_dropout`), measured alongside. Default none.
    #[serde(default)]
    pub stacked: Option<PathBuf>,
}

impl Default for ComposeConfig {
    fn default() -> Self {
        Self {
            runs: Vec::new(),
            arms: vec!["baseline".into(), "lisa".into()],
            seed: 0,
            num_images: 200,
            conditioning_scales: vec![1.0],
            stacked: None,
        }
    }
}

/// The fidelity of one sample set to each condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComposeRow {
    /// The arm whose side networks steered the samples.
    pub arm: String,
    /// Which conditions steered them: `none`, one condition, or `a+b`; `stacked: ...` for the
    /// stacked side network given those conditions.
    pub steered_by: String,
    /// `(condition, metric, fidelity)` for every condition of the composition.
    pub fidelity: Vec<(String, String, f64)>,
}

/// Everything `lisa compose` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComposeReport {
    /// The settings.
    pub config: ComposeConfig,
    /// The conditions, in the order of `config.runs`.
    pub conditions: Vec<String>,
    /// One row per arm and sample set.
    pub rows: Vec<ComposeRow>,
}

impl ComposeReport {
    /// A markdown table: rows = arm × sample set, columns = each condition's fidelity.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} held-out images, side networks of seed {}; each column scores the same samples against one \
             condition\n\n| arm | steered by |",
            self.config.num_images, self.config.seed
        );
        let Some(first) = self.rows.first() else { return s };
        for (c, m, _) in &first.fidelity {
            s += &format!(" {c} ({m}) |");
        }
        s += "\n|---|---|";
        s += &"---|".repeat(first.fidelity.len());
        s += "\n";
        for r in &self.rows {
            s += &format!("| {} | {} |", r.arm, r.steered_by);
            for (_, _, v) in &r.fidelity {
                s += &format!(" {v:.4} |");
            }
            s += "\n";
        }
        s
    }
}

/// Runs the composition described by `cfg` and writes `compose.md` and `compose.json` into `out`.
pub fn compose(cfg: &ComposeConfig, out: &Path, log: &mut dyn FnMut(&str)) -> Result<ComposeReport> {
    if cfg.runs.len() < 2 {
        return Err(Error::Config("compose needs at least two compare run folders (--run-dir A --run-dir B)".into()));
    }
    let scales: Vec<f64> = match cfg.conditioning_scales.len() {
        1 => vec![cfg.conditioning_scales[0]; cfg.runs.len()],
        n if n == cfg.runs.len() => cfg.conditioning_scales.clone(),
        n => {
            return Err(Error::Config(format!(
                "{n} conditioning scales for {} side networks: give one, or one per run",
                cfg.runs.len()
            )))
        }
    };
    let mut ctls = Vec::new();
    for run in &cfg.runs {
        let p = run.join("config.toml");
        if !p.is_file() {
            return Err(Error::Config(format!(
                "{} has no config.toml: pass `lisa compare` run folders",
                run.display()
            )));
        }
        ctls.push(crate::config::load::<ControlConfig>(Some(&p), &[])?);
    }
    if ctls.iter().any(|c| c.main_network_dir() != ctls[0].main_network_dir()) {
        return Err(Error::Config("the runs were trained on different main networks; compose needs one".into()));
    }
    if ctls[0].threads > 0 {
        tch::set_num_threads(ctls[0].threads);
    }
    let main = load_main(&ctls[0])?;
    let n = cfg.num_images;
    let mut conds: Vec<(ConditionKind, Tensor)> = Vec::new();
    let mut shared: Option<(Tensor, Tensor)> = None;
    for c in &ctls {
        let (images, labels, conditions) = held_out_subset(c)?;
        if n < 1 || n > images.size()[0] {
            return Err(Error::Config(format!("num_images must be in 1..={}, got {n}", images.size()[0])));
        }
        let (x, y) = (images.narrow(0, 0, n), labels.narrow(0, 0, n));
        // The conditions must describe the same images: same data and evaluation subset in every run.
        if let Some((x0, _)) = &shared {
            if !x0.equal(&x) {
                return Err(Error::Config(
                    "the runs evaluate different held-out images (data or fidelity.seed differ); compose needs the same"
                        .into(),
                ));
            }
        } else {
            shared = Some((x, y));
        }
        let set = c.condition_set()?;
        if set.len() != 1 {
            return Err(Error::Config(format!(
                "a run of stacked conditions ({set}) cannot be composed; pass it with --stacked-run"
            )));
        }
        conds.push((set.primary(), conditions.narrow(0, 0, n)));
    }
    let (shared_x, y) = shared.ok_or_else(|| Error::Config("no runs".into()))?;
    let names: Vec<String> = ctls.iter().map(|c| c.condition.clone()).collect();
    let sampler = &super::protocol::fidelity_sampler(&ctls[0], &main);
    let seed = ctls[0].fidelity.seed;
    let chunk = ctls[0].final_eval.chunk;

    let score = |samples: &Tensor| -> Result<Vec<(String, String, f64)>> {
        conds
            .iter()
            .zip(&names)
            .map(|((k, c), name)| Ok((name.clone(), metric_name(*k).to_string(), fidelity(*k, samples, c)?.mean)))
            .collect()
    };
    let mut rows = Vec::new();
    let none = sample_controlled_chunked(&main, &[], &y, sampler, 1.0, seed, chunk)?;
    rows.push(ComposeRow { arm: "—".into(), steered_by: "none".into(), fidelity: score(&none)? });
    for arm in &cfg.arms {
        let sides: Vec<SideNetwork> = cfg
            .runs
            .iter()
            .map(|r| SideNetwork::load(&r.join(format!("seed-{}", cfg.seed)).join(arm).join("side-network"), &main))
            .collect::<Result<_>>()?;
        let control = |i: usize| Control {
            side: &sides[i],
            condition: conds[i].1.shallow_clone(),
            options: ControlOptions { conditioning_scale: scales[i], ..ControlOptions::default() },
        };
        for i in 0..sides.len() {
            let single = Control { options: ControlOptions::default(), ..control(i) };
            let samples = sample_controlled_chunked(&main, &[single], &y, sampler, 1.0, seed, chunk)?;
            rows.push(ComposeRow { arm: arm.clone(), steered_by: names[i].clone(), fidelity: score(&samples)? });
            log(&format!("{arm}: {} alone done", names[i]));
        }
        let all: Vec<Control> = (0..sides.len()).map(control).collect();
        let samples = sample_controlled_chunked(&main, &all, &y, sampler, 1.0, seed, chunk)?;
        rows.push(ComposeRow { arm: arm.clone(), steered_by: names.join("+"), fidelity: score(&samples)? });
        log(&format!("{arm}: composed done"));
    }
    if let Some(dir) = &cfg.stacked {
        rows.extend(stacked_rows(
            cfg,
            dir,
            &main,
            &ctls[0].main_network_dir(),
            &shared_x,
            &y,
            &conds,
            &names,
            &score,
            log,
        )?);
    }
    let report = ComposeReport { config: cfg.clone(), conditions: names, rows };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("compose.md", report.table())?;
    write("compose.json", serde_json::to_string_pretty(&report).map_err(|e| Error::Config(e.to_string()))?)?;
    Ok(report)
}

/// The rows of the stacked side network in `dir` (a `lisa compare` folder), for every arm: given all the
/// composition's conditions, and each alone (the other channels zero, as condition dropout taught it).
#[allow(clippy::too_many_arguments)]
fn stacked_rows(
    cfg: &ComposeConfig,
    dir: &Path,
    main: &crate::pipeline::MainNetwork,
    main_dir: &Path,
    x: &Tensor,
    y: &Tensor,
    conds: &[(ConditionKind, Tensor)],
    names: &[String],
    score: &dyn Fn(&Tensor) -> Result<Vec<(String, String, f64)>>,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<ComposeRow>> {
    let p = dir.join("config.toml");
    if !p.is_file() {
        return Err(Error::Config(format!("{} has no config.toml: pass a `lisa compare` run folder", dir.display())));
    }
    let ctl = crate::config::load::<ControlConfig>(Some(&p), &[])?;
    if ctl.main_network_dir() != main_dir {
        return Err(Error::Config("the stacked run was trained on another main network than the composed runs".into()));
    }
    let set = ctl.condition_set()?;
    let (images, _, _) = held_out_subset(&ctl)?;
    if images.size()[0] < x.size()[0] || !images.narrow(0, 0, x.size()[0]).equal(x) {
        return Err(Error::Config(
            "the stacked run evaluates different held-out images (data or fidelity.seed differ)".into(),
        ));
    }
    // Every channel of the stacked network must be one of the composition's conditions.
    let channel_of: Vec<(usize, i64)> =
        conds.iter().enumerate().filter_map(|(i, (k, _))| set.channel(*k).map(|c| (i, c))).collect();
    if channel_of.len() != set.len() {
        return Err(Error::Config(format!(
            "the stacked run's conditions ({set}) must all be among the composed runs' ({})",
            names.join(", ")
        )));
    }
    let (n, size) = (x.size()[0], conds[0].1.size());
    let stack = |given: &[usize]| -> Tensor {
        let maps: Vec<Tensor> = (0..set.len() as i64)
            .map(|c| match channel_of.iter().find(|(i, ch)| *ch == c && given.contains(i)) {
                Some((i, _)) => conds[*i].1.shallow_clone(),
                None => Tensor::zeros([n, 1, size[2], size[3]], (tch::Kind::Float, conds[0].1.device())),
            })
            .collect();
        Tensor::cat(&maps, 1)
    };
    let (sampler, seed, chunk) =
        (&super::protocol::fidelity_sampler(&ctl, main), ctl.fidelity.seed, ctl.final_eval.chunk);
    let mut subsets: Vec<Vec<usize>> = vec![channel_of.iter().map(|(i, _)| *i).collect()];
    subsets.extend(channel_of.iter().map(|(i, _)| vec![*i]));
    let mut rows = Vec::new();
    for arm in &cfg.arms {
        let side = SideNetwork::load(&dir.join(format!("seed-{}", cfg.seed)).join(arm).join("side-network"), main)?;
        for given in &subsets {
            let control = Control { side: &side, condition: stack(given), options: ControlOptions::default() };
            let samples = sample_controlled_chunked(main, &[control], y, sampler, 1.0, seed, chunk)?;
            let by: Vec<&str> = given.iter().map(|i| names[*i].as_str()).collect();
            rows.push(ComposeRow {
                arm: arm.clone(),
                steered_by: format!("stacked: {}", by.join("+")),
                fidelity: score(&samples)?,
            });
            log(&format!("{arm}: stacked given {} done", by.join("+")));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_one_column_per_condition() {
        let row = |arm: &str, by: &str, a: f64, b: f64| ComposeRow {
            arm: arm.into(),
            steered_by: by.into(),
            fidelity: vec![("edges".into(), "edge_f1".into(), a), ("mask".into(), "mask_iou".into(), b)],
        };
        let report = ComposeReport {
            config: ComposeConfig::default(),
            conditions: vec!["edges".into(), "mask".into()],
            rows: vec![row("—", "none", 0.7, 0.65), row("lisa", "edges+mask", 0.9, 0.8)],
        };
        let t = report.table();
        assert!(t.contains("| arm | steered by | edges (edge_f1) | mask (mask_iou) |"), "{t}");
        assert!(t.contains("| lisa | edges+mask | 0.9000 | 0.8000 |"), "{t}");
    }

    #[test]
    fn fewer_than_two_runs_or_mismatched_scales_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ComposeConfig { runs: vec![dir.path().into()], ..Default::default() };
        assert!(compose(&cfg, dir.path(), &mut |_| {}).unwrap_err().to_string().contains("at least two"));
        let cfg = ComposeConfig {
            runs: vec![dir.path().into(), dir.path().into()],
            conditioning_scales: vec![1.0, 1.0, 1.0],
            ..Default::default()
        };
        assert!(compose(&cfg, dir.path(), &mut |_| {}).unwrap_err().to_string().contains("conditioning scales"));
    }
}
