//! `lisa bench`: wall time of FULL side-network training steps (noise and timesteps, forward,
//! backward, gradient clipping, AdamW update, zero_grad) on the frozen main network, for our
//! baseline, our LISA with the shared-encoder reference pass and our LISA with a full second forward,
//! next to the authors' step in PyTorch + diffusers (`bench/reference.py --bench --serve`, driven one
//! step at a time over a pipe so that its steps interleave with ours).
//!
//! Inputs are random tensors of the right shapes, as the reference draws them: `x0 ~ U(-1, 1)`, the
//! (edges) condition `c ~ U(0, 1)`, labels uniform over the classes; the step's cost does not depend
//! on their values. Alongside the times: samples per second, each process's peak RSS, the machine's
//! measured GEMM rate and the step's achieved FLOP rate from FLOPs counted on the layers' shapes
//! (see [`StepFlops`]). On the shipped main network at batch 2 that count came within 1.5% of
//! `torch.utils.flop_counter.FlopCounterMode` on the reference's baseline and LISA steps (forward and backward).
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::control_config::ControlConfig;
use crate::control::{ControlTask, LisaConfig, LisaHead, ReferencePass, SideNetwork};
use crate::data::conditions::ConditionKind;
use crate::diffusion::Objective;
use crate::eval::flops::{shapes, FlopContext, StepFlops, FLOP_NOTE};
use crate::models::ControlNetConfig;
use crate::pipeline::MainNetwork;
use crate::models::precision::MixedPrecision;
use crate::train::loss_scaler::LossScaler;
use crate::train::optim::AdamW;
use crate::train::step::{train_step, Batch, Noise, StepOutcome, StepSettings};
use crate::{Error, Result};

/// What the benchmark feeds every step (stated in the output).
pub const INPUTS: &str = "random inputs of the right shapes, as the reference draws them: x0 ~ U(-1, 1), \
                          edges-condition slot c ~ U(0, 1), labels uniform over the classes; fresh noise and \
                          timesteps every step";

/// How the reference script is run: the project venv's Python and `bench/reference.py`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceCommand {
    /// The Python interpreter (needs torch and diffusers: `scripts/setup-reference.sh`).
    pub python: PathBuf,
    /// `bench/reference.py`.
    pub script: PathBuf,
}

impl ReferenceCommand {
    /// `<root>/.venv/bin/python` and `<root>/bench/reference.py`.
    pub fn in_repo(root: &Path) -> Self {
        Self { python: root.join(".venv").join("bin").join("python"), script: root.join("bench").join("reference.py") }
    }
}

/// The repository this binary was built from (where `.venv/` and `bench/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Settings of `lisa bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    /// The main network's folder (frozen during the benchmark).
    pub main_network: PathBuf,
    /// Examples per step.
    pub batch: i64,
    /// CPU threads of libtorch, in both processes.
    pub threads: i32,
    /// Timed steps per variant.
    pub reps: usize,
    /// Untimed rounds before them (every variant steps once per round).
    pub warmup: usize,
    /// Seed of initialisation and inputs.
    pub seed: u64,
    /// Side of the square f32 matmul timed for the machine's GEMM rate.
    pub gemm_size: i64,
    /// Examples per step that get the LISA term in the sub-batch variant (`lisa.sub_batch`).
    pub lisa_sub_batch: i64,
    /// The reference to compare against; `None` = ours only.
    pub reference: Option<ReferenceCommand>,
}

impl BenchConfig {
    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.batch < 1 || self.threads < 1 || self.reps < 1 || self.gemm_size < 1 {
            return Err(Error::Config("bench: --batch, --threads, --reps and --gemm-size must be ≥ 1".into()));
        }
        if !(1..=self.batch).contains(&self.lisa_sub_batch) {
            return Err(Error::Config(format!(
                "bench: --lisa-sub-batch must be between 1 and --batch ({}), got {}",
                self.batch, self.lisa_sub_batch
            )));
        }
        Ok(())
    }
}

/// One timed training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Our baseline (no LISA term).
    OursBaseline,
    /// Our LISA, `pred_main` from the shared encoder (spec §6).
    OursLisaShared,
    /// Our LISA, `pred_main` from a full second forward (as the authors).
    OursLisaFull,
    /// Our LISA (shared encoder) with the LISA term on a sub-batch (`lisa.sub_batch`): an unbiased
    /// estimate of the same loss, with more variance; not the authors' algorithm.
    OursLisaSubBatch,
    /// The reference's baseline.
    ReferenceBaseline,
    /// The reference's (authors') LISA, with its full second forward.
    ReferenceLisa,
}

impl Variant {
    /// Every variant, in table order.
    pub const ALL: [Variant; 6] = [
        Variant::OursBaseline,
        Variant::OursLisaShared,
        Variant::OursLisaFull,
        Variant::OursLisaSubBatch,
        Variant::ReferenceBaseline,
        Variant::ReferenceLisa,
    ];

    /// The row label.
    pub fn label(self) -> &'static str {
        match self {
            Variant::OursBaseline => "ours, baseline",
            Variant::OursLisaShared => "ours, LISA (shared encoder)",
            Variant::OursLisaFull => "ours, LISA (full 2nd forward)",
            Variant::OursLisaSubBatch => "ours, LISA (shared encoder, LISA term on a sub-batch)",
            Variant::ReferenceBaseline => "reference, baseline",
            Variant::ReferenceLisa => "reference, LISA (full 2nd forward)",
        }
    }

    /// Whether this runs in our process.
    pub fn is_ours(self) -> bool {
        matches!(
            self,
            Variant::OursBaseline | Variant::OursLisaShared | Variant::OursLisaFull | Variant::OursLisaSubBatch
        )
    }

    /// The reference script's arm name (`baseline` or `lisa`), for the reference's variants.
    pub fn reference_arm(self) -> Option<&'static str> {
        match self {
            Variant::ReferenceBaseline => Some("baseline"),
            Variant::ReferenceLisa => Some("lisa"),
            _ => None,
        }
    }
}

