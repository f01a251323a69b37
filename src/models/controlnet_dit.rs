//! The ControlNet-Transformer side network of a [`DiTModel`], as diffusers' `SD3ControlNetModel`:
//! a trainable copy of the main transformer's embeddings and first `num_layers` blocks; the condition
//! enters through a zero-initialised patch embedding (`pos_embed_input`) added to the sample's tokens;
//! after each side block a zero-initialised linear (`controlnet_blocks.i`) gives the residual tokens
//! that the main transformer adds after its blocks (spec §1).
//!
//! For LISA (spec §4) the forward pass can return the tokens entering one `controlnet_blocks.i`
//! (hook `block_i`; `mid` = the last side block) folded back to a [B, D, H/p, W/p] map, so the image
//! decoder reads them unchanged.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use super::blocks::Linear;
use super::controlnet::{Hook, HookableLayer};
use super::dit::{fold_tokens, patchify_frames, zero_linear, DiTBlock, DiTConfig, PatchEmbed, TimeLabelEmbedding};
use crate::{Error, Result};

/// Prefixes of the parameters the side network copies from its main transformer (blocks: the first
/// `num_layers` only).
pub const SHARED_PREFIXES: [&str; 3] = ["pos_embed.", "time_text_embed.", "transformer_blocks."];

/// The side network's architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiTControlNetConfig {
    /// The main transformer it copies (embeddings and the first `num_layers` blocks).
    pub transformer: DiTConfig,
    /// Number of copied blocks, each giving one residual (diffusers' `num_layers`); the main blocks
    /// share them in groups of `ceil(main layers / num_layers)`.
    pub num_layers: i64,
    /// Channels of the visual condition per frame, at the sample's resolution.
    pub conditioning_channels: i64,
}

impl Default for DiTControlNetConfig {
    /// Half of the default transformer's blocks, a single-channel condition.
    fn default() -> Self {
        let transformer = DiTConfig::default();
        Self { num_layers: transformer.num_layers / 2, transformer, conditioning_channels: 1 }
    }
}

impl DiTControlNetConfig {
    /// The side network of `transformer` with `num_layers` copied blocks.
    pub fn for_transformer(transformer: &DiTConfig, num_layers: i64) -> Self {
        Self { transformer: transformer.clone(), num_layers, conditioning_channels: 1 }
    }

    /// Rejects configurations that cannot be built.
    pub fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        if self.num_layers < 1 || self.num_layers > self.transformer.num_layers {
            return Err(Error::Config(format!(
                "the side transformer copies 1 ..= {} blocks of its main network, not {}",
                self.transformer.num_layers, self.num_layers
            )));
        }
        if self.conditioning_channels < 1 {
            return Err(Error::Config(format!(
                "conditioning_channels must be positive, got {}",
                self.conditioning_channels
            )));
        }
        Ok(())
    }

    /// The side block a hook reads: `block_i`, or `mid` for the last side block (the deepest side
    /// feature, at half the main network's depth by default, as the UNet's mid block is). `None` for
    /// UNet hooks and blocks that do not exist.
    pub fn hooked_block(&self, hook: Hook) -> Option<usize> {
        match hook {
            Hook::Mid => Some(self.num_layers as usize - 1),
            Hook::Block(i) if (i as i64) < self.num_layers => Some(i),
            _ => None,
        }
    }

    /// The layers a LISA hook can attach to: `block_0 .. block_{num_layers−1}`, each the folded
    /// token map [D, H/p, W/p] (per frame: a clip's frames are folded into the batch).
    pub fn hookable_layers(&self) -> Vec<HookableLayer> {
        let (d, g) = (self.transformer.inner_dim(), self.transformer.grid());
        (0..self.num_layers as usize)
            .map(|i| HookableLayer { hook: Hook::Block(i), channels: d, height: g, width: g })
            .collect()
    }
}

/// The output of [`DiTControlNetModel::forward`].
#[derive(Debug)]
pub struct DiTControlNetOutput {
    /// One residual token map [B, N, D] per side block (`controlnet_block_samples`).
    pub block_samples: Vec<Tensor>,
    /// The hooked tokens folded to [B·F, D, H/p, W/p] (F = frames), when a hook was given (still attached to the graph).
    pub hooked: Option<Tensor>,
}

/// diffusers' `SD3ControlNetModel` for our [`DiTModel`].
#[derive(Debug)]
pub struct DiTControlNetModel {
    /// The config it was built from.
    pub config: DiTControlNetConfig,
    /// `pos_embed`, as the main transformer's.
    pub pos_embed: PatchEmbed,
    /// The fixed position table [N, D].
    pub positions: Tensor,
    /// `pos_embed_input`: the condition's patch embedding, zero-initialised.
    pub pos_embed_input: PatchEmbed,
    /// `time_text_embed`, as the main transformer's.
    pub time_text_embed: TimeLabelEmbedding,
    /// `transformer_blocks.N`, copies of the main network's first blocks.
    pub transformer_blocks: Vec<DiTBlock>,
    /// `controlnet_blocks.N`: zero-initialised `D → D`.
    pub controlnet_blocks: Vec<Linear>,
}

