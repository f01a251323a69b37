//! Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017; MIT licence, Zalando SE): 28×28 grey garments in
//! 10 classes, 60,000 train / 10,000 test. Read from the Debian package `dataset-fashion-mnist`
//! when installed, otherwise from a small class-balanced subset embedded in the binary
//! (`assets/fashion-mnist-subset/`: the first 400 train and 100 test images of each class, in
//! file order), so that everything works with nothing installed.
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::idx::{self, IdxImages};
use super::{u8_images_to_tensor, Dataset, IMAGE_SIZE};
use crate::{Error, Result};

/// Where the Debian package `dataset-fashion-mnist` installs the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// The class names, indexed by label.
pub const CLASS_NAMES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Train images per class in the embedded subset.
pub const SUBSET_TRAIN_PER_CLASS: usize = 400;
/// Test images per class in the embedded subset.
pub const SUBSET_TEST_PER_CLASS: usize = 100;

const EMBEDDED_TRAIN_IMAGES: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/fashion-mnist-subset/train-images-idx3-ubyte.gz"));
const EMBEDDED_TRAIN_LABELS: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/fashion-mnist-subset/train-labels-idx1-ubyte.gz"));
const EMBEDDED_TEST_IMAGES: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/fashion-mnist-subset/t10k-images-idx3-ubyte.gz"));
const EMBEDDED_TEST_LABELS: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/fashion-mnist-subset/t10k-labels-idx1-ubyte.gz"));

/// Where to read Fashion-MNIST from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A folder holding the four upstream files `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`
    /// (plain, un-gzipped files with the same names minus `.gz` are accepted too).
    Debian(PathBuf),
    /// The class-balanced subset compiled into the binary (4,000 train / 1,000 test images).
    Embedded,
}

impl Source {
    /// The Debian package's folder if all four files are there, else the embedded subset.
    pub fn auto() -> Source {
        let dir = PathBuf::from(DEBIAN_DIR);
        if [Split::Train, Split::Test]
            .iter()
            .all(|s| file(&dir, s.prefix(), "images-idx3").is_some() && file(&dir, s.prefix(), "labels-idx1").is_some())
        {
            Source::Debian(dir)
        } else {
            Source::Embedded
        }
    }
}

/// Which half of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training set (60,000 images; 4,000 embedded).
    Train,
    /// The test set (10,000 images; 1,000 embedded).
    Test,
}

