//! The side network's training step: the controlled prediction, and with LISA the reference
//! prediction, the likelihood residual and the decoder's regression onto it.
use tch::{Kind, Tensor};

use super::lisa::{
    bucket_sums, likelihood_residual, regression_loss, LisaHead, LisaTarget, ReferencePass, NUM_TIME_BUCKETS,
};
use super::side::SideNetwork;
use crate::diffusion::TrainingSample;
use crate::pipeline::MainNetwork;
use crate::train::trainer::{Batch, TaskLoss, TrainTask};
use crate::{Error, Result};

/// What one forward of the training step computes.
pub struct ControlForward {
    /// `main(x_t, t, y; residuals = side(x_t, t, y, c))`, attached to the side network's graph.
    pub pred_full: Tensor,
    /// LISA only (and its random-target control): `main(x_t, t, y)` without residuals, no gradient.
    pub pred_main: Option<Tensor>,
    /// LISA only: `D(h, t)`, the decoder's reading of the hooked feature.
    pub decoded: Option<Tensor>,
}

/// Trains a side network against a frozen main network, with or without the LISA term.
pub struct ControlTask<'a> {
    main: &'a MainNetwork,
    side: &'a SideNetwork,
    lisa: Option<&'a LisaHead>,
    condition_dropout: f64,
}

impl<'a> ControlTask<'a> {
    /// The task; `lisa = None` is the baseline. The main network must be frozen
    /// ([`MainNetwork::freeze`]) so that no gradient is computed for it.
    pub fn new(main: &'a MainNetwork, side: &'a SideNetwork, lisa: Option<&'a LisaHead>) -> Result<Self> {
        if main.vs.variables().values().any(Tensor::requires_grad) {
            return Err(Error::Config("the main network must be frozen before training a side network".into()));
        }
        Ok(Self { main, side, lisa, condition_dropout: 0.0 })
    }

    /// Zeroes each condition channel of each training sample with probability `p` (condition dropout:
    /// a side network trained on stacked conditions then accepts any subset of them at inference).
    pub fn with_condition_dropout(mut self, p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Config(format!("condition_dropout must be in [0, 1), got {p}")));
        }
        self.condition_dropout = p;
        Ok(self)
    }

    /// The forward pass of one step: side network, the frozen main encoder once, the up path with
    /// residuals and (LISA) without them, and the decoder on the hooked feature.
    pub fn forward(&self, x_t: &Tensor, model_t: &Tensor, y: &Tensor, condition: &Tensor) -> Result<ControlForward> {
        let ehs = tch::no_grad(|| self.main.labels.forward(y))?;
        let side = self.side.residuals(x_t, model_t, &ehs, condition, 1.0, self.lisa.map(|h| h.hook))?;
        // The residuals enter only after the encoder (UNet) or the embeddings (transformer), so that
        // part serves both passes (spec §6).
        let shared = tch::no_grad(|| self.main.encode(x_t, model_t, &ehs))?;
        let pred_full = self.main.decode(&shared, Some(&side.residuals))?;
        let (pred_main, decoded) = match self.lisa {
            None => (None, None),
            Some(head) => {
                // Only the residual and its random control need the frozen network's own prediction.
                let needs_reference = matches!(head.target, LisaTarget::Residual | LisaTarget::Random);
                // The LISA term covers the first `n` examples (all unless `lisa.sub_batch` is set).
                let n = head.lisa_examples(x_t.size()[0]);
                let first = |t: &Tensor| t.f_narrow(0, 0, n);
                let pred_main = if needs_reference {
                    Some(tch::no_grad(|| match head.reference_pass {
                        ReferencePass::SharedEncoder => self.main.decode(&shared.narrow(n)?, None),
                        ReferencePass::Full => self.main.predict(&first(x_t)?, &first(model_t)?, &first(y)?),
                    })?)
                } else {
                    None
                };
                let hooked =
                    side.hooked.ok_or_else(|| Error::Training("the side network returned no hooked feature".into()))?;
                // A clip's hooked feature has its frames folded into the batch, example-major.
                let hooked = hooked.f_narrow(0, 0, n * head.frames)?;
                (pred_main, Some(head.decode(&hooked, &first(model_t)?)?))
            }
        };
        Ok(ControlForward { pred_full, pred_main, decoded })
    }
}

impl TrainTask for ControlTask<'_> {
    fn loss(&self, batch: &Batch, sample: &TrainingSample) -> Result<TaskLoss> {
        let condition = batch
            .condition
            .as_ref()
            .ok_or_else(|| Error::Config("side-network training needs a dataset with condition images".into()))?;
        // Drawn after the noise and timesteps, so that runs without dropout draw exactly as before.
        let dropped;
        let condition = if self.condition_dropout > 0.0 {
            let size = condition.size();
            let keep = Tensor::rand([size[0], size[1], 1, 1], (Kind::Float, condition.device()))
                .ge(self.condition_dropout)
                .to_kind(condition.kind());
            dropped = condition * keep;
            &dropped
        } else {
            condition
        };
        let f = self.forward(&sample.x_t, &sample.model_t, &batch.labels, condition)?;
        let l_main = f.pred_full.f_mse_loss(&sample.target, tch::Reduction::Mean)?;
        let (Some(head), Some(decoded)) = (self.lisa, &f.decoded) else {
            return Ok(TaskLoss { metrics: vec![("l_main".into(), l_main.detach())], loss: l_main });
        };
        let reference = || f.pred_main.as_ref().ok_or_else(|| Error::Training("no reference prediction".into()));
        // The examples the LISA term covers (the whole batch unless `lisa.sub_batch` is set).
        let n = decoded.size()[0];
        let target = sample.target.f_narrow(0, 0, n)?;
        // `r` names whatever the decoder regresses onto; it is the likelihood residual for LISA proper.
        let r = match head.target {
            LisaTarget::Residual => likelihood_residual(&target, reference()?),
            LisaTarget::Random => {
                let res = likelihood_residual(&target, reference()?);
                let rms =
                    res.square().f_flatten(1, -1)?.f_mean_dim(1, true, Kind::Float)?.sqrt().f_view([-1, 1, 1, 1])?;
                crate::rng::randn_like_on_host(&res)? * rms
            }
            LisaTarget::Raw => target.detach(),
            LisaTarget::Condition => condition.f_narrow(0, 0, n)?.detach() * 2.0 - 1.0,
        };
        let l_lisa = regression_loss(decoded, &r, head.distance)?;
        let r_sq = r.square().mean(Kind::Float);
        let loss = &l_main + &l_lisa * head.lambda;
        let (err_b, rsq_b) = bucket_sums(&decoded.detach(), &r, &sample.unit_t.f_narrow(0, 0, n)?)?;
        let mut metrics =
            vec![("l_main".into(), l_main.detach()), ("l_lisa".into(), l_lisa.detach()), ("r_sq".into(), r_sq)];
        for b in 0..NUM_TIME_BUCKETS {
            metrics.push((format!("lisa_err_b{b}"), err_b.get(b as i64)));
            metrics.push((format!("r_sq_b{b}"), rsq_b.get(b as i64)));
        }
        Ok(TaskLoss { loss, metrics })
    }

    /// Turns the interval means of the LISA sums into ratios: `lisa_ratio = L_lisa / mean(r²)` and
    /// `lisa_ratio_b{i}` per timestep bucket (empty bucket → NaN).
    fn log_row(&self, row: Vec<(String, f64)>) -> Vec<(String, f64)> {
        if self.lisa.is_none() {
            return row;
        }
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
}
