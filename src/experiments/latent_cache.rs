//! `train-sd`'s training data, encoded once and kept on disk: each image's VAE latents (f32) and its condition
//! image (bytes, as decoded), one row per example, read a batch at a time ([`RowFile`]), so that the training
//! process holds only the batch and its peak memory does not grow with the dataset.
//!
//! The cache sits next to the dataset (`<data>/.lisa-cache/`, or `latent_cache_dir`), one folder per VAE (and
//! the precision its weights are held in), resolution and seed. The VAE is named by a SHA-256 over its folder's files (names and bytes), each example by
//! a SHA-256 over its image's and condition's bytes; a run reuses the rows whose example is unchanged and
//! encodes the others, so a changed image re-encodes that image and a changed VAE file re-encodes everything.
//! Each latent is one draw from the encoder's Gaussian seeded by the run's seed and the example's key, so a row
//! does not depend on which other rows were encoded with it. Several processes (a data-parallel launch) share
//! the encoding: each encodes every `world`-th example into the same files, between barriers.
//!
//! The prompts need no cache: their text-encoder states are computed once per run for the distinct captions.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::data::imagefolder::FolderIndex;
use crate::data::row_file::{RowFile, RowKind};
use crate::data::TrainingExamples;
use crate::models::AutoencoderKL;
use crate::{Error, Result};

/// The cache folder's name inside the dataset folder.
pub const CACHE_DIR: &str = ".lisa-cache";
const INDEX_FILE: &str = "index.json";
const LATENTS_FILE: &str = "latents.f32";
const CONDITIONS_FILE: &str = "conditions.u8";
/// Bumped when the layout or the encoding changes, so that an older cache is rebuilt rather than misread.
const FORMAT: u32 = 1;

/// What a cache folder holds, row by row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheIndex {
    format: u32,
    /// The VAE's key.
    vae: String,
    resolution: u32,
    seed: u64,
    latent_shape: Vec<i64>,
    condition_shape: Vec<i64>,
    /// Each row's example key, in row order.
    rows: Vec<String>,
}

/// train-sd's examples on disk: latents and condition images read per batch, labels in memory.
#[derive(Debug)]
pub struct EncodedExamples {
    latents: RowFile,
    conditions: RowFile,
    labels: Tensor,
    device: Device,
    /// The cache folder.
    pub dir: PathBuf,
    /// Latent shape of one example `[C, h, w]`.
    pub latent_shape: Vec<i64>,
    /// Examples encoded by this process in this call.
    pub encoded: usize,
    /// Examples whose cached rows were reused.
    pub reused: usize,
}

impl TrainingExamples for EncodedExamples {
    fn len(&self) -> usize {
        self.latents.rows() as usize
    }

    fn batch(&self, indices: &[i64]) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let latents = self.latents.read_rows(indices)?.f_to_device(self.device)?;
        // Bytes as decoded, so `/ 255` gives exactly the f32 the in-memory loader makes.
        let conditions = self.conditions.read_rows(indices)?.f_to_device(self.device)?.f_to_kind(Kind::Float)? / 255.0;
        let idx = Tensor::from_slice(indices).f_to_device(self.labels.device())?;
        Ok((latents, self.labels.f_index_select(0, &idx)?, Some(conditions)))
    }

    fn first_non_finite(&self) -> Result<Option<(&'static str, i64, i64)>> {
        // Condition bytes are always finite; latents are scanned in chunks, never all at once.
        let (mut first, mut count) = (None, 0);
        let n = self.latents.rows();
        for start in (0..n).step_by(256) {
            let idx: Vec<i64> = (start..(start + 256).min(n)).collect();
            if let Some((i, k)) = crate::data::first_non_finite_row(&self.latents.read_rows(&idx)?)? {
                first.get_or_insert(start + i);
                count += k;
            }
        }
        Ok(first.map(|i| ("image latents", i, count)))
    }
}

