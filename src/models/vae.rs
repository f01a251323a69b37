//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE): an encoder from images to the parameters of
//! a diagonal Gaussian over latents, and a decoder back, with diffusers' parameter names
//! (`encoder.down_blocks.0.resnets.0.conv1.weight`, `quant_conv.weight`, ...).
//!
//! Latent diffusion trains on `scaling_factor · (z − shift_factor)` for `z` drawn from the encoder's
//! Gaussian ([`AutoencoderKL::encode_latents`]) and decodes `z = latents / scaling_factor +
//! shift_factor` ([`AutoencoderKL::decode_latents`]).
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use super::blocks::{Conv2d, GroupNorm, Linear, ResnetBlock2D, Upsample2D};
use super::diffusers::{named_variables, read_config, read_weights, CONFIG_FILE, WEIGHTS_FILE};
use crate::{Error, Result};

/// The fields of diffusers' `AutoencoderKL` config (`vae/config.json`) that this model uses;
/// missing ones take diffusers' defaults (SD's VAE needs its own config file, as diffusers does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: i64,
    /// Image channels out.
    pub out_channels: i64,
    /// `"DownEncoderBlock2D"` per level.
    pub down_block_types: Vec<String>,
    /// `"UpDecoderBlock2D"` per level.
    pub up_block_types: Vec<String>,
    /// Channels per level (the decoder uses them reversed).
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder level (decoder levels have one more).
    pub layers_per_block: i64,
    /// Only `"silu"` is supported.
    pub act_fn: String,
    /// Latent channels (4 for SD).
    pub latent_channels: i64,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// Nominal image size (informational).
    pub sample_size: i64,
    /// Latents are `scaling_factor · (z − shift_factor)` (SD1.5/2.1: 0.18215).
    pub scaling_factor: f64,
    /// See `scaling_factor` (SD: none, i.e. 0).
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` (1×1 on the Gaussian's parameters) exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` (1×1 on the latents before decoding) exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their attention.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL` defaults (one level of 64 channels), except the scaling factor, SD's.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Checks the config; every error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let err = |m: String| Err(Error::Config(format!("AutoencoderKL: {m}")));
        if n == 0 {
            return err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return err(format!(
                "block_out_channels has {n} entries but down_block_types has {} and up_block_types {}",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return err(format!("down block type {t:?} is not supported (only \"DownEncoderBlock2D\")"));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return err(format!("up block type {t:?} is not supported (only \"UpDecoderBlock2D\")"));
        }
        if self.act_fn != "silu" {
            return err(format!("act_fn {:?} is not supported (only \"silu\")", self.act_fn));
        }
        let g = self.norm_num_groups;
        if g <= 0 || self.block_out_channels.iter().any(|&c| c <= 0 || c % g != 0) {
            return err(format!(
                "every block_out_channels entry ({:?}) must be a positive multiple of norm_num_groups ({g})",
                self.block_out_channels
            ));
        }
        if self.in_channels <= 0 || self.out_channels <= 0 || self.latent_channels <= 0 || self.layers_per_block <= 0 {
            return err("in_channels, out_channels, latent_channels and layers_per_block must be positive".into());
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return err(format!("scaling_factor must be finite and non-zero, got {}", self.scaling_factor));
        }
        Ok(())
    }

    /// How much smaller the latents are than the images (`2^(levels − 1)`, 8 for SD).
    pub fn downscale(&self) -> i64 {
        1 << (self.block_out_channels.len().max(1) - 1)
    }
}

/// The single-head self-attention of the VAE's mid blocks (diffusers' `Attention` with a group norm
/// and a residual connection): `x + to_out(attention(group_norm(x)))` over the H·W positions.
#[derive(Debug)]
pub struct VaeAttention {
    /// `group_norm` (eps 1e-6).
    pub group_norm: GroupNorm,
    /// `to_q`, with bias.
    pub to_q: Linear,
    /// `to_k`, with bias.
    pub to_k: Linear,
    /// `to_v`, with bias.
    pub to_v: Linear,
    /// `to_out.0`, with bias.
    pub to_out: Linear,
}

impl VaeAttention {
    /// The block on `channels` channels under `p` (e.g. `encoder.mid_block.attentions.0`).
    pub fn new(p: nn::Path, channels: i64, groups: i64) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(&p / "group_norm", groups, channels, 1e-6)?,
            to_q: Linear::new(&p / "to_q", channels, channels, true)?,
            to_k: Linear::new(&p / "to_k", channels, channels, true)?,
            to_v: Linear::new(&p / "to_v", channels, channels, true)?,
            to_out: Linear::new(&p / "to_out" / 0, channels, channels, true)?,
        })
    }

    /// Applies the block to `x` [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.size4()?;
        let tokens = self.group_norm.forward(x)?.f_view([b, c, h * w])?.f_transpose(1, 2)?;
        // One head: [B, 1, HW, C].
        let head = |l: &Linear| -> Result<Tensor> { Ok(l.forward(&tokens)?.f_unsqueeze(1)?) };
        let (q, k, v) = (head(&self.to_q)?, head(&self.to_k)?, head(&self.to_v)?);
        let o = super::precision::attention(&q, &k, &v, false)?;
        let o = self.to_out.forward(&o.f_squeeze_dim(1)?)?;
        let o = o.f_transpose(1, 2)?.f_reshape([b, c, h, w])?;
        Ok(x.f_add(&o)?)
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: `resnets.0`, `attentions.0`, `resnets.1`, no
/// time embedding.
#[derive(Debug)]
pub struct VaeMidBlock {
    /// The two residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// The attention between them (absent with `mid_block_add_attention = false`).
    pub attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    /// The block on `channels` channels under `p`.
    pub fn new(p: nn::Path, channels: i64, groups: i64, attention: bool) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new_without_time(&p / "resnets" / i, channels, channels, groups, 1e-6))
            .collect::<Result<Vec<_>>>()?;
        let attention =
            if attention { Some(VaeAttention::new(&p / "attentions" / 0, channels, groups)?) } else { None };
        Ok(Self { resnets, attention })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward_without_time(x)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward_without_time(&h)
    }
}

/// diffusers' `DownEncoderBlock2D`: `resnets.N`, then `downsamplers.0.conv` (3×3, stride 2, no
/// padding, after padding the input by one zero row and column at the bottom and right, as
/// diffusers' `Downsample2D` with `padding=0` does).
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    /// The residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// The downsampling convolution, absent in the last block.
    pub downsampler: Option<Conv2d>,
}

impl DownEncoderBlock2D {
    /// Applies the block.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward_without_time(&h)?;
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h.f_constant_pad_nd([0, 1, 0, 1])?)?;
        }
        Ok(h)
    }
}

/// diffusers' `UpDecoderBlock2D`: `resnets.N`, then `upsamplers.0` (nearest ×2, 3×3 conv).
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    /// The residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// The upsampler, absent in the last block.
    pub upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// Applies the block.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward_without_time(&h)?;
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, None)?;
        }
        Ok(h)
    }
}

/// diffusers' VAE `Encoder`: image → `2 · latent_channels` maps (mean and log-variance).
#[derive(Debug)]
pub struct Encoder {
    /// `conv_in`.
    pub conv_in: Conv2d,
    /// `down_blocks.N`.
    pub down_blocks: Vec<DownEncoderBlock2D>,
    /// `mid_block`.
    pub mid_block: VaeMidBlock,
    /// `conv_norm_out` (eps 1e-6).
    pub conv_norm_out: GroupNorm,
    /// `conv_out`.
    pub conv_out: Conv2d,
}

impl Encoder {
    /// Builds the encoder under `p` (`encoder`).
    pub fn new(p: nn::Path, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::new(&p / "conv_in", cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let q = &p / "down_blocks" / i;
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { ch[i] };
                    ResnetBlock2D::new_without_time(&q / "resnets" / j, c, ch[i], g, 1e-6)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Conv2d::new(&q / "downsamplers" / 0 / "conv", ch[i], ch[i], 3, 2, 0)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D { resnets, downsampler });
        }
        let mid_block = VaeMidBlock::new(&p / "mid_block", ch[n - 1], g, cfg.mid_block_add_attention)?;
        let conv_norm_out = GroupNorm::new(&p / "conv_norm_out", g, ch[n - 1], 1e-6)?;
        let conv_out = Conv2d::new(&p / "conv_out", ch[n - 1], 2 * cfg.latent_channels, 3, 1, 1)?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_out })
    }

    /// Encodes `x` [B, in, H, W] into [B, 2·latent, H/d, W/d].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.f_silu()?)
    }
}

/// diffusers' VAE `Decoder`: latents → image.
#[derive(Debug)]
pub struct Decoder {
    /// `conv_in`.
    pub conv_in: Conv2d,
    /// `mid_block`.
    pub mid_block: VaeMidBlock,
    /// `up_blocks.N`, lowest resolution first.
    pub up_blocks: Vec<UpDecoderBlock2D>,
    /// `conv_norm_out` (eps 1e-6).
    pub conv_norm_out: GroupNorm,
    /// `conv_out`.
    pub conv_out: Conv2d,
}

impl Decoder {
    /// Builds the decoder under `p` (`decoder`).
    pub fn new(p: nn::Path, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::new(&p / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1)?;
        let mid_block = VaeMidBlock::new(&p / "mid_block", rev[0], g, cfg.mid_block_add_attention)?;
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let q = &p / "up_blocks" / i;
            let prev = if i == 0 { rev[0] } else { rev[i - 1] };
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { prev } else { rev[i] };
                    ResnetBlock2D::new_without_time(&q / "resnets" / j, c, rev[i], g, 1e-6)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n { Some(Upsample2D::new(&q / "upsamplers" / 0, rev[i])?) } else { None };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
        }
        let conv_norm_out = GroupNorm::new(&p / "conv_norm_out", g, rev[n - 1], 1e-6)?;
        let conv_out = Conv2d::new(&p / "conv_out", rev[n - 1], cfg.out_channels, 3, 1, 1)?;
        Ok(Self { conv_in, mid_block, up_blocks, conv_norm_out, conv_out })
    }

    /// Decodes `z` [B, latent, h, w] into [B, out, h·d, w·d].
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.f_silu()?)
    }
}

/// The encoder's output: a diagonal Gaussian over latents (diffusers' `DiagonalGaussianDistribution`).
#[derive(Debug)]
pub struct DiagonalGaussian {
    /// The mean [B, latent, h, w].
    pub mean: Tensor,
    /// The log-variance, clamped to [−30, 20] as in diffusers.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `moments` [B, 2·latent, h, w] into mean and (clamped) log-variance.
    pub fn new(moments: &Tensor) -> Result<Self> {
        let parts = moments.f_chunk(2, 1)?;
        Ok(Self { mean: parts[0].shallow_clone(), logvar: parts[1].f_clamp(-30.0, 20.0)? })
    }

    /// A sample `mean + exp(logvar / 2) · ε`, ε drawn from libtorch's generator (seed it with
    /// `tch::manual_seed` for reproducibility).
    pub fn sample(&self) -> Result<Tensor> {
        let std = self.logvar.f_mul_scalar(0.5)?.f_exp()?;
        Ok(self.mean.f_add(&std.f_mul(&self.mean.f_randn_like()?)?)?)
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    /// The config it was built from.
    pub config: VaeConfig,
    /// `encoder`.
    pub encoder: Encoder,
    /// `decoder`.
    pub decoder: Decoder,
    /// `quant_conv` (1×1), when `use_quant_conv`.
    pub quant_conv: Option<Conv2d>,
    /// `post_quant_conv` (1×1), when `use_post_quant_conv`.
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Builds the model under `p` after validating `cfg`.
    pub fn new(p: nn::Path, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(&p / "encoder", cfg)?,
            decoder: Decoder::new(&p / "decoder", cfg)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(&p / "quant_conv", 2 * l, 2 * l, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(&p / "post_quant_conv", l, l, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// Loads a diffusers `AutoencoderKL` folder (`<model>/vae`) onto `device`. Checkpoints saved
    /// before diffusers 0.14 name the mid-block attention `query`/`key`/`value`/`proj_attn`; those
    /// names are mapped to `to_q`/`to_k`/`to_v`/`to_out.0` as diffusers does.
    pub fn load(dir: &Path, device: Device) -> Result<(nn::VarStore, Self)> {
        let cfg = read_config(dir)?;
        let path = dir.join(CONFIG_FILE);
        if let Some(c) = cfg.get("_class_name").and_then(|v| v.as_str()) {
            if c != "AutoencoderKL" {
                return Err(Error::format(&path, format!("this is a {c} config, not an AutoencoderKL one")));
            }
        }
        if let Some(t) = cfg.get("norm_type").and_then(|v| v.as_str()).filter(|t| *t != "group") {
            return Err(Error::format(
                &path,
                format!("AutoencoderKL: norm_type {t:?} is not supported (only \"group\")"),
            ));
        }
        let config: VaeConfig = serde_json::from_value(serde_json::Value::Object(cfg.clone()))
            .map_err(|e| Error::format(&path, format!("not an AutoencoderKL config: {e}")))?;
        config.validate().map_err(|e| Error::format(&path, e.to_string()))?;
        let vs = nn::VarStore::new(device);
        let model = Self::new(vs.root(), &config)?;
        let tensors = read_weights(dir, WEIGHTS_FILE)?.into_iter().map(|(n, t)| (rename_deprecated(&n), t)).collect();
        crate::weights::load_into(&named_variables(&vs), tensors, &dir.join(WEIGHTS_FILE))?;
        Ok((vs, model))
    }

    /// The Gaussian over latents of images `x` [B, in, H, W] in [−1, 1].
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussian::new(&moments)
    }

    /// Decodes latents `z` (unscaled) into images.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(q) => q.forward(z)?,
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }

    /// The latents a latent-diffusion model trains on: `scaling_factor · (z − shift_factor)` for a
    /// sample `z` of the encoder's Gaussian of `x`.
    pub fn encode_latents(&self, x: &Tensor) -> Result<Tensor> {
        self.model_latents(&self.encode(x)?.sample()?)
    }

    /// Model latents `scaling_factor · (z − shift_factor)` of a draw `z` from the encoder's Gaussian.
    pub fn model_latents(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.f_sub_scalar(self.config.shift_factor.unwrap_or(0.0))?.f_mul_scalar(self.config.scaling_factor)?)
    }

    /// Images from model latents: `decode(latents / scaling_factor + shift_factor)`.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z =
            latents.f_div_scalar(self.config.scaling_factor)?.f_add_scalar(self.config.shift_factor.unwrap_or(0.0))?;
        self.decode(&z)
    }
}

/// Maps the attention names of old VAE checkpoints to the current ones.
fn rename_deprecated(name: &str) -> String {
    for (old, new) in [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]
    {
        if name.contains(".attentions.") && name.contains(old) {
            return name.replacen(old, new, 1);
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deprecated_attention_names_are_mapped() {
        assert_eq!(
            rename_deprecated("encoder.mid_block.attentions.0.query.weight"),
            "encoder.mid_block.attentions.0.to_q.weight"
        );
        assert_eq!(
            rename_deprecated("decoder.mid_block.attentions.0.proj_attn.bias"),
            "decoder.mid_block.attentions.0.to_out.0.bias"
        );
        assert_eq!(rename_deprecated("encoder.conv_in.weight"), "encoder.conv_in.weight");
    }

    #[test]
    fn shapes_follow_the_config() {
        let cfg = VaeConfig {
            block_out_channels: vec![8, 16],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            norm_num_groups: 4,
            ..VaeConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let vae = AutoencoderKL::new(vs.root(), &cfg).unwrap();
        let x = Tensor::zeros([2, 3, 16, 16], (tch::Kind::Float, Device::Cpu));
        let g = vae.encode(&x).unwrap();
        assert_eq!(g.mean.size(), [2, 4, 8, 8]);
        assert_eq!(vae.decode(&g.mean).unwrap().size(), [2, 3, 16, 16]);
        assert_eq!(cfg.downscale(), 2);
    }
}
