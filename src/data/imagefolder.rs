//! Users' own data in the Hugging Face `imagefolder` / diffusers ControlNet convention: a folder
//! with a `metadata.jsonl` whose lines are JSON objects such as
//! `{"image": "a.png", "conditioning_image": "a_edges.png", "text": "sneaker"}`.
//!
//! `image` (a file name relative to the folder) is required; `conditioning_image` is optional but
//! must then be on every line; the class is either `text` (a string; classes are the sorted
//! distinct texts) or `label` (a non-negative integer, used as is; `num_classes` = max + 1), and
//! all lines must use the same one. Blank lines are skipped, and keys other than these are ignored.
//! The column names can be changed as diffusers' `--image_column`, `--conditioning_image_column` and
//! `--caption_column` change them ([`Columns`]); a line with both a caption and a label needs one of
//! the two columns turned off (set to `""`), which then says which one is the class.
//!
//! A file may not lie outside the folder: a `..` or absolute path is refused, and so is a path that
//! leaves the folder through a symbolic link unless [`LoadOptions::follow_symlinks`] allows it.
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
    /// The image's file name as written in the metadata (relative to the folder).
    pub name: String,
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

/// Which keys of a `metadata.jsonl` line hold what (diffusers' `--image_column`, `--conditioning_image_column`,
/// `--caption_column`); keys not named here are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// The image's file name. Default `image`.
    pub image: String,
    /// The condition image's file name. Default `conditioning_image`.
    pub conditioning_image: String,
    /// The caption / class name, a string (`""` = not read). Default `text`.
    pub caption: String,
    /// The integer class id (`""` = not read). Default `label`.
    pub label: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            image: "image".into(),
            conditioning_image: "conditioning_image".into(),
            caption: "text".into(),
            label: "label".into(),
        }
    }
}

impl Columns {
    /// Rejects column settings that cannot name a class or an image.
    pub fn validate(&self) -> Result<()> {
        if self.image.is_empty() {
            return Err(Error::Config(
                "data.image_column is empty; name the key that holds the image's file name".into(),
            ));
        }
        if self.caption.is_empty() && self.label.is_empty() {
            return Err(Error::Config(
                "data.caption_column and data.label_column are both empty; set one of them to the key that holds the class"
                    .into(),
            ));
        }
        if [&self.conditioning_image, &self.caption, &self.label].iter().any(|c| **c == self.image) {
            return Err(Error::Config(format!(
                "data.image_column {:?} is also used for another column; give each column its own key",
                self.image
            )));
        }
        if !self.caption.is_empty() && self.caption == self.label {
            return Err(Error::Config(format!(
                "data.caption_column and data.label_column are both {:?}; set one of them to \"\"",
                self.caption
            )));
        }
        Ok(())
    }
}

/// Reads and validates `dir/metadata.jsonl` (keys and consistency; not the image files).
pub fn read_metadata(dir: &Path) -> Result<Vec<Record>> {
    read_metadata_with(dir, &Columns::default())
}

/// [`read_metadata`] with the given column names.
pub fn read_metadata_with(dir: &Path, columns: &Columns) -> Result<Vec<Record>> {
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
    parse_metadata_with(bytes, dir, columns)
}

/// Parses and validates the contents of `dir/metadata.jsonl` (see [`read_metadata`]); `dir` names the
/// file in errors and is joined to the image paths.
pub fn parse_metadata(bytes: Vec<u8>, dir: &Path) -> Result<Vec<Record>> {
    parse_metadata_with(bytes, dir, &Columns::default())
}

