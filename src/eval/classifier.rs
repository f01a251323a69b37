//! A small CNN classifier, shipped for Fashion-MNIST (`[N, 1, 32, 32]` in [-1, 1]) and trained by
//! `lisa classifier` on users' labelled imagefolders (grey or RGB, any size from 8). It serves two
//! evaluation purposes: its predictions measure whether samples are recognisable (and of the
//! requested class), and its penultimate activations are the feature space of the Fréchet
//! distance in [`super::frechet`].
//!
//! Architecture: three 3×3 conv → batch-norm → ReLU → 2×2 max-pool stages (32 → 16 → 8 → 4
//! pixels; other sizes are average-pooled to 4×4 after them), flatten, a linear layer to
//! `feature_dim` with ReLU (the features), dropout, and a linear layer to the class logits.
//! Pooling after every stage keeps a training epoch on 60,000 images to about a minute on two CPU
//! cores.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::fashion_mnist::{self, Source, Split};
use crate::data::DataConfig;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Image side length the shipped classifier accepts (Fashion-MNIST padded from 28 to 32).
pub const IMAGE_SIZE: i64 = 32;

/// Number of Fashion-MNIST classes.
pub const NUM_CLASSES: i64 = 10;

/// The smallest image side the classifier takes (three 2× poolings leave one pixel).
pub const MIN_IMAGE_SIZE: i64 = 8;

/// The weights' file name in a classifier folder.
pub const WEIGHTS_FILE: &str = "classifier.safetensors";

/// The metadata's file name ([`ClassifierInfo`] as JSON) in a classifier folder.
pub const INFO_FILE: &str = "classifier.json";

/// The shipped weights, trained by [`train_shipped_classifier`] on the full training split.
pub const SHIPPED_WEIGHTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/classifier.safetensors");

/// The shipped weights' metadata ([`ClassifierInfo`] as JSON).
pub const SHIPPED_INFO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/classifier.json");

/// The seed the shipped classifier was trained with.
pub const SHIPPED_SEED: u64 = 20_251_128;

/// Architecture of the [`Classifier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Output channels of the three conv stages.
    pub channels: [i64; 3],
    /// Width of the penultimate layer: the feature dimension D of the Fréchet distance.
    pub feature_dim: i64,
    /// Dropout probability on the features during training.
    pub dropout: f64,
    /// Image channels it takes: 1 (grey) or 3 (RGB); `lisa classifier` sets it from the data. Default 1.
    pub in_channels: i64,
    /// Side of the square images it takes (at least [`MIN_IMAGE_SIZE`]); `lisa classifier` sets it from the
    /// data. Default 32.
    pub image_size: i64,
    /// Classes it tells apart; `lisa classifier` sets it from the data. Default 10.
    pub num_classes: i64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            channels: [32, 64, 128],
            feature_dim: 128,
            dropout: 0.3,
            in_channels: 1,
            image_size: IMAGE_SIZE,
            num_classes: NUM_CLASSES,
        }
    }
}

