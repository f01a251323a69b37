//! diffusers' `ControlNetModel` for our `UNet2DConditionModel`: a trainable copy of the UNet's
//! encoder (down blocks + mid block) plus a small conditioning embedding, whose features reach the
//! frozen UNet through zero-initialised 1×1 convolutions added to its skip connections and
//! mid-block output (spec §1). Parameter names are diffusers' checkpoint keys.
//!
//! For LISA (spec §4) the forward pass can also return the *hooked* side feature: the input of one
//! chosen zero convolution (`mid` or `down_i`), not detached, on which the LISA decoder is trained.
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use super::blocks::{Conv2d, DownBlock2D, TimestepEmbedding, Timesteps, UNetMidBlock2DCrossAttn};
use super::checkpoint::checkpoint;
use super::unet::{UNetConfig, UNetDownMid};
use crate::{Error, Result};

/// Prefixes of the parameters a ControlNet shares (by name and shape) with its UNet.
pub const SHARED_PREFIXES: [&str; 4] = ["conv_in.", "time_embedding.", "down_blocks.", "mid_block."];

/// The fields of diffusers' `ControlNetModel` config that this model uses. The UNet fields are
/// flattened, so a diffusers ControlNet `config.json` (one flat object) deserialises directly;
/// missing fields take the values of [`ControlNetConfig::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    /// The UNet architecture the side network copies. Only its encoder fields matter
    /// (`in_channels`, `block_out_channels`, `layers_per_block`, `down_block_types`,
    /// `mid_block_type`, attention and norm settings, time projection).
    #[serde(flatten)]
    pub unet: UNetConfig,
    /// Channels of the visual condition `c` (diffusers' default 3 for RGB; ours 1).
    pub conditioning_channels: i64,
    /// Widths of the conditioning embedding's stages (diffusers: `(16, 32, 96, 256)`; ours `[16, 32]`).
    pub conditioning_embedding_out_channels: Vec<i64>,
    /// How much smaller the embedding's output is than the condition: a power of two `2^m` with
    /// `m ≤ len(conditioning_embedding_out_channels) − 1`; the FIRST `m` stage transitions are
    /// stride-2 convolutions, the others stride 1.
    ///
    /// Why not always stride 2 like diffusers: there every stage transition halves the resolution
    /// (three of them: ×8) because SD's condition is a 512-px image while its latents are 64 px.
    /// Our model works in pixel space, so the condition already has the sample's resolution and
    /// the embedding must keep it (`1`, the default). Use `8` with four stages to reproduce SD.
    pub conditioning_downscale: i64,
    /// How the side features reach the main network. `None` (the default, diffusers' ControlNet): a
    /// zero-initialised 1×1 convolution per site. `Some(s)`: ControlNeXt's cross-normalization in place of
    /// every zero convolution, the side feature re-centred and re-scaled per example to the main network's
    /// feature at the same site ([`cross_normalize`]) and added times `s`; such a network has no zero
    /// convolutions and no diffusers equivalent. Not a diffusers field (absent from a diffusers config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_norm_scale: Option<f64>,
}

impl Default for ControlNetConfig {
    /// The side network of the default UNet (32×32 single-channel images) for a single-channel
    /// condition at the sample's resolution: embedding stages 16 → 32 (= `block_out_channels[0]`
    /// after `conv_out`), no downsampling.
    fn default() -> Self {
        Self {
            unet: UNetConfig::default(),
            conditioning_channels: 1,
            conditioning_embedding_out_channels: vec![16, 32],
            conditioning_downscale: 1,
            cross_norm_scale: None,
        }
    }
}

impl ControlNetConfig {
    /// The default side-network settings for the UNet configured by `unet`.
    pub fn for_unet(unet: &UNetConfig) -> Self {
        Self { unet: unet.clone(), ..Self::default() }
    }

    /// The side network diffusers' `ControlNetModel.from_unet(unet)` builds for a latent UNet: an RGB
    /// condition at the image's resolution, embedded by stages `(16, 32, 96, 256)` that halve it at every
    /// transition (×8, the VAE's factor), so the embedding meets the latents at their size.
    pub fn diffusers_from_unet(unet: &UNetConfig) -> Self {
        Self {
            unet: unet.clone(),
            conditioning_channels: 3,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            conditioning_downscale: 8,
            cross_norm_scale: None,
        }
    }

