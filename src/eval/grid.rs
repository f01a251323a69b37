//! PNG output of images in [-1, 1]: single images and tiled grids, written atomically so that a
//! crash or a concurrent reader never sees a half-written file.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Grey level (in [-1, 1]) of the gaps between tiles: white, so that tiles stay distinguishable
/// from Fashion-MNIST's black background.
const PAD_VALUE: f64 = 1.0;

/// Tiles `images` (`[N, C, H, W]`, values in [-1, 1], `C` = 1 or 3) into one `[C, H', W']` `u8`
/// image with `nrow` tiles per row, `padding` pixels between and around tiles, and each image
/// upscaled `scale`× by nearest neighbour (so that 32×32 samples are viewable). Values outside
/// [-1, 1] are clamped. Any other channel count is a clip (frames as channels): each becomes a strip
/// of its grey frames, so a grid of clips has `nrow · C` tiles per row.
pub fn make_grid(images: &Tensor, nrow: usize, padding: usize, scale: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.size4().map_err(|_| {
        Error::Config(format!("make_grid: expected images [N, C, H, W], got shape {:?}", images.size()))
    })?;
    if c != 1 && c != 3 && c > 0 {
        return make_grid(&images.f_reshape([n * c, 1, h, w])?, nrow * c as usize, padding, scale);
    }
    if n == 0 || nrow == 0 || scale == 0 {
        return Err(Error::Config(format!(
            "make_grid: need at least one image, nrow ≥ 1 and scale ≥ 1 (got N = {n}, nrow = {nrow}, scale = {scale})"
        )));
    }
    let (pad, s) = (padding as i64, scale as i64);
    let ncol = (nrow as i64).min(n);
    let nrows = (n + ncol - 1) / ncol;
    let (th, tw) = (h * s, w * s);
    let x = tch::no_grad(|| -> Result<Tensor> {
        let x = images.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_clamp(-1.0, 1.0)?;
        // Nearest-neighbour upscaling is exactly a repeat of each row and column.
        let x = if s > 1 {
            x.f_repeat_interleave_self_int(s, 2, None)?.f_repeat_interleave_self_int(s, 3, None)?
        } else {
            x
        };
        let canvas = Tensor::f_full(
            [c, pad + nrows * (th + pad), pad + ncol * (tw + pad)],
            PAD_VALUE,
            (Kind::Float, Device::Cpu),
        )?;
        for i in 0..n {
            let (r, col) = (i / ncol, i % ncol);
            let top = pad + r * (th + pad);
            let left = pad + col * (tw + pad);
            canvas.f_narrow(1, top, th)?.f_narrow(2, left, tw)?.f_copy_(&x.get(i))?;
        }
        // Round to nearest rather than truncate so that -1 → 0 and 1 → 255 exactly.
        Ok(canvas.f_add_scalar(1.0)?.f_mul_scalar(127.5)?.f_round()?.f_to_kind(Kind::Uint8)?)
    })?;
    Ok(x)
}

/// Writes `images` (`[N, C, H, W]` in [-1, 1], `C` = 1 or 3) as one PNG grid with `nrow` images
/// per row and `padding` pixels between them, at native resolution. See [`save_grid_scaled`].
pub fn save_grid(images: &Tensor, nrow: usize, padding: usize, path: impl AsRef<Path>) -> Result<()> {
    save_grid_scaled(images, nrow, padding, 1, path)
}

/// Like [`save_grid`], with each image upscaled `scale`× (nearest neighbour) before tiling.
pub fn save_grid_scaled(
    images: &Tensor,
    nrow: usize,
    padding: usize,
    scale: usize,
    path: impl AsRef<Path>,
) -> Result<()> {
    let grid = make_grid(images, nrow, padding, scale)?;
    write_png(&grid, path.as_ref())
}

/// Writes one image (`[C, H, W]` or `[1, C, H, W]` in [-1, 1], `C` = 1 or 3) as a PNG, upscaled
/// `scale`× by nearest neighbour, without any border.
pub fn save_image(image: &Tensor, scale: usize, path: impl AsRef<Path>) -> Result<()> {
    let image = match image.dim() {
        3 => image.unsqueeze(0),
        4 if image.size()[0] == 1 => image.shallow_clone(),
        _ => {
            return Err(Error::Config(format!(
                "save_image: expected [C, H, W] or [1, C, H, W], got shape {:?}",
                image.size()
            )))
        }
    };
    save_grid_scaled(&image, 1, 0, scale, path)
}

/// The name of a sample folder's index file (one JSON object per image, as an imagefolder's).
pub const SAMPLE_METADATA: &str = "metadata.jsonl";

