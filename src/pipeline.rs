//! The main network as a unit: label encoder + backbone (a UNet or a diffusion transformer) +
//! objective, saved as a folder
//! (`config.json` + `model.safetensors`) that `sample`, `eval` and later side-network training load.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::diffusion::{Objective, ObjectiveConfig, Sampler, SamplerConfig};
use crate::models::dit::DiTEmbedded;
use crate::models::{
    DiTConfig, DiTModel, LabelEncoder, LabelEncoderConfig, UNet2DConditionModel, UNetConfig, UNetDownMid,
};
use crate::{Error, Result};

/// Everything needed to rebuild a main network: architecture and objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MainNetworkConfig {
    /// The UNet (diffusers `UNet2DConditionModel` config fields); unused when `transformer` is given.
    pub unet: UNetConfig,
    /// A diffusion transformer backbone instead of the UNet. Default none (the UNet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformer: Option<DiTConfig>,
    /// The class-label encoder that plays the text encoder's role.
    pub label_encoder: LabelEncoderConfig,
    /// The objective the network was trained for.
    pub objective: ObjectiveConfig,
}

impl MainNetworkConfig {
    /// The config as saved in `config.json`: without the unused `unet` section when the backbone is a
    /// transformer.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))?;
        if self.transformer.is_some() {
            if let Some(o) = v.as_object_mut() {
                o.remove("unet");
            }
        }
        Ok(v)
    }

    /// Channels of the samples the backbone takes (a clip's frames count as channels).
    pub fn in_channels(&self) -> i64 {
        self.transformer.as_ref().map_or(self.unet.in_channels, |t| t.sample_channels())
    }

    /// Channels of its prediction (a clip's frames count as channels).
    pub fn out_channels(&self) -> i64 {
        self.transformer.as_ref().map_or(self.unet.out_channels, |t| t.prediction_channels())
    }

    /// Side of the (square) samples.
    pub fn sample_size(&self) -> i64 {
        self.transformer.as_ref().map_or(self.unet.sample_size, |t| t.sample_size)
    }

    /// Frames per sample (1 unless the backbone is a video transformer).
    pub fn num_frames(&self) -> i64 {
        self.transformer.as_ref().map_or(1, |t| t.num_frames)
    }

    /// Width of the label tokens the backbone reads (the UNet's `cross_attention_dim`, the
    /// transformer's `pooled_projection_dim`).
    pub fn label_dim(&self) -> i64 {
        self.transformer.as_ref().map_or(self.unet.cross_attention_dim, |t| t.pooled_projection_dim)
    }
}

/// The denoising network proper.
#[derive(Debug)]
pub enum Backbone {
    /// diffusers' `UNet2DConditionModel`.
    UNet(UNet2DConditionModel),
    /// A diffusion transformer (SD3-style blocks with adaLN-Zero).
    Transformer(DiTModel),
}

/// The part of a forward pass that side-network residuals do not change, computed once per training
/// step and shared by the controlled pass and the reference pass (spec §6).
pub enum SharedPass {
    /// The UNet's encoder and mid block.
    UNet(UNetDownMid),
    /// The transformer's patch and conditioning embeddings.
    Transformer(DiTEmbedded),
}

impl SharedPass {
    /// The first `n` examples of the batch (the LISA term on a sub-batch reuses the shared pass).
    pub fn narrow(&self, n: i64) -> Result<SharedPass> {
        Ok(match self {
            SharedPass::UNet(e) => SharedPass::UNet(UNetDownMid {
                temb: e.temb.f_narrow(0, 0, n)?,
                encoder_hidden_states: e.encoder_hidden_states.f_narrow(0, 0, n)?,
                down_block_res_samples: e
                    .down_block_res_samples
                    .iter()
                    .map(|t| Ok(t.f_narrow(0, 0, n)?))
                    .collect::<Result<Vec<_>>>()?,
                mid: e.mid.f_narrow(0, 0, n)?,
            }),
            SharedPass::Transformer(e) => {
                SharedPass::Transformer(DiTEmbedded { tokens: e.tokens.f_narrow(0, 0, n)?, c: e.c.f_narrow(0, 0, n)? })
            }
        })
    }
}

