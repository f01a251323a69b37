//! How disentangled a side network's features are, measured by a two-way factorial design.
//!
//! The side network sees two things: the noisy input `x_t` (with its label and time), which the frozen
//! main network already sees, and the condition image, which only the side network sees. LISA trains the
//! hooked feature to carry `r = target − main(x_t)`, the part of the target the main network cannot
//! explain from `x_t` — the condition's contribution (the scaled likelihood score `∇ log p(c | x_t)`).
//! A side feature is *disentangled* in this sense when its variation is driven by the condition rather
//! than by a re-encoding of `x_t`. We measure exactly that, with no probe to fit: evaluate the feature on
//! every pair of `n_c` conditions × `n_x` noisy inputs (conditions and inputs drawn from different
//! images, so the two factors are independent by construction), and split its total variance, as in a
//! two-way ANOVA without replication, into the condition's main effect, the input's main effect, and the
//! interaction (what depends on both jointly — the likelihood score itself depends on both `c` and `x_t`).
//! The shares sum to one. A copy of the main encoder with a zero-initialised condition path has a
//! condition share of exactly 0, so the measurement can fail in both directions.
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Shares of a feature's total variance over a condition × input grid; they sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VarianceShares {
    /// Main effect of the condition: variance of the per-condition means (averaged over inputs).
    pub condition: f64,
    /// Main effect of the input `x_t`: variance of the per-input means (averaged over conditions).
    pub input: f64,
    /// What is left: the part that depends on condition and input jointly.
    pub interaction: f64,
    /// The total sum of squares around the grand mean (summed over feature dimensions).
    pub total_sum_of_squares: f64,
}

/// Splits the variance of `features` [n_c, n_x, D] — the feature of condition `i` with input `j` at
/// `[i, j]` — into condition, input and interaction shares (two-way ANOVA sums of squares, summed over
/// the D feature dimensions). Errors when the grid is smaller than 2 × 2 or the feature is constant.
pub fn factorial_shares(features: &Tensor) -> Result<VarianceShares> {
    let size = features.size();
    if size.len() != 3 || size[0] < 2 || size[1] < 2 {
        return Err(Error::Config(format!(
            "factorial_shares needs features [n_conditions ≥ 2, n_inputs ≥ 2, D], got {size:?}"
        )));
    }
    let (n_c, n_x) = (size[0] as f64, size[1] as f64);
    let f = features.to_kind(Kind::Double);
    let grand = f.mean_dim(&[0i64, 1][..], true, Kind::Double);
    let by_condition = f.mean_dim(&[1i64][..], true, Kind::Double);
    let by_input = f.mean_dim(&[0i64][..], true, Kind::Double);
    let sum_sq = |t: Tensor| t.square().sum(Kind::Double).double_value(&[]);
    let total = sum_sq(&f - &grand);
    let ss_condition = n_x * sum_sq(&by_condition - &grand);
    let ss_input = n_c * sum_sq(&by_input - &grand);
    let ss_interaction = sum_sq(&f - &by_condition - &by_input + &grand);
    if !(total > 0.0) || !total.is_finite() {
        return Err(Error::Training(format!(
            "the feature is constant (or not finite) over the grid (total sum of squares {total}); nothing to split"
        )));
    }
    Ok(VarianceShares {
        condition: ss_condition / total,
        input: ss_input / total,
        interaction: ss_interaction / total,
        total_sum_of_squares: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

    #[test]
    fn additive_features_split_exactly_by_their_variances() {
        // f[i, j] = a_i + b_j with centred a, b: the shares are Σa²·n_x : Σb²·n_c, no interaction.
        let a = Tensor::from_slice(&[1.0f32, -1.0, 2.0, -2.0]).view([4, 1, 1]);
        let b = Tensor::from_slice(&[3.0f32, -3.0]).view([1, 2, 1]);
        let f = (&a + &b).repeat([1, 1, 5]);
        let s = factorial_shares(&f).unwrap();
        let (ss_a, ss_b) = (2.0 * 10.0, 4.0 * 18.0);
        assert!((s.condition - ss_a / (ss_a + ss_b)).abs() < 1e-12, "{s:?}");
        assert!((s.input - ss_b / (ss_a + ss_b)).abs() < 1e-12, "{s:?}");
        assert!(s.interaction.abs() < 1e-12, "{s:?}");
        assert!((s.total_sum_of_squares - 5.0 * (ss_a + ss_b)).abs() < 1e-9);
    }

    #[test]
    fn a_feature_of_the_condition_alone_has_condition_share_one() {
        tch::manual_seed(0);
        let f = Tensor::randn([6, 1, 10], CPU).repeat([1, 7, 1]);
        let s = factorial_shares(&f).unwrap();
        assert!((s.condition - 1.0).abs() < 1e-9 && s.input.abs() < 1e-9 && s.interaction.abs() < 1e-9, "{s:?}");
        let s = factorial_shares(&f.transpose(0, 1)).unwrap();
        assert!((s.input - 1.0).abs() < 1e-9 && s.condition.abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn a_pure_product_is_all_interaction_and_the_shares_sum_to_one() {
        // f[i, j] = u_i · v_j with zero-mean u, v: both main effects vanish.
        let u = Tensor::from_slice(&[1.0f32, -1.0, 1.0, -1.0]).view([4, 1, 1]);
        let v = Tensor::from_slice(&[2.0f32, -2.0, 1.0, -1.0, 0.0]).view([1, 5, 1]);
        let s = factorial_shares(&(&u * &v)).unwrap();
        assert!((s.interaction - 1.0).abs() < 1e-12 && s.condition.abs() < 1e-12 && s.input.abs() < 1e-12, "{s:?}");
        tch::manual_seed(1);
        let s = factorial_shares(&Tensor::randn([5, 6, 8], CPU)).unwrap();
        assert!((s.condition + s.input + s.interaction - 1.0).abs() < 1e-9, "{s:?}");
        // Independent noise: each main effect has (levels − 1) of the (n_c·n_x − 1) degrees of freedom.
        let s = factorial_shares(&Tensor::randn([16, 16, 400], CPU)).unwrap();
        assert!((s.condition - 15.0 / 255.0).abs() < 0.01 && (s.input - 15.0 / 255.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn constant_features_and_tiny_grids_are_refused() {
        assert!(factorial_shares(&Tensor::ones([3, 3, 4], CPU)).is_err());
        assert!(factorial_shares(&Tensor::randn([1, 3, 4], CPU)).is_err());
        assert!(factorial_shares(&Tensor::randn([3, 3], CPU)).is_err());
    }
}
