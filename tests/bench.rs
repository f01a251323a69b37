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

/// `lisa bench --real-size` on a tiny UNet config: our variants each in a process, diffusers' beside them when the
/// project venv has diffusers, otherwise a line that says why not. No speed is asserted.
#[test]
fn real_size_bench_puts_ours_and_diffusers_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let tiny = serde_json::json!({
        "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [32, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16, "attention_head_dim": 2
    });
    std::fs::write(&config, tiny.to_string()).unwrap();
    let json = dir.path().join("real-size.json");
    let (ok, out, err) = lisa(&[
        "bench", "--real-size", "--unet-config", config.to_str().unwrap(), "--latent-size", "8", "--threads", "1",
        "--warmup", "0", "--reps", "1", "--out", json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // stdout is the table alone (it is saved as it is printed); where the JSON went is said on stderr.
    assert!(!out.contains("results:") && err.contains("results:"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: Vec<&str> = report["results"].as_array().unwrap().iter().map(|r| r["variant"].as_str().unwrap()).collect();
    assert_eq!(names[..4], ["baseline", "baseline-recompute", "lisa", "lisa-recompute"], "{out}");
    let reference = report["reference"].as_array().unwrap();
    assert_eq!(reference.len(), names.len());
    for (row, name) in reference.iter().zip(&names) {
        match row["result"].as_object() {
            // diffusers ran: its row is the same variant, with the same UNet.
            Some(r) => {
                assert_eq!(r["variant"], *name);
                assert_eq!(r["unet_parameters"], report["results"][0]["unet_parameters"], "{out}");
                assert_eq!(r["controlnet_parameters"], report["results"][0]["controlnet_parameters"], "{out}");
            }
            None => assert!(out.contains("diffusers: ") && row["reason"].is_string(), "{out}"),
        }
    }
}
