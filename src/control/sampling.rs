//! Sampling under control: one or several side networks (diffusers' MultiControlNet: residuals summed),
//! each with its own conditioning scale and active window of the sampling trajectory
//! (`control_guidance_start/end`), and classifier-free guidance on the label `y` with the side
//! networks' residuals in both branches, as diffusers' ControlNet pipelines do.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::side::SideNetwork;
use crate::diffusion::{Sampler, SamplerConfig};
use crate::pipeline::{MainNetwork, Residuals};
use crate::{Error, Result};

/// How one side network acts at inference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlOptions {
    /// Multiplies the side network's residuals (0 = no control). Default 1.
    pub conditioning_scale: f64,
    /// Fraction of the sampling steps after which the control starts acting. Default 0.
    pub start: f64,
    /// Fraction of the sampling steps after which it stops. Default 1.
    pub end: f64,
}

impl Default for ControlOptions {
    fn default() -> Self {
        Self { conditioning_scale: 1.0, start: 0.0, end: 1.0 }
    }
}

impl ControlOptions {
    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        if !self.conditioning_scale.is_finite() {
            return Err(Error::Config("the conditioning scale must be a finite number".into()));
        }
        if !(0.0 <= self.start && self.start < self.end && self.end <= 1.0) {
            return Err(Error::Config(format!(
                "control start {} and end {} must satisfy 0 ≤ start < end ≤ 1",
                self.start, self.end
            )));
        }
        Ok(())
    }

    /// Whether the control acts at sampling step `i` of `n` (diffusers' rule: from `i/n ≥ start` while
    /// `(i+1)/n ≤ end`).
    pub fn active(&self, i: usize, n: usize) -> bool {
        let (a, b) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
        a >= self.start && b <= self.end + 1e-12
    }
}

/// One side network with its condition images and options.
pub struct Control<'a> {
    /// The side network.
    pub side: &'a SideNetwork,
    /// Its condition, [N, C, H, W] in [0, 1] (one per sample).
    pub condition: Tensor,
    /// Scale and window.
    pub options: ControlOptions,
}

/// The prediction at sampling step `i` of `n`: the main network plus the residuals of every active
/// control, with classifier-free guidance `guidance_scale` on `y` (1 = none: one branch).
#[allow(clippy::too_many_arguments)]
pub fn controlled_prediction(
    main: &MainNetwork,
    controls: &[Control],
    x: &Tensor,
    model_t: &Tensor,
    y: &Tensor,
    guidance_scale: f64,
    i: usize,
    n: usize,
) -> Result<Tensor> {
    let guided = guidance_scale != 1.0;
    let b = x.size()[0];
    // Guidance: one batch of [unconditional; conditional], the residuals computed for both halves.
    let (xx, tt, yy) = if guided {
        let null = main.label_encoder.null_labels(b, y.device())?;
        (Tensor::cat(&[x, x], 0), Tensor::cat(&[model_t, model_t], 0), Tensor::cat(&[&null, y], 0))
    } else {
        (x.shallow_clone(), model_t.shallow_clone(), y.shallow_clone())
    };
    let encoder_hidden_states = main.label_encoder.forward(&yy)?;
    let shared = main.down_mid(&xx, &tt, &encoder_hidden_states)?;
    let mut residuals: Option<Residuals> = None;
    for c in controls.iter().filter(|c| c.options.active(i, n) && c.options.conditioning_scale != 0.0) {
        let cond = if guided { Tensor::cat(&[&c.condition, &c.condition], 0) } else { c.condition.shallow_clone() };
        let scale = c.options.conditioning_scale;
        let out = c.side.residuals(&xx, &tt, &encoder_hidden_states, &cond, scale, None, Some(&shared))?;
        residuals = Some(match residuals {
            None => out.residuals,
            Some(r) => r.add(out.residuals)?,
        });
    }
    let out = main.up(&shared, residuals.as_ref())?;
    if !guided {
        return Ok(out);
    }
    let (uncond, cond) = (out.narrow(0, 0, b), out.narrow(0, b, b));
    Ok(&uncond + (&cond - &uncond) * guidance_scale)
}