/// The median (mean of the middle two for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The arithmetic mean; NaN when empty.
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Summary of one variant's step times, seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimingStats {
    /// Median step.
    pub median_s: f64,
    /// Mean step.
    pub mean_s: f64,
    /// Fastest step.
    pub min_s: f64,
    /// Slowest step.
    pub max_s: f64,
    /// Every timed step, in the order run.
    pub times_s: Vec<f64>,
}

impl TimingStats {
    /// The statistics of `times`.
    pub fn from_times(times: Vec<f64>) -> Self {
        Self {
            median_s: median(&times),
            mean_s: mean(&times),
            min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
            max_s: times.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            times_s: times,
        }
    }
}

/// One row of the results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantResult {
    /// Which step.
    pub variant: Variant,
    /// Its row label.
    pub label: String,
    /// Step times.
    pub stats: TimingStats,
    /// `batch / median step`.
    pub samples_per_s: f64,
    /// Counted FLOPs of one step, 10⁹ (see [`StepFlops`]).
    pub gflop_per_step: f64,
    /// `gflop_per_step / median step`.
    pub achieved_gflops: f64,
}

impl VariantResult {
    /// The row of `variant` from its step times.
    pub fn new(variant: Variant, times: Vec<f64>, batch: i64, gflop_per_step: f64) -> Self {
        let stats = TimingStats::from_times(times);
        Self {
            variant,
            label: variant.label().into(),
            samples_per_s: batch as f64 / stats.median_s,
            achieved_gflops: gflop_per_step / stats.median_s,
            gflop_per_step,
            stats,
        }
    }
}

/// A ratio of medians and the ratio of means.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// `median(a) / median(b)`.
    pub median: f64,
    /// `mean(a) / mean(b)`.
    pub mean: f64,
}

/// Ours against the reference, and LISA against its baseline (`None` where a variant is missing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparisons {
    /// Our baseline step / the reference's.
    pub ours_over_reference_baseline: Option<Ratio>,
    /// Our LISA step (shared encoder) / the reference's LISA step.
    pub ours_shared_over_reference_lisa: Option<Ratio>,
    /// Our LISA step (full second forward, the reference's algorithm) / the reference's LISA step.
    pub ours_full_over_reference_lisa: Option<Ratio>,
    /// Our LISA (shared encoder) / our baseline − 1.
    pub lisa_overhead_ours_shared: Option<Ratio>,
    /// Our LISA (full second forward) / our baseline − 1.
    pub lisa_overhead_ours_full: Option<Ratio>,
    /// Our LISA with the term on a sub-batch / the reference's LISA step.
    #[serde(default)]
    pub ours_sub_batch_over_reference_lisa: Option<Ratio>,
    /// Our LISA with the term on a sub-batch / our baseline − 1.
    #[serde(default)]
    pub lisa_overhead_ours_sub_batch: Option<Ratio>,
    /// The reference's LISA / its baseline − 1.
    pub lisa_overhead_reference: Option<Ratio>,
}

