//! `lisa bench` end to end at a tiny size: the timing loop runs every one of our variants, prints the
//! table and writes the JSON; a missing reference Python is a clear skip, not a failure. No speed is asserted.
mod common;
use common::lisa;
use std::path::Path;

use lisa::models::{LabelEncoderConfig, UNetConfig};
use lisa::pipeline::{MainNetwork, MainNetworkConfig};


/// A tiny main network folder (8×8 samples, widths 8/16/16).
fn tiny_main(dir: &Path) {
    let unet = UNetConfig::tiny();
    let cfg = MainNetworkConfig {
        unet,
        label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 2 },
        ..Default::default()
    };
    tch::manual_seed(1);
    MainNetwork::new(&cfg, tch::Device::Cpu).unwrap().save(dir).unwrap();
}

const TINY: [&str; 10] = ["--batch", "2", "--reps", "1", "--threads", "1", "--gemm-size", "64", "--warmup", "1"];

#[test]
fn bench_times_our_four_variants_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("main");
    tiny_main(&model);
    let json = dir.path().join("bench.json");
    let mut args = vec!["bench", "--model", model.to_str().unwrap(), "--no-reference", "--out", json.to_str().unwrap()];
    args.extend(TINY);
    let (ok, out, err) = lisa(&args);
    assert!(ok, "{err}");
    for row in
        ["| ours, baseline |", "| ours, LISA (shared encoder) |", "| ours, LISA (full 2nd forward) |", "GEMM 64×64×64"]
            .into_iter()
            .chain(["| ours, LISA (shared encoder, LISA term on a sub-batch) |", "(LISA term on 1 of 2) |"])
    {
        assert!(out.contains(row), "{row:?} missing from\n{out}");
    }
    assert!(out.contains("reference not run (--no-reference)") && !out.contains("| reference, baseline |"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let variants = report["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 4);
    assert_eq!(report["lisa_sub_batch"], 1, "the default is a quarter of the batch, at least 1");
    for v in variants {
        assert_eq!(v["stats"]["times_s"].as_array().unwrap().len(), 1, "{v}");
        assert!(v["stats"]["median_s"].as_f64().unwrap() > 0.0 && v["gflop_per_step"].as_f64().unwrap() > 0.0);
    }
    assert!(report["flops"]["unrecognised"].as_array().unwrap().is_empty());
    assert!(report["peak_rss_kib"].as_u64().unwrap() > 0);
    assert!(report["comparisons"]["lisa_overhead_ours_full"]["median"].is_number());
    assert!(report["comparisons"]["lisa_overhead_ours_sub_batch"]["median"].is_number());
    assert!(report["allocator"].as_str().unwrap().contains("GLIBC_TUNABLES="), "{}", report["allocator"]);
    assert!(report["comparisons"]["ours_over_reference_baseline"].is_null());
}

#[test]
fn a_missing_reference_python_is_a_clear_skip() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("main");
    tiny_main(&model);
    let python = dir.path().join("no-venv/bin/python");
    let mut args = vec!["bench", "--model", model.to_str().unwrap(), "--python", python.to_str().unwrap()];
    args.extend(TINY);
    let (ok, out, err) = lisa(&args);
    assert!(ok, "{err}");
    let line =
        out.lines().find(|l| l.starts_with("reference skipped:")).unwrap_or_else(|| panic!("no skip line in\n{out}"));
    assert!(line.contains("no Python at") && line.contains("no-venv") && line.contains("setup-reference.sh"), "{line}");
    assert!(out.contains("| ours, baseline |") && out.contains("| ours / reference, baseline step | — |"), "{out}");
}
