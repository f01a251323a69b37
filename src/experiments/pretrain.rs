//! Pretraining the main network: a class-conditional denoiser on Fashion-MNIST or a user's imagefolder.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::{DataConfig, Dataset};
use crate::diffusion::{SamplerConfig, TrainingSample};
use crate::pipeline::{MainNetwork, MainNetworkConfig, CONFIG_FILE};
use crate::train::step::{Batch, TaskLoss, TrainTask};
use crate::train::trainer::{self, RunDir, TrainConfig, TrainSummary};
use crate::{Error, Result};

/// Validation samples written at each checkpoint (`samples/step-N.png`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Images in the grid (0 = no validation samples). Default 40 (4 per class).
    pub num_images: i64,
    /// The sampler used.
    pub sampler: SamplerConfig,
    /// Seed of the validation noise (fixed across checkpoints so grids are comparable). Default 1234.
    pub seed: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self { num_images: 40, sampler: SamplerConfig { steps: 25, ..Default::default() }, seed: 1234 }
    }
}

/// The `pretrain` command's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Run folder: checkpoints, metrics, samples and the final `model/`. Default `runs/pretrain`.
    pub output_dir: PathBuf,
    /// CPU threads for libtorch (0 = libtorch's default). Default 0.
    pub threads: i32,
    /// `cpu` or `cuda` (`auto` picks CUDA when available). Default `auto`.
    pub device: String,
    /// Training data.
    pub data: DataConfig,
    /// The main network's architecture and objective. Left at 0 (the default), `model.unet.in_channels` and
    /// `out_channels` follow the data's channels (`data.channels`) and `model.label_encoder.num_classes` the
    /// dataset's class count; a larger class count than the data's is allowed (unused classes).
    pub model: MainNetworkConfig,
    /// Probability of replacing a label by the null label while training, so the network also learns
    /// the unconditional prediction (for classifier-free guidance). Default 0.1.
    pub label_dropout: f64,
    /// The training loop.
    pub train: TrainConfig,
    /// Validation samples.
    pub validation: ValidationConfig,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/pretrain"),
            threads: 0,
            device: "auto".into(),
            data: DataConfig::default(),
            model: {
                let mut m = MainNetworkConfig::default();
                (m.unet.in_channels, m.unet.out_channels, m.label_encoder.num_classes) = (0, 0, 0);
                m
            },
            label_dropout: 0.1,
            train: TrainConfig { ema_decay: 0.999, ..TrainConfig::default() },
            validation: ValidationConfig::default(),
        }
    }
}

/// Resolves a device setting: `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn device_from(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        // In a launch of several processes, each takes the GPU of its LOCAL_RANK.
        "auto" | "cuda" if tch::Cuda::is_available() => Ok(crate::distributed::local_cuda_device()),
        "auto" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let i = s.strip_prefix("cuda:").and_then(|i| i.parse().ok()).unwrap_or(0);
            if !tch::Cuda::is_available() {
                return Err(Error::Config(format!("device '{s}': CUDA is not available on this machine; use cpu")));
            }
            Ok(Device::Cuda(i))
        }
        other => Err(Error::Config(format!("device '{other}': use auto, cpu, cuda or cuda:N"))),
    }
}

/// The pretraining loss: plain diffusion MSE, with label dropout for classifier-free guidance.
struct PretrainTask<'a> {
    net: &'a MainNetwork,
    label_dropout: f64,
}

impl TrainTask for PretrainTask<'_> {
    fn loss(&self, batch: &Batch, sample: &TrainingSample) -> Result<TaskLoss> {
        let mut y = batch.labels.shallow_clone();
        if self.label_dropout > 0.0 {
            let draw = |s: &[i64]| Ok(Tensor::f_rand(s, (Kind::Float, y.device()))?);
            let drop = crate::rng::per_example(batch.rows, &[y.size()[0]], draw)?.lt(self.label_dropout);
            y = y.where_self(&drop.logical_not(), &Tensor::from(self.net.label_encoder.null_label()).to_device(y.device()));
        }
        let pred = self.net.predict(&sample.x_t, &sample.model_t, &y)?;
        Ok(TaskLoss { loss: pred.mse_loss(&sample.target, tch::Reduction::Mean), metrics: vec![] })
    }
}