/// Samples `y.len()` images from noise drawn with `seed` under `controls` (may be empty: the main
/// network alone) and classifier-free guidance `guidance_scale` (1 = none).
pub fn sample_controlled(
    main: &MainNetwork,
    controls: &[Control],
    y: &Tensor,
    sampler: &SamplerConfig,
    guidance_scale: f64,
    seed: u64,
) -> Result<Tensor> {
    if !(guidance_scale.is_finite() && guidance_scale >= 0.0) {
        return Err(Error::Config(format!("the guidance scale must be ≥ 0, got {guidance_scale}")));
    }
    let dev = main.vs.device();
    let n = y.size()[0];
    for c in controls {
        c.options.validate()?;
        if c.condition.size().first() != Some(&n) {
            return Err(Error::Config(format!(
                "{n} labels but {} condition images for the {} side network; give one condition per sample",
                c.condition.size().first().unwrap_or(&0),
                c.side.condition
            )));
        }
    }
    let controls: Vec<Control> = controls
        .iter()
        .map(|c| Control {
            side: c.side,
            condition: c.condition.to_device(dev).to_kind(Kind::Float),
            options: c.options,
        })
        .collect();
    let sampler_cfg = sampler.clone();
    let steps = sampler_cfg.steps;
    let sampler = Sampler::new(&main.objective, sampler_cfg)?;
    let (c, s) = (main.config.in_channels(), main.config.sample_size());
    tch::manual_seed(seed as i64);
    let x_t = crate::rng::randn_on_host(&[n, c, s, s], Kind::Float, dev)?;
    let y = y.to_device(dev);
    let mut i = 0;
    sampler.sample(x_t, seed, |x, t| {
        let out = controlled_prediction(main, &controls, x, t, &y, guidance_scale, i, steps);
        i += 1;
        out
    })
}

/// [`sample_controlled`] in chunks of `chunk` samples, chunk `k`'s noise from `derive_seed(seed, start)`,
/// so a sample depends only on its index and `seed`. Results on the CPU.
pub fn sample_controlled_chunked(
    main: &MainNetwork,
    controls: &[Control],
    y: &Tensor,
    sampler: &SamplerConfig,
    guidance_scale: f64,
    seed: u64,
    chunk: i64,
) -> Result<Tensor> {
    let n = y.size()[0];
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.max(1).min(n - start);
        let part: Vec<Control> = controls
            .iter()
            .map(|c| Control { side: c.side, condition: c.condition.narrow(0, start, len), options: c.options })
            .collect();
        let s = sample_controlled(
            main,
            &part,
            &y.narrow(0, start, len),
            sampler,
            guidance_scale,
            crate::rng::derive_seed(seed, start as u64),
        )?;
        out.push(s.to_device(Device::Cpu));
        start += len;
    }
    Ok(Tensor::cat(&out, 0))
}

/// Sampling with one side network (the common case), on top of [`sample_controlled`].
impl SideNetwork {
    /// Generates one sample per (label, condition) pair from noise drawn with `seed`; `condition`
    /// is [N, C, H, W] in [0, 1], `y` [N]. See [`sample_controlled`] for several side networks,
    /// control windows and classifier-free guidance.
    pub fn sample(
        &self,
        main: &MainNetwork,
        y: &Tensor,
        condition: &Tensor,
        sampler: &SamplerConfig,
        scale: f64,
        seed: u64,
    ) -> Result<Tensor> {
        sample_controlled(main, &[self.alone(condition, scale)], y, sampler, 1.0, seed)
    }

    /// [`SideNetwork::sample`] in chunks of `chunk` (see [`sample_controlled_chunked`]). Results on the CPU.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_chunked(
        &self,
        main: &MainNetwork,
        y: &Tensor,
        condition: &Tensor,
        sampler: &SamplerConfig,
        scale: f64,
        seed: u64,
        chunk: i64,
    ) -> Result<Tensor> {
        sample_controlled_chunked(main, &[self.alone(condition, scale)], y, sampler, 1.0, seed, chunk)
    }

    /// This side network as the only control, at conditioning scale `scale`, over the whole sampling.
    fn alone(&self, condition: &Tensor, scale: f64) -> Control<'_> {
        let options = ControlOptions { conditioning_scale: scale, ..ControlOptions::default() };
        Control { side: self, condition: condition.shallow_clone(), options }
    }
}
