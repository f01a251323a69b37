//! `lisa bench --config FILE --arm NAME...`: the step cost of each arm of one operating point (its
//! configuration: network, hook, batch, threads), so that a speed-up per training step can be turned into
//! a speed-up per second of compute. Each arm is the configuration with one switch changed (see
//! [`ArmKind`]); its steps are the training loop's own [`crate::train::step::train_step`], timed
//! round-robin across the arms (the order rotated each round) on random inputs of the configured shapes.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::report::TimingStats;
use super::step::{loss_scaler_for, ours_step};
use crate::experiments::protocol::{condition_channels, load_main};
use crate::experiments::control_config::{ControlConfig, SideConnection};
use crate::control::{ControlTask, LisaHead, LisaTarget, SideNetwork};
use crate::train::loss_scaler::LossScaler;
use crate::train::optim::AdamW;
use crate::train::step::{Batch, StepSettings};
use crate::{Error, Result};

/// One arm: the operating point's configuration with one switch changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArmKind {
    /// No LISA term (`lisa.enabled = false`); a baseline at another learning rate costs the same.
    Baseline,
    /// LISA as configured (the likelihood residual).
    Lisa,
    /// The decoder regressing onto noise of the residual's size (`lisa.target = "random"`).
    Random,
    /// The decoder regressing onto the condition image (`lisa.target = "condition"`).
    Condition,
    /// The decoder regressing onto the diffusion target itself, no reference pass (`lisa.target = "raw"`).
    Raw,
    /// LISA with its term on the first 8 examples of each batch (`lisa.sub_batch = 8`).
    Sub8,
    /// No LISA term, the side network joined by ControlNeXt's cross-normalization instead of zero convolutions
    /// (`side_connection = "cross_norm"`): the rival method.
    CrossNorm,
    /// LISA on the cross-normalized side network.
    CrossNormLisa,
}

impl ArmKind {
    /// Every arm, in table order.
    pub const ALL: [ArmKind; 8] = [
        ArmKind::Baseline,
        ArmKind::Lisa,
        ArmKind::Random,
        ArmKind::Condition,
        ArmKind::Raw,
        ArmKind::Sub8,
        ArmKind::CrossNorm,
        ArmKind::CrossNormLisa,
    ];

    /// The arm's name, as `scripts/converge.sh control` names its run folder.
    pub fn name(self) -> &'static str {
        match self {
            ArmKind::Baseline => "baseline",
            ArmKind::Lisa => "lisa",
            ArmKind::Random => "random",
            ArmKind::Condition => "condition",
            ArmKind::Raw => "raw",
            ArmKind::Sub8 => "sub8",
            ArmKind::CrossNorm => "crossnorm",
            ArmKind::CrossNormLisa => "crossnorm-lisa",
        }
    }

    /// The arm named `name`.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
            Error::Config(format!("unknown arm {name:?}; the arms are {}", names.join(", ")))
        })
    }

    /// `cfg` with this arm's switch.
    pub fn configure(self, cfg: &ControlConfig) -> ControlConfig {
        let mut c = cfg.clone();
        c.lisa.enabled = !matches!(self, ArmKind::Baseline | ArmKind::CrossNorm);
        match self {
            ArmKind::Random => c.lisa.target = LisaTarget::Random,
            ArmKind::Condition => c.lisa.target = LisaTarget::Condition,
            ArmKind::Raw => c.lisa.target = LisaTarget::Raw,
            ArmKind::Sub8 => c.lisa.sub_batch = 8,
            ArmKind::CrossNorm | ArmKind::CrossNormLisa => c.side_connection = SideConnection::CrossNorm,
            ArmKind::Baseline | ArmKind::Lisa => {}
        }
        c
    }
}

/// One arm's step times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmCost {
    /// The arm.
    pub arm: ArmKind,
    /// Its step times.
    pub stats: TimingStats,
    /// Its median over the first arm's median.
    pub relative: f64,
}

