//! A lock file so that two training runs never write into the same output folder.
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::train::checkpoint;
use crate::{Error, Result};

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".lisa-run.lock";

/// Held while a run writes into its folder; the file is removed on drop.
#[derive(Debug)]
pub struct RunLock {
    /// `None` in a process of rank > 0 of a multi-process run: rank 0 holds the lock for all of them.
    path: Option<PathBuf>,
}

impl RunLock {
    /// Takes the lock of `dir` (created if needed). A lock left by a process that no longer exists
    /// (a killed run) is taken over; one held by a live process is an error naming it. Once held, the
    /// temporary checkpoint folders of killed runs are cleaned up ([`checkpoint::remove_leftovers`]):
    /// a resumed run that has nothing left to save must not leave them behind.
    pub fn acquire(dir: &Path) -> Result<Self> {
        if !crate::distributed::is_main_process() {
            return Ok(Self { path: None });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
                    checkpoint::remove_leftovers(dir);
                    return Ok(Self { path: Some(path) });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
                    match owner {
                        Some(pid) if process_alive(pid) => {
                            return Err(Error::Config(format!(
                                "another run (process {pid}) is writing into {}; wait for it, stop it, or choose \
                                 another output folder",
                                dir.display()
                            )))
                        }
                        // A dead owner (or an unreadable, half-written file): the previous run was killed.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::Config(format!(
            "could not take the lock {}; remove it if no run is using the folder",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether process `pid` exists (Linux: `/proc/<pid>`; elsewhere assumed alive, so the user decides).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    if proc.is_dir() {
        proc.join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_is_refused_and_a_dead_owner_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains("another run") && e.contains(&std::process::id().to_string()), "{e}");
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists(), "the lock is removed when the run ends");
        // A killed run's lock: a pid that cannot exist.
        std::fs::write(dir.path().join(LOCK_FILE), "4294967295\n").unwrap();
        let _lock = RunLock::acquire(dir.path()).unwrap();
        // A half-written lock file.
        drop(_lock);
        std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
        RunLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn taking_the_lock_cleans_up_after_killed_runs() {
        // A run killed while pruning checkpoint-1, writing checkpoint-4, and between the two renames that
        // rewrite checkpoint-2 (pid u32::MAX cannot be live). The resumed run may have nothing left to save,
        // so the lock, not the next save, must clean up.
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, complete: bool| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("model.safetensors"), b"x").unwrap();
            if complete {
                std::fs::write(d.join(checkpoint::STATE_FILE), b"{\"step\": 0}").unwrap();
            }
        };
        mk(".checkpoint-1.del-4294967295", true);
        mk(".checkpoint-4.tmp-4294967295", false);
        mk(".checkpoint-2.old-4294967295", true);
        mk("checkpoint-3", true);
        let _lock = RunLock::acquire(dir.path()).unwrap();
        let mut names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, vec![LOCK_FILE, "checkpoint-2", "checkpoint-3"]);
        let steps: Vec<u64> = checkpoint::list(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 3], "the moved-aside checkpoint-2 is complete and comes back");
    }
}