/// [`parse_metadata`] with the given column names.
pub fn parse_metadata_with(bytes: Vec<u8>, dir: &Path, columns: &Columns) -> Result<Vec<Record>> {
    columns.validate()?;
    let meta = dir.join(METADATA_FILE);
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        Error::format(&meta, format!("line {line}: not UTF-8 text; save the file as UTF-8"))
    })?;
    // A byte-order mark, as some editors write, is not part of the first line's JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let err = |line: usize, msg: String| Error::format(&meta, format!("line {line}: {msg}"));
    let (image_key, cond_key) = (columns.image.as_str(), columns.conditioning_image.as_str());
    let (text_key, label_key) = (columns.caption.as_str(), columns.label.as_str());
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
            if key.is_empty() {
                return Ok(None);
            }
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(v) => Err(err(line, format!("`{key}` must be a non-empty string, found {v}"))),
            }
        };
        let image = string_field(image_key)?
            .ok_or_else(|| err(line, format!("missing `{image_key}` key (the image's file name)")))?;
        let conditioning = string_field(cond_key)?;
        for (key, name) in [(image_key, Some(&image)), (cond_key, conditioning.as_ref())] {
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
        let text_value = string_field(text_key)?;
        let label_value = match (label_key.is_empty(), obj.get(label_key)) {
            (true, _) | (_, None) | (_, Some(Value::Null)) => None,
            (false, Some(v)) => match v.as_i64() {
                Some(l) if (0..MAX_CLASSES).contains(&l) => Some(l),
                Some(l) if l >= MAX_CLASSES => {
                    return Err(err(
                        line,
                        format!("`{label_key}` {l} is too large (class ids must be below {MAX_CLASSES}); number the classes 0, 1, 2, ..."),
                    ))
                }
                _ => {
                    return Err(err(
                        line,
                        format!("`{label_key}` must be a non-negative integer, found {v}"),
                    ))
                }
            },
        };
        let target = match (text_value, label_value) {
            (Some(t), None) => Target::Text(t),
            (None, Some(l)) => Target::Label(l),
            (Some(_), Some(_)) => {
                return Err(err(
                    line,
                    format!(
                        "has both `{text_key}` and `{label_key}`; say which is the class: set data.label_column = \"\" \
                         to use `{text_key}`, or data.caption_column = \"\" to use `{label_key}`"
                    ),
                ))
            }
            (None, None) => {
                let which = match (text_key.is_empty(), label_key.is_empty()) {
                    (false, false) => format!("neither `{text_key}` nor `{label_key}`; give exactly one"),
                    (true, _) => format!("no `{label_key}` (the class id); give one, or set data.caption_column"),
                    (_, true) => format!("no `{text_key}` (the class name); give one, or set data.label_column"),
                };
                return Err(err(line, format!("has {which}")));
            }
        };
        if let Some(first) = records.first() {
            if matches!(first.target, Target::Text(_)) != matches!(target, Target::Text(_)) {
                let (this, other) =
                    if matches!(target, Target::Text(_)) { (text_key, label_key) } else { (label_key, text_key) };
                return Err(err(
                    line,
                    format!("uses `{this}` but line {} uses `{other}`; use one for all lines", first.line),
                ));
            }
            if first.conditioning_image.is_some() != conditioning.is_some() {
                let (has, hasnt) = if conditioning.is_some() { (line, first.line) } else { (first.line, line) };
                return Err(err(line, format!("`{cond_key}` is given on line {has} but not on line {hasnt}; give it on all lines or none")));
            }
        }
        records.push(Record {
            line,
            name: image.clone(),
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

/// Refuses an image referenced from line `line` of the metadata that is not there or not a file.
fn check_file(meta: &Path, line: usize, key: &str, path: &Path) -> Result<()> {
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
    Ok(())
}

/// Opens and decodes an image referenced from line `line` of the metadata.
fn open(meta: &Path, line: usize, key: &str, path: &Path) -> Result<image::DynamicImage> {
    check_file(meta, line, key, path)?;
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
    load_image(path, size, 1)
}

/// Reads one image file as a `[1, channels, size, size]` tensor in `[0, 1]` (`channels` 1: grey, 3: RGB),
/// fitted with [`to_square`].
pub fn load_image(path: &Path, size: u32, channels: i64) -> Result<tch::Tensor> {
    if !path.is_file() {
        return Err(Error::Config(format!(
            "{} does not exist or is not a file; give an image file (PNG, JPEG or BMP)",
            path.display()
        )));
    }
    let img =
        image::open(path).map_err(|e| Error::format(path, format!("cannot decode the image: {}", one_line(e))))?;
    Ok(image_to_unit_tensor(&to_square(&img, size), channels).unsqueeze(0))
}

/// How an imagefolder is read into a [`Dataset`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Images are fitted into `size × size` squares. Default 32.
    pub size: u32,
    /// 1 (grey) or 3 (RGB). Default 1.
    pub channels: i64,
    /// Channels of the condition images: 1 (grey) or 3 (RGB); 0 = as `channels`. Default 0.
    pub conditioning_channels: i64,
    /// Which keys hold what.
    pub columns: Columns,
    /// Allow files that lie outside the folder once symbolic links are followed. Default false.
    pub follow_symlinks: bool,
    /// Class names to number `text` classes by (another folder's, so that a held-out folder numbers its
    /// classes as the training folder does); `None` = this folder's sorted distinct texts. Default none.
    pub class_names: Option<Vec<String>>,
    /// Which of the folder's lines are loaded. Default all.
    pub part: Part,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            size: 32,
            channels: 1,
            conditioning_channels: 0,
            columns: Columns::default(),
            follow_symlinks: false,
            class_names: None,
            part: Part::All,
        }
    }
}

