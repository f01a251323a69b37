//! Building blocks of the diffusers UNet, with diffusers' parameter names.
//!
//! Every constructor takes the `nn::Path` of the block, so `p / "resnets" / 0 / "conv1"` becomes the
//! checkpoint key `resnets.0.conv1.weight`, exactly as in a diffusers `state_dict`. Layers are thin
//! structs over their weight tensors (instead of `tch::nn` modules) so that construction and
//! forward are fallible and return `crate::Result` instead of panicking.
use tch::{nn, Kind, Tensor};

use super::precision;
use crate::{Error, Result};

/// PyTorch's default initialisation of `Linear`/`Conv2d`: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for
/// weight and bias alike (kaiming_uniform with a = sqrt(5) reduces to this bound).
fn torch_default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

/// Sets a layer's weight and bias to exactly zero, outside autograd ("zero module": zero convs,
/// adaLN-Zero modulations, output layers that must start silent).
pub(crate) fn zero_init(weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let _ = weight.shallow_clone().f_zero_()?;
        if let Some(b) = bias {
            let _ = b.shallow_clone().f_zero_()?;
        }
        Ok(())
    })
}

/// A 2-D convolution (`weight` [out, in, k, k], optional `bias` [out]).
#[derive(Debug)]
pub struct Conv2d {
    /// The kernel, [out, in, k, k].
    pub weight: Tensor,
    /// The bias, [out].
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// A `k`×`k` convolution from `cin` to `cout` channels, with bias.
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Result<Self> {
        let init = torch_default_init(cin * k * k);
        let weight = p.f_var("weight", &[cout, cin, k, k], init)?;
        let bias = Some(p.f_var("bias", &[cout], init)?);
        Ok(Self { weight, bias, stride, padding })
    }

    /// Applies the convolution to `x` [B, in, H, W] (in the reduced dtype inside a mixed-precision
    /// region; see [`precision`](super::precision)).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let conv = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
            x.f_conv2d(w, b, [self.stride, self.stride], [self.padding, self.padding], [1, 1], 1)
        };
        match precision::lowered(x) {
            Some(k) => {
                let b = self.bias.as_ref().map(|b| precision::cast(b, k)).transpose()?;
                Ok(conv(&precision::cast(x, k)?, &precision::cast(&self.weight, k)?, b.as_ref())?
                    .f_to_kind(Kind::Float)?)
            }
            None => {
                let b = self.bias.as_ref().map(|b| precision::matching(b, x)).transpose()?;
                Ok(conv(x, &precision::matching(&self.weight, x)?, b.as_ref())?)
            }
        }
    }
}

/// A fully connected layer (`weight` [out, in], optional `bias` [out]).
#[derive(Debug)]
pub struct Linear {
    /// The weight, [out, in].
    pub weight: Tensor,
    /// The bias, [out].
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A linear map from `din` to `dout` features.
    pub fn new(p: nn::Path, din: i64, dout: i64, bias: bool) -> Result<Self> {
        let init = torch_default_init(din);
        let weight = p.f_var("weight", &[dout, din], init)?;
        let bias = if bias { Some(p.f_var("bias", &[dout], init)?) } else { None };
        Ok(Self { weight, bias })
    }

    /// Applies the layer to the last dimension of `x` (in the reduced dtype inside a mixed-precision
    /// region). A [out, in, 1, 1] weight (a 1×1 convolution's) is applied as the equivalent matmul;
    /// the view is taken here rather than stored so that it always follows the variable (loading may
    /// replace its storage).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = if self.weight.dim() == 4 {
            let s = self.weight.size();
            self.weight.f_view([s[0], s[1]])?
        } else {
            self.weight.shallow_clone()
        };
        linear(x, &w, self.bias.as_ref())
    }
}

/// `x · wᵀ + b`, in the reduced dtype inside a mixed-precision region (f32 out).
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match precision::lowered(x) {
        Some(k) => {
            let b = b.map(|b| precision::cast(b, k)).transpose()?;
            Ok(precision::cast(x, k)?.f_linear(&precision::cast(w, k)?, b.as_ref())?.f_to_kind(Kind::Float)?)
        }
        None => {
            let b = b.map(|b| precision::matching(b, x)).transpose()?;
            Ok(x.f_linear(&precision::matching(w, x)?, b.as_ref())?)
        }
    }
}

