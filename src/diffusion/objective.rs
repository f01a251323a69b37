//! Training objectives: what the network sees (`x_t`, its timestep input) and what it must predict.
//!
//! | objective | `x_t` | target |
//! |---|---|---|
//! | ε-prediction | α_t·x0 + σ_t·ε | ε |
//! | v-prediction | α_t·x0 + σ_t·ε | α_t·ε − σ_t·x0 |
//! | flow matching (rectified flow) | (1−t)·x0 + t·ε | ε − x0 |
//!
//! with α_t = √ᾱ_t and σ_t = √(1−ᾱ_t). LISA's target is `target − main(x_t)`, so with this table it
//! is the same one line for every objective.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::schedule::{BetaSchedule, NoiseSchedule};
use crate::{Error, Result};

/// What a DDPM-style network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The added noise ε.
    #[default]
    Epsilon,
    /// The velocity v = α_t·ε − σ_t·x0 (Salimans & Ho 2022).
    VPrediction,
}

/// The objective section of a config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectiveConfig {
    /// `"ddpm"` (discrete noise schedule) or `"flow"` (rectified flow matching). Default `"ddpm"`.
    pub kind: ObjectiveKind,
    /// DDPM only: what the network predicts. Default `epsilon`.
    pub prediction: Prediction,
    /// DDPM only: β schedule. Default `linear`.
    pub beta_schedule: BetaSchedule,
    /// DDPM only: number of training timesteps. Default 1000.
    pub num_train_timesteps: usize,
    /// DDPM only: first β. Default 1e-4.
    pub beta_start: f64,
    /// DDPM only: last β. Default 0.02.
    pub beta_end: f64,
}

/// Which family of objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    /// Discrete-time DDPM with a noise schedule.
    #[default]
    Ddpm,
    /// Rectified flow matching with continuous t ∈ [0, 1].
    Flow,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            kind: ObjectiveKind::Ddpm,
            prediction: Prediction::Epsilon,
            beta_schedule: BetaSchedule::Linear,
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
}

/// The scale of the network's timestep input for flow matching: t ∈ [0, 1] is fed as 1000·t, so
/// the sinusoidal embedding sees the same range as for DDPM (as SD3 does).
pub const FLOW_TIME_SCALE: f64 = 1000.0;

/// A training objective, built from an [`ObjectiveConfig`].
#[derive(Debug, Clone)]
pub enum Objective {
    /// DDPM with ε- or v-prediction.
    Diffusion {
        /// The noise schedule.
        schedule: NoiseSchedule,
        /// What the network predicts.
        prediction: Prediction,
    },
    /// Rectified flow: `x_t = (1−t)·x0 + t·ε`, velocity target `ε − x0`.
    Flow,
}

/// One noised training batch.
#[derive(Debug)]
pub struct TrainingSample {
    /// The noisy input `x_t`.
    pub x_t: Tensor,
    /// The timestep as the network receives it (f32 [B]).
    pub model_t: Tensor,
    /// Time as a fraction in [0, 1): 0 = clean, →1 = pure noise (f32 [B]); used to bucket logs.
    pub unit_t: Tensor,
    /// The regression target.
    pub target: Tensor,
}

impl Objective {
    /// Builds the objective described by `cfg`.
    pub fn new(cfg: &ObjectiveConfig) -> Result<Self> {
        Ok(match cfg.kind {
            ObjectiveKind::Ddpm => Objective::Diffusion {
                schedule: NoiseSchedule::new(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)?,
                prediction: cfg.prediction,
            },
            ObjectiveKind::Flow => Objective::Flow,
        })
    }

    /// Draws per-sample times for a batch of `batch` examples (uses libtorch's global generator).
    /// DDPM: integer timesteps uniform in `{0, …, T−1}` (i64); flow: t uniform in [0, 1) (f32).
    pub fn sample_times(&self, batch: i64, device: Device) -> Tensor {
        match self {
            Objective::Diffusion { schedule, .. } => {
                Tensor::randint(schedule.len() as i64, [batch], (Kind::Int64, device))
            }
            Objective::Flow => Tensor::rand([batch], (Kind::Float, device)),
        }
    }

