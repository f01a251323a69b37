//! The LISA decoder `D(h, t)` (the authors' "LightweightDecoder", spec §4): maps the hooked side
//! feature `h` [B, C, r, r] to a prediction of the likelihood-score residual at the sample's
//! resolution [B, out_channels, R, R].
//!
//! Parameter names (relative to the decoder's path):
//! - `time_linear.{weight,bias}`: `Linear(256 → C)` on the sinusoidal timestep projection
//!   (`time_proj`, parameter-free);
//! - `blocks.N.conv.{weight,bias}`: the upsampling blocks, `N < k = log2(R / r)`;
//! - `conv_refine.{weight,bias}`: the single same-resolution conv, present only when `k = 0`;
//! - `conv_out.{weight,bias}`: the zero-initialised 3×3 output conv.
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use super::blocks::{Conv2d, Linear, Timesteps};
use super::controlnet::expand_timesteps;
use crate::{Error, Result};

/// Width of the decoder's sinusoidal timestep projection (authors: 256).
pub const TIME_PROJ_DIM: i64 = 256;

/// Settings of the [`LisaDecoder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecoderConfig {
    /// The narrowest a hidden conv may be: each conv maps `C → max(C/2, channel_floor)`
    /// (authors: 64, which widens features narrower than 64; lower it for small models).
    pub channel_floor: i64,
    /// Multiplies every hidden conv's width (1 = the authors' decoder; 2 ≈ four times the parameters,
    /// the "larger decoder" control of the ablations).
    pub channel_multiplier: i64,
}

impl Default for DecoderConfig {
    /// The authors' floor of 64 channels, widths as the authors'.
    fn default() -> Self {
        Self { channel_floor: 64, channel_multiplier: 1 }
    }
}

/// One upsampling block: `conv`, SiLU, nearest ×2.
#[derive(Debug)]
pub struct DecoderBlock {
    /// `blocks.N.conv`: 1×1 (first block with ≥ 512 input channels) or 3×3.
    pub conv: Conv2d,
}

/// The LISA decoder: `e = SiLU(time_linear(sinusoidal(t, 256)))` added to `h` as a per-channel
/// bias; `k` upsampling blocks (or, for `k = 0`, one same-resolution conv); a zero-initialised
/// 3×3 `conv_out`. No normalisation, no text input.
#[derive(Debug)]
pub struct LisaDecoder {
    /// Sinusoidal projection `[cos, sin]`, base 10000, 256 wide (`time_proj`, no parameters).
    pub time_proj: Timesteps,
    /// `time_linear`: 256 → `in_channels`.
    pub time_linear: Linear,
    /// `blocks.N`, one per resolution doubling.
    pub blocks: Vec<DecoderBlock>,
    /// `conv_refine`: the 3×3 conv used instead of blocks when the feature is already at the output resolution.
    pub conv_refine: Option<Conv2d>,
    /// `conv_out`: 3×3 to `out_channels`, weight and bias zero at initialisation.
    pub conv_out: Conv2d,
    feature_res: i64,
    out_res: i64,
}

impl LisaDecoder {
    /// Builds the decoder under `p` for `in_channels`-channel features of resolution `feature_res`
    /// and outputs of `out_channels` channels at `out_res` (`out_res / feature_res` must be a
    /// power of two). The timesteps it is given must be the UNet's (network) timesteps.
    pub fn new(
        p: nn::Path,
        in_channels: i64,
        feature_res: i64,
        out_res: i64,
        out_channels: i64,
        cfg: &DecoderConfig,
    ) -> Result<Self> {
        if in_channels <= 0 || out_channels <= 0 || cfg.channel_floor <= 0 || cfg.channel_multiplier <= 0 {
            return Err(Error::Config(format!(
                "LISA decoder: in_channels ({in_channels}), out_channels ({out_channels}), channel_floor ({}) and \
                 channel_multiplier ({}) must be positive",
                cfg.channel_floor, cfg.channel_multiplier
            )));
        }
        let ratio = if feature_res > 0 && out_res % feature_res == 0 { out_res / feature_res } else { 0 };
        if ratio <= 0 || ratio & (ratio - 1) != 0 {
            return Err(Error::Config(format!(
                "LISA decoder: output resolution {out_res} is not a power-of-two multiple of the hooked feature's \
                 resolution {feature_res}"
            )));
        }
        let k = ratio.trailing_zeros() as i64;
        let (floor, mult) = (cfg.channel_floor, cfg.channel_multiplier);
        let time_proj = Timesteps::new(TIME_PROJ_DIM, true, 0.0, p.device())?;
        let time_linear = Linear::new(&p / "time_linear", TIME_PROJ_DIM, in_channels, true)?;
        let mut c = in_channels;
        let mut blocks = Vec::with_capacity(k as usize);
        // The authors' width rule runs on the unmultiplied width `base`, so ×1 is exactly their decoder.
        let mut base = in_channels;
        for i in 0..k {
            base = (base / 2).max(floor);
            let cout = base * mult;
            // The authors squeeze wide features with a cheap 1×1 before any 3×3.
            let conv = if i == 0 && c >= 512 {
                Conv2d::new(&p / "blocks" / i / "conv", c, cout, 1, 1, 0)?
            } else {
                Conv2d::new(&p / "blocks" / i / "conv", c, cout, 3, 1, 1)?
            };
            blocks.push(DecoderBlock { conv });
            c = cout;
        }
        let conv_refine = if k == 0 {
            let cout = if base <= floor { base } else { (base / 2).max(floor) } * mult;
            let conv = Conv2d::new(&p / "conv_refine", c, cout, 3, 1, 1)?;
            c = cout;
            Some(conv)
        } else {
            None
        };
        let conv_out = Conv2d::new(&p / "conv_out", c, out_channels, 3, 1, 1)?;
        // Zero output: the decoder starts by predicting r = 0, as the authors initialise it.
        super::blocks::zero_init(&conv_out.weight, conv_out.bias.as_ref())?;
        Ok(Self { time_proj, time_linear, blocks, conv_refine, conv_out, feature_res, out_res })
    }

    /// Number of upsampling blocks, `k = log2(out_res / feature_res)`.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Decodes the hooked feature `h` [B, C, r, r] at `timesteps` ([B] or scalar, the UNet's
    /// timestep input) into [B, out_channels, R, R].
    pub fn forward(&self, h: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (b, _, hh, ww) = h.size4()?;
        if hh != self.feature_res || ww != self.feature_res {
            return Err(Error::Config(format!(
                "LISA decoder built for {r}×{r} features got {hh}×{ww}",
                r = self.feature_res
            )));
        }
        let t = expand_timesteps(timesteps, b)?;
        let emb = self.time_proj.forward(&t)?;
        let kind = super::precision::activation_kind(self.time_linear.weight.kind());
        let emb = if emb.kind() == kind { emb } else { emb.f_to_kind(kind)? };
        let e = self.time_linear.forward(&emb)?.f_silu()?;
        let mut x = h.f_add(&e.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?;
        for blk in &self.blocks {
            let (_, _, hh, ww) = x.size4()?;
            x = blk.conv.forward(&x)?.f_silu()?.f_upsample_nearest2d([2 * hh, 2 * ww], None, None)?;
        }
        if let Some(c) = &self.conv_refine {
            x = c.forward(&x)?.f_silu()?;
        }
        let y = self.conv_out.forward(&x)?;
        debug_assert_eq!(y.size()[2], self.out_res);
        Ok(y)
    }
}
