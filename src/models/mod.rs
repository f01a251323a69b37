//! The networks: diffusers-compatible UNet building blocks, the `UNet2DConditionModel`, and the
//! class-label encoder that stands in for a text encoder.
pub mod blocks;
pub mod label_encoder;
pub mod unet;

pub use label_encoder::{LabelEncoder, LabelEncoderConfig};
pub use unet::{PerBlock, UNet2DConditionModel, UNetConfig, UNetEncoded};

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
mod tests;
