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
    /// Imagefolder only: 1 (grey) or 3 (RGB) channels. Default 1.
    pub channels: i64,
    /// Imagefolder only: images are resized and padded to this square size. Default 32.
    pub image_size: u32,
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
            image_size: 32,
            video: None,
        }
    }
}

impl DataConfig {
    /// Loads the training split (or, for Fashion-MNIST, the `test` split when `test` is true).
    pub fn load(&self, test: bool) -> Result<Dataset> {
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
            imagefolder::load(std::path::Path::new(&self.dataset), self.image_size, self.channels)?
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
