//! The Fréchet distance between Gaussian fits of two feature sets:
//! ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^{1/2}).
//!
//! With the features of [`Classifier::features`] this is the "Fréchet distance on the
//! Fashion-MNIST classifier's features". It is computed like FID but is not FID: the feature
//! network is our small classifier, so values are not comparable with published FID numbers.
//!
//! Everything is computed in f64. The matrix square root avoids the general (non-symmetric)
//! `sqrtm`: with S = Σa^{1/2} (symmetric, from an eigendecomposition), Σa Σb is similar to the
//! symmetric positive semi-definite S Σb S, so tr((Σa Σb)^{1/2}) = Σ sqrt(eig(S Σb S)), which only
//! needs symmetric eigendecompositions and is stable even for singular covariances.
use tch::{Device, Kind, Tensor};

use super::classifier::Classifier;
use crate::{Error, Result};

/// Mean and covariance of a set of feature vectors, the Gaussian fit the Fréchet distance uses.
#[derive(Debug)]
pub struct FeatureStats {
    /// Mean feature, `[D]` f64 on the CPU.
    pub mean: Tensor,
    /// Unbiased (divide by n − 1) covariance, `[D, D]` f64 on the CPU.
    pub cov: Tensor,
    /// Number of feature vectors the statistics were computed from.
    pub n: usize,
}

impl FeatureStats {
    /// Statistics of a `[N, D]` feature matrix (any float kind, any device); needs N ≥ 2 for the
    /// unbiased covariance.
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let (n, d) = features.size2().map_err(|_| {
            Error::Config(format!("feature statistics: expected a [N, D] matrix, got shape {:?}", features.size()))
        })?;
        if n < 2 || d < 1 {
            return Err(Error::Config(format!(
                "feature statistics: need at least 2 feature vectors of dimension ≥ 1, got {n} of dimension {d}"
            )));
        }
        tch::no_grad(|| {
            let f = features.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
            let mean = f.f_mean_dim(0, false, Kind::Double)?;
            let centred = f.f_sub(&mean)?;
            let cov = centred.f_tr()?.f_matmul(&centred)?.f_div_scalar((n - 1) as f64)?;
            Ok(Self { mean, cov, n: n as usize })
        })
    }

    /// The feature dimension D.
    pub fn dim(&self) -> i64 {
        self.mean.size()[0]
    }
}

/// The Fréchet distance ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^{1/2}) between two Gaussian fits.
///
/// Errors if the feature dimensions differ or a covariance is not a `[D, D]` matrix matching its
/// mean. Rounding can make a true value of 0 come out slightly negative; results are clamped at 0.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    let d = a.dim();
    for (s, name) in [(a, "first"), (b, "second")] {
        if s.mean.dim() != 1 || s.cov.size() != [s.dim(), s.dim()] {
            return Err(Error::Config(format!(
                "Fréchet distance: the {name} statistics have mean shape {:?} and covariance shape {:?}; expected [D] and [D, D]",
                s.mean.size(),
                s.cov.size()
            )));
        }
    }
    if b.dim() != d {
        return Err(Error::Config(format!(
            "Fréchet distance: feature dimensions differ ({d} vs {}); both sets must come from the same feature network",
            b.dim()
        )));
    }
    tch::no_grad(|| {
        let f64_cpu = |t: &Tensor| t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double);
        let (mu_a, mu_b) = (f64_cpu(&a.mean)?, f64_cpu(&b.mean)?);
        let (cov_a, cov_b) = (symmetrize(&f64_cpu(&a.cov)?)?, symmetrize(&f64_cpu(&b.cov)?)?);
        let diff = mu_a.f_sub(&mu_b)?;
        let mean_term = diff.f_dot(&diff)?.double_value(&[]);
        let s = psd_sqrt(&cov_a)?;
        let m = symmetrize(&s.f_matmul(&cov_b)?.f_matmul(&s)?)?;
        let (eig, _) = m.f_linalg_eigh("L")?;
        let tr_sqrt = eig.f_clamp_min(0.0)?.f_sqrt()?.f_sum(Kind::Double)?.double_value(&[]);
        let tr_a = cov_a.f_trace()?.double_value(&[]);
        let tr_b = cov_b.f_trace()?.double_value(&[]);
        let dist = mean_term + tr_a + tr_b - 2.0 * tr_sqrt;
        if !dist.is_finite() {
            return Err(Error::Config(format!(
                "Fréchet distance is not finite ({dist}); the feature statistics contain NaN or infinite values"
            )));
        }
        Ok(dist.max(0.0))
    })
}