impl Comparisons {
    /// The ratios between the rows of `results`.
    pub fn from_results(results: &[VariantResult]) -> Self {
        let get = |v: Variant| results.iter().find(|r| r.variant == v).map(|r| &r.stats);
        let ratio = |a: Variant, b: Variant| match (get(a), get(b)) {
            (Some(a), Some(b)) => Some(Ratio { median: a.median_s / b.median_s, mean: a.mean_s / b.mean_s }),
            _ => None,
        };
        let overhead =
            |a: Variant, b: Variant| ratio(a, b).map(|r| Ratio { median: r.median - 1.0, mean: r.mean - 1.0 });
        use Variant::*;
        Self {
            ours_over_reference_baseline: ratio(OursBaseline, ReferenceBaseline),
            ours_shared_over_reference_lisa: ratio(OursLisaShared, ReferenceLisa),
            ours_full_over_reference_lisa: ratio(OursLisaFull, ReferenceLisa),
            lisa_overhead_ours_shared: overhead(OursLisaShared, OursBaseline),
            lisa_overhead_ours_full: overhead(OursLisaFull, OursBaseline),
            ours_sub_batch_over_reference_lisa: ratio(OursLisaSubBatch, ReferenceLisa),
            lisa_overhead_ours_sub_batch: overhead(OursLisaSubBatch, OursBaseline),
            lisa_overhead_reference: overhead(ReferenceLisa, ReferenceBaseline),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// FLOPs

/// FLOPs of one training step of each variant (the per-layer counting is [`crate::eval::flops`]).
impl StepFlops {
    /// FLOPs of one training step of `variant` at `batch`, `lisa_examples` of which get the LISA term in
    /// the sub-batch variant.
    pub fn per_step(&self, variant: Variant, batch: i64, lisa_examples: i64) -> f64 {
        let baseline = (3.0 * self.side + self.main_encoder + 2.0 * self.main_up) * batch as f64;
        let shared_lisa = self.main_up + 3.0 * self.decoder;
        match variant {
            Variant::OursBaseline | Variant::ReferenceBaseline => baseline,
            Variant::OursLisaShared => baseline + shared_lisa * batch as f64,
            Variant::OursLisaSubBatch => baseline + shared_lisa * lisa_examples as f64,
            Variant::OursLisaFull | Variant::ReferenceLisa => {
                baseline + (self.main_encoder + shared_lisa) * batch as f64
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Peak RSS

/// `VmHWM` (peak resident set size, KiB) from the text of `/proc/<pid>/status`.
pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// This process's peak resident set size, KiB (`VmHWM` of `/proc/self/status`; `None` off Linux).
pub fn peak_rss_kib() -> Option<u64> {
    parse_vm_hwm_kib(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn fmt_kib(kib: Option<u64>) -> String {
    match kib {
        None => "—".into(),
        Some(k) if k >= 1 << 20 => format!("{:.2} GiB", k as f64 / (1u64 << 20) as f64),
        Some(k) => format!("{:.0} MiB", k as f64 / 1024.0),
    }
}

// ------------------------------------------------------------------------------------------------
// The reference process

/// What the reference reported about itself, or why it did not run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceInfo {
    /// `ran`, `skipped` (it could not start: see `reason`) or `disabled` (`--no-reference`).
    pub status: String,
    /// Why it was skipped.
    pub reason: Option<String>,
    /// Its `ready` message (versions, parameter counts), when it ran.
    pub header: Option<serde_json::Value>,
    /// Its peak RSS (`getrusage` `ru_maxrss`), KiB.
    pub peak_rss_kib: Option<u64>,
}

/// One line of the reference's `--serve` protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferenceMessage {
    /// Set up; its header.
    Ready(serde_json::Value),
    /// One step of `arm` took `seconds`.
    Step {
        /// `baseline` or `lisa`.
        arm: String,
        /// Its time.
        seconds: f64,
    },
    /// Finished; its peak RSS in KiB.
    Done {
        /// `ru_maxrss`.
        maxrss_kib: u64,
    },
    /// It rejected a command.
    Error(String),
}

/// Parses one line of `bench/reference.py --bench --serve`'s output.
pub fn parse_reference_line(line: &str) -> std::result::Result<ReferenceMessage, String> {
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("not a JSON line ({e}): {:?}", line.trim()))?;
    if v.get("ready").and_then(|r| r.as_bool()) == Some(true) {
        return Ok(ReferenceMessage::Ready(v));
    }
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Ok(ReferenceMessage::Error(e.into()));
    }
    if v.get("done").and_then(|d| d.as_bool()) == Some(true) {
        let k = v.get("maxrss_kib").and_then(|k| k.as_u64()).ok_or_else(|| format!("no maxrss_kib in {line:?}"))?;
        return Ok(ReferenceMessage::Done { maxrss_kib: k });
    }
    match (v.get("arm").and_then(|a| a.as_str()), v.get("seconds").and_then(|s| s.as_f64())) {
        (Some(arm), Some(seconds)) => Ok(ReferenceMessage::Step { arm: arm.into(), seconds }),
        _ => Err(format!("unexpected message {:?}", line.trim())),
    }
}

/// `bench/reference.py --bench --serve` as a child process, stepped over its stdin/stdout. While it
/// steps our process waits on the pipe, and while we step it waits on its stdin: the two never run at once.
struct ReferenceProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<String>>,
    header: serde_json::Value,
}

impl ReferenceProcess {
    /// Starts the reference and waits until its arms are built; `Err` says why it cannot run.
    fn start(
        cmd: &ReferenceCommand,
        main_dir: &Path,
        batch: i64,
        threads: i32,
        seed: u64,
    ) -> std::result::Result<Self, String> {
        const SETUP: &str = "create the project venv with scripts/setup-reference.sh, or pass --python";
        if !cmd.python.is_file() {
            return Err(format!("no Python at {} ({SETUP})", cmd.python.display()));
        }
        if !cmd.script.is_file() {
            return Err(format!("no reference script at {}", cmd.script.display()));
        }
        let config = main_dir.join(crate::pipeline::CONFIG_FILE);
        let mut child = Command::new(&cmd.python)
            .arg(&cmd.script)
            .args(["--bench", "--serve", "--batch", &batch.to_string(), "--threads", &threads.to_string()])
            .args(["--seed", &seed.to_string(), "--config"])
            .arg(&config)
            // The allocator settings our binary uses (crate::allocator), so that both sides differ in
            // compute alone; a GLIBC_TUNABLES the user set is passed on as it is.
            .env("GLIBC_TUNABLES", crate::allocator::glibc_tunables_for_children())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e} ({SETUP})", cmd.python.display()))?;
        let (stdin, stdout, mut stderr) = (
            child.stdin.take().expect("piped stdin"),
            child.stdout.take().expect("piped stdout"),
            child.stderr.take().expect("piped stderr"),
        );
        // Drained on a thread so that warnings cannot fill the pipe and block the child.
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut p = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr: Some(stderr),
            header: serde_json::Value::Null,
        };
        match p.read_message() {
            Ok(ReferenceMessage::Ready(h)) => {
                p.header = h;
                Ok(p)
            }
            Ok(other) => Err(format!("{} sent {other:?} instead of `ready`", cmd.script.display())),
            Err(e) => {
                let hint = if e.contains("No module named") { format!(" ({SETUP})") } else { String::new() };
                Err(format!("{} did not start: {e}{hint}", cmd.script.display()))
            }
        }
    }

    /// The next protocol message; on end of output, the child's exit status and last stderr line.
    fn read_message(&mut self) -> std::result::Result<ReferenceMessage, String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).map_err(|e| format!("reading its output: {e}"))?;
        if n == 0 {
            let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim().to_string();
            return Err(format!("it exited ({status}): {last}"));
        }
        parse_reference_line(&line)
    }

    fn send(&mut self, command: &str) -> std::result::Result<(), String> {
        writeln!(self.stdin, "{command}").and_then(|_| self.stdin.flush()).map_err(|e| format!("writing to it: {e}"))
    }

    /// One step of `arm`; its seconds (measured inside the reference).
    fn step(&mut self, arm: &str) -> Result<f64> {
        let fail = |e: String| Error::Training(format!("the reference failed during the benchmark: {e}"));
        self.send(&format!("step {arm}")).map_err(fail)?;
        match self.read_message().map_err(fail)? {
            ReferenceMessage::Step { arm: a, seconds } if a == arm => Ok(seconds),
            other => Err(fail(format!("expected a step of {arm}, got {other:?}"))),
        }
    }

    /// Ends the child; its peak RSS, KiB.
    fn finish(mut self) -> Result<u64> {
        let fail = |e: String| Error::Training(format!("the reference failed at the end of the benchmark: {e}"));
        self.send("quit").map_err(fail)?;
        match self.read_message().map_err(fail)? {
            ReferenceMessage::Done { maxrss_kib } => {
                let _ = self.child.wait();
                Ok(maxrss_kib)
            }
            other => Err(fail(format!("expected `done`, got {other:?}"))),
        }
    }
}

