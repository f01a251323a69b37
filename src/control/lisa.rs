//! Likelihood Score Alignment (spec §3–§5): a small time-conditioned decoder reads the side
//! network's hooked feature `h` and is regressed onto the likelihood residual
//! `r = target − stopgrad(main(x_t, t, y))`, the part of the target the frozen main network does
//! not explain. The decoder exists only during training.
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::side::SideNetwork;
use crate::models::{DecoderConfig, Hook, LisaDecoder};
pub use super::side::DECODER_PREFIX;
use crate::pipeline::MainNetwork;
use crate::{Error, Result};

/// Timestep buckets of the per-bucket `L_lisa / mean(r²)` log (equal widths of the unit time `t/T`).
pub const NUM_TIME_BUCKETS: usize = 10;

/// How the frozen main network's prediction without residuals (`pred_main`) is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReferencePass {
    /// Reuse the main encoder and mid block of the controlled pass (the residuals enter only the up
    /// path, so they are the same) and run the up path a second time: identical result, less work.
    #[default]
    SharedEncoder,
    /// A full second forward of the main network, as the authors' script does (for comparison).
    Full,
}

/// What the decoder regresses onto. Only `residual` is LISA; the others are the ablation controls
/// that ask whether any auxiliary regression would do as well (spec §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LisaTarget {
    /// `r = target − stopgrad(main(x_t, t, y))`: LISA.
    #[default]
    Residual,
    /// Gaussian noise with the per-example RMS of `r`, drawn from the run's seeded generator: a
    /// target of the same size that carries no information.
    Random,
    /// The diffusion target itself (ε, v or velocity), not the residual: no reference pass.
    Raw,
    /// The condition image (scaled to [-1, 1]): plain feature regression onto the condition.
    Condition,
}

/// How the decoder's output is compared with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LisaDistance {
    /// Mean squared error (the authors').
    #[default]
    Mse,
    /// One minus the cosine similarity of each example's flattened output and target, averaged.
    Cosine,
}

/// LISA's settings. `enabled = false` is the baseline: no hook, no decoder, no second pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LisaConfig {
    /// Train with the LISA term. Default true.
    pub enabled: bool,
    /// Weight λ of the LISA term. Default 0.2 (the authors').
    pub lambda: f64,
    /// The side feature the decoder reads: `mid` (the authors' default) or `down_i`. Default `mid`.
    pub hook: Hook,
    /// Channel floor of the decoder's convolutions (the authors' rule uses 64). Default 64.
    pub decoder_channel_floor: i64,
    /// How `pred_main` is computed. Default `shared_encoder`.
    pub reference_pass: ReferencePass,
    /// What the decoder regresses onto (ablations). Default `residual` (LISA).
    pub target: LisaTarget,
    /// The regression distance (ablations). Default `mse`.
    pub distance: LisaDistance,
    /// Width multiplier of the decoder's hidden convs (ablation: 2 ≈ 4× the parameters). Default 1.
    pub decoder_channel_multiplier: i64,
    /// Examples per step that get the LISA term: the first `sub_batch` of the batch, which the loader
    /// shuffled and whose noise and timesteps are drawn per example, so a uniformly random subset. The
    /// reference pass and the decoder then run on those alone: an unbiased estimate of the same loss,
    /// with more variance, at a fraction of LISA's cost. 0 = the whole batch (the authors'). Default 0.
    pub sub_batch: i64,
    /// The last training step (counted from 1) with the LISA term: later steps train as the baseline does,
    /// at the baseline's cost (the decoder is dropped at inference anyway). For LISA used only through the
    /// early convergence event. 0 = every step (the authors'). Default 0.
    pub last_step: u64,
}

impl Default for LisaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lambda: 0.2,
            hook: Hook::Mid,
            decoder_channel_floor: DecoderConfig::default().channel_floor,
            reference_pass: ReferencePass::SharedEncoder,
            target: LisaTarget::Residual,
            distance: LisaDistance::Mse,
            decoder_channel_multiplier: 1,
            sub_batch: 0,
            last_step: 0,
        }
    }
}