impl ClassifierConfig {
    /// Rejects input shapes and class counts the network cannot be built for.
    pub fn validate(&self) -> Result<()> {
        if ![1, 3].contains(&self.in_channels) {
            return Err(Error::Config(format!(
                "classifier in_channels must be 1 (grey) or 3 (RGB), got {}; use data.channels = 1 or 3",
                self.in_channels
            )));
        }
        if self.image_size < MIN_IMAGE_SIZE {
            return Err(Error::Config(format!(
                "the classifier needs images of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels, got {0}×{0}; \
                 set data.image_size to {MIN_IMAGE_SIZE} or more",
                self.image_size
            )));
        }
        if self.num_classes < 1 || self.channels.iter().any(|&c| c < 1) || self.feature_dim < 1 {
            return Err(Error::Config(format!(
                "classifier: num_classes, channels and feature_dim must be ≥ 1, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// The classifier network; its variables live in the [`nn::VarStore`] of the path it was built on.
#[derive(Debug)]
pub struct Classifier {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    fc: nn::Linear,
    head: nn::Linear,
    cfg: ClassifierConfig,
    device: Device,
}

impl Classifier {
    /// Builds the network with fresh (seeded by libtorch's generator) weights under `p`.
    pub fn new(p: nn::Path, cfg: ClassifierConfig) -> Self {
        let conv_cfg = nn::ConvConfig { padding: 1, ..Default::default() };
        let mut convs = Vec::new();
        let mut c_in = cfg.in_channels;
        for (i, &c_out) in cfg.channels.iter().enumerate() {
            let conv = nn::conv2d(&p / format!("conv{i}"), c_in, c_out, 3, conv_cfg);
            let bn = nn::batch_norm2d(&p / format!("bn{i}"), c_out, Default::default());
            convs.push((conv, bn));
            c_in = c_out;
        }
        // Three 2× poolings take 32×32 down to 4×4 (other sizes are average-pooled to 4×4 after them).
        let flat = c_in * POOLED * POOLED;
        let fc = nn::linear(&p / "fc", flat, cfg.feature_dim, Default::default());
        let head = nn::linear(&p / "head", cfg.feature_dim, cfg.num_classes, Default::default());
        Self { convs, fc, head, cfg, device: p.device() }
    }

    /// The architecture this network was built with.
    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The feature dimension D.
    pub fn feature_dim(&self) -> i64 {
        self.cfg.feature_dim
    }

    fn trunk(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_images(&self.cfg, x)?;
        let mut h = x.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
        for (conv, bn) in &self.convs {
            h = bn.forward_t(&conv.forward_t(&h, train), train).f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        }
        if h.size()[2..] != [POOLED, POOLED] {
            h = h.f_adaptive_avg_pool2d([POOLED, POOLED])?;
        }
        Ok(h.f_flatten(1, -1)?.apply(&self.fc).f_relu()?)
    }

    /// Class logits `[N, K]` for `x` (`[N, C, S, S]` in [-1, 1], as configured); `train` enables dropout and
    /// batch-statistics batch norm (and updates its running statistics).
    pub fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let f = self.trunk(x, train)?.f_dropout(self.cfg.dropout, train)?;
        Ok(f.apply(&self.head))
    }

    /// Penultimate activations `[N, D]` (inference mode), the features of the Fréchet distance.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.trunk(x, false)
    }

    /// [`Self::logits`] in inference mode, without gradients, `chunk` images at a time (so that
    /// large sets fit in memory); the result is on the CPU.
    pub fn logits_batched(&self, x: &Tensor, chunk: i64) -> Result<Tensor> {
        self.batched(x, chunk, |c| self.logits(c, false))
    }

    /// [`Self::features`] without gradients, `chunk` images at a time; the result is on the CPU.
    pub fn features_batched(&self, x: &Tensor, chunk: i64) -> Result<Tensor> {
        self.batched(x, chunk, |c| self.features(c))
    }

    /// Predicted classes `[N]` (i64, CPU), `chunk` images at a time.
    pub fn predict(&self, x: &Tensor, chunk: i64) -> Result<Tensor> {
        Ok(self.logits_batched(x, chunk)?.f_argmax(-1, false)?)
    }

    /// Overall and per-class accuracy of the predictions for `images` against `labels` (`[N]`
    /// integer classes). A class absent from `labels` gets NaN.
    pub fn accuracy(&self, images: &Tensor, labels: &Tensor, chunk: i64) -> Result<(f64, Vec<f64>)> {
        let n = images.size().first().copied().unwrap_or(0);
        if labels.size() != [n] {
            return Err(Error::Config(format!(
                "classifier accuracy: {n} images but labels of shape {:?}",
                labels.size()
            )));
        }
        let pred = self.predict(images, chunk)?;
        let labels = labels.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let correct = pred.f_eq_tensor(&labels)?.f_to_kind(Kind::Double)?;
        let overall = correct.f_mean(Kind::Double)?.double_value(&[]);
        let mut per_class = Vec::with_capacity(self.cfg.num_classes as usize);
        for c in 0..self.cfg.num_classes {
            let mask = labels.f_eq(c)?.f_to_kind(Kind::Double)?;
            let count = mask.f_sum(Kind::Double)?.double_value(&[]);
            let hits = correct.f_mul(&mask)?.f_sum(Kind::Double)?.double_value(&[]);
            per_class.push(if count > 0.0 { hits / count } else { f64::NAN });
        }
        Ok((overall, per_class))
    }

    fn batched(&self, x: &Tensor, chunk: i64, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        check_images(&self.cfg, x)?;
        if chunk < 1 {
            return Err(Error::Config(format!("classifier: chunk size must be ≥ 1, got {chunk}")));
        }
        let n = x.size()[0];
        tch::no_grad(|| {
            let mut outs = Vec::new();
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                outs.push(f(&x.f_narrow(0, start, len)?)?.f_to_device(Device::Cpu)?);
                start += len;
            }
            if outs.is_empty() {
                // Keep the output's trailing shape meaningful for an empty input.
                return Ok(f(x)?.f_to_device(Device::Cpu)?);
            }
            Ok(Tensor::f_cat(&outs, 0)?)
        })
    }
}

/// The side of the feature maps that are flattened into the features.
const POOLED: i64 = 4;

/// Rejects inputs that are not `[N, C, S, S]` as `cfg` says, with the shape in the message.
fn check_images(cfg: &ClassifierConfig, x: &Tensor) -> Result<()> {
    let s = x.size();
    let (c, size) = (cfg.in_channels, cfg.image_size);
    if s.len() != 4 || s[1] != c || s[2] != size || s[3] != size {
        return Err(Error::Config(format!("classifier: expected images [N, {c}, {size}, {size}], got shape {s:?}")));
    }
    Ok(())
}

/// How to train a [`Classifier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierTrainConfig {
    /// The architecture.
    pub model: ClassifierConfig,
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Peak AdamW learning rate, reached after `warmup_steps` and cosine-decayed to 0 by the end.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Randomly mirror half the images left–right (Fashion-MNIST items are roughly symmetric).
    pub hflip: bool,
    /// Images per chunk when evaluating.
    pub eval_chunk: usize,
    /// Print the running loss every this many steps (0: only per epoch).
    pub log_every: usize,
}

impl Default for ClassifierTrainConfig {
    fn default() -> Self {
        Self {
            model: ClassifierConfig::default(),
            epochs: 4,
            batch_size: 128,
            lr: 2e-3,
            warmup_steps: 100,
            weight_decay: 1e-4,
            hflip: true,
            eval_chunk: 1000,
            log_every: 100,
        }
    }
}

/// Per-epoch training record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training cross-entropy over the epoch.
    pub train_loss: f64,
    /// Test accuracy after the epoch (if a test set was given).
    pub test_accuracy: Option<f64>,
    /// Wall-clock seconds since training started.
    pub elapsed_s: f64,
}

/// What [`train_classifier`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierReport {
    /// Final accuracy on the test set.
    pub test_accuracy: f64,
    /// Final accuracy per class (index = label); NaN for classes absent from the test set.
    pub per_class_accuracy: Vec<f64>,
    /// Number of test images evaluated.
    pub test_images: usize,
    /// Number of training images.
    pub train_images: usize,
    /// Trainable parameters.
    pub parameters: i64,
    /// Wall-clock training time (including per-epoch evaluation), in seconds.
    pub train_seconds: f64,
    /// Per-epoch losses and accuracies.
    pub epochs: Vec<EpochRecord>,
}

