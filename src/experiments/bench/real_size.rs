//! `lisa bench --real-size`: one ControlNet training step at a real model's size — the UNet of a published
//! config (`configs/real-size/`, SD1.5 by default) with random weights, frozen, and the ControlNet diffusers'
//! `from_unet` makes of it — at 64×64 latents, batch 1: the baseline and LISA (shared encoder), each with and
//! without activation recomputation. Each variant runs in a process of its own (this binary again), so that
//! its peak resident set size is its own; the step is the trainer's own [`crate::train::step::train_step`].
//!
//! The text encoder's states are stood in for by the main network's label table (77 tokens of the UNet's
//! cross-attention width, as CLIP gives): a lookup, so the step's cost is the UNet's and the ControlNet's.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::report::{peak_rss_kib, TimingStats};
use super::step::{loss_scaler_for, ours_step};
use crate::control::{ControlTask, LisaConfig, LisaHead, SideNetwork};
use crate::data::conditions::ConditionKind;
use crate::diffusion::ObjectiveConfig;
use crate::models::diffusers::{read_json, unet_config_from_json};
use crate::models::{ControlNetConfig, LabelEncoderConfig};
use crate::pipeline::{MainNetwork, MainNetworkConfig};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::step::{Batch, StepSettings};
use crate::{Error, Result};

/// The UNet config `lisa bench --real-size` steps by default (relative to the repository).
pub const DEFAULT_UNET_CONFIG: &str = "configs/real-size/stable-diffusion-v1-5-unet.json";

/// Settings of the real-size benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealSizeConfig {
    /// A diffusers `UNet2DConditionModel` `config.json`.
    pub unet_config: PathBuf,
    /// Latent side (64 = 512-pixel images for SD1.5).
    pub latent_size: i64,
    /// Examples per step.
    pub batch: i64,
    /// libtorch CPU threads.
    pub threads: i32,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub reps: usize,
    /// Seed of initialisation and inputs.
    pub seed: u64,
}

/// One variant of the real-size step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealSizeVariant {
    /// With the LISA term (shared-encoder reference pass, the authors' hook and decoder).
    pub lisa: bool,
    /// With activation recomputation of the side network (`train.gradient_checkpointing`).
    pub recompute: bool,
}

impl RealSizeVariant {
    /// Every variant, in table order.
    pub const ALL: [RealSizeVariant; 4] = [
        RealSizeVariant { lisa: false, recompute: false },
        RealSizeVariant { lisa: false, recompute: true },
        RealSizeVariant { lisa: true, recompute: false },
        RealSizeVariant { lisa: true, recompute: true },
    ];

    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match (self.lisa, self.recompute) {
            (false, false) => "baseline",
            (false, true) => "baseline-recompute",
            (true, false) => "lisa",
            (true, true) => "lisa-recompute",
        }
    }

    /// The variant named `name`.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
            Error::Config(format!("unknown real-size variant {name:?}; use one of {}", names.join(", ")))
        })
    }
}

/// What one variant measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealSizeResult {
    /// The variant's name.
    pub variant: String,
    /// Parameters of the frozen UNet.
    pub unet_parameters: i64,
    /// Trainable parameters of the ControlNet.
    pub controlnet_parameters: i64,
    /// Step times, seconds.
    pub stats: TimingStats,
    /// Peak resident set size of its process, KiB (weights, AdamW moments and activations together).
    pub peak_rss_kib: Option<u64>,
}

/// The real-size benchmark's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealSizeReport {
    /// The settings.
    pub config: RealSizeConfig,
    /// One row per variant.
    pub results: Vec<RealSizeResult>,
}

