//! A diffusion transformer main network in the style of SD3's `SD3Transformer2DModel` without the
//! text stream (and of PixArt/DiT): patchify, fixed 2-D sin-cos positions, a conditioning vector
//! `c = timestep embedding + projection of the pooled label tokens`, blocks of self-attention and MLP
//! modulated by `c` through adaLN-Zero, a final adaptive norm and a linear unpatchify. Parameter
//! names are diffusers' (`pos_embed.proj`, `time_text_embed.timestep_embedder.linear_1`,
//! `transformer_blocks.0.norm1.linear`, `transformer_blocks.0.attn.to_q`, `norm_out.linear`, `proj_out`).
//!
//! A side network (`controlnet_dit.rs`) adds one residual token map after each main block, as
//! diffusers' SD3 ControlNet does (`block_residuals`).
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::blocks::{Conv2d, Linear, TimestepEmbedding, Timesteps};
use super::controlnet::expand_timesteps;
use crate::{Error, Result};

/// Width of the sinusoidal timestep projection (SD3's `Timesteps(256, flip_sin_to_cos=True)`).
pub const TIME_PROJ_DIM: i64 = 256;

/// The transformer's architecture (the fields of a diffusers transformer `config.json` that it uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiTConfig {
    /// Input resolution (square); a multiple of `patch_size`.
    pub sample_size: i64,
    /// Side of the square patches (a power of two, so the LISA decoder can upsample tokens back).
    pub patch_size: i64,
    /// Channels of the input sample.
    pub in_channels: i64,
    /// Channels of the output.
    pub out_channels: i64,
    /// Number of transformer blocks.
    pub num_layers: i64,
    /// Attention heads per block.
    pub num_attention_heads: i64,
    /// Width of each head; the token width is `num_attention_heads · attention_head_dim`.
    pub attention_head_dim: i64,
    /// Width of the label tokens, pooled (averaged) and projected into the conditioning vector.
    pub pooled_projection_dim: i64,
    /// Hidden width of the MLP over the token width.
    pub mlp_ratio: i64,
    /// Frames per sample (1 = images). A clip stacks its frames as channels, `[B, num_frames ·
    /// in_channels, S, S]`; every frame is patchified alike, a temporal sin-cos code is added to the
    /// positions, and attention runs over the tokens of all frames (space-time attention).
    pub num_frames: i64,
}

impl Default for DiTConfig {
    /// A small transformer for 32×32 single-channel images: 2×2 patches (256 tokens), 6 blocks of
    /// width 128 (4 heads of 32), label tokens of width 64.
    fn default() -> Self {
        Self {
            sample_size: 32,
            patch_size: 2,
            in_channels: 1,
            out_channels: 1,
            num_layers: 6,
            num_attention_heads: 4,
            attention_head_dim: 32,
            pooled_projection_dim: 64,
            mlp_ratio: 4,
            num_frames: 1,
        }
    }
}

impl DiTConfig {
    /// The token width.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels of a whole sample: `num_frames · in_channels`.
    pub fn sample_channels(&self) -> i64 {
        self.num_frames * self.in_channels
    }

    /// Channels of a whole prediction: `num_frames · out_channels`.
    pub fn prediction_channels(&self) -> i64 {
        self.num_frames * self.out_channels
    }

    /// Tokens per side (`sample_size / patch_size`).
    pub fn grid(&self) -> i64 {
        self.sample_size / self.patch_size.max(1)
    }

    /// Rejects configurations that cannot be built.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("num_layers", self.num_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("mlp_ratio", self.mlp_ratio),
            ("num_frames", self.num_frames),
        ];
        if let Some((name, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(Error::Config(format!("{name} must be positive, got {v}")));
        }
        if self.patch_size & (self.patch_size - 1) != 0 {
            return Err(Error::Config(format!("patch_size must be a power of two, got {}", self.patch_size)));
        }
        if self.sample_size % self.patch_size != 0 {
            return Err(Error::Config(format!(
                "sample_size {} is not a multiple of patch_size {}",
                self.sample_size, self.patch_size
            )));
        }
        if self.inner_dim() % 4 != 0 {
            return Err(Error::Config(format!(
                "the token width num_attention_heads · attention_head_dim = {} must be a multiple of 4 (2-D sin-cos \
                 positions)",
                self.inner_dim()
            )));
        }
        Ok(())
    }
}

