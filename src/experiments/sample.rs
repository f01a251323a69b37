//! `lisa sample`: a grid of samples from a main network, optionally under the control of one or more side
//! networks (their residuals summed, as diffusers' MultiControlNet), with the conditions as the grid's first
//! rows, and optionally every sample as its own file with its metadata.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::control::{sample_controlled, Control, ControlOptions, SideNetwork};
use crate::data::imagefolder::load_image;
use crate::diffusion::SamplerConfig;
use crate::eval::grid::{check_sample_folder, save_grid_scaled, save_sample_folder};
use crate::pipeline::MainNetwork;
use crate::{Error, Result};

/// What to sample and where to write it (the `lisa sample` options; `--set` overrides its fields by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleRequest {
    /// Class labels, one column each; empty = every class.
    pub labels: Vec<i64>,
    /// Samples per label (rows).
    pub per_label: i64,
    /// The grid's PNG.
    pub out: PathBuf,
    /// A new (or empty) folder for every sample as its own PNG with a `metadata.jsonl`; `None` = grid only.
    pub out_dir: Option<PathBuf>,
    /// Side network folders to sample under.
    pub controlnets: Vec<PathBuf>,
    /// One condition image per side network, in order.
    pub conditions: Vec<PathBuf>,
    /// An ordinary image from which every side network extracts its own condition (instead of `conditions`).
    pub condition_from: Option<PathBuf>,
    /// One conditioning scale for all side networks, or one per side network.
    pub conditioning_scale: Vec<f64>,
    /// Fraction of the sampling steps after which the control starts acting.
    pub control_start: f64,
    /// Fraction of the sampling steps after which the control stops.
    pub control_end: f64,
    /// Classifier-free guidance scale on the label (1 = none).
    pub guidance_scale: f64,
    /// The sampler.
    pub sampler: SamplerConfig,
    /// Seed of the initial noise.
    pub seed: u64,
}

impl Default for SampleRequest {
    fn default() -> Self {
        Self {
            labels: vec![],
            per_label: 8,
            out: "samples.png".into(),
            out_dir: None,
            controlnets: vec![],
            conditions: vec![],
            condition_from: None,
            conditioning_scale: vec![1.0],
            control_start: 0.0,
            control_end: 1.0,
            guidance_scale: 1.0,
            sampler: SamplerConfig::default(),
            seed: 0,
        }
    }
}

/// What [`sample_to_files`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOutcome {
    /// Samples drawn.
    pub samples: usize,
    /// The side networks' condition kinds, in order (empty without control).
    pub condition_kinds: Vec<String>,
}

/// The counts of conditions and scales against the side networks (checked once the side networks loaded, so that
/// a folder that is not one is named first).
fn check_counts(req: &SampleRequest) -> Result<()> {
    if req.condition_from.is_none() && req.conditions.len() != req.controlnets.len() {
        return Err(Error::Config(format!(
            "{} side network(s) but {} --condition image(s): give one --condition per --controlnet, or \
             --condition-from IMG",
            req.controlnets.len(),
            req.conditions.len()
        )));
    }
    let scales = req.conditioning_scale.len();
    if scales != 1 && scales != req.controlnets.len() {
        return Err(Error::Config(format!(
            "give one --conditioning-scale for all side networks or one per --controlnet ({})",
            req.controlnets.len()
        )));
    }
    Ok(())
}

/// Checks `req` against the main network's classes before anything is loaded or drawn.
fn check_request(net: &MainNetwork, req: &SampleRequest) -> Result<Vec<i64>> {
    let k = net.config.label_encoder.num_classes;
    let labels: Vec<i64> = if req.labels.is_empty() { (0..k).collect() } else { req.labels.clone() };
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l > k) {
        return Err(Error::Config(format!(
            "label {bad} is out of range: the model knows labels 0..{} ({k} = unconditional)",
            k - 1
        )));
    }
    if req.per_label < 1 {
        return Err(Error::Config("--per-label must be ≥ 1".into()));
    }
    if req.controlnets.is_empty() && (!req.conditions.is_empty() || req.condition_from.is_some()) {
        return Err(Error::Config("--condition and --condition-from need --controlnet (a side network folder)".into()));
    }
    if let Some(dir) = &req.out_dir {
        check_sample_folder(dir)?;
    }
    Ok(labels)
}

/// The condition of side network `k` as it takes it, `n` times: read from its condition image, or extracted
/// from `req.condition_from` as in training.
fn condition_for(net: &MainNetwork, req: &SampleRequest, side: &SideNetwork, k: usize, n: i64) -> Result<Tensor> {
    let size = net.config.sample_size();
    let condition = match &req.condition_from {
        None if side.condition.len() > 1 => {
            return Err(Error::Config(format!(
                "the side network in {} takes stacked conditions ({}); give --condition-from IMG to extract them",
                req.controlnets[k].display(),
                side.condition
            )))
        }
        // A condition image as the side network takes it: grey, or colour for one trained on colour condition
        // maps (colour lowres, colour given images).
        None => {
            let channels = if side.config.conditioning_channels() == 3 { 3 } else { 1 };
            load_image(&req.conditions[k], size as u32, channels)?
        }
        // Conditions are extracted as in training: from a colour image for a colour main network.
        Some(path) => {
            let colour = net.config.out_channels() == 3 && net.config.num_frames() == 1;
            let image = load_image(path, size as u32, if colour { 3 } else { 1 })? * 2.0 - 1.0;
            if colour {
                side.condition.extract_colour_batch(&image)?
            } else {
                side.condition.extract_batch(&image)?
            }
        }
    };
    let channels = condition.size()[1];
    Ok(condition.expand([n, channels, size, size], false).contiguous())
}