/// Group normalisation with affine `weight` and `bias`.
#[derive(Debug)]
pub struct GroupNorm {
    /// The per-channel scale.
    pub weight: Tensor,
    /// The per-channel shift.
    pub bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    /// Normalises `channels` channels in `groups` groups.
    pub fn new(p: nn::Path, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        if groups <= 0 || channels % groups != 0 {
            return Err(Error::Config(format!(
                "GroupNorm at `{}`: {channels} channels are not divisible into {groups} groups",
                p.components().collect::<Vec<_>>().join(".")
            )));
        }
        let weight = p.f_var("weight", &[channels], nn::Init::Const(1.))?;
        let bias = p.f_var("bias", &[channels], nn::Init::Const(0.))?;
        Ok(Self { weight, bias, groups, eps })
    }

    /// Normalises `x` [B, C, ...].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (precision::matching(&self.weight, x)?, precision::matching(&self.bias, x)?);
        Ok(x.f_group_norm(self.groups, Some(&w), Some(&b), self.eps, true)?)
    }
}

/// Layer normalisation over the last dimension, with affine `weight` and `bias`.
#[derive(Debug)]
pub struct LayerNorm {
    /// The per-feature scale.
    pub weight: Tensor,
    /// The per-feature shift.
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    /// Normalises the last dimension of size `dim`.
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        let weight = p.f_var("weight", &[dim], nn::Init::Const(1.))?;
        let bias = p.f_var("bias", &[dim], nn::Init::Const(0.))?;
        Ok(Self { weight, bias, dim, eps })
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (precision::matching(&self.weight, x)?, precision::matching(&self.bias, x)?);
        Ok(x.f_layer_norm([self.dim], Some(&w), Some(&b), self.eps, true)?)
    }
}

/// diffusers' `Timesteps`: the parameter-free sinusoidal projection of (continuous) timesteps.
///
/// Frequencies are `exp(-ln(10000) · i / (half - downscale_freq_shift))`, `i < half = dim / 2`;
/// with `flip_sin_to_cos` the output is `[cos, sin]`, otherwise `[sin, cos]`; an odd `dim` gets a
/// zero column, as in diffusers.
#[derive(Debug)]
pub struct Timesteps {
    /// The frequency table [half], computed once (it is a constant, not a parameter).
    freqs: Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
}

impl Timesteps {
    /// The projection to `dim` features, its constant table on `device`.
    pub fn new(dim: i64, flip_sin_to_cos: bool, downscale_freq_shift: f64, device: tch::Device) -> Result<Self> {
        let half = dim / 2;
        if half < 1 || half as f64 - downscale_freq_shift <= 0.0 {
            return Err(Error::Config(format!(
                "timestep projection: dimension {dim} is too small for freq_shift {downscale_freq_shift}"
            )));
        }
        // Computed in f32 like diffusers so that embeddings match it closely.
        let exponent = Tensor::f_arange(half, (Kind::Float, device))?
            .f_mul_scalar(-(10000f64).ln() / (half as f64 - downscale_freq_shift))?;
        Ok(Self { freqs: exponent.f_exp()?, dim, flip_sin_to_cos })
    }

    /// The output dimension.
    pub fn dim(&self) -> i64 {
        self.dim
    }

    /// Projects timesteps `t` ([B], any real kind; continuous values allowed) to [B, dim] f32.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let t = if t.kind() == Kind::Float { t.shallow_clone() } else { t.f_to_kind(Kind::Float)? };
        let args = t.f_unsqueeze(1)?.f_mul(&self.freqs.f_unsqueeze(0)?)?;
        let (sin, cos) = (args.f_sin()?, args.f_cos()?);
        let mut parts = if self.flip_sin_to_cos { vec![cos, sin] } else { vec![sin, cos] };
        if self.dim % 2 == 1 {
            parts.push(Tensor::f_zeros([t.size()[0], 1], (Kind::Float, t.device()))?);
        }
        Ok(Tensor::f_cat(&parts, 1)?)
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    /// First projection, `in → time_embed_dim`.
    pub linear_1: Linear,
    /// Second projection, `time_embed_dim → time_embed_dim`.
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// An MLP from `in_dim` to `time_embed_dim` features.
    pub fn new(p: nn::Path, in_dim: i64, time_embed_dim: i64) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&p / "linear_1", in_dim, time_embed_dim, true)?,
            linear_2: Linear::new(&p / "linear_2", time_embed_dim, time_embed_dim, true)?,
        })
    }

    /// Embeds the projected timesteps `x` [B, in_dim] into [B, time_embed_dim].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.f_silu()?)
    }
}