/// Trains a [`Classifier`] on `images` (`[N, C, S, S]` in [-1, 1], as `cfg.model` says) and `labels`
/// (`[N]` classes below `cfg.model.num_classes`) and evaluates it on the test set after every epoch,
/// printing progress.
///
/// Deterministic for a given `seed` on a given device and thread count: libtorch's generator is
/// seeded (weight init, dropout, flips) and the data order comes from [`SplitMix64`]. Trains on
/// the GPU when one is available.
pub fn train_classifier(
    images: &Tensor,
    labels: &Tensor,
    test_images: &Tensor,
    test_labels: &Tensor,
    cfg: &ClassifierTrainConfig,
    seed: u64,
) -> Result<(nn::VarStore, Classifier, ClassifierReport)> {
    cfg.model.validate()?;
    check_images(&cfg.model, images)?;
    let n = images.size()[0];
    if labels.size() != [n] || n == 0 {
        return Err(Error::Config(format!(
            "train_classifier: {n} images but labels of shape {:?}",
            labels.size()
        )));
    }
    for l in [labels, test_labels] {
        if l.numel() > 0 {
            let (lo, hi) = (l.f_min()?.int64_value(&[]), l.f_max()?.int64_value(&[]));
            if lo < 0 || hi >= cfg.model.num_classes {
                return Err(Error::Config(format!(
                    "train_classifier: labels {lo}..={hi} do not fit {} classes",
                    cfg.model.num_classes
                )));
            }
        }
    }
    if cfg.epochs == 0 || cfg.batch_size == 0 || cfg.eval_chunk == 0 || !(cfg.lr > 0.0) {
        return Err(Error::Config(format!(
            "train_classifier: epochs, batch_size, eval_chunk and lr must be positive ({cfg:?})"
        )));
    }
    let device = Device::cuda_if_available();
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let net = Classifier::new(vs.root(), cfg.model.clone());
    let parameters: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let mut opt = nn::AdamW::default().wd(cfg.weight_decay).build(&vs, cfg.lr)?;
    let labels = labels.f_to_kind(Kind::Int64)?;

    let batch = cfg.batch_size as i64;
    let steps_per_epoch = (n + batch - 1) / batch;
    let total_steps = steps_per_epoch as usize * cfg.epochs;
    println!(
        "classifier: {parameters} parameters, {n} training images, {} epochs × {steps_per_epoch} steps on {device:?}",
        cfg.epochs
    );
    let mut order: Vec<i64> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    let start = Instant::now();
    let mut records = Vec::new();
    let mut step = 0usize;
    for epoch in 1..=cfg.epochs {
        rng.shuffle(&mut order);
        let (mut loss_sum, mut loss_n, mut window) = (0.0, 0usize, 0.0);
        for idx in order.chunks(cfg.batch_size) {
            opt.set_lr(lr_at(cfg, step, total_steps));
            let idx = Tensor::from_slice(idx);
            let x = images.f_index_select(0, &idx)?.f_to_device(device)?.f_to_kind(Kind::Float)?;
            let y = labels.f_index_select(0, &idx)?.f_to_device(device)?;
            let x = if cfg.hflip {
                let flip = Tensor::f_rand([idx.size()[0], 1, 1, 1], (Kind::Float, device))?.f_lt(0.5)?;
                x.f_flip([3])?.f_where_self(&flip, &x)?
            } else {
                x
            };
            let loss = net.logits(&x, true)?.cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                return Err(Error::Training(format!("classifier loss is {l} at step {step}")));
            }
            loss_sum += l;
            loss_n += 1;
            window += l;
            step += 1;
            if cfg.log_every > 0 && step % cfg.log_every == 0 {
                println!(
                    "  epoch {epoch} step {step}/{total_steps} loss {:.4} ({:.0} s)",
                    window / cfg.log_every as f64,
                    start.elapsed().as_secs_f64()
                );
                window = 0.0;
            }
        }
        let test_accuracy = if test_images.numel() > 0 {
            Some(net.accuracy(test_images, test_labels, cfg.eval_chunk as i64)?.0)
        } else {
            None
        };
        let rec = EpochRecord {
            epoch,
            train_loss: loss_sum / loss_n as f64,
            test_accuracy,
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        println!(
            "classifier: epoch {epoch}: train loss {:.4}, test accuracy {}, {:.0} s",
            rec.train_loss,
            test_accuracy.map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
            rec.elapsed_s
        );
        records.push(rec);
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let (test_accuracy, per_class_accuracy) = if test_images.numel() > 0 {
        net.accuracy(test_images, test_labels, cfg.eval_chunk as i64)?
    } else {
        (f64::NAN, vec![f64::NAN; cfg.model.num_classes as usize])
    };
    let report = ClassifierReport {
        test_accuracy,
        per_class_accuracy,
        test_images: test_images.size().first().copied().unwrap_or(0) as usize,
        train_images: n as usize,
        parameters,
        train_seconds,
        epochs: records,
    };
    Ok((vs, net, report))
}

/// Linear warm-up to `cfg.lr`, then cosine decay to 0 at `total` steps: a short schedule that
/// still ends in a well-settled minimum.
fn lr_at(cfg: &ClassifierTrainConfig, step: usize, total: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let t = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Saves the classifier's weights as safetensors, atomically (temporary file in the same folder,
/// then rename). `path` must end in `.safetensors`.
pub fn save_classifier(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(Error::Config(format!("{}: classifier weights must be saved as .safetensors", path.display())));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The temporary name keeps the extension: VarStore::save picks the format from it.
    let tmp = path.with_file_name(format!(".{name}.tmp-{}.safetensors", std::process::id()));
    let saved = vs.save(&tmp).map_err(Error::from).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    if saved.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    saved
}

/// Builds a [`Classifier`] with architecture `cfg` on `device` and loads safetensors weights
/// from `path` into it.
pub fn load_classifier(
    path: impl AsRef<Path>,
    cfg: &ClassifierConfig,
    device: Device,
) -> Result<(nn::VarStore, Classifier)> {
    let path = path.as_ref();
    let mut vs = nn::VarStore::new(device);
    let net = Classifier::new(vs.root(), cfg.clone());
    // Loading copies into the variables in place, which must not be recorded by autograd.
    tch::no_grad(|| vs.load(path)).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("cannot load classifier weights ({e}); do they match the architecture {cfg:?}?"),
    })?;
    Ok((vs, net))
}

