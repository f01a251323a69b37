//! A study: several arms trained over several seeds in one folder (`lisa compare`, `lisa ablate`). What every
//! study sets up once before its first arm, how each arm is run or resumed, and one arm's runs aggregated
//! over seeds (the statistics themselves are [`crate::eval::seeds`]).
use serde::{Deserialize, Serialize};

use super::arm::{finished_arm, train_control, ArmSummary};
use super::control_config::ControlConfig;
use super::protocol::{frechet_skipped_note, load_main, LazyData};
use crate::eval::seeds::{mean_sd, paired_by_seed, CurveBand, SeedRun};
use crate::pipeline::MainNetwork;
use crate::train::lock::RunLock;
use crate::{Error, Result};

impl SeedRun for ArmSummary {
    fn seed(&self) -> u64 {
        self.seed
    }
    fn metric(&self) -> &str {
        &self.metric
    }
    fn fidelity_curve(&self) -> &[(u64, f64)] {
        &self.curve
    }
    fn loss_gain_curve(&self) -> &[(u64, f64)] {
        &self.loss_gain_curve
    }
}

/// What a study holds while its arms train: the frozen main network, the data (prepared on first use) and
/// the lock on its folder.
pub struct Study<'a> {
    /// The frozen main network every arm trains against.
    pub main: MainNetwork,
    /// The training and held-out data, prepared when the first arm needs it.
    pub data: LazyData<'a>,
    /// Whether this process writes the study's files (rank 0 of a multi-process run; the trainer does the
    /// same per arm).
    pub main_process: bool,
    resume: bool,
    quiet: bool,
    _lock: RunLock,
}

impl<'a> Study<'a> {
    /// Opens the study in `cfg.output_dir`: checks `cfg`, sets libtorch's threads, locks the folder against a
    /// second study, records `recorded` as `config_file` there (rank 0), and loads the main network.
    pub fn open(
        cfg: &'a ControlConfig,
        config_file: &str,
        recorded: &ControlConfig,
        resume: bool,
        quiet: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        if cfg.compare.seeds == 0 {
            return Err(Error::Config("compare.seeds must be ≥ 1".into()));
        }
        if cfg.threads > 0 {
            tch::set_num_threads(cfg.threads);
        }
        let out = &cfg.output_dir;
        let lock = RunLock::acquire(out)?;
        let main_process = crate::distributed::is_main_process();
        if main_process {
            let path = out.join(config_file);
            std::fs::write(&path, crate::config::to_toml(recorded)?).map_err(|e| Error::io(path, e))?;
        }
        let main = load_main(cfg)?;
        if let Some(note) = frechet_skipped_note(cfg).filter(|_| main_process) {
            eprintln!("{note}");
        }
        Ok(Self { main, data: LazyData::new(cfg), main_process, resume, quiet, _lock: lock })
    }

    /// Runs the arm `arm` (its seed and `output_dir` set) named `name`: when resuming, the summary of a finished
    /// arm is read back, and an unfinished one continues from its latest checkpoint; otherwise it trains.
    pub fn run_arm(&mut self, name: &str, arm: &ControlConfig) -> Result<ArmSummary> {
        if let Some(summary) = self.resume.then(|| finished_arm(arm)).flatten() {
            eprintln!("{}: finished earlier", arm.output_dir.display());
            return Ok(summary);
        }
        let has_checkpoint = !crate::train::checkpoint::list(&arm.output_dir).unwrap_or_default().is_empty();
        let from = (self.resume && has_checkpoint).then_some("latest");
        eprintln!("== {name} (seed {})", arm.train.seed);
        train_control(arm, &self.main, self.data.get()?, from, self.quiet)
    }
}

