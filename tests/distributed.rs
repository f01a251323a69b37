//! Data-parallel training on PyTorch's c10d (Gloo over loopback): a LISA side network trained by 2
//! processes with their shares of each batch of 32 follows the run of 1 process with the whole batch
//! (per-step losses and final weights within 1e-5 relative); a 2-process run resumed from its step-3
//! checkpoint, by 2 processes or by 1, reproduces it; killing one rank makes the other fail, naming it,
//! instead of hanging. The ranks are this test binary re-invoked with torchrun's variables.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lisa::control::{ControlTask, LisaConfig, LisaHead, SideNetwork};
use lisa::data::conditions::ConditionKind;
use lisa::data::Dataset;
use lisa::distributed::Backend;
use lisa::models::{ControlNetConfig, LabelEncoderConfig, UNetConfig};
use lisa::pipeline::{MainNetwork, MainNetworkConfig};
use lisa::train::trainer::{self, RunDir, TrainConfig};
use tch::{Device, Kind, Tensor};

/// Set in a re-invoked binary: it trains as one rank (see [`train_as_a_rank`]).
const ROLE: &str = "LISA_TEST_DIST_ROLE";
const TEST: &str = "data_parallel_lisa_training_matches_one_process_resumes_and_fails_cleanly";

/// Trains a tiny LISA side network (condition dropout on, so that per-example draws are exercised) into
/// `LISA_TEST_OUT` for `LISA_TEST_STEPS` steps, resuming when `LISA_TEST_RESUME` is set; every draw outside
/// the trainer is seeded, so every process builds the same networks and data.
fn train_as_a_rank() {
    let var = |k: &str| std::env::var(k).unwrap();
    tch::set_num_threads(1);
    tch::manual_seed(7);
    let cfg = MainNetworkConfig {
        unet: UNetConfig::tiny(),
        label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 2 },
        ..Default::default()
    };
    let mut main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
    main.freeze();
    let cn = ControlNetConfig {
        conditioning_embedding_out_channels: vec![4, 8],
        ..ControlNetConfig::for_unet(&main.config.unet)
    };
    let mut side = SideNetwork::from_main(&main, ConditionKind::Edges, cn).unwrap();
    side.set_gradient_checkpointing(std::env::var("LISA_TEST_RECOMPUTE").is_ok()).unwrap();
    let head = LisaHead::new(&main, &side, &LisaConfig { decoder_channel_floor: 8, ..LisaConfig::default() }).unwrap();
    let data = Dataset {
        images: Tensor::rand([48, 1, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
        labels: Tensor::randint(3, [48], (Kind::Int64, Device::Cpu)),
        num_classes: 3,
        class_names: vec!["a".into(), "b".into(), "c".into()],
        conditioning: Some(Tensor::rand([48, 1, 8, 8], (Kind::Float, Device::Cpu))),
    };
    let train = TrainConfig {
        steps: var("LISA_TEST_STEPS").parse().unwrap(),
        batch_size: 32,
        lr_warmup_steps: 0,
        learning_rate: 1e-3,
        checkpointing_steps: var("LISA_TEST_CHECKPOINT_EVERY").parse().unwrap(),
        log_every: 1,
        ..Default::default()
    };
    let out = PathBuf::from(var("LISA_TEST_OUT"));
    let resume = std::env::var("LISA_TEST_RESUME").ok();
    let run = RunDir { resume: resume.as_deref(), ..RunDir::plain(&out) };
    let task = ControlTask::new(&main, &side, Some(&head)).unwrap().with_condition_dropout(0.3).unwrap();
    let mut params = side.named_parameters();
    params.extend(head.named_parameters());
    match trainer::train(&task, params, &data, &main.objective, &train, &run, |_, _| Ok(())) {
        Ok(_) => lisa::distributed::leave().unwrap(),
        Err(e) => {
            println!("ERROR: {e}");
            std::process::exit(1);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One rank (`Some((rank, world, port))`) or a plain process (`None`) training into `out`.
fn spawn(out: &Path, steps: u64, checkpoint_every: u64, resume: bool, rank: Option<(usize, usize, u16)>) -> Child {
    spawn_with(out, steps, checkpoint_every, resume, rank, &[])
}

/// [`spawn`] with extra environment variables (e.g. `LISA_TEST_RECOMPUTE`).
fn spawn_with(
    out: &Path,
    steps: u64,
    checkpoint_every: u64,
    resume: bool,
    rank: Option<(usize, usize, u16)>,
    extra: &[(&str, &str)],
) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, "train")
        .env("LISA_TEST_OUT", out)
        .env("LISA_TEST_STEPS", steps.to_string())
        .env("LISA_TEST_CHECKPOINT_EVERY", checkpoint_every.to_string())
        .env("LISA_DIST_TIMEOUT_S", "20")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LISA_TEST_RESUME", "LISA_TEST_RECOMPUTE"] {
        cmd.env_remove(k);
    }
    cmd.envs(extra.iter().copied());
    if resume {
        cmd.env("LISA_TEST_RESUME", "latest");
    }
    if let Some((r, world, port)) = rank {
        cmd.env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
    }
    cmd.spawn().unwrap()
}

/// Waits for `child` at most `limit` (killing it past that): (success, its output).
fn finish(mut child: Child, limit: Duration) -> (bool, String) {
    let start = Instant::now();
    let ok = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut text).unwrap();
    (ok, text)
}

