//! Training on the exact toy: (b) a LISA decoder regressed on `r = target − exact_prior(x_t)` must approach
//! the closed-form scaled likelihood score; (c) with a LEARNED prior in place of the exact one, how far the
//! decoder's regression optimum `E[target | x_t, c] − learned(x_t)` drifts from that score, by time.
//!
//! All randomness (data, noise, times, initial weights) comes from [`SplitMix64`] streams derived from the
//! seed, not from libtorch's global generator, so results are reproducible even with tests running in
//! parallel. Networks are small f32 MLPs; the closed forms are f64.
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::mixture::{standard_normal, uniform, Mixture};
use super::NoiseLevel;
use super::{exact_prior_prediction, exact_target_mean, noise_level, noised, scaled_likelihood_score};
use crate::control::likelihood_residual;
use crate::diffusion::objective::ObjectiveKind;
use crate::diffusion::{Objective, ObjectiveConfig, Prediction};
use crate::eval::plot::{line_plot, PlotSpec, Series};
use crate::rng::{derive_seed, SplitMix64};
use crate::{Error, Result};

/// Settings of the toy experiments (`lisa toy`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToyConfig {
    /// Optimiser steps of each decoder and of the learned prior.
    pub steps: u64,
    /// Fresh joint samples per step.
    pub batch_size: usize,
    /// Adam's peak learning rate (cosine-decayed to 0 over the steps).
    pub learning_rate: f64,
    /// Width of the MLPs' hidden layers.
    pub hidden: i64,
    /// Number of hidden layers.
    pub depth: usize,
    /// Evaluate the decoder on the held-out set every this many steps (and at the first and last).
    pub eval_every: u64,
    /// Time buckets of the held-out set (one fixed time at each bucket's centre).
    pub eval_buckets: usize,
    /// Held-out joint samples per bucket.
    pub eval_per_bucket: usize,
    /// Master seed.
    pub seed: u64,
    /// Condition flip probability ρ of the standard mixture.
    pub flip: f64,
    /// CPU threads for libtorch in [`run_toy`] (0 = libtorch's default). Default 1: the tensors are so small
    /// that more threads only add synchronisation (and spin badly on a loaded machine).
    pub threads: i32,
}

impl Default for ToyConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 256,
            learning_rate: 5e-3,
            hidden: 128,
            depth: 3,
            eval_every: 50,
            eval_buckets: 10,
            eval_per_bucket: 200,
            seed: 0,
            flip: 0.2,
            threads: 1,
        }
    }
}

impl ToyConfig {
    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 || self.eval_every == 0 || self.eval_buckets == 0 {
            return Err(Error::Config("toy: steps, batch_size, eval_every and eval_buckets must be ≥ 1".into()));
        }
        if self.eval_per_bucket == 0 || self.hidden <= 0 || self.depth == 0 {
            return Err(Error::Config("toy: eval_per_bucket, hidden and depth must be ≥ 1".into()));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(Error::Config(format!("toy: learning_rate must be > 0, got {}", self.learning_rate)));
        }
        Ok(())
    }
}

/// The three objectives of the toy, with our default DDPM schedule for ε and v.
pub fn toy_objectives() -> Result<Vec<Objective>> {
    let ddpm = |prediction| Objective::new(&ObjectiveConfig { prediction, ..Default::default() });
    Ok(vec![
        ddpm(Prediction::Epsilon)?,
        ddpm(Prediction::VPrediction)?,
        Objective::new(&ObjectiveConfig { kind: ObjectiveKind::Flow, ..Default::default() })?,
    ])
}

/// A small stream tag per objective, so each one's data and evaluation noise are independent.
fn objective_tag(objective: &Objective) -> u64 {
    match objective.name() {
        "epsilon" => 1,
        "v_prediction" => 2,
        _ => 3,
    }
}

/// Seed salt of the held-out sets (kept apart from every training stream).
const EVAL_SALT: u64 = 0x5EED_E7A1;
/// Seed salt of the learned prior's training stream.
const PRIOR_SALT: u64 = 0x9A10_2000;