/// Refuses a sample folder that is a file or holds anything (see [`save_sample_folder`]): checked before
/// sampling, so that a refused folder costs nothing.
pub fn check_sample_folder(dir: &Path) -> Result<()> {
    if dir.is_file() {
        return Err(Error::Config(format!("{} is a file; give a new or empty folder for the samples", dir.display())));
    }
    if dir.is_dir() && std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.next().is_some() {
        return Err(Error::Config(format!(
            "{} is not empty; give a new or empty folder for the samples (nothing in it is overwritten)",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes each of `images` (`[N, C, H, W]` in [-1, 1], `C` = 1 or 3) as its own PNG, `dir/00000.png` …, and
/// `dir/metadata.jsonl` with one line per image: `{"image": "00000.png"}` merged with `fields[i]` (e.g. its
/// label and condition). The folder reads back as an imagefolder (`data.dataset = dir`) when the fields hold
/// a `label`. `dir` must be new or empty: nothing of the user's is overwritten.
pub fn save_sample_folder(
    images: &Tensor,
    fields: &[serde_json::Map<String, serde_json::Value>],
    dir: &Path,
) -> Result<()> {
    let n = images.size().first().copied().unwrap_or(0);
    if n != fields.len() as i64 {
        return Err(Error::Config(format!("{n} images but {} metadata rows", fields.len())));
    }
    check_sample_folder(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut lines = String::new();
    for (i, extra) in fields.iter().enumerate() {
        let name = format!("{i:05}.png");
        save_image(&images.get(i as i64), 1, dir.join(&name))?;
        let mut line = serde_json::Map::new();
        line.insert("image".into(), name.into());
        line.extend(extra.clone());
        lines += &serde_json::Value::Object(line).to_string();
        lines.push('\n');
    }
    crate::weights::write_atomic(&dir.join(SAMPLE_METADATA), lines.as_bytes())
}

/// Encodes a `[C, H, W]` `u8` tensor as PNG at `path` via a temporary file in the same folder
/// (a rename within one filesystem is atomic).
fn write_png(img: &Tensor, path: &Path) -> Result<()> {
    let (c, h, w) = img.size3()?;
    let color = if c == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb };
    let data = Vec::<u8>::try_from(&img.f_permute([1, 2, 0])?.f_contiguous()?.f_flatten(0, -1)?)?;
    write_png_bytes(&data, w as u32, h as u32, color, path)
}

/// Encodes 8-bit pixel rows `data` (`color` Grayscale or Rgb) as a PNG and writes it atomically: a temporary
/// file in the target's folder, synced, then renamed (a rename within one filesystem is atomic).
pub(crate) fn write_png_bytes(data: &[u8], width: u32, height: u32, color: png::ColorType, path: &Path) -> Result<()> {
    // Encoding into memory first keeps encoder errors apart from I/O errors on the target.
    let mut encoded = Vec::new();
    {
        let fail = |e: png::EncodingError| Error::format(path, format!("PNG encoding: {e}"));
        let mut enc = png::Encoder::new(&mut encoded, width, height);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(fail)?;
        writer.write_image_data(data).map_err(fail)?;
        writer.finish().map_err(fail)?;
    }
    // The rename below would replace whatever is there: a device, a pipe or a folder is not ours to replace.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Error::format(path, "exists and is not a regular file; give the path of a PNG file to write"));
    }
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&encoded)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// `dir/.name.tmp-<pid>-<n>`: hidden, in the target's folder, distinct per process and per call (two threads
/// may write images at once).
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four 2×3 greyscale images with constant values -1, -1/3, 1/3, 1.
    fn constant_images() -> Tensor {
        let v = Tensor::from_slice(&[-1.0f32, -1.0 / 3.0, 1.0 / 3.0, 1.0]);
        v.view([4, 1, 1, 1]).expand([4, 1, 2, 3], false).contiguous()
    }

    #[test]
    fn grid_has_expected_size_and_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        // 4 images, 3 per row → 2 rows; scale 2 → tiles 4×6; padding 1.
        save_grid_scaled(&constant_images(), 3, 1, 2, &path).unwrap();
        let img = image::open(&path).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (1 + 3 * (6 + 1), 1 + 2 * (4 + 1)));
        assert_eq!(img.get_pixel(0, 0)[0], 255, "padding is white");
        assert_eq!(img.get_pixel(1, 1)[0], 0, "image 0 is -1 → 0");
        assert_eq!(img.get_pixel(6, 4)[0], 0, "bottom-right of image 0");
        assert_eq!(img.get_pixel(7, 1)[0], 255, "gap between tiles");
        assert_eq!(img.get_pixel(8, 1)[0], 85, "image 1 is -1/3 → 85");
        assert_eq!(img.get_pixel(15, 1)[0], 170, "image 2 is 1/3 → 170");
        assert_eq!(img.get_pixel(1, 6)[0], 255, "image 3 (second row) is 1 → 255");
        // The unused last tile slot stays padding.
        assert_eq!(img.get_pixel(10, 6)[0], 255);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rgb_image_round_trips_and_clamps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        // Channel values -2 (clamped to -1), 0, 5 (clamped to 1).
        let x = Tensor::from_slice(&[-2.0f32, 0.0, 5.0]).view([3, 1, 1]).expand([3, 2, 2], false);
        save_image(&x, 3, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (6, 6));
        assert_eq!(img.get_pixel(5, 5).0, [0, 128, 255]);
    }

    #[test]
    fn unwritable_path_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-folder").join("grid.png");
        let err = save_grid(&constant_images(), 2, 0, &path).unwrap_err();
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }

    #[test]
    fn bad_shapes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        assert!(save_grid(&Tensor::zeros([0, 1, 4, 4], (Kind::Float, Device::Cpu)), 1, 0, &path).is_err());
        assert!(save_grid(&Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)), 1, 0, &path).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn clips_become_strips_of_frames() {
        // Two clips of two 4×4 frames, one clip per row: frame f of clip i is filled with i·2 + f (scaled).
        let clips =
            Tensor::arange(4, (Kind::Float, Device::Cpu)).view([2, 2, 1, 1]).expand([2, 2, 4, 4], false) / 2.0 - 1.0;
        let g = make_grid(&clips, 1, 1, 1).unwrap();
        assert_eq!(g.size(), [1, 1 + 2 * 5, 1 + 2 * 5]);
        let at = |r: i64, c: i64| g.int64_value(&[0, 1 + 5 * r, 1 + 5 * c]);
        assert_eq!([at(0, 0), at(0, 1), at(1, 0), at(1, 1)], [0, 64, 128, 191]);
    }
}
