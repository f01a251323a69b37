//! Checkpoints: `checkpoint-N/` folders written atomically (into a temporary folder, synced, then
//! renamed), pruned to a total limit, found again by `--resume latest`.
//!
//! A checkpoint holds named tensor files (`model.safetensors`, `optimizer.safetensors`, optionally
//! `ema.safetensors`) and `state.json` (step, RNG and data position, and whatever the run adds).
//! A folder without `state.json` is incomplete and is never picked up. Temporary folders are hidden
//! (`.checkpoint-N.tmp-PID`, `.old-`, `.del-`); those left by a killed run are cleaned up when the next run
//! takes the folder's lock, and again before each save.
use std::fs;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::{Error, Result};

/// The name of the JSON file that marks a checkpoint as complete.
pub const STATE_FILE: &str = "state.json";

/// Writes `checkpoint-<step>/` under `output_dir` with the given tensor files and state, atomically,
/// then removes the oldest checkpoints beyond `total_limit` (0 = keep all). Returns the folder.
pub fn save(
    output_dir: &Path,
    step: u64,
    files: &[(&str, &[(String, Tensor)])],
    state: &serde_json::Value,
    total_limit: usize,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{step}"));
    remove_leftovers(output_dir);
    let tmp_dir = output_dir.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    }
    fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    let written = (|| -> Result<()> {
        for (name, tensors) in files {
            let path = tmp_dir.join(name);
            let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            Tensor::write_safetensors(&named, &path).map_err(|e| {
                let e = e.to_string();
                Error::Checkpoint {
                    path: final_dir.clone(),
                    msg: format!("cannot write {name}: {e}{}", crate::error::io_hint_in(&e)),
                }
            })?;
            sync_file(&path)?;
        }
        let path = tmp_dir.join(STATE_FILE);
        let text = serde_json::to_string_pretty(state).map_err(|e| Error::format(&path, e.to_string()))?;
        fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        sync_file(&path)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp_dir);
        return Err(e);
    }
    // Replacing an existing checkpoint of the same step (a rerun): move it aside first so that at
    // every moment one complete copy exists.
    if final_dir.exists() {
        let old = output_dir.join(format!(".checkpoint-{step}.old-{}", std::process::id()));
        fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
        fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    if let Ok(d) = fs::File::open(output_dir) {
        let _ = d.sync_all();
    }
    if total_limit > 0 {
        let all = list(output_dir)?;
        for (old_step, dir) in all.iter().take(all.len().saturating_sub(total_limit)) {
            // Renamed away first: removing files one by one could, if killed, leave a checkpoint-N
            // that still has its state.json but lacks a tensor file.
            let doomed = output_dir.join(format!(".checkpoint-{old_step}.del-{}", std::process::id()));
            fs::rename(dir, &doomed).map_err(|e| Error::io(dir, e))?;
            fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        }
    }
    Ok(final_dir)
}

/// Cleans up after killed runs: removes their temporary folders (`.checkpoint-N.tmp-PID`, `.del-PID`,
/// and `.old-PID` once `checkpoint-N` is complete again) and moves an `.old-PID` copy back to
/// `checkpoint-N` when it is the only complete one (the run was killed between the two renames of a
/// rewrite). The run lock guarantees that no other process writes here.
pub fn remove_leftovers(output_dir: &Path) {
    let Ok(entries) = fs::read_dir(output_dir) else { return };
    let own = format!("-{}", std::process::id());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((step, kind)) = name.strip_prefix(".checkpoint-").and_then(|r| r.split_once('.')) else { continue };
        if name.ends_with(&own) || step.parse::<u64>().is_err() {
            continue;
        }
        let current = output_dir.join(format!("checkpoint-{step}"));
        if kind.starts_with("old-") && !current.join(STATE_FILE).is_file() {
            if entry.path().join(STATE_FILE).is_file() && !current.exists() {
                let _ = fs::rename(entry.path(), &current);
            }
            continue;
        }
        if kind.starts_with("tmp-") || kind.starts_with("del-") || kind.starts_with("old-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Refuses to start a new run in a folder that holds another run's checkpoints: the new run would
/// replace them one by one, prune its own newest ones in favour of their higher step numbers, and leave
/// `--resume latest` to pick the wrong run.
pub fn ensure_none(output_dir: &Path) -> Result<()> {
    match list(output_dir)?.pop() {
        None => Ok(()),
        Some((_, newest)) => Err(Error::Checkpoint {
            path: output_dir.to_path_buf(),
            msg: format!(
                "holds the checkpoints of an earlier run (newest: {}); continue that run with --resume latest, \
                 or choose another output folder",
                newest.display()
            ),
        }),
    }
}

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Complete checkpoints under `output_dir`, sorted by step (ascending).
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(output_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("checkpoint-")).and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Resolves a `--resume` argument: `latest` (the newest complete checkpoint under `output_dir`) or
/// a checkpoint folder.
pub fn resolve(output_dir: &Path, resume: &str) -> Result<PathBuf> {
    if resume == "latest" {
        return list(output_dir)?.pop().map(|(_, p)| p).ok_or_else(|| Error::Checkpoint {
            path: output_dir.to_path_buf(),
            msg: "no complete checkpoint-N folder to resume from; start without --resume".into(),
        });
    }
    let p = PathBuf::from(resume);
    if !p.join(STATE_FILE).is_file() {
        return Err(Error::Checkpoint {
            path: p,
            msg: format!(
                "not a complete checkpoint (no {STATE_FILE}); give a checkpoint-N folder of this run, or latest"
            ),
        });
    }
    Ok(p)
}

/// What a `--resume` argument means for `output_dir` now. `latest` with no complete checkpoint there yet is
/// a fresh run (`None`): a job that requeues itself can pass `--resume latest` every time, from its first
/// start on. Anything else is returned as given (a checkpoint folder that does not exist stays an error
/// when [`resolve`]d).
pub fn resume_or_fresh<'a>(output_dir: &Path, resume: Option<&'a str>) -> Result<Option<&'a str>> {
    if resume == Some("latest") && list(output_dir)?.is_empty() {
        return Ok(None);
    }
    Ok(resume)
}

