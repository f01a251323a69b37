//! Data: datasets as tensors ready for training, the readers that produce them (IDX /
//! Fashion-MNIST, Hugging Face imagefolder), condition extractors, and a resumable batch order.
//!
//! Every dataset ends up as a [`Dataset`]: images `f32 [N, C, S, S]` in `[-1, 1]` (the range the
//! diffusion models work in), labels `i64 [N]`, and optionally user-supplied condition images
//! `f32 [N, C, S, S]` in `[0, 1]` (the range ControlNet condition encoders expect).
pub mod conditions;
pub mod config;
pub mod fashion_mnist;
pub mod idx;
pub mod imagefolder;
pub mod loader;
pub mod row_file;
pub mod tinted;
pub mod video;

pub use conditions::{ConditionKind, ConditionSet, GrayImage};
pub use config::DataConfig;
pub use loader::{DataOrder, DataOrderState};

use image::{DynamicImage, GenericImageView};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Side length, in pixels, of the square images the models are trained on.
pub const IMAGE_SIZE: i64 = 32;

/// A labelled image dataset held as tensors (on the CPU unless moved).
#[derive(Debug)]
pub struct Dataset {
    /// Images, `f32 [N, C, S, S]`, scaled to `[-1, 1]` (black = -1).
    pub images: Tensor,
    /// Class ids, `i64 [N]`, in `0..num_classes`.
    pub labels: Tensor,
    /// Number of classes.
    pub num_classes: i64,
    /// Human-readable class names, `num_classes` of them.
    pub class_names: Vec<String>,
    /// User-supplied condition images, `f32 [N, C, S, S]` in `[0, 1]`, if the dataset has them.
    pub conditioning: Option<Tensor>,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.images.size()[0] as usize
    }

    /// Whether the dataset has no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of image channels (1 or 3).
    pub fn channels(&self) -> i64 {
        self.images.size()[1]
    }

    /// Side length of the (square) images.
    pub fn image_size(&self) -> i64 {
        self.images.size()[2]
    }

    /// A new dataset made of the examples at `indices` (copied), keeping classes and names.
    pub fn subset(&self, indices: &[i64]) -> Result<Dataset> {
        let (images, labels, conditioning) = self.batch(indices)?;
        Ok(Dataset {
            images,
            labels,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            conditioning,
        })
    }

    /// The same dataset with its tensors on `device`.
    pub fn to_device(self, device: tch::Device) -> Dataset {
        Dataset {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
            conditioning: self.conditioning.map(|c| c.to_device(device)),
            ..self
        }
    }

    /// The examples at `indices`: `(images, labels, conditioning)`, gathered with `index_select`.
    ///
    /// Out-of-range indices are an error rather than a libtorch abort.
    pub fn batch(&self, indices: &[i64]) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let n = self.len() as i64;
        if let Some(&bad) = indices.iter().find(|&&i| i < 0 || i >= n) {
            return Err(Error::Config(format!(
                "dataset index {bad} out of range 0..{n}"
            )));
        }
        let idx = Tensor::from_slice(indices).to_device(self.images.device());
        let images = self.images.f_index_select(0, &idx)?;
        let labels = self
            .labels
            .f_index_select(0, &idx.to_device(self.labels.device()))?;
        let conditioning = match &self.conditioning {
            Some(c) => Some(c.f_index_select(0, &idx.to_device(c.device()))?),
            None => None,
        };
        Ok((images, labels, conditioning))
    }
}

/// What the training loop reads: a fixed number of examples, gathered a batch at a time by index. A
/// [`Dataset`] holds them in memory; a reader of examples kept on disk reads only the batch's.
pub trait TrainingExamples {
    /// Number of examples.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `indices`: `(images, labels, conditioning)` on the training device; an index out of
    /// range is an error.
    fn batch(&self, indices: &[i64]) -> Result<(Tensor, Tensor, Option<Tensor>)>;

    /// The first example (0-based) whose image or condition holds a NaN or an infinite value: `(what, index,
    /// how many such examples)`, `what` being `image` or `condition image`; `None` when all are finite.
    fn first_non_finite(&self) -> Result<Option<(&'static str, i64, i64)>>;
}

/// The first row of `t` [N, ...] holding a non-finite value, and the number of such rows.
pub(crate) fn first_non_finite_row(t: &Tensor) -> Result<Option<(i64, i64)>> {
    let bad = t.f_isfinite()?.f_logical_not()?.f_flatten(1, -1)?.f_any_dim(1, false)?.f_nonzero()?;
    let n = bad.size()[0];
    Ok((n > 0).then(|| (bad.int64_value(&[0, 0]), n)))
}

impl TrainingExamples for Dataset {
    fn len(&self) -> usize {
        Dataset::len(self)
    }

    fn batch(&self, indices: &[i64]) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        Dataset::batch(self, indices)
    }

    fn first_non_finite(&self) -> Result<Option<(&'static str, i64, i64)>> {
        for (what, t) in [("image", Some(&self.images)), ("condition image", self.conditioning.as_ref())] {
            if let Some((i, n)) = t.map(first_non_finite_row).transpose()?.flatten() {
                return Ok(Some((what, i, n)));
            }
        }
        Ok(None)
    }
}