/// The fixed 2-D sin-cos position table [grid², dim] (DiT's `get_2d_sincos_pos_embed`): the first
/// half of the features encodes the column, the second the row, each `[sin, cos]` over `dim/4`
/// frequencies `10000^(−i/(dim/4))`. Row-major token order, as patchify produces.
pub fn sincos_positions(grid: i64, dim: i64, device: tch::Device) -> Result<Tensor> {
    let idx = Tensor::f_arange(grid * grid, (Kind::Double, device))?;
    let (row, col) = (idx.f_div_scalar_mode(grid as f64, "floor")?, idx.f_remainder(grid as f64)?);
    Ok(Tensor::f_cat(&[sincos_1d(&col, dim / 2)?, sincos_1d(&row, dim / 2)?], 1)?.f_to_kind(Kind::Float)?)
}

/// `[sin, cos]` of positions `pos` [P] (f64) times `width / 2` frequencies `10000^(−i/(width/2))`: [P, width].
fn sincos_1d(pos: &Tensor, width: i64) -> Result<Tensor> {
    let half = width / 2;
    let omega = Tensor::f_arange(half, (Kind::Double, pos.device()))?
        .f_div_scalar(half as f64)?
        .f_mul_scalar(-(10000f64).ln())?
        .f_exp()?;
    let a = pos.f_unsqueeze(1)?.f_mul(&omega.f_unsqueeze(0)?)?;
    Ok(Tensor::f_cat(&[a.f_sin()?, a.f_cos()?], 1)?)
}

/// The position table of all tokens of a sample [F·N, D]: the spatial table of every frame, plus,
/// for clips (F > 1), a 1-D sin-cos code of the frame index over the whole width.
pub fn space_time_positions(cfg: &DiTConfig, device: tch::Device) -> Result<Tensor> {
    let d = cfg.inner_dim();
    let space = sincos_positions(cfg.grid(), d, device)?;
    if cfg.num_frames == 1 {
        return Ok(space);
    }
    let frames = Tensor::f_arange(cfg.num_frames, (Kind::Double, device))?;
    let time = sincos_1d(&frames, d)?.f_to_kind(Kind::Float)?; // [F, D]
    let n = space.size()[0];
    Ok(space.f_unsqueeze(0)?.f_add(&time.f_unsqueeze(1)?)?.f_reshape([cfg.num_frames * n, d])?)
}

/// Patch tokens of every frame of `sample` [B, F·C, H, W], frame after frame: [B, F·N, D].
pub fn patchify_frames(embed: &PatchEmbed, sample: &Tensor, frames: i64) -> Result<Tensor> {
    let (b, c, h, w) = sample.size4()?;
    let tokens = embed.forward(&sample.f_reshape([b * frames, c / frames, h, w])?)?;
    let (_, n, d) = tokens.size3()?;
    Ok(tokens.f_reshape([b, frames * n, d])?)
}

/// Layer normalisation over the last dimension without affine parameters (adaLN supplies them).
fn plain_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let d = *x.size().last().unwrap_or(&1);
    Ok(x.f_layer_norm([d], None::<&Tensor>, None::<&Tensor>, eps, true)?)
}

/// `x · (1 + scale) + shift` with per-example `scale`, `shift` [B, D] over tokens `x` [B, N, D].
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(&scale.f_unsqueeze(1)?.f_add_scalar(1.0)?)?.f_add(&shift.f_unsqueeze(1)?)?)
}