/// diffusers' `ResnetBlock2D` (time_embedding_norm "default", SiLU, output_scale_factor 1).
#[derive(Debug)]
pub struct ResnetBlock2D {
    /// GroupNorm on the input.
    pub norm1: GroupNorm,
    /// First 3×3 convolution, `in → out`.
    pub conv1: Conv2d,
    /// Projection of the time embedding added after `conv1`; absent in blocks without a time
    /// embedding (a VAE's, `temb_channels=None` in diffusers).
    pub time_emb_proj: Option<Linear>,
    /// GroupNorm after the time embedding is added.
    pub norm2: GroupNorm,
    /// Second 3×3 convolution, `out → out`.
    pub conv2: Conv2d,
    /// 1×1 convolution on the skip path, present when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// A residual block from `cin` to `cout` channels, conditioned on a `temb`-wide time embedding.
    pub fn new(p: nn::Path, cin: i64, cout: i64, temb: i64, groups: i64, eps: f64) -> Result<Self> {
        Self::build(p, cin, cout, Some(temb), groups, eps)
    }

    /// A residual block without time conditioning (no `time_emb_proj`), as in a VAE.
    pub fn new_without_time(p: nn::Path, cin: i64, cout: i64, groups: i64, eps: f64) -> Result<Self> {
        Self::build(p, cin, cout, None, groups, eps)
    }

    fn build(p: nn::Path, cin: i64, cout: i64, temb: Option<i64>, groups: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&p / "norm1", groups, cin, eps)?,
            conv1: Conv2d::new(&p / "conv1", cin, cout, 3, 1, 1)?,
            time_emb_proj: match temb {
                Some(t) => Some(Linear::new(&p / "time_emb_proj", t, cout, true)?),
                None => None,
            },
            norm2: GroupNorm::new(&p / "norm2", groups, cout, eps)?,
            conv2: Conv2d::new(&p / "conv2", cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&p / "conv_shortcut", cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// Applies the block to `x` [B, in, H, W] with the (raw, not yet activated) time embedding
    /// `temb` [B, temb].
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        self.forward_opt(x, Some(temb))
    }

    /// Applies a block built with [`ResnetBlock2D::new_without_time`] to `x`.
    pub fn forward_without_time(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_opt(x, None)
    }

    fn forward_opt(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(x)?.f_silu()?)?;
        match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(&temb.f_silu()?)?.f_unsqueeze(-1)?.f_unsqueeze(-1)?;
                // In place: conv2d's backward needs its input and weight, not its output.
                let _ = h.f_add_(&t)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::Config("this resnet block has a time_emb_proj and needs a time embedding".into()))
            }
            (None, Some(_)) => {
                return Err(Error::Config("this resnet block has no time_emb_proj; it takes no time embedding".into()))
            }
        }
        let mut h = self.conv2.forward(&self.norm2.forward(&h)?.f_silu()?)?;
        match &self.conv_shortcut {
            Some(c) => {
                let _ = h.f_add_(&c.forward(x)?)?;
            }
            None => {
                let _ = h.f_add_(x)?;
            }
        }
        Ok(h)
    }
}

/// diffusers' `Attention` as used by `BasicTransformerBlock`: bias-free `to_q`/`to_k`/`to_v`,
/// `to_out.0` with bias, scaled dot-product attention over `heads` heads.
#[derive(Debug)]
pub struct Attention {
    /// Query projection, `query_dim → inner`.
    pub to_q: Linear,
    /// Key projection, `context_dim → inner`.
    pub to_k: Linear,
    /// Value projection, `context_dim → inner`.
    pub to_v: Linear,
    /// Output projection (`to_out.0`), `inner → query_dim`.
    pub to_out: Linear,
    heads: i64,
}