/// Which of a folder's lines [`load_with`] loads: all, or one side of the held-out split of [`held_out_lines`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Part {
    /// Every line.
    All,
    /// The lines not held out at this fraction.
    Train(f64),
    /// The lines held out at this fraction.
    HeldOut(f64),
}

/// A stable 64-bit hash of a file name (FNV-1a, then a SplitMix64 finaliser to spread the bits).
fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Which lines of a folder whose images are `names` are held out from training at `fraction`: the names in
/// the order of a hash of the name, taken until `ceil(fraction · n)` lines are held out. The choice depends
/// only on the names (not on the order of the lines or on other files), and lines naming the same image
/// fall on the same side. At least one line is left for training; nothing is held out at fraction 0 or
/// when every line names the same image.
pub fn held_out_lines(names: &[&str], fraction: f64) -> Vec<bool> {
    let n = names.len();
    let mut out = vec![false; n];
    if !(fraction > 0.0) || n < 2 {
        return out;
    }
    let want = ((n as f64 * fraction).ceil() as usize).min(n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| (name_hash(names[i]), names[i], i).cmp(&(name_hash(names[j]), names[j], j)));
    let (mut taken, mut k) = (0, 0);
    while taken < want && k < n {
        let name = names[order[k]];
        while k < n && names[order[k]] == name {
            out[order[k]] = true;
            taken += 1;
            k += 1;
        }
    }
    if taken == n {
        return vec![false; n];
    }
    out
}

/// The class ids of `records` and the class names: the sorted distinct texts (or `fixed`, when given, which
/// every text must be among), or, for integer labels, `0..=max`.
fn classes(
    meta: &Path,
    records: &[Record],
    fixed: Option<&[String]>,
    columns: &Columns,
) -> Result<(Vec<i64>, Vec<String>)> {
    match records[0].target {
        Target::Text(_) => {
            let names: Vec<String> = match fixed {
                Some(names) => names.to_vec(),
                None => {
                    let vocab: BTreeSet<&str> = records
                        .iter()
                        .filter_map(|r| if let Target::Text(t) = &r.target { Some(t.as_str()) } else { None })
                        .collect();
                    vocab.iter().map(|s| s.to_string()).collect()
                }
            };
            let ids = records
                .iter()
                .map(|r| match &r.target {
                    Target::Text(t) => names.iter().position(|n| n == t).map(|i| i as i64).ok_or_else(|| {
                        Error::format(
                            meta,
                            format!(
                                "line {}: `{}` {t:?} is not one of the training folder's classes ({}); \
                                 use the training folder's class names",
                                r.line,
                                columns.caption,
                                names.join(", ")
                            ),
                        )
                    }),
                    Target::Label(l) => Ok(*l),
                })
                .collect::<Result<Vec<i64>>>()?;
            Ok((ids, names))
        }
        Target::Label(_) => {
            let ids: Vec<i64> = records.iter().map(|r| if let Target::Label(l) = r.target { l } else { 0 }).collect();
            let max = ids.iter().max().copied().unwrap_or(0);
            let n = fixed.map_or(0, |f| f.len() as i64).max(max + 1);
            Ok((ids, (0..n).map(|i| i.to_string()).collect()))
        }
    }
}

/// The class names of the folder (see [`load_with`]) without opening an image.
pub fn class_names(dir: &Path, columns: &Columns) -> Result<Vec<String>> {
    let records = read_metadata_with(dir, columns)?;
    Ok(classes(&dir.join(METADATA_FILE), &records, None, columns)?.1)
}

/// Refuses a file that lies outside the folder once symbolic links are followed (a `..` in the name is
/// refused when the metadata is read). A file that cannot be resolved is left to [`open`] to report.
fn check_inside(meta: &Path, root: &Path, line: usize, key: &str, path: &Path) -> Result<()> {
    let Ok(real) = std::fs::canonicalize(path) else { return Ok(()) };
    if real.starts_with(root) {
        return Ok(());
    }
    Err(Error::format(
        meta,
        format!(
            "line {line}: `{key}` {} resolves to {}, outside the dataset folder (through a symbolic link); \
             copy the file into the folder, or set data.follow_symlinks = true to allow it",
            path.display(),
            real.display()
        ),
    ))
}

