//! The configuration of side-network training (`lisa train`) and of the experiments built on it (`compare`,
//! `ablate`, `device-check`, the lr sweep, guidance, composition): what to train, how fidelity is measured during
//! training, and how the finished side network is evaluated.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::control::{LisaConfig, NUM_TIME_BUCKETS};
use crate::data::conditions::{ConditionKind, ConditionSet};
use crate::data::DataConfig;
use crate::diffusion::SamplerConfig;
use crate::models::{ControlNetConfig, UNetConfig};
use crate::pipeline::{shipped_main_network, MainNetwork};
use crate::train::trainer::TrainConfig;
use crate::{Error, Result};

/// Control fidelity measured during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FidelityEvalConfig {
    /// Measure every this many steps (and at step 0 and the last step). Default 50.
    pub every_steps: u64,
    /// Held-out test images whose conditions are sampled. Default 64.
    pub num_images: i64,
    /// The sampler (fixed across steps, arms and seeds). Default DDIM, 10 steps, η = 0; with a
    /// flow-matching main network DDIM becomes Euler (DDIM does not apply to flow; the steps are kept).
    pub sampler: SamplerConfig,
    /// Seed of the held-out subset and of the sampling noise (fixed across arms and seeds). Default 4321.
    pub seed: u64,
    /// Denser windows before `every_steps` applies, in order: up to step `until` (inclusive) measure
    /// every `every` steps, e.g. `phases = [{ until = 800, every = 20 }]` to resolve a convergence
    /// event early in training. Default none.
    pub phases: Vec<EvalPhase>,
    /// Measure the held-out diffusion-loss gain ([`crate::eval::loss_gain`]) every this many steps
    /// (and at step 0 and the last step); 0 = never. A forward pass, no sampling. Default 20.
    pub loss_gain_every: u64,
    /// Held-out images in the loss gain's fixed batch (timesteps spread evenly over them). Default 64.
    pub loss_gain_images: i64,
}

/// A window of denser fidelity measurements (see [`FidelityEvalConfig::phases`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalPhase {
    /// Last step of the window.
    pub until: u64,
    /// Measure every this many steps within it.
    pub every: u64,
}

impl Default for FidelityEvalConfig {
    fn default() -> Self {
        Self {
            every_steps: 50,
            num_images: 64,
            sampler: SamplerConfig { steps: 10, ..Default::default() },
            seed: 4321,
            phases: vec![],
            loss_gain_every: 20,
            loss_gain_images: 64,
        }
    }
}

impl FidelityEvalConfig {
    /// Whether sampled fidelity is measured after step `step` of a run of `last` steps: at 0, at
    /// `last`, every `every` steps within the first phase that has not ended, else every `every_steps`.
    pub fn fidelity_due(&self, step: u64, last: u64) -> bool {
        let every = self.phases.iter().find(|p| step <= p.until).map_or(self.every_steps, |p| p.every);
        step == 0 || step == last || step % every == 0
    }

    /// Whether the held-out loss gain is measured after step `step` of a run of `last` steps.
    pub fn loss_gain_due(&self, step: u64, last: u64) -> bool {
        self.loss_gain_every > 0 && (step == 0 || step == last || step % self.loss_gain_every == 0)
    }

    fn validate(&self) -> Result<()> {
        if self.num_images < 1 || self.every_steps == 0 {
            return Err(Error::Config("fidelity.num_images and fidelity.every_steps must be ≥ 1".into()));
        }
        if self.phases.iter().any(|p| p.every == 0) || self.phases.windows(2).any(|w| w[1].until <= w[0].until) {
            return Err(Error::Config(
                "fidelity.phases: each phase needs every ≥ 1, and their `until` steps must increase".into(),
            ));
        }
        if self.loss_gain_every > 0 && self.loss_gain_images < NUM_TIME_BUCKETS as i64 {
            return Err(Error::Config(format!(
                "fidelity.loss_gain_images must be ≥ {NUM_TIME_BUCKETS} (one per timestep bucket), got {}",
                self.loss_gain_images
            )));
        }
        Ok(())
    }
}

