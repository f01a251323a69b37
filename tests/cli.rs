//! The `lisa` binary as a user meets it: help, and bad input giving one clear line and a non-zero exit.
mod common;
use common::lisa;

/// An error is reported as exactly one line starting with `error:`, with no panic.
fn assert_one_line_error(stderr: &str, must_contain: &[&str]) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for s in must_contain {
        assert!(lines[0].contains(s), "'{s}' missing from: {stderr}");
    }
}

#[test]
fn help_lists_the_commands() {
    let (ok, out, _) = lisa(&["--help"]);
    assert!(ok);
    for c in ["pretrain", "sample", "eval", "demo"] {
        assert!(out.contains(c), "{c} missing from --help:\n{out}");
    }
    let (ok, out, _) = lisa(&["pretrain", "--help"]);
    assert!(ok && out.contains("--resume") && out.contains("--set"), "{out}");
}

#[test]
fn a_truncated_idx_file_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Valid-looking headers whose payloads are cut short.
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    images.extend(vec![0u8; 100]);
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 10];
    labels.extend(vec![0u8; 10]);
    for split in ["train", "t10k"] {
        std::fs::write(dir.path().join(format!("{split}-images-idx3-ubyte")), &images).unwrap();
        std::fs::write(dir.path().join(format!("{split}-labels-idx1-ubyte")), &labels).unwrap();
    }
    let out = dir.path().join("run");
    let source = format!("data.source={:?}", dir.path().display().to_string());
    let (ok, _, err) = lisa(&["pretrain", "--set", &source, "--output-dir", out.to_str().unwrap(), "--steps", "1", "--quiet"]);
    assert!(!ok);
    assert_one_line_error(&err, &["train-images-idx3-ubyte", "truncated"]);
}

#[test]
fn a_malformed_metadata_line_is_one_line_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    image::GrayImage::from_pixel(8, 8, image::Luma([200u8])).save(dir.path().join("a.png")).unwrap();
    std::fs::write(dir.path().join("metadata.jsonl"), "{\"image\": \"a.png\", \"label\": 0}\n{\"image\": \"a.png\", \"label\": \n").unwrap();
    let data = format!("data.dataset={:?}", dir.path().display().to_string());
    let out = dir.path().join("run");
    let (ok, _, err) = lisa(&["pretrain", "--set", &data, "--output-dir", out.to_str().unwrap(), "--steps", "1", "--quiet"]);
    assert!(!ok);
    assert_one_line_error(&err, &["metadata.jsonl", "line 2"]);
}

#[test]
fn unknown_config_keys_and_missing_models_are_clear_errors() {
    let (ok, _, err) = lisa(&["pretrain", "--set", "train.stepz=3"]);
    assert!(!ok);
    assert_one_line_error(&err, &["train.stepz"]);
    let (ok, _, err) = lisa(&["sample", "--model", "/nonexistent/model"]);
    assert!(!ok);
    assert_one_line_error(&err, &["/nonexistent/model"]);
}

#[test]
fn sample_and_eval_take_set_and_print_config_as_every_other_command() {
    let (ok, out, err) = lisa(&["sample", "--print-config", "--per-label", "2", "--set", "sampler.steps=3", "--set", "guidance_scale=2"]);
    assert!(ok, "{err}");
    for want in ["per_label = 2", "guidance_scale = 2.0", "steps = 3"] {
        assert!(out.contains(want), "{want} missing from\n{out}");
    }
    let (ok, _, err) = lisa(&["sample", "--set", "sampler.stepz=3"]);
    assert!(!ok);
    assert_one_line_error(&err, &["sampler.stepz", "--print-config"]);
    let (ok, out, err) = lisa(&["eval", "--print-config", "--set", "num_images=7", "--set", "sampler.steps=4"]);
    assert!(ok, "{err}");
    assert!(out.contains("num_images = 7") && out.contains("steps = 4") && out.contains("[data]"), "{out}");
    let (ok, _, err) = lisa(&["eval", "--set", "num_imagez=7"]);
    assert!(!ok);
    assert_one_line_error(&err, &["num_imagez"]);
}