/// A `Linear` whose weight and bias start at exactly zero (adaLN-Zero modulations, output layers).
pub(crate) fn zero_linear(p: nn::Path, din: i64, dout: i64) -> Result<Linear> {
    let l = Linear::new(p, din, dout, true)?;
    super::blocks::zero_init(&l.weight, l.bias.as_ref())?;
    Ok(l)
}

/// diffusers' `PatchEmbed` without its position table: a `patch_size`-strided convolution `proj`,
/// flattened to tokens [B, N, D] in row-major order.
#[derive(Debug)]
pub struct PatchEmbed {
    /// `proj`: `in_channels → D`, kernel and stride `patch_size`.
    pub proj: Conv2d,
}

impl PatchEmbed {
    /// Patches of side `patch` from `cin` channels to `dim`-wide tokens.
    pub fn new(p: nn::Path, cin: i64, dim: i64, patch: i64) -> Result<Self> {
        Ok(Self { proj: Conv2d::new(&p / "proj", cin, dim, patch, patch, 0)? })
    }

    /// Tokens [B, (H/p)·(W/p), D] of `x` [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.proj.forward(x)?.f_flatten(2, -1)?.f_transpose(1, 2)?)
    }
}

/// Multi-head self-attention with biased projections (SD3's `Attention`: `to_q`, `to_k`, `to_v`, `to_out.0`).
#[derive(Debug)]
pub struct SelfAttention {
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection (`to_out.0`).
    pub to_out: Linear,
    heads: i64,
}

impl SelfAttention {
    /// `heads` heads of `head_dim` over `dim = heads · head_dim` features.
    pub fn new(p: nn::Path, dim: i64, heads: i64) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(&p / "to_q", dim, dim, true)?,
            to_k: Linear::new(&p / "to_k", dim, dim, true)?,
            to_v: Linear::new(&p / "to_v", dim, dim, true)?,
            to_out: Linear::new(&p / "to_out" / 0, dim, dim, true)?,
            heads,
        })
    }

    /// Attends among the tokens `x` [B, N, D].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.size3()?;
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.f_view([b, n, self.heads, -1])?.f_transpose(1, 2)?) };
        let (q, k, v) = (split(self.to_q.forward(x)?)?, split(self.to_k.forward(x)?)?, split(self.to_v.forward(x)?)?);
        let o = super::precision::attention(&q, &k, &v, false)?;
        self.to_out.forward(&o.f_transpose(1, 2)?.f_reshape([b, n, -1])?)
    }
}

/// One adaLN-Zero transformer block: `norm1.linear` maps SiLU(c) to six modulations (shift, scale,
/// gate for attention and for the MLP), zero at initialisation so the block starts as the identity.
#[derive(Debug)]
pub struct DiTBlock {
    /// `norm1.linear`: `D → 6·D`, zero-initialised.
    pub ada_linear: Linear,
    /// `attn`.
    pub attn: SelfAttention,
    /// `ff.net.0.proj`: `D → mlp_ratio·D`, tanh-GELU after it.
    pub ff_in: Linear,
    /// `ff.net.2`: back to `D`.
    pub ff_out: Linear,
}

impl DiTBlock {
    /// A block on `dim`-wide tokens with `heads` heads and an MLP `mlp_ratio` times wider.
    pub fn new(p: nn::Path, dim: i64, heads: i64, mlp_ratio: i64) -> Result<Self> {
        Ok(Self {
            ada_linear: zero_linear(&p / "norm1" / "linear", dim, 6 * dim)?,
            attn: SelfAttention::new(&p / "attn", dim, heads)?,
            ff_in: Linear::new(&p / "ff" / "net" / 0 / "proj", dim, mlp_ratio * dim, true)?,
            ff_out: Linear::new(&p / "ff" / "net" / 2, mlp_ratio * dim, dim, true)?,
        })
    }

