//! Samplers: DDIM (η configurable) and DDPM ancestral for DDPM objectives, Euler for flow matching.
//!
//! A sampler only needs the network as a closure `(x_t, model_t) → prediction`, so the same code
//! samples the main network alone, with a side network, or with guidance.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::objective::{Objective, Prediction, FLOW_TIME_SCALE};
use crate::rng::derive_seed;
use crate::{Error, Result};

/// Which sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// DDIM (Song et al. 2021); `eta` = 0 is deterministic, 1 matches DDPM's posterior noise.
    #[default]
    Ddim,
    /// DDPM ancestral sampling with the posterior variance β̃ (Ho et al. 2020).
    Ddpm,
    /// Euler integration of the flow-matching ODE from t = 1 (noise) to t = 0 (data).
    Euler,
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddim" => Ok(Self::Ddim),
            "ddpm" => Ok(Self::Ddpm),
            "euler" => Ok(Self::Euler),
            _ => Err(Error::Config(format!("unknown sampler '{s}': use ddim, ddpm or euler"))),
        }
    }
}

/// Sampler settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// `ddim`, `ddpm` or `euler`. Default `ddim` (use `euler` for flow objectives).
    pub kind: SamplerKind,
    /// Number of network evaluations. Default 50.
    pub steps: usize,
    /// DDIM's η: 0 deterministic, 1 DDPM-like noise. Default 0.
    pub eta: f64,
    /// Clamp the predicted clean sample to [-1, 1] at each DDPM/DDIM step. Default true.
    pub clip_sample: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { kind: SamplerKind::Ddim, steps: 50, eta: 0.0, clip_sample: true }
    }
}

/// A configured sampler for one objective.
pub struct Sampler<'a> {
    objective: &'a Objective,
    cfg: SamplerConfig,
}

impl<'a> Sampler<'a> {
    /// Checks that `cfg.kind` suits `objective` (Euler for flow, DDIM/DDPM for DDPM objectives).
    pub fn new(objective: &'a Objective, cfg: SamplerConfig) -> Result<Self> {
        let ok = matches!(
            (objective, cfg.kind),
            (Objective::Flow, SamplerKind::Euler)
                | (Objective::Diffusion { .. }, SamplerKind::Ddim | SamplerKind::Ddpm)
        );
        if !ok {
            return Err(Error::Config(format!(
                "sampler {:?} does not apply to the {} objective (use euler for flow, ddim or ddpm otherwise)",
                cfg.kind,
                objective.name()
            )));
        }
        if cfg.steps == 0 {
            return Err(Error::Config("sampler steps must be ≥ 1".into()));
        }
        if let Objective::Diffusion { schedule, .. } = objective {
            if cfg.steps > schedule.len() {
                return Err(Error::Config(format!(
                    "sampler steps {} exceed the {} training timesteps",
                    cfg.steps,
                    schedule.len()
                )));
            }
        }
        Ok(Self { objective, cfg })
    }

    /// The DDPM timesteps visited, descending ("trailing" spacing: starts at T−1).
    pub fn timesteps(&self) -> Vec<i64> {
        match self.objective {
            Objective::Diffusion { schedule, .. } => {
                let (t, n) = (schedule.len() as f64, self.cfg.steps as f64);
                (0..self.cfg.steps).map(|i| (t - i as f64 * t / n).round() as i64 - 1).collect()
            }
            Objective::Flow => vec![],
        }
    }

    /// Denoises `x_t` (pure noise, e.g. from a fixed seed) into samples. `model(x, model_t)` returns the
    /// network's prediction; `seed` drives the fresh noise of stochastic steps (DDPM, DDIM with η > 0).
    pub fn sample(
        &self,
        mut x: Tensor,
        seed: u64,
        mut model: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let b = x.size()[0];
        let dev = x.device();
        match self.objective {
            Objective::Flow => {
                let n = self.cfg.steps;
                for i in 0..n {
                    let (t, t_next) = (1.0 - i as f64 / n as f64, 1.0 - (i + 1) as f64 / n as f64);
                    let model_t = Tensor::full([b], t * FLOW_TIME_SCALE, (Kind::Float, dev));
                    let v = model(&x, &model_t)?;
                    x = x + v * (t_next - t);
                }
                Ok(x)
            }
            Objective::Diffusion { schedule, prediction } => {
                let ts = self.timesteps();
                for (i, &t) in ts.iter().enumerate() {
                    let t_prev = ts.get(i + 1).copied().unwrap_or(-1);
                    let (abar, abar_prev) = (schedule.alpha_bar(t), schedule.alpha_bar(t_prev));
                    let model_t = Tensor::full([b], t as f64, (Kind::Float, dev));
                    let out = model(&x, &model_t)?;
                    let (a, s) = (abar.sqrt(), (1.0 - abar).sqrt());
                    let (mut x0, eps) = match prediction {
                        Prediction::Epsilon => ((&x - &out * s) / a, out),
                        Prediction::VPrediction => (&x * a - &out * s, &x * s + &out * a),
                    };
                    if self.cfg.clip_sample {
                        x0 = x0.clamp(-1.0, 1.0);
                    }
                    let last = t_prev < 0;
                    x = match self.cfg.kind {
                        SamplerKind::Ddim => {
                            let var =
                                self.cfg.eta.powi(2) * (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev);
                            let dir = (1.0 - abar_prev - var).max(0.0).sqrt();
                            let mean = &x0 * abar_prev.sqrt() + eps * dir;
                            if var > 0.0 && !last {
                                mean + noise_like(&x, seed, i)? * var.sqrt()
                            } else {
                                mean
                            }
                        }
                        SamplerKind::Ddpm => {
                            let alpha = abar / abar_prev;
                            let beta = 1.0 - alpha;
                            let mean = &x0 * (abar_prev.sqrt() * beta / (1.0 - abar))
                                + &x * (alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar));
                            if last {
                                mean
                            } else {
                                let var = (1.0 - abar_prev) / (1.0 - abar) * beta;
                                mean + noise_like(&x, seed, i)? * var.max(1e-20).sqrt()
                            }
                        }
                        SamplerKind::Euler => unreachable!("rejected in Sampler::new"),
                    };
                }
                Ok(x)
            }
        }
    }
}

