//! Mixed precision: convolutions, matmuls and attention in bf16 or f16, everything else in f32.
//!
//! libtorch's autocast is reachable from tch only as an on/off switch for CUDA's f16 (the dtype
//! setter is not exported), so we cast where it matters ourselves: inside an [`autocast`] region
//! [`Conv2d`](super::blocks::Conv2d), [`Linear`](super::blocks::Linear) and [`attention`] cast
//! their f32 inputs and weights to the compute dtype, run the kernel there (tensor cores on a GPU)
//! and return f32. Norms, softmax outside attention, residual sums, the loss, the gradients of the
//! f32 master weights and the optimizer stay in f32. The casts are differentiable, so each
//! parameter's gradient arrives in f32 exactly as with autocast. The same code runs on the CPU
//! (slowly: these CPUs have no bf16 units), which is how the tests check it.
use std::cell::Cell;

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::{Error, Result};

/// The compute precision of the training forward and backward (accelerate's `--mixed_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// Convolutions, matmuls and attention in bfloat16 (f32's range: no loss scaling).
    Bf16,
    /// Convolutions, matmuls and attention in float16, with dynamic loss scaling in the trainer.
    Fp16,
}

impl MixedPrecision {
    /// The reduced dtype, or `None` for f32.
    pub fn kind(self) -> Option<Kind> {
        match self {
            MixedPrecision::No => None,
            MixedPrecision::Bf16 => Some(Kind::BFloat16),
            MixedPrecision::Fp16 => Some(Kind::Half),
        }
    }
}

impl std::fmt::Display for MixedPrecision {
    /// The config spelling: `no`, `bf16`, `fp16`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MixedPrecision::No => "no",
            MixedPrecision::Bf16 => "bf16",
            MixedPrecision::Fp16 => "fp16",
        })
    }
}

thread_local! {
    static COMPUTE_KIND: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// Runs `f` with convolutions, matmuls and attention in `precision` (restored afterwards, also when
/// `f` panics or returns an error). Regions nest; the innermost wins.
pub fn autocast<T>(precision: MixedPrecision, f: impl FnOnce() -> T) -> T {
    with_compute_kind(precision.kind(), f)
}

/// Runs `f` with the reduced dtype set to `kind` (as [`compute_kind`] returned it; `None` = full precision), so
/// that work recomputed later runs under the region it first ran in.
pub fn with_compute_kind<T>(kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Kind>);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPUTE_KIND.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(COMPUTE_KIND.with(|k| k.replace(kind)));
    f()
}

/// The reduced dtype of the current [`autocast`] region, if any.
pub fn compute_kind() -> Option<Kind> {
    COMPUTE_KIND.with(|k| k.get())
}

/// The dtype to run a kernel on f32 input `x` in: the region's reduced dtype, or `None` (run as is)
/// outside a region or for inputs that are not f32 (f64 tests, integer indices).
pub(crate) fn lowered(x: &Tensor) -> Option<Kind> {
    compute_kind().filter(|_| x.kind() == Kind::Float)
}

