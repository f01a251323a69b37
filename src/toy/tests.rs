//! Tests of the exact toy: the closed forms against independent computations, LISA's identity by Monte
//! Carlo through our `Objective::training_sample` (with a negative control), and the decoder's convergence.
use tch::{Kind, Tensor};

use super::experiment::{learned_prior_drift, measure_drift, toy_objectives, train_decoder, EvalSet};
use super::*;
use crate::control::likelihood_residual;
use crate::rng::SplitMix64;

fn mixture() -> Mixture {
    Mixture::standard(0.2).unwrap()
}

fn vec2(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.flatten(0, -1)).unwrap()
}

/// A few points in the noised data's range: component-to-component midpoints (where the likelihood score
/// is large) and points near one component: six points and their conditions.
fn probe_points(m: &Mixture, alpha: f64, sigma: f64) -> (Vec<[f64; 2]>, Vec<usize>) {
    let mu = m.means();
    let mid = |a: usize, b: usize, off: [f64; 2]| {
        [alpha * 0.5 * (mu[a][0] + mu[b][0]) + sigma * off[0], alpha * 0.5 * (mu[a][1] + mu[b][1]) + sigma * off[1]]
    };
    let pts = vec![
        mid(0, 1, [0.0, 0.0]),
        mid(1, 2, [0.2, -0.1]),
        mid(2, 3, [-0.3, 0.1]),
        mid(0, 0, [0.5, 0.4]),
        mid(3, 0, [0.0, 0.3]),
        mid(1, 3, [0.4, 0.0]),
    ];
    (pts, vec![0, 2, 3, 1, 0, 1])
}

/// Raw times of each objective at unit times 0.1, 0.3 and 0.6.
fn probe_times(o: &Objective) -> Tensor {
    o.times_from_unit(&[0.1, 0.3, 0.6])
}

#[test]
fn invalid_mixtures_are_rejected() {
    let m = vec![vec![0.0, 0.0], vec![1.0, 1.0]];
    assert!(Mixture::new(vec![1.0], vec![vec![0.0]], vec![1.0], 0.1).is_err());
    assert!(Mixture::new(vec![1.0, 1.0], m.clone(), vec![1.0, 0.0], 0.1).is_err());
    assert!(Mixture::new(vec![1.0, 1.0], m.clone(), vec![1.0, 1.0], 1.0).is_err());
    assert!(Mixture::new(vec![1.0, 1.0], vec![vec![0.0], vec![1.0, 1.0]], vec![1.0, 1.0], 0.1).is_err());
    let ok = Mixture::new(vec![1.0, 3.0], m, vec![1.0, 1.0], 0.0).unwrap();
    assert_eq!(ok.weights(), &[0.25, 0.75]);
}

#[test]
fn sampling_matches_weights_and_flip_probability() {
    let m = mixture();
    let s = m.sample(40_000, &mut SplitMix64::new(11));
    let n = s.component.len() as f64;
    for (k, &w) in m.weights().iter().enumerate() {
        let f = s.component.iter().filter(|&&c| c == k).count() as f64 / n;
        assert!((f - w).abs() < 4.0 * (w * (1.0 - w) / n).sqrt(), "component {k}: {f} vs {w}");
    }
    let kept = s.component.iter().zip(&s.condition).filter(|(k, c)| k == c).count() as f64 / n;
    assert!((kept - 0.8).abs() < 4.0 * (0.16 / n).sqrt(), "P(c = k) = {kept}");
    // Component 0's points are centred on μ_0 with std 0.3.
    let xs: Vec<f64> = s.component.iter().enumerate().filter(|(_, &k)| k == 0).map(|(i, _)| s.x0[2 * i]).collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    assert!((mean - m.means()[0][0]).abs() < 0.01, "{mean}");
}