/// Whether an image has colour: a colour type with colour channels and some pixel whose channels differ.
fn has_colour(img: &image::DynamicImage) -> bool {
    img.color().has_color() && img.to_rgb8().pixels().any(|p| p[0] != p[1] || p[1] != p[2])
}

/// Loads the folder as a [`Dataset`] of `size × size` images with `channels` 1 (grey) or 3 (RGB):
/// each image is fitted with [`to_square`] (aspect kept, black padding), scaled to `[-1, 1]`;
/// condition images, if any, get the same treatment but stay in `[0, 1]`.
pub fn load(dir: impl AsRef<Path>, size: u32, channels: i64) -> Result<Dataset> {
    load_with(dir.as_ref(), &LoadOptions { size, channels, ..LoadOptions::default() })
}

/// An imagefolder opened but not read: its selected records, their labels and the class names, every file
/// checked; each example is decoded on demand ([`FolderIndex::example`]) with [`load_with`]'s preprocessing.
/// What a loader that must not hold the whole folder in memory reads from (`train-sd`'s encoder).
#[derive(Debug)]
pub struct FolderIndex {
    meta: PathBuf,
    /// The selected lines (the part of [`LoadOptions::part`]), in file order.
    pub records: Vec<Record>,
    /// Their class ids.
    pub labels: Vec<i64>,
    /// The class names, `labels` indexing them.
    pub class_names: Vec<String>,
    size: u32,
    channels: i64,
    cond_channels: i64,
}

/// One decoded example of a [`FolderIndex`].
#[derive(Debug)]
pub struct Example {
    /// The image, `f32 [channels, size, size]` in `[-1, 1]`.
    pub image: Tensor,
    /// The condition image, `f32 [conditioning channels, size, size]` in `[0, 1]`, if the line has one.
    pub condition: Option<Tensor>,
    /// The image had colour that was read as grey (`channels = 1`).
    pub image_greyed: bool,
    /// The condition had colour that was read as grey (`conditioning_channels = 1`).
    pub condition_greyed: bool,
}

impl FolderIndex {
    /// Number of selected examples.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no example is selected.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Decodes example `i` (of the selected ones).
    pub fn example(&self, i: usize) -> Result<Example> {
        let r = self.records.get(i).ok_or_else(|| Error::Config(format!("example {i} out of range 0..{}", self.len())))?;
        let img = open(&self.meta, r.line, "image", &r.image)?;
        let image_greyed = self.channels == 1 && has_colour(&img);
        let image = image_to_unit_tensor(&to_square(&img, self.size), self.channels) * 2.0 - 1.0;
        let (mut condition, mut condition_greyed) = (None, false);
        if let Some(c) = &r.conditioning_image {
            let cimg = open(&self.meta, r.line, "conditioning_image", c)?;
            condition_greyed = self.cond_channels == 1 && has_colour(&cimg);
            condition = Some(image_to_unit_tensor(&to_square(&cimg, self.size), self.cond_channels));
        }
        Ok(Example { image, condition, image_greyed, condition_greyed })
    }
}