/// A fully connected SiLU network with deterministic initial weights.
#[derive(Debug)]
struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    /// `input → hidden (×depth) → output`; weights and biases uniform in ±1/√fan_in (PyTorch's default
    /// range) from `rng`. `zero_output` zeroes the last layer, so the network starts at exactly 0.
    fn new(vs: &nn::Path, dims: (i64, i64, usize, i64), zero_output: bool, rng: &mut SplitMix64) -> Self {
        let (input, hidden, depth, output) = dims;
        let mut sizes = vec![input];
        sizes.extend(std::iter::repeat_n(hidden, depth));
        sizes.push(output);
        let n = sizes.len() - 1;
        let layers: Vec<nn::Linear> =
            (0..n).map(|i| nn::linear(vs / format!("l{i}"), sizes[i], sizes[i + 1], Default::default())).collect();
        tch::no_grad(|| {
            for (i, l) in layers.iter().enumerate() {
                let bound = if zero_output && i == n - 1 { 0.0 } else { 1.0 / (sizes[i] as f64).sqrt() };
                let mut fill = |t: &Tensor| {
                    let vals: Vec<f32> = (0..t.numel()).map(|_| ((2.0 * uniform(rng) - 1.0) * bound) as f32).collect();
                    let mut t = t.shallow_clone();
                    t.copy_(&Tensor::from_slice(&vals).view(t.size().as_slice()));
                };
                fill(&l.ws);
                if let Some(b) = &l.bs {
                    fill(b);
                }
            }
        });
        Self { layers }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i + 1 < self.layers.len() {
                h = h.silu();
            }
        }
        h
    }
}

/// The learning rate at `step`: cosine decay from `cfg.learning_rate` to 0, because the LISA target is a
/// single noisy sample and a constant rate leaves the fit jittering around the conditional mean.
fn cosine_lr(cfg: &ToyConfig, step: u64) -> f64 {
    0.5 * cfg.learning_rate * (1.0 + (std::f64::consts::PI * step as f64 / cfg.steps as f64).cos())
}

/// Number of time features (see [`features`]).
const TIME_FEATURES: i64 = 7;

/// Network input: `x_t`, a few Fourier features of the unit time, and optionally `onehot(c)`; f32 `[N, F]`.
fn features(x_t: &Tensor, unit_t: &Tensor, condition: Option<(&Tensor, usize)>) -> Tensor {
    let u = unit_t.to_kind(Kind::Float).unsqueeze(1);
    let freqs = Tensor::from_slice(&[1.0f32, 2.0, 4.0]).unsqueeze(0) * std::f64::consts::PI;
    let angle = &u * freqs;
    let mut parts = vec![x_t.to_kind(Kind::Float), u - 0.5, angle.sin(), angle.cos()];
    if let Some((c, k)) = condition {
        parts.push(c.one_hot(k as i64).to_kind(Kind::Float));
    }
    Tensor::cat(&parts, 1)
}

/// One fresh batch of joint samples, noised by the objective.
struct Batch {
    x_t: Tensor,
    target: Tensor,
    unit_t: Tensor,
    condition: Tensor,
    level: NoiseLevel,
}

/// `n` joint draws `(x0, c)`, `ε ~ N(0, I)` and times: `unit` gives each draw's unit time.
fn draw_batch(mixture: &Mixture, objective: &Objective, unit: &[f64], rng: &mut SplitMix64) -> Result<Batch> {
    let (n, d) = (unit.len(), mixture.dim() as i64);
    let s = mixture.sample(n, rng);
    let eps: Vec<f64> = (0..s.x0.len()).map(|_| standard_normal(rng)).collect();
    let t = objective.times_from_unit(unit);
    let x0 = Tensor::from_slice(&s.x0).view([n as i64, d]);
    let (x_t, target, unit_t) = noised(objective, &x0, &Tensor::from_slice(&eps).view([n as i64, d]), &t)?;
    let condition = Tensor::from_slice(&s.condition.iter().map(|&c| c as i64).collect::<Vec<_>>());
    Ok(Batch { x_t, target, unit_t, condition, level: noise_level(objective, &t)? })
}