/// Samples `req` from `net` and writes the grid (conditions in the first rows, then one column per label) and,
/// with `req.out_dir`, every sample with its metadata.
pub fn sample_to_files(net: &MainNetwork, req: &SampleRequest) -> Result<SampleOutcome> {
    let labels = check_request(net, req)?;
    let k = net.config.label_encoder.num_classes;
    // Column-major grid: one column per label.
    let ys: Vec<i64> = (0..req.per_label).flat_map(|_| labels.iter().copied()).collect();
    let n = ys.len() as i64;
    let sides: Vec<SideNetwork> = req
        .controlnets
        .iter()
        .map(|dir| {
            SideNetwork::load(dir, net).map_err(|e| Error::Config(format!("loading the side network in {}: {e}", dir.display())))
        })
        .collect::<Result<_>>()?;
    check_counts(req)?;
    let scales = &req.conditioning_scale;
    let mut controls = Vec::new();
    let mut condition_rows = Vec::new();
    for (i, side) in sides.iter().enumerate() {
        let condition = condition_for(net, req, side, i, n)?;
        // Stacked conditions are shown overlaid (their maximum), a colour condition in colour.
        let row = condition.narrow(0, 0, labels.len() as i64);
        let row = if side.condition.len() == 1 && row.size()[1] == 3 { row } else { row.amax([1], true) };
        condition_rows.push(row * 2.0 - 1.0);
        let options = ControlOptions {
            conditioning_scale: scales[if scales.len() == 1 { 0 } else { i }],
            start: req.control_start,
            end: req.control_end,
        };
        controls.push(Control { side, condition, options });
    }
    let images = sample_controlled(net, &controls, &Tensor::from_slice(&ys), &req.sampler, req.guidance_scale, req.seed)?;
    if let Some(dir) = &req.out_dir {
        let paths = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
        let fields: Vec<serde_json::Map<String, serde_json::Value>> = ys
            .iter()
            .enumerate()
            .map(|(i, &label)| {
                let mut m = serde_json::Map::new();
                m.insert("label".into(), label.into());
                m.insert("unconditional".into(), (label == k).into());
                m.insert("seed".into(), req.seed.into());
                m.insert("index".into(), i.into());
                m.insert("guidance_scale".into(), req.guidance_scale.into());
                if !sides.is_empty() {
                    m.insert("controlnet".into(), paths(&req.controlnets).into());
                    m.insert("conditioning_scale".into(), scales.clone().into());
                    match &req.condition_from {
                        Some(p) => m.insert("condition_from".into(), p.display().to_string().into()),
                        None => m.insert("condition".into(), paths(&req.conditions).into()),
                    };
                }
                m
            })
            .collect();
        save_sample_folder(&images, &fields, dir)?;
    }
    // The conditions above the samples: grey conditions over colour samples are shown in grey.
    let image_channels = images.size()[1];
    let mut rows: Vec<Tensor> = condition_rows
        .iter()
        .map(|r| match (r.size()[1], image_channels) {
            (1, 3) => r.expand([-1, 3, -1, -1], false),
            (3, 1) => r.mean_dim(1, true, Kind::Float),
            _ => r.shallow_clone(),
        })
        .collect();
    rows.push(images);
    save_grid_scaled(&Tensor::cat(&rows, 0), labels.len(), 2, 2, &req.out)?;
    Ok(SampleOutcome { samples: ys.len(), condition_kinds: sides.iter().map(|s| s.condition.to_string()).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{LabelEncoderConfig, UNetConfig};
    use crate::pipeline::MainNetworkConfig;

    fn tiny() -> MainNetwork {
        let cfg = MainNetworkConfig {
            unet: UNetConfig::tiny(),
            label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 2 },
            ..Default::default()
        };
        MainNetwork::new(&cfg, tch::Device::Cpu).unwrap()
    }

    #[test]
    fn bad_requests_are_refused_before_sampling_and_a_grid_is_written() {
        let net = tiny();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("grid.png");
        let sampler = SamplerConfig { steps: 2, ..SamplerConfig::default() };
        let req = SampleRequest { out: out.clone(), per_label: 2, sampler, ..SampleRequest::default() };
        let refused = |r: SampleRequest| sample_to_files(&net, &r).unwrap_err().to_string();
        assert!(refused(SampleRequest { labels: vec![4], ..req.clone() }).contains("labels 0..2 (3 = unconditional)"));
        assert!(refused(SampleRequest { per_label: 0, ..req.clone() }).contains("--per-label"));
        let e = refused(SampleRequest { conditions: vec!["c.png".into()], ..req.clone() });
        assert!(e.contains("need --controlnet"), "{e}");
        let e = refused(SampleRequest { conditioning_scale: vec![1.0, 0.5], ..req.clone() });
        assert!(e.contains("--conditioning-scale"), "{e}");
        assert!(!out.exists(), "nothing is written for a refused request");

        // The three classes and the unconditional label, two rows each.
        let done = sample_to_files(&net, &SampleRequest { labels: vec![0, 1, 2, 3], ..req }).unwrap();
        assert_eq!(done, SampleOutcome { samples: 8, condition_kinds: vec![] });
        assert!(out.is_file());
    }
}
