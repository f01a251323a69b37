//! diffusers' `UNet2DConditionModel`: config, construction with diffusers' parameter names, and a
//! forward pass split into an encoder (down path + mid block) and a decoder (up path) so that a
//! frozen UNet's encoder can be computed once and its decoder run with several sets of ControlNet
//! residuals.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use super::blocks::{
    Conv2d, CrossAttnConfig, DownBlock2D, DownBlockConfig, GroupNorm, MidBlockConfig, TimestepEmbedding, Timesteps,
    UNetMidBlock2DCrossAttn, UpBlock2D, UpBlockConfig,
};
use super::checkpoint::checkpoint;
use crate::{Error, Result};

/// A config value given either once for all blocks or once per down block, as diffusers allows
/// for `attention_head_dim` and `transformer_layers_per_block` (`8` or `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    All(i64),
    /// One value per down block (up blocks use the list reversed, the mid block the last one).
    Each(Vec<i64>),
}

impl PerBlock {
    /// The value for down block `i` of `n`.
    fn get(&self, i: usize) -> i64 {
        match self {
            PerBlock::All(v) => *v,
            PerBlock::Each(v) => v[i],
        }
    }
    fn check(&self, name: &str, n: usize) -> Result<()> {
        let vals: Vec<i64> = match self {
            PerBlock::All(v) => vec![*v],
            PerBlock::Each(v) => {
                if v.len() != n {
                    return Err(Error::Config(format!(
                        "{name} lists {} values but there are {n} down blocks",
                        v.len()
                    )));
                }
                v.clone()
            }
        };
        if vals.iter().any(|&v| v <= 0) {
            return Err(Error::Config(format!("{name} must be positive, got {vals:?}")));
        }
        Ok(())
    }
}

/// The fields of diffusers' `UNet2DConditionModel` config (`config.json`) that this model uses;
/// other fields of a real config are ignored, and missing ones take the values of
/// [`UNetConfig::default`] (the small Fashion-MNIST model, not diffusers' SD defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Nominal input resolution (informational; any size works).
    pub sample_size: i64,
    /// Channels of the input sample.
    pub in_channels: i64,
    /// Channels of the output.
    pub out_channels: i64,
    /// Output channels of each down block (up blocks use them reversed).
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: i64,
    /// `"CrossAttnDownBlock2D"` or `"DownBlock2D"` per level.
    pub down_block_types: Vec<String>,
    /// `"CrossAttnUpBlock2D"` or `"UpBlock2D"` per level, from the lowest resolution up.
    pub up_block_types: Vec<String>,
    /// Only `"UNetMidBlock2DCrossAttn"` is supported.
    pub mid_block_type: String,
    /// Width of the `encoder_hidden_states` tokens.
    pub cross_attention_dim: i64,
    /// NUMBER OF ATTENTION HEADS, despite the name: diffusers' UNet2DConditionModel passes this
    /// value as `num_attention_heads` (head width = channels / heads), and SD configs rely on it.
    /// One value, or one per down block.
    pub attention_head_dim: PerBlock,
    /// Transformer blocks per attention; one value, or one per down block.
    pub transformer_layers_per_block: PerBlock,
    /// GroupNorm groups (the transformers' GroupNorms use them too).
    pub norm_num_groups: i64,
    /// GroupNorm epsilon of the resnets and of `conv_norm_out`.
    pub norm_eps: f64,
    /// Timestep projection order `[cos, sin]` (true) or `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// diffusers' `downscale_freq_shift` of the timestep projection.
    pub freq_shift: f64,
    /// Transformers' `proj_in`/`proj_out` as Linear (true) or 1×1 convolutions (false).
    pub use_linear_projection: bool,
}

impl Default for UNetConfig {
    /// A small model for 32×32 single-channel images (Fashion-MNIST padded to 32) that trains on
    /// two CPU cores: three levels 32/64/64, attention at 16×16 and 8×8 and in the mid block.
    fn default() -> Self {
        Self {
            sample_size: 32,
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![32, 64, 64],
            layers_per_block: 1,
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            mid_block_type: "UNetMidBlock2DCrossAttn".into(),
            cross_attention_dim: 64,
            attention_head_dim: PerBlock::All(4),
            transformer_layers_per_block: PerBlock::All(1),
            norm_num_groups: 8,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            use_linear_projection: false,
        }
    }
}

