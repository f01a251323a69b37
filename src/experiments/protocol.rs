//! The evaluation protocol every arm shares: the training data with its conditions, the fixed held-out set,
//! the frozen main network as configured, the sampler fidelity is measured with, the Fréchet features (and the
//! classifier that gives them), and the condition | sample | truth triptych.
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::control_config::ControlConfig;
use super::pretrain::device_from;
use crate::data::conditions::{luminance, ConditionKind};
use crate::data::Dataset;
use crate::diffusion::{SamplerConfig, SamplerKind};
use crate::eval::{load_classifier_dir, load_shipped, Classifier, ClassifierInfo, FeatureStats};
use crate::pipeline::MainNetwork;
use crate::{Error, Result};

/// Training data with conditions and the fixed held-out set, prepared once per comparison.
pub struct ControlData {
    /// Training images, labels and their conditions.
    pub train: Dataset,
    /// Held-out images [N, 1, H, W] in [-1, 1] (N = the larger of the two evaluation sizes).
    pub eval_images: Tensor,
    /// Their labels [N].
    pub eval_labels: Tensor,
    /// Their conditions [N, K, H, W] in [0, 1] (K = conditions in the set).
    pub eval_conditions: Tensor,
}

/// Loads the training split and a fixed held-out subset of the test split, and extracts the
/// condition of every image.
pub fn prepare_data(cfg: &ControlConfig) -> Result<ControlData> {
    let mut train = cfg.data.load(false)?;
    train.conditioning = Some(conditions_of(cfg, &train.images, train.conditioning.as_ref())?);
    let (eval_images, eval_labels, eval_conditions) = held_out_subset(cfg)?;
    Ok(ControlData { train, eval_images, eval_labels, eval_conditions })
}

/// The training data of a comparison, prepared on first use: a resumed comparison whose arms all
/// finished needs only the small held-out subset, not the conditions of every training image.
pub struct LazyData<'a> {
    cfg: &'a ControlConfig,
    data: Option<ControlData>,
}

impl<'a> LazyData<'a> {
    /// Nothing prepared yet.
    pub fn new(cfg: &'a ControlConfig) -> Self {
        Self { cfg, data: None }
    }

    /// The prepared data (extracted now if needed, with a line on stderr saying how long it took).
    pub fn get(&mut self) -> Result<&ControlData> {
        if self.data.is_none() {
            let t0 = std::time::Instant::now();
            let data = prepare_data(self.cfg)?;
            eprintln!(
                "{} conditions of {} training images extracted in {:.1} s",
                self.cfg.condition,
                data.train.len(),
                t0.elapsed().as_secs_f64()
            );
            self.data = Some(data);
        }
        Ok(self.data.as_ref().expect("prepared above"))
    }

    /// The held-out images, labels and conditions (see [`held_out_subset`]), without preparing the
    /// training data.
    pub fn held_out(&self) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.data {
            Some(d) => {
                Ok((d.eval_images.shallow_clone(), d.eval_labels.shallow_clone(), d.eval_conditions.shallow_clone()))
            }
            None => held_out_subset(self.cfg),
        }
    }
}

/// The fixed held-out subset of the test split (see [`DataConfig::load`]) that every evaluation uses:
/// (images [N, C, H, W] in [-1, 1], labels [N], conditions [N, K, H, W] in [0, 1]), N = the larger of the two
/// evaluation sizes.
pub fn held_out_subset(cfg: &ControlConfig) -> Result<(Tensor, Tensor, Tensor)> {
    let test = cfg.data.load(true)?;
    let n = cfg.fidelity.num_images.max(cfg.final_eval.num_images).min(test.len() as i64);
    let mut idx: Vec<i64> = (0..test.len() as i64).collect();
    crate::rng::SplitMix64::new(cfg.fidelity.seed).shuffle(&mut idx);
    idx.truncate(n as usize);
    let (eval_images, eval_labels, given) = test.batch(&idx)?;
    let eval_conditions = conditions_of(cfg, &eval_images, given.as_ref())?;
    Ok((eval_images, eval_labels, eval_conditions))
}

