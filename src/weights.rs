//! Weights on disk, in one place: safetensors files read and copied into a model's variables by name
//! and shape, and files written atomically. Checkpoints, model folders, side networks and the diffusers
//! loader all go through here, so a missing, damaged or mismatched file reads the same everywhere.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use tch::Tensor;

use crate::{Error, Result};

/// Writes a file atomically: a temporary file beside it, synced, then renamed over it, so that a kill
/// leaves either the old or the new contents, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_beside(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Writes named tensors to a safetensors file atomically (as [`write_atomic`]).
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = temporary_beside(path);
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if let Err(e) = Tensor::write_safetensors(&named, &tmp) {
        let _ = fs::remove_file(&tmp);
        let e = e.to_string();
        return Err(Error::format(path, format!("cannot write tensors: {e}{}", crate::error::io_hint_in(&e))));
    }
    let synced = fs::File::open(&tmp).and_then(|f| f.sync_all()).and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = synced {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

fn temporary_beside(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(Error::format(
            path,
            "missing file; the folder is incomplete: use another checkpoint or model folder",
        ));
    }
    Tensor::read_safetensors(path).map_err(|e| {
        Error::format(
            path,
            format!("unreadable tensors ({e}); the file is damaged: use another checkpoint or model folder"),
        )
    })
}

/// Copies `tensors` into the model's `params` by name (under no-grad, converting the dtype), after
/// checking that both name sets and every shape agree. The error (naming `source`) lists every
/// disagreement on one line, the first ten of each kind, so that a wrong configuration shows at once.
pub fn load_into(params: &[(String, Tensor)], tensors: Vec<(String, Tensor)>, source: &Path) -> Result<()> {
    let given: HashMap<String, Tensor> = tensors.into_iter().collect();
    let mut problems = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut shapes: Vec<String> = Vec::new();
    for (name, p) in params {
        match given.get(name) {
            None => missing.push(format!("lacks parameter '{name}'")),
            Some(t) if t.size() != p.size() => shapes.push(format!(
                "shape differs: parameter '{name}' has shape {:?} but the model expects {:?}",
                t.size(),
                p.size()
            )),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<String> = given
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .map(|k| format!("has parameter '{k}' that the model does not"))
        .collect();
    missing.sort();
    extra.sort();
    for list in [missing, extra, shapes] {
        let more = list.len().saturating_sub(10);
        problems.extend(list.into_iter().take(10));
        if more > 0 {
            problems.push(format!("(and {more} more like it)"));
        }
    }
    if !problems.is_empty() {
        return Err(Error::format(
            source,
            format!(
                "the weights do not fit the model: the file was saved from a different model configuration; load it \
                 with the configuration it was trained with (is the config.json next to it the right one?): {}",
                problems.join("; ")
            ),
        ));
    }
    let _guard = tch::no_grad_guard();
    for (name, p) in params {
        p.shallow_clone().f_copy_(&given[name])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[i64]) -> (String, Tensor) {
        (name.to_string(), Tensor::ones(shape, (tch::Kind::Float, tch::Device::Cpu)))
    }

    #[test]
    fn every_disagreement_is_listed_and_nothing_is_copied() {
        let params = vec![t("a", &[2]), t("b", &[3]), t("c", &[1])];
        let _ = params[0].1.shallow_clone().fill_(0.0);
        let file = vec![t("a", &[2]), t("b", &[4]), t("z", &[1])];
        let e = load_into(&params, file, Path::new("w.safetensors")).unwrap_err().to_string();
        for want in [
            "w.safetensors",
            "lacks parameter 'c'",
            "has parameter 'z' that the model does not",
            "shape differs: parameter 'b' has shape [4] but the model expects [3]",
            "different model configuration",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        assert_eq!(params[0].1.double_value(&[0]), 0.0, "a refused file leaves the model untouched");
    }

    #[test]
    fn tensors_round_trip_atomically_and_missing_or_damaged_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let params = vec![t("w", &[2, 2])];
        write_tensors(&path, &params).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        let target = vec![(String::from("w"), Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu)))];
        load_into(&target, read_tensors(&path).unwrap(), &path).unwrap();
        assert_eq!(target[0].1.sum(tch::Kind::Float).double_value(&[]), 4.0);
        let e = read_tensors(&dir.path().join("nope.safetensors")).unwrap_err().to_string();
        assert!(e.contains("nope.safetensors") && e.contains("missing file"), "{e}");
        fs::write(&path, b"not tensors").unwrap();
        let e = read_tensors(&path).unwrap_err().to_string();
        assert!(e.contains("unreadable tensors") && e.contains("damaged"), "{e}");
    }
}