impl UNetConfig {
    /// The smallest UNet with the default's structure, for tests and examples: 8×8 samples, levels
    /// 8/16/16 (attention on the two lower ones and in the mid block), 8-wide cross-attention.
    pub fn tiny() -> Self {
        Self {
            sample_size: 8,
            block_out_channels: vec![8, 16, 16],
            cross_attention_dim: 8,
            attention_head_dim: PerBlock::All(2),
            norm_num_groups: 4,
            ..Self::default()
        }
    }

    /// Checks the config; every error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let err = |m: String| Err(Error::Config(m));
        if n == 0 {
            return err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return err(format!(
                "block_out_channels has {n} entries but down_block_types has {} and up_block_types {}; \
                 give one of each per level",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return err(format!(
                    "down block type {t:?} is not supported (use \"CrossAttnDownBlock2D\" or \"DownBlock2D\")"
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return err(format!("up block type {t:?} is not supported (use \"CrossAttnUpBlock2D\" or \"UpBlock2D\")"));
            }
        }
        if self.mid_block_type != "UNetMidBlock2DCrossAttn" {
            return err(format!(
                "mid_block_type {:?} is not supported (use \"UNetMidBlock2DCrossAttn\")",
                self.mid_block_type
            ));
        }
        if self.in_channels <= 0 || self.out_channels <= 0 {
            return err(format!(
                "in_channels ({}) and out_channels ({}) must be positive",
                self.in_channels, self.out_channels
            ));
        }
        if self.layers_per_block <= 0 {
            return err(format!("layers_per_block must be positive, got {}", self.layers_per_block));
        }
        if self.cross_attention_dim <= 0 {
            return err(format!("cross_attention_dim must be positive, got {}", self.cross_attention_dim));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return err(format!("norm_eps must be positive, got {}", self.norm_eps));
        }
        let g = self.norm_num_groups;
        if g <= 0 {
            return err(format!("norm_num_groups must be positive, got {g}"));
        }
        for &c in &self.block_out_channels {
            if c <= 0 || c % g != 0 {
                return err(format!(
                    "block_out_channels entry {c} is not a positive multiple of norm_num_groups {g}"
                ));
            }
        }
        if (self.block_out_channels[0] / 2) as f64 - self.freq_shift <= 0.0 {
            return err(format!(
                "block_out_channels[0] = {} is too small for freq_shift {}",
                self.block_out_channels[0], self.freq_shift
            ));
        }
        self.attention_head_dim.check("attention_head_dim", n)?;
        self.transformer_layers_per_block.check("transformer_layers_per_block", n)?;
        // Heads must divide the channels wherever there is attention (mid block: last level).
        for i in 0..n {
            let attn = self.down_block_types[i] == "CrossAttnDownBlock2D"
                || self.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D"
                || i == n - 1;
            let (c, h) = (self.block_out_channels[i], self.attention_head_dim.get(i));
            if attn && c % h != 0 {
                return err(format!(
                    "level {i}: {c} channels cannot be split into {h} attention heads \
                     (attention_head_dim is the number of heads, as in diffusers)"
                ));
            }
        }
        Ok(())
    }

    /// Width of the time embedding (`4 · block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> i64 {
        4 * self.block_out_channels[0]
    }

    /// Channel count of every skip sample of the down path, in order (`conv_in`'s output first);
    /// a ControlNet needs one zero convolution per entry.
    pub fn skip_channels(&self) -> Vec<i64> {
        let n = self.block_out_channels.len();
        let mut out = vec![self.block_out_channels[0]];
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            out.extend(std::iter::repeat_n(c, self.layers_per_block as usize));
            if i + 1 < n {
                out.push(c);
            }
        }
        out
    }