/// What side networks add to a backbone's forward pass (summed over several side networks).
#[derive(Debug)]
pub enum Residuals {
    /// ControlNet: one residual per UNet skip sample and one for the mid block.
    UNet {
        /// `down_block_additional_residuals`.
        down: Vec<Tensor>,
        /// `mid_block_additional_residual`.
        mid: Tensor,
    },
    /// ControlNet-Transformer: one token map per side block.
    Blocks(Vec<Tensor>),
}

impl Residuals {
    /// The element-wise sum of two sets of residuals of the same kind (diffusers' MultiControlNet).
    pub fn add(self, other: Residuals) -> Result<Residuals> {
        match (self, other) {
            (Residuals::UNet { down, mid }, Residuals::UNet { down: d2, mid: m2 }) if down.len() == d2.len() => {
                let down = down.iter().zip(&d2).map(|(a, b)| Ok(a.f_add(b)?)).collect::<Result<Vec<_>>>()?;
                Ok(Residuals::UNet { down, mid: mid.f_add(&m2)? })
            }
            (Residuals::Blocks(a), Residuals::Blocks(b)) if a.len() == b.len() => {
                Ok(Residuals::Blocks(a.iter().zip(&b).map(|(x, y)| Ok(x.f_add(y)?)).collect::<Result<Vec<_>>>()?))
            }
            _ => Err(Error::Config("side networks of different architectures cannot be summed".into())),
        }
    }
}

/// The main network shipped with the repository (`assets/main-network`).
pub fn shipped_main_network() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/main-network"))
}

/// `path` as a report should name it: relative to the project when it lies inside it (the shipped networks),
/// so that committed results name `assets/main-network`, not the machine they ran on.
pub fn report_path(path: &Path) -> String {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(path).display().to_string()
}

/// The file holding a model folder's [`MainNetworkConfig`].
pub const CONFIG_FILE: &str = "config.json";