impl LisaConfig {
    /// The name of the arm this config trains: `lisa`, or `baseline` when disabled.
    pub fn arm(&self) -> &'static str {
        if self.enabled {
            "lisa"
        } else {
            "baseline"
        }
    }

    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(Error::Config(format!("lisa.lambda must be a finite number ≥ 0, got {}", self.lambda)));
        }
        if self.decoder_channel_floor <= 0 || self.decoder_channel_multiplier <= 0 {
            return Err(Error::Config(
                "lisa.decoder_channel_floor and lisa.decoder_channel_multiplier must be ≥ 1".into(),
            ));
        }
        if self.sub_batch < 0 {
            return Err(Error::Config(format!(
                "lisa.sub_batch must be ≥ 0 (0 = the whole batch), got {}",
                self.sub_batch
            )));
        }
        Ok(())
    }
}

/// `r = target − stopgrad(pred_main)`: the regression target of the LISA decoder, whose
/// conditional mean is the (scaled) likelihood score `−σ_t ∇ log p(c | x_t, y)` for ε-prediction.
pub fn likelihood_residual(target: &Tensor, pred_main: &Tensor) -> Tensor {
    target - pred_main.detach()
}

/// The decoder and its hook, with their own variables (saved in training checkpoints only).
pub struct LisaHead {
    /// The decoder's variables, under [`DECODER_PREFIX`].
    pub vs: nn::VarStore,
    /// The decoder.
    pub decoder: LisaDecoder,
    /// Where it reads the side network.
    pub hook: Hook,
    /// λ.
    pub lambda: f64,
    /// How `pred_main` is computed.
    pub reference_pass: ReferencePass,
    /// What the decoder regresses onto.
    pub target: LisaTarget,
    /// The regression distance.
    pub distance: LisaDistance,
    /// Frames per sample: a clip's hooked feature comes with its frames folded into the batch.
    pub frames: i64,
    /// Examples per step that get the LISA term (0 = all; see [`LisaConfig::sub_batch`]).
    pub sub_batch: i64,
    /// The last training step with the LISA term (0 = every step; see [`LisaConfig::last_step`]).
    pub last_step: u64,
}

impl LisaHead {
    /// A zero-output decoder for the hooked layer of `side`, a side network of `main` (its output has
    /// the condition's channels when the target is the condition, the prediction's otherwise).
    pub fn new(main: &MainNetwork, side: &SideNetwork, cfg: &LisaConfig) -> Result<Self> {
        cfg.validate()?;
        let size = main.config.sample_size();
        let frames = main.config.num_frames();
        let layers = side.hookable_layers(size);
        let hook = match &side.config.transformer {
            // `mid` of a transformer side network is its last block.
            Some(t) => t.hooked_block(cfg.hook).map_or(cfg.hook, Hook::Block),
            None => cfg.hook,
        };
        let layer = layers.iter().find(|l| l.hook == hook).ok_or_else(|| {
            let names: Vec<String> = layers.iter().map(|l| l.hook.to_string()).collect();
            Error::Config(format!("lisa.hook {} does not exist; choose one of {}", cfg.hook, names.join(", ")))
        })?;
        let vs = nn::VarStore::new(main.vs.device());
        let decoder = LisaDecoder::new(
            vs.root() / DECODER_PREFIX.trim_end_matches('.'),
            layer.channels,
            layer.height,
            size,
            // Per frame: the decoder works on one frame at a time.
            if cfg.target == LisaTarget::Condition {
                side.config.conditioning_channels()
            } else {
                main.config.out_channels() / frames
            },
            &DecoderConfig {
                channel_floor: cfg.decoder_channel_floor,
                channel_multiplier: cfg.decoder_channel_multiplier,
            },
        )?;
        Ok(Self {
            vs,
            decoder,
            hook: cfg.hook,
            lambda: cfg.lambda,
            reference_pass: cfg.reference_pass,
            target: cfg.target,
            distance: cfg.distance,
            frames,
            sub_batch: cfg.sub_batch,
            last_step: cfg.last_step,
        })
    }