/// A held-out set: `per_bucket` joint draws at the centre time of each of `buckets` equal unit-time bins,
/// with the exact scaled likelihood score at every point.
#[derive(Debug)]
pub struct EvalSet {
    /// Noisy points, f64 `[M, d]`.
    pub x_t: Tensor,
    /// Their conditions, i64 `[M]`.
    pub condition: Tensor,
    /// Unit times, f32 `[M]`.
    pub unit_t: Tensor,
    /// `(α, σ)` per point.
    pub level: NoiseLevel,
    /// The bucket of each point.
    pub bucket: Vec<usize>,
    /// Each bucket's unit time.
    pub bucket_unit_t: Vec<f64>,
    /// `λ_t ∇ log p(c | x_t)` per point, f64 `[M, d]`: what the LISA decoder should output.
    pub scaled_score: Tensor,
}

impl EvalSet {
    /// Draws the set for `objective` from the stream `seed`.
    pub fn new(mixture: &Mixture, objective: &Objective, buckets: usize, per_bucket: usize, seed: u64) -> Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let bucket_unit_t: Vec<f64> = (0..buckets).map(|b| (b as f64 + 0.5) / buckets as f64).collect();
        let bucket: Vec<usize> = (0..buckets).flat_map(|b| std::iter::repeat_n(b, per_bucket)).collect();
        let unit: Vec<f64> = bucket.iter().map(|&b| bucket_unit_t[b]).collect();
        let b = draw_batch(mixture, objective, &unit, &mut rng)?;
        let scaled_score = scaled_likelihood_score(mixture, objective, &b.x_t, &b.condition, &b.level)?;
        Ok(Self {
            x_t: b.x_t,
            condition: b.condition,
            unit_t: b.unit_t,
            level: b.level,
            bucket,
            bucket_unit_t,
            scaled_score,
        })
    }

    /// Per-bucket means of the per-point mean square of `x` (f64 `[M, d]`).
    fn bucket_means(&self, x: &Tensor) -> Result<Vec<f64>> {
        let per_point = Vec::<f64>::try_from(x.square().mean_dim(1, false, Kind::Double))?;
        let nb = self.bucket_unit_t.len();
        let (mut sum, mut count) = (vec![0.0; nb], vec![0usize; nb]);
        for (v, &b) in per_point.iter().zip(&self.bucket) {
            sum[b] += v;
            count[b] += 1;
        }
        Ok(sum.iter().zip(&count).map(|(s, &c)| s / c.max(1) as f64).collect())
    }
}

/// How a LISA decoder trained on the exact prior's residual approaches the exact scaled likelihood score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConvergenceReport {
    /// The objective's name (`epsilon`, `v_prediction`, `flow`).
    pub objective: String,
    /// Steps at which the decoder was evaluated.
    pub steps: Vec<u64>,
    /// Mean squared error (per coordinate) of the decoder to the scaled likelihood score on the held-out set.
    pub mse: Vec<f64>,
    /// `mse / mean(score²)`: 1 is the error of outputting 0 (the zero-initialised decoder).
    pub relative: Vec<f64>,
    /// Mean LISA loss `‖D − r‖²` (per coordinate) over the steps since the previous evaluation (NaN at step 0).
    pub train_loss: Vec<f64>,
    /// `mean(score²)` per coordinate on the held-out set.
    pub score_power: f64,
    /// The held-out buckets' unit times.
    pub bucket_unit_t: Vec<f64>,
    /// Final `mse / mean(score²)` per bucket.
    pub final_relative_by_bucket: Vec<f64>,
}

impl ConvergenceReport {
    /// The error at initialisation.
    pub fn initial_mse(&self) -> f64 {
        self.mse.first().copied().unwrap_or(f64::NAN)
    }
    /// The error after the last step.
    pub fn final_mse(&self) -> f64 {
        self.mse.last().copied().unwrap_or(f64::NAN)
    }
}