/// One arm over all seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmAggregate {
    /// `baseline` or `lisa`.
    pub arm: String,
    /// Per-seed summaries.
    pub runs: Vec<ArmSummary>,
    /// Steps of the fidelity curve.
    pub steps: Vec<u64>,
    /// Mean, minimum and maximum fidelity over seeds at each step.
    pub mean: Vec<f64>,
    /// Minimum over seeds.
    pub min: Vec<f64>,
    /// Maximum over seeds.
    pub max: Vec<f64>,
    /// The held-out diffusion-loss gain over seeds, when every run measured it at the same steps.
    #[serde(default)]
    pub loss_gain: Option<CurveBand>,
}

impl ArmAggregate {
    /// Aggregates `runs` (one per seed, evaluated at the same steps) of arm `arm`.
    pub fn new(arm: &str, runs: Vec<ArmSummary>) -> Result<Self> {
        let Some(first) = runs.first() else {
            return Err(Error::Training(format!("the {arm} arm has no runs; set compare.seeds ≥ 1")));
        };
        let steps: Vec<u64> = first.curve.iter().map(|p| p.0).collect();
        if runs.iter().any(|r| r.curve.iter().map(|p| p.0).ne(steps.iter().copied())) {
            return Err(Error::Training(format!("the {arm} runs were evaluated at different steps; rerun them")));
        }
        let curves: Vec<&[(u64, f64)]> = runs.iter().map(|r| r.curve.as_slice()).collect();
        let band = CurveBand::new(&curves)
            .ok_or_else(|| Error::Training(format!("the {arm} runs have no fidelity curve; rerun them")))?;
        let gains: Vec<&[(u64, f64)]> = runs.iter().map(|r| r.loss_gain_curve.as_slice()).collect();
        Ok(Self {
            arm: arm.into(),
            steps: band.steps,
            mean: band.mean,
            min: band.min,
            max: band.max,
            loss_gain: CurveBand::new(&gains),
            runs,
        })
    }

    /// Mean and sample standard deviation over seeds of `f(run)`.
    pub fn mean_sd(&self, f: impl Fn(&ArmSummary) -> f64) -> (f64, f64) {
        let v: Vec<f64> = self.runs.iter().map(f).collect();
        mean_sd(&v)
    }
}

/// Mean and sample standard deviation over seeds of the candidate's step time over the reference's, minus one,
/// in percent, paired by seed: both arms of a seed ran side by side on one machine, while seeds may not have.
pub fn paired_step_overhead_percent(reference: &[ArmSummary], candidate: &[ArmSummary]) -> (f64, f64) {
    paired_by_seed(reference, candidate, |r, c| 100.0 * (c.step_seconds / r.step_seconds - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::arm::example_summary as run;

    #[test]
    fn an_arm_without_runs_is_an_error_not_a_panic() {
        let e = ArmAggregate::new("baseline", vec![]).unwrap_err().to_string();
        assert!(e.contains("compare.seeds"), "{e}");
    }

    #[test]
    fn aggregates_and_the_paired_step_overhead() {
        // Seed 0 ran 1.0 → 1.2 s (+20%), seed 1 on a slower machine 4.0 → 6.0 s (+50%): +35% ± 21.2%, where the
        // ratio of mean step times would say +44%.
        let timed = |seed: u64, secs: f64| ArmSummary { step_seconds: secs, ..run(seed, 0.5) };
        let (m, s) = paired_step_overhead_percent(&[timed(0, 1.0), timed(1, 4.0)], &[timed(1, 6.0), timed(0, 1.2)]);
        assert!((m - 35.0).abs() < 1e-9 && (s - 450f64.sqrt()).abs() < 1e-9, "{m} {s}");
        let agg = ArmAggregate::new("baseline", vec![run(0, 0.5), run(1, 0.6)]).unwrap();
        assert_eq!(agg.mean, vec![0.5, 0.7, 0.8]);
        let (m, s) = agg.mean_sd(|r| r.final_fidelity);
        assert!((m - 0.55).abs() < 1e-12 && (s - 0.005f64.sqrt()).abs() < 1e-12, "{m} {s}");
        let mut odd = run(2, 0.1);
        odd.curve.pop();
        assert!(ArmAggregate::new("baseline", vec![run(0, 0.5), odd]).is_err(), "curves at different steps");
    }
}