/// How a UNet side network's features reach the main network (see [`ControlNetConfig::cross_norm_scale`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SideConnection {
    /// diffusers' ControlNet: a zero-initialised 1×1 convolution per site.
    #[default]
    ZeroConv,
    /// ControlNeXt's cross-normalization: per example, the side feature re-centred and re-scaled to the main
    /// network's feature at the same site, added times `cross_norm_scale`; no zero convolutions.
    CrossNorm,
}

/// The class label the frozen main network is given while the side network trains and samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LabelInput {
    /// Each image's class.
    #[default]
    Class,
    /// The null label (the unconditional branch the main network learned with label dropout): the
    /// condition must then supply class as well as shape.
    Null,
}

/// The evaluation of the finished side network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinalEvalConfig {
    /// Held-out test images (their conditions are sampled; the images are the Fréchet reference). Default 500.
    pub num_images: i64,
    /// Images per sampling batch. Default 250.
    pub chunk: i64,
    /// A classifier folder written by `lisa classifier` (`--classifier`): the Fréchet distance is taken on its
    /// features, with the floor (as many training images) and the ceiling (uniform noise). Empty: the shipped
    /// Fashion-MNIST classifier on Fashion-MNIST, and no Fréchet distance on an imagefolder. Default empty.
    pub classifier: PathBuf,
}

impl Default for FinalEvalConfig {
    fn default() -> Self {
        Self { num_images: 500, chunk: 250, classifier: PathBuf::new() }
    }
}

/// `lisa compare`'s repetition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareOptions {
    /// Seeds per arm: `train.seed`, `train.seed + 1`, ... Default 3.
    pub seeds: u64,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self { seeds: 3 }
    }
}

/// Configuration of side-network training (`lisa train`) and of `lisa compare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Run folder. Default `runs/control`.
    pub output_dir: PathBuf,
    /// CPU threads for libtorch (0 = libtorch's default). Default 0.
    pub threads: i32,
    /// `auto`, `cpu`, `cuda` or `cuda:N`. Default `auto`.
    pub device: String,
    /// The frozen main network's folder (empty = the shipped one): a UNet or a transformer, ε/v-prediction
    /// or flow matching, images or clips (`data.video`). Default empty.
    pub main_network: PathBuf,
    /// The visual condition: `edges`, `mask`, `depth`, `lowres`, `skeleton` or `trajectory` (for
    /// clips: per-frame centre heatmaps); or several stacked as channels of one side network, joined
    /// by `+` (`edges+mask`; the first is the one scored while training). Default `edges`.
    pub condition: String,
    /// With `condition = "given"` (the dataset's own `conditioning_image`s): which kind of map they are
    /// (`edges`, `mask`, `depth`, `lowres` or `skeleton`), so that samples are scored by extracting that kind
    /// from them and comparing it with the given image. Required with `given`; empty otherwise. Default empty.
    pub given_kind: String,
    /// Probability that a training sample's condition (each channel of a stacked set independently) is
    /// replaced by zeros, so that the side network learns to act on any subset of its conditions.
    /// Default 0.
    pub condition_dropout: f64,
    /// Training data (conditions are extracted from its images, from their luminance when in colour; or,
    /// with `given`, read with them); the held-out set is its test split (imagefolders: `data.eval_dataset`
    /// or `data.eval_fraction`).
    pub data: DataConfig,
    /// Widths of the conditioning embedding's stages (UNet main networks). Default `[16, 32]`.
    pub conditioning_embedding_out_channels: Vec<i64>,
    /// Blocks copied into the side network when the main network is a transformer (0 = half of its
    /// blocks). Default 0.
    pub side_transformer_layers: i64,
    /// How a UNet side network's features join the main network: `zero_conv` (diffusers' ControlNet) or
    /// `cross_norm` (ControlNeXt's cross-normalization in place of every zero convolution; such a network cannot
    /// be exported to diffusers). Default `zero_conv`.
    pub side_connection: SideConnection,
    /// With `side_connection = "cross_norm"`: the scale the cross-normalized side features are added with.
    /// Default 0.35 (ControlNeXt's Stable Diffusion 1.5 training recipe).
    pub cross_norm_scale: f64,
    /// The label the main network sees: `class` or `null`. Default `class`.
    pub label: LabelInput,
    /// LISA (`lisa.enabled = false` is the baseline).
    pub lisa: LisaConfig,
    /// The training loop.
    pub train: TrainConfig,
    /// Control fidelity during training.
    pub fidelity: FidelityEvalConfig,
    /// The final evaluation.
    pub final_eval: FinalEvalConfig,
    /// `lisa compare` only.
    pub compare: CompareOptions,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/control"),
            threads: 0,
            device: "auto".into(),
            main_network: PathBuf::new(),
            condition: "edges".into(),
            given_kind: String::new(),
            condition_dropout: 0.0,
            data: DataConfig::default(),
            conditioning_embedding_out_channels: ControlNetConfig::default().conditioning_embedding_out_channels,
            side_transformer_layers: 0,
            side_connection: SideConnection::ZeroConv,
            cross_norm_scale: 0.35,
            label: LabelInput::Class,
            lisa: LisaConfig::default(),
            train: TrainConfig {
                steps: 1000,
                batch_size: 32,
                // Measured on the shipped main network: at 2e-4 the edge fidelity had not moved after 150
                // steps; at 1e-3 it rose from 0.69 to 0.85.
                learning_rate: 1e-3,
                lr_warmup_steps: 0,
                checkpointing_steps: 250,
                checkpoints_total_limit: 2,
                ..TrainConfig::default()
            },
            fidelity: FidelityEvalConfig::default(),
            final_eval: FinalEvalConfig::default(),
            compare: CompareOptions::default(),
        }
    }
}

