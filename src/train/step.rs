//! One optimizer update, written once, top to bottom: per micro-batch the noise and timesteps (drawn
//! on the host from the run's seed and a counter), the task's loss under autocast, its backward
//! (loss-scaled under fp16); then unscale, clip, the host reads of loss and gradient norm, the loss
//! scaler's verdict, AdamW, zero_grad. The training loop, `lisa bench` and the parity test all call it,
//! so what the benchmark times and the parity test checks is the step that trains.
//!
//! In a process group ([`crate::distributed`]) each micro-batch is this process's equal shard of the global
//! one: its random draws are its rows of the global batch's ([`crate::rng::Rows`]), and after the backward the
//! gradients, the loss and the task's metrics are averaged over the processes, before unscaling and clipping,
//! so that every process clips and applies the gradient of the global batch.
use tch::{Kind, Tensor};

use super::optim::{clip_grad_norm, AdamW};
use super::loss_scaler::LossScaler;
use crate::diffusion::{Objective, TrainingSample};
use crate::models::precision::{autocast, MixedPrecision};
use crate::rng::{derive_seed, per_example, randn_on_host, Rows};
use crate::Result;

/// One micro-batch as the task sees it.
pub struct Batch {
    /// Clean images, [B, C, H, W] in [-1, 1].
    pub x0: Tensor,
    /// Class labels (the `y` conditioning), [B] i64.
    pub labels: Tensor,
    /// Condition images, [B, C, H, W] in [0, 1], when the dataset has them.
    pub condition: Option<Tensor>,
    /// The rows of the global batch this micro-batch holds, when it is one process's shard of a data-parallel
    /// step (`None`: the whole batch). Per-example draws ([`per_example`]) take these rows of the global draw,
    /// so that several processes draw what one would.
    pub rows: Option<Rows>,
}

/// The loss of one micro-batch and the scalars to log with it.
pub struct TaskLoss {
    /// The scalar to minimise.
    pub loss: Tensor,
    /// Extra scalars (0-d tensors) averaged over the logging interval, e.g. LISA's loss terms.
    pub metrics: Vec<(String, Tensor)>,
}

/// What is trained: the loss of a noised micro-batch. Randomness inside (e.g. label dropout) must
/// use libtorch's global generator, which the loop reseeds deterministically before each call.
pub trait TrainTask {
    /// Computes the loss; gradients flow to the parameters the optimizer holds.
    fn loss(&self, batch: &Batch, sample: &TrainingSample) -> Result<TaskLoss>;

    /// Told the 0-based index of the step about to be taken, before its losses (for tasks that change over
    /// training, e.g. LISA switched off after `lisa.last_step`). Default: nothing.
    fn begin_step(&self, _step: u64) {}

    /// Rewrites a logged row (interval means of `loss`, `grad_norm`, the task's metrics, ...) before
    /// it is written, e.g. to turn summed terms into ratios. Default: unchanged.
    fn log_row(&self, row: Vec<(String, f64)>) -> Vec<(String, f64)> {
        row
    }
}

/// Where each micro-batch's noise and timesteps come from.
pub enum Noise<'a> {
    /// Drawn from libtorch's generator reseeded with `derive_seed(seed, first_counter + micro)`, on the
    /// host (the same draw on every device): every random draw of a step follows from the run's seed and
    /// the step, so resuming needs no generator state.
    Seeded {
        /// The run's seed.
        seed: u64,
        /// The counter of the step's first micro-batch (`step × micro-batches per step`).
        first_counter: u64,
    },
    /// Given noised samples, one per micro-batch (golden tensors of a parity test).
    Given(&'a [TrainingSample]),
}

/// The step's settings (a subset of the training configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    /// Gradient-norm clipping threshold (0 = off).
    pub max_grad_norm: f64,
    /// Precision of the forward and backward.
    pub mixed_precision: MixedPrecision,
}

/// What became of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// AdamW applied it.
    Applied,
    /// fp16 gradients overflowed at this loss scale: skipped, the scale halved (not a bad step).
    Overflow,
    /// A non-finite loss or gradient norm: skipped, the weights as they were.
    NonFinite,
}

/// The result of one update.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Applied or skipped, and why.
    pub outcome: StepOutcome,
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The task's metrics, each the mean over the micro-batches.
    pub metrics: Vec<(String, f64)>,
    /// The loss scale the step ran at (1 unless fp16).
    pub loss_scale: f64,
}

/// Gradients of one update, accumulated and clipped, before the optimizer sees them.
pub struct Gradients {
    loss: f64,
    grad_norm: f64,
    metrics: Vec<(String, f64)>,
    loss_scale: f64,
}

impl Gradients {
    /// Global gradient norm before clipping.
    pub fn grad_norm(&self) -> f64 {
        self.grad_norm
    }

    /// Mean loss over the micro-batches.
    pub fn loss(&self) -> f64 {
        self.loss
    }
}