/// A main network: `predict(x_t, t, y)`.
pub struct MainNetwork {
    /// The variables (the backbone at the root with diffusers names, the label encoder under `label_encoder`).
    pub vs: nn::VarStore,
    /// The backbone.
    pub backbone: Backbone,
    /// The label encoder (class labels → `encoder_hidden_states`).
    pub label_encoder: LabelEncoder,
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
        let backbone = match &config.transformer {
            None => Backbone::UNet(UNet2DConditionModel::new(vs.root(), &config.unet).map_err(section("unet"))?),
            Some(t) => Backbone::Transformer(DiTModel::new(vs.root(), t).map_err(section("transformer"))?),
        };
        let label_encoder = LabelEncoder::new(vs.root() / "label_encoder", &config.label_encoder, config.label_dim())
            .map_err(section("label_encoder"))?;
        let objective = Objective::new(&config.objective).map_err(section("objective"))?;
        Ok(Self { vs, backbone, label_encoder, objective, config: config.clone() })
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
        crate::weights::load_into(&net.named_parameters(), crate::weights::read_tensors(&dir.join(weights))?, &dir.join(weights))?;
        Ok(net)
    }

    /// Stops gradients for every parameter, as a frozen main network under a side network must be.
    pub fn freeze(&mut self) {
        self.vs.freeze();
    }

    /// Turns activation recomputation of the UNet's up path on or off (`train.gradient_checkpointing`, beside the
    /// side network's own; see [`UNet2DConditionModel::set_gradient_checkpointing`]). A transformer main network
    /// has none and refuses it.
    pub fn set_gradient_checkpointing(&self, on: bool) -> Result<()> {
        match &self.backbone {
            Backbone::UNet(u) => u.set_gradient_checkpointing(on),
            Backbone::Transformer(_) if on => Err(Error::Config(
                "train.gradient_checkpointing is built for UNet networks only; set it to false for a transformer".into(),
            )),
            Backbone::Transformer(_) => Ok(()),
        }
    }

    /// Holds the frozen weights in `precision`'s reduced dtype (diffusers' `weight_dtype`; see
    /// [`precision::hold_in`](crate::models::precision::hold_in)). Call it after [`MainNetwork::freeze`] and
    /// after a side network copied its weights from this one, so that the copies start from the f32 values.
    /// Forwards compute in f32 outside an autocast region and in the reduced dtype inside one.
    pub fn hold_weights_in(&mut self, precision: crate::models::precision::MixedPrecision) -> Result<()> {
        crate::models::precision::hold_in(&mut self.vs, precision)
    }

    /// Saves `config.json` and `model.safetensors` into `dir` (created), each written atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_model_dir(dir, &self.config.to_json()?, &self.named_parameters())
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
        let encoder_hidden_states = self.label_encoder.forward(y)?;
        self.forward(x_t, model_t, &encoder_hidden_states, None)
    }

    /// The UNet backbone, or an error naming `what` needs it (a transformer main network).
    pub fn unet(&self, what: &str) -> Result<&UNet2DConditionModel> {
        match &self.backbone {
            Backbone::UNet(u) => Ok(u),
            Backbone::Transformer(_) => {
                Err(Error::Config(format!("{what} needs a UNet main network; this one is a transformer")))
            }
        }
    }

    /// The backbone's prediction for label tokens `encoder_hidden_states` with the side networks' `residuals` added.
    pub fn forward(
        &self,
        x_t: &Tensor,
        model_t: &Tensor,
        encoder_hidden_states: &Tensor,
        residuals: Option<&Residuals>,
    ) -> Result<Tensor> {
        self.up(&self.down_mid(x_t, model_t, encoder_hidden_states)?, residuals)
    }

    /// The part of the forward pass that residuals do not change (see [`SharedPass`]).
    pub fn down_mid(&self, x_t: &Tensor, model_t: &Tensor, encoder_hidden_states: &Tensor) -> Result<SharedPass> {
        Ok(match &self.backbone {
            Backbone::UNet(u) => SharedPass::UNet(u.down_mid(x_t, model_t, encoder_hidden_states)?),
            Backbone::Transformer(d) => SharedPass::Transformer(d.embed(x_t, model_t, encoder_hidden_states)?),
        })
    }

    /// The rest of the forward pass from `shared`, with the side networks' `residuals` added.
    pub fn up(&self, shared: &SharedPass, residuals: Option<&Residuals>) -> Result<Tensor> {
        match (&self.backbone, shared, residuals) {
            (Backbone::UNet(u), SharedPass::UNet(enc), None) => u.up(enc, None, None),
            (Backbone::UNet(u), SharedPass::UNet(enc), Some(Residuals::UNet { down, mid })) => {
                u.up(enc, Some(down), Some(mid))
            }
            (Backbone::Transformer(d), SharedPass::Transformer(emb), None) => d.run_blocks(emb, None),
            (Backbone::Transformer(d), SharedPass::Transformer(emb), Some(Residuals::Blocks(r))) => {
                d.run_blocks(emb, Some(r))
            }
            _ => Err(Error::Config(
                "the side network's residuals do not fit this main network's architecture (UNet vs transformer)".into(),
            )),
        }
    }

    /// Generates one sample per label from noise drawn with `seed`.
    pub fn sample(&self, y: &Tensor, sampler: &SamplerConfig, seed: u64) -> Result<Tensor> {
        let sampler = Sampler::new(&self.objective, sampler.clone())?;
        let (c, s) = (self.config.in_channels(), self.config.sample_size());
        let n = y.size()[0];
        tch::manual_seed(seed as i64);
        let x_t = crate::rng::randn_on_host(&[n, c, s, s], Kind::Float, self.vs.device())?;
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

/// Writes a model folder: `config.json` and `model.safetensors`, each atomically.
pub fn save_model_dir<C: Serialize>(dir: &Path, config: &C, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::weights::write_tensors(&dir.join("model.safetensors"), tensors)?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Config(e.to_string()))?;
    crate::weights::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}