/// Trains a zero-initialised MLP decoder `D(x_t, t, onehot(c))` with the LISA loss `MSE(D, r)`,
/// `r = likelihood_residual(target, exact_prior(x_t))`, on fresh joint samples (`t` uniform), and evaluates it
/// against the exact scaled likelihood score on a held-out set (spec §8's "must converge to it").
pub fn train_decoder(mixture: &Mixture, objective: &Objective, cfg: &ToyConfig) -> Result<ConvergenceReport> {
    cfg.validate()?;
    let tag = objective_tag(objective);
    let eval = EvalSet::new(
        mixture,
        objective,
        cfg.eval_buckets,
        cfg.eval_per_bucket,
        derive_seed(cfg.seed ^ EVAL_SALT, tag),
    )?;
    let mut rng = SplitMix64::new(derive_seed(cfg.seed, tag));
    let (d, k) = (mixture.dim() as i64, mixture.num_components());
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs.root(), (d + TIME_FEATURES + k as i64, cfg.hidden, cfg.depth, d), true, &mut rng);
    let mut opt = nn::Adam::default().build(&vs, cfg.learning_rate)?;
    let eval_features = features(&eval.x_t, &eval.unit_t, Some((&eval.condition, k)));
    let score_power = eval.scaled_score.square().mean(Kind::Double).double_value(&[]);
    let mut report = ConvergenceReport {
        objective: objective.name().into(),
        steps: vec![],
        mse: vec![],
        relative: vec![],
        train_loss: vec![],
        score_power,
        bucket_unit_t: eval.bucket_unit_t.clone(),
        final_relative_by_bucket: vec![],
    };
    let (mut loss_sum, mut loss_n) = (0.0, 0u64);
    for step in 0..=cfg.steps {
        if step % cfg.eval_every == 0 || step == cfg.steps {
            let err = tch::no_grad(|| net.forward(&eval_features).to_kind(Kind::Double) - &eval.scaled_score);
            let mse = err.square().mean(Kind::Double).double_value(&[]);
            report.steps.push(step);
            report.mse.push(mse);
            report.relative.push(mse / score_power);
            report.train_loss.push(if loss_n > 0 { loss_sum / loss_n as f64 } else { f64::NAN });
            (loss_sum, loss_n) = (0.0, 0);
            if step == cfg.steps {
                let power = eval.bucket_means(&eval.scaled_score)?;
                let by_bucket = eval.bucket_means(&err)?;
                report.final_relative_by_bucket = by_bucket.iter().zip(&power).map(|(e, p)| e / p).collect();
                break;
            }
        }
        opt.set_lr(cosine_lr(cfg, step));
        let unit: Vec<f64> = (0..cfg.batch_size).map(|_| uniform(&mut rng)).collect();
        let b = draw_batch(mixture, objective, &unit, &mut rng)?;
        let pred_main = exact_prior_prediction(mixture, objective, &b.x_t, &b.level)?;
        let r = likelihood_residual(&b.target, &pred_main).to_kind(Kind::Float);
        let out = net.forward(&features(&b.x_t, &b.unit_t, Some((&b.condition, k))));
        let loss = (out - r).square().mean(Kind::Float);
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(Error::Training(format!("toy decoder ({}): non-finite loss at step {step}", objective.name())));
        }
        opt.backward_step(&loss);
        loss_sum += value;
        loss_n += 1;
    }
    Ok(report)
}

/// The drift of the decoder's regression optimum from the scaled likelihood score in one time bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftBucket {
    /// The bucket's unit time.
    pub unit_t: f64,
    /// `mean ‖drift‖²` per coordinate, `drift = E[target | x_t, c] − prior(x_t) − λ_t ∇ log p(c | x_t)`.
    pub drift_mse: f64,
    /// `mean (λ_t ∇ log p(c | x_t))²` per coordinate: the signal the decoder is meant to learn.
    pub score_power: f64,
    /// `√(drift_mse / score_power)`: the drift relative to the signal.
    pub relative_drift: f64,
}

/// Drift per held-out bucket of the LISA optimum `E[target | x_t, c] − prior_prediction` from the exact scaled
/// likelihood score, for a prior whose predictions on `eval`'s points are `prior_prediction` (f64 `[M, d]`).
/// The exact prior gives zero drift (up to rounding); a learned one drifts by exactly its own error.
pub fn measure_drift(
    mixture: &Mixture,
    objective: &Objective,
    eval: &EvalSet,
    prior_prediction: &Tensor,
) -> Result<Vec<DriftBucket>> {
    let cond = exact_target_mean(mixture, objective, &eval.x_t, Some(&eval.condition), &eval.level)?;
    let drift = cond - prior_prediction.to_kind(Kind::Double) - &eval.scaled_score;
    let d2 = eval.bucket_means(&drift)?;
    let s2 = eval.bucket_means(&eval.scaled_score)?;
    Ok(eval
        .bucket_unit_t
        .iter()
        .zip(d2.iter().zip(&s2))
        .map(|(&unit_t, (&drift_mse, &score_power))| DriftBucket {
            unit_t,
            drift_mse,
            score_power,
            relative_drift: (drift_mse / score_power).sqrt(),
        })
        .collect())
}