impl Attention {
    /// Attention from `query_dim` tokens to `context_dim` tokens (`None`: self-attention), with
    /// `heads` heads of `head_dim` features.
    pub fn new(p: nn::Path, query_dim: i64, context_dim: Option<i64>, heads: i64, head_dim: i64) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::new(&p / "to_q", query_dim, inner, false)?,
            to_k: Linear::new(&p / "to_k", ctx, inner, false)?,
            to_v: Linear::new(&p / "to_v", ctx, inner, false)?,
            to_out: Linear::new(&p / "to_out" / 0, inner, query_dim, true)?,
            heads,
        })
    }

    /// Attends from `x` [B, N, query_dim] to `context` [B, M, context_dim] (`None`: to `x`).
    ///
    /// Two exact shortcuts: with a single context token (M = 1, e.g. one class-label token) the
    /// softmax weight is exactly 1, so the result is `to_out(to_v(context))` broadcast over the
    /// queries and `to_q`/`to_k` are skipped (their gradients would be exactly zero anyway; here
    /// they are left undefined). Self-attention computes q, k, v with one fused matmul.
    /// The result may be a broadcast view: add it out of place.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, d) = x.size3()?;
        let ctx = context.unwrap_or(x);
        if ctx.size()[1] == 1 {
            let v = self.to_out.forward(&self.to_v.forward(ctx)?)?;
            return Ok(v.f_expand([b, n, d], false)?);
        }
        let (q, k, v) = if context.is_none() {
            let w = Tensor::f_cat(&[&self.to_q.weight, &self.to_k.weight, &self.to_v.weight], 0)?;
            // [B, N, 3·heads·dh] → three [B, heads, N, dh] views; SDPA handles the strides. A
            // chunk (not indexing) so the backward concatenates instead of scattering into zeros.
            let qkv = linear(x, &w, None)?.f_chunk(3, -1)?;
            let split = |t: &Tensor| -> Result<Tensor> { Ok(t.f_view([b, n, self.heads, -1])?.f_transpose(1, 2)?) };
            (split(&qkv[0])?, split(&qkv[1])?, split(&qkv[2])?)
        } else {
            let split = |t: Tensor| -> Result<Tensor> {
                let l = t.size()[1];
                Ok(t.f_view([b, l, self.heads, -1])?.f_transpose(1, 2)?)
            };
            (split(self.to_q.forward(x)?)?, split(self.to_k.forward(ctx)?)?, split(self.to_v.forward(ctx)?)?)
        };
        let o = precision::attention(&q, &k, &v, false)?;
        self.to_out.forward(&o.f_transpose(1, 2)?.f_reshape([b, n, -1])?)
    }
}

/// diffusers' `FeedForward` with GEGLU: `net.2(h · gelu(g))` where `[h, g] = net.0.proj(x)`.
#[derive(Debug)]
pub struct FeedForward {
    /// `net.0.proj`: `dim → 2·inner` (value and gate halves).
    pub proj: Linear,
    /// `net.2`: `inner → dim`.
    pub out: Linear,
}

impl FeedForward {
    /// A GEGLU feed-forward of width `inner` on `dim` features.
    pub fn new(p: nn::Path, dim: i64, inner: i64) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(&p / "net" / 0 / "proj", dim, 2 * inner, true)?,
            out: Linear::new(&p / "net" / 2, inner, dim, true)?,
        })
    }

    /// Applies the feed-forward to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hg = self.proj.forward(x)?.f_chunk(2, -1)?;
        let h = hg[0].f_mul(&hg[1].f_gelu("none")?)?;
        self.out.forward(&h)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU
/// feed-forward, each pre-normed and residual).
#[derive(Debug)]
pub struct BasicTransformerBlock {
    /// Norm before self-attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attn1: Attention,
    /// Norm before cross-attention.
    pub norm2: LayerNorm,
    /// Cross-attention on `encoder_hidden_states`.
    pub attn2: Attention,
    /// Norm before the feed-forward.
    pub norm3: LayerNorm,
    /// GEGLU feed-forward of width 4·dim.
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    /// A block on `dim = heads · head_dim` features attending to `cross_dim`-wide context tokens.
    pub fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64, cross_dim: i64) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&p / "norm1", dim, 1e-5)?,
            attn1: Attention::new(&p / "attn1", dim, None, heads, head_dim)?,
            norm2: LayerNorm::new(&p / "norm2", dim, 1e-5)?,
            attn2: Attention::new(&p / "attn2", dim, Some(cross_dim), heads, head_dim)?,
            norm3: LayerNorm::new(&p / "norm3", dim, 1e-5)?,
            ff: FeedForward::new(&p / "ff", dim, 4 * dim)?,
        })
    }

    /// Applies the block to tokens `x` [B, N, dim] with context `encoder_hidden_states` [B, M, cross_dim].
    pub fn forward(&self, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        // Residual adds in place on fresh outputs of linear layers, whose backward does not need
        // their output.
        let mut a = self.attn1.forward(&self.norm1.forward(x)?, None)?;
        let _ = a.f_add_(x)?;
        let x = a;
        // Out of place: attn2 may return a broadcast view (single context token).
        let x = x.f_add(&self.attn2.forward(&self.norm2.forward(&x)?, Some(encoder_hidden_states))?)?;
        let mut f = self.ff.forward(&self.norm3.forward(&x)?)?;
        let _ = f.f_add_(&x)?;
        Ok(f)
    }
}