    /// Applies the block to tokens `x` [B, N, D] under the conditioning vector `c` [B, D].
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let m = self.ada_linear.forward(&c.f_silu()?)?.f_chunk(6, 1)?;
        let h = modulate(&plain_norm(x, 1e-6)?, &m[0], &m[1])?;
        let x = x.f_add(&self.attn.forward(&h)?.f_mul(&m[2].f_unsqueeze(1)?)?)?;
        let h = modulate(&plain_norm(&x, 1e-6)?, &m[3], &m[4])?;
        let f = self.ff_out.forward(&self.ff_in.forward(&h)?.f_gelu("tanh")?)?;
        Ok(x.f_add(&f.f_mul(&m[5].f_unsqueeze(1)?)?)?)
    }
}

/// The conditioning vector of a timestep and a label (SD3's `CombinedTimestepTextProjEmbeddings`):
/// `timestep_embedder(sinusoid(t)) + text_embedder(mean of the label tokens)`.
#[derive(Debug)]
pub struct TimeLabelEmbedding {
    /// Sinusoidal projection of the timestep (no parameters).
    pub time_proj: Timesteps,
    /// `timestep_embedder`: `256 → D → D`.
    pub timestep_embedder: TimestepEmbedding,
    /// `text_embedder.linear_1`: pooled label width → D.
    pub text_linear_1: Linear,
    /// `text_embedder.linear_2`: D → D (SiLU between).
    pub text_linear_2: Linear,
}

impl TimeLabelEmbedding {
    /// The embedding under `p` (conventionally `time_text_embed`).
    pub fn new(p: nn::Path, cfg: &DiTConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            time_proj: Timesteps::new(TIME_PROJ_DIM, true, 0.0, p.device())?,
            timestep_embedder: TimestepEmbedding::new(&p / "timestep_embedder", TIME_PROJ_DIM, d)?,
            text_linear_1: Linear::new(&p / "text_embedder" / "linear_1", cfg.pooled_projection_dim, d, true)?,
            text_linear_2: Linear::new(&p / "text_embedder" / "linear_2", d, d, true)?,
        })
    }

    /// `c` [B, D] for timesteps `t` ([B] or scalar) and label tokens `encoder_hidden_states` [B, M, pooled dim].
    pub fn forward(&self, t: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let b = encoder_hidden_states.size3()?.0;
        let t = expand_timesteps(t, b)?;
        let temb = self.timestep_embedder.forward(&self.time_proj.forward(&t)?)?;
        let pooled = encoder_hidden_states.f_mean_dim(1, false, Kind::Float)?;
        let lemb = self.text_linear_2.forward(&self.text_linear_1.forward(&pooled)?.f_silu()?)?;
        Ok(temb.f_add(&lemb)?)
    }
}

/// What the blocks start from: the position-embedded tokens and the conditioning vector.
#[derive(Debug)]
pub struct DiTEmbedded {
    /// Tokens [B, N, D] after patchify and positions.
    pub tokens: Tensor,
    /// The conditioning vector `c` [B, D].
    pub c: Tensor,
}

/// The diffusion transformer main network.
#[derive(Debug)]
pub struct DiTModel {
    /// The config it was built from.
    pub config: DiTConfig,
    /// `pos_embed` (its `proj`; the sin-cos table is a constant).
    pub pos_embed: PatchEmbed,
    /// The fixed position table [N, D].
    pub positions: Tensor,
    /// `time_text_embed`.
    pub time_text_embed: TimeLabelEmbedding,
    /// `transformer_blocks.N`.
    pub transformer_blocks: Vec<DiTBlock>,
    /// `norm_out.linear`: `D → 2·D` (scale, shift), zero-initialised.
    pub norm_out: Linear,
    /// `proj_out`: `D → patch²·out_channels`, zero-initialised (the network starts by predicting 0).
    pub proj_out: Linear,
}

