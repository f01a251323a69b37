//! `lisa disentangle`: how much of the hooked side feature the condition drives, for every arm, seed
//! and saved step of a `lisa compare` or `lisa ablate` run folder (the measurement and its
//! justification: [`crate::eval::disentangle`]).
//!
//! Every side network is evaluated on the same grid: `num_conditions` conditions × `num_inputs` noisy
//! inputs from distinct held-out images, the same noise, at each of a few fixed `t/T`. Step 0 is the
//! side network as initialised (its condition path is zero, so its condition share is exactly 0).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::protocol::{held_out_subset, load_main};
use super::control_config::ControlConfig;
use crate::control::side::{SideNetwork, SideNetworkConfig};
use crate::diffusion::Objective;
use crate::eval::disentangle::{factorial_shares, VarianceShares};
use crate::eval::plot::{line_plot, PlotSpec, Series};
use crate::models::Hook;
use crate::pipeline::MainNetwork;
use crate::{Error, Result};

/// What `lisa disentangle` measures; every field has the default shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisentangleConfig {
    /// The side feature measured; `None` = the run's LISA hook (the same layer for every arm).
    pub hook: Option<Hook>,
    /// Conditions in the grid (taken from the first held-out images). Default 16.
    pub num_conditions: i64,
    /// Noisy inputs in the grid (taken from the next held-out images). Default 16.
    pub num_inputs: i64,
    /// The times `t/T` at which the grid is evaluated. Default 0.1, 0.5, 0.9.
    pub unit_times: Vec<f64>,
    /// Seed of the noise of the inputs. Default 2024.
    pub noise_seed: u64,
}

impl Default for DisentangleConfig {
    fn default() -> Self {
        Self { hook: None, num_conditions: 16, num_inputs: 16, unit_times: vec![0.1, 0.5, 0.9], noise_seed: 2024 }
    }
}

/// The evaluation grid: conditions of some images, noisy inputs (with labels) of others.
pub struct FactorialGrid {
    /// Conditions [n_c, C, H, W] in [0, 1].
    pub conditions: Tensor,
    /// Clean images of the inputs [n_x, 1, H, W] in [-1, 1].
    pub x0: Tensor,
    /// Labels of the inputs [n_x].
    pub labels: Tensor,
    /// The inputs' noise [n_x, 1, H, W], the same at every time.
    pub noise: Tensor,
}

impl FactorialGrid {
    /// Conditions of images `0..n_c`, inputs from images `n_c..n_c + n_x`, noise drawn with `seed`.
    pub fn new(images: &Tensor, labels: &Tensor, conditions: &Tensor, n_c: i64, n_x: i64, seed: u64) -> Result<Self> {
        let n = images.size()[0];
        if n_c < 2 || n_x < 2 || n_c + n_x > n {
            return Err(Error::Config(format!(
                "the disentanglement grid needs 2 ≤ conditions, 2 ≤ inputs and conditions + inputs ≤ {n} held-out \
                 images; got {n_c} + {n_x}"
            )));
        }
        let x0 = images.narrow(0, n_c, n_x);
        tch::manual_seed(seed as i64);
        let noise = x0.randn_like();
        Ok(Self { conditions: conditions.narrow(0, 0, n_c), labels: labels.narrow(0, n_c, n_x), x0, noise })
    }
}

