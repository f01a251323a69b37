//! Users' own data in the Hugging Face `imagefolder` / diffusers ControlNet convention: a folder
//! with a `metadata.jsonl` whose lines are JSON objects such as
//! `{"image": "a.png", "conditioning_image": "a_edges.png", "text": "sneaker"}`.
//!
//! `image` (a file name relative to the folder) is required; `conditioning_image` is optional but
//! must then be on every line; the class is either `text` (a string; classes are the sorted
//! distinct texts) or `label` (a non-negative integer, used as is; `num_classes` = max + 1), and
//! all lines must use the same one. Blank lines are skipped.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::Tensor;

use super::{image_to_unit_tensor, to_square, Dataset};
use crate::{Error, Result};

/// The metadata file name inside the folder.
pub const METADATA_FILE: &str = "metadata.jsonl";

/// Class ids must be below this (`num_classes` = the largest id + 1 sizes the label embedding).
pub const MAX_CLASSES: i64 = 100_000;

/// The largest `image_size` accepted (images are held in memory as `f32` tensors of that size).
pub const MAX_IMAGE_SIZE: u32 = 1024;

/// The class of one record, as written in the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A caption / class name (`"text"`).
    Text(String),
    /// An integer class id (`"label"`).
    Label(i64),
}

/// One validated line of `metadata.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number in `metadata.jsonl`.
    pub line: usize,
    /// Path of the image (folder joined with the relative name).
    pub image: PathBuf,
    /// Path of the condition image, if given.
    pub conditioning_image: Option<PathBuf>,
    /// The class.
    pub target: Target,
}

/// Flattens a message to one line (library error texts occasionally contain newlines).
fn one_line(s: impl ToString) -> String {
    s.to_string().replace(['\n', '\r'], " ")
}

/// Reads and validates `dir/metadata.jsonl` (keys and consistency; not the image files).
pub fn read_metadata(dir: &Path) -> Result<Vec<Record>> {
    let meta = dir.join(METADATA_FILE);
    let bytes = match std::fs::read(&meta) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::format(
                &meta,
                "not found: an imagefolder dataset needs a metadata.jsonl with one JSON object per image",
            ));
        }
        Err(e) => return Err(Error::io(&meta, e)),
    };
    parse_metadata(bytes, dir)
}

/// Parses and validates the contents of `dir/metadata.jsonl` (see [`read_metadata`]); `dir` names the
/// file in errors and is joined to the image paths.
pub fn parse_metadata(bytes: Vec<u8>, dir: &Path) -> Result<Vec<Record>> {
    let meta = dir.join(METADATA_FILE);
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        Error::format(&meta, format!("line {line}: not UTF-8 text; save the file as UTF-8"))
    })?;
    // A byte-order mark, as some editors write, is not part of the first line's JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let err = |line: usize, msg: String| Error::format(&meta, format!("line {line}: {msg}"));
    let mut records: Vec<Record> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(raw).map_err(|e| err(line, format!("malformed JSON: {}", one_line(e))))?;
        let Value::Object(obj) = value else {
            return Err(err(line, "expected a JSON object".into()));
        };
        let string_field = |key: &str| -> Result<Option<String>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(v) => Err(err(line, format!("`{key}` must be a non-empty string, found {v}"))),
            }
        };
        let image =
            string_field("image")?.ok_or_else(|| err(line, "missing `image` key (the image's file name)".into()))?;
        let conditioning = string_field("conditioning_image")?;
        for (key, name) in [("image", Some(&image)), ("conditioning_image", conditioning.as_ref())] {
            let Some(name) = name else { continue };
            // Files are the dataset's own: a path out of the folder is a mistake or a way to read other files.
            let p = Path::new(name);
            if p.is_absolute()
                || p.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
            {
                return Err(err(
                    line,
                    format!(
                        "`{key}` {name:?} points outside the dataset folder; give a path relative to {}, without `..`",
                        dir.display()
                    ),
                ));
            }
        }
        let text_value = string_field("text")?;
        let label_value = match obj.get("label") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(l) if (0..MAX_CLASSES).contains(&l) => Some(l),
                Some(l) if l >= MAX_CLASSES => {
                    return Err(err(
                        line,
                        format!("`label` {l} is too large (class ids must be below {MAX_CLASSES}); number the classes 0, 1, 2, ..."),
                    ))
                }
                _ => {
                    return Err(err(
                        line,
                        format!("`label` must be a non-negative integer, found {v}"),
                    ))
                }
            },
        };
        let target = match (text_value, label_value) {
            (Some(t), None) => Target::Text(t),
            (None, Some(l)) => Target::Label(l),
            (Some(_), Some(_)) => return Err(err(line, "has both `text` and `label`; give exactly one".into())),
            (None, None) => return Err(err(line, "has neither `text` nor `label`; give exactly one".into())),
        };
        if let Some(first) = records.first() {
            if matches!(first.target, Target::Text(_)) != matches!(target, Target::Text(_)) {
                let (this, other) =
                    if matches!(target, Target::Text(_)) { ("text", "label") } else { ("label", "text") };
                return Err(err(
                    line,
                    format!("uses `{this}` but line {} uses `{other}`; use one for all lines", first.line),
                ));
            }
            if first.conditioning_image.is_some() != conditioning.is_some() {
                let (has, hasnt) = if conditioning.is_some() { (line, first.line) } else { (first.line, line) };
                return Err(err(line, format!("`conditioning_image` is given on line {has} but not on line {hasnt}; give it on all lines or none")));
            }
        }
        records.push(Record {
            line,
            image: dir.join(image),
            conditioning_image: conditioning.map(|c| dir.join(c)),
            target,
        });
    }
    if records.is_empty() {
        return Err(Error::format(
            &meta,
            r#"empty dataset: no records; add one JSON object per image, e.g. {"image": "a.png", "label": 0}"#,
        ));
    }
    Ok(records)
}