/// The noised sample of one micro-batch drawn from `(seed, counter)` (see [`Noise::Seeded`]); for a shard
/// ([`Batch::rows`]), its rows of the global batch's draw.
pub fn seeded_sample(objective: &Objective, batch: &Batch, seed: u64, counter: u64) -> Result<TrainingSample> {
    tch::manual_seed(derive_seed(seed, counter) as i64);
    let x0 = &batch.x0;
    let noise = per_example(batch.rows, &x0.size(), |s| randn_on_host(s, x0.kind(), x0.device()))?;
    let t = per_example(batch.rows, &[x0.size()[0]], |s| Ok(objective.sample_times(s[0], tch::Device::Cpu)))?;
    let t = t.to_device(x0.device());
    objective.training_sample(&batch.x0, &noise, &t)
}

/// The whole update: [`backward`], then [`apply`].
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    task: &dyn TrainTask,
    opt: &mut AdamW,
    objective: &Objective,
    micro_batches: &[Batch],
    noise: Noise,
    lr: f64,
    settings: StepSettings,
    scaler: Option<&mut LossScaler>,
) -> Result<StepResult> {
    let grads = backward(task, opt, objective, micro_batches, noise, settings, scaler.as_deref())?;
    Ok(apply(grads, opt, lr, scaler))
}

/// Forward and backward of every micro-batch (gradients averaged over them), then unscale and clip:
/// afterwards the parameters hold the clipped gradients the optimizer will apply.
pub fn backward(
    task: &dyn TrainTask,
    opt: &AdamW,
    objective: &Objective,
    micro_batches: &[Batch],
    noise: Noise,
    settings: StepSettings,
    scaler: Option<&LossScaler>,
) -> Result<Gradients> {
    let n = micro_batches.len() as f64;
    let loss_scale = scaler.map_or(1.0, |s| s.scale);
    let mut loss_sum = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    let mut metric_sums: Vec<(String, Tensor)> = Vec::new();
    let group = crate::distributed::current();
    for (micro, batch) in micro_batches.iter().enumerate() {
        let drawn;
        let sample = match &noise {
            Noise::Seeded { seed, first_counter } => {
                drawn = seeded_sample(objective, batch, *seed, first_counter + micro as u64)?;
                &drawn
            }
            Noise::Given(samples) => samples.get(micro).ok_or_else(|| {
                crate::Error::Training(format!("{} given samples for {} micro-batches", samples.len(), n))
            })?,
        };
        let out = autocast(settings.mixed_precision, || task.loss(batch, sample))?;
        (&out.loss * (loss_scale / n)).backward();
        loss_sum += out.loss.detach().to_device(tch::Device::Cpu);
        for (i, (name, v)) in out.metrics.into_iter().enumerate() {
            let v = v.detach().to_device(tch::Device::Cpu);
            match metric_sums.get_mut(i) {
                Some((_, acc)) => *acc += v,
                None => metric_sums.push((name, v)),
            }
        }
    }
    let mut means: Vec<f64> = std::iter::once(&loss_sum)
        .chain(metric_sums.iter().map(|(_, v)| v))
        .map(|v| v.double_value(&[]) / n)
        .collect();
    if let Some(g) = &group {
        g.average_gradients(opt.params())?;
        means = g.mean_of(&means)?;
    }
    if loss_scale != 1.0 {
        unscale_gradients(opt.params(), loss_scale);
    }
    // Clipped after unscaling, so the clip sees the true gradients.
    let grad_norm = clip_grad_norm(opt.params(), settings.max_grad_norm);
    Ok(Gradients {
        loss: means[0],
        grad_norm: grad_norm.double_value(&[]),
        metrics: metric_sums.iter().zip(&means[1..]).map(|((name, _), v)| (name.clone(), *v)).collect(),
        loss_scale,
    })
}

/// The optimizer's part: the loss scaler's verdict, AdamW at `lr` unless the step is skipped, zero_grad.
pub fn apply(grads: Gradients, opt: &mut AdamW, lr: f64, scaler: Option<&mut LossScaler>) -> StepResult {
    let Gradients { loss, grad_norm, metrics, loss_scale } = grads;
    // An f16 overflow at this scale is not a bad step: the next batch runs at half the scale.
    let overflow = match scaler {
        Some(s) if loss.is_finite() => !s.update(grad_norm.is_finite()),
        _ => false,
    };
    let outcome = if overflow {
        StepOutcome::Overflow
    } else if !loss.is_finite() || !grad_norm.is_finite() {
        StepOutcome::NonFinite
    } else {
        StepOutcome::Applied
    };
    if outcome == StepOutcome::Applied {
        opt.step(lr);
    }
    opt.zero_grad();
    StepResult { outcome, loss, grad_norm, metrics, loss_scale }
}

/// Divides every gradient by the f16 loss scale.
fn unscale_gradients(params: &[(String, Tensor)], scale: f64) {
    let _guard = tch::no_grad_guard();
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.g_mul_scalar_(1.0 / scale);
        }
    }
}
