//! The toy's data: an isotropic Gaussian mixture in `R^d` with a noisy visual condition, and every
//! quantity of its noised marginals in closed form.
//!
//! `x0 | k ~ N(μ_k, s_k² I)` with `k ~ π`; the condition `c` equals `k` with probability `1 − ρ`, and is
//! otherwise uniform over the other `K − 1` components. Noised as `x_t = α·x0 + σ·ε`:
//!
//! - `x_t | k ~ N(α μ_k, v_k I)` with `v_k = α² s_k² + σ²`, so `p(x_t)` and `p(x_t | c)` are mixtures with
//!   weights `π_k` and `p(k | c) ∝ π_k p(c | k)`;
//! - `x0 | x_t, k ~ N(m_k, τ_k² I)` with `m_k = μ_k + (α s_k² / v_k)(x_t − α μ_k)` and `τ_k² = s_k² σ² / v_k`;
//! - the posterior over components `p(k | x_t[, c]) ∝ π_k [p(c | k)] N(x_t; α μ_k, v_k I)`.
//!
//! The likelihood score `∇ log p(c | x_t)` is computed by libtorch's autograd of the log-density
//! `log p(c | x_t) = log Σ_k π_k p(c|k) N_k(x_t) − log Σ_k π_k N_k(x_t)` — a path that shares nothing with the
//! posterior means above, so that comparing the two is a real check of the LISA identity.
//! All tensors here are `f64`; `x_t` is `[N, d]`, conditions are `i64 [N]`.
use tch::{Device, Kind, Tensor};

use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Signal and noise scales of `x_t = α·x0 + σ·ε`, one per example (`f64 [N]`).
#[derive(Debug)]
pub struct NoiseLevel {
    /// α per example.
    pub alpha: Tensor,
    /// σ per example (> 0).
    pub sigma: Tensor,
}

impl NoiseLevel {
    /// The same `(α, σ)` for `n` examples.
    pub fn constant(alpha: f64, sigma: f64, n: i64) -> Self {
        let opts = (Kind::Double, Device::Cpu);
        Self { alpha: Tensor::full([n], alpha, opts), sigma: Tensor::full([n], sigma, opts) }
    }
}

/// Joint draws `(x0, k, c)` from the data distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct MixtureSample {
    /// Clean points, row-major `n × d`.
    pub x0: Vec<f64>,
    /// The mixture component of each point.
    pub component: Vec<usize>,
    /// The visual condition of each point (a noisy copy of the component).
    pub condition: Vec<usize>,
}

/// A `K`-component isotropic Gaussian mixture with a noisy condition `c` (see the module docs).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mixture {
    weights: Vec<f64>,
    means: Vec<Vec<f64>>,
    stds: Vec<f64>,
    flip: f64,
}