#[test]
fn likelihood_score_matches_finite_differences() {
    let m = mixture();
    let obj = &toy_objectives().unwrap()[0];
    let t = probe_times(obj);
    let level_all = noise_level(obj, &t).unwrap();
    for (i, (a, s)) in vec2(&level_all.alpha).into_iter().zip(vec2(&level_all.sigma)).enumerate() {
        let (pts, cs) = probe_points(&m, a, s);
        let n = pts.len() as i64;
        let x = Tensor::from_slice(&pts.concat()).view([n, 2]);
        let c = Tensor::from_slice(&cs.iter().map(|&c| c as i64).collect::<Vec<_>>());
        let level = NoiseLevel::constant(a, s, n);
        let g = vec2(&m.likelihood_score(&x, &c, &level).unwrap());
        let h = 1e-5;
        for j in 0..2 {
            let e = Tensor::from_slice(&[(j == 0) as i64 as f64, (j == 1) as i64 as f64]).view([1, 2]) * h;
            let lp = |x: &Tensor| vec2(&m.log_likelihood(x, &c, &level).unwrap());
            let (up, dn) = (lp(&(&x + &e)), lp(&(&x - &e)));
            for p in 0..n as usize {
                let fd = (up[p] - dn[p]) / (2.0 * h);
                let ad = g[2 * p + j];
                assert!(
                    (fd - ad).abs() < 1e-6 * (1.0 + ad.abs()),
                    "time {i} point {p} dim {j}: autograd {ad}, fd {fd}"
                );
            }
        }
        // Bayes: log p(c | x_t) = log p(x_t | c) + log p(c) − log p(x_t), and p(c | x_t) sums to 1 over c.
        let total: Vec<f64> = (0..4)
            .map(|ci| {
                vec2(&m.log_likelihood(&x, &Tensor::full([n], ci, (Kind::Int64, tch::Device::Cpu)), &level).unwrap())
            })
            .fold(vec![0.0; n as usize], |acc, lp| acc.iter().zip(lp).map(|(a, l)| a + l.exp()).collect());
        assert!(total.iter().all(|s| (s - 1.0).abs() < 1e-12), "{total:?}");
    }
}

#[test]
fn exact_eps_prior_is_minus_sigma_times_the_marginal_score() {
    // The exact ε-denoiser from posterior means must equal −σ ∇ log p(x_t) by autograd (Tweedie).
    let m = mixture();
    let obj = &toy_objectives().unwrap()[0];
    let mut rng = SplitMix64::new(3);
    let x: Vec<f64> = (0..40).map(|_| 2.0 * mixture::standard_normal(&mut rng)).collect();
    let x = Tensor::from_slice(&x).view([20, 2]);
    let level = noise_level(obj, &obj.times_from_unit(&(0..20).map(|i| i as f64 / 20.0).collect::<Vec<_>>())).unwrap();
    let xg = x.set_requires_grad(true);
    let lp = m.log_marginal(&xg, &level).unwrap().sum(Kind::Double);
    let score = &Tensor::run_backward(&[lp], &[&xg], false, false)[0];
    let via_score = -(level.sigma.unsqueeze(1) * score);
    let pred = exact_prior_prediction(&m, obj, &x.detach(), &level).unwrap();
    let diff = (pred - via_score).abs().max().double_value(&[]);
    assert!(diff < 1e-9, "{diff}");
}

#[test]
fn closed_form_conditional_mean_of_r_is_the_scaled_likelihood_score() {
    // Posterior-mean path vs autograd path, all three objectives, three times, six points each.
    let m = mixture();
    for obj in &toy_objectives().unwrap() {
        let t = probe_times(obj);
        let lv = noise_level(obj, &t).unwrap();
        for (a, s) in vec2(&lv.alpha).into_iter().zip(vec2(&lv.sigma)) {
            let (pts, cs) = probe_points(&m, a, s);
            let n = pts.len() as i64;
            let x = Tensor::from_slice(&pts.concat()).view([n, 2]);
            let c = Tensor::from_slice(&cs.iter().map(|&c| c as i64).collect::<Vec<_>>());
            let level = NoiseLevel::constant(a, s, n);
            let lhs = exact_target_mean(&m, obj, &x, Some(&c), &level).unwrap()
                - exact_prior_prediction(&m, obj, &x, &level).unwrap();
            let rhs = scaled_likelihood_score(&m, obj, &x, &c, &level).unwrap();
            let scale = rhs.abs().max().double_value(&[]);
            let err = (&lhs - &rhs).abs().max().double_value(&[]);
            assert!(scale > 1e-3 && err < 1e-9 * (1.0 + scale), "{}: α {a} err {err} scale {scale}", obj.name());
        }
    }
}

/// Monte-Carlo mean and standard error of each coordinate of `r` (`[N, d]`).
fn mean_and_se(r: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let n = r.size()[0] as f64;
    let mean = vec2(&r.mean_dim(0, false, Kind::Double));
    let sd = vec2(&r.std_dim(0, true, false));
    (mean, sd.iter().map(|s| s / n.sqrt()).collect())
}

