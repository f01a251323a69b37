//! FLOPs of a training step counted from the parameters' names and shapes (UNet main network,
//! ControlNet side network, LISA decoder), for the benchmark's FLOP rates and overheads.
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::models::UNetConfig;

/// How the FLOPs are counted (stated in the output).
pub const FLOP_NOTE: &str = "FLOPs counted from the layers' shapes: convolutions, linear layers and the two attention \
                             products (norms, activations, additions and the optimizer are not counted). Backward ≈ \
                             2× forward for trainable layers (side network, decoder), 1× for frozen layers on the \
                             gradient path (the main network's up path); no-grad passes forward only. The reference \
                             computes the same step, so its LISA step has the FLOPs of our full-second-forward one";

/// Forward FLOPs per sample of the parts of a step, from the parameters' names and shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepFlops {
    /// The side network (trainable).
    pub side: f64,
    /// The main network's encoder: `conv_in`, time embedding, down path, mid block (frozen, no grad).
    pub main_encoder: f64,
    /// The main network's up path and output conv (frozen; gradients pass through it to the residuals).
    pub main_up: f64,
    /// The LISA decoder (trainable).
    pub decoder: f64,
    /// Weights whose FLOPs could not be placed (none for the supported architectures).
    pub unrecognised: Vec<String>,
}

impl StepFlops {
    /// Counts the forward FLOPs per sample of `main`'s UNet, a side network's and a decoder's parameters.
    pub fn count(
        ctx: &FlopContext,
        main: &[(String, Vec<i64>)],
        side: &[(String, Vec<i64>)],
        decoder: &[(String, Vec<i64>)],
    ) -> Self {
        let mut unrecognised = Vec::new();
        let mut sum = |params: &[(String, Vec<i64>)], filter: &dyn Fn(&str) -> bool| -> f64 {
            let mut total = 0.0;
            for (name, shape) in params.iter().filter(|(n, _)| filter(n)) {
                match forward_flops(name, shape, ctx) {
                    Some(f) => total += f,
                    None => unrecognised.push(name.clone()),
                }
            }
            total
        };
        let is_up =
            |n: &str| n.starts_with("up_blocks.") || n.starts_with("conv_norm_out.") || n.starts_with("conv_out.");
        let main_encoder = sum(main, &|n| !is_up(n));
        let main_up = sum(main, &is_up);
        let side = sum(side, &|_| true);
        let decoder = sum(decoder, &|_| true);
        Self { side, main_encoder, main_up, decoder, unrecognised }
    }
}

/// What [`forward_flops`] needs to place a layer: the UNet's levels, the input size, the label tokens,
/// the conditioning embedding and the decoder's input resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct FlopContext {
    /// The UNet (main network and side network share it).
    pub unet: UNetConfig,
    /// Height = width of the sample (and of the condition).
    pub size: i64,
    /// Tokens of the label encoding (cross-attention keys).
    pub label_tokens: i64,
    /// The side network's conditioning embedding stride-2 transitions (`log2(conditioning_downscale)`).
    pub cond_stride2: usize,
    /// Resolution of the feature the LISA decoder reads.
    pub decoder_feature_res: i64,
}

impl FlopContext {
    /// Resolution of UNet level `i` (3×3 stride-2 convs with padding 1 between levels).
    fn level_res(&self, i: usize) -> i64 {
        (0..i).fold(self.size, |r, _| (r - 1) / 2 + 1)
    }
}

/// Forward FLOPs per sample of the parameter `name` of shape `shape` (`2·MACs`; a convolution or linear
/// weight, plus the attention products `QKᵀ` and `AV` at an attention's `to_q`); `Some(0)` for
/// parameters without such work (biases, norms, the label embedding); `None` for a weight it cannot place.
pub fn forward_flops(name: &str, shape: &[i64], ctx: &FlopContext) -> Option<f64> {
    if !name.ends_with(".weight") || shape.len() < 2 || name.starts_with("label_encoder.") {
        return Some(0.0);
    }
    let parts: Vec<&str> = name.split('.').collect();
    let idx = |k: usize| parts.get(k).and_then(|s| s.parse::<usize>().ok());
    let n = ctx.unet.block_out_channels.len();
    let per_sample_vector = name.starts_with("time_embedding.") || name.contains(".time_emb_proj.");
    let res: i64 = if let Some(rest) = name.strip_prefix(crate::control::side::DECODER_PREFIX) {
        if rest.starts_with("time_linear.") {
            1
        } else if rest.starts_with("blocks.") {
            ctx.decoder_feature_res << idx(2)?
        } else if rest.starts_with("conv_refine.") {
            ctx.decoder_feature_res
        } else if rest.starts_with("conv_out.") {
            ctx.size
        } else {
            return None;
        }
    } else {
        match parts[0] {
            "conv_in" | "conv_out" | "time_embedding" => ctx.size,
            "down_blocks" => {
                let i = idx(1)?;
                ctx.level_res(if parts.get(2) == Some(&"downsamplers") { i + 1 } else { i })
            }
            "mid_block" | "controlnet_mid_block" => ctx.level_res(n - 1),
            "up_blocks" => {
                let level = n.checked_sub(1 + idx(1)?)?;
                ctx.level_res(if parts.get(2) == Some(&"upsamplers") { level.checked_sub(1)? } else { level })
            }
            "controlnet_cond_embedding" => {
                // blocks.2j runs after j stage transitions, blocks.2j+1 (and conv_out after the last) after j+1;
                // the first `cond_stride2` transitions halve the resolution.
                let transitions = match parts.get(1) {
                    Some(&"conv_in") => 0,
                    Some(&"blocks") => idx(2)?.div_ceil(2),
                    Some(&"conv_out") => usize::MAX,
                    _ => return None,
                };
                ctx.level_res(transitions.min(ctx.cond_stride2))
            }
            "controlnet_down_blocks" => ctx.unet.skip_shapes(ctx.size, ctx.size).get(idx(1)?)?[1],
            _ => return None,
        }
    };
    let positions = (res * res) as f64;
    let tokens = if per_sample_vector || name.starts_with("lisa_decoder.time_linear.") {
        1.0
    } else if name.contains(".attn2.to_k.") || name.contains(".attn2.to_v.") {
        ctx.label_tokens as f64
    } else {
        positions
    };
    let macs_per_token: i64 = shape.iter().product();
    let mut flops = 2.0 * macs_per_token as f64 * tokens;
    let inner = shape[0] as f64;
    if name.ends_with(".attn1.to_q.weight") {
        flops += 4.0 * positions * positions * inner;
    } else if name.ends_with(".attn2.to_q.weight") {
        flops += 4.0 * positions * ctx.label_tokens as f64 * inner;
    }
    Some(flops)
}