/// Trains a main network as configured; writes the run folder and returns the loop's summary.
pub fn pretrain(cfg: &PretrainConfig, resume: Option<&str>, quiet: bool) -> Result<TrainSummary> {
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    if !(0.0..1.0).contains(&cfg.label_dropout) {
        return Err(Error::Config("label_dropout must be in [0, 1)".into()));
    }
    // Settings are checked before the data is read (which can take a while) and before anything is written.
    cfg.train.validate()?;
    if !cfg.data.eval_dataset.is_empty() {
        return Err(Error::Config(format!(
            "lisa pretrain evaluates on no held-out images, so data.eval_dataset ({}) would only make every image of \
             data.dataset train; remove it (to train on every image, set data.eval_fraction = 0). lisa train, \
             compare and classifier use it",
            cfg.data.eval_dataset
        )));
    }
    let device = device_from(&cfg.device)?;
    let m = &cfg.model;
    let section = if m.transformer.is_some() { "model.transformer" } else { "model.unet" };
    if cfg.data.dataset != "fashion-mnist" && i64::from(cfg.data.image_size) != m.sample_size() {
        return Err(Error::Config(format!(
            "data.image_size = {} but {section}.sample_size = {}; set them to the same size",
            cfg.data.image_size,
            m.sample_size()
        )));
    }
    let data = cfg.data.load(false)?;
    // From here on the run uses the model with the settings left to the data filled in.
    let cfg = &PretrainConfig { model: resolved_model(m, &data)?, data: cfg.data.as_applied(), ..cfg.clone() };
    let m = &cfg.model;
    if data.channels() != m.in_channels() || data.image_size() != m.sample_size() {
        return Err(Error::Config(format!(
            "the dataset's images are {}×{}×{} but {section}.in_channels = {} and {section}.sample_size = {}; \
             make data.channels and the image size (data.image_size; 32 for Fashion-MNIST) agree with them",
            data.channels(),
            data.image_size(),
            data.image_size(),
            m.in_channels(),
            m.sample_size()
        )));
    }
    let data = data.to_device(device);
    // Initial weights follow from the run's seed (a resumed run overwrites them from the checkpoint).
    tch::manual_seed(cfg.train.seed as i64);
    let net = MainNetwork::new(m, device).map_err(|e| match e {
        Error::Config(msg) => Error::Config(format!("model.{msg}")),
        e => e,
    })?;
    let val = &cfg.validation;
    if val.num_images > 0 {
        crate::diffusion::Sampler::new(&net.objective, val.sampler.clone()).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("validation.sampler: {msg}")),
            e => e,
        })?;
    }
    let out = &cfg.output_dir;
    let task = PretrainTask { net: &net, label_dropout: cfg.label_dropout };
    // The run folder doubles as a model folder for its checkpoints.
    let cfg_json = serde_json::to_string_pretty(&m.to_json()?).map_err(|e| Error::Config(e.to_string()))?;
    let run = RunDir {
        output_dir: out,
        resume,
        run_description: serde_json::json!({ "model": m, "data": cfg.data, "label_dropout": cfg.label_dropout, "train": cfg.train }),
        description_defaults: {
            let d = PretrainConfig::default();
            let model = resolved_model(&d.model, &data)?;
            serde_json::json!({ "model": model, "data": d.data, "label_dropout": d.label_dropout, "train": d.train })
        },
        quiet,
        files: vec![
            (CONFIG_FILE.into(), cfg_json.into_bytes()),
            ("config.toml".into(), crate::config::to_toml(cfg)?.into_bytes()),
        ],
    };
    // Everything the trainer would refuse is refused before the folder is touched.
    cfg.data.check_training_size(data.len(), cfg.train.batch_size)?;
    trainer::preflight(&data, &cfg.train, &run)?;
    let _lock = crate::train::lock::RunLock::acquire(out)?;
    if resume.is_none() {
        crate::train::checkpoint::ensure_none(out)?;
    }

    let samples_dir = out.join("samples");
    let summary =
        trainer::train(&task, net.named_parameters(), &data, &net.objective, &cfg.train, &run, |step, weights| {
            if val.num_images <= 0 {
                return Ok(());
            }
            // Sample with the averaged weights without disturbing the trained ones.
            let _guard = tch::no_grad_guard();
            let saved: Vec<Tensor> = net.named_parameters().iter().map(|(_, p)| p.copy()).collect();
            swap_in(&net, weights);
            let (images, _) = net.sample_many(val.num_images, 64, &val.sampler, val.seed)?;
            for ((_, p), s) in net.named_parameters().iter().zip(&saved) {
                p.shallow_clone().copy_(s);
            }
            std::fs::create_dir_all(&samples_dir).map_err(|e| Error::io(&samples_dir, e))?;
            let nrow = m.label_encoder.num_classes.min(val.num_images);
            let path = samples_dir.join(format!("step-{step}.png"));
            crate::eval::grid::save_grid_scaled(&images, nrow as usize, 2, 2, &path)?;
            crate::train::tensorboard::mirror_image(out, step, "validation/samples", &path)
        })?;
    // The final model: the averaged weights when EMA is on.
    let final_dir = out.join("model");
    // In a multi-process run rank 0 writes it; the trainer's last barrier made its checkpoint complete.
    if let Some(ckpt) = summary.last_checkpoint.as_ref().filter(|_| crate::distributed::is_main_process()) {
        let final_net = MainNetwork::load(ckpt, Device::Cpu)?;
        final_net.save(&final_dir)?;
    }
    Ok(summary)
}

/// `model` with the settings left to the data (0) filled in from `data`: the UNet's in/out channels from its
/// channels (for a transformer backbone, whose channels are its own, the unused UNet fields keep the UNet's
/// defaults), the class count from its classes. A class count below the data's is refused.
pub fn resolved_model(model: &MainNetworkConfig, data: &Dataset) -> Result<MainNetworkConfig> {
    let mut m = model.clone();
    let channels =
        if m.transformer.is_some() { crate::models::UNetConfig::default().in_channels } else { data.channels() };
    for c in [&mut m.unet.in_channels, &mut m.unet.out_channels] {
        if *c == 0 {
            *c = channels;
        }
    }
    let classes = &mut m.label_encoder.num_classes;
    if *classes == 0 {
        *classes = data.num_classes;
    } else if *classes < data.num_classes {
        return Err(Error::Config(format!(
            "the dataset has {} classes but model.label_encoder.num_classes = {}; raise it to at least {} \
             or leave it at 0 (the dataset's count)",
            data.num_classes, classes, data.num_classes
        )));
    }
    Ok(m)
}

fn swap_in(net: &MainNetwork, weights: &[(String, Tensor)]) {
    let map: std::collections::HashMap<&str, &Tensor> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (name, p) in net.named_parameters() {
        if let Some(w) = map.get(name.as_str()) {
            p.shallow_clone().copy_(w);
        }
    }
}
