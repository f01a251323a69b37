//! The training loop, top to bottom: batch → the update ([`super::step`]: noise → loss → backward → clip →
//! AdamW) → EMA → log → checkpoint → evaluation callback. What is trained and how its loss is formed is a
//! [`TrainTask`]; the loop knows nothing of specific models, so the main network's pretraining and
//! side-network training share it.
//!
//! Launched as several processes (torchrun's variables, see [`crate::distributed`]), the loop trains data
//! parallel: rank 0's parameters are broadcast at the start; every rank walks the one data order and takes
//! its equal shard of each global micro-batch of `train.batch_size` examples; the step averages gradients,
//! losses and metrics; rank 0 alone writes the metrics log, checkpoints, run files and validation output,
//! while the others wait at a barrier. A checkpoint resumes at any number of processes.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::checkpoint;
use super::ema::Ema;
use super::log::{LogFormat, MetricsLog, Progress};
use super::tensorboard::{self, ReportTo};
use super::lr::{lr_at, LrSchedule};
use super::loss_scaler::LossScaler;
use super::optim::{AdamW, AdamWConfig};
use super::step::{train_step, Batch, Noise, StepOutcome, StepSettings, TrainTask};
use crate::data::loader::{DataOrder, DataOrderState};
use crate::data::TrainingExamples;
use crate::diffusion::Objective;
use crate::models::precision::MixedPrecision;
use crate::rng::Rows;
use crate::{weights, Error, Result};

/// Settings of the training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer updates to run. Default 2000.
    pub steps: u64,
    /// Examples per micro-batch, over all processes of a multi-process run (each takes an equal share,
    /// so it must be a multiple of their number). Default 64.
    pub batch_size: usize,
    /// Micro-batches accumulated per update (effective batch = batch_size × this). Default 1.
    pub gradient_accumulation_steps: u64,
    /// Peak learning rate. Default 1e-3.
    pub learning_rate: f64,
    /// Linear warm-up steps. Default 100.
    pub lr_warmup_steps: u64,
    /// `constant` or `cosine` after warm-up. Default `constant`.
    pub lr_schedule: LrSchedule,
    /// Cosine only: final LR as a fraction of the peak. Default 0.1.
    pub min_lr_ratio: f64,
    /// AdamW settings.
    pub adam: AdamWConfig,
    /// Gradient-norm clipping threshold (0 = off). Default 1.0.
    pub max_grad_norm: f64,
    /// EMA decay of the weights used for sampling (0 = no EMA). Default 0.
    pub ema_decay: f64,
    /// Seed of everything random in the run (data order, noise, timesteps). Default 0.
    pub seed: u64,
    /// Write `checkpoint-N/` every this many steps (0 = only at the end). Default 500.
    pub checkpointing_steps: u64,
    /// Keep at most this many checkpoints (0 = all). Default 3.
    pub checkpoints_total_limit: usize,
    /// Call the validation callback every this many steps (0 = at each checkpoint). The final step
    /// is always validated. Default 0.
    pub validation_steps: u64,
    /// Append a metrics row every this many steps. Default 10.
    pub log_every: u64,
    /// `csv` or `jsonl`. Default `csv`.
    pub log_format: LogFormat,
    /// Where the same rows go besides that log, as diffusers' `--report_to`: `["tensorboard"]` writes TensorBoard
    /// event files in the run folder (losses, learning rate, LISA statistics, fidelity, validation images).
    /// Default `[]`.
    pub report_to: Vec<ReportTo>,
    /// Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped). Default 5.
    pub max_consecutive_nonfinite: u32,
    /// `no`, `bf16` or `fp16`: the precision of convolutions, matmuls and attention in the training
    /// forward and backward; weights, gradients, optimizer and loss stay f32 (fp16 adds dynamic loss
    /// scaling). Worth it on GPUs with bf16/f16 tensor cores; on CPUs without bf16 units it is slower.
    /// `train-sd` also holds the frozen networks (UNet with its prompt table, VAE) in that dtype, as
    /// diffusers' `weight_dtype` does; the toy main network of `train`/`compare` stays f32. Default `no`.
    pub mixed_precision: MixedPrecision,
    /// Activation recomputation, block by block (diffusers' `--gradient_checkpointing`): the side network's down
    /// blocks and mid block, and the frozen UNet's up blocks (through which the gradient reaches the side
    /// network), keep only their inputs in the forward pass and run again in backward — about one more forward
    /// of each for their activation memory. Gradients equal the plain backward's within rounding. UNet networks
    /// only. Default false.
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 64,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-3,
            lr_warmup_steps: 100,
            lr_schedule: LrSchedule::Constant,
            min_lr_ratio: 0.1,
            adam: AdamWConfig::default(),
            max_grad_norm: 1.0,
            ema_decay: 0.0,
            seed: 0,
            checkpointing_steps: 500,
            checkpoints_total_limit: 3,
            validation_steps: 0,
            log_every: 10,
            log_format: LogFormat::Csv,
            report_to: Vec::new(),
            max_consecutive_nonfinite: 5,
            mixed_precision: MixedPrecision::No,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Whether `report_to` names `target`.
    pub fn reports_to(&self, target: ReportTo) -> bool {
        self.report_to.contains(&target)
    }

    /// Rejects settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if self.batch_size == 0 {
            return bad("train.batch_size must be ≥ 1");
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("train.gradient_accumulation_steps must be ≥ 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("train.learning_rate must be a positive number");
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad("train.ema_decay must be in [0, 1)");
        }
        if self.log_every == 0 {
            return bad("train.log_every must be ≥ 1");
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad("train.max_grad_norm must be a number ≥ 0 (0 = no clipping)");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("train.min_lr_ratio must be in [0, 1]");
        }
        let a = &self.adam;
        if !((0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2)) {
            return bad("train.adam.beta1 and train.adam.beta2 must be in [0, 1)");
        }
        if !(a.eps > 0.0 && a.eps.is_finite()) {
            return bad("train.adam.eps must be a positive number");
        }
        if !(a.weight_decay >= 0.0 && a.weight_decay.is_finite()) {
            return bad("train.adam.weight_decay must be a number ≥ 0");
        }
        Ok(())
    }
}