/// Trains with `world` processes (0 = a plain process, no launch variables) and checks they all succeed.
fn train(out: &Path, world: usize, steps: u64, checkpoint_every: u64, resume: bool) {
    let children: Vec<Child> = if world == 0 {
        vec![spawn(out, steps, checkpoint_every, resume, None)]
    } else {
        let port = free_port();
        (0..world).map(|r| spawn(out, steps, checkpoint_every, resume, Some((r, world, port)))).collect()
    };
    for (r, child) in children.into_iter().enumerate() {
        let (ok, text) = finish(child, Duration::from_secs(120));
        assert!(ok, "rank {r} of {world} failed:\n{text}");
    }
}

/// metrics.csv as rows of (column → value), without the wall-clock column.
fn metrics(dir: &Path) -> Vec<HashMap<String, f64>> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| {
            let values = l.split(',').map(|v| v.parse::<f64>().unwrap());
            header.iter().cloned().zip(values).filter(|(k, _)| k != "step_seconds").collect()
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-5 * a.abs().max(b.abs()) + 1e-12
}

fn assert_same_run(a: &Path, b: &Path, exact: bool) {
    let (ma, mb) = (metrics(a), metrics(b));
    let mut worst_loss = 0f64;
    assert_eq!(ma.len(), 5, "{}", a.display());
    assert_eq!(ma.len(), mb.len());
    for (step, (ra, rb)) in ma.iter().zip(&mb).enumerate() {
        assert_eq!(ra.len(), rb.len());
        for (k, va) in ra {
            let vb = rb[k];
            let ok = if exact { va.to_bits() == vb.to_bits() || (va.is_nan() && vb.is_nan()) } else { close(*va, vb) };
            if !exact && k == "loss" {
                worst_loss = worst_loss.max((va - vb).abs() / vb.abs());
            }
            assert!(ok, "step {}: {k} = {va} in {} but {vb} in {}", step + 1, a.display(), b.display());
        }
    }
    if !exact {
        eprintln!("largest relative loss difference: {worst_loss:.2e}");
    }
    let read = |d: &Path| Tensor::read_safetensors(d.join("checkpoint-5/model.safetensors")).unwrap();
    let (wa, wb): (HashMap<_, _>, HashMap<_, _>) = (read(a).into_iter().collect(), read(b).into_iter().collect());
    assert_eq!(wa.len(), wb.len());
    let mut worst = (0.0, String::new());
    for (name, ta) in &wa {
        let tb = &wb[name];
        if exact {
            assert!(ta.equal(tb), "{name} differs");
            continue;
        }
        // Relative to the tensor's norm: an element whose gradient nearly cancels moves by AdamW's full step
        // whatever its size, so its own relative error says nothing about the run.
        let rel = (ta - tb).norm().double_value(&[]) / tb.norm().double_value(&[]).max(1e-12);
        assert!(rel <= 1e-5, "{name}: relative difference {rel}");
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    if !exact {
        eprintln!("largest relative weight difference: {:.2e} ({})", worst.0, worst.1);
    }
}

fn copy_without_final_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "checkpoint-5" {
            continue;
        }
        if entry.path().is_dir() {
            copy_without_final_checkpoint(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn data_parallel_lisa_training_matches_one_process_resumes_and_fails_cleanly() {
    if std::env::var(ROLE).is_ok() {
        return train_as_a_rank();
    }
    if !Backend::Gloo.is_available() {
        eprintln!("skipped: this build has no Gloo backend");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    train(&one, 0, 5, 3, false);
    train(&two, 2, 5, 3, false);
    assert_same_run(&two, &one, false);

    // Two processes with the side network's activations recomputed: the one-process run, within rounding.
    let recomputed = tmp.path().join("two-recomputed");
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| spawn_with(&recomputed, 5, 3, false, Some((r, 2, port)), &[("LISA_TEST_RECOMPUTE", "1")]))
        .collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let (ok, text) = finish(child, Duration::from_secs(120));
        assert!(ok, "rank {r} of 2 (recomputed) failed:\n{text}");
    }
    assert_same_run(&recomputed, &one, false);

    // Resumed from the step-3 checkpoint by 2 processes: the same run, bit for bit; by 1: within rounding.
    let (again, alone) = (tmp.path().join("resumed-by-two"), tmp.path().join("resumed-by-one"));
    copy_without_final_checkpoint(&two, &again);
    copy_without_final_checkpoint(&two, &alone);
    train(&again, 2, 5, 3, true);
    assert_same_run(&again, &two, true);
    train(&alone, 0, 5, 3, true);
    assert_same_run(&alone, &one, false);

    // Rank 1 killed once rank 0 has written its first checkpoint: rank 0 fails within the timeout (20 s
    // here), naming it.
    let dead = tmp.path().join("dead");
    let port = free_port();
    let rank0 = spawn(&dead, 1000, 1, false, Some((0, 2, port)));
    let mut rank1 = spawn(&dead, 1000, 1, false, Some((1, 2, port)));
    let start = Instant::now();
    while !dead.join("checkpoint-1").exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dead.join("checkpoint-1").exists(), "no checkpoint within 60 s");
    let pid = rank1.id();
    rank1.kill().unwrap();
    let killed = Instant::now();
    let (ok, text) = finish(rank0, Duration::from_secs(40));
    let _ = rank1.wait();
    assert!(!ok, "rank 0 went on without rank 1:\n{text}");
    assert!(killed.elapsed() < Duration::from_secs(30), "rank 0 took {:?} to fail", killed.elapsed());
    // The test harness prints the test's name before it on the same line.
    let line = text.lines().find_map(|l| l.split_once("ERROR: ")).unwrap_or_else(|| panic!("no error:\n{text}")).1;
    assert!(line.contains(&format!("rank 1 (pid {pid}) exited")), "{line}");
}

/// A tiny pretraining run (data parallel through the binary: the CLI, the run lock, the final model).
const TINY_PRETRAIN: &str = r#"
threads = 1
device = "cpu"
label_dropout = 0.2
[data]
source = "embedded"
max_examples = 32
[model.unet]
block_out_channels = [8, 16]
down_block_types = ["DownBlock2D", "CrossAttnDownBlock2D"]
up_block_types = ["CrossAttnUpBlock2D", "UpBlock2D"]
cross_attention_dim = 16
attention_head_dim = 2
norm_num_groups = 4
[train]
steps = 3
batch_size = 8
lr_warmup_steps = 1
log_every = 1
checkpointing_steps = 2
[validation]
num_images = 0
"#;

fn lisa(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lisa"));
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        cmd.env_remove(k);
    }
    let out = cmd.args(args).env("LISA_DIST_TIMEOUT_S", "20").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn lisa_launch_pretrains_in_two_processes_as_one_would() {
    if !Backend::Gloo.is_available() {
        eprintln!("skipped: this build has no Gloo backend");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    std::fs::write(&config, TINY_PRETRAIN).unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    fn pretrain<'a>(config: &'a Path, out: &'a Path) -> [&'a str; 6] {
        ["pretrain", "--quiet", "--config", config.to_str().unwrap(), "--output-dir", out.to_str().unwrap()]
    }
    let (ok, text) = lisa(&pretrain(&config, &one));
    assert!(ok, "{text}");
    let mut launch = vec!["launch", "--nproc", "2", "--", "lisa"];
    launch.extend(pretrain(&config, &two));
    let (ok, text) = lisa(&launch);
    assert!(ok, "{text}");
    assert!(two.join("model/model.safetensors").exists() && !two.join(".lisa-run.lock").exists());
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!((m1.len(), m2.len()), (3, 3));
    for (a, b) in m1.iter().zip(&m2) {
        assert!(close(a["loss"], b["loss"]), "loss {} alone, {} in 2 processes", a["loss"], b["loss"]);
    }

    // Every process must get an equal share: one line saying so, and a non-zero exit.
    let mut launch = vec!["launch", "--nproc", "3", "--", "lisa"];
    let three = tmp.path().join("three");
    launch.extend(pretrain(&config, &three));
    let (ok, text) = lisa(&launch);
    assert!(!ok);
    assert_eq!(text.matches("train.batch_size = 8 is not a multiple of the 3 processes").count(), 1, "{text}");
}

#[test]
fn lisa_launch_names_the_signal_that_killed_a_rank() {
    let (ok, text) = lisa(&["launch", "--nproc", "2", "--", "sh", "-c", "if [ \"$RANK\" = 1 ]; then kill -9 $$; fi"]);
    assert!(!ok);
    assert!(text.contains("rank 1 of 2 failed first (killed by signal 9 (SIGKILL"), "{text}");
}

/// `train-sd` under `lisa launch --nproc 2`: the two processes split the encoding of the data cache and write the
/// same rows one process writes, and train as one process does.
#[test]
fn train_sd_in_two_processes_splits_the_encoding_and_trains_as_one() {
    if !Backend::Gloo.is_available() {
        eprintln!("skipped: this build has no Gloo backend");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut lines = Vec::new();
    for i in 0..6u8 {
        image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([i * 40, (x * 16) as u8, (y * 16) as u8]))
            .save(data.join(format!("{i}.png")))
            .unwrap();
        image::GrayImage::from_fn(16, 16, |x, _| image::Luma([if x == u32::from(i) { 255 } else { 0 }]))
            .save(data.join(format!("{i}_c.png")))
            .unwrap();
        lines.push(format!(r#"{{"image": "{i}.png", "conditioning_image": "{i}_c.png", "text": "p{}"}}"#, i % 2));
    }
    std::fs::write(data.join("metadata.jsonl"), lines.join("\n")).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden-diffusers");
    let run = |name: &str| -> Vec<String> {
        let (out, cache) = (tmp.path().join(name), tmp.path().join(format!("cache-{name}")));
        [
            "train-sd", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--output-dir",
            out.to_str().unwrap(), "--steps", "2", "--quiet", "--device", "cpu", "--set", "resolution=16", "--set",
            "conditioning_embedding_out_channels=[8, 16]", "--set", "train.batch_size=2", "--set",
            "train.log_every=1", "--set", "validation.every_steps=100", "--set", "validation.num_images=1", "--set",
            "validation.sampler.steps=2", "--set", "threads=1", "--set",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("latent_cache_dir=\"{}\"", cache.display())])
        .collect()
    };
    let one = run("one");
    let (ok, text) = lisa(&one.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    let mut launch: Vec<String> = ["launch", "--nproc", "2", "--", "lisa"].iter().map(|s| s.to_string()).collect();
    launch.extend(run("two"));
    let (ok, text) = lisa(&launch.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    let latents = |name: &str| {
        let cache = tmp.path().join(format!("cache-{name}"));
        let dir = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
        std::fs::read(dir.join("latents.f32")).unwrap()
    };
    assert_eq!(latents("one"), latents("two"), "the rows two processes encoded are the rows one encoded");
    let (m1, m2) = (metrics(&tmp.path().join("one")), metrics(&tmp.path().join("two")));
    assert_eq!((m1.len(), m2.len()), (2, 2));
    for (a, b) in m1.iter().zip(&m2) {
        assert!(close(a["loss"], b["loss"]), "loss {} alone, {} in 2 processes", a["loss"], b["loss"]);
    }
}
