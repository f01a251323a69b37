//! AdamW with state that checkpoints can save and restore exactly, and gradient-norm clipping.
//!
//! Written out (rather than tch's `nn::Optimizer`) because resuming a run exactly needs the moment
//! estimates and the step count, which libtorch's optimizer wrapper does not expose.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// First-moment decay β1. Default 0.9.
    pub beta1: f64,
    /// Second-moment decay β2. Default 0.999.
    pub beta2: f64,
    /// Denominator ε. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay. Default 1e-2.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// AdamW over a fixed, named list of parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: i64,
}

impl AdamW {
    /// An optimizer for `params` (name, tensor); the names key the saved state.
    pub fn new(mut params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let exp_avg = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self { cfg, params, exp_avg, exp_avg_sq, step: 0 }
    }

    /// The optimised parameters, sorted by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Number of updates applied so far (drives the bias correction).
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// Applies one update with learning rate `lr` using the parameters' current gradients.
    /// Parameters without a gradient are left untouched (their moments do not decay either).
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let (mut p, m, v) = (p.shallow_clone(), &mut self.exp_avg[i], &mut self.exp_avg_sq[i]);
            if c.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
            let _ = v.g_mul_scalar_(c.beta2).g_add_(&(&g * &g * (1.0 - c.beta2)));
            let denom = (v.sqrt() / bc2.sqrt()).g_add_scalar(c.eps);
            let _ = p.g_sub_(&(m.as_ref() / denom * (lr / bc1)));
        }
    }

    /// Clears all gradients.
    pub fn zero_grad(&mut self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// The optimizer state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.exp_avg[i].shallow_clone()));
            out.push((format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].shallow_clone()));
        }
        out
    }

    /// Restores state saved by [`AdamW::state_tensors`] and the step count. Every parameter's two
    /// moments must be present with the right shape.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, step: i64) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, dst) in [("exp_avg", &mut self.exp_avg[i]), ("exp_avg_sq", &mut self.exp_avg_sq[i])] {
                let key = format!("{name}.{suffix}");
                let src = map.get(&key).ok_or_else(|| Error::Config(format!("optimizer state lacks '{key}'")))?;
                if src.size() != p.size() {
                    return Err(Error::Config(format!("optimizer state '{key}' has shape {:?}, parameter has {:?}", src.size(), p.size())));
                }
                dst.copy_(&src.to_kind(p.kind()).to_device(p.device()));
            }
        }
        if map.len() != 2 * self.params.len() {
            return Err(Error::Config(format!(
                "optimizer state has {} tensors but {} parameters are optimised",
                map.len(),
                self.params.len()
            )));
        }
        self.step = step;
        Ok(())
    }
}

/// Scales all gradients so that their joint L2 norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`). Returns the norm before clipping as a 0-d tensor; no host synchronisation.
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    }
    let sq: Vec<Tensor> = grads.iter().map(|g| g.square().sum(Kind::Float)).collect();
    let total = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coef);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).set_requires_grad(true)
    }

    #[test]
    fn one_adamw_step_matches_a_hand_computed_update() {
        let p = param(&[1.0, -2.0]);
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], AdamWConfig::default());
        // loss = 3·w0 + w1² → grad = (3, 2·w1) = (3, −4)
        let loss = (&p * Tensor::from_slice(&[3.0f32, 0.0])).sum(Kind::Float) + p.get(1).square();
        loss.backward();
        let lr = 0.1;
        opt.step(lr);
        // Step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g|+ε) after decay by (1 − lr·wd).
        let expect = |w: f64, g: f64| w * (1.0 - lr * 0.01) - lr * g / (g.abs() + 1e-8);
        let got = Vec::<f32>::try_from(&p).unwrap();
        assert!((got[0] as f64 - expect(1.0, 3.0)).abs() < 1e-6, "{got:?}");
        assert!((got[1] as f64 - expect(-2.0, -4.0)).abs() < 1e-6, "{got:?}");

        // Step 2 with a new gradient g2 = (1, 1): hand-computed moments.
        opt.zero_grad();
        p.sum(Kind::Float).backward();
        let w_before = Vec::<f32>::try_from(&p).unwrap();
        opt.step(lr);
        let got2 = Vec::<f32>::try_from(&p).unwrap();
        for (i, g1) in [3.0f64, -4.0].iter().enumerate() {
            let m = 0.9 * 0.1 * g1 + 0.1 * 1.0;
            let v = 0.999 * 0.001 * g1 * g1 + 0.001 * 1.0;
            let (mh, vh) = (m / (1.0 - 0.81), v / (1.0 - 0.999f64.powi(2)));
            let w = w_before[i] as f64 * (1.0 - lr * 0.01) - lr * mh / (vh.sqrt() + 1e-8);
            assert!((got2[i] as f64 - w).abs() < 1e-5, "{i}: {} vs {w}", got2[i]);
        }
    }

    #[test]
    fn state_round_trips_and_rejects_mismatches() {
        let p = param(&[1.0, 2.0]);
        let mut a = AdamW::new(vec![("w".into(), p.shallow_clone())], AdamWConfig::default());
        p.square().sum(Kind::Float).backward();
        a.step(0.01);
        let q = param(&[1.0, 2.0]);
        let mut b = AdamW::new(vec![("w".into(), q.shallow_clone())], AdamWConfig::default());
        b.load_state(a.state_tensors(), a.step_count()).unwrap();
        for ((_, x), (_, y)) in a.state_tensors().iter().zip(b.state_tensors().iter()) {
            assert!(x.equal(y));
        }
        assert_eq!(b.step_count(), 1);
        let r = param(&[1.0, 2.0, 3.0]);
        let mut c = AdamW::new(vec![("w".into(), r)], AdamWConfig::default());
        assert!(c.load_state(a.state_tensors(), 1).is_err());
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_original() {
        let p = param(&[0.0, 0.0]);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let params = vec![("w".to_string(), p.shallow_clone())];
        let n = clip_grad_norm(&params, 1.0);
        assert!((n.double_value(&[]) - 5.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
        // Below the threshold nothing changes.
        let n2 = clip_grad_norm(&params, 10.0);
        assert!((n2.double_value(&[]) - 1.0).abs() < 1e-5);
        let _ = Device::Cpu;
    }
}