/// Settings of the cross-attention part of a block (its `Transformer2DModel`s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossAttnConfig {
    /// Number of attention heads (diffusers' UNet config calls this `attention_head_dim`).
    pub num_heads: i64,
    /// Width of the `encoder_hidden_states` tokens.
    pub cross_attention_dim: i64,
    /// Number of `BasicTransformerBlock`s per `Transformer2DModel`.
    pub transformer_layers: i64,
    /// `proj_in`/`proj_out` as Linear (true) or 1×1 convolutions (false).
    pub use_linear_projection: bool,
}

/// diffusers' `Transformer2DModel` for continuous inputs: GroupNorm (eps 1e-6), `proj_in`,
/// `transformer_blocks.N`, `proj_out`, plus the input as residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    /// GroupNorm on the input feature map.
    pub norm: GroupNorm,
    /// Input projection, `channels → inner`; a 1×1 conv weight [inner, C, 1, 1] or a Linear [inner, C].
    pub proj_in: Linear,
    /// The transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// Output projection, `inner → channels`, same layout as `proj_in`.
    pub proj_out: Linear,
}

impl Transformer2DModel {
    /// A transformer on `channels`-channel maps; the inner width equals `channels` (heads ·
    /// channels / heads), as in the diffusers UNet blocks.
    pub fn new(p: nn::Path, channels: i64, groups: i64, cfg: &CrossAttnConfig) -> Result<Self> {
        let heads = cfg.num_heads;
        if heads <= 0 || channels % heads != 0 {
            return Err(Error::Config(format!("{channels} channels cannot be split into {heads} attention heads")));
        }
        let inner = channels;
        let head_dim = channels / heads;
        // A 1×1 conv is a linear map on the channel axis: keep the checkpoint's 4-D weight and
        // apply it as a matmul on [B, HW, C] tokens (see `Linear::forward`), which saves the
        // conv-then-permute copy.
        let make = |name: &str, din: i64, dout: i64| -> Result<Linear> {
            let pp = &p / name;
            let init = torch_default_init(din);
            let shape: Vec<i64> = if cfg.use_linear_projection { vec![dout, din] } else { vec![dout, din, 1, 1] };
            let weight = pp.f_var("weight", &shape, init)?;
            let bias = Some(pp.f_var("bias", &[dout], init)?);
            Ok(Linear { weight, bias })
        };
        let proj_in = make("proj_in", channels, inner)?;
        let proj_out = make("proj_out", inner, channels)?;
        let transformer_blocks = (0..cfg.transformer_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &p / "transformer_blocks" / i,
                    inner,
                    heads,
                    head_dim,
                    cfg.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { norm: GroupNorm::new(&p / "norm", groups, channels, 1e-6)?, proj_in, transformer_blocks, proj_out })
    }

    /// Applies the transformer to `x` [B, C, H, W] with context `encoder_hidden_states` [B, M, cross_dim].
    pub fn forward(&self, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.size4()?;
        let tokens = self.norm.forward(x)?.f_permute([0, 2, 3, 1])?.f_reshape([b, h * w, c])?;
        let mut t = self.proj_in.forward(&tokens)?;
        for blk in &self.transformer_blocks {
            t = blk.forward(&t, encoder_hidden_states)?;
        }
        let out = self.proj_out.forward(&t)?.f_view([b, h, w, c])?.f_permute([0, 3, 1, 2])?;
        // `x` first so the sum is laid out like `x` (contiguous NCHW), not like the permuted view.
        Ok(x.f_add(&out)?)
    }
}

