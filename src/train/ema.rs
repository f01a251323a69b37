//! Exponential moving average of weights, used for sampling.
use tch::Tensor;

use crate::{Error, Result};

/// EMA shadow copies of a named parameter list: `s ← d·s + (1 − d)·p` after each update.
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts the average at the current parameter values.
    pub fn new(params: &[(String, Tensor)], decay: f64) -> Self {
        let _guard = tch::no_grad_guard();
        let shadow = params.iter().map(|(n, p)| (n.clone(), p.detach().copy())).collect();
        Self { decay, shadow }
    }

    /// Folds the current parameters (same order as at construction) into the average.
    pub fn update(&mut self, params: &[(String, Tensor)]) {
        let _guard = tch::no_grad_guard();
        for ((_, s), (_, p)) in self.shadow.iter_mut().zip(params) {
            let _ = s.g_mul_scalar_(self.decay).g_add_(&(p * (1.0 - self.decay)));
        }
    }

    /// The averaged weights, named as the parameters.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// Restores averaged weights saved from [`Ema::tensors`].
    pub fn load(&mut self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (name, s) in self.shadow.iter_mut() {
            let src = map.get(name).ok_or_else(|| Error::Config(format!("EMA weights lack '{name}'")))?;
            if src.size() != s.size() {
                return Err(Error::Config(format!("EMA weight '{name}' has shape {:?}, expected {:?}", src.size(), s.size())));
            }
            s.copy_(src);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_follows_the_closed_form() {
        let p = Tensor::from_slice(&[0.0f32]);
        let params = vec![("w".to_string(), p.shallow_clone())];
        let mut ema = Ema::new(&params, 0.9);
        let _ = tch::no_grad(|| p.shallow_clone().fill_(1.0));
        ema.update(&params);
        ema.update(&params);
        // s = 1 − 0.9² after two updates towards 1 from 0.
        let s = ema.tensors()[0].1.double_value(&[0]);
        assert!((s - 0.19).abs() < 1e-6, "{s}");
    }
}