impl RealSizeReport {
    /// The table (Markdown), with each variant's time and peak RSS over the baseline's.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "Real-size ControlNet step: UNet from {} (random weights, frozen), {}×{} latents, batch {}, {} threads, \
             {} timed steps after {} warm-up\n\n| variant | median step | min – max | peak RSS | time / baseline | \
             peak RSS / baseline |\n|---|---|---|---|---|---|\n",
            c.unet_config.display(),
            c.latent_size,
            c.latent_size,
            c.batch,
            c.threads,
            c.reps,
            c.warmup
        );
        let base = self.results.iter().find(|r| r.variant == "baseline");
        let gib = |k: Option<u64>| k.map_or("—".into(), |k| format!("{:.2} GiB", k as f64 / (1u64 << 20) as f64));
        for r in &self.results {
            let time = base.map_or("—".into(), |b| format!("{:.2}", r.stats.median_s / b.stats.median_s));
            let rss = match (base.and_then(|b| b.peak_rss_kib), r.peak_rss_kib) {
                (Some(b), Some(x)) => format!("{:.2}", x as f64 / b as f64),
                _ => "—".into(),
            };
            s += &format!(
                "| {} | {:.2} s | {:.2} – {:.2} s | {} | {time} | {rss} |\n",
                r.variant,
                r.stats.median_s,
                r.stats.min_s,
                r.stats.max_s,
                gib(r.peak_rss_kib)
            );
        }
        if let Some(r) = self.results.first() {
            s += &format!("\nUNet {} parameters, ControlNet {}.\n", r.unet_parameters, r.controlnet_parameters);
        }
        s
    }
}