/// Opens the imagefolder `dir` as [`load_with`] would read it, without decoding an image: options checked,
/// metadata read, classes numbered, the part selected, and every line's files checked (also those of the other
/// part, so that a broken folder is reported before training rather than when the held-out set is first read).
pub fn open_index(dir: &Path, opts: &LoadOptions) -> Result<FolderIndex> {
    let (size, channels) = (opts.size, opts.channels);
    if channels != 1 && channels != 3 {
        return Err(Error::Config(format!("data.channels must be 1 (grey) or 3 (RGB), got {channels}")));
    }
    let cond_channels = if opts.conditioning_channels == 0 { channels } else { opts.conditioning_channels };
    if cond_channels != 1 && cond_channels != 3 {
        return Err(Error::Config(format!(
            "data.conditioning_channels must be 1 (grey), 3 (RGB) or 0 (as data.channels), got {}",
            opts.conditioning_channels
        )));
    }
    if size == 0 || size > MAX_IMAGE_SIZE {
        return Err(Error::Config(format!("data.image_size must be in 1..={MAX_IMAGE_SIZE}, got {size}")));
    }
    let meta = dir.join(METADATA_FILE);
    let records = read_metadata_with(dir, &opts.columns)?;
    let (labels, class_names) = classes(&meta, &records, opts.class_names.as_deref(), &opts.columns)?;
    let keep: Vec<bool> = match opts.part {
        Part::All => vec![true; records.len()],
        Part::Train(f) | Part::HeldOut(f) => {
            let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
            let held = held_out_lines(&names, f);
            if matches!(opts.part, Part::HeldOut(_)) {
                if !held.contains(&true) {
                    return Err(Error::Config(format!(
                        "{}: no held-out images (data.eval_fraction = {f} of {} line(s)); set data.eval_fraction \
                         above 0 with at least two images, or give data.eval_dataset (a second imagefolder)",
                        dir.display(),
                        records.len()
                    )));
                }
                held
            } else {
                held.iter().map(|h| !h).collect()
            }
        }
    };
    let root = if opts.follow_symlinks { None } else { std::fs::canonicalize(dir).ok() };
    for r in &records {
        let files = [
            ("image", &opts.columns.image, Some(&r.image)),
            ("conditioning_image", &opts.columns.conditioning_image, r.conditioning_image.as_ref()),
        ];
        for (what, key, path) in files {
            let Some(path) = path else { continue };
            if let Some(root) = &root {
                check_inside(&meta, root, r.line, key, path)?;
            }
            check_file(&meta, r.line, what, path)?;
        }
    }
    let (records, labels) = records.into_iter().zip(labels).zip(keep).filter(|(_, k)| *k).map(|(rl, _)| rl).unzip();
    Ok(FolderIndex { meta, records, labels, class_names, size, channels, cond_channels })
}