/// What a finished (or resumed-and-finished) run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Steps completed in total.
    pub steps: u64,
    /// Steps skipped because of non-finite values.
    pub skipped_steps: u64,
    /// The mean loss of the last logging interval.
    pub final_loss: f64,
    /// Mean wall time per update in this process, seconds.
    pub seconds_per_step: f64,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
}

/// Run state saved in `state.json` of each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    step: u64,
    optimizer_step: i64,
    seed: u64,
    data: DataOrderState,
    skipped_steps: u64,
    /// The f16 loss scale (fp16 runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scaler: Option<LossScaler>,
    /// The caller's description of the run (configs), checked on resume.
    run: serde_json::Value,
}

/// Where [`train`] writes and whether it resumes.
pub struct RunDir<'a> {
    /// The run folder (checkpoints, metrics).
    pub output_dir: &'a Path,
    /// `None`, `Some("latest")` or `Some(path to checkpoint-N)`.
    pub resume: Option<&'a str>,
    /// Saved with every checkpoint; resuming checks that it is unchanged except for `train.steps`.
    pub run_description: serde_json::Value,
    /// The description of a run with every setting at its default (or `Null`): a setting missing from an
    /// older checkpoint's description is accepted when the run uses its default.
    pub description_defaults: serde_json::Value,
    /// Hide the progress bar.
    pub quiet: bool,
    /// Files the caller keeps beside the checkpoints (name in the run folder, contents), e.g. its config.
    /// They are written, atomically, only once the run has passed its checks and, when resuming, loaded
    /// its checkpoint, so that a refused run leaves the folder as it was.
    pub files: Vec<(String, Vec<u8>)>,
}