/// A standard normal draw (Box–Muller on the host generator, so results do not depend on libtorch's
/// global generator, which tests running in parallel would share).
pub fn standard_normal(rng: &mut SplitMix64) -> f64 {
    // 53 random bits in (0, 1]: never 0, so the logarithm is finite.
    let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A uniform draw in `[0, 1)` from the host generator.
pub fn uniform(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Index drawn from the (unnormalised, non-negative) weights `w`.
fn categorical(w: &[f64], rng: &mut SplitMix64) -> usize {
    let total: f64 = w.iter().sum();
    let mut u = uniform(rng) * total;
    for (i, &wi) in w.iter().enumerate() {
        if u < wi {
            return i;
        }
        u -= wi;
    }
    // Rounding can leave u a hair above the last weight; fall back to the last non-zero one.
    w.iter().rposition(|&x| x > 0.0).unwrap_or(0)
}

impl Mixture {
    /// A mixture with component weights `weights` (normalised here), means `means` (all of one
    /// dimension `d ≥ 1`), standard deviations `stds` (> 0) and condition flip probability `flip`
    /// (ρ ∈ [0, 1)). Needs `K ≥ 2` components.
    pub fn new(weights: Vec<f64>, means: Vec<Vec<f64>>, stds: Vec<f64>, flip: f64) -> Result<Self> {
        let k = weights.len();
        if k < 2 || means.len() != k || stds.len() != k {
            return Err(Error::Config(format!(
                "toy mixture: need K ≥ 2 and as many means and stds as weights, got {k} weights, {} means, {} stds",
                means.len(),
                stds.len()
            )));
        }
        let d = means[0].len();
        if d == 0 || means.iter().any(|m| m.len() != d || m.iter().any(|x| !x.is_finite())) {
            return Err(Error::Config("toy mixture: means must be finite and all of one dimension ≥ 1".into()));
        }
        if weights.iter().any(|&w| !(w > 0.0 && w.is_finite())) || stds.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err(Error::Config("toy mixture: weights and stds must be finite and > 0".into()));
        }
        if !(0.0..1.0).contains(&flip) {
            return Err(Error::Config(format!("toy mixture: flip probability ρ must be in [0, 1), got {flip}")));
        }
        let total: f64 = weights.iter().sum();
        Ok(Self { weights: weights.iter().map(|w| w / total).collect(), means, stds, flip })
    }

    /// The toy's standard 2-D mixture: four components on a circle of radius 2 with unequal weights
    /// and widths (so nothing cancels by symmetry), and flip probability `flip`.
    pub fn standard(flip: f64) -> Result<Self> {
        let means = (0..4)
            .map(|i| {
                let a = std::f64::consts::FRAC_PI_2 * i as f64 + 0.3;
                vec![2.0 * a.cos(), 2.0 * a.sin()]
            })
            .collect();
        Self::new(vec![0.4, 0.3, 0.2, 0.1], means, vec![0.3, 0.45, 0.35, 0.5], flip)
    }

    /// Number of components `K` (also the number of condition values).
    pub fn num_components(&self) -> usize {
        self.weights.len()
    }

    /// Dimension `d` of the data.
    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    /// The normalised component weights π.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The component means μ.
    pub fn means(&self) -> &[Vec<f64>] {
        &self.means
    }

    /// The component standard deviations s.
    pub fn stds(&self) -> &[f64] {
        &self.stds
    }

    /// The flip probability ρ of the condition.
    pub fn flip(&self) -> f64 {
        self.flip
    }

    /// `p(c | k)`: `1 − ρ` when `c = k`, else `ρ / (K − 1)`.
    pub fn condition_prob(&self, c: usize, k: usize) -> f64 {
        if c == k {
            1.0 - self.flip
        } else {
            self.flip / (self.num_components() - 1) as f64
        }
    }

    /// `n` joint draws `(x0, k, c)` from the data distribution.
    pub fn sample(&self, n: usize, rng: &mut SplitMix64) -> MixtureSample {
        let (d, kk) = (self.dim(), self.num_components());
        let mut out = MixtureSample { x0: Vec::with_capacity(n * d), component: vec![], condition: vec![] };
        for _ in 0..n {
            let k = categorical(&self.weights, rng);
            for j in 0..d {
                out.x0.push(self.means[k][j] + self.stds[k] * standard_normal(rng));
            }
            let c = if uniform(rng) < self.flip {
                // Uniform over the other K − 1 values: draw from 0..K−1 and skip k.
                let o = rng.below(kk as u64 - 1) as usize;
                if o >= k {
                    o + 1
                } else {
                    o
                }
            } else {
                k
            };
            out.component.push(k);
            out.condition.push(c);
        }
        out
    }

    fn means_tensor(&self) -> Tensor {
        let flat: Vec<f64> = self.means.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([self.num_components() as i64, self.dim() as i64])
    }

    fn stds_sq(&self) -> Tensor {
        Tensor::from_slice(&self.stds).square()
    }

    /// `v_k = α² s_k² + σ²`, `[N, K]`.
    fn component_variances(&self, level: &NoiseLevel) -> Tensor {
        level.alpha.square().unsqueeze(1) * self.stds_sq().unsqueeze(0) + level.sigma.square().unsqueeze(1)
    }

    fn check(&self, x_t: &Tensor, c: Option<&Tensor>, level: &NoiseLevel) -> Result<i64> {
        let size = x_t.size();
        let n = *size.first().unwrap_or(&0);
        let ok = size.len() == 2
            && size[1] == self.dim() as i64
            && x_t.kind() == Kind::Double
            && level.alpha.size() == [n]
            && level.sigma.size() == [n]
            && c.is_none_or(|c| c.size() == [n]);
        if !ok {
            return Err(Error::Config(format!(
                "toy mixture: x_t must be f64 [N, {}] with α, σ (and conditions) of size [N]; got x_t {:?} {:?}, \
                 α {:?}, σ {:?}, c {:?}",
                self.dim(),
                size,
                x_t.kind(),
                level.alpha.size(),
                level.sigma.size(),
                c.map(|c| c.size())
            )));
        }
        Ok(n)
    }

    /// `log N(x_t; α μ_k, v_k I)` for every example and component, `[N, K]`.
    fn component_log_densities(&self, x_t: &Tensor, level: &NoiseLevel) -> Tensor {
        let centres = level.alpha.view([-1, 1, 1]) * self.means_tensor().unsqueeze(0);
        let sq = (x_t.unsqueeze(1) - centres).square().sum_dim_intlist(-1, false, Kind::Double);
        let v = self.component_variances(level);
        let d = self.dim() as f64;
        (&v * std::f64::consts::TAU).log() * (-0.5 * d) - sq / (v * 2.0)
    }

    /// `log p(c | k)` for the given conditions and every component, `[N, K]`.
    fn log_condition_given_component(&self, c: &Tensor) -> Result<Tensor> {
        let kk = self.num_components();
        let table: Vec<f64> = (0..kk)
            .flat_map(|ci| (0..kk).map(move |k| (ci, k)))
            .map(|(ci, k)| self.condition_prob(ci, k).ln())
            .collect();
        let table = Tensor::from_slice(&table).view([kk as i64, kk as i64]);
        Ok(table.f_index_select(0, &c.to_kind(Kind::Int64))?)
    }

    /// Unnormalised log posterior `log π_k [+ log p(c | k)] + log N_k(x_t)`, `[N, K]`.
    fn joint_logits(&self, x_t: &Tensor, c: Option<&Tensor>, level: &NoiseLevel) -> Result<Tensor> {
        self.check(x_t, c, level)?;
        let mut logits =
            self.component_log_densities(x_t, level) + Tensor::from_slice(&self.weights).log().unsqueeze(0);
        if let Some(c) = c {
            logits += self.log_condition_given_component(c)?;
        }
        Ok(logits)
    }

    /// `log p(x_t)` of the noised marginal, `[N]`.
    pub fn log_marginal(&self, x_t: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        Ok(self.joint_logits(x_t, None, level)?.logsumexp([1], false))
    }

    /// `log p(c | x_t)`, `[N]`: `log Σ_k π_k p(c|k) N_k(x_t) − log Σ_k π_k N_k(x_t)`.
    pub fn log_likelihood(&self, x_t: &Tensor, c: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        let joint = self.joint_logits(x_t, Some(c), level)?.logsumexp([1], false);
        Ok(joint - self.log_marginal(x_t, level)?)
    }

    /// `log p(x_t | c)`, `[N]`.
    pub fn log_conditional(&self, x_t: &Tensor, c: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        // p(x_t | c) = p(c | x_t) p(x_t) / p(c), with p(c) = Σ_k π_k p(c | k).
        let kk = self.num_components();
        let pc: Vec<f64> =
            (0..kk).map(|ci| (0..kk).map(|k| self.weights[k] * self.condition_prob(ci, k)).sum::<f64>().ln()).collect();
        let log_pc = Tensor::from_slice(&pc).f_index_select(0, &c.to_kind(Kind::Int64))?;
        Ok(self.log_likelihood(x_t, c, level)? + self.log_marginal(x_t, level)? - log_pc)
    }

    /// The posterior over components `p(k | x_t)` (no condition) or `p(k | x_t, c)`, `[N, K]`.
    pub fn posterior(&self, x_t: &Tensor, c: Option<&Tensor>, level: &NoiseLevel) -> Result<Tensor> {
        Ok(self.joint_logits(x_t, c, level)?.softmax(1, Kind::Double))
    }

    /// `E[x0 | x_t, k] = μ_k + (α s_k² / v_k)(x_t − α μ_k)` for every component, `[N, K, d]`.
    pub fn component_posterior_means(&self, x_t: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        self.check(x_t, None, level)?;
        let mu = self.means_tensor().unsqueeze(0);
        let gain =
            (level.alpha.unsqueeze(1) * self.stds_sq().unsqueeze(0) / self.component_variances(level)).unsqueeze(2);
        Ok(&mu + gain * (x_t.unsqueeze(1) - level.alpha.view([-1, 1, 1]) * &mu))
    }

    /// `E[x0 | x_t]` (no condition) or `E[x0 | x_t, c]`, `[N, d]`: the posterior-weighted component means.
    pub fn posterior_mean_x0(&self, x_t: &Tensor, c: Option<&Tensor>, level: &NoiseLevel) -> Result<Tensor> {
        let w = self.posterior(x_t, c, level)?.unsqueeze(2);
        Ok((w * self.component_posterior_means(x_t, level)?).sum_dim_intlist(1, false, Kind::Double))
    }

    /// `E[ε | x_t[, c]] = (x_t − α E[x0 | x_t[, c]]) / σ`, `[N, d]`.
    pub fn posterior_mean_eps(&self, x_t: &Tensor, c: Option<&Tensor>, level: &NoiseLevel) -> Result<Tensor> {
        let x0 = self.posterior_mean_x0(x_t, c, level)?;
        Ok((x_t - level.alpha.unsqueeze(1) * x0) / level.sigma.unsqueeze(1))
    }

    /// The likelihood score `∇_{x_t} log p(c | x_t)`, `[N, d]`, by autograd of [`Mixture::log_likelihood`]
    /// (independent of the posterior means).
    pub fn likelihood_score(&self, x_t: &Tensor, c: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        // Each example's log-likelihood depends only on its own row, so the gradient of the sum is the
        // per-example gradient. Grad mode is forced on in case a caller runs under no_grad.
        let x = x_t.detach().set_requires_grad(true);
        let lp = tch::with_grad(|| self.log_likelihood(&x, c, level))?;
        let grads = Tensor::f_run_backward(&[lp.sum(Kind::Double)], &[&x], false, false)?;
        Ok(grads[0].detach())
    }

    /// `n` draws of `x0 ~ p(x0 | x_t[, c])` for ONE point `x_t` (`d` values) at noise level `(α, σ)`:
    /// a component from the posterior, then `x0 ~ N(m_k, τ_k² I)`. Row-major `n × d`.
    pub fn sample_posterior_x0(
        &self,
        x_t: &[f64],
        c: Option<usize>,
        alpha: f64,
        sigma: f64,
        n: usize,
        rng: &mut SplitMix64,
    ) -> Result<Vec<f64>> {
        let d = self.dim();
        if x_t.len() != d || c.is_some_and(|c| c >= self.num_components()) || !(sigma > 0.0) {
            return Err(Error::Config(format!(
                "toy posterior sampling: need x_t of {d} values, c < {} and σ > 0; got {} values, c {c:?}, σ {sigma}",
                self.num_components(),
                x_t.len()
            )));
        }
        let xt = Tensor::from_slice(x_t).view([1, d as i64]);
        let level = NoiseLevel::constant(alpha, sigma, 1);
        let ct = c.map(|c| Tensor::from_slice(&[c as i64]));
        let w = Vec::<f64>::try_from(self.posterior(&xt, ct.as_ref(), &level)?.view([-1]))?;
        let m = Vec::<f64>::try_from(self.component_posterior_means(&xt, &level)?.view([-1]))?;
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            let k = categorical(&w, rng);
            let v = alpha * alpha * self.stds[k].powi(2) + sigma * sigma;
            let tau = (self.stds[k].powi(2) * sigma * sigma / v).sqrt();
            for j in 0..d {
                out.push(m[k * d + j] + tau * standard_normal(rng));
            }
        }
        Ok(out)
    }
}
