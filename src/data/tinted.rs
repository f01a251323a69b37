//! A colour imagefolder made from Fashion-MNIST: every item tinted with a colour of its own, written in the
//! Hugging Face convention that diffusers' ControlNet datasets use (`metadata.jsonl` lines with `image`,
//! `conditioning_image`, `text` and `label`), with the item's foreground mask as its condition image. It is
//! the colour data the "Your own data" path is demonstrated and tested on: the project's own images, in the
//! shape users bring theirs.
use std::io::Write;
use std::path::Path;

use super::conditions::{ConditionKind, GrayImage};
use super::fashion_mnist::{self, Source, Split, CLASS_NAMES};
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// What [`write_tinted_folder`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct TintedFolder {
    /// Images written (and lines of `metadata.jsonl`).
    pub images: usize,
    /// Per class, how many.
    pub per_class: Vec<usize>,
}

/// The colour of item `i` under `seed`: a random hue at full saturation, scaled so that its luminance (ITU-R
/// BT.601, as the condition extractors read colour images) is at least 0.5, so that every tinted item keeps
/// the contrast its grey original has against the black background.
pub fn tint(seed: u64, i: u64) -> [f32; 3] {
    let mut rng = SplitMix64::new(crate::rng::derive_seed(seed, i));
    let h = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 6.0;
    let x = (1.0 - (h % 2.0 - 1.0).abs()) as f32;
    let rgb = match h as u32 {
        0 => [1.0, x, 0.0],
        1 => [x, 1.0, 0.0],
        2 => [0.0, 1.0, x],
        3 => [0.0, x, 1.0],
        4 => [x, 0.0, 1.0],
        _ => [1.0, 0.0, x],
    };
    let lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
    // Lift dark hues (pure blue has luminance 0.114) towards white until the luminance reaches 0.5.
    let lift = ((0.5 - lum) / (1.0 - lum)).max(0.0);
    rgb.map(|c| c + (1.0 - c) * lift)
}

/// Writes `count` items of Fashion-MNIST's `split` (the first ones, balanced over classes: the split's order
/// is shuffled by `seed` first) into `out` as tinted colour PNGs `NNNNN.png` with their masks
/// `NNNNN_mask.png` and a `metadata.jsonl` whose lines carry both a caption (`text`: the class name) and a
/// `label`. Refuses a folder that already has a `metadata.jsonl`.
pub fn write_tinted_folder(out: &Path, source: &Source, split: Split, count: usize, seed: u64) -> Result<TintedFolder> {
    let meta_path = out.join("metadata.jsonl");
    if meta_path.exists() {
        return Err(Error::Config(format!(
            "{} already exists; give an empty or new folder to write the tinted imagefolder into",
            meta_path.display()
        )));
    }
    // 32×32, the 28×28 items padded black, as every Fashion-MNIST run reads them.
    let data = fashion_mnist::load(source, split)?;
    let (n, side) = (data.len(), data.image_size() as usize);
    let pixels: Vec<f32> = Vec::try_from(data.images.flatten(0, -1))?;
    let labels: Vec<i64> = Vec::try_from(&data.labels)?;
    if count == 0 || count > n {
        return Err(Error::Config(format!("--count must be in 1..={n} (the split's images), got {count}")));
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    order.truncate(count);
    order.sort_unstable();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (w, h) = (side, side);
    let mut lines = Vec::with_capacity(count);
    let mut per_class = vec![0usize; CLASS_NAMES.len()];
    for (k, &i) in order.iter().enumerate() {
        let item = &pixels[i * w * h..(i + 1) * w * h];
        let grey = GrayImage { width: w, height: h, data: item.iter().map(|&p| (p + 1.0) * 0.5).collect() };
        let colour = tint(seed, i as u64);
        let rgb = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let v = grey.get(x as usize, y as usize);
            image::Rgb(colour.map(|c| (c * v * 255.0).round() as u8))
        });
        let mask = ConditionKind::Mask.extract(&grey);
        let mask = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
            image::Luma([(mask.get(x as usize, y as usize) * 255.0).round() as u8])
        });
        let (name, mask_name) = (format!("{k:05}.png"), format!("{k:05}_mask.png"));
        for (img, file) in [(image::DynamicImage::from(rgb), &name), (image::DynamicImage::from(mask), &mask_name)] {
            let path = out.join(file);
            img.save(&path).map_err(|e| Error::format(&path, e.to_string()))?;
        }
        let label = labels[i] as usize;
        per_class[label] += 1;
        lines.push(serde_json::json!({
            "image": name, "conditioning_image": mask_name, "text": CLASS_NAMES[label], "label": label,
        }));
    }
    // The metadata last, so that an interrupted write leaves no folder that looks complete.
    let tmp = out.join("metadata.jsonl.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for l in &lines {
        writeln!(f, "{l}").map_err(|e| Error::io(&tmp, e))?;
    }
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &meta_path).map_err(|e| Error::io(&meta_path, e))?;
    Ok(TintedFolder { images: count, per_class })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tints_are_bright_enough_and_differ() {
        let tints: Vec<[f32; 3]> = (0..200).map(|i| tint(7, i)).collect();
        for t in &tints {
            let lum = 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2];
            assert!(lum >= 0.5 - 1e-6 && t.iter().all(|c| (0.0..=1.0).contains(c)), "{t:?}");
        }
        assert!(tints.iter().any(|t| t[0] > t[1] + 0.3) && tints.iter().any(|t| t[2] > t[0] + 0.3), "varied hues");
        assert_eq!(tint(7, 3), tint(7, 3));
    }

    #[test]
    fn writes_a_colour_imagefolder_that_loads_with_its_masks() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tinted");
        let wrote = write_tinted_folder(&out, &Source::Embedded, Split::Test, 20, 1).unwrap();
        assert_eq!((wrote.images, wrote.per_class.iter().sum::<usize>()), (20, 20));
        let cols = super::super::imagefolder::Columns { caption: String::new(), ..Default::default() };
        let opts = super::super::imagefolder::LoadOptions { channels: 3, columns: cols, ..Default::default() };
        let ds = super::super::imagefolder::load_with(&out, &opts).unwrap();
        assert_eq!(ds.images.size(), [20, 3, 32, 32]);
        // The masks are the grey originals' masks, binary.
        let c = ds.conditioning.unwrap();
        assert_eq!(c.size(), [20, 3, 32, 32]);
        let v: Vec<f32> = Vec::try_from(c.flatten(0, -1)).unwrap();
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.0));
        // Colour: the channels of a tinted item differ.
        let img = image::open(out.join("00000.png")).unwrap().to_rgb8();
        assert!(img.pixels().any(|p| p[0] != p[1] || p[1] != p[2]));
        let e = write_tinted_folder(&out, &Source::Embedded, Split::Test, 5, 1).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }
}