/// The variance split of `side`'s `hook` feature over `grid` at time `unit_t` (no gradients).
pub fn side_feature_shares(
    main: &MainNetwork,
    side: &SideNetwork,
    hook: Hook,
    grid: &FactorialGrid,
    unit_t: f64,
) -> Result<VarianceShares> {
    let (n_c, n_x) = (grid.conditions.size()[0], grid.x0.size()[0]);
    let device = main.vs.device();
    let t = times_at(&main.objective, unit_t, n_x).to_device(device);
    let s = main.objective.training_sample(&grid.x0.to_device(device), &grid.noise.to_device(device), &t)?;
    // Pair (i, j) sits at i·n_x + j: inputs repeat as a block, conditions repeat element by element.
    let x_t = s.x_t.repeat([n_c, 1, 1, 1]);
    let model_t = s.model_t.repeat([n_c]);
    let y = grid.labels.to_device(device).repeat([n_c]);
    let c = grid.conditions.to_device(device).repeat_interleave_self_int(n_x, 0, None);
    let hooked = tch::no_grad(|| -> Result<Tensor> {
        let encoder_hidden_states = main.label_encoder.forward(&y)?;
        // Only a cross-normalized side network reads the main network's features (its hooked feature does not).
        let shared =
            side.needs_main_features().then(|| main.down_mid(&x_t, &model_t, &encoder_hidden_states)).transpose()?;
        let out = side.residuals(&x_t, &model_t, &encoder_hidden_states, &c, 1.0, Some(hook), shared.as_ref())?;
        out.hooked.ok_or_else(|| Error::Training("the side network returned no hooked feature".into()))
    })?;
    // Clips come with their frames folded into the batch, example-major, as a strided view of the tokens: the
    // pair's frames join its feature vector (reshape, not view).
    factorial_shares(&hooked.f_reshape([n_c, n_x, -1])?)
}

fn times_at(objective: &Objective, unit_t: f64, n: i64) -> Tensor {
    objective.times_from_unit(&vec![unit_t; n as usize])
}

/// One measurement: an arm's side network at one step and one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisentanglePoint {
    /// The arm's folder name (`baseline`, `lisa`, or an ablation variant).
    pub arm: String,
    /// The run's seed.
    pub seed: u64,
    /// Training step of the side network (0 = as initialised).
    pub step: u64,
    /// `t/T` of the grid.
    pub unit_t: f64,
    /// The variance split.
    pub shares: VarianceShares,
}

/// Everything `lisa disentangle` measured in a run folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisentangleReport {
    /// The condition of the run.
    pub condition: String,
    /// The feature measured.
    pub hook: Hook,
    /// The measurement's settings.
    pub config: DisentangleConfig,
    /// One point per arm, seed, step and time.
    pub points: Vec<DisentanglePoint>,
}

impl DisentangleReport {
    /// Arms in order of appearance.
    pub fn arms(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for p in &self.points {
            if !v.contains(&p.arm) {
                v.push(p.arm.clone());
            }
        }
        v
    }