impl DiTModel {
    /// Builds a freshly initialised model under `p` after validating `cfg`.
    pub fn new(p: nn::Path, cfg: &DiTConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.inner_dim();
        let pos_embed = PatchEmbed::new(&p / "pos_embed", cfg.in_channels, d, cfg.patch_size)?;
        let positions = space_time_positions(cfg, p.device())?;
        let time_text_embed = TimeLabelEmbedding::new(&p / "time_text_embed", cfg)?;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| DiTBlock::new(&p / "transformer_blocks" / i, d, cfg.num_attention_heads, cfg.mlp_ratio))
            .collect::<Result<Vec<_>>>()?;
        let norm_out = zero_linear(&p / "norm_out" / "linear", d, 2 * d)?;
        let proj_out = zero_linear(&p / "proj_out", d, cfg.patch_size * cfg.patch_size * cfg.out_channels)?;
        Ok(Self { config: cfg.clone(), pos_embed, positions, time_text_embed, transformer_blocks, norm_out, proj_out })
    }

    /// Patchify + positions and the conditioning vector: the part of the forward pass that a side
    /// network's residuals never touch.
    pub fn embed(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Result<DiTEmbedded> {
        let (_, c, h, w) = sample.size4()?;
        let s = self.config.sample_size;
        if h != s || w != s || c != self.config.sample_channels() {
            return Err(Error::Config(format!(
                "the transformer is built for {}×{s}×{s} samples, got {c}×{h}×{w}",
                self.config.sample_channels()
            )));
        }
        let tokens =
            patchify_frames(&self.pos_embed, sample, self.config.num_frames)?.f_add(&self.positions.f_unsqueeze(0)?)?;
        let c = self.time_text_embed.forward(timesteps, encoder_hidden_states)?;
        Ok(DiTEmbedded { tokens, c })
    }

    /// Runs the blocks, adding `block_residuals[i / interval]` after block `i` (diffusers' SD3
    /// ControlNet rule, `interval = ceil(num_layers / len(block_residuals))`), then the output layer.
    pub fn run_blocks(&self, emb: &DiTEmbedded, block_residuals: Option<&[Tensor]>) -> Result<Tensor> {
        let n = self.transformer_blocks.len();
        let interval = match block_residuals {
            Some([]) => return Err(Error::Config("block_residuals is empty".into())),
            Some(r) if r.len() > n => {
                return Err(Error::Config(format!("{} block residuals for a transformer of {n} blocks", r.len())))
            }
            Some(r) => n.div_ceil(r.len()),
            None => 0,
        };
        let mut x = emb.tokens.shallow_clone();
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            x = block.forward(&x, &emb.c)?;
            if let Some(r) = block_residuals {
                x = x.f_add(&r[i / interval])?;
            }
        }
        self.output(&x, &emb.c)
    }

    /// The output layer: adaptive norm (`norm_out`), `proj_out` and unpatchify of the last block's
    /// tokens `x` [B, N, D] under `c`.
    pub fn output(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let m = self.norm_out.forward(&c.f_silu()?)?.f_chunk(2, 1)?;
        let x = modulate(&plain_norm(x, 1e-6)?, &m[1], &m[0])?;
        self.unpatchify(&self.proj_out.forward(&x)?)
    }

    /// The prediction for `sample` [B, in, H, W] at `timesteps` with label tokens
    /// `encoder_hidden_states` [B, M, pooled dim], with optional side-network residuals.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        block_residuals: Option<&[Tensor]>,
    ) -> Result<Tensor> {
        self.run_blocks(&self.embed(sample, timesteps, encoder_hidden_states)?, block_residuals)
    }

    /// Tokens [B, F·N, p²·C] back to samples [B, F·C, H, W], frame by frame (SD3's `nhwpqc → nchpwq`).
    pub fn unpatchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, _) = x.size3()?;
        let (g, p, c, f) =
            (self.config.grid(), self.config.patch_size, self.config.out_channels, self.config.num_frames);
        Ok(x.f_reshape([b * f, g, g, p, p, c])?.f_permute([0, 5, 1, 3, 2, 4])?.f_reshape([b, f * c, g * p, g * p])?)
    }
}