impl DiTControlNetModel {
    /// Builds a freshly initialised model under `p` after validating `cfg`.
    pub fn new(p: nn::Path, cfg: &DiTControlNetConfig) -> Result<Self> {
        cfg.validate()?;
        let t = &cfg.transformer;
        let d = t.inner_dim();
        let pos_embed = PatchEmbed::new(&p / "pos_embed", t.in_channels, d, t.patch_size)?;
        let positions = super::dit::space_time_positions(t, p.device())?;
        let pos_embed_input = PatchEmbed::new(&p / "pos_embed_input", cfg.conditioning_channels, d, t.patch_size)?;
        super::blocks::zero_init(&pos_embed_input.proj.weight, pos_embed_input.proj.bias.as_ref())?;
        let time_text_embed = TimeLabelEmbedding::new(&p / "time_text_embed", t)?;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| DiTBlock::new(&p / "transformer_blocks" / i, d, t.num_attention_heads, t.mlp_ratio))
            .collect::<Result<Vec<_>>>()?;
        let controlnet_blocks =
            (0..cfg.num_layers).map(|i| zero_linear(&p / "controlnet_blocks" / i, d, d)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            pos_embed,
            positions,
            pos_embed_input,
            time_text_embed,
            transformer_blocks,
            controlnet_blocks,
        })
    }

    /// Builds the model under `p` and copies the main transformer's embeddings and first blocks from
    /// `main_params` (names as in the main network's `VarStore`), as `SD3ControlNetModel.from_transformer`.
    /// Errors when a copied parameter is missing or shaped differently (another main configuration).
    pub fn from_transformer(
        p: nn::Path,
        main_params: &HashMap<String, Tensor>,
        cfg: &DiTControlNetConfig,
    ) -> Result<Self> {
        let scratch = nn::VarStore::new(Device::Cpu);
        Self::new(scratch.root(), cfg)?;
        let mut names: Vec<String> = scratch
            .variables()
            .into_iter()
            .filter(|(k, _)| SHARED_PREFIXES.iter().any(|s| k.starts_with(s)))
            .map(|(k, v)| {
                let src = main_params.get(&k).ok_or_else(|| {
                    Error::Config(format!(
                        "side transformer from main: the main network has no parameter {k}; give the side network \
                         the main network's transformer config"
                    ))
                })?;
                if src.size() != v.size() {
                    return Err(Error::Config(format!(
                        "side transformer from main: {k} has shape {:?} in the main network but {:?} in the side network",
                        src.size(),
                        v.size()
                    )));
                }
                Ok(k)
            })
            .collect::<Result<Vec<_>>>()?;
        names.sort_unstable();
        drop(scratch);
        let model = Self::new(p.clone(), cfg)?;
        tch::no_grad(|| -> Result<()> {
            for name in &names {
                let parts: Vec<&str> = name.split('.').collect();
                let (last, dirs) = parts.split_last().ok_or_else(|| Error::Config("empty parameter name".into()))?;
                let dst = dirs.iter().fold(p.clone(), |q, d| q / *d).get(last).ok_or_else(|| {
                    Error::Config(format!("side transformer from main: variable {name} not found under the given path"))
                })?;
                let _ = dst.shallow_clone().f_copy_(&main_params[name])?;
            }
            Ok(())
        })?;
        Ok(model)
    }

    /// Runs the side network on `sample` [B, in, H, W] at `timesteps` with label tokens
    /// `encoder_hidden_states` and the condition `controlnet_cond` [B, conditioning_channels, H, W]:
    /// one residual per block (times `conditioning_scale`) and, with `hook = block_i`, that block's
    /// output tokens folded to a map.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        conditioning_scale: f64,
        hook: Option<Hook>,
    ) -> Result<DiTControlNetOutput> {
        let hooked_block = match hook {
            None => None,
            Some(h) => Some(self.config.hooked_block(h).ok_or_else(|| {
                Error::Config(format!(
                    "hook {h} does not exist: the side transformer has block_0 .. block_{} (mid = the last)",
                    self.transformer_blocks.len() - 1
                ))
            })?),
        };
        let t = &self.config.transformer;
        let (cs, ss) = (controlnet_cond.size(), sample.size());
        let want = t.num_frames * self.config.conditioning_channels;
        if cs.len() != 4 || ss.len() != 4 || cs[1] != want || cs[2..] != ss[2..] {
            return Err(Error::Config(format!(
                "controlnet_cond {cs:?} must have num_frames · conditioning_channels ({want}) channels at the sample's \
                 size {:?}",
                &ss[2.min(ss.len())..]
            )));
        }
        if ss[1] != t.sample_channels() || ss[2] != t.sample_size || ss[3] != t.sample_size {
            return Err(Error::Config(format!(
                "the side transformer is built for {}×{s}×{s} samples, got {:?}",
                t.sample_channels(),
                &ss[1..],
                s = t.sample_size
            )));
        }
        let f = t.num_frames;
        let mut x = patchify_frames(&self.pos_embed, sample, f)?
            .f_add(&self.positions.f_unsqueeze(0)?)?
            .f_add(&patchify_frames(&self.pos_embed_input, controlnet_cond, f)?)?;
        let c = self.time_text_embed.forward(timesteps, encoder_hidden_states)?;
        let mut block_samples = Vec::with_capacity(self.transformer_blocks.len());
        let mut hooked = None;
        for (i, (block, zero)) in self.transformer_blocks.iter().zip(&self.controlnet_blocks).enumerate() {
            x = block.forward(&x, &c)?;
            if hooked_block == Some(i) {
                hooked = Some(fold_tokens(&x, t.grid(), f)?);
            }
            block_samples.push(zero.forward(&x)?.f_mul_scalar(conditioning_scale)?);
        }
        Ok(DiTControlNetOutput { block_samples, hooked })
    }
}