impl ControlConfig {
    /// The main network folder (the shipped one when unset).
    pub fn main_network_dir(&self) -> PathBuf {
        if self.main_network.as_os_str().is_empty() {
            shipped_main_network()
        } else {
            self.main_network.clone()
        }
    }

    /// The main network as configured, for reports: its folder as given, or `assets/main-network` (the
    /// shipped one) when none is (never this machine's absolute path).
    pub fn main_network_name(&self) -> String {
        if self.main_network.as_os_str().is_empty() {
            "assets/main-network".into()
        } else {
            self.main_network.display().to_string()
        }
    }

    /// The ControlNet of a UNet main network `unet` for a condition of `conditioning_channels` channels, as
    /// configured (conditioning embedding, side connection).
    pub fn controlnet_config(&self, unet: &UNetConfig, conditioning_channels: i64) -> ControlNetConfig {
        ControlNetConfig {
            conditioning_channels,
            conditioning_embedding_out_channels: self.conditioning_embedding_out_channels.clone(),
            cross_norm_scale: match self.side_connection {
                SideConnection::ZeroConv => None,
                SideConnection::CrossNorm => Some(self.cross_norm_scale),
            },
            ..ControlNetConfig::for_unet(unet)
        }
    }

    /// The condition(s) the side network is fed.
    pub fn condition_set(&self) -> Result<ConditionSet> {
        self.condition.parse()
    }