    /// `D(h, t)` for the hooked feature `h` ([B·F, C, h, w], frames folded into the batch) at network
    /// timesteps `model_t` [B]: [B, F·out, S, S], frames back as channels, shaped like the target.
    pub fn decode(&self, hooked: &Tensor, model_t: &Tensor) -> Result<Tensor> {
        if self.frames == 1 {
            return self.decoder.forward(hooked, model_t);
        }
        let b = model_t.size1()?;
        let t = model_t.f_repeat_interleave_self_int(self.frames, 0, None)?;
        let y = self.decoder.forward(hooked, &t)?;
        let s = y.size();
        Ok(y.f_reshape([b, self.frames * s[1], s[2], s[3]])?)
    }

    /// How many of a batch of `batch` examples get the LISA term. A shard holding `batch` of the `rows` of a
    /// larger global batch takes its share of `sub_batch` (rounded up), so that several processes give about
    /// `sub_batch` examples the term in all, as one process would.
    pub fn lisa_examples(&self, batch: i64, rows: Option<crate::rng::Rows>) -> i64 {
        if self.sub_batch > 0 {
            let share = match rows {
                Some(r) if r.total > batch => (self.sub_batch * batch + r.total - 1) / r.total,
                _ => self.sub_batch,
            };
            share.min(batch)
        } else {
            batch
        }
    }

    /// The decoder's parameters, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The LISA term of a step for the first `n` examples (`n` = `decoded`'s batch): what the decoder
    /// regresses onto (the likelihood residual `target − stopgrad(pred_main)`, or an ablation's
    /// control), the regression loss, and the scalars to log (`l_lisa`, `r_sq`, and per-bucket sums
    /// that [`log_ratios`] turns into the unexplained fraction of `r` by timestep).
    ///
    /// `target` and `unit_t` cover the whole batch; `pred_main` (the frozen network's prediction
    /// without residuals, needed by the residual and random targets) and `decoded` cover its first
    /// `n` examples; `condition` is the batch's condition in [0, 1]; `rows` the batch's rows of a
    /// data-parallel step's global batch, for the random target's per-example draw.
    #[allow(clippy::too_many_arguments)]
    pub fn term(
        &self,
        decoded: &Tensor,
        target: &Tensor,
        pred_main: Option<&Tensor>,
        condition: &Tensor,
        unit_t: &Tensor,
        rows: Option<crate::rng::Rows>,
    ) -> Result<LisaTerm> {
        let reference = || pred_main.ok_or_else(|| Error::Training("no reference prediction".into()));
        let n = decoded.size()[0];
        let target = target.f_narrow(0, 0, n)?;
        // `r` names whatever the decoder regresses onto; it is the likelihood residual for LISA proper.
        let r = match self.target {
            LisaTarget::Residual => likelihood_residual(&target, reference()?),
            LisaTarget::Random => {
                let res = likelihood_residual(&target, reference()?);
                let rms =
                    res.square().f_flatten(1, -1)?.f_mean_dim(1, true, Kind::Float)?.sqrt().f_view([-1, 1, 1, 1])?;
                crate::rng::per_example(rows, &res.size(), |s| crate::rng::randn_on_host(s, res.kind(), res.device()))? * rms
            }
            LisaTarget::Raw => target.detach(),
            LisaTarget::Condition => condition.f_narrow(0, 0, n)?.detach() * 2.0 - 1.0,
        };
        let loss = regression_loss(decoded, &r, self.distance)?;
        let r_sq = r.square().mean(Kind::Float);
        let (err_b, rsq_b) = bucket_sums(&decoded.detach(), &r, &unit_t.f_narrow(0, 0, n)?)?;
        let mut values = vec![loss.detach(), r_sq];
        for b in 0..NUM_TIME_BUCKETS {
            values.push(err_b.get(b as i64));
            values.push(rsq_b.get(b as i64));
        }
        Ok(LisaTerm { loss, metrics: term_metric_names().into_iter().zip(values).collect() })
    }

    /// Whether the training step with 0-based index `step` gets the LISA term (see [`LisaConfig::last_step`]).
    pub fn active_at(&self, step: u64) -> bool {
        self.last_step == 0 || step < self.last_step
    }
}