/// Opens and decodes an image referenced from line `line` of the metadata.
fn open(meta: &Path, line: usize, key: &str, path: &Path) -> Result<image::DynamicImage> {
    if !path.is_file() {
        let what = if path.exists() { "is not a file" } else { "not found" };
        return Err(Error::format(
            meta,
            format!(
                "line {line}: {key} {} {what}; fix the path (relative to the dataset folder) or remove the line",
                path.display()
            ),
        ));
    }
    image::open(path).map_err(|e| {
        Error::format(
            meta,
            format!(
                "line {line}: cannot decode {key} {}: {}; replace it with a PNG, JPEG or BMP image or remove the line",
                path.display(),
                one_line(e)
            ),
        )
    })
}

/// Reads one image file as a grey `[1, 1, size, size]` tensor in `[0, 1]`, fitted with
/// [`to_square`] (e.g. a condition image given on the command line).
pub fn load_gray(path: &Path, size: u32) -> Result<tch::Tensor> {
    if !path.is_file() {
        return Err(Error::Config(format!(
            "{} does not exist or is not a file; give an image file (PNG, JPEG or BMP)",
            path.display()
        )));
    }
    let img =
        image::open(path).map_err(|e| Error::format(path, format!("cannot decode the image: {}", one_line(e))))?;
    Ok(image_to_unit_tensor(&to_square(&img, size), 1).unsqueeze(0))
}