/// Tokens [B, F·N, D] of `frames` `grid`×`grid` maps folded back to feature maps [B·F, D, grid, grid],
/// frames into the batch (spec §4: how the LISA decoder reads a transformer's tokens, and a video's).
pub fn fold_tokens(tokens: &Tensor, grid: i64, frames: i64) -> Result<Tensor> {
    let (b, n, d) = tokens.size3()?;
    if n != frames * grid * grid {
        return Err(Error::Config(format!("{n} tokens do not fold into {frames} frame(s) of {grid}×{grid}")));
    }
    Ok(tokens.f_reshape([b * frames, grid * grid, d])?.f_transpose(1, 2)?.f_reshape([b * frames, d, grid, grid])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn positions_follow_the_sincos_formula() {
        let (grid, dim) = (3, 8);
        let pos = sincos_positions(grid, dim, Device::Cpu).unwrap();
        assert_eq!(pos.size(), [9, 8]);
        // Token 5 sits at row 1, column 2; two frequencies 1 and 1/100 per half.
        let (row, col) = (1.0f64, 2.0f64);
        let expect = [
            col.sin(),
            (col / 100.0).sin(),
            col.cos(),
            (col / 100.0).cos(),
            row.sin(),
            (row / 100.0).sin(),
            row.cos(),
            (row / 100.0).cos(),
        ];
        for (i, e) in expect.iter().enumerate() {
            let got = pos.double_value(&[5, i as i64]);
            assert!((got - e).abs() < 1e-6, "feature {i}: {got} vs {e}");
        }
    }

    #[test]
    fn unpatchify_inverts_patchify_and_tokens_fold_back_onto_their_patches() {
        let cfg = DiTConfig {
            sample_size: 8,
            patch_size: 2,
            in_channels: 3,
            out_channels: 3,
            num_layers: 1,
            num_attention_heads: 1,
            attention_head_dim: 12,
            pooled_projection_dim: 4,
            mlp_ratio: 1,
            num_frames: 1,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = DiTModel::new(vs.root(), &cfg).unwrap();
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        // Patch (gy, gx) as a token whose features are ordered (py, px, channel), as SD3 lays them out.
        let tokens = x.reshape([2, 3, 4, 2, 4, 2]).permute([0, 2, 4, 3, 5, 1]).reshape([2, 16, 12]);
        assert!(m.unpatchify(&tokens).unwrap().equal(&x));
        // Token k of patchify is the patch at row k / 4, column k % 4.
        let conv = m.pos_embed.proj.forward(&x).unwrap();
        let folded = fold_tokens(&m.pos_embed.forward(&x).unwrap(), 4, 1).unwrap();
        assert!(folded.equal(&conv));
        assert!(fold_tokens(&tokens, 3, 1).is_err());
    }

    #[test]
    fn a_fresh_transformer_predicts_zero_and_bad_configs_are_refused() {
        let cfg = DiTConfig { sample_size: 8, num_layers: 2, ..DiTConfig::default() };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = DiTModel::new(vs.root(), &cfg).unwrap();
        let x = Tensor::randn([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let encoder_hidden_states = Tensor::randn([2, 1, 64], (Kind::Float, Device::Cpu));
        let out = m.forward(&x, &Tensor::from_slice(&[3i64, 700]), &encoder_hidden_states, None).unwrap();
        assert_eq!(out.size(), [2, 1, 8, 8]);
        assert_eq!(out.abs().sum(Kind::Float).double_value(&[]), 0.0, "adaLN-Zero and a zero output layer");
        assert!(m
            .forward(
                &Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu)),
                &Tensor::from_slice(&[1i64, 2]),
                &encoder_hidden_states,
                None
            )
            .is_err());
        for (bad, what) in [
            (DiTConfig { patch_size: 3, sample_size: 9, ..cfg.clone() }, "power of two"),
            (DiTConfig { sample_size: 10, patch_size: 4, ..cfg.clone() }, "multiple of patch_size"),
            (DiTConfig { num_layers: 0, ..cfg.clone() }, "num_layers"),
            (DiTConfig { num_attention_heads: 1, attention_head_dim: 6, ..cfg.clone() }, "multiple of 4"),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }
}
