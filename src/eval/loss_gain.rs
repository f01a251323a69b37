//! The held-out diffusion-loss gain of a side network: on a fixed held-out batch with fixed noise and
//! timesteps spread evenly over the noise range, `1 − L(controlled) / L(uncontrolled)`, overall and
//! per timestep bucket. It costs one forward pass (no sampling), so it can be measured every few
//! steps and resolve a convergence event that sampled fidelity, measured sparsely, would miss.
//!
//! 0 means the side network changes nothing (a freshly initialised one, whose zero convolutions
//! output exact zeros); 1 would mean it explains all of the frozen network's error; negative values
//! mean it makes the prediction worse.
use tch::{Kind, Tensor};

use crate::control::{SideNetwork, NUM_TIME_BUCKETS};
use crate::diffusion::Objective;
use crate::pipeline::{MainNetwork, SharedPass};
use crate::{Error, Result};

/// The fixed held-out batch and the frozen main network's loss on it.
pub struct HeldOutLoss {
    x_t: Tensor,
    model_t: Tensor,
    labels: Tensor,
    condition: Tensor,
    target: Tensor,
    /// The frozen main network's encoder pass on `x_t` (identical for every measurement).
    shared: SharedPass,
    /// One-hot timestep bucket of each example, [N, buckets].
    buckets: Tensor,
    /// Per-bucket sums of the uncontrolled per-example MSE, [buckets].
    uncontrolled: Tensor,
}

/// One measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct LossGain {
    /// `1 − ΣL(controlled) / ΣL(uncontrolled)` over the whole batch.
    pub overall: f64,
    /// The same per timestep bucket (`t/T` in tenths); NaN for an empty bucket.
    pub by_bucket: Vec<f64>,
}

impl LossGain {
    /// Columns for a log row: `loss_gain`, then `loss_gain_b0` … `loss_gain_b9`.
    pub fn columns(&self) -> Vec<(String, f64)> {
        let mut row = vec![("loss_gain".to_string(), self.overall)];
        row.extend(self.by_bucket.iter().enumerate().map(|(b, v)| (format!("loss_gain_b{b}"), *v)));
        row
    }

    /// The columns of a row in which the gain was not measured (NaN cells).
    pub fn missing_columns() -> Vec<(String, f64)> {
        LossGain { overall: f64::NAN, by_bucket: vec![f64::NAN; NUM_TIME_BUCKETS] }.columns()
    }
}

impl HeldOutLoss {
    /// Noises `images` [N, C, H, W] (in [-1, 1], with `labels` [N] and `conditions` [N, K, H, W]) once:
    /// timesteps spread evenly over the noise range (every bucket gets N/10 examples) and noise drawn
    /// from `seed`. The frozen main network's loss on the batch is computed here, once.
    pub fn new(
        main: &MainNetwork,
        objective: &Objective,
        images: &Tensor,
        labels: &Tensor,
        conditions: &Tensor,
        seed: u64,
    ) -> Result<Self> {
        let n = images.size()[0];
        if n < 1 || labels.size() != [n] || conditions.size()[0] != n {
            return Err(Error::Config(format!(
                "held-out loss: {n} images, labels {:?} and conditions {:?} disagree",
                labels.size(),
                conditions.size()
            )));
        }
        let device = main.vs.device();
        let x0 = images.to_device(device);
        // The host generator, reseeded here: the same noise on every device and in both arms. The
        // training loop reseeds before each step, so this draw does not disturb training.
        tch::manual_seed(seed as i64);
        let noise = crate::rng::randn_like_on_host(&x0)?;
        // Example i sits in the middle of its stratum: spread the batch so each bucket is filled.
        let t = objective.stratified_times(n, tch::Device::Cpu).to_device(device);
        let sample = objective.training_sample(&x0, &noise, &t)?;
        let labels = labels.to_device(device);
        let nb = NUM_TIME_BUCKETS as i64;
        let buckets = (sample.unit_t.to_kind(Kind::Float) * nb as f64)
            .floor()
            .clamp(0, nb - 1)
            .to_kind(Kind::Int64)
            .one_hot(nb)
            .to_kind(Kind::Double);
        let (shared, uncontrolled) = tch::no_grad(|| -> Result<_> {
            let encoder_hidden_states = main.label_encoder.forward(&labels)?;
            let shared = main.down_mid(&sample.x_t, &sample.model_t, &encoder_hidden_states)?;
            let pred = main.up(&shared, None)?;
            let per_example = per_example_mse(&pred, &sample.target)?;
            Ok((shared, per_example.unsqueeze(0).matmul(&buckets).squeeze_dim(0)))
        })?;
        Ok(Self {
            x_t: sample.x_t,
            model_t: sample.model_t,
            labels,
            condition: conditions.to_device(device),
            target: sample.target,
            shared,
            buckets,
            uncontrolled,
        })
    }

    /// Examples in the batch.
    pub fn len(&self) -> i64 {
        self.x_t.size()[0]
    }

    /// Whether the batch is empty (never: [`HeldOutLoss::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frozen main network's mean squared error on the batch (what the gain is relative to).
    pub fn uncontrolled_loss(&self) -> f64 {
        self.uncontrolled.sum(Kind::Double).double_value(&[]) / (self.len() as f64)
    }

    /// The gain of `side` (at conditioning scale 1) on the batch; forward only, no gradient.
    pub fn gain(&self, main: &MainNetwork, side: &SideNetwork) -> Result<LossGain> {
        tch::no_grad(|| {
            let encoder_hidden_states = main.label_encoder.forward(&self.labels)?;
            let (x_t, t, c) = (&self.x_t, &self.model_t, &self.condition);
            let out = side.residuals(x_t, t, &encoder_hidden_states, c, 1.0, None, Some(&self.shared))?;
            let pred = main.up(&self.shared, Some(&out.residuals))?;
            let controlled = per_example_mse(&pred, &self.target)?.unsqueeze(0).matmul(&self.buckets).squeeze_dim(0);
            let c: Vec<f64> = Vec::<f64>::try_from(&controlled)?;
            let u: Vec<f64> = Vec::<f64>::try_from(&self.uncontrolled)?;
            let gain = |c: f64, u: f64| if u > 0.0 { 1.0 - c / u } else { f64::NAN };
            Ok(LossGain {
                overall: gain(c.iter().sum(), u.iter().sum()),
                by_bucket: c.iter().zip(&u).map(|(c, u)| gain(*c, *u)).collect(),
            })
        })
    }
}

/// Mean squared error of each example, [N] f64.
fn per_example_mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok((pred.to_kind(Kind::Double) - target.to_kind(Kind::Double)).square().f_flatten(1, -1)?.f_mean_dim(
        1,
        false,
        Kind::Double,
    )?)
}
