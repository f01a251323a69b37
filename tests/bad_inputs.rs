//! The bad-input corpus: broken data files (IDX, PNG, `metadata.jsonl`), bad configs, damaged or
//! mismatched checkpoints, non-finite pixels, empty datasets, unwritable outputs and a full disk, each fed
//! to the real `lisa` binary (or, where the CLI cannot produce the input, to the library's entry points).
//!
//! Every case must fail with a non-zero exit (or `Err`), without a panic, with one `error:` line that names
//! the offending input (path or key) and says what to do, and must leave what was there before untouched:
//! its inputs and, for training commands, an existing run folder with checkpoints, byte for byte.
//!
//! Inputs that a file shows best are under `tests/bad-inputs/`; the others are made here.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

/// Files committed for cases that read better as files.
fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-inputs")
}

/// The tiny pretraining run every pretrain case starts from (2 steps, a checkpoint each step).
const TINY: &str = r#"
threads = 1
device = "cpu"
[data]
source = "embedded"
max_examples = 32
[model.unet]
block_out_channels = [8, 16]
down_block_types = ["DownBlock2D", "CrossAttnDownBlock2D"]
up_block_types = ["CrossAttnUpBlock2D", "UpBlock2D"]
cross_attention_dim = 16
attention_head_dim = 2
norm_num_groups = 4
[train]
steps = 2
batch_size = 8
lr_warmup_steps = 1
ema_decay = 0.9
log_every = 1
checkpointing_steps = 1
[validation]
num_images = 0
"#;

/// A check or library call: `Err(message)` on failure.
type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// How a case is run.
enum Run {
    /// A program (the `lisa` binary, or a wrapper such as `unshare`) with arguments.
    Exec(PathBuf, Vec<OsString>),
    /// A library call; `Err(message)` is the expected outcome.
    Lib(Check),
    /// Not runnable here; the reason is printed.
    Skip(String),
}

struct Case {
    name: String,
    run: Run,
    /// Substrings of the error line: the offending input and what to do.
    expect: Vec<String>,
    /// Paths that must be byte-identical before and after.
    keep: Vec<PathBuf>,
    /// A further check after the run.
    after: Option<Check>,
}

/// Builds the cases of one kind of input in folders under `root`.
struct Corpus {
    root: PathBuf,
    config: PathBuf,
    base_run: PathBuf,
    cases: Vec<Case>,
}

fn lisa_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lisa"))
}

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Corpus {
    /// A fresh folder for case `name`.
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.join("cases").join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn add(&mut self, name: &str, run: Run, expect: &[&str], keep: Vec<PathBuf>) {
        self.cases.push(Case {
            name: name.into(),
            run,
            expect: expect.iter().map(|e| e.to_string()).collect(),
            keep,
            after: None,
        });
    }

    /// `lisa pretrain` of the tiny config into a copy of an earlier run (which must survive), plus `extra`.
    fn pretrain(&mut self, name: &str, extra: Vec<OsString>, expect: &[&str]) {
        let d = self.dir(name);
        let run = d.join("run");
        copy_dir(&self.base_run, &run);
        let mut args = os(&[&"pretrain", &"--quiet", &"--config", &self.config, &"--output-dir", &run]);
        args.extend(extra);
        self.add(name, Run::Exec(lisa_bin(), args), expect, vec![d]);
    }

    /// A pretrain case on an IDX folder holding `images` and `labels` for both splits.
    fn idx(&mut self, name: &str, images: &[u8], labels: &[u8], expect: &[&str]) {
        let d = self.dir(name).join("idx");
        fs::create_dir_all(&d).unwrap();
        for split in ["train", "t10k"] {
            fs::write(d.join(format!("{split}-images-idx3-ubyte")), images).unwrap();
            fs::write(d.join(format!("{split}-labels-idx1-ubyte")), labels).unwrap();
        }
        let set = format!("data.source={:?}", s(&d));
        let expect: Vec<String> = expect.iter().map(|e| e.replace("{dir}", &s(&d))).collect();
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        self.pretrain(name, os(&[&"--set", &set]), &expect);
    }

    /// A pretrain case on an imagefolder made by `make(dir)` (which writes `metadata.jsonl` and images).
    /// `{dir}` in `expect` stands for the dataset folder.
    fn folder(&mut self, name: &str, make: impl FnOnce(&Path), extra: &[&str], expect: &[&str]) {
        let d = self.dir(name).join("data");
        fs::create_dir_all(&d).unwrap();
        make(&d);
        let mut args = os(&[&"--set", &format!("data.dataset={:?}", s(&d))]);
        args.extend(extra.iter().map(|e| OsString::from(*e)));
        let expect: Vec<String> = expect.iter().map(|e| e.replace("{dir}", &s(&d))).collect();
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        self.pretrain(name, args, &expect);
    }

    /// A `lisa train` case (a side network for the shipped main network, one step) into a fresh folder.
    fn train(&mut self, name: &str, args: &[&str], expect: &[&str]) {
        let d = self.dir(name);
        let mut all = os(&[&"train", &"--quiet", &"--steps", &"1", &"--threads", &"1", &"--output-dir", &d.join("run")]);
        all.extend(args.iter().map(OsString::from));
        self.add(name, Run::Exec(lisa_bin(), all), expect, vec![d]);
    }

    /// A `lisa train --task edges` case on an imagefolder made by `make(dir)`.
    fn train_on_folder(&mut self, name: &str, make: impl FnOnce(&Path), extra: &[&str], expect: &[&str]) {
        let data = self.dir(name).join("data");
        fs::create_dir_all(&data).unwrap();
        make(&data);
        let set = format!("data.dataset={:?}", s(&data));
        let mut args = vec!["--task", "edges", "--set", &set];
        args.extend(extra);
        self.train(name, &args, expect);
    }

    /// A pretrain case with `--set` overrides (or a config file) and nothing else wrong.
    fn config(&mut self, name: &str, sets: &[&str], expect: &[&str]) {
        let args = sets.iter().flat_map(|v| [OsString::from("--set"), OsString::from(*v)]).collect();
        self.pretrain(name, args, expect);
    }

    /// A case on a copy of the base run whose checkpoint-2 `damage` alters; `command` gets the run folder.
    fn checkpoint(
        &mut self,
        name: &str,
        damage: impl FnOnce(&Path),
        command: impl FnOnce(&Path, &Path) -> Vec<OsString>,
        expect: &[&str],
    ) {
        let d = self.dir(name);
        let run = d.join("run");
        copy_dir(&self.base_run, &run);
        damage(&run.join("checkpoint-2"));
        let args = command(&run, &self.config);
        let expect: Vec<String> = expect.iter().map(|e| e.replace("{run}", &s(&run))).collect();
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        self.add(name, Run::Exec(lisa_bin(), args), &expect, vec![d]);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            fs::copy(e.path(), t).unwrap();
        }
    }
}

/// Every file and folder under `p` (itself included), with contents, link targets or kinds.
fn snapshot(p: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    let Ok(meta) = fs::symlink_metadata(p) else {
        out.insert(p.to_path_buf(), b"<absent>".to_vec());
        return;
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        out.insert(p.to_path_buf(), format!("<link {}>", s(&fs::read_link(p).unwrap())).into_bytes());
    } else if ft.is_dir() {
        out.insert(p.to_path_buf(), b"<dir>".to_vec());
        for e in fs::read_dir(p).unwrap().flatten() {
            snapshot(&e.path(), out);
        }
    } else if ft.is_file() {
        out.insert(p.to_path_buf(), fs::read(p).unwrap());
    } else {
        out.insert(p.to_path_buf(), b"<special>".to_vec());
    }
}