#[test]
fn monte_carlo_mean_of_r_matches_the_scaled_likelihood_score() {
    // Spec §8 by sampling: draw (k, x0) ~ p(· | x_t, c), set ε = (x_t − α x0)/σ, let OUR Objective form the
    // target, subtract the exact prior's prediction (via likelihood_residual) and average. The mean must
    // agree with λ_t ∇ log p(c | x_t) within 4 standard errors, and a wrong λ_t (ε's scale for v and flow,
    // v's for ε) must be rejected by the same test at some point of every (objective, time).
    let m = mixture();
    let n = 20_000usize;
    let mut rng = SplitMix64::new(2024);
    for obj in &toy_objectives().unwrap() {
        let t = probe_times(obj);
        let lv = noise_level(obj, &t).unwrap();
        for (ti, (a, s)) in vec2(&lv.alpha).into_iter().zip(vec2(&lv.sigma)).enumerate() {
            let (pts, cs) = probe_points(&m, a, s);
            let mut rejected_wrong = 0;
            for (p, (x, &c)) in pts.iter().zip(&cs).enumerate() {
                let x0 = m.sample_posterior_x0(x, Some(c), a, s, n, &mut rng).unwrap();
                let eps: Vec<f64> = x0.chunks(2).flat_map(|z| [(x[0] - a * z[0]) / s, (x[1] - a * z[1]) / s]).collect();
                let t_n = t.get(ti as i64).expand([n as i64], false).contiguous();
                let x0 = Tensor::from_slice(&x0).view([n as i64, 2]);
                let (x_t, target, _) = noised(obj, &x0, &Tensor::from_slice(&eps).view([n as i64, 2]), &t_n).unwrap();
                // The objective's own x_t (α rounded to f32 there) is the point we conditioned on.
                let xt1 = Tensor::from_slice(x).view([1, 2]);
                assert!((&x_t - &xt1).abs().max().double_value(&[]) < 1e-5);
                let level1 = NoiseLevel::constant(a, s, 1);
                let pred_main = exact_prior_prediction(&m, obj, &xt1, &level1).unwrap();
                let r = likelihood_residual(&target, &pred_main);
                let (mean, se) = mean_and_se(&r);
                let score = vec2(&m.likelihood_score(&xt1, &Tensor::from_slice(&[c as i64]), &level1).unwrap());
                // The claimed scales, written out here rather than taken from the library.
                let (right, wrong) = match obj.name() {
                    "epsilon" => (-s, -s / a),
                    "v_prediction" => (-s / a, -s),
                    _ => {
                        let tf = t.double_value(&[ti as i64]);
                        (-tf / (1.0 - tf), -tf)
                    }
                };
                let lib = vec2(&likelihood_scale(obj, &level1))[0];
                assert!((lib - right).abs() < 1e-6 * right.abs(), "{}: likelihood_scale {lib} vs {right}", obj.name());
                let z = |lambda: f64| (0..2).map(|j| (mean[j] - lambda * score[j]).abs() / se[j]).fold(0.0, f64::max);
                let (z_right, z_wrong) = (z(right), z(wrong));
                assert!(
                    z_right < 4.0,
                    "{} t#{ti} point {p}: mean {mean:?} vs {:?} (z {z_right:.2})",
                    obj.name(),
                    [right * score[0], right * score[1]]
                );
                if z_wrong > 4.0 {
                    rejected_wrong += 1;
                }
            }
            assert!(rejected_wrong > 0, "{} t#{ti}: the wrong scale was never rejected", obj.name());
        }
    }
}

#[test]
fn lisa_decoder_converges_to_the_scaled_likelihood_score() {
    // (b) for ε: a few hundred steps take the held-out error well below the zero-output baseline.
    let m = mixture();
    let cfg = ToyConfig { steps: 300, eval_every: 100, eval_per_bucket: 100, ..ToyConfig::default() };
    let obj = &toy_objectives().unwrap()[0];
    let rep = train_decoder(&m, obj, &cfg).unwrap();
    assert_eq!(rep.steps, vec![0, 100, 200, 300]);
    // The zero-initialised decoder outputs 0, so its error is exactly the score's power.
    assert!((rep.initial_mse() - rep.score_power).abs() < 1e-12 * rep.score_power);
    assert!(rep.final_mse() < 0.3 * rep.initial_mse(), "{:?}", rep.relative);
}

#[test]
fn drift_is_finite_for_a_learned_prior_and_zero_for_the_exact_one() {
    // (c) is a measurement; here only its plumbing: finite numbers, and no drift with the exact prior.
    let m = mixture();
    let cfg = ToyConfig { steps: 100, eval_per_bucket: 50, eval_buckets: 5, ..ToyConfig::default() };
    let rep = learned_prior_drift(&m, &cfg).unwrap();
    assert_eq!(rep.learned.len(), 5);
    assert!(rep.prior_final_loss.is_finite());
    assert!(rep.learned.iter().all(|b| b.relative_drift.is_finite() && b.drift_mse > 0.0));
    assert!(rep.exact.iter().all(|b| b.relative_drift < 1e-6), "{:?}", rep.exact);
    // A prior that is off by a constant drifts by exactly that constant.
    let obj = Objective::new(&Default::default()).unwrap();
    let eval = EvalSet::new(&m, &obj, 2, 30, 5).unwrap();
    let off = exact_prior_prediction(&m, &obj, &eval.x_t, &eval.level).unwrap() + 0.1;
    let d = measure_drift(&m, &obj, &eval, &off).unwrap();
    assert!(d.iter().all(|b| (b.drift_mse - 0.01).abs() < 1e-9), "{d:?}");
}