/// Reads `state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    parse_state(&bytes, &path)
}

/// Parses the contents of a checkpoint's `state.json` (`path` names it in errors).
pub fn parse_state(bytes: &[u8], path: &Path) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::format(
            &path,
            format!("malformed checkpoint state: {e}; the checkpoint is damaged: use another checkpoint-N"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Vec<(String, Tensor)> {
        vec![("w".into(), Tensor::from_slice(v))]
    }

    #[test]
    fn save_list_prune_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10u64, 20, 30] {
            let w = t(&[step as f32]);
            save(dir.path(), step, &[("model.safetensors", &w)], &serde_json::json!({"step": step}), 2).unwrap();
        }
        let steps: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let latest = resolve(dir.path(), "latest").unwrap();
        assert!(latest.ends_with("checkpoint-30"));
        assert_eq!(read_state(&latest).unwrap()["step"], 30);
        let w = crate::weights::read_tensors(&latest.join("model.safetensors")).unwrap();
        assert_eq!(w[0].1.double_value(&[0]), 30.0);
        // No temporary folders are left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn incomplete_checkpoints_are_ignored_and_resume_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resolve(dir.path(), "latest").unwrap_err().to_string().contains("no complete checkpoint"));
        fs::create_dir_all(dir.path().join("checkpoint-5")).unwrap(); // killed mid-write, no state.json
        assert!(list(dir.path()).unwrap().is_empty());
        assert!(resolve(dir.path(), dir.path().join("checkpoint-5").to_str().unwrap()).is_err());
    }

    #[test]
    fn leftovers_of_killed_runs_are_removed_and_new_runs_refuse_old_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        // What killed runs leave behind (pid u32::MAX cannot be a live process): a half-written checkpoint,
        // a half-pruned one, and a copy moved aside while its step was rewritten.
        for name in [".checkpoint-3.tmp-4294967295", ".checkpoint-1.del-4294967295", ".checkpoint-2.old-4294967295"] {
            fs::create_dir_all(dir.path().join(name)).unwrap();
            fs::write(dir.path().join(name).join("model.safetensors"), b"partial").unwrap();
        }
        ensure_none(dir.path()).unwrap();
        // The moved-aside copy is kept while it may be the only complete checkpoint-2, and removed once
        // checkpoint-2 exists again.
        for step in [2u64, 3] {
            save(dir.path(), step, &[("model.safetensors", &t(&[2.0]))], &serde_json::json!({ "step": step }), 0)
                .unwrap();
        }
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec!["checkpoint-2", "checkpoint-3"]);
        let e = ensure_none(dir.path()).unwrap_err().to_string();
        assert!(e.contains("holds the checkpoints of an earlier run") && e.contains("--resume latest"), "{e}");

        let f = dir.path().join("config.toml");
        crate::weights::write_atomic(&f, b"a = 1\n").unwrap();
        crate::weights::write_atomic(&f, b"a = 2\n").unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "a = 2\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3, "no temporary file is left");
    }
}