/// [`load`] with every option: column names, symbolic links, a fixed class numbering, and which part of
/// the held-out split. Colour images loaded as grey are converted with a note on stderr, never silently.
pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let index = open_index(dir, opts)?;
    let (mut images, mut conds) = (Vec::new(), Vec::new());
    let (mut coloured, mut coloured_conds) = (0usize, 0usize);
    for i in 0..index.len() {
        let e = index.example(i)?;
        coloured += usize::from(e.image_greyed);
        coloured_conds += usize::from(e.condition_greyed);
        images.push(e.image);
        conds.extend(e.condition);
    }
    if coloured > 0 {
        eprintln!(
            "note: {}: {coloured} of {} images are in colour and are read as grey (data.channels = 1); \
             set data.channels = 3 to train in colour",
            dir.display(),
            images.len()
        );
    }
    if coloured_conds > 0 {
        eprintln!(
            "note: {}: {coloured_conds} of {} condition images are in colour and are read as grey \
             (data.conditioning_channels = 1); set data.conditioning_channels = 3 to keep their colour",
            dir.display(),
            conds.len()
        );
    }
    Ok(Dataset {
        images: Tensor::stack(&images, 0),
        labels: Tensor::from_slice(&index.labels),
        num_classes: index.class_names.len() as i64,
        class_names: index.class_names,
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
    #[test]
    fn a_line_with_both_text_and_label_uses_the_configured_column() {
        let lines = [
            r#"{"image": "a.png", "text": "shoe", "label": 3, "extra": [1, 2]}"#,
            r#"{"image": "b.png", "text": "bag", "label": 1}"#,
        ];
        let e = load_err(&lines);
        assert!(e.contains("line 1: has both `text` and `label`") && e.contains("data.label_column"), "{e}");
        let d = folder(&lines);
        let by_label = LoadOptions {
            size: 8,
            columns: Columns { caption: String::new(), ..Columns::default() },
            ..LoadOptions::default()
        };
        let ds = load_with(d.path(), &by_label).unwrap();
        assert_eq!(Vec::<i64>::try_from(&ds.labels).unwrap(), [3, 1]);
        assert_eq!(ds.num_classes, 4);
        let by_text = LoadOptions { columns: Columns { label: String::new(), ..Columns::default() }, ..by_label };
        let ds = load_with(d.path(), &by_text).unwrap();
        assert_eq!(ds.class_names, ["bag", "shoe"]);
        assert_eq!(Vec::<i64>::try_from(&ds.labels).unwrap(), [1, 0]);
        // Renamed columns, as diffusers' --image_column / --caption_column name them.
        let renamed = folder(&[r#"{"file": "a.png", "prompt": "x", "text": 5}"#]);
        let opts = LoadOptions {
            size: 8,
            columns: Columns { image: "file".into(), caption: "prompt".into(), label: String::new(), ..Columns::default() },
            ..LoadOptions::default()
        };
        assert_eq!(load_with(renamed.path(), &opts).unwrap().class_names, ["x"]);
        let none = Columns { caption: String::new(), label: String::new(), ..Columns::default() };
        assert!(none.validate().unwrap_err().to_string().contains("both empty"));
    }

    #[test]
    fn held_out_lines_are_deterministic_disjoint_and_follow_the_names() {
        let names: Vec<String> = (0..50).map(|i| format!("img-{i}.png")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let held = held_out_lines(&refs, 0.1);
        assert_eq!(held.iter().filter(|h| **h).count(), 5);
        assert_eq!(held, held_out_lines(&refs, 0.1));
        // The same names in another order: the same images held out.
        let mut rev = refs.clone();
        rev.reverse();
        let held_rev = held_out_lines(&rev, 0.1);
        let chosen = |r: &[&str], h: &[bool]| -> BTreeSet<String> {
            r.iter().zip(h).filter(|(_, h)| **h).map(|(n, _)| n.to_string()).collect()
        };
        assert_eq!(chosen(&refs, &held), chosen(&rev, &held_rev));
        assert!(!held_out_lines(&refs, 0.0).contains(&true));
        assert!(!held_out_lines(&["a.png"], 0.5).contains(&true));
        assert!(!held_out_lines(&["a.png", "a.png"], 0.5).contains(&true), "one image: nothing to train on");
        assert_eq!(held_out_lines(&["a.png", "b.png"], 0.9).iter().filter(|h| **h).count(), 1);
    }

    #[test]
    fn training_and_held_out_examples_of_one_folder_are_disjoint() {
        let d = tempfile::tempdir().unwrap();
        let mut lines = vec![];
        for i in 0..20u8 {
            png(d.path(), &format!("{i}.png"), 4, 4, i * 10);
            lines.push(format!(r#"{{"image": "{i}.png", "label": {}}}"#, i % 3));
        }
        std::fs::write(d.path().join(METADATA_FILE), lines.join("\n")).unwrap();
        let opts = |part| LoadOptions { size: 4, part, ..LoadOptions::default() };
        let train = load_with(d.path(), &opts(Part::Train(0.25))).unwrap();
        let held = load_with(d.path(), &opts(Part::HeldOut(0.25))).unwrap();
        assert_eq!((train.len(), held.len()), (15, 5));
        assert_eq!((train.num_classes, held.num_classes), (3, 3));
        // Each image has its own grey level: no level is on both sides, and together they are all 20.
        let levels = |ds: &Dataset| -> BTreeSet<i64> {
            let v: Vec<f32> = Vec::try_from(ds.images.select(2, 0).select(2, 0).flatten(0, -1)).unwrap();
            v.iter().map(|x| ((x + 1.0) * 127.5).round() as i64).collect()
        };
        let (a, b) = (levels(&train), levels(&held));
        assert!(a.is_disjoint(&b) && a.len() + b.len() == 20, "{a:?} {b:?}");
        let e = load_with(d.path(), &opts(Part::HeldOut(0.0))).unwrap_err().to_string();
        assert!(e.contains("no held-out images") && e.contains("data.eval_dataset"), "{e}");
    }

    #[test]
    fn a_symlink_escaping_the_folder_is_refused_unless_allowed() {
        let outside = tempfile::tempdir().unwrap();
        png(outside.path(), "secret.png", 8, 8, 77);
        let d = folder(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "link.png", "label": 1}"#]);
        std::os::unix::fs::symlink(outside.path().join("secret.png"), d.path().join("link.png")).unwrap();
        let e = load(d.path(), 8, 1).unwrap_err().to_string();
        assert!(e.contains("line 2: `image`") && e.contains("outside the dataset folder"), "{e}");
        assert!(e.contains("data.follow_symlinks = true") && !e.contains('\n'), "{e}");
        let ds = load_with(d.path(), &LoadOptions { size: 8, follow_symlinks: true, ..LoadOptions::default() }).unwrap();
        assert_eq!(ds.len(), 2);
        // A link that stays inside the folder is fine.
        std::fs::remove_file(d.path().join("link.png")).unwrap();
        std::os::unix::fs::symlink(d.path().join("c.png"), d.path().join("link.png")).unwrap();
        assert_eq!(load(d.path(), 8, 1).unwrap().len(), 2);
    }
}