fn snapshot_all(paths: &[PathBuf]) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    for p in paths {
        snapshot(p, &mut m);
    }
    m
}

// ---- file makers ----

fn idx_header(magic: u32, dims: &[u32]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v
}

fn idx_images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    let mut v = idx_header(0x803, &[n, rows, cols]);
    v.extend(vec![7u8; (n * rows * cols) as usize]);
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = idx_header(0x801, &[labels.len() as u32]);
    v.extend(labels);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn png(path: &Path, w: u32, h: u32) {
    image::GrayImage::from_pixel(w, h, image::Luma([200u8])).save(path).unwrap();
}

/// A PNG whose header claims `w × h` (and whose data does not follow).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let chunk = |t: &[u8], d: &[u8]| {
        let mut crc = flate2::Crc::new();
        crc.update(t);
        crc.update(d);
        let mut c = (d.len() as u32).to_be_bytes().to_vec();
        c.extend(t);
        c.extend(d);
        c.extend(crc.sum().to_be_bytes());
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend(chunk(b"IHDR", &ihdr));
    v.extend(chunk(b"IEND", b""));
    v
}

fn meta(dir: &Path, lines: &[&str]) {
    fs::write(dir.join("metadata.jsonl"), lines.join("\n") + "\n").unwrap();
}

/// A dataset folder with two 8×8 images, `a.png` (label 0) and `b.png` (label `b_label`).
fn two_images(b_label: u32) -> impl FnOnce(&Path) {
    move |d| {
        png(&d.join("a.png"), 8, 8);
        png(&d.join("b.png"), 8, 8);
        let b = format!(r#"{{"image": "b.png", "label": {b_label}}}"#);
        meta(d, &[r#"{"image": "a.png", "label": 0}"#, &b]);
    }
}

/// A dataset folder with `a.png` and the given metadata lines.
fn with_a(lines: &'static [&'static str]) -> impl FnOnce(&Path) {
    move |d: &Path| {
        png(&d.join("a.png"), 8, 8);
        meta(d, lines);
    }
}

fn rewrite_tensors(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut t = Tensor::read_safetensors(path).unwrap();
    edit(&mut t);
    Tensor::write_safetensors(&t, path).unwrap();
}

/// Whether permission bits stop this process from writing (they do not for root).
fn permissions_apply(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join("perm-probe");
    fs::create_dir_all(&probe).unwrap();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o555)).unwrap();
    let applies = fs::write(probe.join("x"), b"x").is_err();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o755)).unwrap();
    let _ = fs::remove_dir_all(&probe);
    applies
}

