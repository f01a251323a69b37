//! transformers' `CLIPTextModel`, the text encoder of Stable Diffusion 1.x/2.x: token and position
//! embeddings, pre-norm transformer layers with causal self-attention, a final layer norm. Its
//! `last_hidden_state` [B, tokens, hidden] is the UNet's `encoder_hidden_states`.
//!
//! Parameter names are transformers' checkpoint keys under `text_model.`
//! (`text_model.encoder.layers.0.self_attn.q_proj.weight`); checkpoints saved without the prefix
//! (transformers 5) load too.
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::blocks::{LayerNorm, Linear};
use super::diffusers::{
    named_variables, read_config, read_weights, CONFIG_FILE, TRANSFORMERS_WEIGHTS_FILE,
};
use crate::{Error, Result};

/// The prefix of every parameter in a `CLIPTextModel` checkpoint.
pub const PREFIX: &str = "text_model";

/// The fields of transformers' `CLIPTextConfig` (`text_encoder/config.json`) that this model uses;
/// missing ones take transformers' defaults (openai/clip-vit-base-patch32's text tower).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Vocabulary size (rows of the token embedding).
    pub vocab_size: i64,
    /// Width of the tokens.
    pub hidden_size: i64,
    /// Width of the MLPs.
    pub intermediate_size: i64,
    /// Number of transformer layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// Longest token sequence (77 for SD).
    pub max_position_embeddings: i64,
    /// `"quick_gelu"` (OpenAI CLIP, SD1.x) or `"gelu"` (OpenCLIP, SD2.x).
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    pub layer_norm_eps: f64,
    /// End-of-text token id, for the pooled output (2 in old configs means "the largest id").
    pub eos_token_id: i64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// Checks the config; every error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(format!("CLIPTextModel: {m}")));
        if [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.max_position_embeddings,
        ]
        .iter()
        .any(|&v| v <= 0)
        {
            return err("vocab_size, hidden_size, intermediate_size, num_hidden_layers and max_position_embeddings must be positive".into());
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return err(format!(
                "hidden_size {} cannot be split into {} attention heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.hidden_act != "quick_gelu" && self.hidden_act != "gelu" {
            return err(format!("hidden_act {:?} is not supported (use \"quick_gelu\" or \"gelu\")", self.hidden_act));
        }
        Ok(())
    }
}

/// One `CLIPEncoderLayer`: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug)]
pub struct ClipEncoderLayer {
    /// `layer_norm1`.
    pub layer_norm1: LayerNorm,
    /// `self_attn.q_proj`.
    pub q_proj: Linear,
    /// `self_attn.k_proj`.
    pub k_proj: Linear,
    /// `self_attn.v_proj`.
    pub v_proj: Linear,
    /// `self_attn.out_proj`.
    pub out_proj: Linear,
    /// `layer_norm2`.
    pub layer_norm2: LayerNorm,
    /// `mlp.fc1`.
    pub fc1: Linear,
    /// `mlp.fc2`.
    pub fc2: Linear,
    heads: i64,
    quick_gelu: bool,
}

impl ClipEncoderLayer {
    /// Builds the layer under `p` (`text_model.encoder.layers.N`).
    pub fn new(p: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        let (d, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let a = &p / "self_attn";
        Ok(Self {
            layer_norm1: LayerNorm::new(&p / "layer_norm1", d, eps)?,
            q_proj: Linear::new(&a / "q_proj", d, d, true)?,
            k_proj: Linear::new(&a / "k_proj", d, d, true)?,
            v_proj: Linear::new(&a / "v_proj", d, d, true)?,
            out_proj: Linear::new(&a / "out_proj", d, d, true)?,
            layer_norm2: LayerNorm::new(&p / "layer_norm2", d, eps)?,
            fc1: Linear::new(&p / "mlp" / "fc1", d, m, true)?,
            fc2: Linear::new(&p / "mlp" / "fc2", m, d, true)?,
            heads: cfg.num_attention_heads,
            quick_gelu: cfg.hidden_act == "quick_gelu",
        })
    }

    /// Applies the layer to `x` [B, N, hidden], each token attending to itself and earlier ones.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.size3()?;
        let h = self.layer_norm1.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.f_view([b, n, self.heads, -1])?.f_transpose(1, 2)?) };
        let (q, k, v) =
            (split(self.q_proj.forward(&h)?)?, split(self.k_proj.forward(&h)?)?, split(self.v_proj.forward(&h)?)?);
        let o = super::precision::attention(&q, &k, &v, true)?;
        let o = self.out_proj.forward(&o.f_transpose(1, 2)?.f_reshape([b, n, -1])?)?;
        let x = x.f_add(&o)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick_gelu { h.f_mul(&h.f_mul_scalar(1.702)?.f_sigmoid()?)? } else { h.f_gelu("none")? };
        Ok(x.f_add(&self.fc2.forward(&h)?)?)
    }
}

