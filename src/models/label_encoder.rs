//! Class labels as the "text" conditioning of the UNet.
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::{Error, Result};

/// Settings of the [`LabelEncoder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LabelEncoderConfig {
    /// Number of real classes; one extra "null" class is added for classifier-free guidance.
    pub num_classes: i64,
    /// Conditioning tokens per label.
    pub num_tokens: i64,
}

impl Default for LabelEncoderConfig {
    /// Ten classes (Fashion-MNIST), one token.
    fn default() -> Self {
        Self { num_classes: 10, num_tokens: 1 }
    }
}

/// Maps class labels `y` [B] to `encoder_hidden_states` [B, tokens, dim] through a learned table
/// `embedding.weight` [num_classes + 1, tokens · dim]; the last row is the null label.
#[derive(Debug)]
pub struct LabelEncoder {
    /// The embedding table.
    pub embedding: Tensor,
    num_classes: i64,
    num_tokens: i64,
    dim: i64,
}

impl LabelEncoder {
    /// Builds the encoder under `p` (conventionally `label_encoder` at the top level) producing
    /// `dim`-wide tokens (the UNet's `cross_attention_dim`).
    pub fn new(p: nn::Path, cfg: &LabelEncoderConfig, dim: i64) -> Result<Self> {
        if cfg.num_classes <= 0 || cfg.num_tokens <= 0 || dim <= 0 {
            return Err(Error::Config(format!(
                "label encoder: num_classes ({}), num_tokens ({}) and dim ({dim}) must be positive",
                cfg.num_classes, cfg.num_tokens
            )));
        }
        // N(0, 1) like torch.nn.Embedding: tokens of unit scale, as a text encoder's would be.
        let embedding = (&p / "embedding").f_var(
            "weight",
            &[cfg.num_classes + 1, cfg.num_tokens * dim],
            nn::Init::Randn { mean: 0., stdev: 1. },
        )?;
        Ok(Self { embedding, num_classes: cfg.num_classes, num_tokens: cfg.num_tokens, dim })
    }

    /// The index of the null (unconditional) label.
    pub fn null_label(&self) -> i64 {
        self.num_classes
    }

    /// `batch` null labels on `device`.
    pub fn null_labels(&self, batch: i64, device: tch::Device) -> Result<Tensor> {
        Ok(Tensor::f_full([batch], self.num_classes, (Kind::Int64, device))?)
    }

    /// Encodes labels `y` [B] (int64, in `0..=num_classes`) to [B, tokens, dim].
    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        let b = y.size1()?;
        let e = Tensor::f_embedding(&self.embedding, y, -1, false, false)?;
        // A table held in half precision gives f32 states (see `precision::activation_kind`).
        let e = e.f_to_kind(super::precision::activation_kind(e.kind()))?;
        Ok(e.f_view([b, self.num_tokens, self.dim])?)
    }
}