/// diffusers' `Downsample2D` with a convolution: 3×3, stride 2, padding 1, named `conv`.
#[derive(Debug)]
pub struct Downsample2D {
    /// The strided convolution.
    pub conv: Conv2d,
}

impl Downsample2D {
    /// Halves the resolution of `channels`-channel maps.
    pub fn new(p: nn::Path, channels: i64) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(&p / "conv", channels, channels, 3, 2, 1)? })
    }

    /// Applies the downsampler.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour ×2 (or to a given size), then a
/// 3×3 convolution named `conv`.
#[derive(Debug)]
pub struct Upsample2D {
    /// The convolution after upsampling.
    pub conv: Conv2d,
}

impl Upsample2D {
    /// Doubles the resolution of `channels`-channel maps.
    pub fn new(p: nn::Path, channels: i64) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(&p / "conv", channels, channels, 3, 1, 1)? })
    }

    /// Upsamples `x` to `size` ([H, W]) or, when `None`, to twice its resolution.
    pub fn forward(&self, x: &Tensor, size: Option<[i64; 2]>) -> Result<Tensor> {
        let (_, _, h, w) = x.size4()?;
        // Nearest with an explicit size 2H×2W picks the same source pixels as scale_factor 2.
        let size = size.unwrap_or([2 * h, 2 * w]);
        self.conv.forward(&x.f_upsample_nearest2d(size, None, None)?)
    }
}

/// Settings of a down block (`CrossAttnDownBlock2D` when `cross_attn` is set, else `DownBlock2D`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DownBlockConfig {
    /// Input channels.
    pub in_channels: i64,
    /// Output channels of every resnet.
    pub out_channels: i64,
    /// Width of the time embedding.
    pub temb_channels: i64,
    /// Number of resnets (diffusers' `layers_per_block`).
    pub num_layers: i64,
    /// Whether a `downsamplers.0` halves the resolution at the end.
    pub add_downsample: bool,
    /// GroupNorm groups of the resnets and transformers.
    pub groups: i64,
    /// GroupNorm epsilon of the resnets.
    pub eps: f64,
    /// Cross-attention after each resnet, if any.
    pub cross_attn: Option<CrossAttnConfig>,
}

/// diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`: `resnets.N`, `attentions.N` (cross-attention
/// blocks only), `downsamplers.0`.
#[derive(Debug)]
pub struct DownBlock2D {
    /// The residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// One transformer after each resnet (empty for `DownBlock2D`).
    pub attentions: Vec<Transformer2DModel>,
    /// The optional downsampler.
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// Builds the block under `p` (e.g. `down_blocks.1`).
    pub fn new(p: nn::Path, cfg: &DownBlockConfig) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..cfg.num_layers {
            let cin = if i == 0 { cfg.in_channels } else { cfg.out_channels };
            resnets.push(ResnetBlock2D::new(
                &p / "resnets" / i,
                cin,
                cfg.out_channels,
                cfg.temb_channels,
                cfg.groups,
                cfg.eps,
            )?);
            if let Some(ca) = &cfg.cross_attn {
                attentions.push(Transformer2DModel::new(&p / "attentions" / i, cfg.out_channels, cfg.groups, ca)?);
            }
        }
        let downsampler =
            if cfg.add_downsample { Some(Downsample2D::new(&p / "downsamplers" / 0, cfg.out_channels)?) } else { None };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// How many skip samples the block emits: one per resnet, one more for the downsampler.
    pub fn num_skips(&self) -> usize {
        self.resnets.len() + usize::from(self.downsampler.is_some())
    }

    /// Runs the block; returns the output and appends the skip samples to `skips`.
    /// `encoder_hidden_states` is required when the block has attentions.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, encoder_hidden_states: Option<&Tensor>, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.shallow_clone();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, temb)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, require_ehs(encoder_hidden_states)?)?;
            }
            skips.push(h.shallow_clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.shallow_clone());
        }
        Ok(h)
    }
}

fn require_ehs(encoder_hidden_states: Option<&Tensor>) -> Result<&Tensor> {
    encoder_hidden_states.ok_or_else(|| Error::Config("a cross-attention block needs encoder_hidden_states".into()))
}