    /// The objective's raw times for unit times `u ∈ [0, 1)` (DDPM: `⌊u·T⌋` as i64, clamped to the
    /// schedule; flow: `u` as f32, the kind [`Objective::sample_times`] produces). Uniform `u` gives the
    /// objective's training distribution.
    pub fn times_from_unit(&self, unit: &[f64]) -> Tensor {
        match self {
            Objective::Diffusion { schedule, .. } => {
                let n = schedule.len() as i64;
                let idx: Vec<i64> = unit.iter().map(|u| ((u * n as f64).floor() as i64).clamp(0, n - 1)).collect();
                Tensor::from_slice(&idx)
            }
            Objective::Flow => {
                let t: Vec<f32> = unit.iter().map(|&u| u as f32).collect();
                Tensor::from_slice(&t)
            }
        }
    }

    /// `n` times evenly spread over the whole noise range, for evaluations that must see every noise
    /// level equally and identically each time: example `i` gets the unit time `(i + ½)/n`.
    pub fn stratified_times(&self, n: i64, device: Device) -> Tensor {
        let unit: Vec<f64> = (0..n).map(|i| (i as f64 + 0.5) / n as f64).collect();
        self.times_from_unit(&unit).to_device(device)
    }

    /// Forms `x_t`, the network's timestep input and the target for clean data `x0`, noise `noise`
    /// and times `t` from [`Objective::sample_times`].
    pub fn training_sample(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<TrainingSample> {
        let b = x0.size()[0];
        if t.size() != [b] || noise.size() != x0.size() {
            return Err(Error::Config(format!(
                "training_sample: x0 {:?}, noise {:?} and t {:?} disagree",
                x0.size(),
                noise.size(),
                t.size()
            )));
        }
        let bshape = [b, 1, 1, 1];
        match self {
            Objective::Diffusion { schedule, prediction } => {
                let (alpha, sigma) = self.alpha_sigma(t, Kind::Float)?;
                let (alpha, sigma) = (alpha.view(bshape), sigma.view(bshape));
                let x_t = &alpha * x0 + &sigma * noise;
                let target = match prediction {
                    Prediction::Epsilon => noise.shallow_clone(),
                    Prediction::VPrediction => &alpha * noise - &sigma * x0,
                };
                let model_t = t.to_kind(Kind::Float);
                let unit_t = &model_t / schedule.len() as f64;
                Ok(TrainingSample { x_t, model_t, unit_t, target })
            }
            Objective::Flow => {
                let t = t.to_kind(Kind::Float);
                let tb = t.view(bshape);
                let x_t = tb.neg().g_add_scalar(1.0) * x0 + &tb * noise;
                let target = noise - x0;
                Ok(TrainingSample { x_t, model_t: &t * FLOW_TIME_SCALE, unit_t: t, target })
            }
        }
    }

    /// The signal and noise scales `(α, σ)` with `x_t = α·x0 + σ·ε`, one per entry of the raw times `t` (as from
    /// [`Objective::sample_times`]), in `kind` on `t`'s device. DDPM: `α = √ᾱ_t`, `σ = √(1 − ᾱ_t)`, with ᾱ read from
    /// the schedule in f64 and rounded to `kind` before the square roots; flow: `α = 1 − t`, `σ = t`.
    pub fn alpha_sigma(&self, t: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        match self {
            Objective::Diffusion { schedule, .. } => {
                let abar = Tensor::from_slice(&schedule.alphas_cumprod).to_device(t.device());
                let abar_t = abar.f_index_select(0, &t.to_kind(Kind::Int64))?.to_kind(kind);
                Ok((abar_t.sqrt(), abar_t.neg().g_add_scalar(1.0).sqrt()))
            }
            Objective::Flow => {
                let t = t.to_kind(kind);
                Ok((t.neg().g_add_scalar(1.0), t))
            }
        }
    }

    /// Short name for logs and file names: `epsilon`, `v_prediction` or `flow`.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Diffusion { prediction: Prediction::Epsilon, .. } => "epsilon",
            Objective::Diffusion { prediction: Prediction::VPrediction, .. } => "v_prediction",
            Objective::Flow => "flow",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &[f32]) {
        let a: Vec<f32> = Vec::<f32>::try_from(a.flatten(0, -1)).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    fn ddpm(prediction: Prediction) -> Objective {
        Objective::new(&ObjectiveConfig { prediction, ..Default::default() }).unwrap()
    }

    #[test]
    fn epsilon_and_v_targets_match_hand_computed_values() {
        // Two examples of one pixel each, at t = 0 and t = 999 of the linear schedule.
        let x0 = Tensor::from_slice(&[0.5f32, -1.0]).view([2, 1, 1, 1]);
        let eps = Tensor::from_slice(&[0.3f32, 2.0]).view([2, 1, 1, 1]);
        let t = Tensor::from_slice(&[0i64, 999]);
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).unwrap();
        let (a0, s0) = (s.alphas_cumprod[0].sqrt() as f32, (1.0 - s.alphas_cumprod[0]).sqrt() as f32);
        let (a1, s1) = (s.alphas_cumprod[999].sqrt() as f32, (1.0 - s.alphas_cumprod[999]).sqrt() as f32);
        // ᾱ_0 = 1 − 1e-4 exactly.
        assert!((a0 - (1.0f32 - 1e-4).sqrt()).abs() < 1e-7);

        let e = ddpm(Prediction::Epsilon).training_sample(&x0, &eps, &t).unwrap();
        close(&e.x_t, &[a0 * 0.5 + s0 * 0.3, a1 * -1.0 + s1 * 2.0]);
        close(&e.target, &[0.3, 2.0]);
        close(&e.model_t, &[0.0, 999.0]);

        let v = ddpm(Prediction::VPrediction).training_sample(&x0, &eps, &t).unwrap();
        close(&v.x_t, &[a0 * 0.5 + s0 * 0.3, a1 * -1.0 + s1 * 2.0]);
        close(&v.target, &[a0 * 0.3 - s0 * 0.5, a1 * 2.0 - s1 * -1.0]);
    }