/// Resizes `img` so that its longer side is `size` pixels, keeping the aspect ratio, then pads it
/// with black to a centred `size × size` square. The filter is bilinear, widened when shrinking so
/// that it averages over the covered area (the `image` crate's `Triangle`).
pub fn to_square(img: &DynamicImage, size: u32) -> DynamicImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || size == 0 {
        return DynamicImage::new(size, size, img.color());
    }
    // Round the shorter side, but never to zero, so very thin images keep one row/column.
    let (nw, nh) = if w >= h {
        (
            size,
            ((h as f64 * size as f64 / w as f64).round() as u32).clamp(1, size),
        )
    } else {
        (
            ((w as f64 * size as f64 / h as f64).round() as u32).clamp(1, size),
            size,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        img.resize_exact(nw, nh, image::imageops::FilterType::Triangle)
    };
    if (nw, nh) == (size, size) {
        return resized;
    }
    let mut out = DynamicImage::new(size, size, resized.color());
    image::imageops::overlay(
        &mut out,
        &resized,
        ((size - nw) / 2) as i64,
        ((size - nh) / 2) as i64,
    );
    out
}

/// Converts `u8` images `[n, rows, cols]` (one channel) to `f32 [n, 1, size, size]` in `[-1, 1]`,
/// zero-padding each image centred to `size` (black background becomes -1).
pub(crate) fn u8_images_to_tensor(
    pixels: &[u8],
    n: usize,
    rows: usize,
    cols: usize,
    size: usize,
) -> Result<Tensor> {
    if rows > size || cols > size || pixels.len() != n * rows * cols {
        return Err(Error::Config(format!(
            "cannot place {n} images of {rows}x{cols} ({} bytes) into {size}x{size}",
            pixels.len()
        )));
    }
    let (top, left) = ((size - rows) / 2, (size - cols) / 2);
    let mut padded = vec![0u8; n * size * size];
    for i in 0..n {
        for r in 0..rows {
            let src = &pixels[(i * rows + r) * cols..][..cols];
            padded[(i * size + top + r) * size + left..][..cols].copy_from_slice(src);
        }
    }
    let t = Tensor::from_slice(&padded).view([n as i64, 1, size as i64, size as i64]);
    Ok(t.to_kind(Kind::Float) / 127.5 - 1.0)
}

/// Converts an image to `f32 [channels, H, W]` in `[0, 1]` (`channels` is 1 = grey or 3 = RGB).
pub(crate) fn image_to_unit_tensor(img: &DynamicImage, channels: i64) -> Tensor {
    let (w, h) = img.dimensions();
    let (data, c) = match channels {
        1 => (img.to_luma8().into_raw(), 1),
        _ => (img.to_rgb8().into_raw(), 3),
    };
    // Interleaved HWC bytes -> planar CHW floats.
    Tensor::from_slice(&data)
        .view([h as i64, w as i64, c])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_square_keeps_aspect_and_centres() {
        let img =
            DynamicImage::ImageLuma8(image::GrayImage::from_pixel(64, 32, image::Luma([200])));
        let sq = to_square(&img, 32).to_luma8();
        assert_eq!(sq.dimensions(), (32, 32));
        // 64x32 -> 32x16, placed at rows 8..24.
        assert_eq!(sq.get_pixel(16, 7)[0], 0);
        assert_eq!(sq.get_pixel(16, 8)[0], 200);
        assert_eq!(sq.get_pixel(16, 23)[0], 200);
        assert_eq!(sq.get_pixel(16, 24)[0], 0);
        let tall =
            DynamicImage::ImageRgb8(image::RgbImage::from_pixel(10, 40, image::Rgb([9, 8, 7])));
        let sq = to_square(&tall, 32).to_rgb8();
        assert_eq!(sq.get_pixel(15, 0).0, [9, 8, 7]);
        assert_eq!(sq.get_pixel(0, 16).0, [0, 0, 0]);
    }

    #[test]
    fn padding_and_batches() {
        let pixels: Vec<u8> = (0..3 * 28 * 28)
            .map(|i| if i % 784 == 0 { 0 } else { 255 })
            .collect();
        let t = u8_images_to_tensor(&pixels, 3, 28, 28, 32).unwrap();
        assert_eq!(t.size(), [3, 1, 32, 32]);
        assert_eq!(t.double_value(&[0, 0, 0, 0]), -1.0);
        assert_eq!(t.double_value(&[0, 0, 2, 2]), -1.0); // first pixel of the 28x28 image
        assert_eq!(t.double_value(&[0, 0, 2, 3]), 1.0);
        assert_eq!(t.double_value(&[1, 0, 29, 29]), 1.0);
        assert_eq!(t.double_value(&[1, 0, 30, 29]), -1.0);
        let ds = Dataset {
            images: t,
            labels: Tensor::from_slice(&[4i64, 5, 6]),
            num_classes: 10,
            class_names: (0..10).map(|i| i.to_string()).collect(),
            conditioning: Some(Tensor::zeros(
                [3, 1, 32, 32],
                (Kind::Float, tch::Device::Cpu),
            )),
        };
        let (x, y, c) = ds.batch(&[2, 0]).unwrap();
        assert_eq!(x.size(), [2, 1, 32, 32]);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), [6, 4]);
        assert_eq!(c.unwrap().size(), [2, 1, 32, 32]);
        let sub = ds.subset(&[1]).unwrap();
        assert_eq!((sub.len(), sub.channels(), sub.image_size()), (1, 1, 32));
        assert!(ds.batch(&[3]).is_err());
    }
}
