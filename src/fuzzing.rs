//! The entry points of the fuzz targets (`fuzz/`, run with `cargo fuzz`) and of their regression test
//! (`tests/fuzz_regressions.rs`, which replays the committed corpus and every crash found). Each feeds
//! arbitrary bytes to one reader of user input. The contract they check: an `Ok` or an `Err` with a
//! message, never a panic, an abort or a hang.
use std::path::Path;

use tch::Tensor;

use crate::experiments::control_config::ControlConfig;
use crate::experiments::latent::LatentControlConfig;
use crate::experiments::pretrain::PretrainConfig;

/// The IDX reader: the bytes as an image file and as a label file (plain or gzipped).
pub fn idx(data: &[u8]) {
    let name = Path::new("fuzz.idx");
    if let Ok(images) = crate::data::idx::images_from_bytes(data, name) {
        // What the loader does next: every image is addressable.
        for i in 0..images.count.min(4) {
            let _ = images.image(i);
        }
    }
    let _ = crate::data::idx::labels_from_bytes(data, name);
}

/// The imagefolder `metadata.jsonl` parser (keys, paths, consistency; no image is opened).
pub fn metadata_jsonl(data: &[u8]) {
    let _ = crate::data::imagefolder::parse_metadata(data.to_vec(), Path::new("dataset"));
}

/// The config parser: the bytes (when UTF-8) as the TOML file of each run kind, then validated; and
/// each of their lines as a `--set` override on the defaults.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    if let Ok(c) = crate::config::from_text::<ControlConfig>(Some((text, path)), &[]) {
        let _ = c.validate();
        let _ = c.condition_set();
    }
    let _ = crate::config::from_text::<PretrainConfig>(Some((text, path)), &[]);
    if let Ok(c) = crate::config::from_text::<LatentControlConfig>(Some((text, path)), &[]) {
        let _ = c.validate();
    }
    let overrides: Vec<String> = text.lines().take(8).map(str::to_string).collect();
    if let Ok(c) = crate::config::from_text::<ControlConfig>(None, &overrides) {
        let _ = c.validate();
    }
}

/// The checkpoint loader: the bytes as a checkpoint's `state.json`, and as a safetensors weight file
/// read and loaded by name and shape into a small fixed set of parameters. The file is written to
/// `scratch` (a folder of the caller's; a RAM disk keeps the fuzzer fast).
pub fn checkpoint(data: &[u8], scratch: &Path) {
    let _ = crate::train::checkpoint::parse_state(data, &scratch.join(crate::train::checkpoint::STATE_FILE));
    let file = "model.safetensors";
    if std::fs::write(scratch.join(file), data).is_err() {
        return;
    }
    let Ok(tensors) = crate::weights::read_tensors(&scratch.join(file)) else { return };
    let params = vec![
        ("conv.weight".to_string(), Tensor::zeros([2, 1, 3, 3], (tch::Kind::Float, tch::Device::Cpu))),
        ("conv.bias".to_string(), Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu))),
    ];
    let _ = crate::weights::load_into(&params, tensors, &scratch.join(file));
}