/// The benchmark's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmCostReport {
    /// The operating point: condition, hook, batch, threads, learning rate, label, as configured.
    pub operating_point: String,
    /// The LISA hook the arms were timed at (the decoder's size, and so LISA's cost, depends on it).
    pub hook: String,
    /// The main network as configured ([`ControlConfig::main_network_name`]).
    pub main_network: String,
    /// Examples per step.
    pub batch: i64,
    /// Untimed rounds before the timed ones.
    pub warmup: usize,
    /// Timed rounds (one step of every arm each).
    pub reps: usize,
    /// Per arm, in the order asked; `relative` is against the first.
    pub arms: Vec<ArmCost>,
}

impl ArmCostReport {
    /// The cost of `arm` relative to the first arm, if it was timed.
    pub fn relative(&self, arm: ArmKind) -> Option<f64> {
        self.arms.iter().find(|a| a.arm == arm).map(|a| a.relative)
    }

    /// A Markdown table: arm | median | fastest–slowest | relative to the first arm.
    pub fn table(&self) -> String {
        let first = self.arms.first().map_or("", |a| a.arm.name());
        let mut s = format!(
            "Training-step cost per arm at {} ({} timed rounds after {} warm-up, round-robin)\n\n\
             | arm | median step (s) | fastest – slowest (s) | relative to {first} |\n|---|---|---|---|\n",
            self.operating_point, self.reps, self.warmup
        );
        for a in &self.arms {
            s += &format!(
                "| {} | {:.4} | {:.4} – {:.4} | ×{:.3} |\n",
                a.arm.name(),
                a.stats.median_s,
                a.stats.min_s,
                a.stats.max_s,
                a.relative
            );
        }
        s
    }
}

