//! `lisa bench`: wall time of FULL side-network training steps (noise and timesteps, forward,
//! backward, gradient clipping, AdamW update, zero_grad) on the frozen main network, for our
//! baseline, our LISA with the shared-encoder reference pass and our LISA with a full second forward,
//! next to the authors' step in PyTorch + diffusers (`bench/reference.py --bench --serve`, driven one
//! step at a time over a pipe so that its steps interleave with ours).
//!
//! Inputs are random tensors of the right shapes, as the reference draws them: `x0 ~ U(-1, 1)`, the
//! (edges) condition `c ~ U(0, 1)`, labels uniform over the classes; the step's cost does not depend
//! on their values. Alongside the times: samples per second, each process's peak RSS, the machine's
//! measured GEMM rate and the step's achieved FLOP rate from FLOPs counted on the layers' shapes
//! (see [`StepFlops`]). On the shipped main network at batch 2 that count came within 1.5% of
//! `torch.utils.flop_counter.FlopCounterMode` on the reference's baseline and LISA steps (forward and backward).
//!
//! The folder: [`step`] holds the variants and one timed step of ours, [`reference`] the reference's child
//! process and its protocol, [`report`] the statistics and the table, [`sampling`] the sampling bench and
//! [`arm_cost`] the step cost of each arm of one operating point.
use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

pub mod arm_cost;
pub mod real_size;
pub mod reference;
pub mod report;
pub mod sampling;
pub mod step;

pub use reference::*;
pub use report::*;
pub use sampling::*;
pub use step::*;

use crate::control::{ControlTask, LisaConfig, LisaHead, ReferencePass, SideNetwork};
use crate::data::conditions::ConditionKind;
use crate::experiments::control_config::ControlConfig;
use crate::eval::flops::{shapes, FlopContext, StepFlops, FLOP_NOTE};
use crate::models::ControlNetConfig;
use crate::pipeline::MainNetwork;
use crate::train::loss_scaler::LossScaler;
use crate::train::optim::AdamW;
use crate::train::step::{Batch, StepSettings};
use crate::{Error, Result};

/// What the benchmark feeds every step (stated in the output).
pub const INPUTS: &str = "random inputs of the right shapes, as the reference draws them: x0 ~ U(-1, 1), \
                          edges-condition slot c ~ U(0, 1), labels uniform over the classes; fresh noise and \
                          timesteps every step";

/// Settings of `lisa bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    /// The main network's folder (frozen during the benchmark).
    pub main_network: PathBuf,
    /// Examples per step.
    pub batch: i64,
    /// CPU threads of libtorch, in both processes.
    pub threads: i32,
    /// Timed steps per variant.
    pub reps: usize,
    /// Untimed rounds before them (every variant steps once per round).
    pub warmup: usize,
    /// Seed of initialisation and inputs.
    pub seed: u64,
    /// Side of the square f32 matmul timed for the machine's GEMM rate.
    pub gemm_size: i64,
    /// Examples per step that get the LISA term in the sub-batch variant (`lisa.sub_batch`).
    pub lisa_sub_batch: i64,
    /// The reference to compare against; `None` = ours only.
    pub reference: Option<ReferenceCommand>,
}

impl BenchConfig {
    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.batch < 1 || self.threads < 1 || self.reps < 1 || self.gemm_size < 1 {
            return Err(Error::Config("bench: --batch, --threads, --reps and --gemm-size must be ≥ 1".into()));
        }
        if !(1..=self.batch).contains(&self.lisa_sub_batch) {
            return Err(Error::Config(format!(
                "bench: --lisa-sub-batch must be between 1 and --batch ({}), got {}",
                self.batch, self.lisa_sub_batch
            )));
        }
        Ok(())
    }
}

/// One of our variants: its side network, decoder, task and optimizer.
struct OursArm {
    variant: Variant,
    side: SideNetwork,
    head: Option<LisaHead>,
}

/// A step slot of the round-robin.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Ours(usize),
    Reference(Variant),
    Gemm,
}

/// What the report says of the malloc settings: ours (`tuned` = glibc took them) and what the reference got.
pub(crate) fn allocator_settings(tuned: bool) -> String {
    let ours = if tuned {
        format!(
            "ours glibc malloc with mmap threshold {} MiB and trim threshold {} MiB",
            crate::allocator::MMAP_THRESHOLD_BYTES >> 20,
            crate::allocator::TRIM_THRESHOLD_BYTES >> 20
        )
    } else {
        "ours the platform's default malloc".to_string()
    };
    let theirs = crate::allocator::glibc_tunables_for_children();
    format!("{ours}; the reference GLIBC_TUNABLES={theirs}")
}

