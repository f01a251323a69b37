//! `lisa train-sd`: a ControlNet for a Stable Diffusion folder (diffusers layout, on local disk),
//! trained with or without LISA in latent space on a captioned imagefolder — the job diffusers'
//! `train_controlnet.py` does.
//!
//! One run: the folder's UNet becomes the frozen main network, conditioned on the dataset's captions
//! (each distinct `text` is one row of the prompt table, see [`crate::sd`]); the VAE encodes every
//! training image once into latents (one draw of its Gaussian per image, seeded by `train.seed` and the
//! image), kept on disk with the condition images and reused by later runs ([`super::latent_cache`]); the
//! `conditioning_image`s stay at full resolution and the side network's conditioning embedding downscales
//! them by the VAE's factor, as SD ControlNets do. Training is the same step as
//! on Fashion-MNIST (side network + optional LISA decoder, one AdamW, the cheap reference pass).
//! Every `validation.every_steps` the first examples are sampled under classifier-free guidance,
//! decoded by the VAE and written as `samples/step-N.png` (condition | sample | training image). At
//! the end the side network is saved in our format (`side-network/`) and, unless disabled, as a
//! diffusers `ControlNetModel` folder (`controlnet/`) that `ControlNetModel.from_pretrained` loads.
//!
//! There is no control-fidelity metric here: a user's conditions are of no kind we can recompute
//! from a sample. Memory: the training data is read from disk a batch at a time, so the dataset's size
//! does not change the run's memory; the cache takes 0.8 MB per example at 512² (condition bytes and
//! latents).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::pretrain::device_from;
use crate::control::sampling::{sample_controlled, Control, ControlOptions};
use crate::control::{ControlTask, LisaConfig, LisaHead, SideNetwork};
use crate::data::conditions::ConditionKind;
use super::latent_cache::{encode_or_reuse, CacheRequest, CACHE_DIR};
use crate::data::imagefolder::{self, Target};
use crate::diffusion::SamplerConfig;
use crate::models::ControlNetConfig;
use crate::train::trainer::{self, RunDir, TrainConfig};
use crate::{Error, Result};

/// Validation samples written during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatentValidationConfig {
    /// Sample every this many steps (and at the last step; 0 = at each checkpoint). Default 100.
    pub every_steps: u64,
    /// The first this many training examples (their conditions and captions) are sampled. Default 4.
    pub num_images: i64,
    /// The sampler. Default DDIM, 20 steps, η = 0.
    pub sampler: SamplerConfig,
    /// Classifier-free guidance scale on the caption (1 = none). Default 7.5, as SD pipelines.
    pub guidance_scale: f64,
    /// Seed of the sampling noise. Default 0.
    pub seed: u64,
}

impl Default for LatentValidationConfig {
    fn default() -> Self {
        Self { every_steps: 100, num_images: 4, sampler: SamplerConfig::default(), guidance_scale: 7.5, seed: 0 }
    }
}

/// Configuration of `lisa train-sd`; every field has the default shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatentControlConfig {
    /// Run folder. Default `runs/sd-controlnet`.
    pub output_dir: PathBuf,
    /// CPU threads for libtorch (0 = libtorch's default). Default 0.
    pub threads: i32,
    /// `auto`, `cpu`, `cuda` or `cuda:N`. Default `auto`.
    pub device: String,
    /// The Stable Diffusion folder (diffusers layout: `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    /// `scheduler/`). Required.
    pub model: PathBuf,
    /// The imagefolder: `metadata.jsonl` lines with `image`, `conditioning_image` and `text`. Required.
    pub data: PathBuf,
    /// Images and conditions are fitted to this square size (a multiple of the VAE's downscale).
    /// Default 512.
    pub resolution: u32,
    /// Use only the first N examples (0 = all). Default 0.
    pub max_examples: usize,
    /// Widths of the conditioning embedding's stages; there must be log2(VAE downscale) + 1 of them
    /// (diffusers' embedding halves the size at every stage transition). Default `[16, 32, 96, 256]`.
    pub conditioning_embedding_out_channels: Vec<i64>,
    /// A diffusers `ControlNetModel` folder to continue training from (empty: a fresh copy of the
    /// UNet's encoder, as `ControlNetModel.from_unet`). Default empty.
    pub init_controlnet: PathBuf,
    /// LISA (`lisa.enabled = false` trains the plain ControlNet).
    pub lisa: LisaConfig,
    /// The training loop.
    pub train: TrainConfig,
    /// Validation samples.
    pub validation: LatentValidationConfig,
    /// Also write the finished side network as a diffusers folder `controlnet/`. Default true.
    pub export_diffusers: bool,
    /// Where the encoded training data is kept between runs (see [`super::latent_cache`]); empty = the
    /// dataset's own `.lisa-cache/` folder (set this when the dataset folder is read-only). Default empty.
    pub latent_cache_dir: PathBuf,
}

