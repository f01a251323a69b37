//! Sampling with the side networks a comparison trained, baseline's and LISA's side by side.
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::report::{Ratio, TimingStats};
use crate::control::SideNetwork;
use crate::experiments::control_config::ControlConfig;
use crate::experiments::protocol;
use crate::{Error, Result};

/// Sampling with the side networks a comparison trained (zero inference cost, claim 5): the baseline's and
/// LISA's of one seed, on the same held-out conditions, labels, noise and sampler, timed in alternating order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingBench {
    /// The `lisa compare` folder.
    pub run_dir: String,
    /// Its seed whose side networks were timed.
    pub seed: u64,
    /// Images sampled per timing.
    pub images: i64,
    /// Sampler steps.
    pub sampler_steps: usize,
    /// Parameters of the baseline-trained side network.
    pub baseline_parameters: i64,
    /// Parameters of the LISA-trained side network.
    pub lisa_parameters: i64,
    /// Whether the two side networks have the same parameter names and shapes.
    pub same_architecture: bool,
    /// Sampling times with the baseline-trained side network.
    pub baseline: TimingStats,
    /// Sampling times with the LISA-trained side network.
    pub lisa: TimingStats,
    /// LISA's over the baseline's.
    pub ratio: Ratio,
}

impl SamplingBench {
    /// The result as a short Markdown table.
    pub fn table(&self) -> String {
        format!(
            "sampling {} held-out images with {} sampler steps, side networks of {} (seed {}); same architecture: {}\n\n\
             | side network | parameters | median | mean | min – max |\n|---|---|---|---|---|\n\
             | baseline-trained | {} | {:.3} s | {:.3} s | {:.3} – {:.3} s |\n\
             | LISA-trained | {} | {:.3} s | {:.3} s | {:.3} – {:.3} s |\n\n\
             LISA / baseline: median ×{:.3}, mean ×{:.3}\n",
            self.images,
            self.sampler_steps,
            self.run_dir,
            self.seed,
            if self.same_architecture { "yes" } else { "NO" },
            self.baseline_parameters,
            self.baseline.median_s,
            self.baseline.mean_s,
            self.baseline.min_s,
            self.baseline.max_s,
            self.lisa_parameters,
            self.lisa.median_s,
            self.lisa.mean_s,
            self.lisa.min_s,
            self.lisa.max_s,
            self.ratio.median,
            self.ratio.mean,
        )
    }
}

/// Times controlled sampling with the baseline- and LISA-trained side networks of `run_dir` (a `lisa
/// compare` folder; its first seed), `reps` times each after one untimed round, alternating which goes first.
pub fn bench_sampling(run_dir: &Path, images: i64, reps: usize, threads: i32) -> Result<SamplingBench> {
    if reps == 0 || images < 1 {
        return Err(Error::Config("the sampling benchmark needs reps ≥ 1 and images ≥ 1".into()));
    }
    let cfg_path = run_dir.join("config.toml");
    if !cfg_path.is_file() {
        return Err(Error::Config(format!("{} has no config.toml: pass a `lisa compare` folder", run_dir.display())));
    }
    let cfg: ControlConfig = crate::config::load(Some(&cfg_path), &[])?;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let main = protocol::load_main(&cfg)?;
    let seed_dir = run_dir.join(format!("seed-{}", cfg.train.seed));
    let load = |arm: &str| SideNetwork::load(&seed_dir.join(arm).join("side-network"), &main);
    let (baseline, lisa) = (load("baseline")?, load("lisa")?);
    let shapes = |s: &SideNetwork| -> Vec<(String, Vec<i64>)> {
        s.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect()
    };
    let (_, labels, conditions) = protocol::held_out_subset(&cfg)?;
    let n = images.min(labels.size()[0]);
    let (y, c) = (labels.narrow(0, 0, n), conditions.narrow(0, 0, n));
    let sampler = protocol::fidelity_sampler(&cfg, &main);
    let run = |side: &SideNetwork| -> Result<f64> {
        let t0 = Instant::now();
        let _ = side.sample(&main, &y, &c, &sampler, 1.0, cfg.fidelity.seed)?;
        Ok(t0.elapsed().as_secs_f64())
    };
    run(&baseline)?;
    run(&lisa)?;
    let (mut tb, mut tl) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for r in 0..reps {
        if r % 2 == 0 {
            tb.push(run(&baseline)?);
            tl.push(run(&lisa)?);
        } else {
            tl.push(run(&lisa)?);
            tb.push(run(&baseline)?);
        }
    }
    let (b, l) = (TimingStats::from_times(tb), TimingStats::from_times(tl));
    Ok(SamplingBench {
        run_dir: run_dir.display().to_string(),
        seed: cfg.train.seed,
        images: n,
        sampler_steps: sampler.steps,
        baseline_parameters: crate::models::parameter_count(&baseline.vs),
        lisa_parameters: crate::models::parameter_count(&lisa.vs),
        same_architecture: shapes(&baseline) == shapes(&lisa),
        ratio: Ratio { median: l.median_s / b.median_s, mean: l.mean_s / b.mean_s },
        baseline: b,
        lisa: l,
    })
}