    /// The kind samples are scored as: the condition's (the first of a stacked set), or for `given` the
    /// kind `given_kind` names.
    pub fn scored_kind(&self) -> Result<ConditionKind> {
        let primary = self.condition_set()?.primary();
        if primary != ConditionKind::Given {
            return Ok(primary);
        }
        ConditionKind::ALL.into_iter().find(|k| k.name() == self.given_kind).ok_or_else(|| {
            Error::Config(format!(
                "condition = \"given\" needs given_kind, the kind of map the conditioning images are (edges, mask, \
                 depth, lowres or skeleton; got {:?}), to score samples; e.g. --set given_kind=\"edges\"",
                self.given_kind
            ))
        })
    }

    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        let set = self.condition_set()?;
        if set.kinds().contains(&ConditionKind::Given) {
            if set.len() > 1 {
                return Err(Error::Config(format!(
                    "condition {set}: given conditions cannot be stacked with extracted ones; use condition = \"given\""
                )));
            }
        } else if !self.given_kind.is_empty() {
            return Err(Error::Config(format!(
                "given_kind applies only to condition = \"given\" (the condition is {set}); remove it"
            )));
        }
        let colour = self.data.is_imagefolder() && self.data.channels == 3 && self.data.video.is_none();
        if colour && set.len() > 1 && set.kinds().contains(&ConditionKind::LowRes) {
            return Err(Error::Config(format!(
                "condition {set}: on colour images lowres keeps the colour (3 channels) and cannot be stacked with \
                 other conditions; train lowres on its own, or set data.channels = 1"
            )));
        }
        self.scored_kind()?;
        self.data.validate()?;
        if !(0.0..1.0).contains(&self.condition_dropout) {
            return Err(Error::Config(format!(
                "condition_dropout must be in [0, 1) (a probability), got {}",
                self.condition_dropout
            )));
        }
        self.lisa.validate()?;
        self.train.validate()?;
        if self.train.ema_decay != 0.0 {
            return Err(Error::Config("train.ema_decay: side networks are trained without EMA; set it to 0".into()));
        }
        self.fidelity.validate()?;
        if self.final_eval.num_images < 2 || self.final_eval.chunk < 1 {
            return Err(Error::Config("final_eval.num_images must be ≥ 2 and final_eval.chunk ≥ 1".into()));
        }
        Ok(())
    }

    /// A short name of the arm: `lisa` or `baseline`.
    pub fn arm(&self) -> &'static str {
        self.lisa.arm()
    }

    /// The labels the main network is given for examples of classes `labels` (see [`LabelInput`]).
    pub fn main_labels(&self, main: &MainNetwork, labels: &Tensor) -> Result<Tensor> {
        match self.label {
            LabelInput::Class => Ok(labels.shallow_clone()),
            LabelInput::Null => main.label_encoder.null_labels(labels.size()[0], labels.device()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tch::Device;

    use super::*;

    #[test]
    fn the_classifier_and_condition_channels_can_be_set_like_every_key() {
        let sets = ["final_eval.classifier=\"runs/c\"".to_string(), "data.conditioning_channels=3".to_string()];
        let cfg: ControlConfig = crate::config::load(None, &sets).unwrap();
        assert_eq!(cfg.final_eval.classifier, Path::new("runs/c"));
        assert_eq!(cfg.data.conditioning_channels, 3);
    }

    #[test]
    fn evaluations_follow_their_phases_then_every_steps() {
        let f = FidelityEvalConfig {
            every_steps: 100,
            phases: vec![EvalPhase { until: 50, every: 10 }, EvalPhase { until: 200, every: 25 }],
            loss_gain_every: 7,
            ..Default::default()
        };
        let due: Vec<u64> = (0..=330).filter(|&s| f.fidelity_due(s, 330)).collect();
        assert_eq!(due, vec![0, 10, 20, 30, 40, 50, 75, 100, 125, 150, 175, 200, 300, 330]);
        let gain: Vec<u64> = (0..=30).filter(|&s| f.loss_gain_due(s, 30)).collect();
        assert_eq!(gain, vec![0, 7, 14, 21, 28, 30]);
        assert!(!FidelityEvalConfig { loss_gain_every: 0, ..f.clone() }.loss_gain_due(0, 30), "0 = never");
        f.validate().unwrap();
        let unordered = FidelityEvalConfig { phases: vec![EvalPhase { until: 50, every: 10 }; 2], ..f.clone() };
        assert!(unordered.validate().unwrap_err().to_string().contains("must increase"));
        let few = FidelityEvalConfig { loss_gain_images: 5, ..f };
        assert!(few.validate().unwrap_err().to_string().contains("loss_gain_images"));
    }

    #[test]
    fn the_null_label_replaces_every_class_and_parses_from_toml() {
        let cfg: ControlConfig =
            crate::config::from_text(Some(("label = \"null\"\n", Path::new("x.toml"))), &[]).unwrap();
        assert_eq!(cfg.label, LabelInput::Null);
        let main = MainNetwork::load(&cfg.main_network_dir(), Device::Cpu).unwrap();
        let y = Tensor::from_slice(&[0i64, 3, 9]);
        assert_eq!(Vec::<i64>::try_from(cfg.main_labels(&main, &y).unwrap()).unwrap(), vec![10, 10, 10]);
        let class = ControlConfig::default();
        assert_eq!(Vec::<i64>::try_from(class.main_labels(&main, &y).unwrap()).unwrap(), vec![0, 3, 9]);
    }

    /// The configuration a committed run folder ran with, with what differs between runs of one operating
    /// point (output folder, seed, number of seeds) set as in `other`.
    fn as_point_of(mut ran: ControlConfig, other: &ControlConfig) -> ControlConfig {
        ran.output_dir = other.output_dir.clone();
        ran.train.seed = other.train.seed;
        ran.compare.seeds = other.compare.seeds;
        ran
    }

    #[test]
    fn every_committed_operating_point_is_a_config_file_that_gives_the_configuration_it_ran_with() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        // (configuration file, a committed run folder whose config.toml it must reproduce).
        let mut points: Vec<(String, String)> = [
            "converge-edges",
            "converge-edges-null",
            "converge-edges-mid",
            "converge-edges-down5",
            "converge-skeleton",
            "converge-mask",
            "converge-edges-3e-5",
        ]
        .iter()
        .map(|n| (format!("configs/{n}.toml"), format!("docs/results/{n}")))
        .collect();
        for lr in ["1e-3", "3e-4"] {
            points.push((format!("configs/lr-sweep/lr-{lr}.toml"), format!("docs/results/lr-sweep/lr-{lr}")));
        }
        // Control arms, once collected (seed 0 of each).
        for entry in std::fs::read_dir(root.join("configs/controls")).unwrap().filter_map(|e| e.ok()) {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(control) = file.strip_prefix("converge-edges-3e-5-").and_then(|f| f.strip_suffix(".toml")) else {
                continue;
            };
            let run = format!("docs/results/converge-edges-3e-5-controls/seed-0/{control}");
            if root.join(&run).join("config.toml").is_file() {
                points.push((format!("configs/controls/{file}"), run));
            }
        }
        assert!(points.len() >= 9);
        for (config, run) in points {
            let mut cfg: ControlConfig = crate::config::load(Some(&root.join(&config)), &[]).unwrap();
            let ran: ControlConfig = crate::config::load(Some(&root.join(&run).join("config.toml")), &[]).unwrap();
            // A baseline-only run (the sweep's, a learning-rate control) was trained with `--baseline`.
            cfg.lisa.enabled = ran.lisa.enabled;
            assert_eq!(as_point_of(ran, &cfg), cfg, "{config} does not give the configuration {run} ran with");
        }
    }

    #[test]
    fn the_side_connection_is_a_key_that_reaches_the_controlnet_config() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let unet = UNetConfig::tiny();
        let point = root.join("configs/converge-edges-3e-5.toml");
        let zero: ControlConfig = crate::config::load(Some(&point), &[]).unwrap();
        assert_eq!(zero.controlnet_config(&unet, 1).cross_norm_scale, None);
        let file = root.join("configs/controls/converge-edges-3e-5-crossnorm-lisa.toml");
        let cn: ControlConfig = crate::config::load(Some(&file), &[]).unwrap();
        assert_eq!(cn.controlnet_config(&unet, 1).cross_norm_scale, Some(0.35));
        assert!(cn.lisa.enabled);
        let set = ["cross_norm_scale=0.1".to_string()];
        let cn: ControlConfig = crate::config::load(Some(&file), &set).unwrap();
        assert_eq!(cn.controlnet_config(&unet, 1).cross_norm_scale, Some(0.1));
        // Everything else is the point's own configuration.
        let mut back = cn.clone();
        back.side_connection = SideConnection::ZeroConv;
        back.cross_norm_scale = zero.cross_norm_scale;
        assert_eq!(back, zero);
        let bad = ["side_connection=\"cross-norm\"".to_string()];
        let e = crate::config::load::<ControlConfig>(Some(&file), &bad).unwrap_err().to_string();
        assert!(e.contains("side_connection") || e.contains("cross_norm"), "{e}");
    }
}