    /// Checks the config; every error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        if self.conditioning_channels <= 0 {
            return Err(Error::Config(format!(
                "conditioning_channels must be positive, got {}",
                self.conditioning_channels
            )));
        }
        let ch = &self.conditioning_embedding_out_channels;
        if ch.is_empty() || ch.iter().any(|&c| c <= 0) {
            return Err(Error::Config(format!(
                "conditioning_embedding_out_channels must be a non-empty list of positive widths, got {ch:?}"
            )));
        }
        let d = self.conditioning_downscale;
        if d <= 0 || d & (d - 1) != 0 {
            return Err(Error::Config(format!(
                "conditioning_downscale must be a power of two (1, 2, 4, ...), got {d}"
            )));
        }
        if self.num_stride2() > ch.len() - 1 {
            return Err(Error::Config(format!(
                "conditioning_downscale {d} needs {} stride-2 stages but conditioning_embedding_out_channels \
                 {ch:?} has only {} stage transitions; add widths or lower the downscale",
                self.num_stride2(),
                ch.len() - 1
            )));
        }
        if let Some(scale) = self.cross_norm_scale {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::Config(format!(
                    "cross_norm_scale must be a positive number (ControlNeXt's recipe: 0.35), got {scale}"
                )));
            }
        }
        Ok(())
    }

    /// Number of stride-2 convolutions in the conditioning embedding (`log2(conditioning_downscale)`).
    pub fn num_stride2(&self) -> usize {
        self.conditioning_downscale.max(1).trailing_zeros() as usize
    }

    /// The layers a LISA hook can attach to, for an `height`×`width` sample: `down_0 ..` (one per
    /// UNet skip sample, `conv_in`'s output + condition first) then `mid`.
    pub fn hookable_layers(&self, height: i64, width: i64) -> Vec<HookableLayer> {
        let mut out: Vec<HookableLayer> = self
            .unet
            .skip_shapes(height, width)
            .into_iter()
            .enumerate()
            .map(|(i, [c, h, w])| HookableLayer { hook: Hook::Down(i), channels: c, height: h, width: w })
            .collect();
        let [c, h, w] = self.unet.mid_shape(height, width);
        out.push(HookableLayer { hook: Hook::Mid, channels: c, height: h, width: w });
        out
    }
}

/// Which side feature LISA trains on: the input of one zero convolution (spec §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Hook {
    /// The mid-block output, input of `controlnet_mid_block` (the authors' default). For a transformer
    /// side network: its last block (`block_{N−1}`), the deepest side feature.
    Mid,
    /// Skip sample `i`, input of `controlnet_down_blocks.i` (the authors' recipe: `down_5`).
    Down(usize),
    /// Transformer side networks: the output tokens of side block `i`, input of `controlnet_blocks.i`.
    Block(usize),
}

impl FromStr for Hook {
    type Err = Error;
    /// Parses `"mid"`, `"down_<i>"` or `"block_<i>"`.
    fn from_str(s: &str) -> Result<Self> {
        if s == "mid" {
            return Ok(Hook::Mid);
        }
        let index = |prefix: &str| s.strip_prefix(prefix).and_then(|i| i.parse::<usize>().ok());
        index("down_").map(Hook::Down).or_else(|| index("block_").map(Hook::Block)).ok_or_else(|| {
            Error::Config(format!(
                "hook {s:?} is not \"mid\" or \"down_<i>\" (UNet side networks, e.g. \"down_5\") or \"block_<i>\" \
                 (transformer side networks)"
            ))
        })
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Mid => write!(f, "mid"),
            Hook::Down(i) => write!(f, "down_{i}"),
            Hook::Block(i) => write!(f, "block_{i}"),
        }
    }
}

impl TryFrom<String> for Hook {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Hook> for String {
    fn from(h: Hook) -> String {
        h.to_string()
    }
}

/// A layer a [`Hook`] can select, with the shape of its feature for a given input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookableLayer {
    /// The hook selecting it.
    pub hook: Hook,
    /// Channels of the hooked feature.
    pub channels: i64,
    /// Height of the hooked feature.
    pub height: i64,
    /// Width of the hooked feature.
    pub width: i64,
}

/// A convolution whose weight and bias start at exactly zero ("zero module").
fn zero_conv(p: nn::Path, cin: i64, cout: i64, k: i64, padding: i64) -> Result<Conv2d> {
    let c = Conv2d::new(p, cin, cout, k, 1, padding)?;
    super::blocks::zero_init(&c.weight, c.bias.as_ref())?;
    Ok(c)
}