/// Hex SHA-256 of `parts` (each length-prefixed, so that moving bytes between parts changes the key).
fn sha256_of(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The VAE's key: its folder's files, names and bytes, in name order (weights in any variant or shard, and
/// the config).
fn vae_key(vae_dir: &Path) -> Result<String> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(vae_dir)
        .map_err(|e| Error::io(vae_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in &names {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        loop {
            let k = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// An example's key: its image's and its condition's bytes.
fn example_key(index: &FolderIndex, i: usize) -> Result<String> {
    let r = &index.records[i];
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
    let image = read(&r.image)?;
    let condition = r.conditioning_image.as_deref().map(read).transpose()?.unwrap_or_default();
    Ok(sha256_of(&[&image, &condition]))
}

/// Where the cache of this VAE, resolution and seed lives under `root`.
fn cache_folder(root: &Path, vae: &str, precision: crate::models::MixedPrecision, resolution: u32, seed: u64) -> PathBuf {
    let held = match precision.kind() {
        None => String::new(),
        Some(_) => format!("-{precision}"),
    };
    root.join(format!("sd-{}{held}-{resolution}px-seed{seed}", &vae[..16]))
}

fn read_index(dir: &Path) -> Option<CacheIndex> {
    let text = std::fs::read_to_string(dir.join(INDEX_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// A barrier across the launch's processes, if there are several.
fn barrier() -> Result<()> {
    match crate::distributed::current() {
        Some(g) => g.barrier(),
        None => Ok(()),
    }
}

/// The settings of [`encode_or_reuse`].
#[derive(Debug, Clone)]
pub struct CacheRequest<'a> {
    /// The VAE's folder (its files name it).
    pub vae_dir: &'a Path,
    /// Where the cache folders go (e.g. `<data>/.lisa-cache`).
    pub root: &'a Path,
    /// The images' side in pixels.
    pub resolution: u32,
    /// Seeds each example's latent draw (with the example's key).
    pub seed: u64,
    /// The dtype the VAE's weights are held in (`train.mixed_precision`): rounded weights encode otherwise.
    pub vae_precision: crate::models::MixedPrecision,
    /// Where batches go.
    pub device: Device,
}

/// The examples of `index` encoded by `vae`: read from the cache where their rows are current, encoded (and
/// written) where not; see the module doc. With several processes, call it on all of them.
pub fn encode_or_reuse(
    index: &FolderIndex,
    vae: &AutoencoderKL,
    req: &CacheRequest,
    log: &mut dyn FnMut(&str),
) -> Result<EncodedExamples> {
    let n = index.len();
    if n == 0 {
        return Err(Error::Config("no examples to encode".into()));
    }
    // In a launch of several processes the group is joined here (the trainer would join it later), so that
    // they split the encoding instead of each writing the same files.
    let group = crate::distributed::join_from_env(req.device)?;
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
    let vae_key = vae_key(req.vae_dir)?;
    let dir = cache_folder(req.root, &vae_key, req.vae_precision, req.resolution, req.seed);
    let keys = (0..n).map(|i| example_key(index, i)).collect::<Result<Vec<_>>>()?;
    // The shapes, from the first example (all are fitted to one square size).
    let first = index.example(0)?;
    let condition = first.condition.ok_or_else(|| Error::Config("the examples have no conditioning_image".into()))?;
    let condition_shape = condition.size();
    let latent_shape = tch::no_grad(|| vae.encode(&first.image.unsqueeze(0).to_device(req.device)))?.mean.size()[1..].to_vec();
    let wanted = CacheIndex {
        format: FORMAT,
        vae: vae_key.clone(),
        resolution: req.resolution,
        seed: req.seed,
        latent_shape: latent_shape.clone(),
        condition_shape: condition_shape.clone(),
        rows: keys.clone(),
    };
    let old = read_index(&dir).filter(|o| CacheIndex { rows: o.rows.clone(), ..wanted.clone() } == *o);
    let current = old.as_ref().is_some_and(|o| o.rows == keys);
    // Every process decides before any writes.
    barrier()?;
    let (mut encoded, mut reused) = (0, n);
    if !current {
        let tmp = dir.with_extension("tmp");
        if rank == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| {
                Error::Config(format!(
                    "cannot write the encoded-data cache at {} ({e}); set latent_cache_dir to a writable folder",
                    tmp.display()
                ))
            })?;
            RowFile::create(&tmp.join(LATENTS_FILE), RowKind::F32, &latent_shape, n as i64)?;
            RowFile::create(&tmp.join(CONDITIONS_FILE), RowKind::U8, &condition_shape, n as i64)?;
        }
        barrier()?;
        let latents = RowFile::open(&tmp.join(LATENTS_FILE), RowKind::F32, &latent_shape, n as i64)?;
        let conditions = RowFile::open(&tmp.join(CONDITIONS_FILE), RowKind::U8, &condition_shape, n as i64)?;
        let old_rows: HashMap<&str, i64> = old
            .as_ref()
            .map(|o| o.rows.iter().enumerate().map(|(i, k)| (k.as_str(), i as i64)).collect())
            .unwrap_or_default();
        let old_files = match &old {
            Some(o) => Some((
                RowFile::open(&dir.join(LATENTS_FILE), RowKind::F32, &latent_shape, o.rows.len() as i64)?,
                RowFile::open(&dir.join(CONDITIONS_FILE), RowKind::U8, &condition_shape, o.rows.len() as i64)?,
            )),
            None => None,
        };
        let mine: Vec<usize> = (rank..n).step_by(world).collect();
        let mut to_encode = Vec::new();
        for &i in &mine {
            match (old_rows.get(keys[i].as_str()), &old_files) {
                (Some(&j), Some((ol, oc))) => {
                    latents.write_row(i as i64, &ol.read_rows(&[j])?.squeeze_dim(0))?;
                    conditions.write_row(i as i64, &oc.read_rows(&[j])?.squeeze_dim(0))?;
                }
                _ => to_encode.push(i),
            }
        }
        encoded = to_encode.len();
        reused = mine.len() - encoded;
        if encoded > 0 {
            log(&format!("encoding {encoded} of {n} examples with the VAE into {}", dir.display()));
        }
        // One example at a time: a batched convolution may round differently with other rows beside it, and
        // a row must not depend on which others were encoded with it.
        for &i in &to_encode {
            let e = index.example(i)?;
            let dist = tch::no_grad(|| vae.encode(&e.image.unsqueeze(0).to_device(req.device)))?;
            let std = dist.logvar.f_mul_scalar(0.5)?.f_exp()?;
            let key = u64::from_str_radix(&keys[i][..16], 16).map_err(|e| Error::Training(e.to_string()))?;
            tch::manual_seed(crate::rng::derive_seed(req.seed, key) as i64);
            let eps = crate::rng::randn_on_host(&latent_shape, Kind::Float, req.device)?;
            let z = vae.model_latents(&dist.mean.get(0).f_add(&std.get(0).f_mul(&eps)?)?)?;
            latents.write_row(i as i64, &z)?;
            let c = e.condition.as_ref().ok_or_else(|| {
                Error::Config(format!("example {i} has no conditioning_image (every line needs one)"))
            })?;
            conditions.write_row(i as i64, &(c * 255.0).f_round()?)?;
        }
        latents.sync()?;
        conditions.sync()?;
        barrier()?;
        if rank == 0 {
            let text = serde_json::to_string(&wanted).map_err(|e| Error::Training(e.to_string()))?;
            std::fs::write(tmp.join(INDEX_FILE), text).map_err(|e| Error::io(&tmp, e))?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
            std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        }
        barrier()?;
    }
    let labels = Tensor::from_slice(&index.labels).f_to_device(req.device)?;
    Ok(EncodedExamples {
        latents: RowFile::open(&dir.join(LATENTS_FILE), RowKind::F32, &latent_shape, n as i64)?,
        conditions: RowFile::open(&dir.join(CONDITIONS_FILE), RowKind::U8, &condition_shape, n as i64)?,
        labels,
        device: req.device,
        dir,
        latent_shape,
        encoded,
        reused,
    })
}