/// Whether a private tmpfs can be mounted (`unshare -rm`: a user and mount namespace of our own).
fn private_tmpfs_works(dir: &Path) -> Result<(), String> {
    let probe = dir.join("tmpfs-probe");
    fs::create_dir_all(&probe).unwrap();
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$1\"", "sh"])
        .arg(&probe)
        .output()
        .map_err(|e| format!("unshare cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("cannot mount a private tmpfs: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

// ---- library cases ----

struct ScaleTask {
    w: Tensor,
}

impl lisa::train::step::TrainTask for ScaleTask {
    fn loss(
        &self,
        _batch: &lisa::train::step::Batch,
        sample: &lisa::diffusion::TrainingSample,
    ) -> lisa::Result<lisa::train::step::TaskLoss> {
        let loss = (&sample.x_t * &self.w).mse_loss(&sample.target, tch::Reduction::Mean);
        Ok(lisa::train::step::TaskLoss { loss, metrics: vec![] })
    }
}

/// Trains a one-parameter task on `images` (and `conditioning`) into `out`; the error, if any.
fn train_on(images: Tensor, conditioning: Option<Tensor>, out: &Path) -> Result<(), String> {
    use lisa::train::trainer::{train, RunDir, TrainConfig};
    let n = images.size()[0];
    let data = lisa::data::Dataset {
        images,
        labels: Tensor::zeros([n], (Kind::Int64, tch::Device::Cpu)),
        num_classes: 1,
        class_names: vec!["x".into()],
        conditioning,
    };
    let w = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
    let task = ScaleTask { w: w.shallow_clone() };
    let cfg = TrainConfig { steps: 2, batch_size: 4, lr_warmup_steps: 0, checkpointing_steps: 1, ..Default::default() };
    let run =
        RunDir::plain(out);
    let objective = lisa::diffusion::Objective::Flow;
    train(&task, vec![("w".into(), w)], &data, &objective, &cfg, &run, |_, _| Ok(()))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn images_with(n: i64, bad: Option<(i64, f64)>) -> Tensor {
    let t = Tensor::zeros([n, 1, 4, 4], (Kind::Float, tch::Device::Cpu));
    if let Some((i, v)) = bad {
        let _ = t.get(i).get(0).get(1).get(2).fill_(v);
    }
    t
}

// ---- the corpus ----

fn build(root: &Path) -> Vec<Case> {
    let config = root.join("tiny.toml");
    fs::write(&config, TINY).unwrap();
    let base_run = root.join("base-run");
    let out = Command::new(lisa_bin())
        .args(["pretrain", "--quiet", "--config"])
        .arg(&config)
        .arg("--output-dir")
        .arg(&base_run)
        .output()
        .unwrap();
    assert!(out.status.success(), "the base run failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut c = Corpus { root: root.to_path_buf(), config: config.clone(), base_run: base_run.clone(), cases: vec![] };

    // IDX files (data.source = a folder of Fashion-MNIST files).
    let labels4 = idx_labels(&[0, 1, 2, 3]);
    let f = "{dir}/train-images-idx3-ubyte";
    let lf = "{dir}/train-labels-idx1-ubyte";
    c.idx("idx-empty-file", b"", &labels4, &[f, "truncated header", "replace it with an intact copy"]);
    c.idx("idx-garbage", b"this is not an IDX file at all", &labels4, &[f, "wrong IDX magic", "replace it"]);
    c.idx("idx-labels-magic-in-image-file", &labels4, &labels4, &[f, "wrong IDX magic 0x00000801", "replace it"]);
    c.idx("idx-header-cut", &idx_header(0x803, &[4])[..8], &labels4, &[f, "truncated header", "replace it"]);
    c.idx("idx-payload-cut", &idx_images(4, 28, 28)[..500], &labels4, &[f, "truncated: expected 3136", "replace it"]);
    let mut trailing = idx_images(4, 28, 28);
    trailing.extend([1, 2, 3]);
    c.idx("idx-trailing-bytes", &trailing, &labels4, &[f, "trailing bytes", "replace it"]);
    c.idx(
        "idx-dims-overflow",
        &idx_header(0x803, &[1 << 31, 1 << 31, 1 << 31]),
        &labels4,
        &[f, "overflow", "replace it"],
    );
    c.idx(
        "idx-dims-2^31x2^31",
        &idx_header(0x803, &[1, 1 << 31, 1 << 31]),
        &labels4,
        &[f, "4611686018427387904", "replace it"],
    );
    c.idx(
        "idx-no-images-huge-dims",
        &idx_header(0x803, &[0, 1 << 31, 1 << 31]),
        &idx_labels(&[]),
        &[f, "holds no images", "give the folder"],
    );
    c.idx("idx-empty-dataset", &idx_images(0, 28, 28), &idx_labels(&[]), &[f, "holds no images", "give the folder"]);
    c.idx(
        "idx-wrong-image-size",
        &idx_images(4, 30, 30),
        &labels4,
        &[f, "30x30, expected 28x28", "not a Fashion-MNIST image file"],
    );
    c.idx(
        "idx-label-out-of-range",
        &idx_images(4, 28, 28),
        &idx_labels(&[0, 1, 200, 3]),
        &[lf, "label 200 (entry 2) out of range", "not a Fashion-MNIST label file"],
    );
    c.idx(
        "idx-count-mismatch",
        &idx_images(4, 28, 28),
        &idx_labels(&[0, 1, 2]),
        &[f, "4 images but 3 labels", lf, "same split"],
    );
    c.idx("idx-corrupt-gzip", b"\x1f\x8b\x08\x00garbage", &labels4, &[f, "corrupt gzip stream", "replace it"]);
    let gz = gzip(&idx_images(4, 28, 28));
    c.idx("idx-gzip-cut", &gz[..gz.len() / 2], &labels4, &[f, "corrupt gzip stream", "replace it"]);
    c.idx("idx-labels-header-cut", &idx_images(4, 28, 28), &[0, 0, 8, 1, 0], &[lf, "truncated header", "replace it"]);
    {
        let d = c.dir("idx-labels-file-missing");
        let idx = d.join("idx");
        fs::create_dir_all(&idx).unwrap();
        fs::write(idx.join("train-images-idx3-ubyte"), idx_images(4, 28, 28)).unwrap();
        let run = d.join("run");
        copy_dir(&base_run, &run);
        let set = format!("data.source={:?}", s(&idx));
        let want = s(&idx.join("train-labels-idx1-ubyte.gz"));
        let args = os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &run, &"--set", &set]);
        c.add(
            "idx-labels-file-missing",
            Run::Exec(lisa_bin(), args),
            &[&want, "not found", "install the Debian package"],
            vec![d],
        );
    }
    c.config(
        "idx-source-not-a-folder",
        &["data.source=\"/nonexistent/fashion\""],
        &["data.source '/nonexistent/fashion'", "use auto, embedded, debian or a folder"],
    );

    // Imagefolders (data.dataset = a folder with metadata.jsonl).
    let m = "{dir}/metadata.jsonl";
    c.folder("if-no-metadata", |d| png(&d.join("a.png"), 8, 8), &[], &[m, "not found", "needs a metadata.jsonl"]);
    c.folder(
        "if-empty-metadata",
        |d| fs::write(d.join("metadata.jsonl"), "").unwrap(),
        &[],
        &[m, "empty dataset", "add one JSON object per image"],
    );
    c.folder(
        "if-blank-lines-only",
        |d| fs::write(d.join("metadata.jsonl"), "\n  \n\t\n").unwrap(),
        &[],
        &[m, "empty dataset", "add one"],
    );
    c.folder("if-missing-image-key", with_a(&[r#"{"label": 0}"#]), &[], &[m, "line 1: missing `image` key"]);
    // Two images, a batch of two: the default held-out fraction took one of them (ceil(0.1 · 2) = 1), and the
    // message says so.
    c.folder(
        "if-held-out-leaves-less-than-a-batch",
        two_images(1),
        &["--set", "train.batch_size=2"],
        &["has 1 example(s) once data.eval_fraction = 0.1", "held out", "data.eval_dataset"],
    );
    c.folder(
        "if-neither-text-nor-label",
        with_a(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "a.png"}"#]),
        &[],
        &[m, "line 2: has neither `text` nor `label`; give exactly one"],
    );
    c.folder(
        "if-text-and-label",
        with_a(&[r#"{"image": "a.png", "text": "bag", "label": 0}"#]),
        &[],
        &[m, "line 1: has both `text` and `label`", "set data.label_column = \"\" to use `text`"],
    );
    c.folder(
        "if-negative-label",
        with_a(&[r#"{"image": "a.png", "label": -3}"#]),
        &[],
        &[m, "line 1: `label` must be a non-negative integer"],
    );
    c.folder(
        "if-fractional-label",
        with_a(&[r#"{"image": "a.png", "label": 1.5}"#]),
        &[],
        &[m, "line 1: `label` must be a non-negative integer"],
    );
    c.folder(
        "if-label-i64-max",
        with_a(&[r#"{"image": "a.png", "label": 9223372036854775807}"#]),
        &[],
        &[m, "line 1: `label` 9223372036854775807 is too large", "number the classes 0, 1, 2"],
    );
    c.folder(
        "if-label-1e8",
        with_a(&[r#"{"image": "a.png", "label": 100000000}"#]),
        &[],
        &[m, "is too large", "number the classes"],
    );
    c.folder(
        "if-text-then-label",
        with_a(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "a.png", "text": "bag"}"#]),
        &[],
        &[m, "line 2: uses `text` but line 1 uses `label`; use one for all lines"],
    );
    c.folder(
        "if-malformed-json",
        with_a(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "a.png", "label": "#]),
        &[],
        &[m, "line 2: malformed JSON"],
    );
    c.folder("if-not-an-object", with_a(&["[\"a.png\", 0]"]), &[], &[m, "line 1: expected a JSON object"]);
    c.folder(
        "if-image-not-a-string",
        with_a(&[r#"{"image": 5, "label": 0}"#]),
        &[],
        &[m, "line 1: `image` must be a non-empty string"],
    );
    c.folder(
        "if-conditioning-on-some-lines",
        with_a(&[
            r#"{"image": "a.png", "conditioning_image": "a.png", "label": 0}"#,
            r#"{"image": "a.png", "label": 0}"#,
        ]),
        &[],
        &[m, "line 2: `conditioning_image` is given on line 1 but not on line 2; give it on all lines or none"],
    );
    c.folder(
        "if-image-missing",
        with_a(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "zz.png", "label": 0}"#]),
        &[],
        &[m, "line 2: image {dir}/zz.png not found", "fix the path"],
    );
    c.folder(
        "if-image-is-a-folder",
        |d| {
            fs::create_dir(d.join("sub")).unwrap();
            meta(d, &[r#"{"image": "sub", "label": 0}"#]);
        },
        &[],
        &[m, "line 1: image {dir}/sub is not a file", "fix the path"],
    );
    c.folder(
        "if-path-with-dotdot",
        with_a(&[r#"{"image": "../outside.png", "label": 0}"#]),
        &[],
        &[m, "line 1: `image` \"../outside.png\" points outside the dataset folder", "give a path relative to"],
    );
    c.folder(
        "if-absolute-path",
        with_a(&[r#"{"image": "/etc/hostname", "label": 0}"#]),
        &[],
        &[m, "line 1: `image` \"/etc/hostname\" points outside the dataset folder", "without `..`"],
    );
    c.folder(
        "if-conditioning-escapes",
        with_a(&[r#"{"image": "a.png", "conditioning_image": "x/../../a.png", "label": 0}"#]),
        &[],
        &[m, "`conditioning_image` \"x/../../a.png\" points outside"],
    );
    c.folder(
        "if-png-truncated",
        |d| {
            png(&d.join("a.png"), 8, 8);
            let b = fs::read(d.join("a.png")).unwrap();
            fs::write(d.join("a.png"), &b[..b.len() / 2]).unwrap();
            meta(d, &[r#"{"image": "a.png", "label": 0}"#]);
        },
        &[],
        &[m, "line 1: cannot decode image {dir}/a.png", "replace it with a PNG, JPEG or BMP image or remove the line"],
    );
    c.folder(
        "if-png-signature-then-junk",
        |d| {
            fs::copy(corpus().join("signature-then-junk.png"), d.join("a.png")).unwrap();
            meta(d, &[r#"{"image": "a.png", "label": 0}"#]);
        },
        &[],
        &[m, "cannot decode image {dir}/a.png", "replace it"],
    );
    c.folder(
        "if-png-100000x100000",
        |d| {
            fs::write(d.join("a.png"), png_header_only(100_000, 100_000)).unwrap();
            meta(d, &[r#"{"image": "a.png", "label": 0}"#]);
        },
        &[],
        &[m, "cannot decode image {dir}/a.png", "replace it"],
    );
    c.folder(
        "if-png-zero-width",
        |d| {
            fs::write(d.join("a.png"), png_header_only(0, 8)).unwrap();
            meta(d, &[r#"{"image": "a.png", "label": 0}"#]);
        },
        &[],
        &[m, "cannot decode image {dir}/a.png", "replace it"],
    );
    c.folder(
        "if-text-file-named-png",
        |d| {
            fs::write(d.join("a.png"), "just text\n").unwrap();
            meta(d, &[r#"{"image": "a.png", "label": 0}"#]);
        },
        &[],
        &[m, "cannot decode image {dir}/a.png", "replace it"],
    );
    c.folder(
        "if-image-size-differs-from-model",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.image_size=16"],
        &["data.image_size = 16 but model.unet.sample_size = 32", "set them to the same size"],
    );
    c.folder(
        "if-rgb-for-a-grey-model",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.channels=3", "--set", "model.unet.in_channels=1", "--set", "model.label_encoder.num_classes=1"],
        &["3×32×32 but model.unet.in_channels = 1", "make data.channels"],
    );
    c.folder(
        "if-two-channels",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.channels=2"],
        &["data.channels must be 1 (grey) or 3 (RGB), got 2"],
    );
    c.config(
        "cfg-conditioning-channels-2",
        &["data.conditioning_channels=2"],
        &["data.conditioning_channels must be 1 (grey), 3 (RGB) or 0 (as data.channels), got 2"],
    );
    c.folder(
        "if-image-size-100000",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.image_size=100000", "--set", "model.unet.sample_size=100000"],
        &["data.image_size must be in 1..=1024, got 100000"],
    );
    c.folder(
        "if-wrong-num-classes",
        with_a(&[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "a.png", "label": 1}"#]),
        &["--set", "model.label_encoder.num_classes=1"],
        &["the dataset has 2 classes but model.label_encoder.num_classes = 1", "raise it to at least 2"],
    );
    c.folder(
        "if-symlink-escapes-folder",
        |d| {
            png(&d.join("a.png"), 8, 8);
            let outside = d.parent().unwrap().join("outside.png");
            png(&outside, 8, 8);
            std::os::unix::fs::symlink(&outside, d.join("b.png")).unwrap();
            meta(d, &[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "b.png", "label": 0}"#]);
        },
        &[],
        &[m, "line 2: `image` {dir}/b.png resolves to", "outside the dataset folder", "set data.follow_symlinks = true"],
    );
    c.folder(
        "if-no-class-column",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.caption_column=\"\"", "--set", "data.label_column=\"\""],
        &["data.caption_column and data.label_column are both empty", "set one of them"],
    );
    c.folder(
        "if-image-column-empty",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.image_column=\"\""],
        &["data.image_column is empty", "name the key that holds the image's file name"],
    );
    c.folder(
        "if-image-column-reused",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.label_column=\"image\""],
        &["data.image_column \"image\" is also used for another column", "give each column its own key"],
    );
    c.folder(
        "if-caption-column-is-label-column",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.label_column=\"text\""],
        &["data.caption_column and data.label_column are both \"text\"", "set one of them to \"\""],
    );
    c.folder(
        "if-label-column-missing",
        with_a(&[r#"{"image": "a.png", "text": "bag"}"#]),
        &["--set", "data.caption_column=\"\""],
        &[m, "line 1: has no `label` (the class id); give one, or set data.caption_column"],
    );
    c.config("cfg-eval-fraction-one", &["data.eval_fraction=1.0"], &["data.eval_fraction must be in [0, 1)"]);
    c.folder(
        "if-pretrain-eval-dataset",
        with_a(&[r#"{"image": "a.png", "label": 0}"#]),
        &["--set", "data.eval_dataset=\"elsewhere\""],
        &["lisa pretrain evaluates on no held-out images", "data.eval_fraction = 0"],
    );
    // A setting that cannot apply to Fashion-MNIST is refused, not recorded and ignored.
    c.config(
        "cfg-image-size-on-fashion-mnist",
        &["data.image_size=100000"],
        &["data.image_size applies only to an imagefolder", "remove it, or set data.dataset"],
    );
    c.folder(
        "if-utf16-metadata",
        |d| {
            png(&d.join("a.png"), 8, 8);
            fs::copy(corpus().join("metadata-utf16.jsonl"), d.join("metadata.jsonl")).unwrap();
        },
        &[],
        &[m, "line 1: not UTF-8 text; save the file as UTF-8"],
    );
    c.folder(
        "if-lone-surrogate-escape",
        with_a(&[r#"{"image": "a\ud800.png", "label": 0}"#]),
        &[],
        &[m, "line 1: malformed JSON"],
    );
    c.folder(
        "if-nfd-name-for-nfc-file",
        |d| {
            png(&d.join("caf\u{e9}.png"), 8, 8);
            meta(d, &["{\"image\": \"cafe\u{301}.png\", \"label\": 0}"]);
        },
        &[],
        &[m, "line 1: image {dir}/cafe\u{301}.png not found", "fix the path"],
    );
    c.folder(
        "if-bom-then-missing-image",
        |d| {
            png(&d.join("a.png"), 8, 8);
            fs::write(d.join("metadata.jsonl"), "\u{feff}{\"text\": \"\u{1f45c}\"}\n").unwrap();
        },
        &[],
        &[m, "line 1: missing `image` key"],
    );

    // Side-network training on users' data (`lisa train` against the shipped main network).
    let given = ["--task", "given", "--set", "given_kind=\"edges\""];
    c.train("ctl-given-without-kind", &["--task", "given"], &["condition = \"given\" needs given_kind", "--set given_kind"]);
    c.train(
        "ctl-given-kind-without-given",
        &["--task", "edges", "--set", "given_kind=\"mask\""],
        &["given_kind applies only to condition = \"given\"", "remove it"],
    );
    c.train(
        "ctl-given-stacked",
        &["--task", "given+edges", "--set", "given_kind=\"edges\""],
        &["given conditions cannot be stacked with extracted ones", "use condition = \"given\""],
    );
    c.train(
        "ctl-given-without-condition-images",
        &[&given[..], &["--set", "data.source=\"embedded\"", "--set", "data.max_examples=8"]].concat(),
        &["fashion-mnist has none", "give an imagefolder whose metadata.jsonl lines have a `conditioning_image`"],
    );
    c.train(
        "ctl-colour-lowres-stacked",
        &["--task", "lowres+edges", "--set", "data.dataset=\"folder\"", "--set", "data.channels=3"],
        &["lowres keeps the colour (3 channels) and cannot be stacked", "train lowres on its own"],
    );
    c.train_on_folder(
        "ctl-no-held-out-images",
        two_images(0),
        &["--set", "data.eval_fraction=0"],
        &["no held-out images", "give data.eval_dataset"],
    );
    let eval_dir = c.dir("ctl-eval-dataset-unknown-class").join("test");
    fs::create_dir_all(&eval_dir).unwrap();
    png(&eval_dir.join("a.png"), 8, 8);
    meta(&eval_dir, &[r#"{"image": "a.png", "text": "hat"}"#]);
    let eval_set = format!("data.eval_dataset={:?}", s(&eval_dir));
    c.train_on_folder(
        "ctl-eval-dataset-unknown-class",
        |d| {
            png(&d.join("a.png"), 8, 8);
            meta(d, &[r#"{"image": "a.png", "text": "bag"}"#]);
        },
        &["--set", &eval_set],
        &[
            &format!("{}/metadata.jsonl", s(&eval_dir)),
            "line 1: `text` \"hat\" is not one of the training folder's classes (bag)",
            "use the training folder's class names",
        ],
    );
    c.train_on_folder(
        "ctl-more-classes-than-the-main-network",
        |d| {
            png(&d.join("a.png"), 8, 8);
            png(&d.join("b.png"), 8, 8);
            meta(d, &[r#"{"image": "a.png", "label": 0}"#, r#"{"image": "b.png", "label": 11}"#]);
        },
        &[],
        &["the dataset has 12 classes but the main network", "knows 10", "use a main network pretrained on this data"],
    );

    // Classifiers for the Fréchet distance on users' data (`lisa classifier`, `--classifier`).
    let rgb = c.dir("clf-fixture").join("rgb");
    fs::create_dir_all(&rgb).unwrap();
    // Lines with a caption and a label, as many datasets have: the classifier learns the labels.
    let lines: Vec<String> =
        (0..4).map(|i| format!(r#"{{"image": "{i}.png", "text": "item {i}", "label": {}}}"#, i % 2)).collect();
    (0..4).for_each(|i| png(&rgb.join(format!("{i}.png")), 8, 8));
    meta(&rgb, &lines.iter().map(String::as_str).collect::<Vec<_>>());
    let clf3 = rgb.with_file_name("classifier");
    let out = Command::new(lisa_bin())
        .args(["classifier", "--epochs", "1", "--threads", "1", "--data", &s(&rgb), "--out", &s(&clf3)])
        .args(["--set", "data.channels=3", "--set", "data.image_size=8", "--set", "data.eval_fraction=0.5"])
        .args(["--set", "train.model.channels=[2, 2, 2]", "--set", "train.model.feature_dim=4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "the classifier fixture failed: {}", String::from_utf8_lossy(&out.stderr));
    let grey_train = ["--task", "edges", "--set", "data.source=\"embedded\"", "--set", "data.max_examples=8"];
    c.train(
        "clf-does-not-fit-the-data",
        &[&grey_train[..], &["--classifier", &s(&clf3)]].concat(),
        &[
            &format!("the classifier in {} takes 3-channel 8×8 images of 2 classes", s(&clf3)),
            "but the data are 1-channel 32×32 images of 10 classes",
            "train one on this data with `lisa classifier --data DIR`",
        ],
    );
    let not_clf = c.dir("clf-not-a-classifier-folder").join("empty");
    fs::create_dir_all(&not_clf).unwrap();
    c.train(
        "clf-not-a-classifier-folder",
        &[&grey_train[..], &["--classifier", &s(&not_clf)]].concat(),
        &[&s(&not_clf), "not a classifier folder (no classifier.json)", "lisa classifier --data DIR --out FOLDER"],
    );
    {
        let d = c.dir("clf-eval-model-does-not-fit");
        let args = os(&[&"eval", &"--classifier", &clf3, &"--num-images", &"2", &"--sampling-steps", &"1"]);
        c.add(
            "clf-eval-model-does-not-fit",
            Run::Exec(lisa_bin(), args),
            &[
                "the model makes 1-channel 32×32 images but the data are 3-channel 8×8 images",
                "give `--model` a main network trained on this data",
            ],
            vec![d, clf3.clone()],
        );
    }
    {
        let d = c.dir("clf-captions-only");
        let data = d.join("data");
        fs::create_dir_all(&data).unwrap();
        with_a(&[r#"{"image": "a.png", "text": "a bag"}"#])(&data);
        let args = os(&[&"classifier", &"--data", &data, &"--out", &d.join("out")]);
        c.add(
            "clf-captions-only",
            Run::Exec(lisa_bin(), args),
            &[
                &format!("{}: line 1: the classes come from captions (`text`)", s(&data.join("metadata.jsonl"))),
                "give every line an integer `label`",
            ],
            vec![d],
        );
    }

    // A tinted colour folder written over an existing dataset, or of no images.
    {
        let d = c.dir("tinted-over-a-dataset");
        let data = d.join("data");
        fs::create_dir_all(&data).unwrap();
        with_a(&[r#"{"image": "a.png", "label": 0}"#])(&data);
        let args = os(&[&"tinted-folder", &"--out", &data, &"--data-source", &"embedded", &"--count", &"4"]);
        c.add(
            "tinted-over-a-dataset",
            Run::Exec(lisa_bin(), args),
            &[&format!("{} already exists", s(&data.join("metadata.jsonl"))), "give an empty or new folder"],
            vec![d],
        );
        let d = c.dir("tinted-count-0");
        let args = os(&[&"tinted-folder", &"--out", &d.join("out"), &"--data-source", &"embedded", &"--count", &"0"]);
        c.add("tinted-count-0", Run::Exec(lisa_bin(), args), &["--count must be in 1..=4000", "got 0"], vec![d]);
    }

    // Configs.
    c.config("cfg-unknown-key", &["train.stepz=3"], &["unknown key 'train.stepz'", "see --print-config"]);
    c.config("cfg-unknown-section", &["trainer.steps=3"], &["unknown section 'trainer'", "trainer.steps"]);
    c.config("cfg-not-key-value", &["train.steps"], &["override 'train.steps' is not of the form key=value"]);
    c.config("cfg-negative-steps", &["train.steps=-1"], &["integer `-1`, expected u64", "train.steps"]);
    c.config("cfg-steps-not-a-number", &["train.steps=many"], &["expected u64", "train.steps"]);
    c.config("cfg-lr-zero", &["train.learning_rate=0"], &["train.learning_rate must be a positive number"]);
    c.config("cfg-lr-nan", &["train.learning_rate=nan"], &["train.learning_rate must be a positive number"]);
    c.config("cfg-lr-inf", &["train.learning_rate=inf"], &["train.learning_rate must be a positive number"]);
    c.config("cfg-batch-zero", &["train.batch_size=0"], &["train.batch_size must be ≥ 1"]);
    c.config(
        "cfg-batch-larger-than-data",
        &["train.batch_size=64"],
        &["fewer than train.batch_size = 64", "lower train.batch_size or add data"],
    );
    c.config(
        "cfg-unknown-lr-schedule",
        &["train.lr_schedule=\"warmup\""],
        &["unknown variant `warmup`", "`constant` or `cosine`", "train.lr_schedule"],
    );
    c.config(
        "cfg-unknown-objective",
        &["model.objective.kind=\"score\""],
        &["unknown variant `score`", "model.objective.kind"],
    );
    c.config("cfg-unknown-log-format", &["train.log_format=\"xml\""], &["unknown variant `xml`", "train.log_format"]);
    c.config("cfg-beta-start-nan", &["model.objective.beta_start=nan"], &["model.objective: need 0 < beta_start"]);
    c.config("cfg-max-grad-norm-nan", &["train.max_grad_norm=nan"], &["train.max_grad_norm must be a number ≥ 0"]);
    c.config(
        "cfg-adam-beta1-2",
        &["train.adam.beta1=2.0"],
        &["train.adam.beta1 and train.adam.beta2 must be in [0, 1)"],
    );
    c.config("cfg-adam-eps-negative", &["train.adam.eps=-1e-8"], &["train.adam.eps must be a positive number"]);
    c.config("cfg-ema-decay-one", &["train.ema_decay=1.0"], &["train.ema_decay must be in [0, 1)"]);
    c.config("cfg-label-dropout-nan", &["label_dropout=nan"], &["label_dropout must be in [0, 1)"]);
    c.config(
        "cfg-validation-sampler-no-steps",
        &["validation.num_images=4", "validation.sampler.steps=0"],
        &["validation.sampler: sampler steps must be ≥ 1"],
    );
    c.config(
        "cfg-unknown-block-type",
        &["model.unet.down_block_types=[\"DownBlock2D\", \"FancyBlock\"]"],
        &[
            "model.unet: down block type \"FancyBlock\" is not supported",
            "use \"CrossAttnDownBlock2D\" or \"DownBlock2D\"",
        ],
    );
    c.config("cfg-device-tpu", &["device=\"tpu\""], &["device 'tpu': use auto, cpu, cuda or cuda:N"]);
    for (name, file, expect) in [
        (
            "cfg-file-unknown-key",
            "unknown-key.toml",
            vec!["unknown-key.toml", "unknown field `stepz`", "expected one of"],
        ),
        ("cfg-file-invalid-toml", "invalid.toml", vec!["invalid.toml", "invalid TOML"]),
        ("cfg-file-not-utf8", "latin1.toml", vec!["latin1.toml", "not UTF-8 text; save the config file as UTF-8"]),
        (
            "cfg-file-negative-steps",
            "negative-steps.toml",
            vec!["negative-steps.toml", "integer `-5`, expected u64", "train.steps"],
        ),
    ] {
        let d = c.dir(name);
        let run = d.join("run");
        copy_dir(&base_run, &run);
        let args = os(&[&"pretrain", &"--quiet", &"--config", &corpus().join(file), &"--output-dir", &run]);
        c.add(name, Run::Exec(lisa_bin(), args), &expect, vec![d, corpus().join(file)]);
    }
    {
        let d = c.dir("cfg-file-missing");
        let missing = d.join("no-such.toml");
        let args = os(&[&"pretrain", &"--quiet", &"--config", &missing]);
        c.add(
            "cfg-file-missing",
            Run::Exec(lisa_bin(), args),
            &[&s(&missing), "No such file", "check the path"],
            vec![d],
        );
    }

    // Checkpoints (a copy of the base run; checkpoint-2 is damaged).
    let resume = |run: &Path, config: &Path| {
        os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &run, &"--resume", &"latest"])
    };
    let export = |run: &Path, _: &Path| {
        os(&[&"export", &"--checkpoint", &run.join("checkpoint-2"), &"--out", &run.join("exported")])
    };
    let sample = |run: &Path, _: &Path| {
        os(&[
            &"sample",
            &"--model",
            &run.join("checkpoint-2"),
            &"--labels",
            &"0",
            &"--per-label",
            &"1",
            &"--sampling-steps",
            &"2",
            &"--out",
            &run.join("s.png"),
        ])
    };
    let ck = "{run}/checkpoint-2";
    c.checkpoint(
        "ckpt-model-file-missing",
        |d| fs::remove_file(d.join("model.safetensors")).unwrap(),
        resume,
        &[&format!("{ck}/model.safetensors"), "missing file", "use another checkpoint"],
    );
    c.checkpoint(
        "ckpt-optimizer-missing",
        |d| fs::remove_file(d.join("optimizer.safetensors")).unwrap(),
        resume,
        &[&format!("{ck}/optimizer.safetensors"), "missing file", "use another checkpoint"],
    );
    c.checkpoint(
        "ckpt-weights-missing-for-export",
        |d| {
            fs::remove_file(d.join("ema.safetensors")).unwrap();
            fs::remove_file(d.join("model.safetensors")).unwrap();
        },
        export,
        &[&format!("{ck}/model.safetensors"), "missing file", "use another checkpoint"],
    );
    c.checkpoint(
        "ckpt-model-truncated",
        |d| {
            let b = fs::read(d.join("model.safetensors")).unwrap();
            fs::write(d.join("model.safetensors"), &b[..b.len() / 3]).unwrap();
        },
        resume,
        &[&format!("{ck}/model.safetensors"), "unreadable tensors", "the file is damaged"],
    );
    c.checkpoint(
        "ckpt-ema-garbage",
        |d| fs::write(d.join("ema.safetensors"), [0xffu8; 100]).unwrap(),
        sample,
        &[&format!("{ck}/ema.safetensors"), "unreadable tensors", "the file is damaged"],
    );
    c.checkpoint(
        "ckpt-ema-empty",
        |d| fs::write(d.join("ema.safetensors"), b"").unwrap(),
        export,
        &[&format!("{ck}/ema.safetensors"), "unreadable tensors", "the file is damaged"],
    );
    c.checkpoint(
        "ckpt-extra-tensor",
        |d| {
            rewrite_tensors(&d.join("model.safetensors"), |t| {
                t.push(("extra.weight".into(), Tensor::ones([3], (Kind::Float, tch::Device::Cpu))))
            });
        },
        resume,
        &[
            ck,
            "has parameter 'extra.weight' that the model does not",
            "load it with the configuration it was trained with",
        ],
    );
    c.checkpoint(
        "ckpt-tensor-missing",
        |d| {
            rewrite_tensors(&d.join("ema.safetensors"), |t| t.retain(|(n, _)| n != "conv_in.weight"));
        },
        export,
        &[&format!("{ck}/ema.safetensors"), "lacks parameter 'conv_in.weight'", "load it with the configuration"],
    );
    c.checkpoint(
        "ckpt-tensor-wrong-shape",
        |d| {
            rewrite_tensors(&d.join("model.safetensors"), |t| {
                for (n, v) in t.iter_mut() {
                    if n == "conv_in.bias" {
                        *v = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu));
                    }
                }
            });
        },
        resume,
        &[ck, "parameter 'conv_in.bias' has shape [5] but the model expects [8]", "different model configuration"],
    );
    c.checkpoint(
        "ckpt-optimizer-state-of-other-model",
        |d| {
            rewrite_tensors(&d.join("optimizer.safetensors"), |t| t.retain(|(n, _)| !n.starts_with("conv_out")));
        },
        resume,
        &[
            &format!("{ck}/optimizer.safetensors"),
            "optimizer state lacks 'conv_out.bias.exp_avg'",
            "use another checkpoint",
        ],
    );
    c.checkpoint(
        "ckpt-resume-other-model-config",
        |_| {},
        |run, config| {
            let mut a = resume(run, config);
            a.extend(os(&[&"--set", &"model.unet.block_out_channels=[8, 8]"]));
            a
        },
        &[ck, "different configuration", "resume with the same config file"],
    );
    c.checkpoint(
        "ckpt-export-other-model-config",
        |d| {
            let cfg = d.join("../config.json");
            let text = fs::read_to_string(&cfg).unwrap().replacen(
                "\"cross_attention_dim\": 16",
                "\"cross_attention_dim\": 32",
                1,
            );
            fs::write(cfg, text).unwrap();
        },
        export,
        &[&format!("{ck}/ema.safetensors"), "different model configuration"],
    );
    c.checkpoint(
        "ckpt-state-garbage",
        |d| fs::write(d.join("state.json"), "not json").unwrap(),
        resume,
        &[&format!("{ck}/state.json"), "malformed checkpoint state", "use another checkpoint-N"],
    );
    c.checkpoint(
        "ckpt-state-missing-fields",
        |d| fs::write(d.join("state.json"), r#"{"step": 2}"#).unwrap(),
        resume,
        &[ck, "malformed state.json: missing field", "use another checkpoint-N"],
    );
    c.checkpoint(
        "ckpt-state-position-past-data",
        |d| {
            let p = d.join("state.json");
            let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
            v["data"]["position"] = 1_000_000.into();
            fs::write(p, v.to_string()).unwrap();
        },
        resume,
        &[&format!("{ck}/state.json"), "past the dataset size", "use another checkpoint-N"],
    );
    c.checkpoint(
        "ckpt-config-json-garbage",
        |d| fs::write(d.join("../config.json"), "{").unwrap(),
        export,
        &["{run}/checkpoint-2/../config.json", "invalid model config", "restore the config.json"],
    );
    c.checkpoint(
        "ckpt-config-json-bad-values",
        |d| {
            let cfg = d.join("../config.json");
            let text =
                fs::read_to_string(&cfg).unwrap().replacen("\"norm_num_groups\": 4", "\"norm_num_groups\": 3", 1);
            fs::write(cfg, text).unwrap();
        },
        sample,
        &["{run}/checkpoint-2/../config.json", "invalid model config: unet:", "norm_num_groups 3"],
    );
    c.checkpoint(
        "ckpt-resume-not-a-checkpoint",
        |_| {},
        |run, config| {
            os(&[
                &"pretrain",
                &"--quiet",
                &"--config",
                &config,
                &"--output-dir",
                &run,
                &"--resume",
                &run.join("model"),
                &"--steps",
                &"3",
            ])
        },
        &["{run}/model", "not a complete checkpoint (no state.json)", "give a checkpoint-N folder"],
    );
    c.checkpoint(
        "ckpt-new-run-over-old-run",
        |_| {},
        |run, config| os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &run, &"--steps", &"3"]),
        &["{run}", "holds the checkpoints of an earlier run", "--resume latest, or choose another output folder"],
    );
    {
        // `--resume latest` with no checkpoint yet starts a fresh run (tests/cli.rs); a named checkpoint that is
        // not there stays an error.
        let d = c.dir("ckpt-resume-named-checkpoint-missing");
        let run = d.join("run");
        fs::create_dir_all(&run).unwrap();
        fs::write(run.join("notes.txt"), "keep me").unwrap();
        let missing = run.join("checkpoint-7");
        let args = os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &run, &"--resume", &missing]);
        c.add(
            "ckpt-resume-named-checkpoint-missing",
            Run::Exec(lisa_bin(), args),
            &[&s(&missing), "not a complete checkpoint (no state.json)", "give a checkpoint-N folder"],
            vec![d],
        );
    }

    // Non-finite pixels and empty data, through the library (PNG and IDX hold no NaN).
    for (name, images, cond, expect) in [
        ("lib-nan-pixel", images_with(8, Some((3, f64::NAN))), None, "the image of training example 3"),
        ("lib-inf-pixel", images_with(8, Some((6, f64::NEG_INFINITY))), None, "the image of training example 6"),
        (
            "lib-inf-condition",
            images_with(8, None),
            Some(images_with(8, Some((5, f64::INFINITY)))),
            "the condition image of training example 5",
        ),
    ] {
        let out = c.dir(name).join("run");
        let (images, cond) = (std::sync::Mutex::new(Some(images)), std::sync::Mutex::new(cond));
        let out2 = out.clone();
        c.cases.push(Case {
            name: name.into(),
            run: Run::Lib(Box::new(move || {
                train_on(images.lock().unwrap().take().unwrap(), cond.lock().unwrap().take(), &out2)
            })),
            expect: vec![expect.into(), "NaN or infinite pixel values; fix or remove it".into()],
            keep: vec![],
            after: Some(Box::new(move || if out.exists() { Err(format!("{} was created", s(&out))) } else { Ok(()) })),
        });
    }
    {
        let out = c.dir("lib-empty-dataset").join("run");
        let out2 = out.clone();
        c.cases.push(Case {
            name: "lib-empty-dataset".into(),
            run: Run::Lib(Box::new(move || train_on(images_with(0, None), None, &out2))),
            expect: vec![
                "the dataset has 0 examples, fewer than train.batch_size = 4; lower train.batch_size or add data"
                    .into(),
            ],
            keep: vec![],
            after: Some(Box::new(move || if out.exists() { Err(format!("{} was created", s(&out))) } else { Ok(()) })),
        });
    }

    // Outputs that cannot be written.
    {
        let d = c.dir("out-under-a-file");
        fs::write(d.join("file"), "a regular file").unwrap();
        let out = d.join("file/run");
        let args = os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &out]);
        c.add(
            "out-under-a-file",
            Run::Exec(lisa_bin(), args),
            &[&s(&out), "Not a directory", "part of the path is a file, not a folder: choose another location"],
            vec![d],
        );
    }
    {
        let d = c.dir("out-is-a-file");
        fs::write(d.join("run"), "a regular file").unwrap();
        let out = d.join("run");
        let args = os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &out]);
        c.add(
            "out-is-a-file",
            Run::Exec(lisa_bin(), args),
            &[&s(&out), "File exists", "choose another location"],
            vec![d],
        );
    }
    {
        let d = c.dir("out-read-only-folder");
        let out = d.join("locked/run");
        if permissions_apply(&d) {
            use std::os::unix::fs::PermissionsExt;
            fs::create_dir_all(d.join("locked")).unwrap();
            fs::set_permissions(d.join("locked"), fs::Permissions::from_mode(0o555)).unwrap();
            let args = os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &out]);
            c.add(
                "out-read-only-folder",
                Run::Exec(lisa_bin(), args),
                &[&s(&out), "Permission denied", "check its permissions or choose another location"],
                vec![d],
            );
        } else {
            let why =
                "permission bits do not stop this user (root); out-under-a-file covers an unwritable output instead";
            c.add("out-read-only-folder", Run::Skip(why.into()), &[], vec![]);
        }
    }
    {
        // A full disk, for a write that opens its file in place: metrics.csv is a link to /dev/full,
        // where every write fails with ENOSPC. (Never point a path that is replaced by renaming at
        // /dev/full itself: the rename would replace the device.)
        let d = c.dir("out-disk-full-dev-full");
        let out = d.join("run");
        fs::create_dir_all(&out).unwrap();
        std::os::unix::fs::symlink("/dev/full", out.join("metrics.csv")).unwrap();
        let args = os(&[&"pretrain", &"--quiet", &"--config", &config, &"--output-dir", &out]);
        c.add(
            "out-disk-full-dev-full",
            Run::Exec(lisa_bin(), args),
            &[
                &s(&out.join("metrics.csv")),
                "No space left on device",
                "the disk is full: free some space or choose another location",
            ],
            vec![],
        );
        let out2 = out.clone();
        c.cases.last_mut().unwrap().after = Some(Box::new(move || {
            let link = fs::read_link(out2.join("metrics.csv")).map_err(|e| e.to_string())?;
            if link != Path::new("/dev/full") {
                return Err("metrics.csv is no longer the link".into());
            }
            no_temporaries(&out2)
        }));
    }
    {
        // A full disk for real: a 600 KiB tmpfs in a private mount namespace; the first checkpoint does not fit.
        let d = c.dir("out-disk-full-tmpfs");
        match private_tmpfs_works(&d) {
            Ok(()) => {
                let mnt = d.join("mnt");
                fs::create_dir_all(&mnt).unwrap();
                let listing = d.join("listing.txt");
                let script = "mount -t tmpfs -o size=600k tmpfs \"$1\" || exit 99; \
                              \"$2\" pretrain --quiet --config \"$3\" --output-dir \"$1/run\"; rc=$?; \
                              ls -A \"$1/run\" > \"$4\"; exit $rc";
                let args = os(&[&"-rm", &"sh", &"-c", &script, &"sh", &mnt, &lisa_bin(), &config, &listing]);
                let want = s(&mnt.join("run/checkpoint-1"));
                c.add(
                    "out-disk-full-tmpfs",
                    Run::Exec("unshare".into(), args),
                    &[&want, "No space left on device", "the disk is full: free some space"],
                    vec![],
                );
                c.cases.last_mut().unwrap().after = Some(Box::new(move || {
                    let names = fs::read_to_string(&listing).map_err(|e| e.to_string())?;
                    if names.lines().any(|n| n.starts_with(".checkpoint-") || n.starts_with("checkpoint-")) {
                        return Err(format!("a partial checkpoint was left behind: {names}"));
                    }
                    if !names.lines().any(|n| n == "config.toml") {
                        return Err(format!("the run folder lost its config.toml: {names}"));
                    }
                    Ok(())
                }));
            }
            Err(why) => c.add(
                "out-disk-full-tmpfs",
                Run::Skip(format!("{why}; out-disk-full-dev-full covers a full disk")),
                &[],
                vec![],
            ),
        }
    }
    {
        let d = c.dir("out-sample-to-a-pipe");
        let fifo = d.join("grid.png");
        let made = Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
        if made {
            let args = os(&[
                &"sample",
                &"--model",
                &base_run.join("model"),
                &"--labels",
                &"0",
                &"--per-label",
                &"1",
                &"--sampling-steps",
                &"2",
                &"--out",
                &fifo,
            ]);
            c.add(
                "out-sample-to-a-pipe",
                Run::Exec(lisa_bin(), args),
                &[&s(&fifo), "exists and is not a regular file", "give the path of a PNG file"],
                vec![d],
            );
        } else {
            c.add("out-sample-to-a-pipe", Run::Skip("mkfifo is not available".into()), &[], vec![]);
        }
    }
    {
        let d = c.dir("out-sample-folder-missing");
        let png_out = d.join("no/such/folder/grid.png");
        let args = os(&[
            &"sample",
            &"--model",
            &base_run.join("model"),
            &"--labels",
            &"0",
            &"--per-label",
            &"1",
            &"--sampling-steps",
            &"2",
            &"--out",
            &png_out,
        ]);
        c.add(
            "out-sample-folder-missing",
            Run::Exec(lisa_bin(), args),
            &[&s(&png_out), "No such file or directory", "check the path"],
            vec![d],
        );
    }
    {
        let d = c.dir("out-export-under-a-file");
        fs::write(d.join("file"), "a regular file").unwrap();
        let out = d.join("file/model");
        let args = os(&[&"export", &"--checkpoint", &base_run.join("checkpoint-2"), &"--out", &out]);
        c.add(
            "out-export-under-a-file",
            Run::Exec(lisa_bin(), args),
            &[&s(&out), "Not a directory", "choose another location"],
            vec![d],
        );
    }
    c.cases
}

fn no_temporaries(dir: &Path) -> Result<(), String> {
    for e in fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(".checkpoint-") || n.starts_with("checkpoint-") {
            return Err(format!("{n} was left behind in {}", s(dir)));
        }
    }
    Ok(())
}

/// Runs `program args` with a deadline; `(success, stderr)`.
fn exec(program: &Path, args: &[OsString], limit: Duration) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("RUST_BACKTRACE")
        .spawn()
        .expect("start the command");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let err = reader.join().unwrap();
    match status {
        Some(st) => (st.success(), err),
        None => (false, format!("TIMED OUT after {limit:?}\n{err}")),
    }
}

/// The problems with one case's outcome (empty = it passed).
fn judge(case: &Case, ok: bool, stderr: &str) -> Vec<String> {
    let mut problems = vec![];
    if ok {
        problems.push("succeeded".to_string());
    }
    if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") || stderr.contains("TIMED OUT") {
        problems.push("panicked or timed out".into());
    }
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    match errors.as_slice() {
        [line] => {
            for want in &case.expect {
                if !line.contains(want.as_str()) {
                    problems.push(format!("missing {want:?}"));
                }
            }
        }
        _ => problems.push("not exactly one `error:` line".into()),
    }
    problems
}

/// Runs one case: `None` if skipped, else its time, problems and stderr.
fn run_case(case: &Case) -> Option<(f64, Vec<String>, String)> {
    let before = snapshot_all(&case.keep);
    let t = Instant::now();
    let (ok, stderr) = match &case.run {
        Run::Skip(_) => return None,
        Run::Exec(program, args) => exec(program, args, Duration::from_secs(90)),
        Run::Lib(f) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(())) => (true, String::new()),
            Ok(Err(e)) => (false, format!("error: {e}")),
            Err(_) => (false, "panicked".into()),
        },
    };
    let seconds = t.elapsed().as_secs_f64();
    let mut problems = judge(case, ok, &stderr);
    if snapshot_all(&case.keep) != before {
        problems.push("changed what was there before".into());
    }
    if let Some(after) = &case.after {
        if let Err(e) = after() {
            problems.push(e);
        }
    }
    Some((seconds, problems, stderr))
}

#[test]
fn every_bad_input_is_a_clear_error_that_loses_nothing() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let cases = build(tmp.path());
    let built = t0.elapsed();
    // Two workers run the cases' processes; library cases run on this thread, one at a time (libtorch's
    // generator is process-wide).
    let results: Vec<std::sync::Mutex<Option<Option<(f64, Vec<String>, String)>>>> =
        cases.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                if !matches!(case.run, Run::Lib(_)) {
                    *results[i].lock().unwrap() = Some(run_case(case));
                }
            });
        }
        for (i, case) in cases.iter().enumerate() {
            if matches!(case.run, Run::Lib(_)) {
                *results[i].lock().unwrap() = Some(run_case(case));
            }
        }
    });
    let mut failures = vec![];
    let (mut ran, mut skipped) = (0, 0);
    for (case, result) in cases.iter().zip(results) {
        let Some((seconds, problems, stderr)) = result.into_inner().unwrap().expect("every case ran") else {
            if let Run::Skip(why) = &case.run {
                eprintln!("SKIP {}: {why}", case.name);
            }
            skipped += 1;
            continue;
        };
        ran += 1;
        let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or("(no error line)");
        let verdict = if problems.is_empty() { "ok" } else { "FAIL" };
        eprintln!("{seconds:>5.1}s {verdict:<4} {}: {line}", case.name);
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n    stderr: {}", case.name, problems.join("; "), stderr.trim()));
        }
    }
    eprintln!(
        "{} cases ({ran} run, {skipped} skipped) in {:.1} s (fixtures {:.1} s)",
        cases.len(),
        t0.elapsed().as_secs_f64(),
        built.as_secs_f64()
    );
    assert!(ran >= 50, "only {ran} cases ran");
    assert!(failures.is_empty(), "{} of {ran} cases failed:\n{}", failures.len(), failures.join("\n"));
}
