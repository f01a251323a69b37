//! Crash safety: a real `lisa pretrain` process is killed with SIGKILL at 20 pseudo-random moments (some
//! timed, some the instant a checkpoint starts or finishes being written) and resumed with
//! `--resume latest` each time (or started afresh while no checkpoint exists). After every kill each
//! `checkpoint-N/` present must load with the library's readers and nothing else may pass for a
//! checkpoint; at the end the loss curve and the final weights must equal those of an uninterrupted run.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lisa::pipeline::MainNetwork;
use lisa::rng::SplitMix64;
use lisa::train::checkpoint;

const STEPS: u64 = 30;
const KILLS: usize = 20;
const SEED: u64 = 20251128;

/// The run: a tiny UNet on 96 embedded images, one thread, a checkpoint every step (so that kills often
/// land inside a write), pruned to 3 (so that kills also land inside a prune).
const CONFIG: &str = include_str!("crash-run.toml");

fn start(config: &Path, out: &Path, resume: bool, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lisa"));
    cmd.args(["pretrain", "--quiet", "--config"]).arg(config).arg("--output-dir").arg(out);
    cmd.args(["--steps", &STEPS.to_string()]);
    if resume {
        cmd.args(["--resume", "latest"]);
    }
    let log = fs::File::create(log).unwrap();
    cmd.stdout(Stdio::null()).stderr(Stdio::from(log)).spawn().expect("start lisa")
}

/// `(step, loss)` rows of `metrics.csv`, as text, exactly as written.
fn losses(dir: &Path) -> Vec<(u64, String)> {
    let text = fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let col = header.iter().position(|c| *c == "loss").expect("a loss column");
    lines.map(|l| (l.split(',').next().unwrap().parse().unwrap(), l.split(',').nth(col).unwrap().to_string())).collect()
}