impl<'a> RunDir<'a> {
    /// A new run in `output_dir` with no description to check on resume, no extra files and no
    /// progress bar (tests and library callers that need nothing more).
    pub fn plain(output_dir: &'a Path) -> Self {
        Self {
            output_dir,
            resume: None,
            run_description: serde_json::json!({}),
            description_defaults: serde_json::Value::Null,
            quiet: true,
            files: vec![],
        }
    }
}

/// Checks everything [`train`] would refuse before it writes anything: the settings, the data (enough
/// examples, finite values) and, when resuming, that the checkpoint is complete and was written by this
/// run. Callers that write files of their own into the run folder call it first, so that a refused run
/// leaves the folder as it was.
pub fn preflight(data: &dyn TrainingExamples, cfg: &TrainConfig, run: &RunDir) -> Result<()> {
    cfg.validate()?;
    let world = crate::distributed::Launch::from_env()?.map_or(1, |l| l.world_size);
    if cfg.batch_size % world != 0 {
        return Err(Error::Config(format!(
            "train.batch_size = {} is not a multiple of the {world} processes; each takes an equal share of every \
             batch: make it a multiple of {world}",
            cfg.batch_size
        )));
    }
    if data.len() < cfg.batch_size {
        return Err(Error::Config(format!(
            "the dataset has {} examples, fewer than train.batch_size = {}; lower train.batch_size or add data",
            data.len(),
            cfg.batch_size
        )));
    }
    if let Some((what, first, count)) = data.first_non_finite()? {
        return Err(Error::Config(format!(
            "the {what} of training example {first} (0-based; {count} such examples) has NaN or infinite pixel \
             values; fix or remove it"
        )));
    }
    if run.resume.is_some() {
        resume_state(run)?;
    }
    Ok(())
}

/// The checkpoint a resumed run starts from and its state, checked against the run's description.
fn resume_state(run: &RunDir) -> Result<(PathBuf, RunState)> {
    let dir = checkpoint::resolve(run.output_dir, run.resume.unwrap_or("latest"))?;
    let state: RunState = serde_json::from_value(checkpoint::read_state(&dir)?).map_err(|e| Error::Checkpoint {
        path: dir.clone(),
        msg: format!("malformed state.json: {e}; the checkpoint is damaged: use another checkpoint-N"),
    })?;
    check_same_run(&dir, &state.run, &run.run_description, &run.description_defaults)?;
    Ok((dir, state))
}