impl Default for LatentControlConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/sd-controlnet"),
            threads: 0,
            device: "auto".into(),
            model: PathBuf::new(),
            data: PathBuf::new(),
            resolution: 512,
            max_examples: 0,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            init_controlnet: PathBuf::new(),
            lisa: LisaConfig::default(),
            train: TrainConfig {
                steps: 1000,
                batch_size: 4,
                // diffusers' train_controlnet.py examples use 1e-5 on SD1.5.
                learning_rate: 1e-5,
                lr_warmup_steps: 0,
                checkpointing_steps: 500,
                ..TrainConfig::default()
            },
            validation: LatentValidationConfig::default(),
            export_diffusers: true,
            latent_cache_dir: PathBuf::new(),
        }
    }
}

impl LatentControlConfig {
    /// Rejects settings that cannot run (before anything is loaded).
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            return Err(Error::Config("model is not set: give the Stable Diffusion folder (--model DIR)".into()));
        }
        if self.data.as_os_str().is_empty() {
            return Err(Error::Config(
                "data is not set: give an imagefolder with image, conditioning_image and text (--data DIR)".into(),
            ));
        }
        self.lisa.validate()?;
        self.train.validate()?;
        if self.train.ema_decay != 0.0 {
            return Err(Error::Config("train.ema_decay: side networks are trained without EMA; set it to 0".into()));
        }
        if self.validation.num_images < 1 {
            return Err(Error::Config("validation.num_images must be ≥ 1".into()));
        }
        if !(self.validation.guidance_scale.is_finite() && self.validation.guidance_scale >= 0.0) {
            return Err(Error::Config("validation.guidance_scale must be ≥ 0 (1 = no guidance)".into()));
        }
        Ok(())
    }

    /// `lisa` or `baseline`.
    pub fn arm(&self) -> &'static str {
        self.lisa.arm()
    }
}

/// The columns train-sd reads: the captions are the prompts, so a `label` beside them is ignored.
fn sd_columns() -> imagefolder::Columns {
    imagefolder::Columns { label: String::new(), ..imagefolder::Columns::default() }
}

/// The captions of an imagefolder, which must use `text` (they become the prompts).
fn check_captioned(data: &Path) -> Result<()> {
    let records = match imagefolder::read_metadata_with(data, &sd_columns()) {
        Ok(r) => r,
        // Integer labels alone: say what train-sd needs rather than which key is missing.
        Err(e) => match imagefolder::read_metadata(data) {
            Ok(r) if matches!(r[0].target, Target::Label(_)) => r,
            _ => return Err(e),
        },
    };
    if !matches!(records[0].target, Target::Text(_)) {
        return Err(Error::format(
            &data.join(imagefolder::METADATA_FILE),
            "train-sd needs captions: give every line a `text` (the prompt), not a `label`",
        ));
    }
    if records[0].conditioning_image.is_none() {
        return Err(Error::format(
            &data.join(imagefolder::METADATA_FILE),
            "train-sd needs a `conditioning_image` on every line (the control image of that example)",
        ));
    }
    Ok(())
}

/// What a finished `train-sd` run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentRunSummary {
    /// `baseline` or `lisa`.
    pub arm: String,
    /// Steps trained.
    pub steps: u64,
    /// Training examples (captioned images).
    pub examples: usize,
    /// Distinct captions (prompts).
    pub prompts: usize,
    /// Latent size [channels, height, width].
    pub latent_shape: Vec<i64>,
    /// Final training loss (main term), the mean over the last logging interval.
    pub final_loss: f64,
    /// Trainable parameters of the side network.
    pub side_parameters: i64,
    /// The side network folder (our format).
    pub side_network: PathBuf,
    /// The diffusers `ControlNetModel` folder, when exported.
    pub diffusers_controlnet: Option<PathBuf>,
}