impl Drop for ReferenceProcess {
    fn drop(&mut self) {
        // After `finish` the child has exited; on an early error it must not outlive us.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The benchmark

/// The machine's matmul rate, measured in the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmResult {
    /// `n` of the `n×n · n×n` f32 matmul.
    pub size: i64,
    /// Timed matmuls (one per round, interleaved with the steps).
    pub stats: TimingStats,
    /// `2n³ / median`, 10⁹/s.
    pub median_gflops: f64,
    /// `2n³ / fastest`, 10⁹/s.
    pub best_gflops: f64,
}

/// Everything `lisa bench` measured (`--out` writes it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The main network's folder.
    pub main_network: String,
    /// Its parameters (frozen).
    pub main_parameters: i64,
    /// Trainable parameters of the side network.
    pub side_parameters: i64,
    /// Trainable parameters of the LISA decoder.
    pub decoder_parameters: i64,
    /// Examples per step.
    pub batch: i64,
    /// Examples per step that get the LISA term in the sub-batch variant.
    #[serde(default)]
    pub lisa_sub_batch: i64,
    /// libtorch threads (both processes).
    pub threads: i32,
    /// Timed steps per variant.
    pub reps: usize,
    /// Untimed rounds before them.
    pub warmup: usize,
    /// What the steps are fed.
    pub inputs: String,
    /// How the variants' steps were ordered.
    pub interleaving: String,
    /// The malloc settings both processes ran under (see [`crate::allocator`]).
    #[serde(default)]
    pub allocator: String,
    /// One row per variant that ran.
    pub variants: Vec<VariantResult>,
    /// Ratios between them.
    pub comparisons: Comparisons,
    /// Forward FLOPs per sample of the step's parts.
    pub flops: StepFlops,
    /// How they are counted.
    pub flop_note: String,
    /// The GEMM rate.
    pub gemm: GemmResult,
    /// Peak RSS of our process (all four of our variants live in it), KiB.
    pub peak_rss_kib: Option<u64>,
    /// The reference.
    pub reference: ReferenceInfo,
}

impl BenchReport {
    /// The row of `variant`, if it ran.
    pub fn variant(&self, variant: Variant) -> Option<&VariantResult> {
        self.variants.iter().find(|r| r.variant == variant)
    }

    /// The printed report: settings, a table per variant, the comparisons, memory, GEMM and FLOP rates.
    pub fn table(&self) -> String {
        let mut s = format!(
            "lisa bench: batch {}, {} thread(s), {} timed step(s) per variant after {} warm-up round(s)\n\
             main network {} ({} parameters, frozen); side network {} trainable parameters, LISA decoder {}\n\
             inputs: {}\nordering: {}\nallocator: {}\n",
            self.batch,
            self.threads,
            self.reps,
            self.warmup,
            self.main_network,
            self.main_parameters,
            self.side_parameters,
            self.decoder_parameters,
            self.inputs,
            self.interleaving,
            self.allocator,
        );
        match self.reference.status.as_str() {
            "skipped" => {
                s += &format!("reference skipped: {}\n", self.reference.reason.as_deref().unwrap_or("unknown reason"))
            }
            "disabled" => s += "reference not run (--no-reference)\n",
            _ => {
                let h = self.reference.header.as_ref();
                let field = |k: &str| h.and_then(|h| h.get(k)).and_then(|v| v.as_str()).unwrap_or("?").to_string();
                s += &format!(
                    "reference: bench/reference.py, torch {}, diffusers {}\n",
                    field("torch"),
                    field("diffusers")
                );
            }
        }
        s += "\n| variant | median step | mean step | min – max | samples/s (median) | GFLOP/step | achieved GFLOP/s |\n\
              |---|---|---|---|---|---|---|\n";
        for r in &self.variants {
            let t = &r.stats;
            s += &format!(
                "| {} | {:.3} s | {:.3} s | {:.3} – {:.3} s | {:.1} | {:.1} | {:.1} |\n",
                r.label, t.median_s, t.mean_s, t.min_s, t.max_s, r.samples_per_s, r.gflop_per_step, r.achieved_gflops
            );
        }
        let c = &self.comparisons;
        let ratio = |r: Option<Ratio>| r.map_or("—".to_string(), |r| format!("{:.3} | {:.3}", r.median, r.mean));
        let pct = |r: Option<Ratio>| {
            r.map_or("—".to_string(), |r| format!("{:+.1}% | {:+.1}%", 100.0 * r.median, 100.0 * r.mean))
        };
        s += "\n| comparison | of medians | of means |\n|---|---|---|\n";
        s += &format!("| ours / reference, baseline step | {} |\n", ratio(c.ours_over_reference_baseline));
        s += &format!(
            "| ours / reference, LISA step (ours: shared encoder) | {} |\n",
            ratio(c.ours_shared_over_reference_lisa)
        );
        s += &format!(
            "| ours / reference, LISA step (ours: full 2nd forward) | {} |\n",
            ratio(c.ours_full_over_reference_lisa)
        );
        s +=
            &format!("| LISA overhead over baseline, ours (shared encoder) | {} |\n", pct(c.lisa_overhead_ours_shared));
        s +=
            &format!("| LISA overhead over baseline, ours (full 2nd forward) | {} |\n", pct(c.lisa_overhead_ours_full));
        s += &format!(
            "| ours / reference, LISA step (ours: LISA term on {} of {}) | {} |\n",
            self.lisa_sub_batch,
            self.batch,
            ratio(c.ours_sub_batch_over_reference_lisa)
        );
        s += &format!(
            "| LISA overhead over baseline, ours (LISA term on {} of {}) | {} |\n",
            self.lisa_sub_batch,
            self.batch,
            pct(c.lisa_overhead_ours_sub_batch)
        );
        s += &format!("| LISA overhead over baseline, reference | {} |\n", pct(c.lisa_overhead_reference));
        s += &format!(
            "\npeak RSS: ours {} (one process holding all four of our variants), reference {} (one process, \
             both its arms)\n",
            fmt_kib(self.peak_rss_kib),
            fmt_kib(self.reference.peak_rss_kib)
        );
        let g = &self.gemm;
        s += &format!(
            "GEMM {n}×{n}×{n} f32 on {} thread(s), in this run: median {:.1} GFLOP/s (best {:.1}, {} timed)",
            self.threads,
            g.median_gflops,
            g.best_gflops,
            g.stats.times_s.len(),
            n = g.size
        );
        if let Some(b) = self.variant(Variant::OursBaseline) {
            s += &format!(
                "; our baseline step reaches {:.0}% of the median GEMM rate",
                100.0 * b.achieved_gflops / g.median_gflops
            );
        }
        s += &format!(".\n{}.\n", self.flop_note);
        if !self.flops.unrecognised.is_empty() {
            s += &format!("(not counted, unrecognised: {})\n", self.flops.unrecognised.join(", "));
        }
        s
    }
}