/// Times one training step of each of `arms` at the operating point `cfg`, `reps` rounds after `warmup`.
pub fn bench_arms(
    cfg: &ControlConfig,
    arms: &[ArmKind],
    warmup: usize,
    reps: usize,
    log: &mut dyn FnMut(&str),
) -> Result<ArmCostReport> {
    cfg.validate()?;
    if arms.is_empty() || reps == 0 {
        return Err(Error::Config("bench: give at least one --arm and --reps ≥ 1".into()));
    }
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    let main = load_main(cfg)?;
    let u = &main.config.unet;
    let (res, in_ch, classes) = (u.sample_size, u.in_channels, main.config.label_encoder.num_classes);
    let batch = cfg.train.batch_size as i64;
    let set = cfg.condition_set()?;
    let cond_channels = set.len() as i64;
    let probe = Tensor::zeros([1, cond_channels, res, res], (Kind::Float, Device::Cpu));
    let controlnet = cfg.controlnet_config(u, condition_channels(cfg, &probe)?);
    struct Arm {
        side: SideNetwork,
        head: Option<LisaHead>,
        cfg: ControlConfig,
    }
    let built: Vec<Arm> = arms
        .iter()
        .map(|a| {
            let cfg = a.configure(cfg);
            cfg.validate()?;
            // The same seed gives every arm the same side network, as in training.
            tch::manual_seed(cfg.train.seed as i64);
            let side = SideNetwork::for_main(&main, set.clone(), controlnet.clone(), cfg.side_transformer_layers)?;
            let head = if cfg.lisa.enabled { Some(LisaHead::new(&main, &side, &cfg.lisa)?) } else { None };
            Ok(Arm { side, head, cfg })
        })
        .collect::<Result<_>>()?;
    let tasks: Vec<ControlTask> =
        built.iter().map(|a| ControlTask::new(&main, &a.side, a.head.as_ref())).collect::<Result<_>>()?;
    let mut opts: Vec<AdamW> = built
        .iter()
        .map(|a| {
            let mut p = a.side.named_parameters();
            if let Some(h) = &a.head {
                p.extend(h.named_parameters());
            }
            AdamW::new(p, a.cfg.train.adam.clone())
        })
        .collect();
    let settings = StepSettings { max_grad_norm: cfg.train.max_grad_norm, mixed_precision: cfg.train.mixed_precision };
    // Under fp16 each arm steps with the trainer's loss scaler, kept across its steps.
    let mut scalers: Vec<Option<LossScaler>> = built.iter().map(|_| loss_scaler_for(settings)).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); built.len()];
    for round in 0..warmup + reps {
        log(&format!("round {}/{}{}", round + 1, warmup + reps, if round < warmup { " (warm-up)" } else { "" }));
        let x0 = Tensor::rand([batch, in_ch, res, res], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let condition = Tensor::rand([batch, cond_channels, res, res], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(classes, [batch], (Kind::Int64, Device::Cpu));
        let b = Batch { x0, labels, condition: Some(condition), rows: None };
        for j in 0..built.len() {
            let i = (round + j) % built.len();
            let lr = built[i].cfg.train.learning_rate;
            let scaler = scalers[i].as_mut();
            let dt = ours_step(&tasks[i], &mut opts[i], &main.objective, &b, cfg.train.seed, round as u64, lr, settings, scaler)?;
            if round >= warmup {
                times[i].push(dt);
            }
        }
    }
    let stats: Vec<TimingStats> = times.into_iter().map(TimingStats::from_times).collect();
    let first = stats[0].median_s;
    Ok(ArmCostReport {
        operating_point: format!(
            "condition {}, hook `{}`, batch {batch}, {} thread(s), lr {:e}, label {:?}, main network {}",
            cfg.condition,
            cfg.lisa.hook,
            cfg.threads,
            cfg.train.learning_rate,
            cfg.label,
            cfg.main_network_name()
        ),
        hook: cfg.lisa.hook.to_string(),
        main_network: cfg.main_network_name(),
        batch,
        warmup,
        reps,
        arms: arms
            .iter()
            .zip(stats)
            .map(|(&arm, stats)| ArmCost { arm, relative: stats.median_s / first, stats })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::LisaConfig;

    #[test]
    fn arms_change_one_switch_and_unknown_names_are_refused() {
        let cfg = ControlConfig::default();
        assert!(!ArmKind::Baseline.configure(&cfg).lisa.enabled);
        let random = ArmKind::Random.configure(&cfg);
        assert!(random.lisa.enabled && random.lisa.target == LisaTarget::Random);
        assert_eq!(ArmKind::Sub8.configure(&cfg).lisa.sub_batch, 8);
        assert_eq!(ArmKind::Lisa.configure(&cfg).lisa, LisaConfig { enabled: true, ..cfg.lisa.clone() });
        for a in ArmKind::ALL {
            assert_eq!(ArmKind::parse(a.name()).unwrap(), a);
        }
        let err = ArmKind::parse("lr1.12").unwrap_err().to_string();
        assert!(err.contains("unknown arm \"lr1.12\"") && err.contains("baseline, lisa, random"), "{err}");
    }

    #[test]
    fn every_arm_steps_and_is_timed() {
        let mut cfg = ControlConfig::default();
        cfg.train.batch_size = 4;
        cfg.threads = 1;
        let r = bench_arms(&cfg, &ArmKind::ALL, 0, 2, &mut |_| {}).unwrap();
        assert_eq!(r.arms.len(), ArmKind::ALL.len());
        assert_eq!(r.relative(ArmKind::Baseline), Some(1.0));
        for a in &r.arms {
            assert_eq!(a.stats.times_s.len(), 2);
            assert!(a.stats.median_s > 0.0 && a.relative > 0.0, "{a:?}");
        }
        let table = r.table();
        assert!(table.contains("| sub8 |") && table.contains("relative to baseline"), "{table}");
        assert!(bench_arms(&cfg, &[], 0, 2, &mut |_| {}).is_err());
        // Under fp16 the arms step with the trainer's loss scaler: an overflowed first step is timed, not an error.
        cfg.train.mixed_precision = crate::models::precision::MixedPrecision::Fp16;
        let r = bench_arms(&cfg, &[ArmKind::Baseline, ArmKind::Lisa], 0, 2, &mut |_| {}).unwrap();
        assert!(r.arms.iter().all(|a| a.stats.times_s.len() == 2));
    }
}