/// `timesteps` as a [batch] tensor: [B] as is, a scalar or [1] broadcast to the batch.
pub(crate) fn expand_timesteps(timesteps: &Tensor, batch: i64) -> Result<Tensor> {
    Ok(match timesteps.size().as_slice() {
        [] => timesteps.f_expand([batch], false)?,
        [1] if batch != 1 => timesteps.f_expand([batch], false)?,
        [b] if *b == batch => timesteps.shallow_clone(),
        s => return Err(Error::Config(format!("timesteps must have shape [{batch}] (or be a scalar), got {s:?}"))),
    })
}

/// diffusers' `ControlNetConditioningEmbedding`: `conv_in` (3×3), then per stage transition
/// `blocks.2j` (3×3, width kept) and `blocks.2j+1` (3×3, to the next width, stride 2 or 1, see
/// [`ControlNetConfig::conditioning_downscale`]), then the zero-initialised `conv_out` (3×3);
/// SiLU after every convolution but `conv_out`.
#[derive(Debug)]
pub struct ControlNetConditioningEmbedding {
    /// `conv_in`: condition channels → first width.
    pub conv_in: Conv2d,
    /// `blocks.N`.
    pub blocks: Vec<Conv2d>,
    /// `conv_out`: last width → `block_out_channels[0]`, zero-initialised.
    pub conv_out: Conv2d,
}

impl ControlNetConditioningEmbedding {
    /// Builds the embedding under `p` (`controlnet_cond_embedding`) producing `out_channels`.
    pub fn new(p: nn::Path, out_channels: i64, cfg: &ControlNetConfig) -> Result<Self> {
        let ch = &cfg.conditioning_embedding_out_channels;
        let conv_in = Conv2d::new(&p / "conv_in", cfg.conditioning_channels, ch[0], 3, 1, 1)?;
        let mut blocks = Vec::with_capacity(2 * (ch.len() - 1));
        for j in 0..ch.len() - 1 {
            let stride = if j < cfg.num_stride2() { 2 } else { 1 };
            blocks.push(Conv2d::new(&p / "blocks" / (2 * j), ch[j], ch[j], 3, 1, 1)?);
            blocks.push(Conv2d::new(&p / "blocks" / (2 * j + 1), ch[j], ch[j + 1], 3, stride, 1)?);
        }
        let conv_out = zero_conv(&p / "conv_out", ch[ch.len() - 1], out_channels, 3, 1)?;
        Ok(Self { conv_in, blocks, conv_out })
    }

    /// Embeds the condition `c` [B, conditioning_channels, H, W].
    pub fn forward(&self, c: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(c)?.f_silu()?;
        for b in &self.blocks {
            h = b.forward(&h)?.f_silu()?;
        }
        self.conv_out.forward(&h)
    }
}

/// The output of [`ControlNetModel::forward`].
#[derive(Debug)]
pub struct ControlNetOutput {
    /// One residual per UNet skip sample, in the UNet's order (`down_block_additional_residuals`).
    pub down_block_res_samples: Vec<Tensor>,
    /// The residual for the UNet's mid-block output (`mid_block_additional_residual`).
    pub mid_block_res_sample: Tensor,
    /// The hooked side feature (input of the selected zero conv), when a hook was given.
    pub hooked: Option<Tensor>,
}

/// diffusers' `ControlNetModel` (no class/addition embeddings, no guess mode).
#[derive(Debug)]
pub struct ControlNetModel {
    /// The config it was built from.
    pub config: ControlNetConfig,
    /// Sinusoidal timestep projection (`time_proj`, no parameters).
    pub time_proj: Timesteps,
    /// `time_embedding`.
    pub time_embedding: TimestepEmbedding,
    /// `conv_in`.
    pub conv_in: Conv2d,
    /// `controlnet_cond_embedding`.
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding,
    /// `down_blocks.N`, built exactly as the UNet's (shared with the autograd graph when recomputed).
    pub down_blocks: Vec<Arc<DownBlock2D>>,
    /// `controlnet_down_blocks.N`: zero 1×1 convs, one per skip sample (none with cross-normalization).
    pub controlnet_down_blocks: Vec<Conv2d>,
    /// `mid_block`, built exactly as the UNet's (shared with the autograd graph when recomputed).
    pub mid_block: Arc<UNetMidBlock2DCrossAttn>,
    /// `controlnet_mid_block`: zero 1×1 conv (none with cross-normalization).
    pub controlnet_mid_block: Option<Conv2d>,
    /// Activation recomputation (diffusers' `gradient_checkpointing`): each down block and the mid block keep
    /// only their inputs in the forward pass and run again in backward ([`crate::models::checkpoint`]).
    pub gradient_checkpointing: bool,
}