/// One training run at a time per process: every run reseeds libtorch's process-wide generator before
/// each micro-step's draws, so two runs interleaving in one process (threads; the test harness) would
/// draw from each other's seeds.
static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Trains `params` (name, tensor) on `data` with `task`'s loss; see the module doc for the order of
/// operations. Randomness comes from libtorch's process-wide generator, reseeded every micro-step;
/// runs in one process take turns (a process-wide lock), so each is reproducible.
/// `on_validation(step, ema_or_params)` is called every `validation_steps` (by default after each
/// checkpoint), e.g. to write validation samples; it is not part of the timed step.
pub fn train(
    task: &dyn TrainTask,
    params: Vec<(String, Tensor)>,
    data: &dyn TrainingExamples,
    objective: &Objective,
    cfg: &TrainConfig,
    run: &RunDir,
    mut on_validation: impl FnMut(u64, &[(String, Tensor)]) -> Result<()>,
) -> Result<TrainSummary> {
    preflight(data, cfg, run)?;
    // A run that panicked released the lock poisoned; the state it guards (none) cannot be torn.
    let _one_run = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
    let group = crate::distributed::join_from_env(device)?;
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
    let main_process = rank == 0;
    let out = run.output_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    if let Some(g) = &group {
        // Every rank starts from rank 0's weights (a resume then loads the same checkpoint on every rank).
        let _no_grad = tch::no_grad_guard();
        let detached: Vec<Tensor> = params.iter().map(|(_, p)| p.detach()).collect();
        g.broadcast(&detached.iter().collect::<Vec<_>>(), 0)?;
    }

    let on_cpu = device == tch::Device::Cpu;
    if on_cpu && !run.quiet && main_process && cfg.mixed_precision != MixedPrecision::No {
        eprintln!(
            "note: train.mixed_precision = \"{}\" on the CPU: without bf16/f16 units the casts make every step \
             several times slower; it is meant for GPUs",
            cfg.mixed_precision
        );
    }
    let mut opt = AdamW::new(params, cfg.adam.clone());
    let mut ema = (cfg.ema_decay > 0.0).then(|| Ema::new(opt.params(), cfg.ema_decay));
    let mut order = DataOrder::new(data.len(), cfg.seed)?;
    let mut scaler = (cfg.mixed_precision == MixedPrecision::Fp16).then(LossScaler::new);
    let (mut step, mut skipped) = (0u64, 0u64);
    let mut last_checkpoint = None;

    // Resume: weights, optimizer moments, EMA, data position and counters, exactly.
    if run.resume.is_some() {
        let (dir, state) = resume_state(run)?;
        let mismatch = |file: &str| {
            let path = dir.join(file);
            move |e: Error| {
                let msg = match e {
                    Error::Config(m) => m,
                    e => e.to_string(),
                };
                Error::Checkpoint { path, msg: format!("{msg}; it does not match this run: use another checkpoint-N") }
            }
        };
        weights::load_into(opt.params(), weights::read_tensors(&dir.join("model.safetensors"))?, &dir)?;
        opt.load_state(weights::read_tensors(&dir.join("optimizer.safetensors"))?, state.optimizer_step)
            .map_err(mismatch("optimizer.safetensors"))?;
        if let Some(ema) = ema.as_mut() {
            ema.load(weights::read_tensors(&dir.join("ema.safetensors"))?).map_err(mismatch("ema.safetensors"))?;
        }
        order.restore(state.data).map_err(mismatch(checkpoint::STATE_FILE))?;
        step = state.step;
        skipped = state.skipped_steps;
        if let (Some(s), Some(saved)) = (scaler.as_mut(), state.loss_scaler) {
            *s = saved;
        }
        if main_process {
            eprintln!("resuming from {} at step {step}", dir.display());
        }
        // A run killed after its final checkpoint resumes with nothing left to train; the caller still
        // needs that checkpoint (e.g. to write the final model).
        last_checkpoint = Some(dir);
    }
    let mut log = None;
    if main_process {
        for (name, bytes) in &run.files {
            weights::write_atomic(&out.join(name), bytes)?;
        }
        let mut metrics = MetricsLog::open(out, cfg.log_format, run.resume.map(|_| step))?;
        if cfg.reports_to(ReportTo::Tensorboard) {
            metrics.mirror_to(tensorboard::open(out, run.resume.map(|_| step))?, "train");
        }
        log = Some(metrics);
    }
    let progress = Progress::new(step, cfg.steps, run.quiet || !main_process);
    let shard = cfg.batch_size / world;
    let (mut sums, mut count) = (Vec::<(String, f64)>::new(), 0u64);
    let (mut consecutive_bad, mut final_loss) = (0u32, f64::NAN);
    let started = Instant::now();
    let first_step = step;

    while step < cfg.steps {
        let t0 = Instant::now();
        let lr = lr_at(step, cfg.steps, cfg.learning_rate, cfg.lr_warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio);
        let micro_batches = (0..cfg.gradient_accumulation_steps)
            .map(|_| {
                let indices = order.next_batch(cfg.batch_size)?;
                let (x0, labels, condition) = data.batch(&indices[rank * shard..(rank + 1) * shard])?;
                // Each process's shard is its rows of the global batch, handed to the step with the batch.
                let rows = (world > 1).then(|| Rows { start: (rank * shard) as i64, total: cfg.batch_size as i64 });
                Ok(Batch { x0, labels, condition, rows })
            })
            .collect::<Result<Vec<_>>>()?;
        let noise = Noise::Seeded { seed: cfg.seed, first_counter: step * cfg.gradient_accumulation_steps };
        let settings = StepSettings { max_grad_norm: cfg.max_grad_norm, mixed_precision: cfg.mixed_precision };
        task.begin_step(step);
        let r = train_step(task, &mut opt, objective, &micro_batches, noise, lr, settings, scaler.as_mut())?;
        let (loss, gnorm) = (r.loss, r.grad_norm);
        match r.outcome {
            StepOutcome::Applied => consecutive_bad = 0,
            StepOutcome::Overflow => {
                skipped += 1;
                progress.println(&format!(
                    "step {}: f16 gradients overflowed at loss scale {}; update skipped, scale halved",
                    step + 1,
                    r.loss_scale
                ));
                step += 1;
                continue;
            }
            StepOutcome::NonFinite => {
                // The weights stay as they were after the last good step.
                skipped += 1;
                consecutive_bad += 1;
                progress.println(&format!(
                    "step {}: non-finite loss ({loss}) or gradient norm ({gnorm}); update skipped",
                    step + 1
                ));
                if consecutive_bad >= cfg.max_consecutive_nonfinite {
                    let last = checkpoint::list(out)?
                        .pop()
                        .map(|(_, p)| p.display().to_string())
                        .unwrap_or_else(|| "none".into());
                    let fp16 = if cfg.mixed_precision == MixedPrecision::Fp16 && !loss.is_finite() {
                        " With train.mixed_precision = \"fp16\" a non-finite loss can be an activation beyond f16's \
                         ±65504, which no loss scale prevents: try \"bf16\"."
                    } else {
                        ""
                    };
                    return Err(Error::Training(format!(
                        "{consecutive_bad} consecutive steps with non-finite loss or gradients at step {}; \
                         lower train.learning_rate or check the data.{fp16} Last good checkpoint: {last}",
                        step + 1
                    )));
                }
                step += 1;
                continue;
            }
        }
        if let Some(ema) = ema.as_mut() {
            ema.update(opt.params());
        }
        step += 1;

        // Logging: means over the interval.
        accumulate(&mut sums, "loss", loss);
        accumulate(&mut sums, "grad_norm", gnorm);
        for (name, v) in &r.metrics {
            accumulate(&mut sums, name, *v);
        }
        accumulate(&mut sums, "step_seconds", t0.elapsed().as_secs_f64());
        count += 1;
        if step % cfg.log_every == 0 || step == cfg.steps {
            let mut row: Vec<(String, f64)> = vec![("lr".into(), lr)];
            row.extend(sums.iter().map(|(n, s)| (n.clone(), s / count as f64)));
            final_loss = sums[0].1 / count as f64;
            if let Some(log) = log.as_mut() {
                log.write(step, &task.log_row(row))?;
            }
            progress.update(step, &format!("loss {final_loss:.4}"));
            sums.clear();
            count = 0;
        }

        let checkpoint_due = (cfg.checkpointing_steps > 0 && step % cfg.checkpointing_steps == 0) || step == cfg.steps;
        if checkpoint_due && !main_process {
            last_checkpoint = Some(out.join(format!("checkpoint-{step}")));
        }
        if checkpoint_due && main_process {
            if let Some(log) = log.as_mut() {
                log.flush()?;
            }
            let state = RunState {
                step,
                optimizer_step: opt.step_count(),
                seed: cfg.seed,
                data: order.state(),
                skipped_steps: skipped,
                loss_scaler: scaler,
                run: run.run_description.clone(),
            };
            let opt_state = opt.state_tensors();
            let mut files: Vec<(&str, &[(String, Tensor)])> =
                vec![("model.safetensors", opt.params()), ("optimizer.safetensors", &opt_state)];
            if let Some(ema) = ema.as_ref() {
                files.push(("ema.safetensors", ema.tensors()));
            }
            let state_json = serde_json::to_value(&state).map_err(|e| Error::Training(e.to_string()))?;
            let dir = checkpoint::save(out, step, &files, &state_json, cfg.checkpoints_total_limit)?;
            progress.println(&format!("step {step}: saved {}", dir.display()));
            last_checkpoint = Some(dir);
        }
        let validation_due = if cfg.validation_steps > 0 {
            step % cfg.validation_steps == 0 || step == cfg.steps
        } else {
            checkpoint_due
        };
        if validation_due && main_process {
            on_validation(step, ema.as_ref().map_or(opt.params(), |e| e.tensors()))?;
        }
        if let Some(g) = group.as_ref().filter(|_| checkpoint_due || validation_due) {
            g.barrier()?;
        }
    }
    progress.finish();
    let done = step - first_step;
    Ok(TrainSummary {
        steps: step,
        skipped_steps: skipped,
        final_loss,
        seconds_per_step: if done > 0 { started.elapsed().as_secs_f64() / done as f64 } else { 0.0 },
        last_checkpoint,
    })
}