/// The conditions the side network takes for `images` ([N, C, H, W] in [-1, 1]), in [0, 1]: extracted from
/// the luminance of colour images, except `lowres`, which keeps their colour (one channel per colour); or, with
/// `condition = "given"`, the dataset's own condition images `given` as read (grey or colour, see
/// `data.conditioning_channels`).
pub fn conditions_of(cfg: &ControlConfig, images: &Tensor, given: Option<&Tensor>) -> Result<Tensor> {
    let set = cfg.condition_set()?;
    if set.primary() == ConditionKind::Given {
        let given = given.ok_or_else(|| {
            Error::Config(format!(
                "condition = \"given\" takes the dataset's own condition images, but {} has none: give an \
                 imagefolder whose metadata.jsonl lines have a `{}`, or extract a condition (--task edges, mask, ...)",
                cfg.data.dataset, cfg.data.conditioning_image_column
            ))
        })?;
        return Ok(given.shallow_clone());
    }
    if images.size().get(1) == Some(&3) && cfg.data.video.is_none() {
        return set.extract_colour_batch(images);
    }
    set.extract_batch(images)
}

/// Channels of one condition map as the side network takes it: 1, or 3 for colour condition images
/// (`lowres` of colour images, or colour `given` images); `conditions` as [`conditions_of`] returns them.
pub fn condition_channels(cfg: &ControlConfig, conditions: &Tensor) -> Result<i64> {
    let set = cfg.condition_set()?;
    Ok(if cfg.data.video.is_none() && set.len() == 1 { conditions.size()[1] } else { set.len() as i64 })
}

/// Loads the main network named by `cfg`, checks that it takes the configured data, and freezes it.
pub fn load_main(cfg: &ControlConfig) -> Result<MainNetwork> {
    let device = device_from(&cfg.device)?;
    let mut main = MainNetwork::load(&cfg.main_network_dir(), device)?;
    check_data_fits(cfg, &main)?;
    main.freeze();
    Ok(main)
}

/// The configured data's samples must have the channels (a clip's frames) the main network takes.
pub fn check_data_fits(cfg: &ControlConfig, main: &MainNetwork) -> Result<()> {
    let channels = cfg.data.video.as_ref().map_or(cfg.data.channels, |v| v.frames);
    if channels != main.config.in_channels() {
        let what = |c: i64, frames: bool| {
            if frames {
                format!("clips of {c} frames")
            } else {
                format!("{c}-channel images")
            }
        };
        return Err(Error::Config(format!(
            "the data are {} but the main network {} takes {}; use a main network trained on this data (data.video.frames \
             = its num_frames)",
            what(channels, cfg.data.video.is_some()),
            cfg.main_network_dir().display(),
            what(main.config.in_channels(), main.config.num_frames() > 1)
        )));
    }
    Ok(())
}

/// The classifier of the final evaluation's Fréchet distance named by `final_eval.classifier` (loaded on
/// the CPU), or `None` when none is named.
pub fn final_classifier(cfg: &ControlConfig) -> Result<Option<(Classifier, ClassifierInfo)>> {
    let dir = &cfg.final_eval.classifier;
    if dir.as_os_str().is_empty() {
        return Ok(None);
    }
    let (_vs, classifier, info) = load_classifier_dir(dir, Device::Cpu)?;
    Ok(Some((classifier, info)))
}

/// The classifier whose features give a run's Fréchet distance: the run's own (`final_eval.classifier`), or
/// else, on Fashion-MNIST, the shipped one.
pub struct FrechetFeatures {
    classifier: Classifier,
    /// The run's own classifier's description; `None` for the shipped one.
    pub own: Option<ClassifierInfo>,
}

impl FrechetFeatures {
    /// The run's classifier (loaded on the CPU); `None` for an imagefolder without its own, whose Fréchet
    /// distance is skipped (see [`frechet_skipped_note`]).
    pub fn load(cfg: &ControlConfig) -> Result<Option<Self>> {
        if let Some((classifier, info)) = final_classifier(cfg)? {
            return Ok(Some(Self { classifier, own: Some(info) }));
        }
        if cfg.data.is_imagefolder() {
            return Ok(None);
        }
        let (_vs, classifier, _) = load_shipped(Device::Cpu)?;
        Ok(Some(Self { classifier, own: None }))
    }

    /// Feature statistics of `images` ([N, C, H, W] in [-1, 1]) as this classifier takes them.
    pub fn stats(&self, cfg: &ControlConfig, images: &Tensor) -> Result<FeatureStats> {
        let view = if self.own.is_some() {
            classifier_view(cfg, images)?
        } else {
            // Clips are scored frame by frame (frames folded into the batch); colour images by their luminance
            // (the shipped classifier is Fashion-MNIST's, on grey images).
            let t = if cfg.data.video.is_none() && images.size()[1] == 3 { luminance(images)? } else { images.shallow_clone() };
            let s = t.size();
            t.f_reshape([-1, 1, s[2], s[3]])?
        };
        FeatureStats::from_features(&self.classifier.features_batched(&view, 500)?)
    }
}