    /// Steps at which `arm` was measured, ascending.
    pub fn steps(&self, arm: &str) -> Vec<u64> {
        let mut v: Vec<u64> = self.points.iter().filter(|p| p.arm == arm).map(|p| p.step).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Adds the points of `earlier` whose (seed, arm) run is not in `measured`, when `earlier` was measured
    /// with the same condition, feature and settings (otherwise its points are not comparable and none are
    /// kept); points end ordered by seed, each seed's arms in their order. Returns the (seed, arm) runs kept.
    pub fn keep_unmeasured(&mut self, earlier: &DisentangleReport, measured: &[(u64, String)]) -> Vec<(u64, String)> {
        if earlier.condition != self.condition || earlier.hook != self.hook || earlier.config != self.config {
            return Vec::new();
        }
        let mut kept: Vec<(u64, String)> = Vec::new();
        for p in &earlier.points {
            let run = (p.seed, p.arm.clone());
            if !measured.contains(&run) {
                if !kept.contains(&run) {
                    kept.push(run);
                }
                self.points.push(p.clone());
            }
        }
        // Stable: steps and times keep their measured order.
        self.points.sort_by(|a, b| (a.seed, arm_rank(&a.arm), &a.arm).cmp(&(b.seed, arm_rank(&b.arm), &b.arm)));
        kept
    }

    /// Values of `f` over the seeds of `arm` at `step` and time `unit_t` (every time when `None`:
    /// then one value per seed, the mean over times).
    pub fn over_seeds(
        &self,
        arm: &str,
        step: u64,
        unit_t: Option<f64>,
        f: impl Fn(&VarianceShares) -> f64,
    ) -> Vec<f64> {
        let mut seeds: Vec<u64> =
            self.points.iter().filter(|p| p.arm == arm && p.step == step).map(|p| p.seed).collect();
        seeds.sort();
        seeds.dedup();
        seeds
            .iter()
            .filter_map(|&s| {
                let v: Vec<f64> = self
                    .points
                    .iter()
                    .filter(|p| p.arm == arm && p.step == step && p.seed == s && unit_t.is_none_or(|u| p.unit_t == u))
                    .map(|p| f(&p.shares))
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect()
    }

    /// A markdown table: for every arm and step, the condition, input and interaction shares at each
    /// time (mean ± standard deviation over seeds).
    pub fn table(&self) -> String {
        let times = &self.config.unit_times;
        let mut s = format!(
            "hooked feature `{}` of the side network, condition `{}`: share of its variance over a {} condition × {} \
             input grid due to the condition (c), the noisy input (x) and both jointly (c×x)\n\n| arm | step |",
            self.hook, self.condition, self.config.num_conditions, self.config.num_inputs
        );
        for t in times {
            s += &format!(" t/T = {t}: c | x | c×x |");
        }
        s += "\n|---|---|";
        s += &"---|---|---|".repeat(times.len());
        s += "\n";
        for arm in self.arms() {
            for step in self.steps(&arm) {
                s += &format!("| {arm} | {step} |");
                for &t in times {
                    for f in [
                        |v: &VarianceShares| v.condition,
                        |v: &VarianceShares| v.input,
                        |v: &VarianceShares| v.interaction,
                    ] {
                        s += &format!(" {} |", mean_sd_text(&self.over_seeds(&arm, step, Some(t), f)));
                    }
                }
                s += "\n";
            }
        }
        s += "\n(± = standard deviation over seeds; the three shares of a cell group sum to 1.)\n";
        let others: Vec<String> = self.arms().into_iter().filter(|a| a != "baseline").collect();
        if self.arms().iter().any(|a| a == "baseline") && !others.is_empty() {
            s += "\nCondition share minus the baseline's, paired by seed, at the last step both reached:\n\n| arm | step |";
            for t in times {
                s += &format!(" t/T = {t} |");
            }
            s += "\n|---|---|";
            s += &"---|".repeat(times.len());
            s += "\n";
            for arm in others {
                let Some(step) = self.steps(&arm).into_iter().filter(|st| self.steps("baseline").contains(st)).max()
                else {
                    continue;
                };
                s += &format!("| {arm} | {step} |");
                for &t in times {
                    let d = self.paired_condition_difference(&arm, step, t);
                    let up = d.iter().filter(|x| **x > 0.0).count();
                    s += &format!(" {} (higher in {up} of {}) |", signed_mean_sd_text(&d), d.len());
                }
                s += "\n";
            }
        }
        s
    }

    /// Condition share of `arm` minus the baseline's at `step` and time `unit_t`, one value per seed
    /// both were measured with.
    pub fn paired_condition_difference(&self, arm: &str, step: u64, unit_t: f64) -> Vec<f64> {
        let at = |a: &str, seed: u64| {
            self.points
                .iter()
                .find(|p| p.arm == a && p.seed == seed && p.step == step && p.unit_t == unit_t)
                .map(|p| p.shares.condition)
        };
        let mut seeds: Vec<u64> = self.points.iter().map(|p| p.seed).collect();
        seeds.sort();
        seeds.dedup();
        seeds.into_iter().filter_map(|s| Some(at(arm, s)? - at("baseline", s)?)).collect()
    }
}

fn signed_mean_sd_text(v: &[f64]) -> String {
    let t = mean_sd_text(v);
    if t.starts_with('-') || t == "—" {
        t
    } else {
        format!("+{t}")
    }
}

fn mean_sd_text(v: &[f64]) -> String {
    if v.is_empty() {
        return "—".into();
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() == 1 {
        return format!("{m:.3}");
    }
    let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
    format!("{m:.3} ± {sd:.3}")
}

/// `seed-S` folders of `run_dir`, by seed.
fn seed_dirs(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(run_dir).map_err(|e| Error::io(run_dir, e))? {
        let e = e.map_err(|e| Error::io(run_dir, e))?;
        if let Some(seed) = e.file_name().to_str().and_then(|n| n.strip_prefix("seed-")).and_then(|s| s.parse().ok()) {
            v.push((seed, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Order of arms in reports: `baseline`, `lisa`, then the rest (by name, the caller's second key).
fn arm_rank(arm: &str) -> u8 {
    match arm {
        "baseline" => 0,
        "lisa" => 1,
        _ => 2,
    }
}

/// Arm folders of a seed folder (those holding a side network's `config.json`): `baseline`, `lisa`,
/// then the rest by name.
fn arm_dirs(seed_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(seed_dir).map_err(|e| Error::io(seed_dir, e))? {
        let e = e.map_err(|e| Error::io(seed_dir, e))?;
        if e.path().join(crate::pipeline::CONFIG_FILE).is_file() {
            v.push((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
    }
    v.sort_by(|a, b| (arm_rank(&a.0), &a.0).cmp(&(arm_rank(&b.0), &b.0)));
    Ok(v)
}

/// Measures every side network saved in `run_dir` (a `lisa compare` or `lisa ablate` folder: its
/// `config.toml` and `seed-S/<arm>/` with `checkpoint-N/` and the final `side-network/`), writes
/// `disentangle.{md,json,csv,png}` there, and returns the report.
///
/// An earlier `disentangle.json` in `run_dir`, measured with the same settings, keeps its points for the
/// arm runs no longer on disk (side networks deleted after measuring, or a seed kept only as collected
/// logs), so seeds added later join the seeds measured before; every run still on disk is measured anew.
pub fn disentangle(run_dir: &Path, cfg: &DisentangleConfig, log: &mut dyn FnMut(&str)) -> Result<DisentangleReport> {
    let cfg_path = run_dir.join("config.toml");
    if !cfg_path.is_file() {
        return Err(Error::Config(format!(
            "{} has no config.toml: pass the folder of a `lisa compare` or `lisa ablate` run",
            run_dir.display()
        )));
    }
    let ctl: ControlConfig = crate::config::load(Some(&cfg_path), &[])?;
    if ctl.threads > 0 {
        tch::set_num_threads(ctl.threads);
    }
    let main = load_main(&ctl)?;
    let kind = ctl.condition_set()?;
    let hook = cfg.hook.unwrap_or(ctl.lisa.hook);
    let (images, labels, conditions) = held_out_subset(&ctl)?;
    let grid = FactorialGrid::new(&images, &labels, &conditions, cfg.num_conditions, cfg.num_inputs, cfg.noise_seed)?;

    let earlier = read_report(&run_dir.join("disentangle.json"));
    let mut points = Vec::new();
    let mut measured: Vec<(u64, String)> = Vec::new();
    for (seed, seed_dir) in seed_dirs(run_dir)? {
        for (arm, arm_dir) in arm_dirs(&seed_dir)? {
            measured.push((seed, arm.clone()));
            let cfg_text = std::fs::read_to_string(arm_dir.join(crate::pipeline::CONFIG_FILE))
                .map_err(|e| Error::io(arm_dir.join(crate::pipeline::CONFIG_FILE), e))?;
            let side_cfg: SideNetworkConfig = serde_json::from_str(&cfg_text)
                .map_err(|e| Error::format(&arm_dir, format!("not a side-network run: {e}")))?;
            let mut nets: Vec<(u64, SideNetwork)> = Vec::new();
            tch::manual_seed(seed as i64);
            nets.push((0, SideNetwork::initial(&main, kind.clone(), &side_cfg)?));
            for (step, dir) in crate::train::checkpoint::list(&arm_dir)? {
                nets.push((step, SideNetwork::load(&dir, &main)?));
            }
            let final_dir = arm_dir.join("side-network");
            let final_step = read_steps(&arm_dir.join("summary.json"));
            if let Some(step) = final_step.filter(|s| final_dir.is_dir() && nets.iter().all(|(n, _)| n != s)) {
                nets.push((step, SideNetwork::load(&final_dir, &main)?));
            }
            for (step, side) in &nets {
                for &u in &cfg.unit_times {
                    let shares = side_feature_shares(&main, side, hook, &grid, u)?;
                    points.push(DisentanglePoint { arm: arm.clone(), seed, step: *step, unit_t: u, shares });
                }
            }
            log(&format!("seed {seed} {arm}: steps {:?}", nets.iter().map(|n| n.0).collect::<Vec<_>>()));
        }
    }
    let mut report = DisentangleReport { condition: ctl.condition.clone(), hook, config: cfg.clone(), points };
    if let Some(earlier) = earlier {
        let kept = report.keep_unmeasured(&earlier, &measured);
        if !kept.is_empty() {
            log(&format!("kept from the earlier disentangle.json (side networks no longer on disk): {kept:?}"));
        }
    }
    if report.points.is_empty() {
        return Err(Error::Config(format!("no seed-S/<arm>/ side-network runs under {}", run_dir.display())));
    }
    write_outputs(run_dir, &report)?;
    Ok(report)
}

fn read_report(path: &Path) -> Option<DisentangleReport> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn read_steps(summary: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(summary).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("steps")?.as_u64()
}

fn write_outputs(run_dir: &Path, report: &DisentangleReport) -> Result<()> {
    let write = |name: &str, text: String| {
        let p = run_dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("disentangle.md", report.table())?;
    write("disentangle.json", serde_json::to_string_pretty(report).map_err(|e| Error::Config(e.to_string()))?)?;
    let mut csv = String::from("arm,seed,step,unit_t,condition_share,input_share,interaction_share\n");
    for p in &report.points {
        csv += &format!(
            "{},{},{},{},{},{},{}\n",
            p.arm, p.seed, p.step, p.unit_t, p.shares.condition, p.shares.input, p.shares.interaction
        );
    }
    write("disentangle.csv", csv)?;
    const COLORS: [[u8; 3]; 6] =
        [[90, 90, 90], [200, 60, 40], [40, 100, 200], [40, 160, 80], [150, 80, 180], [220, 150, 30]];
    let series: Vec<Series> = report
        .arms()
        .iter()
        .zip(COLORS.iter().cycle())
        .map(|(arm, &color)| {
            let steps = report.steps(arm);
            let vals: Vec<Vec<f64>> = steps.iter().map(|&s| report.over_seeds(arm, s, None, |v| v.condition)).collect();
            let mean = vals.iter().map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64).collect();
            let lo = vals.iter().map(|v| v.iter().copied().fold(f64::INFINITY, f64::min)).collect();
            let hi = vals.iter().map(|v| v.iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect();
            Series {
                label: arm.clone(),
                color,
                x: steps.iter().map(|&s| s as f64).collect(),
                mean,
                band: Some((lo, hi)),
            }
        })
        .collect();
    let title = format!("condition share of the {} feature, mean over t/T", report.hook);
    let spec = PlotSpec { title: &title, x_label: "step", y_label: "condition share", width: 720, height: 420 };
    line_plot(&run_dir.join("disentangle.png"), &spec, &series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::conditions::ConditionKind;
    use crate::diffusion::ObjectiveConfig;
    use crate::models::{ControlNetConfig, LabelEncoderConfig, PerBlock, UNetConfig};
    use crate::pipeline::MainNetworkConfig;
    use tch::{Device, Kind};

    fn tiny() -> (MainNetwork, SideNetwork) {
        let unet = UNetConfig {
            sample_size: 8,
            block_out_channels: vec![8, 16],
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            cross_attention_dim: 8,
            attention_head_dim: PerBlock::All(2),
            norm_num_groups: 4,
            ..UNetConfig::default()
        };
        tch::manual_seed(3);
        let cfg = MainNetworkConfig {
            unet,
            label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 1 },
            objective: ObjectiveConfig::default(),
            transformer: None,
        };
        let mut main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
        main.freeze();
        let cn = ControlNetConfig {
            conditioning_embedding_out_channels: vec![4],
            ..ControlNetConfig::for_unet(&main.config.unet)
        };
        let side = SideNetwork::from_main(&main, ConditionKind::Edges, cn).unwrap();
        (main, side)
    }

    fn grid() -> FactorialGrid {
        tch::manual_seed(5);
        let images = Tensor::rand([10, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let conditions = Tensor::rand([10, 1, 8, 8], (Kind::Float, Device::Cpu)).ge(0.5).to_kind(Kind::Float);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        FactorialGrid::new(&images, &labels, &conditions, 4, 5, 9).unwrap()
    }

    #[test]
    fn an_initialised_side_network_ignores_the_condition_and_a_trained_condition_path_does_not() {
        let (main, side) = tiny();
        let g = grid();
        for hook in [Hook::Mid, Hook::Down(0)] {
            let s = side_feature_shares(&main, &side, hook, &g, 0.5).unwrap();
            // The condition path ends in a zero conv: the feature cannot depend on the condition.
            assert_eq!(s.condition, 0.0, "{hook}: {s:?}");
            assert!(s.interaction.abs() < 1e-9, "{hook}: {s:?}");
            assert!((s.input - 1.0).abs() < 1e-9, "{hook}: {s:?}");
        }
        // Open the condition path: now the condition drives part of the feature.
        tch::no_grad(|| {
            let w = side.vs.variables()["controlnet_cond_embedding.conv_out.weight"].shallow_clone();
            let mut w = w;
            let _ = w.normal_(0.0, 0.5);
        });
        for hook in [Hook::Mid, Hook::Down(0)] {
            let s = side_feature_shares(&main, &side, hook, &g, 0.5).unwrap();
            assert!(s.condition > 0.01, "{hook}: {s:?}");
            assert!((s.condition + s.input + s.interaction - 1.0).abs() < 1e-9);
        }
    }

    /// A measurement at t/T = 0.5 with condition share `c` and the rest input.
    fn point(arm: &str, seed: u64, step: u64, c: f64) -> DisentanglePoint {
        DisentanglePoint {
            arm: arm.into(),
            seed,
            step,
            unit_t: 0.5,
            shares: VarianceShares { condition: c, input: 1.0 - c, interaction: 0.0, total_sum_of_squares: 1.0 },
        }
    }

    #[test]
    fn the_report_pairs_arms_by_seed_at_their_last_common_step() {
        let report = DisentangleReport {
            condition: "edges".into(),
            hook: Hook::Mid,
            config: DisentangleConfig { unit_times: vec![0.5], ..Default::default() },
            points: vec![
                point("baseline", 0, 0, 0.0),
                point("baseline", 0, 500, 0.3),
                point("baseline", 1, 500, 0.6),
                point("lisa", 0, 500, 0.4),
                point("lisa", 1, 500, 0.4),
                point("lisa", 2, 500, 0.9), // no baseline for seed 2: not paired
                point("lisa", 0, 600, 0.9), // no baseline at 600
            ],
        };
        let d = report.paired_condition_difference("lisa", 500, 0.5);
        assert_eq!(d.len(), 2);
        assert!((d[0] - 0.1).abs() < 1e-12 && (d[1] + 0.2).abs() < 1e-12, "{d:?}");
        let table = report.table();
        assert!(table.contains("| lisa | 500 | -0.050 ± 0.212 (higher in 1 of 2) |"), "{table}");
        assert_eq!(report.steps("baseline"), vec![0, 500]);
        assert_eq!(report.over_seeds("lisa", 500, None, |v| v.condition), vec![0.4, 0.4, 0.9]);
    }

    #[test]
    fn earlier_points_are_kept_only_for_runs_not_measured_again_and_only_with_the_same_settings() {
        let report = |points| DisentangleReport {
            condition: "trajectory".into(),
            hook: Hook::Mid,
            config: DisentangleConfig { unit_times: vec![0.5], ..Default::default() },
            points,
        };
        // Seed 0 was measured before and its side networks are gone; seed 1 is on disk again and is re-measured.
        let earlier = report(vec![
            point("baseline", 0, 0, 0.0),
            point("baseline", 0, 500, 0.2),
            point("lisa", 0, 0, 0.0),
            point("lisa", 0, 500, 0.3),
            point("baseline", 1, 500, 0.9),
        ]);
        let measured = vec![(1, "baseline".to_string()), (1, "lisa".to_string())];
        let mut now = report(vec![point("baseline", 1, 500, 0.25), point("lisa", 1, 500, 0.35)]);
        let kept = now.keep_unmeasured(&earlier, &measured);
        assert_eq!(kept, vec![(0, "baseline".to_string()), (0, "lisa".to_string())]);
        let order: Vec<(u64, &str, u64, f64)> =
            now.points.iter().map(|p| (p.seed, p.arm.as_str(), p.step, p.shares.condition)).collect();
        assert_eq!(
            order,
            vec![
                (0, "baseline", 0, 0.0),
                (0, "baseline", 500, 0.2),
                (0, "lisa", 0, 0.0),
                (0, "lisa", 500, 0.3),
                (1, "baseline", 500, 0.25), // the new measurement, not the earlier 0.9
                (1, "lisa", 500, 0.35),
            ]
        );
        assert_eq!(now.paired_condition_difference("lisa", 500, 0.5).len(), 2);

        // Measured with other settings (another grid time, another feature): nothing is kept.
        for other in [
            DisentangleReport {
                config: DisentangleConfig { unit_times: vec![0.1], ..Default::default() },
                ..earlier.clone()
            },
            DisentangleReport { hook: Hook::Down(0), ..earlier.clone() },
        ] {
            let mut now = report(vec![point("baseline", 1, 500, 0.25)]);
            assert!(now.keep_unmeasured(&other, &measured).is_empty());
            assert_eq!(now.points.len(), 1);
        }
    }

    #[test]
    fn a_video_side_networks_hooked_feature_is_split_per_pair_with_its_frames() {
        use crate::models::DiTConfig;
        tch::manual_seed(3);
        let dit = DiTConfig {
            sample_size: 8,
            patch_size: 2,
            num_layers: 2,
            num_attention_heads: 2,
            attention_head_dim: 4,
            pooled_projection_dim: 8,
            mlp_ratio: 2,
            num_frames: 3,
            ..DiTConfig::default()
        };
        let cfg = MainNetworkConfig {
            transformer: Some(dit),
            label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 1 },
            ..Default::default()
        };
        let mut main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
        main.freeze();
        let side = SideNetwork::for_main(&main, ConditionKind::Trajectory, ControlNetConfig::default(), 1).unwrap();
        // Clips of 3 frames, stored as channels.
        let images = Tensor::rand([10, 3, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let conditions = Tensor::rand([10, 3, 8, 8], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
        let g = FactorialGrid::new(&images, &labels, &conditions, 4, 5, 9).unwrap();
        let s = side_feature_shares(&main, &side, Hook::Mid, &g, 0.5).unwrap();
        // As initialised, the condition path ends in zero layers: the inputs explain everything.
        assert_eq!(s.condition, 0.0, "{s:?}");
        assert!((s.input - 1.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn the_grid_needs_enough_distinct_images() {
        let images = Tensor::zeros([5, 1, 8, 8], (Kind::Float, Device::Cpu));
        let labels = Tensor::zeros([5], (Kind::Int64, Device::Cpu));
        assert!(FactorialGrid::new(&images, &labels, &images, 3, 3, 0).is_err());
        assert!(FactorialGrid::new(&images, &labels, &images, 1, 3, 0).is_err());
        assert!(FactorialGrid::new(&images, &labels, &images, 2, 3, 0).is_ok());
    }
}
