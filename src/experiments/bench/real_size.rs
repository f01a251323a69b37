//! `lisa bench --real-size`: one ControlNet training step at a real model's size — the UNet of a published
//! config (`configs/real-size/`, SD1.5 by default) with random weights, frozen, and the ControlNet diffusers'
//! `from_unet` makes of it — at 64×64 latents, batch 1: the baseline and LISA (shared encoder), each with and
//! without activation recomputation, and with the frozen UNet held in bf16 under bf16 autocast (diffusers'
//! `weight_dtype` with `--mixed_precision bf16`) where the CPU has bf16 units or `--bf16` asks. Each variant runs
//! in a process of its own (this binary again), so that its peak resident set size is its own; the step is the
//! trainer's own [`crate::train::step::train_step`]. Beside each, the same variant of diffusers' step
//! (`bench/reference.py --real-size-variant`: `train_controlnet.py`'s step, the authors' LISA with its full second
//! UNet forward) runs in its own process, one after the other, so that the two never share the cores.
//!
//! The text encoder's states are stood in for by the main network's label table (77 tokens of the UNet's
//! cross-attention width, as CLIP gives): a lookup, so the step's cost is the UNet's and the ControlNet's.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::reference::ReferenceCommand;
use super::report::{peak_rss_kib, TimingStats};
use super::step::{loss_scaler_for, ours_step};
use crate::control::{ControlTask, LisaConfig, LisaHead, SideNetwork};
use crate::data::conditions::ConditionKind;
use crate::diffusion::ObjectiveConfig;
use crate::models::diffusers::{read_json, unet_config_from_json};
use crate::models::precision::MixedPrecision;
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
    /// `cpu` (the default), `cuda` or `cuda:N`. On a GPU each step ends with a device synchronisation, and the
    /// peak RSS is the host's only (`scripts/gpu-check.sh` samples the GPU's memory beside it).
    #[serde(default = "cpu")]
    pub device: String,
}

fn cpu() -> String {
    "cpu".into()
}

/// One variant of the real-size step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealSizeVariant {
    /// With the LISA term (shared-encoder reference pass, the authors' hook and decoder).
    pub lisa: bool,
    /// With activation recomputation of the side network (`train.gradient_checkpointing`).
    pub recompute: bool,
    /// The frozen UNet held in bf16 and the step under bf16 autocast (`train.mixed_precision = "bf16"`).
    pub bf16: bool,
}

impl RealSizeVariant {
    /// Every variant, in table order: f32 first, then bf16.
    pub const ALL: [RealSizeVariant; 8] = [
        Self::new(false, false, false),
        Self::new(false, true, false),
        Self::new(true, false, false),
        Self::new(true, true, false),
        Self::new(false, false, true),
        Self::new(false, true, true),
        Self::new(true, false, true),
        Self::new(true, true, true),
    ];

    const fn new(lisa: bool, recompute: bool, bf16: bool) -> Self {
        Self { lisa, recompute, bf16 }
    }

    /// Its name on the command line and in the table: `baseline` or `lisa`, then `-recompute`, then `-bf16`
    /// (the reference script takes the same names).
    pub fn name(self) -> String {
        let mut s = String::from(if self.lisa { "lisa" } else { "baseline" });
        if self.recompute {
            s += "-recompute";
        }
        if self.bf16 {
            s += "-bf16";
        }
        s
    }

    /// The variant named `name`.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| {
            let names: Vec<String> = Self::ALL.iter().map(|v| v.name()).collect();
            Error::Config(format!("unknown real-size variant {name:?}; use one of {}", names.join(", ")))
        })
    }

    /// The mixed precision its step runs under.
    pub fn precision(self) -> MixedPrecision {
        if self.bf16 {
            MixedPrecision::Bf16
        } else {
            MixedPrecision::No
        }
    }
}

/// Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX): without it bf16 kernels are emulated and the
/// bf16 variants' times say nothing about a machine one would train on (their peak RSS still does).
pub fn cpu_has_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("flags")).any(|l| l.contains(" avx512_bf16") || l.contains(" amx_bf16")))
        .unwrap_or(false)
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

/// The reference's run of one variant, or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRun {
    /// What it measured.
    pub result: Option<RealSizeResult>,
    /// Why it did not run (no Python, `--no-reference`) or did not finish.
    pub reason: Option<String>,
}

/// The real-size benchmark's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealSizeReport {
    /// The settings.
    pub config: RealSizeConfig,
    /// Ours, one row per variant.
    pub results: Vec<RealSizeResult>,
    /// diffusers', one per row of `results`.
    pub reference: Vec<ReferenceRun>,
}