impl ControlNetModel {
    /// Builds a freshly initialised model under `p` after validating `cfg`; the zero convs and the
    /// embedding's `conv_out` start at exactly zero.
    pub fn new(p: nn::Path, cfg: &ControlNetConfig) -> Result<Self> {
        cfg.validate()?;
        let u = &cfg.unet;
        let n = u.block_out_channels.len();
        let c0 = u.block_out_channels[0];
        let time_proj = Timesteps::new(c0, u.flip_sin_to_cos, u.freq_shift, p.device())?;
        let time_embedding = TimestepEmbedding::new(&p / "time_embedding", c0, u.time_embed_dim())?;
        let conv_in = Conv2d::new(&p / "conv_in", u.in_channels, c0, 3, 1, 1)?;
        let controlnet_cond_embedding =
            ControlNetConditioningEmbedding::new(&p / "controlnet_cond_embedding", c0, cfg)?;
        let down_blocks = (0..n)
            .map(|i| Ok(Arc::new(DownBlock2D::new(&p / "down_blocks" / i, &u.down_block_config(i))?)))
            .collect::<Result<Vec<_>>>()?;
        let zero_convs = cfg.cross_norm_scale.is_none();
        let controlnet_down_blocks = u
            .skip_channels()
            .into_iter()
            .enumerate()
            .filter(|_| zero_convs)
            .map(|(i, c)| zero_conv(&p / "controlnet_down_blocks" / i, c, c, 1, 0))
            .collect::<Result<Vec<_>>>()?;
        let mid_block = Arc::new(UNetMidBlock2DCrossAttn::new(&p / "mid_block", &u.mid_block_config())?);
        let cm = u.block_out_channels[n - 1];
        let controlnet_mid_block =
            zero_convs.then(|| zero_conv(&p / "controlnet_mid_block", cm, cm, 1, 0)).transpose()?;
        Ok(Self {
            config: cfg.clone(),
            time_proj,
            time_embedding,
            conv_in,
            controlnet_cond_embedding,
            down_blocks,
            controlnet_down_blocks,
            mid_block,
            controlnet_mid_block,
            gradient_checkpointing: false,
        })
    }