fn accumulate(sums: &mut Vec<(String, f64)>, name: &str, v: f64) {
    match sums.iter_mut().find(|(n, _)| n == name) {
        Some((_, s)) => *s += v,
        None => sums.push((name.to_owned(), v)),
    }
}

/// A resumed run must be the same run: same configs except the step budget. A setting absent from the
/// checkpoint's description (added to the program after the checkpoint was written) is accepted at its
/// default value from `defaults`, the only behaviour the older program had.
fn check_same_run(
    dir: &Path,
    saved: &serde_json::Value,
    now: &serde_json::Value,
    defaults: &serde_json::Value,
) -> Result<()> {
    let mut differ = Vec::new();
    description_differences(saved, now, defaults, "", &mut differ);
    differ.retain(|p| p != "/train/steps");
    if !differ.is_empty() {
        let shown: Vec<&str> = differ.iter().take(6).map(|p| p.trim_start_matches('/')).collect();
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: format!(
                "was written by a run with a different configuration ({}{}); resume with the same config file \
                 (only train.steps may change) or start a new output folder",
                shown.join(", ").replace('/', "."),
                if differ.len() > shown.len() { ", …" } else { "" }
            ),
        });
    }
    Ok(())
}

/// JSON-pointer paths at which `saved` and `now` differ; a key missing from `saved` counts only when
/// `now`'s value is not the one in `defaults`.
fn description_differences(
    saved: &serde_json::Value,
    now: &serde_json::Value,
    defaults: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (saved, now) {
        (Value::Object(s), Value::Object(n)) => {
            let mut keys: Vec<&String> = s.keys().chain(n.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}/{k}");
                let d = defaults.get(k).unwrap_or(&Value::Null);
                match (s.get(k), n.get(k)) {
                    (Some(sv), Some(nv)) => description_differences(sv, nv, d, &p, out),
                    (None, Some(nv)) if nv == d => {}
                    _ => out.push(p),
                }
            }
        }
        _ if saved == now => {}
        _ => out.push(path.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::TrainingSample;
    use crate::train::step::TaskLoss;
    use tch::Kind;
    use crate::diffusion::Objective;
    use tch::Device;

    #[test]
    fn resume_accepts_settings_newer_than_the_checkpoint_at_their_defaults_only() {
        use serde_json::json;
        let dir = Path::new("run/checkpoint-500");
        // Written before `lisa.target` existed.
        let saved = json!({ "lisa": { "lambda": 0.2 }, "train": { "steps": 500, "lr": 1e-3 } });
        let defaults =
            json!({ "lisa": { "lambda": 0.2, "target": "residual" }, "train": { "steps": 1000, "lr": 1e-3 } });
        let now = json!({ "lisa": { "lambda": 0.2, "target": "residual" }, "train": { "steps": 1000, "lr": 1e-3 } });
        check_same_run(dir, &saved, &now, &defaults).unwrap();
        // A new setting away from its default is not what the checkpoint's run did.
        let now = json!({ "lisa": { "lambda": 0.2, "target": "random" }, "train": { "steps": 1000, "lr": 1e-3 } });
        let e = check_same_run(dir, &saved, &now, &defaults).unwrap_err().to_string();
        assert!(e.contains("lisa.target") && e.contains("different configuration"), "{e}");
        // Without defaults every new setting counts; changed settings are named.
        let now = json!({ "lisa": { "lambda": 0.5, "target": "residual" }, "train": { "steps": 1000, "lr": 1e-3 } });
        let e = check_same_run(dir, &saved, &now, &serde_json::Value::Null).unwrap_err().to_string();
        assert!(e.contains("lisa.lambda, lisa.target"), "{e}");
        // A setting the checkpoint has but this run lacks is a difference too.
        let e = check_same_run(dir, &now, &saved, &defaults).unwrap_err().to_string();
        assert!(e.contains("lisa.target"), "{e}");
    }

    /// A task whose loss is a multiple of one parameter; `poison` makes it NaN.
    struct ScaleTask {
        w: Tensor,
        poison: bool,
    }

    impl TrainTask for ScaleTask {
        fn loss(&self, batch: &Batch, sample: &TrainingSample) -> Result<TaskLoss> {
            let pred = &sample.x_t * &self.w;
            let mut loss = pred.mse_loss(&sample.target, tch::Reduction::Mean);
            if self.poison {
                loss = loss * f64::NAN;
            }
            let _ = &batch.labels;
            Ok(TaskLoss { loss, metrics: vec![("w".into(), self.w.detach().squeeze())] })
        }
    }

    fn toy_data() -> crate::data::Dataset {
        crate::data::Dataset {
            images: Tensor::rand([16, 1, 4, 4], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
            labels: Tensor::zeros([16], (Kind::Int64, Device::Cpu)),
            num_classes: 1,
            class_names: vec!["x".into()],
            conditioning: None,
        }
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            steps: 6,
            batch_size: 4,
            lr_warmup_steps: 0,
            learning_rate: 0.05,
            checkpointing_steps: 0,
            log_every: 1,
            ..Default::default()
        }
    }

    #[test]
    fn non_finite_losses_are_skipped_then_stop_the_run_without_touching_weights() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let task = ScaleTask { w: w.shallow_clone(), poison: true };
        let run = RunDir::plain(dir.path());
        let c = TrainConfig { max_consecutive_nonfinite: 3, ..cfg() };
        let e =
            train(&task, vec![("w".into(), w.shallow_clone())], &toy_data(), &Objective::Flow, &c, &run, |_, _| Ok(()))
                .unwrap_err()
                .to_string();
        assert!(e.contains("3 consecutive steps") && e.contains("Last good checkpoint: none"), "{e}");
        assert!(!e.contains("bf16"), "{e}");
        assert_eq!(w.double_value(&[0]), 0.5, "a skipped step must not move the weights");
        assert!(checkpoint::list(dir.path()).unwrap().is_empty());
        // Under fp16 a non-finite loss is not a loss-scale overflow: it stops the run too, and says bf16.
        let c = TrainConfig { mixed_precision: MixedPrecision::Fp16, ..c };
        let e =
            train(&task, vec![("w".into(), w.shallow_clone())], &toy_data(), &Objective::Flow, &c, &run, |_, _| Ok(()))
                .unwrap_err()
                .to_string();
        assert!(e.contains("3 consecutive steps") && e.contains("try \"bf16\""), "{e}");
    }

    #[test]
    fn a_finite_run_learns_logs_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        let task = ScaleTask { w: w.shallow_clone(), poison: false };
        let run = RunDir::plain(dir.path());
        let mut seen = vec![];
        let s = train(
            &task,
            vec![("w".into(), w.shallow_clone())],
            &toy_data(),
            &Objective::Flow,
            &cfg(),
            &run,
            |step, _| {
                seen.push(step);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((s.steps, s.skipped_steps), (6, 0));
        assert_eq!(seen, vec![6], "checkpointing_steps = 0 still writes the final checkpoint");
        assert!(w.double_value(&[0]) != 0.0);
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert!(csv.starts_with("step,lr,loss,grad_norm,w,step_seconds"), "{csv}");
        assert_eq!(csv.lines().count(), 7);
    }

    /// A task with one `Linear` layer over the 16 pixels, so that mixed precision has a matmul to lower;
    /// `gain` multiplies the loss (large values overflow f16 gradients at the initial loss scale).
    struct LinearTask {
        layer: crate::models::blocks::Linear,
        gain: f64,
    }

    impl TrainTask for LinearTask {
        fn loss(&self, _batch: &Batch, sample: &TrainingSample) -> Result<TaskLoss> {
            let pred = self.layer.forward(&sample.x_t.flatten(1, -1))?;
            let loss = pred.mse_loss(&sample.target.flatten(1, -1), tch::Reduction::Mean) * self.gain;
            Ok(TaskLoss { loss, metrics: vec![] })
        }
    }

    fn train_linear(
        precision: MixedPrecision,
        gain: f64,
        dir: &Path,
        resume: Option<&str>,
        steps: u64,
    ) -> TrainSummary {
        tch::manual_seed(7);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let layer = crate::models::blocks::Linear::new(vs.root() / "l", 16, 16, true).unwrap();
        let params = vec![
            ("w".to_string(), layer.weight.shallow_clone()),
            ("b".to_string(), layer.bias.as_ref().unwrap().shallow_clone()),
        ];
        let task = LinearTask { layer, gain };
        let run = RunDir { resume, ..RunDir::plain(dir) };
        tch::manual_seed(3);
        let data = toy_data();
        let c =
            TrainConfig { steps, mixed_precision: precision, checkpointing_steps: 10, learning_rate: 0.01, ..cfg() };
        let s = train(&task, params, &data, &Objective::Flow, &c, &run, |_, _| Ok(())).unwrap();
        assert_eq!(task.layer.weight.kind(), Kind::Float, "master weights stay f32");
        s
    }

    #[test]
    fn mixed_precision_trains_like_f32_and_fp16_scales_its_loss() {
        let full = train_linear(MixedPrecision::No, 1.0, tempfile::tempdir().unwrap().path(), None, 40);
        for p in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
            let low = train_linear(p, 1.0, tempfile::tempdir().unwrap().path(), None, 40);
            let rel = (low.final_loss - full.final_loss).abs() / full.final_loss;
            assert!(rel < 0.05, "{p:?}: final loss {} vs f32 {}", low.final_loss, full.final_loss);
            assert_eq!(low.skipped_steps, 0, "{p:?}");
        }
        // A loss 1e4 times larger overflows f16 gradients at the initial scale 2^16: those steps are
        // skipped and halve the scale until the gradients fit; the scale is checkpointed and resumed.
        let dir = tempfile::tempdir().unwrap();
        let first = train_linear(MixedPrecision::Fp16, 1e4, dir.path(), None, 20);
        assert!(first.skipped_steps >= 1 && first.skipped_steps < 20, "skipped {}", first.skipped_steps);
        assert!(first.final_loss.is_finite());
        let state = checkpoint::read_state(&dir.path().join("checkpoint-20")).unwrap();
        let scale = state["loss_scaler"]["scale"].as_f64().unwrap();
        assert_eq!(scale, LossScaler::INITIAL_SCALE / 2f64.powi(first.skipped_steps as i32));
        let resumed = train_linear(MixedPrecision::Fp16, 1e4, dir.path(), Some("latest"), 30);
        let straight = train_linear(MixedPrecision::Fp16, 1e4, tempfile::tempdir().unwrap().path(), None, 30);
        assert_eq!(
            (resumed.skipped_steps, resumed.final_loss),
            (straight.skipped_steps, straight.final_loss),
            "resuming restores the scale: the run goes on as if uninterrupted"
        );
        // f32 runs write no scaler.
        let dir = tempfile::tempdir().unwrap();
        train_linear(MixedPrecision::No, 1.0, dir.path(), None, 10);
        assert!(checkpoint::read_state(&dir.path().join("checkpoint-10")).unwrap().get("loss_scaler").is_none());
    }
}