/// One of our variants: its side network, decoder, task and optimizer.
struct OursArm {
    variant: Variant,
    side: SideNetwork,
    head: Option<LisaHead>,
}

/// One training step of ours: the trainer's own [`train_step`] (host-drawn noise reseeded from the
/// step, autocast, backward, clip, the host reads, AdamW, zero_grad), under fp16 with the trainer's loss
/// scaler (`scaler`, one per arm, kept across its steps); its seconds. An fp16 step whose gradients overflowed
/// is timed like any other (the trainer skips its update too); any other non-finite step is an error.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ours_step(
    task: &ControlTask,
    opt: &mut AdamW,
    objective: &Objective,
    batch: &Batch,
    seed: u64,
    round: u64,
    lr: f64,
    settings: StepSettings,
    scaler: Option<&mut LossScaler>,
) -> Result<f64> {
    let t0 = Instant::now();
    let noise = Noise::Seeded { seed, first_counter: round };
    let scaled = scaler.is_some();
    let r = train_step(task, opt, objective, std::slice::from_ref(batch), noise, lr, settings, scaler)?;
    match r.outcome {
        StepOutcome::Applied => {}
        StepOutcome::Overflow if scaled => {}
        _ => {
            return Err(Error::Training(format!(
                "bench: non-finite loss ({}) or gradient norm ({})",
                r.loss, r.grad_norm
            )))
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The trainer's loss scaler for an arm, where the step runs under fp16 (`None` otherwise).
pub(crate) fn loss_scaler_for(settings: StepSettings) -> Option<LossScaler> {
    (settings.mixed_precision == MixedPrecision::Fp16).then(LossScaler::new)
}

/// A step slot of the round-robin.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Ours(usize),
    Reference(Variant),
    Gemm,
}

/// What the report says of the malloc settings: ours (`tuned` = glibc took them) and what the reference got.
fn allocator_settings(tuned: bool) -> String {
    let ours = if tuned {
        format!(
            "ours glibc malloc with mmap threshold {} MiB and trim threshold {} MiB",
            crate::allocator::MMAP_THRESHOLD_BYTES >> 20,
            crate::allocator::TRIM_THRESHOLD_BYTES >> 20
        )
    } else {
        "ours the platform's default malloc".to_string()
    };
    let theirs = crate::allocator::glibc_tunables_for_children();
    format!("{ours}; the reference GLIBC_TUNABLES={theirs}")
}

/// Runs the benchmark: builds our four variants on the frozen main network (and starts the reference
/// unless disabled), then runs `warmup + reps` rounds in each of which every variant takes one step
/// and one GEMM is timed, the order rotated by one slot per round. `log` receives progress lines.
pub fn run_bench(cfg: &BenchConfig, log: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    cfg.validate()?;
    tch::set_num_threads(cfg.threads);
    // Ours as the CLI runs it; the reference gets the same settings through GLIBC_TUNABLES.
    let tuned_allocator = crate::allocator::keep_freed_memory_for_reuse();
    let mut main = MainNetwork::load(&cfg.main_network, Device::Cpu)?;
    main.freeze();
    let ctl = ControlConfig::default();
    let u = main.config.unet.clone();
    let cn = ControlNetConfig {
        conditioning_embedding_out_channels: ctl.conditioning_embedding_out_channels.clone(),
        ..ControlNetConfig::for_unet(&u)
    };
    let mut arms = Vec::new();
    for (variant, pass, sub_batch) in [
        (Variant::OursBaseline, None, 0),
        (Variant::OursLisaShared, Some(ReferencePass::SharedEncoder), 0),
        (Variant::OursLisaFull, Some(ReferencePass::Full), 0),
        (Variant::OursLisaSubBatch, Some(ReferencePass::SharedEncoder), cfg.lisa_sub_batch),
    ] {
        // The same seed: every variant starts from the same side network (and decoder).
        tch::manual_seed(cfg.seed as i64);
        let side = SideNetwork::from_main(&main, ConditionKind::Edges, cn.clone())?;
        let head = match pass {
            None => None,
            Some(reference_pass) => {
                Some(LisaHead::new(&main, &side, &LisaConfig { reference_pass, sub_batch, ..ctl.lisa.clone() })?)
            }
        };
        arms.push(OursArm { variant, side, head });
    }
    let tasks: Vec<ControlTask> =
        arms.iter().map(|a| ControlTask::new(&main, &a.side, a.head.as_ref())).collect::<Result<_>>()?;
    let mut opts: Vec<AdamW> = arms
        .iter()
        .map(|a| {
            let mut p = a.side.named_parameters();
            if let Some(h) = &a.head {
                p.extend(h.named_parameters());
            }
            AdamW::new(p, ctl.train.adam.clone())
        })
        .collect();

    // FLOPs from shapes.
    let hook_res = cn
        .hookable_layers(u.sample_size, u.sample_size)
        .into_iter()
        .find(|l| l.hook == ctl.lisa.hook)
        .map_or(u.sample_size, |l| l.height);
    let ctx = FlopContext {
        unet: u.clone(),
        size: u.sample_size,
        label_tokens: main.config.label_encoder.num_tokens,
        cond_stride2: cn.num_stride2(),
        decoder_feature_res: hook_res,
    };
    let decoder_params = arms[1].head.as_ref().map(|h| h.named_parameters()).unwrap_or_default();
    let flops = StepFlops::count(
        &ctx,
        &shapes(&main.named_parameters()),
        &shapes(&arms[0].side.named_parameters()),
        &shapes(&decoder_params),
    );

    let (mut reference, reference_info) = match &cfg.reference {
        None => (None, ReferenceInfo { status: "disabled".into(), reason: None, header: None, peak_rss_kib: None }),
        Some(cmd) => {
            log("starting the reference (bench/reference.py --bench --serve) ...");
            match ReferenceProcess::start(cmd, &cfg.main_network, cfg.batch, cfg.threads, cfg.seed) {
                Ok(p) => {
                    let header = Some(p.header.clone());
                    (Some(p), ReferenceInfo { status: "ran".into(), reason: None, header, peak_rss_kib: None })
                }
                Err(reason) => {
                    log(&format!("reference skipped: {reason}"));
                    (
                        None,
                        ReferenceInfo {
                            status: "skipped".into(),
                            reason: Some(reason),
                            header: None,
                            peak_rss_kib: None,
                        },
                    )
                }
            }
        }
    };

    let mut slots: Vec<Slot> = (0..arms.len()).map(Slot::Ours).collect();
    if reference.is_some() {
        slots.push(Slot::Reference(Variant::ReferenceBaseline));
        slots.push(Slot::Reference(Variant::ReferenceLisa));
    }
    slots.push(Slot::Gemm);
    let n = cfg.gemm_size;
    let (ga, gb) =
        (Tensor::randn([n, n], (Kind::Float, Device::Cpu)), Tensor::randn([n, n], (Kind::Float, Device::Cpu)));
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    let settings = StepSettings { max_grad_norm: ctl.train.max_grad_norm, mixed_precision: ctl.train.mixed_precision };
    let mut scalers: Vec<Option<LossScaler>> = arms.iter().map(|_| loss_scaler_for(settings)).collect();
    let (mut ref_times, mut gemm_times) = ((Vec::new(), Vec::new()), Vec::new());
    let (res, in_ch, classes) = (u.sample_size, u.in_channels, main.config.label_encoder.num_classes);
    let rounds = cfg.warmup + cfg.reps;
    for round in 0..rounds {
        let timed = round >= cfg.warmup;
        log(&format!("round {}/{rounds}{}", round + 1, if timed { "" } else { " (warm-up)" }));
        let x0 = Tensor::rand([cfg.batch, in_ch, res, res], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let condition = Tensor::rand([cfg.batch, 1, res, res], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(classes, [cfg.batch], (Kind::Int64, Device::Cpu));
        let batch = Batch { x0, labels, condition: Some(condition), rows: None };
        for j in 0..slots.len() {
            match slots[(round + j) % slots.len()] {
                Slot::Ours(i) => {
                    let lr = ctl.train.learning_rate;
                    let scaler = scalers[i].as_mut();
                    let dt = ours_step(&tasks[i], &mut opts[i], &main.objective, &batch, cfg.seed, round as u64, lr, settings, scaler)?;
                    if timed {
                        times[i].push(dt);
                    }
                }
                Slot::Reference(v) => {
                    let p = reference.as_mut().expect("reference slots only when it runs");
                    let dt = p.step(v.reference_arm().expect("a reference variant"))?;
                    if timed {
                        let list = if v == Variant::ReferenceBaseline { &mut ref_times.0 } else { &mut ref_times.1 };
                        list.push(dt);
                    }
                }
                Slot::Gemm => {
                    let t0 = Instant::now();
                    let c = ga.matmul(&gb);
                    let dt = t0.elapsed().as_secs_f64();
                    drop(c);
                    if timed {
                        gemm_times.push(dt);
                    }
                }
            }
        }
    }
    let mut reference_info = reference_info;
    if let Some(p) = reference.take() {
        reference_info.peak_rss_kib = Some(p.finish()?);
    }

    let mut variants: Vec<VariantResult> = arms
        .iter()
        .zip(times)
        .map(|(a, t)| {
            VariantResult::new(a.variant, t, cfg.batch, flops.per_step(a.variant, cfg.batch, cfg.lisa_sub_batch) / 1e9)
        })
        .collect();
    if reference_info.status == "ran" {
        for (v, t) in [(Variant::ReferenceBaseline, ref_times.0), (Variant::ReferenceLisa, ref_times.1)] {
            variants.push(VariantResult::new(v, t, cfg.batch, flops.per_step(v, cfg.batch, cfg.lisa_sub_batch) / 1e9));
        }
    }
    let gemm_flop = 2.0 * (n as f64).powi(3) / 1e9;
    let gemm_stats = TimingStats::from_times(gemm_times);
    let gemm = GemmResult {
        size: n,
        median_gflops: gemm_flop / gemm_stats.median_s,
        best_gflops: gemm_flop / gemm_stats.min_s,
        stats: gemm_stats,
    };
    let interleaving = if reference_info.status == "ran" {
        "round-robin: each round every variant takes one step and one GEMM is timed, the order rotated by one \
         slot per round; the reference runs in its own process, driven step by step over a pipe (while one \
         process steps the other waits blocked), so its steps interleave with ours one by one"
    } else {
        "round-robin: each round every variant takes one step and one GEMM is timed, the order rotated by one \
         slot per round"
    };
    Ok(BenchReport {
        main_network: crate::pipeline::report_path(&cfg.main_network),
        main_parameters: crate::models::parameter_count(&main.vs),
        side_parameters: crate::models::parameter_count(&arms[0].side.vs),
        decoder_parameters: arms[1].head.as_ref().map_or(0, |h| crate::models::parameter_count(&h.vs)),
        batch: cfg.batch,
        lisa_sub_batch: cfg.lisa_sub_batch,
        threads: cfg.threads,
        reps: cfg.reps,
        warmup: cfg.warmup,
        inputs: INPUTS.into(),
        interleaving: interleaving.into(),
        allocator: allocator_settings(tuned_allocator),
        comparisons: Comparisons::from_results(&variants),
        variants,
        flops,
        flop_note: FLOP_NOTE.into(),
        gemm,
        peak_rss_kib: peak_rss_kib(),
        reference: reference_info,
    })
}

/// Sampling with the side networks a comparison trained (zero inference cost, claim 5): the baseline's and
/// LISA's of one seed, on the same held-out conditions, labels, noise and sampler, timed in alternating order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingBench {
    /// The `lisa compare` folder.
    pub run_dir: String,
    /// Its seed whose side networks were timed.
    pub seed: u64,
    /// Images sampled per timing.
    pub images: i64,
    /// Sampler steps.
    pub sampler_steps: usize,
    /// Parameters of the baseline-trained side network.
    pub baseline_parameters: i64,
    /// Parameters of the LISA-trained side network.
    pub lisa_parameters: i64,
    /// Whether the two side networks have the same parameter names and shapes.
    pub same_architecture: bool,
    /// Sampling times with the baseline-trained side network.
    pub baseline: TimingStats,
    /// Sampling times with the LISA-trained side network.
    pub lisa: TimingStats,
    /// LISA's over the baseline's.
    pub ratio: Ratio,
}

impl SamplingBench {
    /// The result as a short Markdown table.
    pub fn table(&self) -> String {
        format!(
            "sampling {} held-out images with {} sampler steps, side networks of {} (seed {}); same architecture: {}\n\n\
             | side network | parameters | median | mean | min – max |\n|---|---|---|---|---|\n\
             | baseline-trained | {} | {:.3} s | {:.3} s | {:.3} – {:.3} s |\n\
             | LISA-trained | {} | {:.3} s | {:.3} s | {:.3} – {:.3} s |\n\n\
             LISA / baseline: median ×{:.3}, mean ×{:.3}\n",
            self.images,
            self.sampler_steps,
            self.run_dir,
            self.seed,
            if self.same_architecture { "yes" } else { "NO" },
            self.baseline_parameters,
            self.baseline.median_s,
            self.baseline.mean_s,
            self.baseline.min_s,
            self.baseline.max_s,
            self.lisa_parameters,
            self.lisa.median_s,
            self.lisa.mean_s,
            self.lisa.min_s,
            self.lisa.max_s,
            self.ratio.median,
            self.ratio.mean,
        )
    }
}

/// Times controlled sampling with the baseline- and LISA-trained side networks of `run_dir` (a `lisa
/// compare` folder; its first seed), `reps` times each after one untimed round, alternating which goes first.
pub fn bench_sampling(run_dir: &Path, images: i64, reps: usize, threads: i32) -> Result<SamplingBench> {
    if reps == 0 || images < 1 {
        return Err(Error::Config("the sampling benchmark needs reps ≥ 1 and images ≥ 1".into()));
    }
    let cfg_path = run_dir.join("config.toml");
    if !cfg_path.is_file() {
        return Err(Error::Config(format!("{} has no config.toml: pass a `lisa compare` folder", run_dir.display())));
    }
    let cfg: ControlConfig = crate::config::load(Some(&cfg_path), &[])?;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let main = super::protocol::load_main(&cfg)?;
    let seed_dir = run_dir.join(format!("seed-{}", cfg.train.seed));
    let load = |arm: &str| SideNetwork::load(&seed_dir.join(arm).join("side-network"), &main);
    let (baseline, lisa) = (load("baseline")?, load("lisa")?);
    let shapes = |s: &SideNetwork| -> Vec<(String, Vec<i64>)> {
        s.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect()
    };
    let (_, labels, conditions) = super::protocol::held_out_subset(&cfg)?;
    let n = images.min(labels.size()[0]);
    let (y, c) = (labels.narrow(0, 0, n), conditions.narrow(0, 0, n));
    let sampler = super::protocol::fidelity_sampler(&cfg, &main);
    let run = |side: &SideNetwork| -> Result<f64> {
        let t0 = Instant::now();
        let _ = side.sample(&main, &y, &c, &sampler, 1.0, cfg.fidelity.seed)?;
        Ok(t0.elapsed().as_secs_f64())
    };
    run(&baseline)?;
    run(&lisa)?;
    let (mut tb, mut tl) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for r in 0..reps {
        if r % 2 == 0 {
            tb.push(run(&baseline)?);
            tl.push(run(&lisa)?);
        } else {
            tl.push(run(&lisa)?);
            tb.push(run(&baseline)?);
        }
    }
    let (b, l) = (TimingStats::from_times(tb), TimingStats::from_times(tl));
    Ok(SamplingBench {
        run_dir: run_dir.display().to_string(),
        seed: cfg.train.seed,
        images: n,
        sampler_steps: sampler.steps,
        baseline_parameters: crate::models::parameter_count(&baseline.vs),
        lisa_parameters: crate::models::parameter_count(&lisa.vs),
        same_architecture: shapes(&baseline) == shapes(&lisa),
        ratio: Ratio { median: l.median_s / b.median_s, mean: l.mean_s / b.mean_s },
        baseline: b,
        lisa: l,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Hook, LabelEncoderConfig, UNetConfig};
    use crate::pipeline::MainNetworkConfig;

    #[test]
    fn median_mean_and_stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
        let s = TimingStats::from_times(vec![2.0, 1.0, 4.0]);
        assert_eq!((s.median_s, s.mean_s, s.min_s, s.max_s), (2.0, 7.0 / 3.0, 1.0, 4.0));
        assert_eq!(s.times_s, vec![2.0, 1.0, 4.0], "times keep their order");
    }

    fn row(v: Variant, times: &[f64]) -> VariantResult {
        VariantResult::new(v, times.to_vec(), 32, 100.0)
    }

    fn report(variants: Vec<VariantResult>, reference: ReferenceInfo) -> BenchReport {
        BenchReport {
            main_network: "m".into(),
            main_parameters: 10,
            side_parameters: 5,
            decoder_parameters: 1,
            batch: 32,
            lisa_sub_batch: 8,
            threads: 1,
            reps: 3,
            warmup: 1,
            inputs: INPUTS.into(),
            interleaving: "round-robin".into(),
            allocator: allocator_settings(true),
            comparisons: Comparisons::from_results(&variants),
            variants,
            flops: StepFlops { side: 1.0, main_encoder: 1.0, main_up: 1.0, decoder: 1.0, unrecognised: vec![] },
            flop_note: FLOP_NOTE.into(),
            gemm: GemmResult {
                size: 8,
                stats: TimingStats::from_times(vec![0.5]),
                median_gflops: 400.0,
                best_gflops: 400.0,
            },
            peak_rss_kib: Some(3 << 20),
            reference,
        }
    }

    #[test]
    fn ratios_overheads_and_the_table() {
        let variants = vec![
            row(Variant::OursBaseline, &[1.0, 1.0, 4.0]),
            row(Variant::OursLisaShared, &[1.25, 1.25, 1.25]),
            row(Variant::OursLisaFull, &[1.5, 1.5, 1.5]),
            row(Variant::ReferenceBaseline, &[2.0, 2.0, 2.0]),
            row(Variant::ReferenceLisa, &[3.0, 3.0, 3.0]),
        ];
        assert_eq!(variants[0].samples_per_s, 32.0);
        assert_eq!(variants[0].achieved_gflops, 100.0);
        let c = Comparisons::from_results(&variants);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let r = c.ours_over_reference_baseline.unwrap();
        assert!(close(r.median, 0.5) && close(r.mean, 1.0), "{r:?}");
        assert!(close(c.ours_shared_over_reference_lisa.unwrap().median, 1.25 / 3.0));
        assert!(close(c.ours_full_over_reference_lisa.unwrap().median, 0.5));
        assert!(close(c.lisa_overhead_ours_shared.unwrap().median, 0.25));
        assert!(close(c.lisa_overhead_ours_shared.unwrap().mean, 1.25 / 2.0 - 1.0));
        assert!(close(c.lisa_overhead_ours_full.unwrap().median, 0.5));
        assert!(close(c.lisa_overhead_reference.unwrap().median, 0.5));

        let ran = ReferenceInfo {
            status: "ran".into(),
            reason: None,
            header: Some(serde_json::json!({"torch": "2.13", "diffusers": "0.42"})),
            peak_rss_kib: Some(512 * 1024),
        };
        let t = report(variants.clone(), ran).table();
        for want in [
            "| ours, baseline | 1.000 s | 2.000 s | 1.000 – 4.000 s | 32.0 | 100.0 | 100.0 |",
            "| ours / reference, baseline step | 0.500 | 1.000 |",
            "| LISA overhead over baseline, ours (shared encoder) | +25.0% | -37.5% |",
            "| LISA overhead over baseline, reference | +50.0% | +50.0% |",
            "peak RSS: ours 3.00 GiB",
            "reference 512 MiB",
            "median 400.0 GFLOP/s",
            "reaches 25% of the median GEMM rate",
            "torch 2.13, diffusers 0.42",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }

        // Without the reference: its comparisons are dashes and the reason is printed.
        let ours: Vec<VariantResult> = variants.into_iter().filter(|r| r.variant.is_ours()).collect();
        let skipped = ReferenceInfo {
            status: "skipped".into(),
            reason: Some("no Python at x".into()),
            header: None,
            peak_rss_kib: None,
        };
        let rep = report(ours, skipped);
        assert!(rep.comparisons.ours_over_reference_baseline.is_none());
        assert!(rep.comparisons.lisa_overhead_ours_full.is_some());
        let t = rep.table();
        assert!(
            t.contains("reference skipped: no Python at x") && t.contains("| ours / reference, baseline step | — |"),
            "{t}"
        );
        let json = serde_json::to_string(&rep).unwrap();
        assert_eq!(serde_json::from_str::<BenchReport>(&json).unwrap(), rep);
    }

    #[test]
    fn vm_hwm_and_the_reference_protocol_parse() {
        let status = "Name:\tlisa\nVmPeak:\t  9000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(123456));
        assert_eq!(parse_vm_hwm_kib("Name: x\n"), None);
        assert!(peak_rss_kib().unwrap_or(1) > 0);

        assert!(matches!(
            parse_reference_line("{\"ready\": true, \"torch\": \"2\"}\n"),
            Ok(ReferenceMessage::Ready(_))
        ));
        assert_eq!(
            parse_reference_line("{\"arm\": \"lisa\", \"seconds\": 1.5}"),
            Ok(ReferenceMessage::Step { arm: "lisa".into(), seconds: 1.5 })
        );
        assert_eq!(
            parse_reference_line("{\"done\": true, \"maxrss_kib\": 7}"),
            Ok(ReferenceMessage::Done { maxrss_kib: 7 })
        );
        assert_eq!(parse_reference_line("{\"error\": \"bad\"}"), Ok(ReferenceMessage::Error("bad".into())));
        assert!(parse_reference_line("Traceback (most recent call last):").is_err());
        assert!(parse_reference_line("{\"arm\": \"lisa\"}").is_err());
    }

    #[test]
    fn every_weight_of_main_side_and_decoder_is_placed_and_lisa_costs_more() {
        let unet = UNetConfig::tiny();
        let cfg = MainNetworkConfig {
            unet: unet.clone(),
            label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 2 },
            ..Default::default()
        };
        let mut main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
        main.freeze();
        let cn =
            ControlNetConfig { conditioning_embedding_out_channels: vec![4, 8], ..ControlNetConfig::for_unet(&unet) };
        let side = SideNetwork::from_main(&main, ConditionKind::Edges, cn).unwrap();
        for hook in [Hook::Mid, Hook::Down(0)] {
            let lc = LisaConfig { hook, decoder_channel_floor: 4, ..LisaConfig::default() };
            let head = LisaHead::new(&main, &side, &lc).unwrap();
            let res = if hook == Hook::Mid { 2 } else { 8 };
            let ctx =
                FlopContext { unet: unet.clone(), size: 8, label_tokens: 2, cond_stride2: 0, decoder_feature_res: res };
            let f = StepFlops::count(
                &ctx,
                &shapes(&main.named_parameters()),
                &shapes(&side.named_parameters()),
                &shapes(&head.named_parameters()),
            );
            assert!(f.unrecognised.is_empty(), "{:?}", f.unrecognised);
            assert!(f.side > 0.0 && f.main_encoder > 0.0 && f.main_up > 0.0 && f.decoder > 0.0, "{f:?}");
            let step = |v| f.per_step(v, 4, 1);
            assert!(step(Variant::OursBaseline) < step(Variant::OursLisaSubBatch));
            assert!(step(Variant::OursLisaSubBatch) < step(Variant::OursLisaShared));
            assert_eq!(f.per_step(Variant::OursLisaSubBatch, 4, 4), step(Variant::OursLisaShared));
            assert!(step(Variant::OursLisaShared) < step(Variant::OursLisaFull));
            assert_eq!(step(Variant::OursLisaFull), step(Variant::ReferenceLisa));
            assert_eq!(step(Variant::OursBaseline), step(Variant::ReferenceBaseline));
            assert_eq!(step(Variant::OursBaseline), 4.0 * (3.0 * f.side + f.main_encoder + 2.0 * f.main_up));
        }
    }
}
