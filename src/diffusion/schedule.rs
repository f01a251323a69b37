//! DDPM noise schedules: the β sequence and the derived cumulative products ᾱ_t.
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the β_t sequence of a DDPM schedule is laid out (names as in diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β linear from `beta_start` to `beta_end` (Ho et al. 2020).
    #[default]
    Linear,
    /// √β linear from √`beta_start` to √`beta_end` (Stable Diffusion's schedule).
    ScaledLinear,
    /// ᾱ_t = cos²(((t/T) + 0.008) / 1.008 · π/2), β clipped at 0.999 (Nichol & Dhariwal 2021;
    /// diffusers' `squaredcos_cap_v2`). Ignores `beta_start`/`beta_end`.
    Cosine,
}

/// A discrete DDPM schedule over `T` training timesteps, `t ∈ {0, …, T−1}`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// β_t for each timestep.
    pub betas: Vec<f64>,
    /// ᾱ_t = Π_{s≤t} (1 − β_s) for each timestep.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds a schedule of `num_train_timesteps` steps.
    pub fn new(kind: BetaSchedule, num_train_timesteps: usize, beta_start: f64, beta_end: f64) -> Result<Self> {
        if num_train_timesteps < 2 {
            return Err(Error::Config(format!("num_train_timesteps must be ≥ 2, got {num_train_timesteps}")));
        }
        if !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0) {
            return Err(Error::Config(format!(
                "need 0 < beta_start ≤ beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
            )));
        }
        let n = num_train_timesteps;
        let lerp = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (n - 1) as f64;
        let betas: Vec<f64> = match kind {
            BetaSchedule::Linear => (0..n).map(|i| lerp(beta_start, beta_end, i)).collect(),
            BetaSchedule::ScaledLinear => (0..n).map(|i| lerp(beta_start.sqrt(), beta_end.sqrt(), i).powi(2)).collect(),
            BetaSchedule::Cosine => {
                let abar = |x: f64| ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - abar(t2) / abar(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        Ok(Self { betas, alphas_cumprod })
    }

    /// Number of training timesteps `T`.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Always false: a schedule has at least two steps.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// ᾱ at timestep `t`; `t = -1` stands for the clean data (ᾱ = 1), the target of the final step.
    pub fn alpha_bar(&self, t: i64) -> f64 {
        if t < 0 {
            1.0
        } else {
            self.alphas_cumprod[t as usize]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_closed_form() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).unwrap();
        assert!((s.betas[0] - 1e-4).abs() < 1e-15);
        assert!((s.betas[999] - 0.02).abs() < 1e-15);
        assert!((s.alphas_cumprod[1] - (1.0 - 1e-4) * (1.0 - s.betas[1])).abs() < 1e-15);
        // ᾱ decreases monotonically towards ~4e-5 for this classic schedule.
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
        assert!(s.alphas_cumprod[999] < 1e-4);
    }

    #[test]
    fn scaled_linear_and_cosine_are_valid() {
        let s = NoiseSchedule::new(BetaSchedule::ScaledLinear, 1000, 0.00085, 0.012).unwrap();
        assert!((s.betas[0] - 0.00085).abs() < 1e-12 && (s.betas[999] - 0.012).abs() < 1e-12);
        let c = NoiseSchedule::new(BetaSchedule::Cosine, 1000, 1e-4, 0.02).unwrap();
        assert!(c.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
        // ᾱ_0 of the cosine schedule is close to 1, and the schedule ends near 0.
        assert!(c.alphas_cumprod[0] > 0.9999 && c.alphas_cumprod[999] < 1e-6);
    }

    #[test]
    fn invalid_schedules_are_rejected() {
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 1, 1e-4, 0.02).is_err());
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 10, 0.5, 0.1).is_err());
    }
}