    /// Shape `[C, H, W]` of every skip sample for an `height`×`width` input, in order.
    pub fn skip_shapes(&self, height: i64, width: i64) -> Vec<[i64; 3]> {
        let n = self.block_out_channels.len();
        let (mut h, mut w) = (height, width);
        let mut out = vec![[self.block_out_channels[0], h, w]];
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            for _ in 0..self.layers_per_block {
                out.push([c, h, w]);
            }
            if i + 1 < n {
                // 3×3 conv, stride 2, padding 1.
                h = (h - 1) / 2 + 1;
                w = (w - 1) / 2 + 1;
                out.push([c, h, w]);
            }
        }
        out
    }

    /// Shape `[C, H, W]` of the mid-block output for an `height`×`width` input.
    pub fn mid_shape(&self, height: i64, width: i64) -> [i64; 3] {
        let last = self.skip_shapes(height, width).pop().unwrap_or([0, height, width]);
        [*self.block_out_channels.last().unwrap_or(&0), last[1], last[2]]
    }

    /// The attention settings of down-block level `i`.
    pub fn cross_attn(&self, i: usize) -> CrossAttnConfig {
        CrossAttnConfig {
            num_heads: self.attention_head_dim.get(i),
            cross_attention_dim: self.cross_attention_dim,
            transformer_layers: self.transformer_layers_per_block.get(i),
            use_linear_projection: self.use_linear_projection,
        }
    }

    /// The settings of down block `i`, as the UNet builds it (a ControlNet builds the same).
    pub fn down_block_config(&self, i: usize) -> DownBlockConfig {
        let n = self.block_out_channels.len();
        DownBlockConfig {
            in_channels: if i == 0 { self.block_out_channels[0] } else { self.block_out_channels[i - 1] },
            out_channels: self.block_out_channels[i],
            temb_channels: self.time_embed_dim(),
            num_layers: self.layers_per_block,
            add_downsample: i + 1 < n,
            groups: self.norm_num_groups,
            eps: self.norm_eps,
            cross_attn: (self.down_block_types[i] == "CrossAttnDownBlock2D").then(|| self.cross_attn(i)),
        }
    }

    /// The settings of the mid block.
    pub fn mid_block_config(&self) -> MidBlockConfig {
        let n = self.block_out_channels.len();
        MidBlockConfig {
            channels: self.block_out_channels[n - 1],
            temb_channels: self.time_embed_dim(),
            groups: self.norm_num_groups,
            eps: self.norm_eps,
            cross_attn: self.cross_attn(n - 1),
        }
    }

    /// The settings of up block `i` (`i = 0` is the lowest resolution).
    pub fn up_block_config(&self, i: usize) -> UpBlockConfig {
        let n = self.block_out_channels.len();
        let rev = |j: usize| self.block_out_channels[n - 1 - j];
        UpBlockConfig {
            in_channels: rev((i + 1).min(n - 1)),
            prev_output_channels: if i == 0 { rev(0) } else { rev(i - 1) },
            out_channels: rev(i),
            temb_channels: self.time_embed_dim(),
            num_layers: self.layers_per_block + 1,
            add_upsample: i + 1 < n,
            groups: self.norm_num_groups,
            eps: self.norm_eps,
            cross_attn: (self.up_block_types[i] == "CrossAttnUpBlock2D").then(|| self.cross_attn(n - 1 - i)),
        }
    }
}

/// The output of [`UNet2DConditionModel::down_mid`]: everything the up path needs.
#[derive(Debug)]
pub struct UNetDownMid {
    /// The time embedding [B, 4·C0] (before any activation).
    pub temb: Tensor,
    /// The conditioning tokens [B, M, cross_attention_dim].
    pub encoder_hidden_states: Tensor,
    /// The skip samples of the down path, `conv_in`'s output first (see
    /// [`UNetConfig::skip_shapes`]).
    pub down_block_res_samples: Vec<Tensor>,
    /// The mid-block output.
    pub mid: Tensor,
}