/// Metadata stored next to classifier weights: how they were trained and how well they do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierInfo {
    /// Training configuration, including the architecture.
    pub train: ClassifierTrainConfig,
    /// Training seed.
    pub seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Accuracy on the held-out images: the full Fashion-MNIST test split (10,000 images) for the shipped
    /// classifier, the data's held-out part for one trained by `lisa classifier`.
    pub test_accuracy: f64,
    /// Per-class test accuracy (index = label).
    pub per_class_accuracy: Vec<f64>,
    /// Trainable parameters.
    pub parameters: i64,
    /// Training wall-clock seconds (including per-epoch evaluation), for reference: it depends on
    /// the machine and on whatever else ran on it.
    pub train_seconds: f64,
    /// libtorch intra-op threads used for training.
    pub threads: i32,
    /// Per-epoch record.
    pub history: Vec<EpochRecord>,
    /// What it was trained on, for a classifier trained by `lisa classifier` (absent for the shipped one,
    /// trained on the full Fashion-MNIST training split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ClassifierData>,
}

impl ClassifierInfo {
    /// The record of a classifier trained with `train` and `seed`, from its training `report`, with the
    /// data it was trained on (`None` for the shipped Fashion-MNIST classifier).
    pub fn from_report(
        train: ClassifierTrainConfig,
        seed: u64,
        report: ClassifierReport,
        data: Option<ClassifierData>,
    ) -> Self {
        Self {
            epochs: train.epochs,
            train,
            seed,
            test_accuracy: report.test_accuracy,
            per_class_accuracy: report.per_class_accuracy,
            parameters: report.parameters,
            train_seconds: report.train_seconds,
            threads: tch::get_num_threads(),
            history: report.epochs,
            data,
        }
    }
}