/// Names of the entries of `dir` that look like checkpoints (`checkpoint-<number>`).
fn checkpoint_like(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("checkpoint-").and_then(|s| s.parse().ok()).map(|n| (n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Hidden temporary checkpoint folders (`.checkpoint-N.tmp-PID` and the like).
fn temporaries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".checkpoint-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Every `checkpoint-N/` present is complete and loads; the library lists exactly those.
fn check_checkpoints(out: &Path, after: &str) {
    let present = checkpoint_like(out);
    let listed = checkpoint::list(out).unwrap();
    assert_eq!(listed, present, "{after}: the checkpoints listed differ from the checkpoint-N folders present");
    for (step, dir) in &present {
        let state = checkpoint::read_state(dir).unwrap_or_else(|e| panic!("{after}: {e}"));
        assert_eq!(state["step"].as_u64(), Some(*step), "{after}: {} has the wrong step", dir.display());
        for file in ["model.safetensors", "optimizer.safetensors", "ema.safetensors"] {
            let t = lisa::weights::read_tensors(&dir.join(file)).unwrap_or_else(|e| panic!("{after}: {e}"));
            assert!(!t.is_empty(), "{after}: {}/{file} holds no tensors", dir.display());
        }
        MainNetwork::load(dir, tch::Device::Cpu).unwrap_or_else(|e| panic!("{after}: {e}"));
    }
}

/// Waits until `stop()` holds or the child exits; returns false if it exited first.
fn wait_until(child: &mut Child, deadline: Duration, mut stop: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if stop() || t0.elapsed() > deadline {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn killed_and_resumed_runs_match_an_uninterrupted_run() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    fs::write(&config, CONFIG).unwrap();
    let (straight, crashed) = (tmp.path().join("straight"), tmp.path().join("crashed"));

    let mut child = start(&config, &straight, false, &tmp.path().join("straight.log"));
    assert!(child.wait().unwrap().success(), "{}", fs::read_to_string(tmp.path().join("straight.log")).unwrap());
    let run_time = t0.elapsed();

    let mut rng = SplitMix64::new(SEED);
    let (mut in_write, mut fresh_starts, mut finished_early) = (0, 0, 0);
    for kill in 0..KILLS {
        let resume = !checkpoint::list(&crashed).unwrap().is_empty();
        fresh_starts += usize::from(!resume);
        let log = tmp.path().join(format!("run-{kill}.log"));
        let mut child = start(&config, &crashed, resume, &log);
        let pid = child.id();
        let before = checkpoint::list(&crashed).unwrap().last().map_or(0, |c| c.0);
        let mode = rng.below(10);
        let alive = match mode {
            // At a random moment of the first 1.5 s (at most half a whole run), start-up included.
            0..=3 => {
                let span = run_time.min(Duration::from_secs(3)) / 2;
                let delay = Duration::from_micros(rng.below(span.as_micros() as u64));
                let t = Instant::now();
                wait_until(&mut child, delay * 2 + Duration::from_secs(5), || t.elapsed() >= delay)
            }
            // The instant the n-th checkpoint of this process starts being written, plus 0–0.5 ms.
            4..=6 => {
                let (n, extra) = (1 + rng.below(3) as usize, Duration::from_micros(rng.below(500)));
                let own = format!(".tmp-{pid}");
                let mut seen = std::collections::BTreeSet::new();
                let alive = wait_until(&mut child, run_time * 2, || {
                    seen.extend(temporaries(&crashed).into_iter().filter(|n| n.ends_with(&own)));
                    seen.len() >= n
                });
                std::thread::sleep(extra);
                alive
            }
            // Just after the n-th new checkpoint is complete (inside the prune, the folder sync or the next step).
            _ => {
                let (n, extra) = (1 + rng.below(2), Duration::from_micros(rng.below(3000)));
                let alive = wait_until(&mut child, run_time * 2, || {
                    checkpoint::list(&crashed).unwrap_or_default().last().map_or(0, |c| c.0) >= before + n
                });
                std::thread::sleep(extra);
                alive
            }
        };
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if !alive || status.success() {
            // The run ended before the kill: it must have ended well.
            assert!(status.success(), "run {kill} failed: {}", fs::read_to_string(&log).unwrap());
            finished_early += 1;
        }
        let own_tmp = temporaries(&crashed).iter().any(|n| n.ends_with(&format!(".tmp-{pid}")));
        in_write += usize::from(own_tmp);
        check_checkpoints(
            &crashed,
            &format!(
                "after kill {kill} (mode {mode}, {})",
                if own_tmp { "inside a checkpoint write" } else { "outside a write" }
            ),
        );
    }

    // Finish the run.
    let resume = !checkpoint::list(&crashed).unwrap().is_empty();
    let log = tmp.path().join("final.log");
    let mut child = start(&config, &crashed, resume, &log);
    assert!(child.wait().unwrap().success(), "{}", fs::read_to_string(&log).unwrap());
    check_checkpoints(&crashed, "at the end");
    assert_eq!(temporaries(&crashed), Vec::<String>::new(), "temporary folders of killed runs are cleaned up");

    let (a, b) = (losses(&straight), losses(&crashed));
    assert_eq!(a.iter().map(|r| r.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
    assert_eq!(b, a, "the loss curve of the killed-and-resumed run differs from the uninterrupted one");
    let wa = fs::read(straight.join("model/model.safetensors")).unwrap();
    let wb = fs::read(crashed.join("model/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
    eprintln!(
        "{KILLS} kills ({in_write} inside a checkpoint write, {fresh_starts} fresh starts, {finished_early} runs \
         finished before their kill); uninterrupted run {:.1} s, whole test {:.1} s",
        run_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert!(in_write > 0, "no kill landed inside a checkpoint write");
    assert!(finished_early < KILLS / 2, "most runs finished before their kill: the kills tested little");
}

/// A run killed after writing its last checkpoint but before writing `model/` gets its model when resumed
/// (there is nothing left to train, and the final model comes from that checkpoint).
#[test]
fn a_run_killed_after_its_last_checkpoint_gets_its_model_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tiny.toml");
    fs::write(&config, CONFIG).unwrap();
    let out = tmp.path().join("run");
    let run = |resume: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lisa"));
        cmd.args(["pretrain", "--quiet", "--steps", "3", "--config"]).arg(&config).arg("--output-dir").arg(&out);
        if resume {
            cmd.args(["--resume", "latest"]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(false);
    let model = fs::read(out.join("model/model.safetensors")).unwrap();
    fs::remove_dir_all(out.join("model")).unwrap();
    run(true);
    assert!(fs::read(out.join("model/model.safetensors")).unwrap() == model, "the model is missing or differs");
}
