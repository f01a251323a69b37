//! Evaluating a main network: the Fréchet distance on a classifier's features (the shipped Fashion-MNIST
//! one, or one `lisa classifier` trained on the data) between its samples and held-out test images, next
//! to the floor (real train vs real test) and the ceiling (uniform noise vs real test) measured the same
//! way and with the same number of images.
use std::path::Path;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::diffusion::SamplerConfig;
use crate::eval::classifier::{load_classifier_dir, load_shipped};
use crate::eval::frechet::{frechet_distance, FeatureStats};
use crate::data::DataConfig;
use crate::pipeline::MainNetwork;
use crate::{Error, Result};

/// What `lisa eval` measures.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Images per set.
    pub num_images: i64,
    /// Where the real images came from.
    pub data: String,
    /// The held-out images the sets are compared with (the test split, a held-out fraction or a folder).
    #[serde(default)]
    pub held_out: String,
    /// Fréchet distance (classifier features) of the model's samples to the test images.
    pub frechet_samples: f64,
    /// The floor: real training images vs the test images.
    pub frechet_real_train: f64,
    /// The ceiling: uniform noise in [-1, 1] vs the test images.
    pub frechet_uniform_noise: f64,
    /// Fraction of samples the classifier assigns to the label they were generated for.
    pub sample_label_accuracy: f64,
    /// The sampler used.
    pub sampler: SamplerConfig,
    /// Seconds spent sampling.
    pub sampling_seconds: f64,
    /// The classifier folder whose features were used; absent: the shipped Fashion-MNIST classifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classifier: Option<String>,
}

/// Samples `num_images` images from `net` (labels cycling over the classes) and measures them on the
/// features of the classifier in the folder `classifier` (written by `lisa classifier`), or of the shipped
/// Fashion-MNIST classifier when `None`.
pub fn evaluate(
    net: &MainNetwork,
    data: &DataConfig,
    classifier: Option<&Path>,
    num_images: i64,
    sampler: &SamplerConfig,
    seed: u64,
) -> Result<EvalReport> {
    let test = data.load(true)?;
    let train = data.load(false)?;
    let (_vs, classifier_net) = match classifier {
        Some(dir) => {
            let (vs, c, info) = load_classifier_dir(dir, Device::Cpu)?;
            info.check_fits(dir, test.channels(), test.image_size(), train.num_classes)?;
            (vs, c)
        }
        None => {
            let (vs, c, _) = load_shipped(Device::Cpu)?;
            (vs, c)
        }
    };
    let size = net.config.sample_size();
    if (net.config.in_channels(), size) != (test.channels(), test.image_size()) {
        return Err(Error::Config(format!(
            "the model makes {}-channel {size}×{size} images but the data are {}-channel {}×{} images; give `--model` \
             a main network trained on this data",
            net.config.in_channels(),
            test.channels(),
            test.image_size(),
            test.image_size()
        )));
    }
    let classifier_dir = classifier.map(|d| d.display().to_string());
    let classifier = classifier_net;
    let n = num_images.min(test.len() as i64).min(train.len() as i64);
    let pick = |len: usize, salt: u64| -> Vec<i64> {
        let mut idx: Vec<i64> = (0..len as i64).collect();
        crate::rng::SplitMix64::new(crate::rng::derive_seed(seed, salt)).shuffle(&mut idx);
        idx.truncate(n as usize);
        idx
    };
    let (test_x, _, _) = test.batch(&pick(test.len(), 1))?;
    let (train_x, _, _) = train.batch(&pick(train.len(), 2))?;
    let t0 = std::time::Instant::now();
    let (samples, labels) = net.sample_many(n, 250, sampler, seed)?;
    let sampling_seconds = t0.elapsed().as_secs_f64();
    tch::manual_seed(seed as i64);
    let noise = Tensor::rand_like(&test_x) * 2.0 - 1.0;

    let stats = |x: &Tensor| -> Result<FeatureStats> { FeatureStats::from_features(&classifier.features_batched(x, 500)?) };
    let test_stats = stats(&test_x)?;
    let predicted = classifier.predict(&samples, 500)?;
    let correct = predicted.eq_tensor(&labels).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    Ok(EvalReport {
        num_images: n,
        data: if data.dataset == "fashion-mnist" { format!("fashion-mnist ({})", data.source) } else { data.dataset.clone() },
        held_out: data.held_out_description().unwrap_or_else(|| "the Fashion-MNIST test split".into()),
        frechet_samples: frechet_distance(&stats(&samples)?, &test_stats)?,
        frechet_real_train: frechet_distance(&stats(&train_x)?, &test_stats)?,
        frechet_uniform_noise: frechet_distance(&stats(&noise)?, &test_stats)?,
        sample_label_accuracy: correct,
        sampler: sampler.clone(),
        sampling_seconds,
        classifier: classifier_dir,
    })
}

impl EvalReport {
    /// A small table for the terminal and the README.
    pub fn table(&self) -> String {
        let n = self.num_images;
        let on = match &self.classifier {
            Some(dir) => format!("the features of the classifier in {dir}, {n} images each, vs {}", self.held_out),
            None => format!("the Fashion-MNIST classifier's features, {n} images each, vs the test split"),
        };
        format!(
            "Fréchet distance on {on}:\n\
             | set | Fréchet distance |\n|---|---|\n\
             | real train images (floor) | {:.3} |\n| model samples | {:.3} |\n| uniform noise (ceiling) | {:.3} |\n\
             samples classified as their label: {:.1}%",
            self.frechet_real_train,
            self.frechet_samples,
            self.frechet_uniform_noise,
            100.0 * self.sample_label_accuracy,
        )
    }
}