/// (c): an MLP ε-predictor trained on the mixture, used as LISA's main network, against the exact prior.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftReport {
    /// The objective (ε-prediction).
    pub objective: String,
    /// Training steps of the learned prior.
    pub prior_steps: u64,
    /// Its mean ε-MSE per coordinate over the last tenth of training.
    pub prior_final_loss: f64,
    /// The exact prior's ε-MSE on the same batches: the floor the learned prior's loss can reach.
    pub exact_prior_loss: f64,
    /// Drift with the learned prior, by bucket.
    pub learned: Vec<DriftBucket>,
    /// Drift with the exact prior (≈ 0: the identity holds), by bucket.
    pub exact: Vec<DriftBucket>,
}

/// Trains a small MLP ε-predictor (no condition) on the mixture for `cfg.steps` steps and measures, per time
/// bucket, how far `E[r_learned | x_t, c] = E[ε | x_t, c] − learned(x_t)` drifts from `−σ ∇ log p(c | x_t)`.
pub fn learned_prior_drift(mixture: &Mixture, cfg: &ToyConfig) -> Result<DriftReport> {
    cfg.validate()?;
    let objective = Objective::new(&ObjectiveConfig::default())?;
    let eval =
        EvalSet::new(mixture, &objective, cfg.eval_buckets, cfg.eval_per_bucket, derive_seed(cfg.seed ^ EVAL_SALT, 9))?;
    let mut rng = SplitMix64::new(derive_seed(cfg.seed ^ PRIOR_SALT, 0));
    let d = mixture.dim() as i64;
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs.root(), (d + TIME_FEATURES, cfg.hidden, cfg.depth, d), false, &mut rng);
    let mut opt = nn::Adam::default().build(&vs, cfg.learning_rate)?;
    let tail = (cfg.steps / 10).max(1);
    let (mut tail_sum, mut exact_sum, mut tail_n) = (0.0, 0.0, 0u64);
    for step in 0..cfg.steps {
        opt.set_lr(cosine_lr(cfg, step));
        let unit: Vec<f64> = (0..cfg.batch_size).map(|_| uniform(&mut rng)).collect();
        let b = draw_batch(mixture, &objective, &unit, &mut rng)?;
        let out = net.forward(&features(&b.x_t, &b.unit_t, None));
        let loss = (out - b.target.to_kind(Kind::Float)).square().mean(Kind::Float);
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(Error::Training(format!("toy prior: non-finite loss at step {step}")));
        }
        opt.backward_step(&loss);
        if step >= cfg.steps - tail {
            let exact = exact_prior_prediction(mixture, &objective, &b.x_t, &b.level)?;
            tail_sum += value;
            exact_sum += (exact - &b.target).square().mean(Kind::Double).double_value(&[]);
            tail_n += 1;
        }
    }
    let learned_pred = tch::no_grad(|| net.forward(&features(&eval.x_t, &eval.unit_t, None)));
    let exact_pred = exact_prior_prediction(mixture, &objective, &eval.x_t, &eval.level)?;
    Ok(DriftReport {
        objective: objective.name().into(),
        prior_steps: cfg.steps,
        prior_final_loss: tail_sum / tail_n.max(1) as f64,
        exact_prior_loss: exact_sum / tail_n.max(1) as f64,
        learned: measure_drift(mixture, &objective, &eval, &learned_pred)?,
        exact: measure_drift(mixture, &objective, &eval, &exact_pred)?,
    })
}

/// Everything `lisa toy` measures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToyReport {
    /// The settings.
    pub config: ToyConfig,
    /// The data distribution.
    pub mixture: Mixture,
    /// (b) one decoder per objective.
    pub convergence: Vec<ConvergenceReport>,
    /// (c) the learned prior's drift.
    pub drift: DriftReport,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
}

