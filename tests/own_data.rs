//! Users' own data end to end through the binary, at a tiny size: an RGB imagefolder in the diffusers
//! ControlNet convention (`image`, `conditioning_image`, `text` and `label` on every line) is pretrained on
//! (channels and class count following the data), side networks are trained on it with an extracted and
//! with the given condition, scored on held-out images, and sample; a classifier trained on the data
//! (`lisa classifier`) gives `compare` and `eval` a Fréchet distance, which is skipped without one; and
//! `--resume latest` requeues.
use std::path::Path;
use std::process::Command;

fn lisa(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lisa")).args(args).output().expect("run lisa");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small UNet, as the bad-input corpus trains it (two levels, 8 and 16 channels).
const TINY_UNET: [&str; 12] = [
    "--set",
    "model.unet.block_out_channels=[8, 16]",
    "--set",
    "model.unet.down_block_types=[\"DownBlock2D\", \"CrossAttnDownBlock2D\"]",
    "--set",
    "model.unet.up_block_types=[\"CrossAttnUpBlock2D\", \"UpBlock2D\"]",
    "--set",
    "model.unet.cross_attention_dim=16",
    "--set",
    "model.unet.attention_head_dim=2",
    "--set",
    "model.unet.norm_num_groups=4",
];

/// 16 coloured squares and discs (two classes) on black, each with its mask as `conditioning_image`;
/// every line has both a caption and a label.
fn rgb_folder(dir: &Path) {
    let mut lines = vec![];
    for i in 0..16u32 {
        let colour = image::Rgb([(40 + 13 * i) as u8, (200 - 9 * i) as u8, (90 + 7 * i) as u8]);
        let (disc, r) = (i % 2 == 1, 3 + (i % 4));
        let inside = |x: u32, y: u32| {
            let (dx, dy) = (x as i32 - 8, y as i32 - 8);
            if disc {
                dx * dx + dy * dy <= (r * r) as i32
            } else {
                dx.unsigned_abs() <= r && dy.unsigned_abs() <= r
            }
        };
        let img = image::RgbImage::from_fn(16, 16, |x, y| if inside(x, y) { colour } else { image::Rgb([0, 0, 0]) });
        let mask = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }]));
        img.save(dir.join(format!("{i}.png"))).unwrap();
        mask.save(dir.join(format!("{i}_mask.png"))).unwrap();
        let name = if disc { "disc" } else { "square" };
        lines.push(format!(
            r#"{{"image": "{i}.png", "conditioning_image": "{i}_mask.png", "text": "a {name}", "label": {}}}"#,
            i % 2
        ));
    }
    std::fs::write(dir.join("metadata.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn an_rgb_imagefolder_pretrains_trains_with_extracted_and_given_conditions_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    rgb_folder(&data);
    let dataset = format!("data.dataset={:?}", data.display().to_string());
    // The lines have both `text` and `label`: the label is the class.
    let data_args = ["--set", dataset.as_str(), "--set", "data.channels=3", "--set", "data.caption_column=\"\""];

    // Pretraining: in/out channels (3) and class count (2) follow the data.
    let main = tmp.path().join("main");
    let mut args = vec!["pretrain", "--quiet", "--steps", "2", "--threads", "1", "--output-dir", main.to_str().unwrap()];
    args.extend(data_args);
    args.extend(TINY_UNET);
    args.extend(["--set", "train.batch_size=4", "--set", "validation.num_images=2", "--set", "validation.sampler.steps=2"]);
    let (ok, _, stderr) = lisa(&args);
    assert!(ok, "{stderr}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(main.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(config["unet"]["in_channels"], 3);
    assert_eq!(config["unet"]["out_channels"], 3);
    assert_eq!(config["label_encoder"]["num_classes"], 2);

    // Side networks on the colour images: edges extracted from their luminance, and the given masks.
    let main_model = format!("main_network={:?}", main.join("model").display().to_string());
    let side = |task: &[&str], out: &Path| {
        let mut args = vec!["train", "--quiet", "--steps", "2", "--threads", "1", "--output-dir", out.to_str().unwrap()];
        args.extend(task);
        args.extend(data_args);
        args.extend(["--set", main_model.as_str()]);
        args.extend(TINY_EVAL);
        let (ok, stdout, stderr) = lisa(&args);
        assert!(ok, "{stderr}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
        (stdout, summary)
    };
    let (stdout, edges) = side(&["--task", "edges"], &tmp.path().join("edges"));
    assert_eq!(edges["metric"], "edge_f1");
    assert!(edges["final_fidelity"].as_f64().unwrap().is_finite(), "{edges}");
    // No classifier for this data: no Fréchet distance, and the run says so.
    assert!(edges.get("frechet").is_none(), "{edges}");
    assert!(stdout.contains("Fréchet distance skipped (no classifier for this data)"), "{stdout}");
    // Held out: 10% of the 16 images, never the training ones.
    assert_eq!(edges["final_eval_images"], 2);
    assert!(edges["held_out"].as_str().unwrap().contains("data.eval_fraction = 0.1"), "{edges}");
    let given_dir = tmp.path().join("given");
    let (_, given) = side(&["--task", "given", "--set", "given_kind=\"mask\""], &given_dir);
    assert_eq!((given["condition"].as_str(), given["metric"].as_str()), (Some("given"), Some("mask_iou")));
    assert!(given["final_fidelity"].as_f64().unwrap().is_finite(), "{given}");

    // The given-condition side network samples from a mask file, in colour.
    let grid = tmp.path().join("grid.png");
    let sample = |side_dir: &Path, how: &str, condition: &Path| {
        let (model, side_net) = (main.join("model"), side_dir.join("side-network"));
        let (ok, _, stderr) = lisa(&[
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--controlnet",
            side_net.to_str().unwrap(),
            how,
            condition.to_str().unwrap(),
            "--per-label",
            "1",
            "--sampling-steps",
            "2",
            "--out",
            grid.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
    };
    sample(&given_dir, "--condition", &data.join("3_mask.png"));
    let png = image::open(&grid).unwrap();
    assert!(png.color().has_color(), "the samples are in colour");
    let conditioning_channels = |dir: &Path| -> i64 {
        let text = std::fs::read_to_string(dir.join("side-network/config.json")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg["controlnet"]["conditioning_channels"].as_i64().unwrap()
    };
    // Given condition images follow data.channels (3 here) unless data.conditioning_channels says otherwise.
    assert_eq!(conditioning_channels(&given_dir), 3);
    let grey_given = tmp.path().join("given-grey");
    side(&["--task", "given", "--set", "given_kind=\"mask\"", "--set", "data.conditioning_channels=1"], &grey_given);
    assert_eq!(conditioning_channels(&grey_given), 1);
    assert_eq!(conditioning_channels(&tmp.path().join("edges")), 1, "edges come from the luminance");

    // Low resolution keeps the colour: a side network on three conditioning channels, scored colour by colour,
    // that samples from a condition extracted from a colour image.
    let lowres_dir = tmp.path().join("lowres");
    let (_, lowres) = side(&["--task", "lowres"], &lowres_dir);
    assert_eq!(lowres["metric"], "lowres_psnr");
    assert!(lowres["final_fidelity"].as_f64().unwrap().is_finite(), "{lowres}");
    assert_eq!(conditioning_channels(&lowres_dir), 3);
    sample(&lowres_dir, "--condition-from", &data.join("5.png"));
    // Its top row is the colour low-resolution condition of 5.png: not grey.
    let png = image::open(&grid).unwrap().to_rgb8();
    let top = (0..png.width()).flat_map(|x| (0..png.height() / 3).map(move |y| (x, y)));
    assert!(top.map(|(x, y)| png.get_pixel(x, y)).any(|p| p[0] != p[1] || p[1] != p[2]), "a colour condition row");

    // A classifier for this data (RGB, 32×32, two classes), then a comparison and an evaluation scored on it.
    let clf = tmp.path().join("classifier");
    let mut args = vec!["classifier", "--data", data.to_str().unwrap(), "--out", clf.to_str().unwrap()];
    args.extend(["--epochs", "2", "--threads", "1", "--set", "data.channels=3", "--set", "data.caption_column=\"\""]);
    args.extend(TINY_CLASSIFIER);
    let (ok, stdout, stderr) = lisa(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("classifier for 3-channel 32×32 images of 2 classes"), "{stdout}");
    let info = classifier_info(&clf);
    assert_eq!((info["data"]["train_images"].as_u64(), info["data"]["held_out_images"].as_u64()), (Some(14), Some(2)));
    let compare = tmp.path().join("compare");
    let mut args = vec!["compare", "--quiet", "--steps", "2", "--seeds", "1", "--threads", "1", "--task", "edges"];
    args.extend(["--output-dir", compare.to_str().unwrap(), "--classifier", clf.to_str().unwrap()]);
    args.extend(data_args);
    args.extend(["--set", main_model.as_str()]);
    args.extend(TINY_EVAL);
    let (ok, stdout, stderr) = lisa(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| Fréchet distance to held-out images |"), "{stdout}");
    let on = format!("Fréchet distances on the features of the classifier in {}", clf.display());
    assert!(stdout.contains(&on), "{stdout}");
    let seeds = std::fs::read_dir(&compare).unwrap().flatten();
    let seed = seeds.into_iter().find(|e| e.file_name().to_string_lossy().starts_with("seed-")).unwrap();
    let arm = seed.path().join("lisa/summary.json");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(arm).unwrap()).unwrap();
    for key in ["frechet", "frechet_floor", "frechet_ceiling"] {
        assert!(summary[key].as_f64().unwrap().is_finite(), "{key}: {summary}");
    }
    // Guidance on that comparison scores with the same classifier: scale 1 is the final evaluation again.
    let (ok, _, stderr) = lisa(&["guidance", "--run-dir", compare.to_str().unwrap(), "--scales", "1,2"]);
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(compare.join("guidance.json")).unwrap();
    let guidance: serde_json::Value = serde_json::from_str(&text).unwrap();
    let points = guidance["points"].as_array().unwrap();
    let at_1 = points.iter().find(|p| p["arm"] == "lisa" && p["guidance_scale"] == 1.0).unwrap();
    assert_eq!(at_1["fidelity"], summary["final_fidelity"], "{text}");
    assert_eq!(at_1["frechet"], summary["frechet"], "{text}");
    assert!(points.iter().all(|p| p["frechet"].as_f64().is_some_and(f64::is_finite)), "{text}");

    let model = main.join("model");
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--num-images", "2", "--sampling-steps", "2"];
        args.extend(extra);
        let (ok, stdout, stderr) = lisa(&args);
        assert!(ok, "{stderr}");
        stdout
    };
    // `eval` reads the data as the classifier was trained on it.
    let table = eval(&["--classifier", clf.to_str().unwrap()]);
    let on = format!("Fréchet distance on the features of the classifier in {}, 2 images", clf.display());
    assert!(table.contains(&on), "{table}");
    // It names the held-out set it compared with, the one recorded with the classifier.
    assert!(table.contains("vs a held-out fraction (data.eval_fraction ="), "{table}");
    for set in ["| real train images (floor) |", "| model samples |", "| uniform noise (ceiling) |"] {
        assert!(table.contains(set), "{table}");
    }
    let skipped = eval(&["--data", data.to_str().unwrap()]);
    assert!(skipped.contains("Fréchet distance skipped: there is no classifier for"), "{skipped}");
    assert!(skipped.contains("lisa classifier --data"), "{skipped}");

    // Read as grey (the default data.channels = 1), the colour images are converted with a note.
    let grey = tmp.path().join("grey");
    let mut args = vec!["pretrain", "--quiet", "--steps", "1", "--threads", "1", "--output-dir", grey.to_str().unwrap()];
    args.extend(["--set", dataset.as_str(), "--set", "data.caption_column=\"\""]);
    args.extend(TINY_UNET);
    args.extend(["--set", "train.batch_size=4", "--set", "validation.num_images=0"]);
    let (ok, _, stderr) = lisa(&args);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("14 of 14 images are in colour and are read as grey"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("note:")).count(), 1, "{stderr}");
}

/// A small classifier, trained briefly (`lisa classifier`).
const TINY_CLASSIFIER: [&str; 10] = [
    "--set",
    "train.model.channels=[4, 8, 8]",
    "--set",
    "train.model.feature_dim=16",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.warmup_steps=1",
    "--set",
    "train.log_every=0",
];

/// A side network's tiny training and final evaluation.
const TINY_EVAL: [&str; 12] = [
    "--set",
    "train.batch_size=4",
    "--set",
    "fidelity.num_images=2",
    "--set",
    "fidelity.sampler.steps=2",
    "--set",
    "fidelity.every_steps=1",
    "--set",
    "fidelity.loss_gain_every=0",
    "--set",
    "final_eval.num_images=2",
];

fn classifier_info(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("classifier.json")).unwrap()).unwrap()
}

#[test]
fn a_grey_imagefolder_gets_a_grey_classifier_that_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("grey");
    std::fs::create_dir_all(&data).unwrap();
    // 12 grey images of two classes: dark and bright squares; labels only.
    let mut lines = vec![];
    for i in 0..12u32 {
        let level = if i % 2 == 0 { 60 } else { 220 };
        let inside = |x: u32, y: u32| (3..9).contains(&x) && (3..9).contains(&y);
        let img = image::GrayImage::from_fn(12, 12, |x, y| image::Luma([if inside(x, y) { level } else { 0 }]));
        img.save(data.join(format!("{i}.png"))).unwrap();
        lines.push(format!(r#"{{"image": "{i}.png", "label": {}}}"#, i % 2));
    }
    std::fs::write(data.join("metadata.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = tmp.path().join("classifier");
    let mut args = vec!["classifier", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(["--epochs", "2", "--threads", "1", "--set", "data.image_size=16", "--set", "data.eval_fraction=0.25"]);
    args.extend(TINY_CLASSIFIER);
    let (ok, stdout, stderr) = lisa(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("classifier for 1-channel 16×16 images of 2 classes"), "{stdout}");
    let info = classifier_info(&out);
    assert_eq!(info["train"]["model"]["in_channels"], 1);
    assert_eq!(info["data"]["config"]["image_size"], 16);
    let (_vs, net, info) = lisa::eval::load_classifier_dir(&out, tch::Device::Cpu).unwrap();
    assert_eq!((info.train.model.in_channels, info.train.model.num_classes), (1, 2));
    let x = tch::Tensor::zeros([3, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu));
    assert_eq!(net.features_batched(&x, 2).unwrap().size(), [3, 16]);
}

#[test]
fn resume_latest_in_an_empty_folder_starts_a_fresh_run_and_then_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = |steps: &str| {
        let mut args = vec![
            "pretrain",
            "--quiet",
            "--resume",
            "latest",
            "--steps",
            steps,
            "--threads",
            "1",
            "--output-dir",
            out.to_str().unwrap(),
            "--set",
            "data.source=\"embedded\"",
            "--set",
            "data.max_examples=16",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.checkpointing_steps=1",
            "--set",
            "train.log_every=1",
            "--set",
            "validation.num_images=0",
        ];
        args.extend(TINY_UNET);
        lisa(&args)
    };
    let (ok, stdout, stderr) = run("2");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("no checkpoint in") && stderr.contains("--resume latest starts a fresh run"), "{stderr}");
    assert!(stdout.contains("trained 2 steps"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let steps: Vec<&str> = metrics.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(steps, ["1", "2"], "a fresh run from step 0:\n{metrics}");
    // The same command again (a requeued job) continues from checkpoint-2.
    let (ok, _, stderr) = run("3");
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("fresh run"), "{stderr}");
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().skip(1).last().unwrap().split(',').next(), Some("3"), "{metrics}");
}
