//! The networks: diffusers-compatible UNet building blocks, the `UNet2DConditionModel`, the
//! class-label encoder that stands in for a text encoder, the ControlNet side network, the
//! transformer pair (a DiT main network and its ControlNet-Transformer side network) and the LISA
//! decoder; and, for Stable Diffusion folders on disk, the VAE, the CLIP text encoder and
//! tokenizer, and the diffusers-layout readers and writers.
pub mod blocks;
pub mod checkpoint;
pub mod clip_text;
pub mod controlnet;
pub mod controlnet_dit;
pub mod decoder;
pub mod diffusers;
pub mod dit;
pub mod label_encoder;
pub mod precision;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use clip_text::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use controlnet::{
    ControlNetConditioningEmbedding, ControlNetConfig, ControlNetModel, ControlNetOutput, Hook, HookableLayer,
};
pub use controlnet_dit::{DiTControlNetConfig, DiTControlNetModel, DiTControlNetOutput};
pub use decoder::{DecoderConfig, LisaDecoder};
pub use dit::{DiTConfig, DiTModel};
pub use label_encoder::{LabelEncoder, LabelEncoderConfig};
pub use precision::{autocast, MixedPrecision};
pub use tokenizer::ClipTokenizer;
pub use unet::{PerBlock, UNet2DConditionModel, UNetConfig, UNetDownMid};
pub use vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};

use tch::nn::VarStore;

/// Number of scalar parameters (all variables) in `vs`.
pub fn parameter_count(vs: &VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// Number of trainable scalar parameters in `vs`.
pub fn trainable_parameter_count(vs: &VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

#[cfg(test)]
mod controlnet_tests;
#[cfg(test)]
mod tests;