/// Fresh Gaussian noise for step `i`, reproducible from `(seed, i)` on any device.
fn noise_like(x: &Tensor, seed: u64, i: usize) -> Result<Tensor> {
    tch::manual_seed(derive_seed(seed, i as u64) as i64);
    crate::rng::randn_like_on_host(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::{ObjectiveConfig, SamplerKind};
    use tch::Device;

    /// For data that is a single point x*, the exact ε-predictor is ε̂(x_t) = (x_t − α x*)/σ, and every
    /// sampler must land on x*.
    #[test]
    fn samplers_recover_a_point_mass_with_the_exact_predictor() {
        let target = 0.37f64;
        for (prediction, kind, eta) in [
            (Prediction::Epsilon, SamplerKind::Ddim, 0.0),
            (Prediction::Epsilon, SamplerKind::Ddim, 1.0),
            (Prediction::Epsilon, SamplerKind::Ddpm, 0.0),
            (Prediction::VPrediction, SamplerKind::Ddim, 0.0),
        ] {
            let obj = Objective::new(&ObjectiveConfig { prediction, ..Default::default() }).unwrap();
            let Objective::Diffusion { schedule, .. } = &obj else { unreachable!() };
            let abar = Tensor::from_slice(&schedule.alphas_cumprod);
            let sampler = Sampler::new(&obj, SamplerConfig { kind, steps: 20, eta, clip_sample: false }).unwrap();
            tch::manual_seed(3);
            let x = Tensor::randn([4, 1, 2, 2], (Kind::Double, Device::Cpu));
            let out = sampler
                .sample(x, 9, |x, t| {
                    let ab = abar.index_select(0, &t.to_kind(Kind::Int64)).view([-1, 1, 1, 1]);
                    let (a, s) = (ab.sqrt(), ab.neg().g_add_scalar(1.0).sqrt());
                    let eps = (x - &a * target) / &s;
                    Ok(match prediction {
                        Prediction::Epsilon => eps,
                        Prediction::VPrediction => &a * eps - &s * target,
                    })
                })
                .unwrap();
            let err = (out - target).abs().max().double_value(&[]);
            assert!(err < 1e-6, "{prediction:?} {kind:?} η={eta}: max error {err}");
        }
    }

    #[test]
    fn euler_follows_the_exact_flow_to_a_point_mass() {
        // For data x*, the exact velocity at (x_t, t) is (x_t − x*)/t; Euler on this linear ODE is exact.
        let target = -0.6f64;
        let sampler =
            Sampler::new(&Objective::Flow, SamplerConfig { kind: SamplerKind::Euler, steps: 10, ..Default::default() })
                .unwrap();
        let x = Tensor::randn([3, 1, 2, 2], (Kind::Double, Device::Cpu));
        let out = sampler.sample(x, 0, |x, t| Ok((x - target) / (t.view([-1, 1, 1, 1]) / FLOW_TIME_SCALE))).unwrap();
        // Exact up to the f32 rounding of the timestep input.
        assert!((out - target).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn trailing_timesteps_and_kind_checks() {
        let obj = Objective::new(&ObjectiveConfig::default()).unwrap();
        let s = Sampler::new(&obj, SamplerConfig { steps: 4, ..Default::default() }).unwrap();
        assert_eq!(s.timesteps(), vec![999, 749, 499, 249]);
        assert!(Sampler::new(&obj, SamplerConfig { kind: SamplerKind::Euler, ..Default::default() }).is_err());
        assert!(Sampler::new(&Objective::Flow, SamplerConfig::default()).is_err());
    }
}