/// Runs one variant in this process (what each child of [`bench_real_size`] does).
pub fn run_variant(cfg: &RealSizeConfig, variant: RealSizeVariant, log: &mut dyn FnMut(&str)) -> Result<RealSizeResult> {
    if cfg.batch < 1 || cfg.latent_size < 8 || cfg.reps < 1 || cfg.threads < 1 {
        return Err(Error::Config("bench --real-size: batch, reps and threads must be ≥ 1, the latent size ≥ 8".into()));
    }
    tch::set_num_threads(cfg.threads);
    crate::allocator::keep_freed_memory_for_reuse();
    let json = read_json(&cfg.unet_config)?;
    let object = json.as_object().ok_or_else(|| Error::format(&cfg.unet_config, "not a JSON object"))?;
    let unet = unet_config_from_json(object, &cfg.unet_config)?;
    tch::manual_seed(cfg.seed as i64);
    log(&format!("{}: building the UNet and the ControlNet", variant.name()));
    let main_cfg = MainNetworkConfig {
        unet: unet.clone(),
        label_encoder: LabelEncoderConfig { num_classes: 1, num_tokens: 77 },
        objective: ObjectiveConfig::default(),
        ..Default::default()
    };
    let mut main = MainNetwork::new(&main_cfg, Device::Cpu)?;
    main.freeze();
    let mut side = SideNetwork::from_main(&main, ConditionKind::Given, ControlNetConfig::diffusers_from_unet(&unet))?;
    side.set_gradient_checkpointing(variant.recompute)?;
    let head = if variant.lisa { Some(LisaHead::new(&main, &side, &LisaConfig::default())?) } else { None };
    let task = ControlTask::new(&main, &side, head.as_ref())?;
    let mut params = side.named_parameters();
    let controlnet_parameters: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
    if let Some(h) = &head {
        params.extend(h.named_parameters());
    }
    // Everything of the main network but the label table that stands in for the text encoder.
    let unet_parameters: i64 =
        main.named_parameters().iter().filter(|(k, _)| !k.starts_with("label_encoder")).map(|(_, p)| p.numel() as i64).sum();
    let mut opt = AdamW::new(params, AdamWConfig::default());
    let settings = StepSettings { max_grad_norm: 1.0, mixed_precision: Default::default() };
    let mut scaler = loss_scaler_for(settings);
    let (n, s) = (cfg.batch, cfg.latent_size);
    let mut times = Vec::new();
    for step in 0..cfg.warmup + cfg.reps {
        let batch = Batch {
            x0: Tensor::rand([n, unet.in_channels, s, s], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
            labels: Tensor::zeros([n], (Kind::Int64, Device::Cpu)),
            condition: Some(Tensor::rand([n, 3, 8 * s, 8 * s], (Kind::Float, Device::Cpu))),
            rows: None,
        };
        let dt = ours_step(&task, &mut opt, &main.objective, &batch, cfg.seed, step as u64, 1e-5, settings, scaler.as_mut())?;
        log(&format!("{}: step {} {:.2} s{}", variant.name(), step + 1, dt, if step < cfg.warmup { " (warm-up)" } else { "" }));
        if step >= cfg.warmup {
            times.push(dt);
        }
    }
    Ok(RealSizeResult {
        variant: variant.name().into(),
        unet_parameters,
        controlnet_parameters,
        stats: TimingStats::from_times(times),
        peak_rss_kib: peak_rss_kib(),
    })
}

/// Runs every variant, each in a child process `exe bench --real-size-variant NAME` with the same settings,
/// one after another, and collects their results.
pub fn bench_real_size(cfg: &RealSizeConfig, exe: &Path, log: &mut dyn FnMut(&str)) -> Result<RealSizeReport> {
    let mut results = Vec::new();
    for variant in RealSizeVariant::ALL {
        log(&format!("== {}", variant.name()));
        let out = Command::new(exe)
            .args(["bench", "--real-size-variant", variant.name(), "--unet-config"])
            .arg(&cfg.unet_config)
            .args(["--latent-size", &cfg.latent_size.to_string(), "--batch", &cfg.batch.to_string()])
            .args(["--threads", &cfg.threads.to_string(), "--warmup", &cfg.warmup.to_string()])
            .args(["--reps", &cfg.reps.to_string(), "--seed", &cfg.seed.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| Error::io(exe, e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(Error::Training(format!("the {} variant failed ({}): {text}", variant.name(), out.status)));
        }
        let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
        let result: RealSizeResult = serde_json::from_str(line).map_err(|e| {
            Error::Training(format!("the {} variant printed no result ({e}): {text}", variant.name()))
        })?;
        results.push(result);
    }
    // Committed results name the config inside the project, not the machine they ran on.
    let config = RealSizeConfig { unet_config: crate::pipeline::report_path(&cfg.unet_config).into(), ..cfg.clone() };
    Ok(RealSizeReport { config, results })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_and_the_table_compares_with_the_baseline() {
        for v in RealSizeVariant::ALL {
            assert_eq!(RealSizeVariant::parse(v.name()).unwrap(), v);
        }
        assert!(RealSizeVariant::parse("fast").unwrap_err().to_string().contains("lisa-recompute"));
        let row = |variant: &str, t: f64, rss: u64| RealSizeResult {
            variant: variant.into(),
            unet_parameters: 10,
            controlnet_parameters: 4,
            stats: TimingStats::from_times(vec![t]),
            peak_rss_kib: Some(rss << 20),
        };
        let report = RealSizeReport {
            config: RealSizeConfig {
                unet_config: DEFAULT_UNET_CONFIG.into(),
                latent_size: 64,
                batch: 1,
                threads: 2,
                warmup: 1,
                reps: 2,
                seed: 0,
            },
            results: vec![row("baseline", 10.0, 8), row("baseline-recompute", 12.5, 6)],
        };
        let t = report.table();
        assert!(t.contains("| baseline-recompute | 12.50 s | 12.50 – 12.50 s | 6.00 GiB | 1.25 | 0.75 |"), "{t}");
        assert!(t.contains("| baseline | 10.00 s | 10.00 – 10.00 s | 8.00 GiB | 1.00 | 1.00 |"), "{t}");
    }

    /// The whole variant on a tiny config: it builds, steps, and measures.
    #[test]
    fn a_variant_steps_on_a_tiny_unet_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let tiny = serde_json::json!({
            "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16, "attention_head_dim": 2
        });
        std::fs::write(&path, tiny.to_string()).unwrap();
        let cfg = RealSizeConfig { unet_config: path, latent_size: 8, batch: 1, threads: 1, warmup: 0, reps: 1, seed: 0 };
        for v in [RealSizeVariant { lisa: true, recompute: cfg!(lisa_checkpoint) }] {
            let r = run_variant(&cfg, v, &mut |_| {}).unwrap();
            assert_eq!(r.stats.times_s.len(), 1);
            assert!(r.controlnet_parameters > 0 && r.unet_parameters > r.controlnet_parameters / 2, "{r:?}");
        }
    }
}