/// The names of the LISA term's logged metrics, in the order [`LisaHead::term`] returns them.
pub fn term_metric_names() -> Vec<String> {
    let mut names = vec!["l_lisa".to_string(), "r_sq".to_string()];
    for b in 0..NUM_TIME_BUCKETS {
        names.push(format!("lisa_err_b{b}"));
        names.push(format!("r_sq_b{b}"));
    }
    names
}

/// The LISA term's metrics on a step without the term (after `lisa.last_step`): the same names, NaN values,
/// so that the log keeps its columns and the interval means that include such a step are NaN, not mixed.
pub fn absent_term_metrics() -> Vec<(String, Tensor)> {
    term_metric_names().into_iter().map(|n| (n, Tensor::from(f64::NAN).to_kind(Kind::Float))).collect()
}

/// The LISA term of one step (before λ).
pub struct LisaTerm {
    /// The decoder's regression loss, attached to the side network's and decoder's graph.
    pub loss: Tensor,
    /// Scalars (0-d tensors) to log: `l_lisa`, `r_sq`, `lisa_err_b{i}`, `r_sq_b{i}`.
    pub metrics: Vec<(String, Tensor)>,
}

/// Turns the interval means of [`LisaHead::term`]'s sums in a logged row into ratios:
/// `lisa_ratio = L_lisa / mean(r²)` and `lisa_ratio_b{i}` per timestep bucket (empty bucket → NaN); the
/// per-bucket sums themselves are dropped.
pub fn log_ratios(row: Vec<(String, f64)>) -> Vec<(String, f64)> {
    let get = |name: &str| row.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or(f64::NAN);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let mut out: Vec<(String, f64)> =
        row.iter().filter(|(n, _)| !n.starts_with("lisa_err_b") && !n.starts_with("r_sq_b")).cloned().collect();
    out.push(("lisa_ratio".into(), ratio(get("l_lisa"), get("r_sq"))));
    for b in 0..NUM_TIME_BUCKETS {
        out.push((format!("lisa_ratio_b{b}"), ratio(get(&format!("lisa_err_b{b}")), get(&format!("r_sq_b{b}")))));
    }
    out
}

/// The regression loss between the decoder's output and its target under `distance`.
pub fn regression_loss(decoded: &Tensor, target: &Tensor, distance: LisaDistance) -> Result<Tensor> {
    Ok(match distance {
        LisaDistance::Mse => decoded.f_mse_loss(target, tch::Reduction::Mean)?,
        LisaDistance::Cosine => {
            let (a, b) = (decoded.f_flatten(1, -1)?, target.f_flatten(1, -1)?);
            // eps keeps the zero-initialised decoder's first step finite (cosine of a zero vector).
            let cos = Tensor::f_cosine_similarity(&a, &b, 1, 1e-8)?;
            cos.neg().f_add_scalar(1.0)?.f_mean(Kind::Float)?
        }
    })
}

/// Per-bucket sums of the decoder's squared error and of `r²` (each example's mean over its
/// elements), bucketed by unit time `t/T ∈ [0, 1)`: two [`NUM_TIME_BUCKETS`] vectors. Their ratio over
/// a logging interval is the fraction of the residual left unexplained at those timesteps.
pub fn bucket_sums(decoded: &Tensor, r: &Tensor, unit_t: &Tensor) -> Result<(Tensor, Tensor)> {
    let err = (decoded - r).square().f_flatten(1, -1)?.f_mean_dim(1, false, Kind::Float)?;
    let rsq = r.square().f_flatten(1, -1)?.f_mean_dim(1, false, Kind::Float)?;
    let nb = NUM_TIME_BUCKETS as i64;
    let bucket = (unit_t.to_kind(Kind::Float) * nb as f64).floor().clamp(0, nb - 1).to_kind(Kind::Int64);
    let one_hot = bucket.one_hot(nb).to_kind(Kind::Float);
    Ok((err.unsqueeze(0).matmul(&one_hot).squeeze_dim(0), rsq.unsqueeze(0).matmul(&one_hot).squeeze_dim(0)))
}
