//! IDX files (the MNIST / Fashion-MNIST container): a big-endian `u32` magic whose low byte is the
//! number of dimensions and whose third byte is the element type (`0x08` = `u8`), one big-endian
//! `u32` per dimension, then the raw elements. Files starting with the gzip magic `1f 8b` are
//! decompressed transparently, so the `.gz` files distributed upstream and by Debian read as is.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::{Error, Result};

/// Magic number of an IDX file of `u8` images `[n, rows, cols]`.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of `u8` labels `[n]`.
pub const LABELS_MAGIC: u32 = 0x0000_0801;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A stack of `u8` images as stored in an IDX file, row-major `[count, rows, cols]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows (height) of each image.
    pub rows: usize,
    /// Columns (width) of each image.
    pub cols: usize,
    /// `count * rows * cols` pixels, image after image, row after row.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i` (`rows * cols` bytes). Panics if `i >= count`, like slice indexing.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    gunzip_if_needed(raw, path)
}

fn gunzip_if_needed(raw: Vec<u8>, name: &Path) -> Result<Vec<u8>> {
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    GzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| Error::format(name, format!("corrupt gzip stream: {e}")))?;
    Ok(out)
}

/// Parses the header, checks magic and payload length, and returns `(dims, payload)`.
fn parse(bytes: &[u8], name: &Path, magic: u32, what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let ndims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    if bytes.len() < 4 {
        return Err(Error::format(
            name,
            format!(
                "truncated header: expected at least 4 bytes, found {}",
                bytes.len()
            ),
        ));
    }
    let found = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if found != magic {
        // The low byte is the rank; saying both helps tell "labels passed as images" apart from garbage.
        return Err(Error::format(
            name,
            format!("wrong IDX magic 0x{found:08x}: expected 0x{magic:08x} ({what}, u8, {ndims} dimensions)"),
        ));
    }
    if bytes.len() < header_len {
        return Err(Error::format(
            name,
            format!(
                "truncated header: expected {header_len} bytes, found {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::format(name, format!("dimensions {dims:?} overflow")))?;
    let payload = &bytes[header_len..];
    if payload.len() < expected {
        return Err(Error::format(
            name,
            format!(
                "truncated: expected {expected} {what} bytes, found {}",
                payload.len()
            ),
        ));
    }
    if payload.len() > expected {
        return Err(Error::format(
            name,
            format!(
                "trailing bytes: expected {expected} {what} bytes, found {}",
                payload.len()
            ),
        ));
    }
    Ok((dims, payload.to_vec()))
}

/// Decodes an IDX image file held in memory (plain or gzipped); `name` is used in error messages.
pub fn images_from_bytes(bytes: &[u8], name: impl AsRef<Path>) -> Result<IdxImages> {
    let name = name.as_ref();
    let bytes = gunzip_if_needed(bytes.to_vec(), name)?;
    let (dims, pixels) = parse(&bytes, name, IMAGES_MAGIC, "pixel")?;
    Ok(IdxImages {
        count: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Decodes an IDX label file held in memory (plain or gzipped); `name` is used in error messages.
pub fn labels_from_bytes(bytes: &[u8], name: impl AsRef<Path>) -> Result<Vec<u8>> {
    let name = name.as_ref();
    let bytes = gunzip_if_needed(bytes.to_vec(), name)?;
    Ok(parse(&bytes, name, LABELS_MAGIC, "label")?.1)
}

/// Reads an IDX image file (plain or gzipped).
pub fn read_images(path: impl AsRef<Path>) -> Result<IdxImages> {
    let path = path.as_ref();
    let bytes = read_maybe_gz(path)?;
    let (dims, pixels) = parse(&bytes, path, IMAGES_MAGIC, "pixel")?;
    Ok(IdxImages {
        count: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Reads an IDX label file (plain or gzipped).
pub fn read_labels(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let bytes = read_maybe_gz(path)?;
    Ok(parse(&bytes, path, LABELS_MAGIC, "label")?.1)
}

fn encode(magic: u32, dims: &[usize], payload: &[u8], gzip: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + payload.len());
    out.extend_from_slice(&magic.to_be_bytes());
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(payload);
    if !gzip {
        return out;
    }
    // GzEncoder writes mtime 0 and no file name, so the output depends only on the contents.
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(&out).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

fn check_u32(name: &Path, dims: &[usize]) -> Result<()> {
    if dims.iter().any(|&d| d > u32::MAX as usize) {
        return Err(Error::format(
            name,
            format!("dimensions {dims:?} do not fit IDX's u32 fields"),
        ));
    }
    Ok(())
}

/// Encodes images as IDX bytes, gzipped when `gzip` is true.
pub fn encode_images(images: &IdxImages, gzip: bool) -> Result<Vec<u8>> {
    let dims = [images.count, images.rows, images.cols];
    let name = PathBuf::from("<images>");
    check_u32(&name, &dims)?;
    if images.pixels.len() != images.count * images.rows * images.cols {
        return Err(Error::format(
            name,
            format!(
                "{} pixels do not match [{}, {}, {}]",
                images.pixels.len(),
                images.count,
                images.rows,
                images.cols
            ),
        ));
    }
    Ok(encode(IMAGES_MAGIC, &dims, &images.pixels, gzip))
}

/// Encodes labels as IDX bytes, gzipped when `gzip` is true.
pub fn encode_labels(labels: &[u8], gzip: bool) -> Result<Vec<u8>> {
    check_u32(Path::new("<labels>"), &[labels.len()])?;
    Ok(encode(LABELS_MAGIC, &[labels.len()], labels, gzip))
}

/// Writes images to an IDX file, gzipped when `gzip` is true.
pub fn write_images(path: impl AsRef<Path>, images: &IdxImages, gzip: bool) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_images(images, gzip).map_err(|e| match e {
        Error::Format { msg, .. } => Error::format(path, msg),
        e => e,
    })?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes labels to an IDX file, gzipped when `gzip` is true.
pub fn write_labels(path: impl AsRef<Path>, labels: &[u8], gzip: bool) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_labels(labels, gzip)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IdxImages {
        IdxImages {
            count: 3,
            rows: 4,
            cols: 5,
            pixels: (0..60).map(|i| (i * 7 % 256) as u8).collect(),
        }
    }

    #[test]
    fn round_trip_plain_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = sample();
        let labels = vec![9u8, 0, 3];
        for gz in [false, true] {
            let ip = dir.path().join(format!("i{gz}"));
            let lp = dir.path().join(format!("l{gz}"));
            write_images(&ip, &imgs, gz).unwrap();
            write_labels(&lp, &labels, gz).unwrap();
            let raw = std::fs::read(&ip).unwrap();
            assert_eq!(raw.starts_with(&GZIP_MAGIC), gz);
            assert_eq!(read_images(&ip).unwrap(), imgs);
            assert_eq!(read_labels(&lp).unwrap(), labels);
            assert_eq!(images_from_bytes(&raw, "x").unwrap(), imgs);
        }
        // Gzip output is deterministic (no timestamp), which the committed subset relies on.
        assert_eq!(
            encode_images(&imgs, true).unwrap(),
            encode_images(&imgs, true).unwrap()
        );
        assert_eq!(imgs.image(1), &imgs.pixels[20..40]);
    }

    #[test]
    fn wrong_magic_is_an_error() {
        let labels = encode_labels(&[1, 2], false).unwrap();
        let err = images_from_bytes(&labels, "/d/labels.idx")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/d/labels.idx: wrong IDX magic 0x00000801"),
            "{err}"
        );
        let err = labels_from_bytes(b"\x00\x00", "/d/short")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/d/short: truncated header"), "{err}");
    }

    #[test]
    fn truncated_and_trailing_are_errors() {
        let mut bytes = encode_images(&sample(), false).unwrap();
        bytes.truncate(bytes.len() - 10);
        let err = images_from_bytes(&bytes, "/d/train-images-idx3-ubyte")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/d/train-images-idx3-ubyte: truncated: expected 60 pixel bytes, found 50"
        );
        let mut bytes = encode_labels(&[1, 2, 3], false).unwrap();
        bytes.push(0);
        let err = labels_from_bytes(&bytes, "/d/l").unwrap_err().to_string();
        assert_eq!(err, "/d/l: trailing bytes: expected 3 label bytes, found 4");
        // Truncation inside a gzip stream is reported too, naming the file.
        let gz = encode_images(&sample(), true).unwrap();
        let err = images_from_bytes(&gz[..gz.len() / 2], "/d/x.gz")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/d/x.gz: "), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_images("/nonexistent/dir/f.gz")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/dir/f.gz: "), "{err}");
    }
}