/// The data a classifier was trained on (see [`ClassifierInfo::data`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierData {
    /// The data configuration: the folder, its columns, channels, image size and held-out part.
    pub config: DataConfig,
    /// The class names, in the order of the class ids.
    pub class_names: Vec<String>,
    /// Training images.
    pub train_images: usize,
    /// Held-out images the accuracy was measured on.
    pub held_out_images: usize,
}

impl ClassifierInfo {
    /// Checks that the classifier takes the data's images (`channels`, square side `image_size`) and tells
    /// apart its `num_classes` classes; the error names the classifier folder `dir` and says what to do.
    pub fn check_fits(&self, dir: &Path, channels: i64, image_size: i64, num_classes: i64) -> Result<()> {
        let m = &self.train.model;
        if (m.in_channels, m.image_size, m.num_classes) != (channels, image_size, num_classes) {
            return Err(Error::Config(format!(
                "the classifier in {} takes {}-channel {}×{} images of {} classes but the data are {channels}-channel \
                 {image_size}×{image_size} images of {num_classes} classes; train one on this data with \
                 `lisa classifier --data DIR` (same data.channels and data.image_size)",
                dir.display(),
                m.in_channels,
                m.image_size,
                m.image_size,
                m.num_classes
            )));
        }
        Ok(())
    }
}

/// Loads a classifier folder written by `lisa classifier` (or [`train_shipped_classifier`]):
/// [`INFO_FILE`] for the architecture, then [`WEIGHTS_FILE`].
pub fn load_classifier_dir(dir: &Path, device: Device) -> Result<(nn::VarStore, Classifier, ClassifierInfo)> {
    let info_path = dir.join(INFO_FILE);
    if !info_path.is_file() {
        return Err(Error::Format {
            path: dir.to_path_buf(),
            msg: format!(
                "not a classifier folder (no {INFO_FILE}); give a folder written by `lisa classifier --data DIR \
                 --out FOLDER`"
            ),
        });
    }
    let text = std::fs::read_to_string(&info_path).map_err(|e| Error::io(&info_path, e))?;
    let info: ClassifierInfo = serde_json::from_str(&text).map_err(|e| {
        Error::format(&info_path, format!("{e}; write it again with `lisa classifier --data DIR --out FOLDER`"))
    })?;
    info.train.model.validate()?;
    let (vs, net) = load_classifier(dir.join(WEIGHTS_FILE), &info.train.model, device)?;
    Ok((vs, net, info))
}