/// diffusers' `UNet2DConditionModel` (positional time embedding, no class embedding), with
/// optional ControlNet residuals.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    /// The config it was built from.
    pub config: UNetConfig,
    /// Sinusoidal timestep projection (`time_proj`, no parameters).
    pub time_proj: Timesteps,
    /// `time_embedding`.
    pub time_embedding: TimestepEmbedding,
    /// `conv_in`.
    pub conv_in: Conv2d,
    /// `down_blocks.N`.
    pub down_blocks: Vec<DownBlock2D>,
    /// `mid_block`.
    pub mid_block: UNetMidBlock2DCrossAttn,
    /// `up_blocks.N`, lowest resolution first (shared with their recomputation, see
    /// [`UNet2DConditionModel::set_gradient_checkpointing`]).
    pub up_blocks: Vec<Arc<UpBlock2D>>,
    /// `conv_norm_out`.
    pub conv_norm_out: GroupNorm,
    /// `conv_out`.
    pub conv_out: Conv2d,
    /// Whether the up blocks are recomputed in backward. A flag behind `&self` because a frozen main network is
    /// shared by reference across the arms of a study, each of which sets it to its own configuration.
    gradient_checkpointing: AtomicBool,
}

impl UNet2DConditionModel {
    /// Builds the model under `p` after validating `cfg`.
    pub fn new(p: nn::Path, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.block_out_channels.len();
        let c0 = cfg.block_out_channels[0];
        let time_proj = Timesteps::new(c0, cfg.flip_sin_to_cos, cfg.freq_shift, p.device())?;
        let time_embedding = TimestepEmbedding::new(&p / "time_embedding", c0, cfg.time_embed_dim())?;
        let conv_in = Conv2d::new(&p / "conv_in", cfg.in_channels, c0, 3, 1, 1)?;
        let down_blocks = (0..n)
            .map(|i| DownBlock2D::new(&p / "down_blocks" / i, &cfg.down_block_config(i)))
            .collect::<Result<Vec<_>>>()?;
        let mid_block = UNetMidBlock2DCrossAttn::new(&p / "mid_block", &cfg.mid_block_config())?;
        let up_blocks = (0..n)
            .map(|i| Ok(Arc::new(UpBlock2D::new(&p / "up_blocks" / i, &cfg.up_block_config(i))?)))
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = GroupNorm::new(&p / "conv_norm_out", cfg.norm_num_groups, c0, cfg.norm_eps)?;
        let conv_out = Conv2d::new(&p / "conv_out", c0, cfg.out_channels, 3, 1, 1)?;
        Ok(Self {
            config: cfg.clone(),
            time_proj,
            time_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            gradient_checkpointing: AtomicBool::new(false),
        })
    }

    /// Activation recomputation of the up path: each up block keeps only its inputs in the forward pass and runs
    /// again in backward ([`crate::models::checkpoint`]). For a frozen UNet under a ControlNet this is where the
    /// activations are: the gradient reaches the side network's residuals through the up path, so its
    /// activations are kept for backward although no weight of it learns. The down path and the mid block keep
    /// nothing then (their inputs need no gradient). Errors if this build has no recomputation.
    pub fn set_gradient_checkpointing(&self, on: bool) -> Result<()> {
        if on && !super::checkpoint::available() {
            return Err(Error::Config(
                "train.gradient_checkpointing: this build has no activation recomputation (libtorch's autograd \
                 headers were not found when it was built)"
                    .into(),
            ));
        }
        self.gradient_checkpointing.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the up blocks are recomputed in backward.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing.load(Ordering::Relaxed)
    }

    /// Number of skip samples of the down path (= ControlNet down residuals expected).
    pub fn num_skips(&self) -> usize {
        1 + self.down_blocks.iter().map(DownBlock2D::num_skips).sum::<usize>()
    }

    /// The time embedding [B, 4·C0] of `timesteps` for a batch of `batch`: `timesteps` is [B]
    /// (one, possibly continuous, value per sample), or a scalar / [1] shared by all samples.
    pub fn time_embed(&self, timesteps: &Tensor, batch: i64) -> Result<Tensor> {
        let t = match timesteps.size().as_slice() {
            [] => timesteps.f_expand([batch], false)?,
            [1] if batch != 1 => timesteps.f_expand([batch], false)?,
            [b] if *b == batch => timesteps.shallow_clone(),
            s => {
                return Err(Error::Config(format!(
                    "timesteps must have shape [{batch}] (or be a scalar), got {s:?}"
                )))
            }
        };
        let emb = self.time_proj.forward(&t)?;
        let kind = super::precision::activation_kind(self.time_embedding.linear_1.weight.kind());
        // The projection is computed in f32; f64 weights (gradient checks) get f64, weights held in half
        // precision compute in f32.
        let emb = if emb.kind() == kind { emb } else { emb.f_to_kind(kind)? };
        self.time_embedding.forward(&emb)
    }

