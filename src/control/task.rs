//! The side network's training task: the controlled prediction and its diffusion loss, composed with
//! the LISA term ([`super::lisa`]: the reference prediction's residual and the decoder's regression
//! onto it) when LISA is on.
use std::cell::Cell;

use tch::{Kind, Tensor};

use super::lisa::{absent_term_metrics, log_ratios, LisaHead, LisaTarget, ReferencePass};
use super::side::SideNetwork;
use crate::diffusion::TrainingSample;
use crate::pipeline::MainNetwork;
use crate::train::step::{Batch, TaskLoss, TrainTask};
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
    /// The 0-based index of the training step being taken (set by the trainer), for `lisa.last_step`.
    step: Cell<u64>,
}

impl<'a> ControlTask<'a> {
    /// The task; `lisa = None` is the baseline. The main network must be frozen
    /// ([`MainNetwork::freeze`]) so that no gradient is computed for it.
    pub fn new(main: &'a MainNetwork, side: &'a SideNetwork, lisa: Option<&'a LisaHead>) -> Result<Self> {
        if main.vs.variables().values().any(Tensor::requires_grad) {
            return Err(Error::Config("the main network must be frozen before training a side network".into()));
        }
        Ok(Self { main, side, lisa, condition_dropout: 0.0, step: Cell::new(0) })
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

    /// The LISA head if this step gets the term (LISA on, and not past `lisa.last_step`).
    fn active_lisa(&self) -> Option<&'a LisaHead> {
        self.lisa.filter(|h| h.active_at(self.step.get()))
    }

    /// The forward pass of one step on a whole batch: see [`Self::forward_rows`].
    pub fn forward(&self, x_t: &Tensor, model_t: &Tensor, y: &Tensor, condition: &Tensor) -> Result<ControlForward> {
        self.forward_rows(x_t, model_t, y, condition, None)
    }

    /// The forward pass of one step: side network, the frozen main encoder once, the up path with
    /// residuals and (LISA) without them, and the decoder on the hooked feature. `rows`: the batch's rows of
    /// a data-parallel step's global batch ([`Batch::rows`]), which set its share of `lisa.sub_batch`.
    pub fn forward_rows(
        &self,
        x_t: &Tensor,
        model_t: &Tensor,
        y: &Tensor,
        condition: &Tensor,
        rows: Option<crate::rng::Rows>,
    ) -> Result<ControlForward> {
        let encoder_hidden_states = tch::no_grad(|| self.main.label_encoder.forward(y))?;
        let lisa = self.active_lisa();
        // The residuals enter only after the encoder (UNet) or the embeddings (transformer), so that
        // part serves both passes (spec §6), and a cross-normalized side network reads its features.
        let shared = tch::no_grad(|| self.main.down_mid(x_t, model_t, &encoder_hidden_states))?;
        let hook = lisa.map(|h| h.hook);
        let side = self.side.residuals(x_t, model_t, &encoder_hidden_states, condition, 1.0, hook, Some(&shared))?;
        let pred_full = self.main.up(&shared, Some(&side.residuals))?;
        let (pred_main, decoded) = match lisa {
            None => (None, None),
            Some(head) => {
                // Only the residual and its random control need the frozen network's own prediction.
                let needs_reference = matches!(head.target, LisaTarget::Residual | LisaTarget::Random);
                // The LISA term covers the first `n` examples (all unless `lisa.sub_batch` is set).
                let n = head.lisa_examples(x_t.size()[0], rows);
                let first = |t: &Tensor| t.f_narrow(0, 0, n);
                let pred_main = if needs_reference {
                    Some(tch::no_grad(|| match head.reference_pass {
                        ReferencePass::SharedEncoder => self.main.up(&shared.narrow(n)?, None),
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
        // Drawn after the noise and timesteps, so that runs without dropout draw the same noise as runs with it.
        let dropped;
        let condition = if self.condition_dropout > 0.0 {
            let size = condition.size();
            let draw = |s: &[i64]| Ok(Tensor::f_rand(s, (Kind::Float, condition.device()))?);
            let keep = crate::rng::per_example(batch.rows, &[size[0], size[1], 1, 1], draw)?
                .ge(self.condition_dropout)
                .to_kind(condition.kind());
            dropped = condition * keep;
            &dropped
        } else {
            condition
        };
        let f = self.forward_rows(&sample.x_t, &sample.model_t, &batch.labels, condition, batch.rows)?;
        let l_main = f.pred_full.f_mse_loss(&sample.target, tch::Reduction::Mean)?;
        let (Some(head), Some(decoded)) = (self.lisa, &f.decoded) else {
            let mut metrics = vec![("l_main".into(), l_main.detach())];
            if self.lisa.is_some() {
                // Past `lisa.last_step`: the baseline's step, logged under LISA's columns.
                metrics.extend(absent_term_metrics());
            }
            return Ok(TaskLoss { metrics, loss: l_main });
        };
        let term = head.term(decoded, &sample.target, f.pred_main.as_ref(), condition, &sample.unit_t, batch.rows)?;
        let loss = &l_main + &term.loss * head.lambda;
        let mut metrics = vec![("l_main".into(), l_main.detach())];
        metrics.extend(term.metrics);
        Ok(TaskLoss { loss, metrics })
    }

    fn begin_step(&self, step: u64) {
        self.step.set(step);
    }

    /// With LISA, the interval means of its sums become ratios (see [`super::lisa::log_ratios`]).
    fn log_row(&self, row: Vec<(String, f64)>) -> Vec<(String, f64)> {
        match self.lisa {
            Some(_) => log_ratios(row),
            None => row,
        }
    }
}