/// Loads the shipped classifier ([`SHIPPED_WEIGHTS`], architecture from [`SHIPPED_INFO`]).
pub fn load_shipped(device: Device) -> Result<(nn::VarStore, Classifier, ClassifierInfo)> {
    let text = std::fs::read_to_string(SHIPPED_INFO).map_err(|e| Error::io(SHIPPED_INFO, e))?;
    let info: ClassifierInfo =
        serde_json::from_str(&text).map_err(|e| Error::format(SHIPPED_INFO, e.to_string()))?;
    let (vs, net) = load_classifier(SHIPPED_WEIGHTS, &info.train.model, device)?;
    Ok((vs, net, info))
}

/// Trains the shipped classifier on the full Fashion-MNIST training split with the default
/// [`ClassifierTrainConfig`] and [`SHIPPED_SEED`], evaluates on the full test split, and writes
/// `classifier.safetensors` and `classifier.json` into `dir`.
pub fn train_shipped_classifier(dir: impl AsRef<Path>) -> Result<ClassifierInfo> {
    let dir = dir.as_ref();
    let (train_x, train_y) = load_full_split(true)?;
    let (test_x, test_y) = load_full_split(false)?;
    let cfg = ClassifierTrainConfig::default();
    let (vs, _net, report) = train_classifier(&train_x, &train_y, &test_x, &test_y, &cfg, SHIPPED_SEED)?;
    let info = ClassifierInfo::from_report(cfg, SHIPPED_SEED, report, None);
    write_classifier_dir(dir, &vs, &info)?;
    Ok(info)
}

/// Writes [`WEIGHTS_FILE`] and [`INFO_FILE`] into `dir` (created if needed).
fn write_classifier_dir(dir: &Path, vs: &nn::VarStore, info: &ClassifierInfo) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    save_classifier(vs, dir.join(WEIGHTS_FILE))?;
    let json_path: PathBuf = dir.join(INFO_FILE);
    let json = serde_json::to_string_pretty(info).map_err(|e| Error::format(&json_path, e.to_string()))?;
    std::fs::write(&json_path, json + "\n").map_err(|e| Error::io(&json_path, e))
}

/// Configuration of `lisa classifier`: a classifier for the Fréchet distance on users' data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierRunConfig {
    /// Folder for [`WEIGHTS_FILE`] and [`INFO_FILE`]. Default `runs/classifier`.
    pub output_dir: PathBuf,
    /// CPU threads for libtorch (0 = libtorch's default). Default 0.
    pub threads: i32,
    /// Seed of the initialisation, data order, dropout and flips. Default 0.
    pub seed: u64,
    /// The labelled data: trained on its training part, measured on its held-out part (`data.eval_dataset` or
    /// `data.eval_fraction`), as `train` and `compare` split it. Classes must come from integer labels.
    pub data: DataConfig,
    /// The training; `train.model.in_channels`, `image_size` and `num_classes` are set from the data.
    /// Mirroring (`train.hflip`) is off by default here: not every kind of image may be mirrored.
    pub train: ClassifierTrainConfig,
}

impl Default for ClassifierRunConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/classifier"),
            threads: 0,
            seed: 0,
            data: DataConfig::default(),
            train: ClassifierTrainConfig { hflip: false, ..ClassifierTrainConfig::default() },
        }
    }
}

