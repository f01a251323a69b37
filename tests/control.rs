//! Side-network training end to end through the binary, at a tiny size: `lisa compare` writes its
//! run folders, plot, grid and summary; `--resume` keeps finished arms; the saved side network
//! samples under `lisa sample --controlnet`; and its bad input gets one clear line.
mod common;
use common::lisa;
use std::path::Path;


const TINY: [&str; 16] = [
    "--set",
    "data.source=\"embedded\"",
    "--set",
    "data.max_examples=64",
    "--set",
    "fidelity.num_images=4",
    "--set",
    "fidelity.sampler.steps=2",
    "--set",
    "fidelity.every_steps=1",
    "--set",
    "final_eval.num_images=4",
    "--set",
    "train.batch_size=4",
    "--set",
    "threads=1",
];

fn compare(out: &Path, extra: &[&str]) -> (bool, String, String) {
    compare_task("mask", out, extra)
}

fn compare_task(task: &str, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "compare",
        "--task",
        task,
        "--steps",
        "2",
        "--seeds",
        "1",
        "--quiet",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(TINY);
    args.extend(extra);
    lisa(&args)
}

#[test]
fn compare_writes_curves_grids_and_a_summary_then_its_side_network_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let (ok, stdout, stderr) = compare(&out, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| final fidelity |") && stdout.contains("mask_iou"), "{stdout}");
    for f in ["fidelity.png", "samples.png", "summary.md", "summary.json", "config.toml"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for arm in ["baseline", "lisa"] {
        let run = out.join("seed-0").join(arm);
        let fid = std::fs::read_to_string(run.join("fidelity.csv")).unwrap();
        assert_eq!(fid.lines().count(), 4, "header + steps 0, 1, 2:\n{fid}");
        assert!(run.join("side-network/model.safetensors").is_file());
    }
    let metrics = std::fs::read_to_string(out.join("seed-0/lisa/metrics.csv")).unwrap();
    assert!(metrics.lines().next().unwrap().contains("lisa_ratio_b9"));
    let baseline = std::fs::read_to_string(out.join("seed-0/baseline/metrics.csv")).unwrap();
    assert!(!baseline.contains("l_lisa"), "the baseline has no LISA term");

    // Resuming a finished comparison retrains nothing.
    let (ok, _, stderr) = compare(&out, &["--resume"]);
    assert!(ok && stderr.matches("finished earlier").count() == 2, "{stderr}");
    assert!(!stderr.contains("extracted"), "nothing to train, so no training conditions are extracted: {stderr}");
    // Arms aggregated from their logs alone (no final samples kept): the summary, no grid, a note.
    std::fs::remove_file(out.join("samples.png")).unwrap();
    std::fs::remove_file(out.join("seed-0/lisa/final-samples.safetensors")).unwrap();
    let (ok, stdout, stderr) = compare(&out, &["--resume"]);
    assert!(ok && stdout.contains("| final fidelity |"), "{stderr}");
    assert!(stderr.contains("samples.png not written") && !out.join("samples.png").exists(), "{stderr}");
    // Resumed with a classifier the finished arms were not scored with: their final evaluation runs again, so
    // both arms' Fréchet distances come from it (here the shipped classifier's folder, named explicitly).
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/assets");
    let (ok, stdout, stderr) = compare(&out, &["--resume", "--classifier", assets]);
    assert!(ok && stderr.matches("its final evaluation runs again").count() == 2, "{stderr}");
    assert!(stdout.contains("(floor)"), "{stdout}");
    for arm in ["baseline", "lisa"] {
        let text = std::fs::read_to_string(out.join("seed-0").join(arm).join("summary.json")).unwrap();
        let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(summary["frechet_classifier"], assets, "{text}");
        assert!(summary["frechet_floor"].as_f64().is_some_and(f64::is_finite), "{text}");
    }
    let (ok, _, stderr) = compare(&out, &["--resume", "--classifier", assets]);
    assert!(ok && stderr.matches("finished earlier").count() == 2, "now they match: {stderr}");

    // Sampling with the LISA-trained side network: the baseline's architecture, timed side by side.
    let (ok, stdout, stderr) = lisa(&[
        "bench",
        "--sampling-run",
        out.to_str().unwrap(),
        "--reps",
        "2",
        "--sampling-images",
        "2",
        "--threads",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("same architecture: yes") && stdout.contains("LISA / baseline: median ×"), "{stdout}");

    // The trained side network, conditioned on a mask drawn from an image.
    let png = dir.path().join("shirt.png");
    let img = image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (6..22).contains(&x) && (4..24).contains(&y) { 200 } else { 0 }])
    });
    img.save(&png).unwrap();
    let grid = dir.path().join("grid.png");
    let side = out.join("seed-0/lisa/side-network");
    let (ok, stdout, stderr) = lisa(&[
        "sample",
        "--controlnet",
        side.to_str().unwrap(),
        "--condition-from",
        png.to_str().unwrap(),
        "--labels",
        "0,6",
        "--per-label",
        "1",
        "--sampling-steps",
        "2",
        "--out",
        grid.to_str().unwrap(),
        "--out-dir",
        dir.path().join("samples").to_str().unwrap(),
        "--threads",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("mask") && grid.is_file(), "{stdout}");
    // One PNG per sample, and a metadata.jsonl that reads back as an imagefolder with the labels asked for.
    let samples = dir.path().join("samples");
    let meta = std::fs::read_to_string(samples.join("metadata.jsonl")).unwrap();
    assert_eq!(meta.lines().count(), 2, "{meta}");
    assert!(meta.contains("\"condition_from\"") && meta.contains("side-network"), "{meta}");
    let back = lisa::data::DataConfig {
        dataset: samples.to_str().unwrap().into(),
        caption_column: String::new(),
        eval_fraction: 0.0,
        ..Default::default()
    }
    .load(false)
    .unwrap();
    assert_eq!(Vec::<i64>::try_from(&back.labels).unwrap().len(), 2);
    assert_eq!(back.images.size(), vec![2, 1, 32, 32]);
    // A folder that is not empty is refused, and kept as it was.
    let (ok, _, stderr) = lisa(&[
        "sample",
        "--labels",
        "0",
        "--per-label",
        "1",
        "--sampling-steps",
        "1",
        "--out",
        grid.to_str().unwrap(),
        "--out-dir",
        samples.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("is not empty; give a new or empty folder"), "{stderr}");
    assert_eq!(std::fs::read_to_string(samples.join("metadata.jsonl")).unwrap(), meta);

    // Composition with guidance: two side networks (here the same one twice at half scale), guided on the label.
    let (ok, stdout, stderr) = lisa(&[
        "sample",
        "--controlnet",
        side.to_str().unwrap(),
        "--controlnet",
        side.to_str().unwrap(),
        "--condition-from",
        png.to_str().unwrap(),
        "--conditioning-scale",
        "0.5,0.5",
        "--guidance-scale",
        "2",
        "--control-end",
        "0.5",
        "--labels",
        "6",
        "--per-label",
        "2",
        "--sampling-steps",
        "2",
        "--out",
        grid.to_str().unwrap(),
    ]);
    assert!(ok && stdout.contains("mask + mask"), "{stdout}{stderr}");
    let (ok, _, stderr) = lisa(&[
        "sample",
        "--controlnet",
        side.to_str().unwrap(),
        "--controlnet",
        side.to_str().unwrap(),
        "--condition",
        png.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("2 side network(s) but 1 --condition"), "{stderr}");

    // A condition that is not an image: one line naming the file.
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let (ok, _, stderr) =
        lisa(&["sample", "--controlnet", side.to_str().unwrap(), "--condition", bad.to_str().unwrap()]);
    assert!(
        !ok && stderr.lines().count() == 1 && stderr.contains("bad.png") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A run file's text without its timing columns (named `*seconds`), which differ between any two runs.
fn without_timings(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len()).filter(|&i| !header[i].ends_with("seconds")).collect();
    text.lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| cells[i]).collect::<Vec<_>>().join(",")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_baseline_arm_does_not_depend_on_the_lisa_hook() {
    // The hook experiments reuse one set of baselines (scripts/converge.sh); that holds only while the
    // hook leaves the baseline's training and evaluation untouched, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<_> = ["down_3", "mid"]
        .iter()
        .map(|hook| {
            let out = dir.path().join(hook);
            let set = format!("lisa.hook=\"{hook}\"");
            let (ok, _, stderr) = compare_task("edges", &out, &["--set", &set, "--set", "fidelity.loss_gain_every=1"]);
            assert!(ok, "{stderr}");
            out.join("seed-0")
        })
        .collect();
    for file in ["metrics.csv", "fidelity.csv"] {
        let (a, b) = (without_timings(&runs[0].join("baseline").join(file)), without_timings(&runs[1].join("baseline").join(file)));
        assert_eq!(a, b, "the baseline's {file} changed with the hook");
    }
    let samples = |r: &Path| std::fs::read(r.join("baseline/final-samples.safetensors")).unwrap();
    assert_eq!(samples(&runs[0]), samples(&runs[1]), "the baseline's final samples changed with the hook");
    let lisa_loss = |r: &Path| without_timings(&r.join("lisa/metrics.csv"));
    assert_ne!(lisa_loss(&runs[0]), lisa_loss(&runs[1]), "the LISA arms should differ: the hook is read");
}

#[test]
fn tensorboard_events_mirror_the_metrics_fidelity_and_validation_grids() {
    use tboard::tensorboard::{event::What, summary::value::Value};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let (ok, _, stderr) = compare(&out, &["--set", "train.report_to=[\"tensorboard\"]", "--set", "train.log_every=1"]);
    assert!(ok, "{stderr}");
    let run = out.join("seed-0/lisa");
    let files: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(files.len(), 1, "one event file a run: {files:?}");
    let (mut scalars, mut images) = (Vec::new(), Vec::new());
    for event in tboard::SummaryReader::new(std::fs::File::open(&files[0]).unwrap()) {
        let event = event.unwrap();
        if let Some(What::Summary(s)) = event.what {
            for v in s.value {
                match v.value {
                    Some(Value::SimpleValue(x)) => scalars.push((event.step as u64, v.tag, x)),
                    Some(Value::Image(img)) => images.push((event.step, v.tag, img.width, img.encoded_image_string)),
                    other => panic!("unexpected summary {other:?}"),
                }
            }
        }
    }
    // Every finite cell of metrics.csv and fidelity.csv is a scalar at its step, under "<log>/<column>".
    for (log, section) in [("metrics.csv", "train"), ("fidelity.csv", "fidelity")] {
        let text = std::fs::read_to_string(run.join(log)).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let mut cells = 0;
        for line in lines {
            let row: Vec<&str> = line.split(',').collect();
            let step: u64 = row[0].parse().unwrap();
            for (name, cell) in header.iter().zip(&row).skip(1) {
                let value: f64 = cell.parse().unwrap();
                if !value.is_finite() {
                    continue;
                }
                let tag = format!("{section}/{name}");
                let found = scalars.iter().find(|(s, t, _)| *s == step && *t == tag);
                assert_eq!(found.map(|f| f.2), Some(value as f32), "{tag} at step {step}");
                cells += 1;
            }
        }
        assert!(cells >= 6, "{log}: {cells} cells");
    }
    assert!(scalars.iter().any(|(_, t, _)| t == "train/lisa_ratio_b9"), "the LISA statistics are there");
    // The validation grid of each sampled step, as the PNG written to samples/.
    let steps: Vec<i64> = images.iter().map(|i| i.0).collect();
    assert_eq!(steps, [0, 1, 2]);
    for (step, tag, width, png) in &images {
        assert_eq!(tag, "validation/samples");
        assert_eq!(png, &std::fs::read(run.join(format!("samples/step-{step}.png"))).unwrap());
        assert!(*width > 0);
    }
    // Without report_to, no event file.
    let plain = dir.path().join("plain");
    assert!(compare(&plain, &[]).0);
    assert!(!std::fs::read_dir(plain.join("seed-0/lisa")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out")));
}

#[test]
fn a_side_network_on_stacked_conditions_trains_samples_and_composes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| dir.path().join(name);
    for (task, name) in [("edges", "edges"), ("mask", "mask")] {
        let (ok, _, stderr) = compare_task(task, &run(name), &[]);
        assert!(ok, "{task}: {stderr}");
    }
    let (ok, stdout, stderr) = compare_task("edges+mask", &run("stacked"), &["--set", "condition_dropout=0.3"]);
    assert!(ok, "{stderr}");
    // The curve scores the first condition of the stack.
    assert!(stdout.contains("edge_f1"), "{stdout}");
    let side_cfg = std::fs::read_to_string(run("stacked/seed-0/lisa/side-network/config.json")).unwrap();
    assert!(side_cfg.contains("\"edges+mask\"") && side_cfg.contains("\"conditioning_channels\": 2"), "{side_cfg}");

    let out = run("compose");
    let (ok, stdout, stderr) = lisa(&[
        "compose",
        "--run-dir",
        run("edges").to_str().unwrap(),
        "--run-dir",
        run("mask").to_str().unwrap(),
        "--stacked-run",
        run("stacked").to_str().unwrap(),
        "--images",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    for row in [
        "| lisa | edges+mask |",
        "| lisa | stacked: edges+mask |",
        "| lisa | stacked: edges |",
        "| baseline | stacked: mask |",
    ] {
        assert!(stdout.contains(row), "no row {row}:\n{stdout}");
    }
    // A stacked run is not one of the composed single-condition runs.
    let (ok, _, stderr) = lisa(&[
        "compose",
        "--run-dir",
        run("edges").to_str().unwrap(),
        "--run-dir",
        run("stacked").to_str().unwrap(),
        "--images",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("--stacked-run"), "{stderr}");

    // Sampling extracts every condition of the stack from one image; a lone condition image is refused.
    let png = dir.path().join("bag.png");
    image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (5..23).contains(&x) && (8..22).contains(&y) { 180 } else { 0 }])
    })
    .save(&png)
    .unwrap();
    let side = run("stacked/seed-0/baseline/side-network");
    let grid = dir.path().join("grid.png");
    let (ok, stdout, stderr) = lisa(&[
        "sample",
        "--controlnet",
        side.to_str().unwrap(),
        "--condition-from",
        png.to_str().unwrap(),
        "--labels",
        "8",
        "--per-label",
        "1",
        "--sampling-steps",
        "2",
        "--out",
        grid.to_str().unwrap(),
    ]);
    assert!(ok && grid.is_file() && stdout.contains("edges+mask"), "{stdout}{stderr}");
    let (ok, _, stderr) =
        lisa(&["sample", "--controlnet", side.to_str().unwrap(), "--condition", png.to_str().unwrap()]);
    assert!(!ok && stderr.contains("stacked conditions") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn controlnet_arguments_are_checked() {
    let (ok, _, stderr) = lisa(&["sample", "--condition", "x.png"]);
    assert!(!ok && stderr.contains("--controlnet"), "{stderr}");
    let (ok, _, stderr) = lisa(&["train", "--task", "sketch", "--print-config"]);
    assert!(!ok && stderr.contains("unknown condition kind") && stderr.lines().count() == 1, "{stderr}");
    let (ok, _, stderr) = lisa(&["sample", "--controlnet", "/nonexistent/side"]);
    assert!(!ok && stderr.contains("not a side network folder"), "{stderr}");
}

#[test]
fn device_and_mixed_precision_are_config_keys_with_flags() {
    for cmd in ["train", "compare", "ablate", "device-check", "pretrain"] {
        let (ok, stdout, stderr) = lisa(&[cmd, "--device", "cuda:3", "--print-config"]);
        assert!(
            ok && stdout.contains("device = \"cuda:3\"") && stdout.contains("mixed_precision = \"no\""),
            "{cmd}: {stdout}{stderr}"
        );
    }
    // device-check checks CUDA unless told otherwise, with its own short run.
    let (ok, stdout, _) = lisa(&["device-check", "--print-config"]);
    assert!(ok && stdout.contains("device = \"cuda\"") && stdout.contains("steps = 20"), "{stdout}");
    let (ok, stdout, _) = lisa(&["train", "--set", "train.mixed_precision=\"bf16\"", "--print-config"]);
    assert!(ok && stdout.contains("mixed_precision = \"bf16\""), "{stdout}");
    let (ok, _, stderr) = lisa(&["train", "--set", "train.mixed_precision=\"fp8\"", "--print-config"]);
    assert!(!ok && stderr.contains("mixed_precision") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn ablate_runs_the_baseline_and_each_variant_into_one_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("abl");
    let mut args = vec![
        "ablate",
        "--task",
        "edges",
        "--steps",
        "1",
        "--seeds",
        "1",
        "--quiet",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(TINY);
    args.extend(["--variant", "raw-target: lisa.target=\"raw\"", "--variant", "hook-down_2: lisa.hook=\"down_2\""]);
    let (ok, stdout, stderr) = lisa(&args);
    assert!(ok, "{stderr}");
    for row in ["| baseline |", "| raw-target |", "| hook-down_2 |"] {
        assert!(stdout.contains(row), "{row} missing:\n{stdout}");
    }
    assert!(out.join("ablation.md").is_file() && out.join("seed-0/hook-down_2/summary.json").is_file());
    let (ok, _, stderr) = lisa(&["ablate", "--variant", "typo: lisa.lamda=1", "--output-dir", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("lamda") && stderr.lines().count() == 1, "{stderr}");
}

/// Pretrains a tiny flow-matching transformer main network (2 steps on 32 embedded images, with
/// `extra` arguments) under `dir/main`; returns its model folder.
fn pretrain_tiny_transformer(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let config = dir.join("dit.toml");
    std::fs::write(
        &config,
        r#"
threads = 1
device = "cpu"
[data]
source = "embedded"
max_examples = 32
[model.objective]
kind = "flow"
[model.transformer]
patch_size = 4
num_layers = 2
num_attention_heads = 2
attention_head_dim = 8
pooled_projection_dim = 16
[train]
steps = 2
batch_size = 4
lr_warmup_steps = 1
log_every = 1
checkpointing_steps = 0
[validation]
num_images = 2
[validation.sampler]
kind = "euler"
steps = 2
"#,
    )
    .unwrap();
    let main_run = dir.join("main");
    let mut args =
        vec!["pretrain", "--quiet", "--config", config.to_str().unwrap(), "--output-dir", main_run.to_str().unwrap()];
    args.extend(extra);
    let (ok, _, stderr) = lisa(&args);
    assert!(ok, "{stderr}");
    main_run.join("model")
}

#[test]
fn a_flow_matching_transformer_main_network_pretrains_and_compares_with_lisa() {
    let dir = tempfile::tempdir().unwrap();
    let model = pretrain_tiny_transformer(dir.path(), &[]);
    let saved = std::fs::read_to_string(model.join("config.json")).unwrap();
    assert!(saved.contains("\"transformer\"") && saved.contains("\"flow\""), "{saved}");

    let out = dir.path().join("cmp");
    let set_main = format!("main_network={:?}", model.to_str().unwrap());
    let (ok, stdout, stderr) = compare_task("edges", &out, &["--set", &set_main, "--set", "lisa.hook=\"block_0\""]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("edge_f1"), "{stdout}");
    let side = std::fs::read_to_string(out.join("seed-0/lisa/side-network/config.json")).unwrap();
    assert!(side.contains("\"num_layers\": 1") && !side.contains("controlnet"), "half of 2 blocks: {side}");
    let metrics = std::fs::read_to_string(out.join("seed-0/lisa/metrics.csv")).unwrap();
    assert!(metrics.lines().next().unwrap().contains("lisa_ratio"));

    // The side network samples under `lisa sample` with its main network.
    let png = dir.path().join("s.png");
    let (ok, _, stderr) = lisa(&[
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--controlnet",
        out.join("seed-0/lisa/side-network").to_str().unwrap(),
        "--condition-from",
        out.join("samples.png").to_str().unwrap(),
        "--labels",
        "0",
        "--per-label",
        "1",
        "--sampling-steps",
        "2",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(png.is_file());
}

#[test]
fn a_video_transformer_pretrains_on_moving_fashion_mnist_and_compares_trajectory_control() {
    let dir = tempfile::tempdir().unwrap();
    let model = pretrain_tiny_transformer(
        dir.path(),
        &["--set", "data.video.frames=4", "--set", "data.video.clips=24", "--set", "model.transformer.num_frames=4"],
    );

    let out = dir.path().join("cmp");
    let set_main = format!("main_network={:?}", model.to_str().unwrap());
    let (ok, stdout, stderr) = compare_task(
        "trajectory",
        &out,
        &[
            "--set",
            &set_main,
            "--set",
            "data.video.frames=4",
            "--set",
            "data.video.clips=24",
            "--set",
            "data.max_examples=32",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trajectory_error") && stdout.contains("temporal flicker"), "{stdout}");
    let summary = std::fs::read_to_string(out.join("seed-0/lisa/summary.json")).unwrap();
    assert!(summary.contains("temporal_flicker"), "{summary}");
    assert!(out.join("samples.png").is_file());
    // A video side network next to an image main network is refused with a reason.
    let (ok, _, stderr) = compare_task("trajectory", &dir.path().join("bad"), &["--set", "data.video.frames=4"]);
    assert!(!ok && stderr.contains("clips of 4 frames") && stderr.contains("1-channel images"), "{stderr}");
    assert!(!stderr.contains("extracted"), "refused before any data is prepared: {stderr}");
}
