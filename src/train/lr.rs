//! The learning-rate schedule: linear warm-up, then constant or cosine decay.
use serde::{Deserialize, Serialize};

/// What follows the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Stay at the base rate.
    #[default]
    Constant,
    /// Half-cosine from the base rate down to `min_lr_ratio`·base at the last step.
    Cosine,
}

/// Learning rate at `step` (0-based) of `total` steps.
pub fn lr_at(step: u64, total: u64, base: f64, warmup: u64, schedule: LrSchedule, min_lr_ratio: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            let min = base * min_lr_ratio;
            min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_constant_or_cosine() {
        assert_eq!(lr_at(0, 100, 1.0, 4, LrSchedule::Constant, 0.0), 0.25);
        assert_eq!(lr_at(3, 100, 1.0, 4, LrSchedule::Constant, 0.0), 1.0);
        assert_eq!(lr_at(50, 100, 1.0, 4, LrSchedule::Constant, 0.0), 1.0);
        assert!((lr_at(4, 104, 1.0, 4, LrSchedule::Cosine, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(54, 104, 1.0, 4, LrSchedule::Cosine, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(104, 104, 2.0, 4, LrSchedule::Cosine, 0.1) - 0.2).abs() < 1e-12);
        assert_eq!(lr_at(0, 10, 1.0, 0, LrSchedule::Constant, 0.0), 1.0);
    }
}