    #[test]
    fn flow_target_matches_hand_computed_values() {
        let x0 = Tensor::from_slice(&[0.5f32, -1.0]).view([2, 1, 1, 1]);
        let eps = Tensor::from_slice(&[0.3f32, 2.0]).view([2, 1, 1, 1]);
        let t = Tensor::from_slice(&[0.25f32, 0.9]);
        let f = Objective::Flow.training_sample(&x0, &eps, &t).unwrap();
        close(&f.x_t, &[0.75 * 0.5 + 0.25 * 0.3, 0.1 * -1.0 + 0.9 * 2.0]);
        close(&f.target, &[0.3 - 0.5, 2.0 + 1.0]);
        close(&f.model_t, &[250.0, 900.0]);
        close(&f.unit_t, &[0.25, 0.9]);
    }

    #[test]
    fn sampled_times_are_in_range() {
        tch::manual_seed(0);
        let t = ddpm(Prediction::Epsilon).sample_times(1000, Device::Cpu);
        assert!(t.min().int64_value(&[]) >= 0 && t.max().int64_value(&[]) <= 999);
        let f = Objective::Flow.sample_times(1000, Device::Cpu);
        assert!(f.min().double_value(&[]) >= 0.0 && f.max().double_value(&[]) < 1.0);
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let x0 = Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[0i64]);
        assert!(ddpm(Prediction::Epsilon).training_sample(&x0, &x0, &t).is_err());
    }
}