impl Split {
    fn prefix(&self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// The existing file `{prefix}-{kind}-ubyte[.gz]` in `dir`, preferring the gzipped name.
fn file(dir: &Path, prefix: &str, kind: &str) -> Option<PathBuf> {
    let gz = dir.join(format!("{prefix}-{kind}-ubyte.gz"));
    let plain = dir.join(format!("{prefix}-{kind}-ubyte"));
    [gz, plain].into_iter().find(|p| p.is_file())
}

/// Raw images and labels of a split, as stored (28×28 `u8`, labels `0..10`), validated.
pub fn load_raw(source: &Source, split: Split) -> Result<(IdxImages, Vec<u8>)> {
    let (images, labels, name, label_name) = match source {
        Source::Debian(dir) => {
            let find = |kind: &str| {
                file(dir, split.prefix(), kind).ok_or_else(|| {
                    let p = dir.join(format!("{}-{kind}-ubyte.gz", split.prefix()));
                    Error::format(p, "Fashion-MNIST file not found (install the Debian package dataset-fashion-mnist, or use the embedded subset)")
                })
            };
            let (ip, lp) = (find("images-idx3")?, find("labels-idx1")?);
            (idx::read_images(&ip).map_err(damaged)?, idx::read_labels(&lp).map_err(damaged)?, ip, lp)
        }
        Source::Embedded => {
            let (ib, lb) = match split {
                Split::Train => (EMBEDDED_TRAIN_IMAGES, EMBEDDED_TRAIN_LABELS),
                Split::Test => (EMBEDDED_TEST_IMAGES, EMBEDDED_TEST_LABELS),
            };
            let name = format!("<embedded>/fashion-mnist-subset/{}", split.prefix());
            let (ip, lp) = (
                PathBuf::from(format!("{name}-images-idx3-ubyte.gz")),
                PathBuf::from(format!("{name}-labels-idx1-ubyte.gz")),
            );
            (idx::images_from_bytes(ib, &ip)?, idx::labels_from_bytes(lb, &lp)?, ip, lp)
        }
    };
    if images.count == 0 {
        return Err(Error::format(name, "holds no images; give the folder of the full Fashion-MNIST files"));
    }
    if images.count != labels.len() {
        return Err(Error::format(
            name,
            format!(
                "{} images but {} labels in {}; the two files must belong to the same split",
                images.count,
                labels.len(),
                label_name.display()
            ),
        ));
    }
    if (images.rows, images.cols) != (28, 28) {
        return Err(Error::format(
            name,
            format!(
                "images are {}x{}, expected 28x28; this is not a Fashion-MNIST image file",
                images.rows, images.cols
            ),
        ));
    }
    if let Some((i, bad)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= NUM_CLASSES) {
        return Err(Error::format(
            label_name,
            format!("label {bad} (entry {i}) out of range 0..{NUM_CLASSES}; this is not a Fashion-MNIST label file"),
        ));
    }
    Ok((images, labels))
}

/// Adds what to do to an IDX file's format error.
fn damaged(e: Error) -> Error {
    match e {
        Error::Format { path, msg } => Error::Format {
            path,
            msg: format!(
                "{msg}; replace it with an intact copy (reinstall dataset-fashion-mnist or download it again)"
            ),
        },
        e => e,
    }
}

/// Loads a split as a [`Dataset`]: `f32 [N, 1, 32, 32]` in `[-1, 1]` (the 28×28 images padded
/// by 2 black pixels on each side), labels `i64 [N]`, 10 classes, no conditioning.
pub fn load(source: &Source, split: Split) -> Result<Dataset> {
    let (images, labels) = load_raw(source, split)?;
    let x = u8_images_to_tensor(&images.pixels, images.count, images.rows, images.cols, IMAGE_SIZE as usize)?;
    let y: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Ok(Dataset {
        images: x,
        labels: Tensor::from_slice(&y),
        num_classes: NUM_CLASSES as i64,
        class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        conditioning: None,
    })
}

/// The first `per_class` examples of each class, kept in file order.
pub fn balanced_subset(images: &IdxImages, labels: &[u8], per_class: usize) -> (IdxImages, Vec<u8>) {
    let mut taken = [0usize; 256];
    let mut pixels = Vec::new();
    let mut out_labels = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if taken[l as usize] < per_class {
            taken[l as usize] += 1;
            pixels.extend_from_slice(images.image(i));
            out_labels.push(l);
        }
    }
    (IdxImages { count: out_labels.len(), rows: images.rows, cols: images.cols, pixels }, out_labels)
}

/// Recreates the embedded subset from full Fashion-MNIST files in `source_dir` into `out_dir`
/// (the four gzipped IDX files; `LICENSE` and `README.md` there are maintained by hand).
pub fn write_subset(source_dir: &Path, out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let source = Source::Debian(source_dir.to_path_buf());
    for (split, per_class) in [(Split::Train, SUBSET_TRAIN_PER_CLASS), (Split::Test, SUBSET_TEST_PER_CLASS)] {
        let (images, labels) = load_raw(&source, split)?;
        let (si, sl) = balanced_subset(&images, &labels, per_class);
        if sl.len() != per_class * NUM_CLASSES {
            return Err(Error::format(
                source_dir,
                format!("{:?} split has only {} images for a {per_class}-per-class subset", split, sl.len()),
            ));
        }
        idx::write_images(out_dir.join(format!("{}-images-idx3-ubyte.gz", split.prefix())), &si, true)?;
        idx::write_labels(out_dir.join(format!("{}-labels-idx1-ubyte.gz", split.prefix())), &sl, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debian() -> Option<PathBuf> {
        match Source::auto() {
            Source::Debian(d) => Some(d),
            Source::Embedded => {
                eprintln!("note: {DEBIAN_DIR} not installed (Debian package dataset-fashion-mnist); skipping");
                None
            }
        }
    }

    #[test]
    fn embedded_subset_is_balanced() {
        let (imgs, labels) = load_raw(&Source::Embedded, Split::Train).unwrap();
        assert_eq!((imgs.count, imgs.rows, imgs.cols), (4000, 28, 28));
        for c in 0..10u8 {
            assert_eq!(labels.iter().filter(|&&l| l == c).count(), 400);
        }
        let ds = load(&Source::Embedded, Split::Test).unwrap();
        assert_eq!(ds.images.size(), [1000, 1, 32, 32]);
        assert_eq!(ds.labels.size(), [1000]);
        assert_eq!(ds.class_names[9], "Ankle boot");
        assert_eq!(ds.images.double_value(&[0, 0, 0, 0]), -1.0);
        assert!(ds.images.max().double_value(&[]) <= 1.0 && ds.images.min().double_value(&[]) >= -1.0);
        // The first train labels of the full set are 9,0,0,3,0,2,7,2,5,5, and all ten classes are
        // still short of 400 there, so the subset starts the same way.
        assert_eq!(&labels[..10], &[9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
    }

    #[test]
    fn debian_first_labels() {
        let Some(dir) = debian() else { return };
        let source = Source::Debian(dir);
        let (imgs, labels) = load_raw(&source, Split::Train).unwrap();
        assert_eq!((imgs.count, labels.len()), (60000, 60000));
        assert_eq!(&labels[..10], &[9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
        let test = load(&source, Split::Test).unwrap();
        assert_eq!(test.images.size(), [10000, 1, 32, 32]);
    }

    #[test]
    fn committed_subset_matches_generator() {
        let Some(dir) = debian() else { return };
        let out = tempfile::tempdir().unwrap();
        write_subset(&dir, out.path()).unwrap();
        let fresh = Source::Debian(out.path().to_path_buf());
        for split in [Split::Train, Split::Test] {
            assert_eq!(load_raw(&fresh, split).unwrap(), load_raw(&Source::Embedded, split).unwrap());
        }
    }

    /// Regenerates `assets/fashion-mnist-subset/` from the Debian files:
    /// `cargo test --lib regenerate_embedded_subset -- --ignored`.
    #[test]
    #[ignore]
    fn regenerate_embedded_subset() {
        let dir = debian().expect("the Debian package dataset-fashion-mnist is needed");
        write_subset(&dir, &Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/fashion-mnist-subset")).unwrap();
    }
}