    /// Builds the model under `p` and initialises its copy of the UNet encoder from the UNet's
    /// parameters `unet_params` (names as in the UNet's `VarStore`, e.g. `MainNetwork::vs.variables()`):
    /// every `conv_in.*`, `time_embedding.*`, `down_blocks.*` and `mid_block.*` is copied under
    /// no-grad; the conditioning embedding and the zero convs keep their initialisation.
    ///
    /// Errors when a shared parameter of either model is missing from the other or differs in
    /// shape (the configs describe different encoders). To list its own names the model is also
    /// built once in a scratch CPU `VarStore` (dropped on return), as a `nn::Path` cannot enumerate
    /// its variables.
    pub fn from_unet(p: nn::Path, unet_params: &HashMap<String, Tensor>, cfg: &ControlNetConfig) -> Result<Self> {
        // Names are checked on the scratch copy first so that a mismatch leaves `p` untouched.
        let scratch = nn::VarStore::new(Device::Cpu);
        Self::new(scratch.root(), cfg)?;
        let shared = |name: &str| SHARED_PREFIXES.iter().any(|s| name.starts_with(s));
        let mine = scratch.variables();
        let mut missing: Vec<&str> =
            unet_params.keys().filter(|k| shared(k) && !mine.contains_key(*k)).map(|k| k.as_str()).collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            return Err(Error::Config(format!(
                "ControlNet from UNet: the ControlNet has no parameter {} (and {} more) that the UNet has; \
                 give the ControlNet the UNet's encoder config",
                missing[0],
                missing.len() - 1
            )));
        }
        let mut names: Vec<String> = mine.keys().filter(|k| shared(k)).cloned().collect();
        names.sort_unstable();
        for name in &names {
            let src = unet_params.get(name).ok_or_else(|| {
                Error::Config(format!(
                    "ControlNet from UNet: the UNet has no parameter {name}; give the ControlNet the UNet's encoder config"
                ))
            })?;
            if src.size() != mine[name].size() {
                return Err(Error::Config(format!(
                    "ControlNet from UNet: {name} has shape {:?} in the UNet but {:?} in the ControlNet",
                    src.size(),
                    mine[name].size()
                )));
            }
        }
        drop(mine);
        drop(scratch);
        let model = Self::new(p.clone(), cfg)?;
        tch::no_grad(|| -> Result<()> {
            for name in &names {
                // Both exist with equal shapes: checked above on an identical build.
                let (src, dst) = (&unet_params[name], lookup(&p, name));
                let dst = dst.ok_or_else(|| {
                    Error::Config(format!("ControlNet from UNet: variable {name} not found under the given path"))
                })?;
                let _ = dst.shallow_clone().f_copy_(src)?;
            }
            Ok(())
        })?;
        Ok(model)
    }

    /// The layers a hook can select for an `height`×`width` sample (see
    /// [`ControlNetConfig::hookable_layers`]).
    pub fn hookable_layers(&self, height: i64, width: i64) -> Vec<HookableLayer> {
        self.config.hookable_layers(height, width)
    }

    /// Number of skip samples (= residuals, one per site; zero convs in `controlnet_down_blocks` unless
    /// cross-normalized).
    pub fn num_skips(&self) -> usize {
        self.config.unet.skip_channels().len()
    }

    /// Runs the side network on `sample` [B, in, H, W] at `timesteps` ([B] or scalar) with
    /// `encoder_hidden_states` [B, M, cross_attention_dim] and visual condition `controlnet_cond`
    /// [B, conditioning_channels, H·d, W·d] (d = `conditioning_downscale`). The residuals are the
    /// zero-conv outputs times `conditioning_scale`; `hook` selects the side feature returned in
    /// [`ControlNetOutput::hooked`] (the zero conv's input, still attached to the graph).
    ///
    /// `main`: the main UNet's own encoder pass on the same inputs ([`UNet2DConditionModel::down_mid`]),
    /// which a cross-normalized network ([`ControlNetConfig::cross_norm_scale`]) needs and a zero-conv one
    /// ignores.
    ///
    /// [`UNet2DConditionModel::down_mid`]: super::unet::UNet2DConditionModel::down_mid
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        conditioning_scale: f64,
        hook: Option<Hook>,
        main: Option<&UNetDownMid>,
    ) -> Result<ControlNetOutput> {
        let exists = match hook {
            None | Some(Hook::Mid) => true,
            Some(Hook::Down(i)) => i < self.num_skips(),
            Some(Hook::Block(_)) => false,
        };
        if !exists {
            return Err(Error::Config(format!(
                "hook {} does not exist: the side network has down_0 .. down_{} and mid",
                hook.map(|h| h.to_string()).unwrap_or_default(),
                self.num_skips() - 1
            )));
        }
        let t = expand_timesteps(timesteps, sample.size4()?.0)?;
        let emb = self.time_proj.forward(&t)?;
        let kind = super::precision::activation_kind(self.time_embedding.linear_1.weight.kind());
        let emb = if emb.kind() == kind { emb } else { emb.f_to_kind(kind)? };
        let temb = self.time_embedding.forward(&emb)?;

        let h = self.conv_in.forward(sample)?;
        let cond = self.controlnet_cond_embedding.forward(controlnet_cond)?;
        if cond.size() != h.size() {
            return Err(Error::Config(format!(
                "controlnet_cond {:?} embeds to {:?} but the sample's features are {:?}; the condition must be \
                 conditioning_downscale ({}) times the sample's size, with conditioning_channels ({}) channels",
                controlnet_cond.size(),
                cond.size(),
                h.size(),
                self.config.conditioning_downscale,
                self.config.conditioning_channels
            )));
        }
        let mut h = h.f_add(&cond)?;
        let mut skips = Vec::with_capacity(self.num_skips());
        skips.push(h.shallow_clone());
        for b in &self.down_blocks {
            h = if self.gradient_checkpointing {
                let block = Arc::clone(b);
                let outputs = checkpoint(&[&h, &temb, encoder_hidden_states], move |xs| {
                    let mut block_skips = Vec::new();
                    let out = block.forward(&xs[0], &xs[1], Some(&xs[2]), &mut block_skips)?;
                    Ok(std::iter::once(out).chain(block_skips).collect())
                })?;
                let mut outputs = outputs.into_iter();
                let out = outputs.next().ok_or_else(|| Error::Training("a recomputed down block returned nothing".into()))?;
                skips.extend(outputs);
                out
            } else {
                b.forward(&h, &temb, Some(encoder_hidden_states), &mut skips)?
            };
        }
        let mid = if self.gradient_checkpointing {
            let block = Arc::clone(&self.mid_block);
            let mut outputs = checkpoint(&[&h, &temb, encoder_hidden_states], move |xs| {
                Ok(vec![block.forward(&xs[0], &xs[1], &xs[2])?])
            })?;
            outputs.pop().ok_or_else(|| Error::Training("the recomputed mid block returned nothing".into()))?
        } else {
            self.mid_block.forward(&h, &temb, encoder_hidden_states)?
        };
        let hooked = match hook {
            None => None,
            Some(Hook::Mid) => Some(mid.shallow_clone()),
            Some(Hook::Down(i)) => Some(skips[i].shallow_clone()),
            Some(Hook::Block(_)) => None, // rejected above
        };
        let (down_block_res_samples, mid_block_res_sample) = match (self.config.cross_norm_scale, main) {
            (None, _) => {
                let mid_conv = self
                    .controlnet_mid_block
                    .as_ref()
                    .ok_or_else(|| Error::Config("a zero-conv ControlNet has no controlnet_mid_block".into()))?;
                let down = skips
                    .iter()
                    .zip(&self.controlnet_down_blocks)
                    .map(|(s, c)| Ok(c.forward(s)?.f_mul_scalar(conditioning_scale)?))
                    .collect::<Result<Vec<_>>>()?;
                (down, mid_conv.forward(&mid)?.f_mul_scalar(conditioning_scale)?)
            }
            (Some(scale), Some(main)) => {
                if main.down_block_res_samples.len() != skips.len() {
                    return Err(Error::Config(format!(
                        "cross-normalization: the main network has {} skip samples but the side network {}",
                        main.down_block_res_samples.len(),
                        skips.len()
                    )));
                }
                let scale = scale * conditioning_scale;
                let down = skips
                    .iter()
                    .zip(&main.down_block_res_samples)
                    .map(|(s, m)| Ok(cross_normalize(s, m)?.f_mul_scalar(scale)?))
                    .collect::<Result<Vec<_>>>()?;
                (down, cross_normalize(&mid, &main.mid)?.f_mul_scalar(scale)?)
            }
            (Some(_), None) => {
                return Err(Error::Config(
                    "a cross-normalized side network needs the main network's encoder features at each site; \
                     pass the main UNet's down_mid output"
                        .into(),
                ))
            }
        };
        Ok(ControlNetOutput { down_block_res_samples, mid_block_res_sample, hooked })
    }
}