impl ToyReport {
    /// A short Markdown summary.
    pub fn table(&self) -> String {
        let mut s = format!(
            "exact toy: {}-component mixture in R^{}, ρ = {}, {} steps, batch {}\n\n\
             (b) LISA decoder vs the exact scaled likelihood score (held-out MSE per coordinate)\n\n\
             | objective | mean(score²) | MSE at init | final MSE | final / init |\n|---|---|---|---|---|\n",
            self.mixture.num_components(),
            self.mixture.dim(),
            self.mixture.flip(),
            self.config.steps,
            self.config.batch_size
        );
        for c in &self.convergence {
            s += &format!(
                "| {} | {:.4} | {:.4} | {:.4} | {:.3} |\n",
                c.objective,
                c.score_power,
                c.initial_mse(),
                c.final_mse(),
                c.final_mse() / c.initial_mse()
            );
        }
        s += &format!(
            "\n(c) learned ε-prior (final ε-MSE {:.4}; the exact prior's on the same batches {:.4}): drift of \
             E[r | x_t, c] from −σ∇log p(c|x_t)\n\n\
             | t/T | mean(score²) | drift MSE | relative drift | exact prior |\n|---|---|---|---|---|\n",
            self.drift.prior_final_loss, self.drift.exact_prior_loss
        );
        for (l, e) in self.drift.learned.iter().zip(&self.drift.exact) {
            s += &format!(
                "| {:.2} | {:.2e} | {:.2e} | {:.3} | {:.1e} |\n",
                l.unit_t, l.score_power, l.drift_mse, l.relative_drift, e.relative_drift
            );
        }
        s += &format!("\n{:.1} s\n", self.seconds);
        s
    }
}

/// Runs (b) for ε, v and flow and (c) on the standard mixture, and writes `toy-convergence.png`,
/// `toy-drift.png` and `toy.json` into `out`.
pub fn run_toy(cfg: &ToyConfig, out: &Path) -> Result<ToyReport> {
    cfg.validate()?;
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    let start = Instant::now();
    let mixture = Mixture::standard(cfg.flip)?;
    let convergence = toy_objectives()?.iter().map(|o| train_decoder(&mixture, o, cfg)).collect::<Result<Vec<_>>>()?;
    let drift = learned_prior_drift(&mixture, cfg)?;
    let report = ToyReport { config: cfg.clone(), mixture, convergence, drift, seconds: start.elapsed().as_secs_f64() };
    write_outputs(&report, out)?;
    Ok(report)
}

const COLORS: [[u8; 3]; 3] = [[60, 110, 200], [220, 90, 40], [40, 160, 90]];

fn write_outputs(report: &ToyReport, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let series: Vec<Series> = report
        .convergence
        .iter()
        .zip(COLORS)
        .map(|(c, color)| Series {
            label: c.objective.clone(),
            color,
            x: c.steps.iter().map(|&s| s as f64).collect(),
            mean: c.relative.clone(),
            band: None,
        })
        .collect();
    line_plot(
        &out.join("toy-convergence.png"),
        &PlotSpec {
            title: "Toy: LISA decoder error to exact scaled score",
            x_label: "training step",
            y_label: "MSE / mean sq. score",
            width: 720,
            height: 440,
        },
        &series,
    )?;
    let d = &report.drift;
    let x: Vec<f64> = d.learned.iter().map(|b| b.unit_t).collect();
    line_plot(
        &out.join("toy-drift.png"),
        &PlotSpec {
            title: "Learned eps-prior: drift of E[r|x_t,c] by time",
            x_label: "t / T",
            y_label: "log10 relative drift (RMS)",
            width: 720,
            height: 440,
        },
        &[
            Series {
                label: "learned prior".into(),
                color: COLORS[1],
                x: x.clone(),
                mean: d.learned.iter().map(|b| b.relative_drift.log10()).collect(),
                band: None,
            },
            // The exact prior's drift (~1e-15) would squash the axis; it is in toy.json. This line marks drift
            // as large as the signal itself.
            Series {
                label: "drift = signal".into(),
                color: [150, 150, 150],
                x: x.clone(),
                mean: vec![0.0; x.len()],
                band: None,
            },
        ],
    )?;
    let path = out.join("toy.json");
    let json = serde_json::to_string_pretty(report).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    Ok(())
}