/// `lisa classifier`: trains a [`Classifier`] on the training part of `cfg.data` with the data's channels,
/// image size and class count, measures it on the held-out part, and writes [`WEIGHTS_FILE`] and
/// [`INFO_FILE`] (with the data it fits, [`ClassifierData`]) into `cfg.output_dir`.
pub fn train_data_classifier(cfg: &ClassifierRunConfig) -> Result<ClassifierInfo> {
    cfg.data.validate()?;
    if cfg.data.video.is_some() {
        return Err(Error::Config(
            "lisa classifier trains on images, not clips: remove data.video (a clip's frames are scored one by one \
             as grey images)"
                .into(),
        ));
    }
    // A classifier learns class ids: with a label column, a line's caption is not read (a line may carry both).
    let data = match cfg.data.label_column.is_empty() {
        false => DataConfig { caption_column: String::new(), ..cfg.data.clone() },
        true => cfg.data.clone(),
    };
    if data.is_imagefolder() {
        let dir = Path::new(&data.dataset);
        // Where lines have no label, say that the classes come from captions if they do.
        let records = crate::data::imagefolder::read_metadata_with(dir, &data.columns())
            .or_else(|e| crate::data::imagefolder::read_metadata_with(dir, &cfg.data.columns()).map_err(|_| e))?;
        if let Some(r) = records.first().filter(|r| matches!(r.target, crate::data::imagefolder::Target::Text(_))) {
            return Err(Error::Format {
                path: dir.join(crate::data::imagefolder::METADATA_FILE),
                msg: format!(
                    "line {}: the classes come from captions (`{}`), but lisa classifier needs class labels: give \
                     every line an integer `{}` (0, 1, 2, ...)",
                    r.line,
                    cfg.data.caption_column,
                    if cfg.data.label_column.is_empty() { "label" } else { cfg.data.label_column.as_str() }
                ),
            });
        }
    }
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    let train = data.load(false)?;
    let held_out = data.load(true)?;
    let mut tc = cfg.train.clone();
    tc.model.in_channels = train.channels();
    tc.model.image_size = train.image_size();
    tc.model.num_classes = train.num_classes;
    tc.model.validate()?;
    let (vs, _net, report) =
        train_classifier(&train.images, &train.labels, &held_out.images, &held_out.labels, &tc, cfg.seed)?;
    let info = ClassifierInfo::from_report(
        tc,
        cfg.seed,
        report,
        Some(ClassifierData {
            config: data.clone(),
            class_names: train.class_names.clone(),
            train_images: train.len(),
            held_out_images: held_out.len(),
        }),
    );
    write_classifier_dir(&cfg.output_dir, &vs, &info)?;
    Ok(info)
}