/// Trains a ControlNet for the Stable Diffusion folder `cfg.model` on `cfg.data`; see the module doc.
pub fn train_latent(
    cfg: &LatentControlConfig,
    resume: Option<&str>,
    quiet: bool,
    log: &mut dyn FnMut(&str),
) -> Result<LatentRunSummary> {
    cfg.validate()?;
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    let device = device_from(&cfg.device)?;
    let out = &cfg.output_dir;
    check_captioned(&cfg.data)?;
    let (mut vae_vs, vae) = crate::sd::load_vae(&cfg.model, device)?;
    // Frozen, and held in the training's reduced dtype (diffusers' `weight_dtype`) when there is one.
    vae_vs.freeze();
    crate::models::precision::hold_in(&mut vae_vs, cfg.train.mixed_precision)?;
    let factor = vae.config.downscale();
    if cfg.resolution == 0 || i64::from(cfg.resolution) % factor != 0 {
        return Err(Error::Config(format!(
            "resolution {} must be a positive multiple of the VAE's downscale factor {factor}",
            cfg.resolution
        )));
    }
    let opts = imagefolder::LoadOptions {
        size: cfg.resolution,
        channels: 3,
        columns: sd_columns(),
        ..imagefolder::LoadOptions::default()
    };
    let mut index = imagefolder::open_index(&cfg.data, &opts)?;
    if cfg.max_examples > 0 && index.len() > cfg.max_examples {
        index.records.truncate(cfg.max_examples);
        index.labels.truncate(cfg.max_examples);
    }
    let prompts: Vec<&str> = index.class_names.iter().map(String::as_str).collect();
    let mut main = crate::sd::load_main_network(&cfg.model, &prompts, device)?;
    main.freeze();
    log(&format!("{}: {} examples, {} prompts", cfg.data.display(), index.len(), prompts.len()));

    // Latents and condition images on disk, read a batch at a time (see latent_cache): memory does not grow
    // with the dataset.
    let cache_root =
        if cfg.latent_cache_dir.as_os_str().is_empty() { cfg.data.join(CACHE_DIR) } else { cfg.latent_cache_dir.clone() };
    let request = CacheRequest {
        vae_dir: &cfg.model.join("vae"),
        root: &cache_root,
        resolution: cfg.resolution,
        seed: cfg.train.seed,
        vae_precision: cfg.train.mixed_precision,
        device,
    };
    let train_data = encode_or_reuse(&index, &vae, &request, log)?;
    // The same seed gives the same side-network start for both arms, whatever the cache held.
    tch::manual_seed(cfg.train.seed as i64);
    let mut side = if cfg.init_controlnet.as_os_str().is_empty() {
        let stages = cfg.conditioning_embedding_out_channels.len();
        if 1i64 << (stages.max(1) - 1) != factor {
            return Err(Error::Config(format!(
                "conditioning_embedding_out_channels has {stages} stages, which downscale by {}, but the VAE \
                 downscales by {factor}: give log2({factor}) + 1 widths (e.g. [16, 32, 96, 256] for 8)",
                1i64 << (stages.max(1) - 1)
            )));
        }
        let controlnet = ControlNetConfig {
            conditioning_channels: 3,
            conditioning_embedding_out_channels: cfg.conditioning_embedding_out_channels.clone(),
            conditioning_downscale: factor,
            ..ControlNetConfig::for_unet(&main.config.unet)
        };
        SideNetwork::from_main(&main, ConditionKind::Given, controlnet)?
    } else {
        SideNetwork::import_diffusers(&cfg.init_controlnet, &main, ConditionKind::Given)?
    };
    side.set_gradient_checkpointing(cfg.train.gradient_checkpointing)?;
    main.set_gradient_checkpointing(cfg.train.gradient_checkpointing)?;
    let head = if cfg.lisa.enabled {
        Some(LisaHead::new(&main, &side, &cfg.lisa)?)
    } else {
        None
    };
    // The side network copied its f32 weights; the frozen UNet (with its prompt table: the text encoder
    // itself is not kept) is now held in the reduced dtype of the training, if any.
    main.hold_weights_in(cfg.train.mixed_precision)?;
    let task = ControlTask::new(&main, &side, head.as_ref())?;
    let mut params = side.named_parameters();
    if let Some(h) = &head {
        params.extend(h.named_parameters());
    }
    let train_cfg = TrainConfig { validation_steps: cfg.validation.every_steps, ..cfg.train.clone() };
    let run = RunDir {
        output_dir: out,
        resume,
        run_description: run_description(cfg),
        description_defaults: run_description(&LatentControlConfig::default()),
        quiet,
        files: super::arm::side_run_files(cfg, &side)?,
    };
    trainer::preflight(&train_data, &train_cfg, &run)?;
    let _lock = crate::train::lock::RunLock::acquire(out)?;

    // The validation examples, decoded from the folder (the training data holds latents).
    let k = cfg.validation.num_images.min(index.len() as i64);
    let examples = (0..k as usize).map(|i| index.example(i)).collect::<Result<Vec<_>>>()?;
    let val_y = Tensor::from_slice(&index.labels[..k as usize]).to_device(device);
    let val_x = Tensor::stack(&examples.iter().map(|e| e.image.shallow_clone()).collect::<Vec<_>>(), 0);
    let val_c = Tensor::stack(
        &examples.iter().map(|e| e.condition.as_ref().map(Tensor::shallow_clone)).collect::<Option<Vec<_>>>().ok_or_else(
            || Error::Config("train-sd needs a conditioning_image on every line".into()),
        )?,
        0,
    )
    .to_device(device);
    let samples_dir = out.join("samples");
    let validate = |step: u64| -> Result<()> {
        let control = Control { side: &side, condition: val_c.shallow_clone(), options: ControlOptions::default() };
        let v = &cfg.validation;
        let latents = sample_controlled(&main, &[control], &val_y, &v.sampler, v.guidance_scale, v.seed)?;
        let images = tch::no_grad(|| vae.decode_latents(&latents))?.to_device(Device::Cpu).clamp(-1.0, 1.0);
        std::fs::create_dir_all(&samples_dir).map_err(|e| Error::io(&samples_dir, e))?;
        let rows = Tensor::stack(&[val_c.to_device(Device::Cpu) * 2.0 - 1.0, images, val_x.to_device(Device::Cpu)], 1)
            .flatten(0, 1)
            .to_kind(Kind::Float);
        let path = samples_dir.join(format!("step-{step}.png"));
        crate::eval::grid::save_grid(&rows, 3, 2, &path)?;
        crate::train::tensorboard::mirror_image(out, step, "validation/samples", &path)
    };
    let summary =
        trainer::train(&task, params, &train_data, &main.objective, &train_cfg, &run, |step, _| validate(step))?;

    let side_dir = out.join("side-network");
    // In a multi-process run rank 0 writes them (the weights are the same on every rank).
    let main_process = crate::distributed::is_main_process();
    if main_process {
        side.save(&side_dir)?;
    }
    let diffusers_dir = if cfg.export_diffusers {
        let d = out.join("controlnet");
        if main_process {
            side.export_diffusers(&d)?;
        }
        Some(d)
    } else {
        None
    };
    Ok(LatentRunSummary {
        arm: cfg.arm().into(),
        steps: cfg.train.steps,
        examples: index.len(),
        prompts: prompts.len(),
        latent_shape: train_data.latent_shape.clone(),
        final_loss: summary.final_loss,
        side_parameters: crate::models::parameter_count(&side.vs),
        side_network: side_dir,
        diffusers_controlnet: diffusers_dir,
    })
}

/// What a resumed run must share with the run that wrote its checkpoint.
fn run_description(cfg: &LatentControlConfig) -> serde_json::Value {
    serde_json::json!({
        "model": cfg.model, "data": cfg.data, "resolution": cfg.resolution, "max_examples": cfg.max_examples,
        "conditioning_embedding_out_channels": cfg.conditioning_embedding_out_channels,
        "init_controlnet": cfg.init_controlnet, "lisa": cfg.lisa, "train": cfg.train,
    })
}
