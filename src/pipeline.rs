//! The main network as a unit: label encoder + UNet + objective, saved as a folder
//! (`config.json` + `model.safetensors`) that `sample`, `eval` and later side-network training load.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::diffusion::{Objective, ObjectiveConfig, Sampler, SamplerConfig};
use crate::models::{LabelEncoder, LabelEncoderConfig, UNet2DConditionModel, UNetConfig};
use crate::train::checkpoint;
use crate::{Error, Result};

/// Everything needed to rebuild a main network: architecture and objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MainNetworkConfig {
    /// The UNet (diffusers `UNet2DConditionModel` config fields).
    pub unet: UNetConfig,
    /// The class-label encoder that plays the text encoder's role.
    pub label_encoder: LabelEncoderConfig,
    /// The objective the network was trained for.
    pub objective: ObjectiveConfig,
}

/// The main network shipped with the repository (`assets/main-network`).
pub fn shipped_main_network() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/main-network"))
}

/// The file holding a model folder's [`MainNetworkConfig`].
pub const CONFIG_FILE: &str = "config.json";

/// A main network: `predict(x_t, t, y)`.
pub struct MainNetwork {
    /// The variables (UNet at the root with diffusers names, the label encoder under `label_encoder`).
    pub vs: nn::VarStore,
    /// The UNet.
    pub unet: UNet2DConditionModel,
    /// The label encoder.
    pub labels: LabelEncoder,
    /// The objective.
    pub objective: Objective,
    /// The config it was built from.
    pub config: MainNetworkConfig,
}

impl MainNetwork {
    /// A freshly initialised network on `device`. A configuration error names its section (`unet: ...`).
    pub fn new(config: &MainNetworkConfig, device: Device) -> Result<Self> {
        let section = |name: &'static str| {
            move |e: Error| match e {
                Error::Config(msg) => Error::Config(format!("{name}: {msg}")),
                e => e,
            }
        };
        let vs = nn::VarStore::new(device);
        let unet = UNet2DConditionModel::new(vs.root(), &config.unet).map_err(section("unet"))?;
        let labels =
            LabelEncoder::new(vs.root() / "label_encoder", &config.label_encoder, config.unet.cross_attention_dim)
                .map_err(section("label_encoder"))?;
        let objective = Objective::new(&config.objective).map_err(section("objective"))?;
        Ok(Self { vs, unet, labels, objective, config: config.clone() })
    }

    /// Loads a model folder or a training checkpoint: the config from `dir/config.json` (or the run
    /// folder above a `checkpoint-N`), the weights from `ema.safetensors` if present, else `model.safetensors`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg_path = [dir.join(CONFIG_FILE), dir.join("..").join(CONFIG_FILE)]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!("no {CONFIG_FILE} here or in the folder above: not a model folder"),
            })?;
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let invalid = |msg: String| {
            Error::format(
                &cfg_path,
                format!("invalid model config: {msg}; restore the config.json the model was saved with"),
            )
        };
        let config: MainNetworkConfig = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let net = Self::new(&config, device).map_err(|e| match e {
            Error::Config(msg) => invalid(msg),
            e => e,
        })?;
        let weights = if dir.join("ema.safetensors").is_file() { "ema.safetensors" } else { "model.safetensors" };
        checkpoint::load_into(&net.named_parameters(), checkpoint::read_tensors(dir, weights)?, &dir.join(weights))?;
        Ok(net)
    }

    /// Stops gradients for every parameter, as a frozen main network under a side network must be.
    pub fn freeze(&mut self) {
        self.vs.freeze();
    }

    /// Saves `config.json` and `model.safetensors` into `dir` (created), each written atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_model_dir(dir, &self.config, &self.named_parameters())
    }

    /// All parameters, named as in the saved files, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The network's prediction (ε, v or velocity, per the objective) for `x_t` at network timesteps
    /// `model_t` [B] with class labels `y` [B] (the null label = unconditional).
    pub fn predict(&self, x_t: &Tensor, model_t: &Tensor, y: &Tensor) -> Result<Tensor> {
        let ehs = self.labels.forward(y)?;
        self.unet.forward(x_t, model_t, &ehs, None, None)
    }

    /// Generates one sample per label from noise drawn with `seed`.
    pub fn sample(&self, y: &Tensor, sampler: &SamplerConfig, seed: u64) -> Result<Tensor> {
        let sampler = Sampler::new(&self.objective, sampler.clone())?;
        let c = &self.config.unet;
        let n = y.size()[0];
        tch::manual_seed(seed as i64);
        let x_t = Tensor::randn([n, c.in_channels, c.sample_size, c.sample_size], (Kind::Float, self.vs.device()));
        let y = y.to_device(self.vs.device());
        sampler.sample(x_t, seed, |x, t| self.predict(x, t, &y))
    }

    /// Samples `n` images in chunks of `chunk` (labels cycling over the classes), reproducibly from `seed`.
    pub fn sample_many(&self, n: i64, chunk: i64, sampler: &SamplerConfig, seed: u64) -> Result<(Tensor, Tensor)> {
        let k = self.config.label_encoder.num_classes;
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(k);
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let y = labels.narrow(0, start, len);
            out.push(self.sample(&y, sampler, crate::rng::derive_seed(seed, start as u64))?.to_device(Device::Cpu));
            start += len;
        }
        Ok((Tensor::cat(&out, 0), labels))
    }
}

/// Writes a model folder: `config.json` and `model.safetensors`, each via a temporary file + rename.
pub fn save_model_dir<C: Serialize>(dir: &Path, config: &C, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = |name: &str| -> PathBuf { dir.join(format!(".{name}.tmp-{}", std::process::id())) };
    let weights = dir.join("model.safetensors");
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let t = tmp("model.safetensors");
    if let Err(e) = Tensor::write_safetensors(&named, &t) {
        let _ = std::fs::remove_file(&t);
        let e = e.to_string();
        return Err(Error::format(&weights, format!("cannot write tensors: {e}{}", crate::error::io_hint_in(&e))));
    }
    std::fs::rename(&t, &weights).map_err(|e| Error::io(&weights, e))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Config(e.to_string()))?;
    checkpoint::write_atomic(&cfg_path, text.as_bytes())
}
