//! A small CNN classifier for Fashion-MNIST (`[N, 1, 32, 32]` in [-1, 1]). It serves two
//! evaluation purposes: its predictions measure whether samples are recognisable (and of the
//! requested class), and its penultimate activations are the feature space of the Fréchet
//! distance in [`super::frechet`].
//!
//! Architecture: three 3×3 conv → batch-norm → ReLU → 2×2 max-pool stages (32 → 16 → 8 → 4
//! pixels), flatten, a linear layer to `feature_dim` with ReLU (the features), dropout, and a
//! linear layer to the class logits. Pooling after every stage keeps a training epoch on 60,000
//! images to about a minute on two CPU cores.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::fashion_mnist::{self, Source, Split};
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Image side length the classifier accepts (Fashion-MNIST padded from 28 to 32).
pub const IMAGE_SIZE: i64 = 32;

/// Number of Fashion-MNIST classes.
pub const NUM_CLASSES: i64 = 10;

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
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self { channels: [32, 64, 128], feature_dim: 128, dropout: 0.3 }
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
        let mut c_in = 1;
        for (i, &c_out) in cfg.channels.iter().enumerate() {
            let conv = nn::conv2d(&p / format!("conv{i}"), c_in, c_out, 3, conv_cfg);
            let bn = nn::batch_norm2d(&p / format!("bn{i}"), c_out, Default::default());
            convs.push((conv, bn));
            c_in = c_out;
        }
        // Three 2× poolings take 32×32 down to 4×4.
        let flat = c_in * (IMAGE_SIZE / 8) * (IMAGE_SIZE / 8);
        let fc = nn::linear(&p / "fc", flat, cfg.feature_dim, Default::default());
        let head = nn::linear(&p / "head", cfg.feature_dim, NUM_CLASSES, Default::default());
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
        check_images(x)?;
        let mut h = x.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
        for (conv, bn) in &self.convs {
            h = bn.forward_t(&conv.forward_t(&h, train), train).f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        }
        Ok(h.f_flatten(1, -1)?.apply(&self.fc).f_relu()?)
    }

    /// Class logits `[N, 10]` for `x` (`[N, 1, 32, 32]` in [-1, 1]); `train` enables dropout and
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
        let mut per_class = Vec::with_capacity(NUM_CLASSES as usize);
        for c in 0..NUM_CLASSES {
            let mask = labels.f_eq(c)?.f_to_kind(Kind::Double)?;
            let count = mask.f_sum(Kind::Double)?.double_value(&[]);
            let hits = correct.f_mul(&mask)?.f_sum(Kind::Double)?.double_value(&[]);
            per_class.push(if count > 0.0 { hits / count } else { f64::NAN });
        }
        Ok((overall, per_class))
    }

    fn batched(&self, x: &Tensor, chunk: i64, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        check_images(x)?;
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

/// Rejects inputs that are not `[N, 1, 32, 32]`, with the shape in the message.
fn check_images(x: &Tensor) -> Result<()> {
    let s = x.size();
    if s.len() != 4 || s[1] != 1 || s[2] != IMAGE_SIZE || s[3] != IMAGE_SIZE {
        return Err(Error::Config(format!(
            "classifier: expected images [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}], got shape {s:?}"
        )));
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

/// Trains a [`Classifier`] on `images` (`[N, 1, 32, 32]` in [-1, 1]) and `labels` (`[N]`
/// classes 0–9) and evaluates it on the test set after every epoch, printing progress.
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
    check_images(images)?;
    let n = images.size()[0];
    if labels.size() != [n] || n == 0 {
        return Err(Error::Config(format!(
            "train_classifier: {n} images but labels of shape {:?}",
            labels.size()
        )));
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
        (f64::NAN, vec![f64::NAN; NUM_CLASSES as usize])
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
    /// Accuracy on the full Fashion-MNIST test split (10,000 images).
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
    let info = ClassifierInfo {
        train: cfg.clone(),
        seed: SHIPPED_SEED,
        epochs: cfg.epochs,
        test_accuracy: report.test_accuracy,
        per_class_accuracy: report.per_class_accuracy,
        parameters: report.parameters,
        train_seconds: report.train_seconds,
        threads: tch::get_num_threads(),
        history: report.epochs,
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    save_classifier(&vs, dir.join("classifier.safetensors"))?;
    let json_path: PathBuf = dir.join("classifier.json");
    let json = serde_json::to_string_pretty(&info).map_err(|e| Error::format(&json_path, e.to_string()))?;
    std::fs::write(&json_path, json + "\n").map_err(|e| Error::io(&json_path, e))?;
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
        let cfg = ClassifierConfig { channels: [4, 8, 8], feature_dim: 16, dropout: 0.5 };
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
    fn tiny_training_learns_and_weights_round_trip() {
        // Two trivially separable classes: dark vs bright images.
        let n = 64;
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
        let x = (labels.to_kind(Kind::Float) * 1.6 - 0.8).view([n, 1, 1, 1]).expand([n, 1, 32, 32], false)
            + Tensor::randn([n, 1, 32, 32], (Kind::Float, Device::Cpu)) * 0.1;
        let cfg = ClassifierTrainConfig {
            model: ClassifierConfig { channels: [4, 8, 8], feature_dim: 16, dropout: 0.0 },
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