/// The output of [`ClipTextModel::forward`].
#[derive(Debug)]
pub struct ClipTextOutput {
    /// The final-layer-normed tokens [B, N, hidden]: SD's `encoder_hidden_states`.
    pub last_hidden_state: Tensor,
    /// The token at each sequence's end-of-text position [B, hidden].
    pub pooler_output: Tensor,
}

/// transformers' `CLIPTextModel`.
#[derive(Debug)]
pub struct ClipTextModel {
    /// The config it was built from.
    pub config: ClipTextConfig,
    /// `embeddings.token_embedding.weight` [vocab, hidden].
    pub token_embedding: Tensor,
    /// `embeddings.position_embedding.weight` [max_positions, hidden].
    pub position_embedding: Tensor,
    /// `encoder.layers.N`.
    pub layers: Vec<ClipEncoderLayer>,
    /// `final_layer_norm`.
    pub final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Builds the model under `p` (conventionally `vs.root() / "text_model"`, see [`PREFIX`]).
    pub fn new(p: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let e = &p / "embeddings";
        let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let token_embedding = (&e / "token_embedding").f_var("weight", &[cfg.vocab_size, cfg.hidden_size], init)?;
        let position_embedding =
            (&e / "position_embedding").f_var("weight", &[cfg.max_position_embeddings, cfg.hidden_size], init)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&p / "encoder" / "layers" / i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(&p / "final_layer_norm", cfg.hidden_size, cfg.layer_norm_eps)?;
        Ok(Self { config: cfg.clone(), token_embedding, position_embedding, layers, final_layer_norm })
    }

    /// Loads a transformers `CLIPTextModel` folder (`<model>/text_encoder`) onto `device`; the model
    /// lives under [`PREFIX`] in the returned `VarStore`.
    pub fn load(dir: &Path, device: Device) -> Result<(nn::VarStore, Self)> {
        let cfg = read_config(dir)?;
        let path = dir.join(CONFIG_FILE);
        if let Some(t) = cfg.get("model_type").and_then(|v| v.as_str()) {
            if t != "clip_text_model" && t != "clip" {
                return Err(Error::format(&path, format!("model_type {t:?} is not a CLIP text model")));
            }
        }
        let config: ClipTextConfig = serde_json::from_value(serde_json::Value::Object(cfg))
            .map_err(|e| Error::format(&path, format!("not a CLIPTextConfig: {e}")))?;
        config.validate().map_err(|e| Error::format(&path, e.to_string()))?;
        let vs = nn::VarStore::new(device);
        let model = Self::new(vs.root() / PREFIX, &config)?;
        let tensors = read_weights(dir, TRANSFORMERS_WEIGHTS_FILE)?
            .into_iter()
            // A non-persistent buffer that old checkpoints contain; it is always arange(max_positions).
            .filter(|(n, _)| !n.ends_with("embeddings.position_ids"))
            .map(|(n, t)| if n.starts_with("text_model.") { (n, t) } else { (format!("{PREFIX}.{n}"), t) })
            .collect();
        crate::weights::load_into(&named_variables(&vs), tensors, &dir.join(TRANSFORMERS_WEIGHTS_FILE))?;
        Ok((vs, model))
    }

    /// Encodes token ids `input_ids` [B, N] (N ≤ `max_position_embeddings`, e.g. from
    /// [`super::tokenizer::ClipTokenizer`]).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, n) = input_ids.size2()?;
        if n > self.config.max_position_embeddings {
            return Err(Error::Config(format!(
                "CLIPTextModel: {n} tokens but at most max_position_embeddings = {} fit; truncate the prompts",
                self.config.max_position_embeddings
            )));
        }
        let ids = input_ids.f_to_device(self.token_embedding.device())?.f_to_kind(Kind::Int64)?;
        let tokens = Tensor::f_embedding(&self.token_embedding, &ids, -1, false, false)?;
        // Tables held in half precision give f32 states (see `precision::activation_kind`).
        let kind = super::precision::activation_kind(tokens.kind());
        let positions = self.position_embedding.f_narrow(0, 0, n)?.f_unsqueeze(0)?.f_to_kind(kind)?;
        let mut h = tokens.f_to_kind(kind)?.f_add(&positions)?;
        for l in &self.layers {
            h = l.forward(&h)?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&h)?;
        // transformers: with the legacy eos_token_id 2 the end is the largest id; otherwise the
        // first occurrence of eos_token_id.
        let pos = if self.config.eos_token_id == 2 {
            ids.f_argmax(-1, false)?
        } else {
            ids.f_eq(self.config.eos_token_id)?.f_to_kind(Kind::Int)?.f_argmax(-1, false)?
        };
        let rows = Tensor::f_arange(b, (Kind::Int64, ids.device()))?;
        let pooler_output = last_hidden_state.f_index(&[Some(rows), Some(pos)])?;
        Ok(ClipTextOutput { last_hidden_state, pooler_output })
    }
}