    /// Runs the down path and the mid block on `sample` [B, in, H, W] at `timesteps` with
    /// conditioning `encoder_hidden_states` [B, M, cross_attention_dim].
    pub fn down_mid(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Result<UNetDownMid> {
        let temb = self.time_embed(timesteps, sample.size4()?.0)?;
        let mut h = self.conv_in.forward(sample)?;
        let mut skips = Vec::with_capacity(self.num_skips());
        skips.push(h.shallow_clone());
        for b in &self.down_blocks {
            h = b.forward(&h, &temb, Some(encoder_hidden_states), &mut skips)?;
        }
        let mid = self.mid_block.forward(&h, &temb, encoder_hidden_states)?;
        Ok(UNetDownMid { temb, encoder_hidden_states: encoder_hidden_states.shallow_clone(), down_block_res_samples: skips, mid })
    }

    /// Runs the up path on `enc`, first adding ControlNet residuals where diffusers adds them:
    /// `down_block_res_samples[i] + down_residuals[i]` for every skip, and `mid + mid_residual`.
    /// `enc` is not modified, so the up path can run again on it with other residuals.
    pub fn up(
        &self,
        enc: &UNetDownMid,
        down_residuals: Option<&[Tensor]>,
        mid_residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let skips: Vec<Tensor> = match down_residuals {
            None => enc.down_block_res_samples.iter().map(Tensor::shallow_clone).collect(),
            Some(res) => {
                if res.len() != enc.down_block_res_samples.len() {
                    return Err(Error::Config(format!(
                        "got {} down-block residuals but the UNet has {} skip samples",
                        res.len(),
                        enc.down_block_res_samples.len()
                    )));
                }
                enc.down_block_res_samples.iter().zip(res).map(|(s, r)| s.f_add(r)).collect::<Result<_, _>>()?
            }
        };
        let mut h = match mid_residual {
            None => enc.mid.shallow_clone(),
            Some(r) => enc.mid.f_add(r)?,
        };
        let temb = &enc.temb;
        let encoder_hidden_states = &enc.encoder_hidden_states;
        let mut rest: &[Tensor] = &skips;
        for b in &self.up_blocks {
            let k = b.num_skips();
            if rest.len() < k {
                return Err(Error::Config("not enough skip samples for the up path".into()));
            }
            let (left, mine) = rest.split_at(rest.len() - k);
            rest = left;
            // Upsample to the next skip's size so odd resolutions line up, as diffusers does.
            let size = rest.last().map(|s| {
                let z = s.size();
                [z[2], z[3]]
            });
            h = if self.gradient_checkpointing() {
                let block = Arc::clone(b);
                let k = mine.len();
                let inputs: Vec<&Tensor> = [&h].into_iter().chain(mine).chain([temb, encoder_hidden_states]).collect();
                let mut outputs = checkpoint(&inputs, move |xs| {
                    Ok(vec![block.forward(&xs[0], &xs[1..=k], &xs[k + 1], Some(&xs[k + 2]), size)?])
                })?;
                outputs.pop().ok_or_else(|| Error::Training("a recomputed up block returned nothing".into()))?
            } else {
                b.forward(&h, mine, temb, Some(encoder_hidden_states), size)?
            };
        }
        let h = self.conv_norm_out.forward(&h)?.f_silu()?;
        self.conv_out.forward(&h)
    }

    /// The full UNet: `up(down_mid(..), ..)`. Returns the prediction [B, out, H, W].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        down_block_additional_residuals: Option<&[Tensor]>,
        mid_block_additional_residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let enc = self.down_mid(sample, timesteps, encoder_hidden_states)?;
        self.up(&enc, down_block_additional_residuals, mid_block_additional_residual)
    }
}
