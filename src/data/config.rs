//! Which data a run trains on, as configured (`[data]` of every training config), and loading it.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{fashion_mnist, imagefolder, Dataset};
use crate::{Error, Result};

/// Which data to train on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `fashion-mnist`, or the path of an imagefolder with `metadata.jsonl`. Default `fashion-mnist`.
    pub dataset: String,
    /// Fashion-MNIST only: `auto` (the Debian package if installed, else the embedded subset),
    /// `embedded`, `debian`, or a folder holding the four IDX files. Default `auto`.
    pub source: String,
    /// Use only the first N training examples (0 = all). Default 0.
    pub max_examples: usize,
    /// Imagefolder only: 1 (grey) or 3 (RGB) channels; colour images read as grey are converted with a
    /// note. A pretrained main network's `in_channels` / `out_channels` follow it. Default 1.
    pub channels: i64,
    /// Imagefolder only: channels of the condition images (`condition = "given"`), 1 (grey) or 3 (RGB);
    /// 0 = as `channels`. Colour condition images read as grey are converted with a note. Default 0.
    pub conditioning_channels: i64,
    /// Imagefolder only: images are resized and padded to this square size. Default 32.
    pub image_size: u32,
    /// Imagefolder only: the `metadata.jsonl` key holding the image's file name. Default `image`.
    pub image_column: String,
    /// Imagefolder only: the key holding the condition image's file name (`condition = "given"`). Default
    /// `conditioning_image`.
    pub conditioning_image_column: String,
    /// Imagefolder only: the key holding the class as a caption / class name; `""` = not read (a line that
    /// has both a caption and a label then uses the label). Default `text`.
    pub caption_column: String,
    /// Imagefolder only: the key holding the class as an integer id; `""` = not read (a line that has both
    /// then uses the caption). Default `label`.
    pub label_column: String,
    /// Imagefolder only: accept files that lie outside the dataset folder once symbolic links are followed
    /// (refused by default, like a `..` path). Default false.
    pub follow_symlinks: bool,
    /// Imagefolder only: a second imagefolder (same columns; e.g. `test/` beside `train/`) that is the
    /// held-out set: what `train` / `compare` sample, score and take as the Fréchet reference. Empty = hold
    /// out `eval_fraction` of `dataset` instead. Default empty.
    pub eval_dataset: String,
    /// Imagefolder without `eval_dataset` only: the fraction of the folder's images held out from training
    /// as the held-out set, chosen by a hash of each image's file name (the same images every run). Default 0.1.
    pub eval_fraction: f64,
    /// Moving Fashion-MNIST: clips made of the dataset's images (frames as channels). Default none (images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video: Option<crate::data::video::MovingConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: "fashion-mnist".into(),
            source: "auto".into(),
            max_examples: 0,
            channels: 1,
            conditioning_channels: 0,
            image_size: 32,
            image_column: "image".into(),
            conditioning_image_column: "conditioning_image".into(),
            caption_column: "text".into(),
            label_column: "label".into(),
            follow_symlinks: false,
            eval_dataset: String::new(),
            eval_fraction: 0.1,
            video: None,
        }
    }
}

impl DataConfig {
    /// Whether the data is an imagefolder (not Fashion-MNIST).
    pub fn is_imagefolder(&self) -> bool {
        self.dataset != "fashion-mnist"
    }

    /// The imagefolder columns as configured.
    pub fn columns(&self) -> imagefolder::Columns {
        imagefolder::Columns {
            image: self.image_column.clone(),
            conditioning_image: self.conditioning_image_column.clone(),
            caption: self.caption_column.clone(),
            label: self.label_column.clone(),
        }
    }

