//! The exact toy (spec §8): a Gaussian-mixture data distribution with a noisy visual condition, for
//! which the likelihood score `∇ log p(c | x_t)` and the exact prior denoiser are known in closed form,
//! so LISA's central claim becomes checkable.
//!
//! The claim: with the main network equal to the exact prior denoiser, the LISA residual
//! `r = target − main(x_t)` has conditional mean
//!
//! | objective | `E[r | x_t, c]` |
//! |---|---|
//! | ε-prediction | `−σ ∇ log p(c | x_t)` |
//! | v-prediction | `−(σ/α) ∇ log p(c | x_t)` |
//! | flow matching (`α = 1 − t`, `σ = t`) | `−(t/(1−t)) ∇ log p(c | x_t)` |
//!
//! Why: given `x_t`, `x0 = (x_t − σε)/α`, so v = `αε − σx0 = (ε − σ x_t)/α` (DDPM has `α² + σ² = 1`) and
//! flow's `ε − x0 = (ε − x_t)/(1 − t)`: their conditional differences are those of ε divided by α. And by
//! Tweedie, `E[ε | x_t, c] − E[ε | x_t] = −σ (∇ log p(x_t | c) − ∇ log p(x_t)) = −σ ∇ log p(c | x_t)`.
//! v and flow therefore share the scale `−σ/α`.
//!
//! [`mixture`] holds the data and its closed forms; this module joins them to our [`Objective`]s
//! (noise levels, targets, the exact prior prediction); [`experiment`] trains small MLP decoders and
//! priors on it and writes the figures of `lisa toy`.
pub mod experiment;
pub mod mixture;

pub use experiment::{run_toy, ConvergenceReport, DriftBucket, DriftReport, EvalSet, ToyConfig, ToyReport};
pub use mixture::{Mixture, MixtureSample, NoiseLevel};

use tch::{Kind, Tensor};

use crate::diffusion::{Objective, Prediction};
use crate::{Error, Result};

/// `(α, σ)` per example for the objective's raw times `t` (DDPM: i64 timestep indices, `α = √ᾱ_t`,
/// `σ = √(1 − ᾱ_t)` from our schedule; flow: f32 `t ∈ [0, 1)`, `α = 1 − t`, `σ = t`), in f64.
pub fn noise_level(objective: &Objective, t: &Tensor) -> Result<NoiseLevel> {
    let (alpha, sigma) = objective.alpha_sigma(t, Kind::Double)?;
    Ok(NoiseLevel { alpha, sigma })
}


/// Coefficients `(a, b)` with `target = a·ε + b·x0`, `f64 [N]` each: ε `(1, 0)`, v `(α, −σ)`, flow `(1, −1)`.
pub fn target_coefficients(objective: &Objective, level: &NoiseLevel) -> (Tensor, Tensor) {
    match objective {
        Objective::Diffusion { prediction: Prediction::Epsilon, .. } => {
            (level.alpha.ones_like(), level.alpha.zeros_like())
        }
        Objective::Diffusion { prediction: Prediction::VPrediction, .. } => {
            (level.alpha.shallow_clone(), -&level.sigma)
        }
        Objective::Flow => (level.alpha.ones_like(), -level.alpha.ones_like()),
    }
}

/// The factor `λ_t` with `E[r | x_t, c] = λ_t ∇ log p(c | x_t)` for the exact prior, `f64 [N]`:
/// `−σ` for ε-prediction, `−σ/α` for v-prediction and for flow (where it is `−t/(1 − t)`).
pub fn likelihood_scale(objective: &Objective, level: &NoiseLevel) -> Tensor {
    match objective {
        Objective::Diffusion { prediction: Prediction::Epsilon, .. } => -&level.sigma,
        _ => -(&level.sigma / &level.alpha),
    }
}

/// `E[target | x_t]` (no condition) or `E[target | x_t, c]`, `f64 [N, d]`, from the closed-form posterior
/// means of `ε` and `x0`. Without a condition this is the exact prior denoiser's prediction.
pub fn exact_target_mean(
    mixture: &Mixture,
    objective: &Objective,
    x_t: &Tensor,
    c: Option<&Tensor>,
    level: &NoiseLevel,
) -> Result<Tensor> {
    let x0 = mixture.posterior_mean_x0(x_t, c, level)?;
    let eps = (x_t - level.alpha.unsqueeze(1) * &x0) / level.sigma.unsqueeze(1);
    let (a, b) = target_coefficients(objective, level);
    Ok(a.unsqueeze(1) * eps + b.unsqueeze(1) * x0)
}

/// The exact prior denoiser's prediction `E[target | x_t]`, `f64 [N, d]` (for ε this is `−σ ∇ log p(x_t)`).
pub fn exact_prior_prediction(
    mixture: &Mixture,
    objective: &Objective,
    x_t: &Tensor,
    level: &NoiseLevel,
) -> Result<Tensor> {
    exact_target_mean(mixture, objective, x_t, None, level)
}

/// The claimed optimum of the LISA decoder, `λ_t ∇ log p(c | x_t)` ([`likelihood_scale`] times the
/// autograd likelihood score), `f64 [N, d]`.
pub fn scaled_likelihood_score(
    mixture: &Mixture,
    objective: &Objective,
    x_t: &Tensor,
    c: &Tensor,
    level: &NoiseLevel,
) -> Result<Tensor> {
    let score = mixture.likelihood_score(x_t, c, level)?;
    Ok(likelihood_scale(objective, level).unsqueeze(1) * score)
}

/// Forms `x_t`, the target and the unit time through [`Objective::training_sample`] for clean points
/// `x0` and noise `eps` (both `f64 [N, d]`) at raw times `t`; returns `(x_t [N, d], target [N, d], unit_t f32 [N])`
/// in f64 (the objective's own code builds them, so the toy exercises it).
pub fn noised(objective: &Objective, x0: &Tensor, eps: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let size = x0.size();
    if size.len() != 2 || eps.size() != size {
        return Err(Error::Config(format!("toy: x0 {:?} and ε {:?} must both be [N, d]", size, eps.size())));
    }
    // training_sample broadcasts per-example scales over [B, C, H, W]; a point is C = d, H = W = 1.
    let as4 = |x: &Tensor| x.to_kind(Kind::Double).view([size[0], size[1], 1, 1]);
    let s = objective.training_sample(&as4(x0), &as4(eps), t)?;
    Ok((
        s.x_t.to_kind(Kind::Double).view([size[0], size[1]]),
        s.target.to_kind(Kind::Double).view([size[0], size[1]]),
        s.unit_t,
    ))
}

#[cfg(test)]
mod tests;