impl RealSizeReport {
    /// The table (Markdown): per variant ours and diffusers' median step and peak RSS, ours over theirs, and
    /// each of ours over our baseline.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "Real-size ControlNet step: UNet from {} (random weights, frozen), {}×{} latents, batch {}, {} threads, \
             {} timed steps after {} warm-up, on {}; each variant of ours and of diffusers in a process of its own, one \
             after the other\n\n| variant | ours: median step (min – max) | diffusers | ours / diffusers | ours: peak \
             RSS | diffusers | ours / diffusers | ours / our baseline: time, RSS |\n|---|---|---|---|---|---|---|---|\n",
            c.unet_config.display(),
            c.latent_size,
            c.latent_size,
            c.batch,
            c.threads,
            c.reps,
            c.warmup,
            c.device
        );
        let base = self.results.iter().find(|r| r.variant == "baseline");
        let gib = |k: Option<u64>| k.map_or("—".into(), |k| format!("{:.2} GiB", k as f64 / (1u64 << 20) as f64));
        let time = |r: &RealSizeResult| format!("{:.2} s ({:.2} – {:.2})", r.stats.median_s, r.stats.min_s, r.stats.max_s);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "—".into(),
        };
        let rss = |r: Option<&RealSizeResult>| r.and_then(|r| r.peak_rss_kib).map(|k| k as f64);
        for (i, r) in self.results.iter().enumerate() {
            let reference = self.reference.get(i).and_then(|x| x.result.as_ref());
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {}, {} |\n",
                r.variant,
                time(r),
                reference.map_or("—".into(), time),
                ratio(Some(r.stats.median_s), reference.map(|x| x.stats.median_s)),
                gib(r.peak_rss_kib),
                gib(reference.and_then(|x| x.peak_rss_kib)),
                ratio(rss(Some(r)), rss(reference)),
                ratio(Some(r.stats.median_s), base.map(|b| b.stats.median_s)),
                ratio(rss(Some(r)), rss(base)),
            );
        }
        if let Some(r) = self.results.first() {
            s += &format!("\nUNet {} parameters, ControlNet {}.\n", r.unet_parameters, r.controlnet_parameters);
        }
        let mut reasons: Vec<&str> = self.reference.iter().filter_map(|x| x.reason.as_deref()).collect();
        reasons.dedup();
        for reason in reasons {
            s += &format!("\ndiffusers: {reason}\n");
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
    let device = super::super::pretrain::device_from(&cfg.device)?;
    let mut main = MainNetwork::new(&main_cfg, device)?;
    main.freeze();
    let mut side = SideNetwork::from_main(&main, ConditionKind::Given, ControlNetConfig::diffusers_from_unet(&unet))?;
    side.set_gradient_checkpointing(variant.recompute)?;
    main.set_gradient_checkpointing(variant.recompute)?;
    let head = if variant.lisa { Some(LisaHead::new(&main, &side, &LisaConfig::default())?) } else { None };
    main.hold_weights_in(variant.precision())?;
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
    let settings = StepSettings { max_grad_norm: 1.0, mixed_precision: variant.precision() };
    let mut scaler = loss_scaler_for(settings);
    let (n, s) = (cfg.batch, cfg.latent_size);
    let mut times = Vec::new();
    for step in 0..cfg.warmup + cfg.reps {
        let batch = Batch {
            x0: Tensor::rand([n, unet.in_channels, s, s], (Kind::Float, device)) * 2.0 - 1.0,
            labels: Tensor::zeros([n], (Kind::Int64, device)),
            condition: Some(Tensor::rand([n, 3, 8 * s, 8 * s], (Kind::Float, device))),
            rows: None,
        };
        let t0 = std::time::Instant::now();
        ours_step(&task, &mut opt, &main.objective, &batch, cfg.seed, step as u64, 1e-5, settings, scaler.as_mut())?;
        // The optimizer's kernels may still be queued on a GPU: the step ends when they have run.
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let dt = t0.elapsed().as_secs_f64();
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

/// The variants a run steps: the f32 ones, and the bf16 ones with `bf16`.
pub fn variants(bf16: bool) -> Vec<RealSizeVariant> {
    RealSizeVariant::ALL.into_iter().filter(|v| bf16 || !v.bf16).collect()
}

/// The arguments that give a child the run's settings (ours and the reference's take the same).
fn shared_args(cfg: &RealSizeConfig) -> Vec<String> {
    let mut a = vec!["--unet-config".to_string(), cfg.unet_config.display().to_string()];
    for (k, v) in [
        ("--latent-size", cfg.latent_size.to_string()),
        ("--batch", cfg.batch.to_string()),
        ("--threads", cfg.threads.to_string()),
        ("--warmup", cfg.warmup.to_string()),
        ("--reps", cfg.reps.to_string()),
        ("--seed", cfg.seed.to_string()),
        ("--device", cfg.device.clone()),
    ] {
        a.extend([k.to_string(), v]);
    }
    a
}

/// Runs `cmd` to its end and reads the result from the last JSON line of its stdout. Its stderr is shown as it
/// goes, or with `quiet_stderr` kept and its last lines put in the error.
fn run_child(mut cmd: Command, what: &str, quiet_stderr: bool) -> std::result::Result<RealSizeResult, String> {
    let stderr = if quiet_stderr { std::process::Stdio::piped() } else { std::process::Stdio::inherit() };
    let out = cmd
        .env("GLIBC_TUNABLES", crate::allocator::glibc_tunables_for_children())
        .stderr(stderr)
        .output()
        .map_err(|e| format!("{what} could not start: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!("{what} failed ({}): {} {}", out.status, text.trim(), tail.join(" / ")));
    }
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("{what} printed no result ({e}): {}", text.trim()))
}

/// Runs each of `variants` in a child process `exe bench --real-size-variant NAME` with the same settings and,
/// with a `reference`, the same variant of diffusers' step after it; one process at a time.
pub fn bench_real_size(
    cfg: &RealSizeConfig,
    variants: &[RealSizeVariant],
    exe: &Path,
    reference: Option<&ReferenceCommand>,
    log: &mut dyn FnMut(&str),
) -> Result<RealSizeReport> {
    const SETUP: &str = "create the project venv with scripts/setup-reference.sh, or pass --python";
    let mut unavailable = match reference {
        None => Some("not run (--no-reference)".to_string()),
        Some(r) if !r.python.is_file() => Some(format!("no Python at {} ({SETUP})", r.python.display())),
        Some(r) if !r.script.is_file() => Some(format!("no reference script at {}", r.script.display())),
        Some(_) => None,
    };
    let (mut results, mut references) = (Vec::new(), Vec::new());
    for &variant in variants {
        let name = variant.name();
        log(&format!("== {name}"));
        let mut ours = Command::new(exe);
        ours.args(["bench", "--real-size-variant", &name]).args(shared_args(cfg));
        results.push(run_child(ours, &format!("the {name} variant"), false).map_err(Error::Training)?);
        let run = match (&unavailable, reference) {
            (None, Some(r)) => {
                log(&format!("== {name} (diffusers)"));
                let mut theirs = Command::new(&r.python);
                theirs.arg(&r.script).args(["--real-size-variant", &name]).args(shared_args(cfg));
                match run_child(theirs, &format!("diffusers' {name} step"), true) {
                    Ok(result) => ReferenceRun { result: Some(result), reason: None },
                    Err(e) => {
                        log(&e);
                        // A reference that cannot start or import its packages will not for the next variant either.
                        if e.contains("could not start") || e.contains("No module named") {
                            unavailable = Some(format!("{e} ({SETUP})"));
                        }
                        ReferenceRun { result: None, reason: Some(e) }
                    }
                }
            }
            _ => ReferenceRun { result: None, reason: unavailable.clone() },
        };
        references.push(run);
    }
    // Committed results name the config inside the project, not the machine they ran on.
    let config = RealSizeConfig { unet_config: crate::pipeline::report_path(&cfg.unet_config).into(), ..cfg.clone() };
    Ok(RealSizeReport { config, results, reference: references })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_and_the_table_compares_with_the_baseline() {
        for v in RealSizeVariant::ALL {
            assert_eq!(RealSizeVariant::parse(&v.name()).unwrap(), v);
        }
        assert!(RealSizeVariant::parse("fast").unwrap_err().to_string().contains("lisa-recompute-bf16"));
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
                device: "cpu".into(),
            },
            results: vec![row("baseline", 10.0, 8), row("baseline-recompute", 12.5, 6)],
            reference: vec![
                ReferenceRun { result: Some(row("baseline", 20.0, 10)), reason: None },
                ReferenceRun { result: None, reason: Some("diffusers' baseline-recompute step failed".into()) },
            ],
        };
        let t = report.table();
        assert!(
            t.contains("| baseline | 10.00 s (10.00 – 10.00) | 20.00 s (20.00 – 20.00) | 0.50 | 8.00 GiB | 10.00 GiB | 0.80 | 1.00, 1.00 |"),
            "{t}"
        );
        assert!(t.contains("| baseline-recompute | 12.50 s (12.50 – 12.50) | — | — | 6.00 GiB | — | — | 1.25, 0.75 |"), "{t}");
        assert!(t.contains("diffusers: diffusers' baseline-recompute step failed"), "{t}");
        assert_eq!(variants(false).len(), 4);
        assert!(variants(true).iter().any(|v| v.name() == "lisa-recompute-bf16"));
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
        let cfg = RealSizeConfig {
            unet_config: path,
            latent_size: 8,
            batch: 1,
            threads: 1,
            warmup: 0,
            reps: 1,
            seed: 0,
            device: "cpu".into(),
        };
        for v in [
            RealSizeVariant { lisa: true, recompute: cfg!(lisa_checkpoint), bf16: false },
            RealSizeVariant { lisa: true, recompute: false, bf16: true },
        ] {
            let r = run_variant(&cfg, v, &mut |_| {}).unwrap();
            assert_eq!(r.stats.times_s.len(), 1);
            assert!(r.controlnet_parameters > 0 && r.unet_parameters > r.controlnet_parameters / 2, "{r:?}");
        }
    }
}
