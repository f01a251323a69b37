//! Dynamic loss scaling for fp16 training (a training concern: the models only see autocast).
use serde::{Deserialize, Serialize};

/// Dynamic loss scaling for f16 (PyTorch's `GradScaler` rule): the loss is multiplied by `scale`
/// before backward so small gradients survive f16; the gradients are divided by it before
/// clipping. A step whose gradients overflow is skipped and halves the scale; `growth_interval`
/// good steps in a row double it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Good steps since the last change of scale.
    pub good_steps: u64,
}

impl LossScaler {
    /// PyTorch's initial scale, 2^16.
    pub const INITIAL_SCALE: f64 = 65536.0;
    /// Good steps before the scale doubles (PyTorch's default).
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// A scaler at the initial scale.
    pub fn new() -> Self {
        Self { scale: Self::INITIAL_SCALE, good_steps: 0 }
    }

    /// Records the outcome of a step: `finite` = its unscaled gradients were all finite. Returns
    /// whether the step may be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            // 2^-24 is the smallest f16 subnormal: below it no scale can help.
            self.scale = (self.scale * 0.5).max(f64::powi(2.0, -24));
            self.good_steps = 0;
        }
        finite
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scaler_halves_on_overflow_and_doubles_after_the_growth_interval() {
        let mut s = LossScaler::new();
        assert!(!s.update(false));
        assert_eq!(s.scale, LossScaler::INITIAL_SCALE / 2.0);
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, LossScaler::INITIAL_SCALE / 2.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (LossScaler::INITIAL_SCALE, 0));
        for _ in 0..100 {
            s.update(false);
        }
        assert_eq!(s.scale, f64::powi(2.0, -24), "the scale has a floor");
    }
}
