//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and every input that ever crashed a fuzz target
//! (`fuzz/artifacts/<target>/`) through the same entry points as `cargo fuzz` (`lisa::fuzzing`): each
//! must return, with an error or without, and never panic. Runs on stable, without libFuzzer.
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
        files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

/// Runs `f` on every input of `target`; fails naming the inputs that panicked.
fn replay(target: &str, f: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}: fuzz/corpus/{target}/ should hold its seeds");
    let mut panicked = Vec::new();
    for p in &files {
        let data = std::fs::read(p).unwrap();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data))).is_err() {
            panicked.push(p.display().to_string());
        }
    }
    assert!(
        panicked.is_empty(),
        "{target}: {} of {} inputs panicked:\n{}",
        panicked.len(),
        files.len(),
        panicked.join("\n")
    );
}

#[test]
fn idx_corpus_and_crashes() {
    replay("idx", lisa::fuzzing::idx);
}

#[test]
fn metadata_jsonl_corpus_and_crashes() {
    replay("metadata_jsonl", lisa::fuzzing::metadata_jsonl);
}

#[test]
fn config_corpus_and_crashes() {
    replay("config", lisa::fuzzing::config);
}

#[test]
fn checkpoint_corpus_and_crashes() {
    let scratch = tempfile::tempdir().unwrap();
    replay("checkpoint", |d| lisa::fuzzing::checkpoint(d, scratch.path()));
}
