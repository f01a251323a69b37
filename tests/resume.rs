//! A run interrupted at a checkpoint and resumed must continue exactly as if it had never stopped:
//! checkpoint save → load gives the identical next-step loss, and the whole curve and final weights match.
use std::path::Path;

use lisa::experiments::pretrain::{pretrain, PretrainConfig};
use lisa::models::PerBlock;

/// Training draws from libtorch's process-wide generator (reseeded every step), so two runs on
/// concurrent test threads would interleave their draws: the tests here take turns.
static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny_config(out: &Path, steps: u64) -> PretrainConfig {
    let mut cfg = PretrainConfig { output_dir: out.to_path_buf(), threads: 1, device: "cpu".into(), ..Default::default() };
    cfg.data.source = "embedded".into();
    cfg.data.max_examples = 96;
    let u = &mut cfg.model.unet;
    u.block_out_channels = vec![8, 16];
    u.down_block_types = vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()];
    u.up_block_types = vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()];
    u.cross_attention_dim = 16;
    u.attention_head_dim = PerBlock::All(2);
    u.norm_num_groups = 4;
    cfg.train.steps = steps;
    cfg.train.batch_size = 8;
    cfg.train.gradient_accumulation_steps = 2;
    cfg.train.lr_warmup_steps = 2;
    cfg.train.ema_decay = 0.9;
    cfg.train.log_every = 1;
    cfg.train.checkpointing_steps = 3;
    cfg.validation.num_images = 0;
    cfg
}

fn losses(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|c| *c == "loss").unwrap();
    text.lines().skip(1).map(|l| format!("{}:{}", l.split(',').next().unwrap(), l.split(',').nth(col).unwrap())).collect()
}

#[test]
fn interrupted_and_resumed_run_matches_uninterrupted_run() {
    let _turn = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("straight"), tmp.path().join("interrupted"));
    pretrain(&tiny_config(&a, 7), None, true).unwrap();

    // The same run stopped after step 5 with its last checkpoint at 3 (steps 4–5 are lost work, as
    // after a kill; their metric rows must be dropped on resume)…
    pretrain(&tiny_config(&b, 5), None, true).unwrap();
    std::fs::remove_dir_all(b.join("checkpoint-5")).unwrap();
    // …then resumed from the latest checkpoint with the full budget.
    pretrain(&tiny_config(&b, 7), Some("latest"), true).unwrap();

    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 7);
    assert_eq!(la, lb, "loss curves differ");
    let wa = std::fs::read(a.join("model/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
}

#[test]
fn resuming_with_a_different_configuration_is_refused() {
    let _turn = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    pretrain(&tiny_config(&out, 3), None, true).unwrap();
    let mut other = tiny_config(&out, 6);
    other.train.learning_rate = 0.5;
    let e = pretrain(&other, Some("latest"), true).unwrap_err().to_string();
    assert!(e.contains("different configuration"), "{e}");
}