/// Loads the folder as a [`Dataset`] of `size × size` images with `channels` 1 (grey) or 3 (RGB):
/// each image is fitted with [`to_square`] (aspect kept, black padding), scaled to `[-1, 1]`;
/// condition images, if any, get the same treatment but stay in `[0, 1]`.
pub fn load(dir: impl AsRef<Path>, size: u32, channels: i64) -> Result<Dataset> {
    let dir = dir.as_ref();
    if channels != 1 && channels != 3 {
        return Err(Error::Config(format!("data.channels must be 1 (grey) or 3 (RGB), got {channels}")));
    }
    if size == 0 || size > MAX_IMAGE_SIZE {
        return Err(Error::Config(format!("data.image_size must be in 1..={MAX_IMAGE_SIZE}, got {size}")));
    }
    let meta = dir.join(METADATA_FILE);
    let records = read_metadata(dir)?;
    let (labels, class_names): (Vec<i64>, Vec<String>) = match records[0].target {
        Target::Text(_) => {
            let vocab: BTreeSet<&str> = records
                .iter()
                .filter_map(|r| if let Target::Text(t) = &r.target { Some(t.as_str()) } else { None })
                .collect();
            let names: Vec<String> = vocab.iter().map(|s| s.to_string()).collect();
            let ids = records
                .iter()
                .map(|r| match &r.target {
                    Target::Text(t) => names.binary_search(t).expect("text is in the vocabulary") as i64,
                    Target::Label(l) => *l,
                })
                .collect();
            (ids, names)
        }
        Target::Label(_) => {
            let ids: Vec<i64> = records.iter().map(|r| if let Target::Label(l) = r.target { l } else { 0 }).collect();
            let n = ids.iter().max().copied().unwrap_or(0) + 1;
            (ids, (0..n).map(|i| i.to_string()).collect())
        }
    };
    let mut images = Vec::with_capacity(records.len());
    let mut conds = Vec::new();
    for r in &records {
        let img = open(&meta, r.line, "image", &r.image)?;
        images.push(image_to_unit_tensor(&to_square(&img, size), channels) * 2.0 - 1.0);
        if let Some(c) = &r.conditioning_image {
            let cimg = open(&meta, r.line, "conditioning_image", c)?;
            conds.push(image_to_unit_tensor(&to_square(&cimg, size), channels));
        }
    }
    Ok(Dataset {
        images: Tensor::stack(&images, 0),
        labels: Tensor::from_slice(&labels),
        num_classes: class_names.len() as i64,
        class_names,
        conditioning: if conds.is_empty() { None } else { Some(Tensor::stack(&conds, 0)) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(dir: &Path, name: &str, w: u32, h: u32, v: u8) {
        image::GrayImage::from_pixel(w, h, image::Luma([v])).save(dir.join(name)).unwrap();
    }

    fn folder(lines: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a.png", 8, 8, 255);
        png(d.path(), "b.png", 16, 8, 0);
        png(d.path(), "c.png", 8, 8, 128);
        std::fs::write(d.path().join(METADATA_FILE), lines.join("\n")).unwrap();
        d
    }

    fn load_err(lines: &[&str]) -> String {
        let d = folder(lines);
        let e = load(d.path(), 16, 1).unwrap_err().to_string();
        assert!(e.starts_with(&d.path().join(METADATA_FILE).display().to_string()), "{e}");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn loads_texts_with_conditioning() {
        let d = folder(&[
            r#"{"image": "a.png", "conditioning_image": "c.png", "text": "shoe"}"#,
            "",
            r#"{"image": "b.png", "conditioning_image": "c.png", "text": "bag"}"#,
            r#"{"image": "c.png", "conditioning_image": "a.png", "text": "shoe"}"#,
        ]);
        let ds = load(d.path(), 16, 3).unwrap();
        assert_eq!(ds.images.size(), [3, 3, 16, 16]);
        assert_eq!(ds.class_names, ["bag", "shoe"]);
        assert_eq!(Vec::<i64>::try_from(&ds.labels).unwrap(), [1, 0, 1]);
        assert_eq!(ds.images.double_value(&[0, 0, 5, 5]), 1.0);
        // b.png is 16x8: fitted to 16x8 and centred in rows 4..12, padding black.
        assert_eq!(ds.images.double_value(&[1, 2, 0, 0]), -1.0);
        let c = ds.conditioning.unwrap();
        assert_eq!(c.size(), [3, 3, 16, 16]);
        assert!((c.double_value(&[0, 0, 3, 3]) - 128.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn loads_integer_labels() {
        let d = folder(&[r#"{"image": "a.png", "label": 4}"#, r#"{"image": "b.png", "label": 1}"#]);
        let ds = load(d.path(), 8, 1).unwrap();
        assert_eq!(ds.images.size(), [2, 1, 8, 8]);
        assert_eq!(ds.num_classes, 5);
        assert_eq!(Vec::<i64>::try_from(&ds.labels).unwrap(), [4, 1]);
        assert!(ds.conditioning.is_none());
    }

    #[test]
    fn metadata_errors_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let e = load(d.path(), 16, 1).unwrap_err().to_string();
        assert!(e.contains("metadata.jsonl: not found"), "{e}");
        let e = load_err(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "a.png", "label": }"#]);
        assert!(e.contains("line 2: malformed JSON"), "{e}");
        let e = load_err(&[r#"{"text": "x"}"#]);
        assert!(e.contains("line 1: missing `image`"), "{e}");
        let e = load_err(&[r#"{"image": "a.png", "text": "x", "label": 1}"#]);
        assert!(e.contains("line 1: has both"), "{e}");
        let e = load_err(&[r#"{"image": "a.png", "label": 1}"#, r#"{"image": "a.png"}"#]);
        assert!(e.contains("line 2: has neither"), "{e}");
        let e = load_err(&[r#"{"image": "a.png", "label": 1}"#, r#"{"image": "a.png", "text": "t"}"#]);
        assert!(e.contains("line 2: uses `text` but line 1 uses `label`"), "{e}");
        let e = load_err(&[
            r#"{"image": "a.png", "label": 1, "conditioning_image": "c.png"}"#,
            r#"{"image": "a.png", "label": 2}"#,
        ]);
        assert!(e.contains("line 2: `conditioning_image` is given on line 1 but not on line 2"), "{e}");
        let e = load_err(&["", "  "]);
        assert!(e.contains("empty dataset"), "{e}");
        let e = load_err(&[r#"{"image": "a.png", "label": -1}"#]);
        assert!(e.contains("line 1: `label` must be a non-negative integer"), "{e}");
    }

    #[test]
    fn image_errors_name_file_and_line() {
        let e = load_err(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "zz.png", "label": 0}"#]);
        assert!(e.contains("line 2: image ") && e.contains("zz.png not found"), "{e}");
        let e = load_err(&[r#"{"image": "a.png", "label": 0, "conditioning_image": "nope.png"}"#]);
        assert!(e.contains("line 1: conditioning_image ") && e.contains("nope.png not found"), "{e}");
        let d = folder(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "bad.png", "label": 0}"#]);
        std::fs::write(d.path().join("bad.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = load(d.path(), 16, 1).unwrap_err().to_string();
        assert!(e.contains("line 2: cannot decode image ") && e.contains("bad.png"), "{e}");
        assert!(!e.contains('\n'));
        assert!(load(d.path(), 16, 2).is_err());
    }
}