/// Runs the benchmark: builds our four variants on the frozen main network (and starts the reference
/// unless disabled), then runs `warmup + reps` rounds in each of which every variant takes one step
/// and one GEMM is timed, the order rotated by one slot per round. `log` receives progress lines.
pub fn run_bench(cfg: &BenchConfig, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    cfg.validate()?;
    tch::set_num_threads(cfg.threads);
    // Ours as the CLI runs it; the reference gets the same settings through GLIBC_TUNABLES.
    let tuned_allocator = crate::allocator::keep_freed_memory_for_reuse();
    let mut main = MainNetwork::load(&cfg.main_network, Device::Cpu)?;
    main.freeze();
    let ctl = ControlConfig::default();
    let u = main.config.unet.clone();
    let cn = ControlNetConfig {
        conditioning_embedding_out_channels: ctl.conditioning_embedding_out_channels.clone(),
        ..ControlNetConfig::for_unet(&u)
    };
    let mut arms = Vec::new();
    for (variant, pass, sub_batch) in [
        (Variant::OursBaseline, None, 0),
        (Variant::OursLisaShared, Some(ReferencePass::SharedEncoder), 0),
        (Variant::OursLisaFull, Some(ReferencePass::Full), 0),
        (Variant::OursLisaSubBatch, Some(ReferencePass::SharedEncoder), cfg.lisa_sub_batch),
    ] {
        // The same seed: every variant starts from the same side network (and decoder).
        tch::manual_seed(cfg.seed as i64);
        let side = SideNetwork::from_main(&main, ConditionKind::Edges, cn.clone())?;
        let head = match pass {
            None => None,
            Some(reference_pass) => {
                Some(LisaHead::new(&main, &side, &LisaConfig { reference_pass, sub_batch, ..ctl.lisa.clone() })?)
            }
        };
        arms.push(OursArm { variant, side, head });
    }
    let tasks: Vec<ControlTask> =
        arms.iter().map(|a| ControlTask::new(&main, &a.side, a.head.as_ref())).collect::<Result<_>>()?;
    let mut opts: Vec<AdamW> = arms
        .iter()
        .map(|a| {
            let mut p = a.side.named_parameters();
            if let Some(h) = &a.head {
                p.extend(h.named_parameters());
            }
            AdamW::new(p, ctl.train.adam.clone())
        })
        .collect();

    // FLOPs from shapes.
    let hook_res = cn
        .hookable_layers(u.sample_size, u.sample_size)
        .into_iter()
        .find(|l| l.hook == ctl.lisa.hook)
        .map_or(u.sample_size, |l| l.height);
    let ctx = FlopContext {
        unet: u.clone(),
        size: u.sample_size,
        label_tokens: main.config.label_encoder.num_tokens,
        cond_stride2: cn.num_stride2(),
        decoder_feature_res: hook_res,
    };
    let decoder_params = arms[1].head.as_ref().map(|h| h.named_parameters()).unwrap_or_default();
    let flops = StepFlops::count(
        &ctx,
        &shapes(&main.named_parameters()),
        &shapes(&arms[0].side.named_parameters()),
        &shapes(&decoder_params),
    );

    let (mut reference, reference_info) = match &cfg.reference {
        None => (None, ReferenceInfo { status: "disabled".into(), reason: None, header: None, peak_rss_kib: None }),
        Some(cmd) => {
            log("starting the reference (bench/reference.py --bench --serve) ...");
            match ReferenceProcess::start(cmd, &cfg.main_network, cfg.batch, cfg.threads, cfg.seed) {
                Ok(p) => {
                    let header = Some(p.header.clone());
                    (Some(p), ReferenceInfo { status: "ran".into(), reason: None, header, peak_rss_kib: None })
                }
                Err(reason) => {
                    log(&format!("reference skipped: {reason}"));
                    (
                        None,
                        ReferenceInfo {
                            status: "skipped".into(),
                            reason: Some(reason),
                            header: None,
                            peak_rss_kib: None,
                        },
                    )
                }
            }
        }
    };

    let mut slots: Vec<Slot> = (0..arms.len()).map(Slot::Ours).collect();
    if reference.is_some() {
        slots.push(Slot::Reference(Variant::ReferenceBaseline));
        slots.push(Slot::Reference(Variant::ReferenceLisa));
    }
    slots.push(Slot::Gemm);
    let n = cfg.gemm_size;
    let (ga, gb) =
        (Tensor::randn([n, n], (Kind::Float, Device::Cpu)), Tensor::randn([n, n], (Kind::Float, Device::Cpu)));
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    let settings = StepSettings { max_grad_norm: ctl.train.max_grad_norm, mixed_precision: ctl.train.mixed_precision };
    let mut scalers: Vec<Option<LossScaler>> = arms.iter().map(|_| loss_scaler_for(settings)).collect();
    let (mut ref_times, mut gemm_times) = ((Vec::new(), Vec::new()), Vec::new());
    let (res, in_ch, classes) = (u.sample_size, u.in_channels, main.config.label_encoder.num_classes);
    let rounds = cfg.warmup + cfg.reps;
    for round in 0..rounds {
        let timed = round >= cfg.warmup;
        log(&format!("round {}/{rounds}{}", round + 1, if timed { "" } else { " (warm-up)" }));
        let x0 = Tensor::rand([cfg.batch, in_ch, res, res], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let condition = Tensor::rand([cfg.batch, 1, res, res], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(classes, [cfg.batch], (Kind::Int64, Device::Cpu));
        let batch = Batch { x0, labels, condition: Some(condition), rows: None };
        for j in 0..slots.len() {
            match slots[(round + j) % slots.len()] {
                Slot::Ours(i) => {
                    let lr = ctl.train.learning_rate;
                    let scaler = scalers[i].as_mut();
                    let dt = ours_step(&tasks[i], &mut opts[i], &main.objective, &batch, cfg.seed, round as u64, lr, settings, scaler)?;
                    if timed {
                        times[i].push(dt);
                    }
                }
                Slot::Reference(v) => {
                    let p = reference.as_mut().expect("reference slots only when it runs");
                    let dt = p.step(v.reference_arm().expect("a reference variant"))?;
                    if timed {
                        let list = if v == Variant::ReferenceBaseline { &mut ref_times.0 } else { &mut ref_times.1 };
                        list.push(dt);
                    }
                }
                Slot::Gemm => {
                    let t0 = Instant::now();
                    let c = ga.matmul(&gb);
                    let dt = t0.elapsed().as_secs_f64();
                    drop(c);
                    if timed {
                        gemm_times.push(dt);
                    }
                }
            }
        }
    }
    let mut reference_info = reference_info;
    if let Some(p) = reference.take() {
        reference_info.peak_rss_kib = Some(p.finish()?);
    }

    let mut variants: Vec<VariantResult> = arms
        .iter()
        .zip(times)
        .map(|(a, t)| {
            VariantResult::new(a.variant, t, cfg.batch, flops.per_step(a.variant, cfg.batch, cfg.lisa_sub_batch) / 1e9)
        })
        .collect();
    if reference_info.status == "ran" {
        for (v, t) in [(Variant::ReferenceBaseline, ref_times.0), (Variant::ReferenceLisa, ref_times.1)] {
            variants.push(VariantResult::new(v, t, cfg.batch, flops.per_step(v, cfg.batch, cfg.lisa_sub_batch) / 1e9));
        }
    }
    let gemm_flop = 2.0 * (n as f64).powi(3) / 1e9;
    let gemm_stats = TimingStats::from_times(gemm_times);
    let gemm = GemmResult {
        size: n,
        median_gflops: gemm_flop / gemm_stats.median_s,
        best_gflops: gemm_flop / gemm_stats.min_s,
        stats: gemm_stats,
    };
    let interleaving = if reference_info.status == "ran" {
        "round-robin: each round every variant takes one step and one GEMM is timed, the order rotated by one \
         slot per round; the reference runs in its own process, driven step by step over a pipe (while one \
         process steps the other waits blocked), so its steps interleave with ours one by one"
    } else {
        "round-robin: each round every variant takes one step and one GEMM is timed, the order rotated by one \
         slot per round"
    };
    Ok(BenchReport {
        main_network: crate::pipeline::report_path(&cfg.main_network),
        main_parameters: crate::models::parameter_count(&main.vs),
        side_parameters: crate::models::parameter_count(&arms[0].side.vs),
        decoder_parameters: arms[1].head.as_ref().map_or(0, |h| crate::models::parameter_count(&h.vs)),
        batch: cfg.batch,
        lisa_sub_batch: cfg.lisa_sub_batch,
        threads: cfg.threads,
        reps: cfg.reps,
        warmup: cfg.warmup,
        inputs: INPUTS.into(),
        interleaving: interleaving.into(),
        allocator: allocator_settings(tuned_allocator),
        comparisons: Comparisons::from_results(&variants),
        variants,
        flops,
        flop_note: FLOP_NOTE.into(),
        gemm,
        peak_rss_kib: peak_rss_kib(),
        reference: reference_info,
    })
}