/// The full Fashion-MNIST train (`true`) or test split from the Debian package, as
/// `([N, 1, 32, 32] f32 in [-1, 1], [N] i64)`. The shipped classifier must not be trained on the
/// embedded subset, so there is deliberately no fallback.
fn load_full_split(train: bool) -> Result<(Tensor, Tensor)> {
    let source = Source::Debian(PathBuf::from(fashion_mnist::DEBIAN_DIR));
    let split = if train { Split::Train } else { Split::Test };
    let ds = fashion_mnist::load(&source, split)?;
    Ok((ds.images, ds.labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_batched_inference_agree() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ClassifierConfig { channels: [4, 8, 8], feature_dim: 16, dropout: 0.5, ..Default::default() };
        let net = Classifier::new(vs.root(), cfg);
        let x = Tensor::rand([5, 1, 32, 32], (Kind::Float, Device::Cpu)) * 2 - 1;
        let logits = tch::no_grad(|| net.logits(&x, false)).unwrap();
        assert_eq!(logits.size(), [5, 10]);
        assert_eq!(net.features(&x).unwrap().size(), [5, 16]);
        // Chunking must not change inference results (batch norm uses running stats).
        let chunked = net.logits_batched(&x, 2).unwrap();
        assert!(chunked.allclose(&logits, 1e-5, 1e-5, false));
        assert_eq!(net.features_batched(&x, 3).unwrap().size(), [5, 16]);
        assert!(net.logits(&Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu)), false).is_err());
    }

    #[test]
    fn colour_and_other_sizes_and_class_counts_and_the_fit_check() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ClassifierConfig {
            channels: [4, 8, 8],
            feature_dim: 16,
            in_channels: 3,
            image_size: 16,
            num_classes: 3,
            ..Default::default()
        };
        let net = Classifier::new(vs.root(), cfg.clone());
        let x = Tensor::rand([5, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2 - 1;
        assert_eq!(net.logits_batched(&x, 2).unwrap().size(), [5, 3]);
        assert_eq!(net.features_batched(&x, 2).unwrap().size(), [5, 16]);
        let err = net.features(&Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
        assert!(err.contains("expected images [N, 3, 16, 16]"), "{err}");
        let (acc, per_class) = net.accuracy(&x, &Tensor::from_slice(&[0i64, 1, 2, 0, 1]), 5).unwrap();
        assert!((0.0..=1.0).contains(&acc) && per_class.len() == 3);
        assert!(ClassifierConfig { image_size: 4, ..cfg.clone() }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at least 8×8"));
        assert!(ClassifierConfig { in_channels: 2, ..cfg.clone() }.validate().is_err());
        // The shipped classifier's metadata has none of the new fields: grey 32×32 images of 10 classes.
        let shipped: ClassifierInfo = serde_json::from_str(&std::fs::read_to_string(SHIPPED_INFO).unwrap()).unwrap();
        assert_eq!((shipped.train.model.in_channels, shipped.train.model.image_size), (1, 32));
        assert_eq!((shipped.train.model.num_classes, shipped.data.is_none()), (10, true));
        shipped.check_fits(Path::new("shipped"), 1, 32, 10).unwrap();
        let err = shipped.check_fits(Path::new("c"), 3, 32, 10).unwrap_err().to_string();
        assert!(
            err.contains("the classifier in c takes 1-channel 32×32 images of 10 classes but the data are 3-channel"),
            "{err}"
        );
        assert!(err.contains("lisa classifier --data DIR") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn tiny_training_learns_and_weights_round_trip() {
        // Two trivially separable classes: dark vs bright images.
        let n = 64;
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
        let x = (labels.to_kind(Kind::Float) * 1.6 - 0.8).view([n, 1, 1, 1]).expand([n, 1, 32, 32], false)
            + Tensor::randn([n, 1, 32, 32], (Kind::Float, Device::Cpu)) * 0.1;
        let cfg = ClassifierTrainConfig {
            model: ClassifierConfig { channels: [4, 8, 8], feature_dim: 16, dropout: 0.0, ..Default::default() },
            epochs: 3,
            batch_size: 16,
            lr: 1e-2,
            warmup_steps: 2,
            log_every: 0,
            ..Default::default()
        };
        let (vs, net, report) = train_classifier(&x, &labels, &x, &labels, &cfg, 3).unwrap();
        assert!(report.test_accuracy > 0.95, "{report:?}");
        assert_eq!(report.per_class_accuracy.len(), 10);
        assert!(report.per_class_accuracy[5].is_nan());
        assert_eq!(report.epochs.len(), 3);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        save_classifier(&vs, &path).unwrap();
        let (_vs2, net2) = load_classifier(&path, &cfg.model, Device::Cpu).unwrap();
        let (a, b) = (net.logits_batched(&x, 64).unwrap(), net2.logits_batched(&x, 64).unwrap());
        assert!(a.allclose(&b, 1e-6, 1e-6, false));
        // A different architecture is a clear checkpoint error naming the file.
        let other = ClassifierConfig { feature_dim: 8, ..cfg.model.clone() };
        let err = load_classifier(&path, &other, Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("c.safetensors"), "{err}");
    }

    #[test]
    fn shipped_classifier_is_accurate() {
        let (_vs, net, info) = load_shipped(Device::Cpu).unwrap();
        // The first 1,000 test images from the Debian package, or else the embedded class-balanced
        // 1,000-image test subset (also test images, never seen in training).
        let source = Source::auto();
        let what = match source {
            Source::Debian(_) => "the first 1,000 test images",
            Source::Embedded => "the embedded 1,000-image test subset (Debian dataset not installed)",
        };
        let test = fashion_mnist::load(&source, Split::Test).unwrap();
        let n = test.len().min(1000) as i64;
        let (acc, _) = net.accuracy(&test.images.narrow(0, 0, n), &test.labels.narrow(0, 0, n), 500).unwrap();
        println!(
            "shipped classifier: {:.2}% on {what} (full test split when trained: {:.2}%)",
            100.0 * acc,
            100.0 * info.test_accuracy
        );
        assert!(acc >= 0.85, "accuracy {acc}");
    }

    /// Trains the shipped classifier and overwrites `assets/`:
    /// `cargo test --lib eval::classifier::tests::train_shipped -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn train_shipped() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
        let info = train_shipped_classifier(&dir).unwrap();
        println!("{}", serde_json::to_string_pretty(&info).unwrap());
        assert!(info.test_accuracy >= 0.9, "test accuracy {}", info.test_accuracy);
    }
}