/// `(name, shape)` of each parameter, what [`StepFlops::count`] reads.
pub fn shapes(params: &[(String, Tensor)]) -> Vec<(String, Vec<i64>)> {
    params.iter().map(|(n, t)| (n.clone(), t.size())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_ctx() -> FlopContext {
        FlopContext { unet: UNetConfig::default(), size: 32, label_tokens: 1, cond_stride2: 0, decoder_feature_res: 8 }
    }

    #[test]
    fn flops_of_single_layers_from_their_shapes() {
        let ctx = shipped_ctx();
        let f = |name: &str, shape: &[i64]| forward_flops(name, shape, &ctx);
        // 3×3 conv 1 → 32 channels at 32×32.
        assert_eq!(f("conv_in.weight", &[32, 1, 3, 3]), Some(2.0 * 32.0 * 9.0 * 1024.0));
        // The downsampler's output is at the next level.
        assert_eq!(
            f("down_blocks.0.downsamplers.0.conv.weight", &[32, 32, 3, 3]),
            Some(2.0 * 32.0 * 32.0 * 9.0 * 256.0)
        );
        // up_blocks.0 is the lowest resolution (8×8), its upsampler runs at 16×16.
        assert_eq!(f("up_blocks.0.resnets.0.conv2.weight", &[64, 64, 3, 3]), Some(2.0 * 64.0 * 64.0 * 9.0 * 64.0));
        assert_eq!(f("up_blocks.0.upsamplers.0.conv.weight", &[64, 64, 3, 3]), Some(2.0 * 64.0 * 64.0 * 9.0 * 256.0));
        // Per-sample vectors: one token.
        assert_eq!(f("time_embedding.linear_2.weight", &[128, 128]), Some(2.0 * 128.0 * 128.0));
        assert_eq!(f("mid_block.resnets.0.time_emb_proj.weight", &[64, 128]), Some(2.0 * 64.0 * 128.0));
        // Self-attention at 8×8: the projection plus QKᵀ and AV over 64 positions.
        let p = 64.0;
        assert_eq!(
            f("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", &[64, 64]),
            Some(2.0 * 64.0 * 64.0 * p + 4.0 * p * p * 64.0)
        );
        // Cross-attention keys come from the label tokens.
        assert_eq!(
            f("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", &[64, 64]),
            Some(2.0 * 64.0 * 64.0)
        );
        assert_eq!(
            f("mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight", &[64, 64]),
            Some(2.0 * 64.0 * 64.0 * p + 4.0 * p * 64.0)
        );
        // Side network and decoder.
        assert_eq!(f("controlnet_mid_block.weight", &[64, 64, 1, 1]), Some(2.0 * 64.0 * 64.0 * p));
        assert_eq!(f("controlnet_down_blocks.3.weight", &[32, 32, 1, 1]), Some(2.0 * 32.0 * 32.0 * 256.0));
        assert_eq!(
            f("controlnet_cond_embedding.blocks.1.weight", &[32, 16, 3, 3]),
            Some(2.0 * 32.0 * 16.0 * 9.0 * 1024.0)
        );
        assert_eq!(f("lisa_decoder.blocks.1.conv.weight", &[64, 64, 3, 3]), Some(2.0 * 64.0 * 64.0 * 9.0 * 256.0));
        assert_eq!(f("lisa_decoder.time_linear.weight", &[64, 256]), Some(2.0 * 64.0 * 256.0));
        // No matmul work; and a weight it cannot place.
        assert_eq!(f("conv_in.bias", &[32]), Some(0.0));
        assert_eq!(f("label_encoder.embedding.weight", &[11, 64]), Some(0.0));
        assert_eq!(f("mystery.weight", &[3, 3]), None);
        // A stride-2 conditioning embedding halves after its first transition.
        let ctx2 = FlopContext { cond_stride2: 1, ..shipped_ctx() };
        assert_eq!(
            forward_flops("controlnet_cond_embedding.conv_out.weight", &[32, 32, 3, 3], &ctx2),
            Some(2.0 * 32.0 * 32.0 * 9.0 * 256.0)
        );
    }
}