/// Guards the division by a side feature's standard deviation (a constant feature maps to the main one's mean).
pub const CROSS_NORM_EPS: f64 = 1e-6;

/// ControlNeXt's cross-normalization of a side feature `h_c` [B, …] to the main network's feature `h_m`
/// at the same site: per example, over all its other dimensions,
/// `(h_c − mean(h_c)) · std(h_m) / (std(h_c) + ε) + mean(h_m)` (standard deviations unbiased, as
/// `torch.std`'s; ε = [`CROSS_NORM_EPS`]). Computed in `h_c`'s precision; the gradient flows through
/// `h_c` only where `h_m` carries none (the frozen main network's).
pub fn cross_normalize(h_c: &Tensor, h_m: &Tensor) -> Result<Tensor> {
    if h_c.size() != h_m.size() {
        return Err(Error::Config(format!(
            "cross-normalization: the side feature {:?} and the main feature {:?} differ in shape",
            h_c.size(),
            h_m.size()
        )));
    }
    let h_m = if h_m.kind() == h_c.kind() { h_m.shallow_clone() } else { h_m.f_to_kind(h_c.kind())? };
    let dims: Vec<i64> = (1..h_c.dim() as i64).collect();
    let stats = |h: &Tensor| -> Result<(Tensor, Tensor)> {
        Ok((h.f_mean_dim(dims.as_slice(), true, None)?, h.f_std_dim(dims.as_slice(), true, true)?))
    };
    let (mean_c, std_c) = stats(h_c)?;
    let (mean_m, std_m) = stats(&h_m)?;
    Ok((h_c - mean_c).f_mul(&std_m)?.f_div(&(std_c + CROSS_NORM_EPS))?.f_add(&mean_m)?)
}

/// The variable `name` (dotted, e.g. `down_blocks.0.resnets.0.conv1.weight`) under `p`.
fn lookup(p: &nn::Path, name: &str) -> Option<Tensor> {
    let parts: Vec<&str> = name.split('.').collect();
    let (last, dirs) = parts.split_last()?;
    let q = dirs.iter().fold(p.clone(), |q, d| q / *d);
    q.get(last)
}