/// What the run prints when its Fréchet distance is skipped (an imagefolder and no `final_eval.classifier`),
/// saying how to get one; `None` when there is a Fréchet distance.
pub fn frechet_skipped_note(cfg: &ControlConfig) -> Option<String> {
    (cfg.data.is_imagefolder() && cfg.final_eval.classifier.as_os_str().is_empty()).then(|| {
        format!(
            "note: the Fréchet distance is skipped: there is no classifier for {0}; train one with `lisa classifier \
             --data {0} --out DIR` and pass `--classifier DIR`",
            cfg.data.dataset
        )
    })
}

/// Images as the final evaluation's own classifier takes them: clips frame by frame (frames folded into
/// the batch, one grey channel each), images as they are.
fn classifier_view(cfg: &ControlConfig, t: &Tensor) -> Result<Tensor> {
    if cfg.data.video.is_none() {
        return Ok(t.shallow_clone());
    }
    let s = t.size();
    Ok(t.f_reshape([-1, 1, s[2], s[3]])?)
}

/// Refuses a `final_eval.classifier` that does not take the held-out `images` (as [`classifier_view`] gives
/// them) or tell apart the data's `num_classes` classes (`None`: the classes are not checked).
pub fn check_classifier_fits(
    cfg: &ControlConfig,
    info: &ClassifierInfo,
    images: &Tensor,
    num_classes: Option<i64>,
) -> Result<()> {
    let s = classifier_view(cfg, &images.narrow(0, 0, images.size()[0].min(1)))?.size();
    info.check_fits(&cfg.final_eval.classifier, s[1], s[2], num_classes.unwrap_or(info.train.model.num_classes))
}

/// Uniform noise in [-1, 1] of `shape`, drawn from `seed` (not from libtorch's global generator).
pub(super) fn uniform_noise(shape: &[i64], seed: u64) -> Result<Tensor> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect();
    Ok(Tensor::from_slice(&v).f_reshape(shape)?)
}

/// Writes rows of [condition | samples... | ground truth] for `k` examples (images in [-1, 1],
/// conditions in [0, 1]; stacked conditions are shown overlaid, their maximum; clips as strips of frames).
pub fn save_triptych(conditions: &Tensor, samples: &[Tensor], truth: &Tensor, path: &Path) -> Result<()> {
    let k = conditions.size()[0];
    let (channels, cs) = (truth.size()[1], conditions.size());
    // Colour images have fewer condition channels than image channels: one frame.
    let frames = if channels > 0 && cs[1] % channels == 0 { channels } else { 1 };
    // Frame-major condition channels [k, F·K, H, W] → per frame the maximum over the K conditions.
    let shown = conditions
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .f_reshape([k, frames, cs[1] / frames.max(1), cs[2], cs[3]])?
        .amax([2], false);
    // Grey conditions beside colour images are shown grey in colour.
    let shown = if frames != channels { shown.f_expand([k, channels, cs[2], cs[3]], false)? } else { shown };
    let mut cols = vec![shown * 2.0 - 1.0];
    cols.extend(samples.iter().map(|s| s.to_device(Device::Cpu).to_kind(Kind::Float)));
    cols.push(truth.to_device(Device::Cpu).to_kind(Kind::Float));
    let ncol = cols.len();
    // Interleave so that each row is one example.
    let stacked = Tensor::stack(&cols, 1).flatten(0, 1);
    debug_assert_eq!(stacked.size()[0], k * ncol as i64);
    crate::eval::grid::save_grid_scaled(&stacked, ncol, 2, 2, path)
}

/// The sampler of the fidelity and final evaluations: the configured one, except that DDIM becomes
/// Euler (same steps) for a flow-matching main network, so one comparison config serves both objectives.
pub fn fidelity_sampler(cfg: &ControlConfig, main: &MainNetwork) -> SamplerConfig {
    let mut s = cfg.fidelity.sampler.clone();
    if s.kind == SamplerKind::Ddim {
        s.kind = default_sampler_kind(main);
    }
    s
}

/// The default sampler for a main network's objective (DDIM, or Euler for flow).
pub fn default_sampler_kind(main: &MainNetwork) -> SamplerKind {
    match main.objective {
        crate::diffusion::Objective::Flow => SamplerKind::Euler,
        _ => SamplerKind::Ddim,
    }
}