/// The dtype a network computes in beside weights of dtype `weight`: f32 for weights held in bf16 or f16
/// (a frozen network stored in half precision, diffusers' `weight_dtype`, still computes in f32 outside an
/// [`autocast`] region, so that nothing about a forward depends on how its weights are stored); f32 and f64
/// (gradient-check tests) as they are.
pub fn activation_kind(weight: Kind) -> Kind {
    match weight {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// `w` in the dtype of the activations `x` it is applied to: a no-op unless `w` is held in a reduced
/// dtype and `x` is not (then the widening cast is exact). A held weight's cast is not saved for backward
/// separately: frozen weights need no gradient, and the cast is what a kernel on mixed dtypes would do.
pub(crate) fn matching(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if w.kind() == x.kind() {
        Ok(w.shallow_clone())
    } else {
        cast(w, x.kind())
    }
}

/// Holds the floating-point variables of `vs` in `precision`'s reduced dtype (diffusers' `weight_dtype` for
/// the frozen networks): half the memory of f32, and no cast at all for the kernels of an [`autocast`]
/// region of the same precision. `MixedPrecision::No` leaves them as they are. Only frozen weights are held
/// this way (trainable ones stay f32 master weights, the optimizer's precision): a variable that requires a
/// gradient is an error and nothing is cast.
pub fn hold_in(vs: &mut nn::VarStore, precision: MixedPrecision) -> Result<()> {
    if let Some(name) = vs.variables().into_iter().find(|(_, v)| v.requires_grad()).map(|(k, _)| k) {
        return Err(Error::Config(format!(
            "only frozen networks are held in half precision, but `{name}` is trainable; freeze the network first"
        )));
    }
    match precision {
        MixedPrecision::No => {}
        MixedPrecision::Bf16 => vs.bfloat16(),
        MixedPrecision::Fp16 => vs.half(),
    }
    Ok(())
}

/// `t` in `kind` (a no-op cast when it already is).
pub(crate) fn cast(t: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(t.f_to_kind(kind)?)
}

/// Scaled dot-product attention of `q`, `k`, `v` [B, heads, N, dh] (causal or not), in the
/// region's reduced dtype when there is one (where fused flash kernels apply on a GPU); returns the
/// dtype of `q`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    match lowered(q) {
        Some(kind) => {
            let o = Tensor::f_scaled_dot_product_attention::<Tensor>(
                &cast(q, kind)?,
                &cast(k, kind)?,
                &cast(v, kind)?,
                None,
                0.0,
                causal,
                None,
                false,
            )?;
            Ok(o.f_to_kind(Kind::Float)?)
        }
        None => Ok(Tensor::f_scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, causal, None, false)?),
    }
}

#[cfg(test)]
mod tests {
    use tch::{nn, Device};

    use super::*;
    use crate::models::blocks::{Conv2d, Linear};

    #[test]
    fn autocast_runs_kernels_in_the_reduced_dtype_and_returns_f32_with_f32_gradients() {
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = Conv2d::new(vs.root() / "conv", 3, 4, 3, 1, 1).unwrap();
        let lin = Linear::new(vs.root() / "lin", 4, 5, true).unwrap();
        tch::manual_seed(0);
        let x = Tensor::randn([2, 3, 6, 6], (Kind::Float, Device::Cpu));
        let run = |p: MixedPrecision| {
            autocast(p, || {
                let h = conv.forward(&x).unwrap();
                assert_eq!(h.kind(), Kind::Float, "{p:?}: conv returns f32");
                let h = lin.forward(&h.permute([0, 2, 3, 1])).unwrap();
                assert_eq!(h.kind(), Kind::Float, "{p:?}: linear returns f32");
                let q = h.reshape([2, 1, 36, 5]);
                let o = attention(&q, &q, &q, false).unwrap();
                assert_eq!(o.kind(), Kind::Float, "{p:?}: attention returns f32");
                o
            })
        };
        let full = run(MixedPrecision::No);
        for (p, tol) in [(MixedPrecision::Bf16, 3e-2), (MixedPrecision::Fp16, 4e-3)] {
            let low = run(p);
            let rel = (&low - &full).abs().max().double_value(&[]) / full.abs().max().double_value(&[]);
            // The reduced dtype really was used: the result is close to f32's but not equal to it.
            assert!(rel < tol && rel > 0.0, "{p:?}: relative deviation {rel}");
            let g = Tensor::run_backward(&[low.square().sum(Kind::Float)], &[&conv.weight], false, false).remove(0);
            assert_eq!(g.kind(), Kind::Float, "{p:?}: master gradient in f32");
            assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
        assert_eq!(compute_kind(), None, "the region is left");
    }

    #[test]
    fn autocast_restores_the_outer_region_and_leaves_f64_alone() {
        autocast(MixedPrecision::Bf16, || {
            autocast(MixedPrecision::No, || assert_eq!(compute_kind(), None));
            assert_eq!(compute_kind(), Some(Kind::BFloat16));
            let x = Tensor::ones([2], (Kind::Double, Device::Cpu));
            assert_eq!(lowered(&x), None);
        });
        let r: std::result::Result<(), ()> = autocast(MixedPrecision::Fp16, || Err(()));
        assert!(r.is_err());
        assert_eq!(compute_kind(), None);
    }
}