/// The "Fréchet distance on the Fashion-MNIST classifier's features" between two image sets
/// (`[N, 1, 32, 32]` in [-1, 1], N ≥ 2 each), computing features `chunk` images at a time.
pub fn frechet_distance_of(
    classifier: &Classifier,
    images_a: &Tensor,
    images_b: &Tensor,
    chunk: i64,
) -> Result<f64> {
    let fa = FeatureStats::from_features(&classifier.features_batched(images_a, chunk)?)?;
    let fb = FeatureStats::from_features(&classifier.features_batched(images_b, chunk)?)?;
    frechet_distance(&fa, &fb)
}

/// (M + Mᵀ) / 2: removes the asymmetry rounding leaves, which `eigh` would silently ignore.
fn symmetrize(m: &Tensor) -> Result<Tensor> {
    Ok(m.f_add(&m.f_tr()?)?.f_mul_scalar(0.5)?)
}

/// The symmetric square root of a symmetric positive semi-definite matrix; eigenvalues that
/// rounding pushed slightly below 0 are treated as 0.
fn psd_sqrt(m: &Tensor) -> Result<Tensor> {
    let (eig, v) = m.f_linalg_eigh("L")?;
    let root = eig.f_clamp_min(0.0)?.f_sqrt()?;
    Ok(v.f_mul(&root.f_unsqueeze(0)?)?.f_matmul(&v.f_tr()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> (Kind, Device) {
        (Kind::Double, Device::Cpu)
    }

    fn stats(mean: &Tensor, cov: &Tensor) -> FeatureStats {
        FeatureStats { mean: mean.shallow_clone(), cov: cov.shallow_clone(), n: 100 }
    }

    /// A random orthogonal matrix (Q of a QR decomposition of a Gaussian matrix).
    fn random_rotation(d: i64) -> Tensor {
        let (q, _) = Tensor::linalg_qr(&Tensor::randn([d, d], opts()), "reduced");
        q
    }

    #[test]
    fn identical_statistics_give_zero() {
        tch::manual_seed(0);
        // A rank-deficient covariance (N < D) as well, which a naive sqrtm struggles with.
        for (n, d) in [(500, 16), (10, 32)] {
            let s = FeatureStats::from_features(&Tensor::randn([n, d], (Kind::Float, Device::Cpu))).unwrap();
            let dist = frechet_distance(&s, &s).unwrap();
            assert!(dist.abs() < 1e-6, "n = {n}, d = {d}: {dist}");
        }
    }

    #[test]
    fn diagonal_covariances_match_closed_form() {
        let (a, b) = ([1.0, 4.0, 0.25, 0.0], [9.0, 1.0, 0.25, 2.0]);
        let (ma, mb) = ([0.0, 1.0, 2.0, 3.0], [1.0, -1.0, 2.0, 3.5]);
        let want: f64 = a.iter().zip(&b).map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2)).sum::<f64>()
            + ma.iter().zip(&mb).map(|(x, y)| (x - y) * (x - y)).sum::<f64>();
        let sa = stats(&Tensor::from_slice(&ma), &Tensor::from_slice(&a).diag(0));
        let sb = stats(&Tensor::from_slice(&mb), &Tensor::from_slice(&b).diag(0));
        let got = frechet_distance(&sa, &sb).unwrap();
        assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
        // Symmetric in its arguments.
        assert!((frechet_distance(&sb, &sa).unwrap() - want).abs() < 1e-9);
    }

    #[test]
    fn commuting_full_covariances_match_closed_form() {
        tch::manual_seed(1);
        let d = 6;
        let q = random_rotation(d);
        let a = Tensor::from_slice(&[0.5, 1.0, 2.0, 3.0, 0.1, 7.0]);
        let b = Tensor::from_slice(&[2.0, 1.0, 0.3, 5.0, 0.1, 1.0]);
        let cov = |e: &Tensor| q.matmul(&e.diag(0)).matmul(&q.tr());
        let (mu_a, mu_b) = (Tensor::randn([d], opts()), Tensor::randn([d], opts()));
        let want = (a.sqrt() - b.sqrt()).square().sum(Kind::Double).double_value(&[])
            + (&mu_a - &mu_b).square().sum(Kind::Double).double_value(&[]);
        let got = frechet_distance(&stats(&mu_a, &cov(&a)), &stats(&mu_b, &cov(&b))).unwrap();
        assert!((got - want).abs() < 1e-8, "got {got}, want {want}");
    }

    #[test]
    fn invariant_under_a_common_rotation_and_shift() {
        tch::manual_seed(2);
        let (n, d) = (300, 8);
        let fa = Tensor::randn([n, d], opts());
        // A differently shaped second set, so that the covariances do not commute.
        let fb = Tensor::randn([n, d], opts()).matmul(&Tensor::randn([d, d], opts())) + 0.5;
        let base = frechet_distance(
            &FeatureStats::from_features(&fa).unwrap(),
            &FeatureStats::from_features(&fb).unwrap(),
        )
        .unwrap();
        let q = random_rotation(d);
        let shift = Tensor::randn([d], opts());
        let moved = |f: &Tensor| f.matmul(&q) + &shift;
        let rotated = frechet_distance(
            &FeatureStats::from_features(&moved(&fa)).unwrap(),
            &FeatureStats::from_features(&moved(&fb)).unwrap(),
        )
        .unwrap();
        assert!(base > 1.0);
        assert!((base - rotated).abs() < 1e-8 * base, "{base} vs {rotated}");
    }

    #[test]
    fn statistics_are_mean_and_unbiased_covariance() {
        let f = Tensor::from_slice(&[1.0, 2.0, 3.0, 6.0, 5.0, 4.0]).view([3, 2]);
        let s = FeatureStats::from_features(&f).unwrap();
        assert_eq!(s.n, 3);
        assert_eq!(Vec::<f64>::try_from(&s.mean).unwrap(), vec![3.0, 4.0]);
        // Column deviations (-2, 0, 2) and (-2, 2, 0): sums of products 8, 4, 8 over n - 1 = 2.
        assert_eq!(Vec::<f64>::try_from(&s.cov.flatten(0, -1)).unwrap(), vec![4.0, 2.0, 2.0, 4.0]);
    }

    #[test]
    fn distance_of_image_sets_uses_classifier_features() {
        use crate::eval::classifier::ClassifierConfig;
        tch::manual_seed(4);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let cfg = ClassifierConfig { channels: [4, 8, 8], feature_dim: 8, dropout: 0.0, ..Default::default() };
        let net = Classifier::new(vs.root(), cfg);
        let x = Tensor::rand([40, 1, 32, 32], (Kind::Float, Device::Cpu)) * 2 - 1;
        let same = frechet_distance_of(&net, &x, &x, 16).unwrap();
        assert!(same.abs() < 1e-6, "{same}");
        let shifted = frechet_distance_of(&net, &x, &(x.shallow_clone() * 0.5 + 0.5), 16).unwrap();
        assert!(shifted > 1e-3, "{shifted}");
        assert!(frechet_distance_of(&net, &x, &x.narrow(0, 0, 1), 16).is_err());
    }

    #[test]
    fn degenerate_inputs_are_clear_errors() {
        let one = FeatureStats::from_features(&Tensor::zeros([1, 4], opts())).unwrap_err();
        assert!(one.to_string().contains("at least 2"), "{one}");
        assert!(FeatureStats::from_features(&Tensor::zeros([4], opts())).is_err());
        let a = FeatureStats::from_features(&Tensor::randn([5, 3], opts())).unwrap();
        let b = FeatureStats::from_features(&Tensor::randn([5, 4], opts())).unwrap();
        let err = frechet_distance(&a, &b).unwrap_err();
        assert!(err.to_string().contains("dimensions differ"), "{err}");
    }
}