    /// Rejects imagefolder settings that cannot work, before anything is read.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(Error::Config(format!(
                "data.eval_fraction must be in [0, 1) (the share of the images held out), got {}",
                self.eval_fraction
            )));
        }
        if ![0, 1, 3].contains(&self.conditioning_channels) {
            return Err(Error::Config(format!(
                "data.conditioning_channels must be 1 (grey), 3 (RGB) or 0 (as data.channels), got {}",
                self.conditioning_channels
            )));
        }
        if self.is_imagefolder() {
            self.columns().validate()?;
        } else {
            let d = DataConfig::default();
            let unused: Vec<&str> = [
                ("data.channels", self.channels != d.channels),
                ("data.conditioning_channels", self.conditioning_channels != d.conditioning_channels),
                ("data.image_size", self.image_size != d.image_size),
                ("data.image_column", self.image_column != d.image_column),
                ("data.conditioning_image_column", self.conditioning_image_column != d.conditioning_image_column),
                ("data.caption_column", self.caption_column != d.caption_column),
                ("data.label_column", self.label_column != d.label_column),
                ("data.follow_symlinks", self.follow_symlinks != d.follow_symlinks),
                ("data.eval_dataset", self.eval_dataset != d.eval_dataset),
                ("data.eval_fraction", self.eval_fraction != d.eval_fraction),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            if !unused.is_empty() {
                return Err(Error::Config(format!(
                    "{} applies only to an imagefolder (data.dataset = a folder with metadata.jsonl), and the data is \
                     Fashion-MNIST (grey 28×28 images padded to 32×32, its own test split held out); remove it, or \
                     set data.dataset to your folder",
                    unused.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The configuration as its dataset uses it: on an imagefolder, the Fashion-MNIST-only `source` at its
    /// default, so that a run started from a Fashion-MNIST configuration (e.g. `configs/main-network.toml`,
    /// which reads the Debian copy) does not record a setting its folder never used.
    pub fn as_applied(&self) -> DataConfig {
        if self.is_imagefolder() {
            DataConfig { source: DataConfig::default().source, ..self.clone() }
        } else {
            self.clone()
        }
    }

    /// What the held-out set is, for a run's summary: `None` for Fashion-MNIST (its test split).
    pub fn held_out_description(&self) -> Option<String> {
        if !self.is_imagefolder() {
            return None;
        }
        Some(if self.eval_dataset.is_empty() {
            format!(
                "a held-out fraction (data.eval_fraction = {}) of the images of {}, chosen by file name and excluded \
                 from training",
                self.eval_fraction, self.dataset
            )
        } else {
            format!("the imagefolder {} (data.eval_dataset)", self.eval_dataset)
        })
    }

    /// Refuses a training split of `examples` examples smaller than a batch of `batch_size`, saying where the
    /// other images went when an imagefolder's held-out fraction took them.
    pub fn check_training_size(&self, examples: usize, batch_size: usize) -> Result<()> {
        if examples >= batch_size {
            return Ok(());
        }
        let split = if self.is_imagefolder() && self.eval_dataset.is_empty() {
            format!(
                "the training split of {} has {examples} example(s) once data.eval_fraction = {} of its images (chosen \
                 by file name) is held out for evaluation, fewer than train.batch_size = {batch_size}; lower \
                 train.batch_size, add images, or give the held-out images as a separate folder (data.eval_dataset) \
                 so that every image of this one trains",
                self.dataset, self.eval_fraction
            )
        } else {
            format!(
                "the dataset has {examples} examples, fewer than train.batch_size = {batch_size}; lower \
                 train.batch_size or add data"
            )
        };
        Err(Error::Config(split))
    }

    /// Loads the training split, or with `test` the held-out set: Fashion-MNIST's test split; for an
    /// imagefolder `eval_dataset`, or else the `eval_fraction` of the folder that training never sees.
    pub fn load(&self, test: bool) -> Result<Dataset> {
        self.validate()?;
        let data = if self.dataset == "fashion-mnist" {
            let source = match self.source.as_str() {
                "auto" => fashion_mnist::Source::auto(),
                "embedded" => fashion_mnist::Source::Embedded,
                "debian" => fashion_mnist::Source::Debian(PathBuf::from(fashion_mnist::DEBIAN_DIR)),
                folder if std::path::Path::new(folder).is_dir() => fashion_mnist::Source::Debian(PathBuf::from(folder)),
                other => {
                    return Err(Error::Config(format!(
                    "data.source '{other}': use auto, embedded, debian or a folder holding the Fashion-MNIST IDX files"
                )))
                }
            };
            let split = if test { fashion_mnist::Split::Test } else { fashion_mnist::Split::Train };
            fashion_mnist::load(&source, split)?
        } else {
            let dir = std::path::Path::new(&self.dataset);
            let opts = imagefolder::LoadOptions {
                size: self.image_size,
                channels: self.channels,
                conditioning_channels: self.conditioning_channels,
                columns: self.columns(),
                follow_symlinks: self.follow_symlinks,
                class_names: None,
                part: imagefolder::Part::All,
            };
            match (test, self.eval_dataset.is_empty()) {
                (false, true) => imagefolder::load_with(
                    dir,
                    &imagefolder::LoadOptions { part: imagefolder::Part::Train(self.eval_fraction), ..opts },
                )?,
                (false, false) => imagefolder::load_with(dir, &opts)?,
                (true, true) => imagefolder::load_with(
                    dir,
                    &imagefolder::LoadOptions { part: imagefolder::Part::HeldOut(self.eval_fraction), ..opts },
                )?,
                (true, false) => {
                    // Numbered as the training folder numbers its classes.
                    let names = imagefolder::class_names(dir, &opts.columns)?;
                    let eval_dir = std::path::Path::new(&self.eval_dataset);
                    imagefolder::load_with(eval_dir, &imagefolder::LoadOptions { class_names: Some(names), ..opts })?
                }
            }
        };
        let data = if self.max_examples > 0 && data.len() > self.max_examples {
            let idx: Vec<i64> = (0..self.max_examples as i64).collect();
            data.subset(&idx)?
        } else {
            data
        };
        match &self.video {
            None => Ok(data),
            Some(v) => crate::data::video::clips_dataset(&data, v, test),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eval_dataset_is_the_held_out_set_numbered_by_the_training_folder_classes() {
        let root = tempfile::tempdir().unwrap();
        let (train, test) = (root.path().join("train"), root.path().join("test"));
        for (dir, names) in [(&train, &["bag", "coat", "shoe"][..]), (&test, &["shoe", "bag"][..])] {
            std::fs::create_dir_all(dir).unwrap();
            let mut lines = vec![];
            for (i, n) in names.iter().enumerate() {
                let img = image::GrayImage::from_pixel(4, 4, image::Luma([i as u8 * 50]));
                img.save(dir.join(format!("{i}.png"))).unwrap();
                lines.push(format!(r#"{{"image": "{i}.png", "text": "{n}"}}"#));
            }
            std::fs::write(dir.join("metadata.jsonl"), lines.join("\n")).unwrap();
        }
        let cfg = DataConfig {
            dataset: train.display().to_string(),
            eval_dataset: test.display().to_string(),
            image_size: 4,
            ..Default::default()
        };
        assert_eq!(cfg.load(false).unwrap().len(), 3, "with an eval_dataset the whole folder trains");
        let held = cfg.load(true).unwrap();
        assert_eq!(held.class_names, ["bag", "coat", "shoe"]);
        assert_eq!(Vec::<i64>::try_from(&held.labels).unwrap(), [2, 0]);
        assert!(cfg.held_out_description().unwrap().contains("data.eval_dataset"));
        std::fs::write(test.join("metadata.jsonl"), r#"{"image": "0.png", "text": "hat"}"#).unwrap();
        let e = cfg.load(true).unwrap_err().to_string();
        assert!(e.contains("\"hat\" is not one of the training folder's classes (bag, coat, shoe)"), "{e}");
        assert_eq!(DataConfig::default().held_out_description(), None);
        let bad = DataConfig { eval_fraction: 1.0, ..Default::default() };
        assert!(bad.load(false).unwrap_err().to_string().contains("data.eval_fraction must be in [0, 1)"));
    }

    #[test]
    fn a_setting_that_cannot_apply_is_refused_or_left_unrecorded() {
        let fm = DataConfig { image_size: 64, eval_fraction: 0.2, ..DataConfig::default() };
        let e = fm.validate().unwrap_err().to_string();
        assert!(e.contains("data.image_size, data.eval_fraction applies only to an imagefolder"), "{e}");
        assert!(DataConfig::default().validate().is_ok());
        // A Fashion-MNIST configuration's `source` is not recorded for a folder that never read it.
        let folder = DataConfig { dataset: "my-folder".into(), source: "debian".into(), ..DataConfig::default() };
        assert_eq!(folder.as_applied(), DataConfig { source: "auto".into(), ..folder.clone() });
        let debian = DataConfig { source: "debian".into(), ..DataConfig::default() };
        assert_eq!(debian.as_applied(), debian);
    }

    #[test]
    fn a_training_split_smaller_than_a_batch_says_where_the_held_out_images_went() {
        let folder = DataConfig { dataset: "two-images".into(), ..DataConfig::default() };
        let e = folder.check_training_size(1, 2).unwrap_err().to_string();
        assert!(e.contains("has 1 example(s) once data.eval_fraction = 0.1") && e.contains("data.eval_dataset"), "{e}");
        assert!(folder.check_training_size(2, 2).is_ok());
        let e = DataConfig::default().check_training_size(3, 4).unwrap_err().to_string();
        assert!(e.contains("the dataset has 3 examples, fewer than train.batch_size = 4"), "{e}");
    }
}