/// Settings of the mid block (`UNetMidBlock2DCrossAttn` with one attention).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MidBlockConfig {
    /// Channels in and out.
    pub channels: i64,
    /// Width of the time embedding.
    pub temb_channels: i64,
    /// GroupNorm groups.
    pub groups: i64,
    /// GroupNorm epsilon of the resnets.
    pub eps: f64,
    /// The attention settings.
    pub cross_attn: CrossAttnConfig,
}

/// diffusers' `UNetMidBlock2DCrossAttn` (num_layers 1): `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug)]
pub struct UNetMidBlock2DCrossAttn {
    /// The two residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// The transformer between them.
    pub attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    /// Builds the block under `p` (e.g. `mid_block`).
    pub fn new(p: nn::Path, cfg: &MidBlockConfig) -> Result<Self> {
        let c = cfg.channels;
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(&p / "resnets" / i, c, c, cfg.temb_channels, cfg.groups, cfg.eps))
            .collect::<Result<Vec<_>>>()?;
        let attentions = vec![Transformer2DModel::new(&p / "attentions" / 0, c, cfg.groups, &cfg.cross_attn)?];
        Ok(Self { resnets, attentions })
    }

    /// Runs `resnets.0`, then each (attention, next resnet) pair.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, temb)?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = a.forward(&h, encoder_hidden_states)?;
            h = r.forward(&h, temb)?;
        }
        Ok(h)
    }
}

/// Settings of an up block (`CrossAttnUpBlock2D` when `cross_attn` is set, else `UpBlock2D`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpBlockConfig {
    /// Channels of the matching down block's input (the width of its last skip sample).
    pub in_channels: i64,
    /// Channels coming from the previous up block (or the mid block).
    pub prev_output_channels: i64,
    /// Output channels of every resnet.
    pub out_channels: i64,
    /// Width of the time embedding.
    pub temb_channels: i64,
    /// Number of resnets (diffusers: `layers_per_block + 1`).
    pub num_layers: i64,
    /// Whether an `upsamplers.0` doubles the resolution at the end.
    pub add_upsample: bool,
    /// GroupNorm groups.
    pub groups: i64,
    /// GroupNorm epsilon of the resnets.
    pub eps: f64,
    /// Cross-attention after each resnet, if any.
    pub cross_attn: Option<CrossAttnConfig>,
}

/// diffusers' `CrossAttnUpBlock2D` / `UpBlock2D`: `resnets.N` (each on the concatenation of the
/// running features and one skip sample), `attentions.N`, `upsamplers.0`.
#[derive(Debug)]
pub struct UpBlock2D {
    /// The residual blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// One transformer after each resnet (empty for `UpBlock2D`).
    pub attentions: Vec<Transformer2DModel>,
    /// The optional upsampler.
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    /// Builds the block under `p` (e.g. `up_blocks.0`).
    pub fn new(p: nn::Path, cfg: &UpBlockConfig) -> Result<Self> {
        let n = cfg.num_layers;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..n {
            let skip = if i == n - 1 { cfg.in_channels } else { cfg.out_channels };
            let cin = if i == 0 { cfg.prev_output_channels } else { cfg.out_channels };
            resnets.push(ResnetBlock2D::new(
                &p / "resnets" / i,
                cin + skip,
                cfg.out_channels,
                cfg.temb_channels,
                cfg.groups,
                cfg.eps,
            )?);
            if let Some(ca) = &cfg.cross_attn {
                attentions.push(Transformer2DModel::new(&p / "attentions" / i, cfg.out_channels, cfg.groups, ca)?);
            }
        }
        let upsampler =
            if cfg.add_upsample { Some(Upsample2D::new(&p / "upsamplers" / 0, cfg.out_channels)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// How many skip samples the block consumes (one per resnet).
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Runs the block on `x`, consuming `skips` from the last one backwards (`skips.len()` must be
    /// `num_skips()`); the upsampler, if any, resizes to `upsample_size` (default ×2).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        upsample_size: Option<[i64; 2]>,
    ) -> Result<Tensor> {
        if skips.len() != self.resnets.len() {
            return Err(Error::Config(format!(
                "up block needs {} skip samples, got {}",
                self.resnets.len(),
                skips.len()
            )));
        }
        let mut h = x.shallow_clone();
        for (i, (r, s)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = r.forward(&Tensor::f_cat(&[&h, s], 1)?, temb)?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, require_ehs(encoder_hidden_states)?)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}
