//! The `lisa` command line: parse, load the config, call the library.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tch::Device;

use lisa::control::SideNetwork;
use lisa::diffusion::{SamplerConfig, SamplerKind};
use lisa::experiments::compare::compare;
use lisa::experiments::arm::train_control;
use lisa::experiments::protocol::{frechet_skipped_note, load_main, prepare_data};
use lisa::experiments::control_config::ControlConfig;
use lisa::experiments::evaluate::evaluate;
use lisa::experiments::sample::{sample_to_files, SampleRequest};
use lisa::data::DataConfig;
use lisa::experiments::pretrain::{pretrain, PretrainConfig};
use lisa::pipeline::MainNetwork;

/// Train visual-condition controllable diffusion models with Likelihood Score Alignment (LISA).
#[derive(Parser)]
#[command(name = "lisa", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the main network (a class-conditional diffusion UNet) on Fashion-MNIST or an imagefolder.
    Pretrain(PretrainArgs),
    /// Generate a PNG grid of samples from a trained main network.
    Sample(SampleArgs),
    /// Measure a main network: Fréchet distance of its samples (classifier features), with the
    /// real-data floor and the uniform-noise ceiling.
    Eval(EvalArgs),
    /// Train the evaluation classifier on a labelled imagefolder (grey or RGB), for the Fréchet distance of
    /// `eval`, `train` and `compare` on that data (`--classifier`).
    Classifier(ClassifierArgs),
    /// Turn a training checkpoint into a model folder (its EMA weights when it has them).
    Export(ExportArgs),
    /// Write a colour imagefolder made from Fashion-MNIST (each item tinted with its own colour, its mask as
    /// `conditioning_image`, `text` and `label` on every line): colour data to try the users'-data path on.
    TintedFolder(TintedFolderArgs),
    /// Train a side network (ControlNet) for a visual condition against the frozen main network,
    /// with LISA (default) or without (`--baseline`).
    Train(TrainArgs),
    /// Train a ControlNet (with LISA, or `--baseline` without) for a Stable Diffusion folder in diffusers
    /// layout, in latent space, on a captioned imagefolder (image, conditioning_image, text); exports a
    /// diffusers ControlNetModel folder.
    TrainSd(TrainSdArgs),
    /// Write a trained side network as a diffusers `ControlNetModel` folder.
    ExportControlnet(ExportControlnetArgs),
    /// Train the baseline and LISA side by side (same seeds, data order, initialisation and evaluation
    /// noise) and write fidelity curves, sample grids and a summary.
    Compare(CompareArgs),
    /// Where the baseline's convergence event happens against the learning rate: reads the baseline runs
    /// (`lisa train --baseline`, one per learning rate) in the sub-folders of a folder; writes a table and plots.
    LrSweep(LrSweepArgs),
    /// LISA's speed-up at several operating points side by side: reads finished `compare` folders and writes
    /// one table (learning rate, task, hook, label, steps, seeds, speed-ups with intervals) and forest plots.
    Speedups(SpeedupsArgs),
    /// The arms of one operating point against each other (controls): every arm against the reference, the
    /// candidate against every other arm, per step and, with `lisa bench --config`'s costs, per second.
    Contrast(ContrastArgs),
    /// Train the baseline, LISA and LISA's controls (other targets, decoder width, distance, λ, hook
    /// position) on one task with the same seeds, and write one table.
    Ablate(AblateArgs),
    /// The main job on the embedded default: a short `compare` of the baseline and LISA on edge maps.
    Demo(DemoArgs),
    /// The exact toy (spec §8): on a Gaussian mixture, LISA decoders (ε, v, flow) against the closed-form
    /// likelihood score, and the drift a learned prior causes.
    Toy(ToyArgs),
    /// How much of the hooked side feature the condition drives (condition × input variance split),
    /// for every arm, seed and saved step of a compare or ablate run folder.
    Disentangle(DisentangleArgs),
    /// Control fidelity and Fréchet distance of a compare run's finished side networks under
    /// classifier-free guidance at several scales.
    Guidance(GuidanceArgs),
    /// Side networks of different conditions steering one sample together (residuals summed), each
    /// condition's fidelity on the composed samples against single-condition samples.
    Compose(ComposeArgs),
    /// Time full side-network training steps (forward, backward, clip, AdamW, zero_grad) of our baseline
    /// and LISA against the authors' PyTorch + diffusers step (bench/reference.py), interleaved.
    Bench(BenchArgs),
    /// Check an accelerator: is CUDA seen, and does a short LISA run on it agree with the same run on
    /// the CPU (f32) and with itself in bf16 and fp16? Prints losses, step times and verdicts.
    DeviceCheck(DeviceCheckArgs),
    /// Run a command as N processes of one data-parallel training, as `torchrun --nproc-per-node N
    /// --no-python` does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), e.g.
    /// `lisa launch --nproc 2 -- lisa train --config run.toml`.
    Launch(LaunchArgs),
}

#[derive(Args)]
struct LaunchArgs {
    /// Processes to start: one per GPU (each takes cuda:LOCAL_RANK), or per share of the CPU cores.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// Port of the rendezvous on 127.0.0.1 (default: a free one).
    #[arg(long)]
    master_port: Option<u16>,
    /// The command and its arguments, after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// The flags every training command shares (pretrain, train, compare, ablate, device-check, train-sd).
#[derive(Args)]
struct RunFlags {
    /// TOML config file; any key not given keeps its default (see --print-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.steps=500 --set train.learning_rate=3e-4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Run folder (same as `--set output_dir=...`).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Number of optimizer steps (same as `--set train.steps=N`).
    #[arg(long)]
    steps: Option<u64>,
    /// libtorch CPU threads (same as `--set threads=N`; 0 = default).
    #[arg(long)]
    threads: Option<i32>,
    /// `auto`, `cpu`, `cuda` or `cuda:N` (same as `--set device=...`).
    #[arg(long)]
    device: Option<String>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl RunFlags {
    /// `--set` items, then the flags that stand for config keys, as overrides.
    fn overrides(&self) -> Vec<String> {
        let mut overrides = self.overrides.clone();
        if let Some(d) = &self.output_dir {
            overrides.push(format!("output_dir={:?}", d.display().to_string()));
        }
        if let Some(s) = self.steps {
            overrides.push(format!("train.steps={s}"));
        }
        if let Some(t) = self.threads {
            overrides.push(format!("threads={t}"));
        }
        if let Some(d) = &self.device {
            overrides.push(format!("device={d:?}"));
        }
        overrides
    }
}

#[derive(Args)]
struct PretrainArgs {
    #[command(flatten)]
    run: RunFlags,
    /// Continue a run: `latest` (newest checkpoint in the output folder) or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
}

#[derive(Args)]
struct ControlArgs {
    #[command(flatten)]
    run: RunFlags,
    /// The visual condition: edges, mask, depth, lowres, skeleton, or trajectory (clips), or several joined by
    /// `+` (`edges+mask`: one side network on stacked conditions); same as `--set condition=...`.
    #[arg(long)]
    task: Option<String>,
    /// A classifier folder written by `lisa classifier`: the final Fréchet distance on its features, with the
    /// floor (training images) and ceiling (uniform noise); same as `classifier = "DIR"` in `[final_eval]`.
    #[arg(long)]
    classifier: Option<PathBuf>,
}

impl ControlArgs {
    fn load(&self, extra: &[String]) -> Result<ControlConfig> {
        let mut overrides = self.overrides();
        overrides.extend(extra.iter().cloned());
        self.load_with(&[], &overrides)
    }

    /// The shared flags' overrides, then `--task`'s.
    fn overrides(&self) -> Vec<String> {
        let mut overrides = self.run.overrides();
        if let Some(t) = &self.task {
            overrides.push(format!("condition={t:?}"));
        }
        overrides
    }

    /// The config from `defaults` (overrides of the built-in defaults), then the config file, then
    /// `overrides`.
    fn load_with(&self, defaults: &[String], overrides: &[String]) -> Result<ControlConfig> {
        let mut cfg: ControlConfig = lisa::config::load_with_defaults(self.run.config.as_deref(), defaults, overrides)?;
        if let Some(dir) = &self.classifier {
            cfg.final_eval.classifier = dir.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    common: ControlArgs,
    /// Train without LISA (same as `--set lisa.enabled=false`).
    #[arg(long)]
    baseline: bool,
    /// Continue a run: `latest` (newest checkpoint in the output folder) or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    common: ControlArgs,
    /// Seeds per arm (same as `--set compare.seeds=N`).
    #[arg(long)]
    seeds: Option<u64>,
    /// Keep finished arms and resume unfinished ones from their latest checkpoint.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct LrSweepArgs {
    /// The folder whose sub-folders are the baseline runs; lr-sweep.md, lr-sweep.json and the plots go here.
    dir: PathBuf,
}

#[derive(Args)]
struct SpeedupsArgs {
    /// `lisa compare` output folders (each with summary.json and config.toml), one table row each, in this order.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where speedups.md, speedups.json and the plots go.
    #[arg(long, default_value = "runs/speedups")]
    out: PathBuf,
    /// A `lisa bench --config ... --out FILE` result (baseline and LISA timed): per-second speed-ups for the
    /// points that run the step it timed.
    #[arg(long)]
    step_costs: Option<PathBuf>,
}

#[derive(Args)]
struct ContrastArgs {
    /// Folders holding `seed-S/ARM/summary.json` (a `lisa compare` output, `scripts/converge.sh control`'s).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// The arm every other arm is timed against.
    #[arg(long, default_value = "baseline")]
    reference: String,
    /// The arm timed against every other arm.
    #[arg(long, default_value = "lisa")]
    candidate: String,
    /// A `lisa bench --config ... --out FILE` result: per-second speed-ups beside the per-step ones.
    #[arg(long)]
    step_costs: Option<PathBuf>,
    /// Where contrast.md and contrast.json go.
    #[arg(long, default_value = "runs/contrast")]
    out: PathBuf,
}

#[derive(Args)]
struct AblateArgs {
    #[command(flatten)]
    common: ControlArgs,
    /// An arm, `name: key=value, key=value` (on top of LISA enabled); repeat. Default: LISA, random /
    /// raw / condition targets, a 2×-wide decoder, cosine distance, λ ∈ {0.05, 0.1, 0.5, 1}, every hook.
    #[arg(long = "variant")]
    variants: Vec<String>,
    /// Seeds per arm (same as `--set compare.seeds=N`).
    #[arg(long)]
    seeds: Option<u64>,
    /// Keep finished arms (also those of a `compare` in the same folder) and resume unfinished ones.
    #[arg(long)]
    resume: bool,
}

#[derive(Args, Clone)]
struct SamplerArgs {
    /// ddim, ddpm (DDPM objectives) or euler (flow matching). Default: ddim, or euler for flow models.
    #[arg(long)]
    sampler: Option<SamplerKind>,
    /// libtorch CPU threads (0 = libtorch's default), as every other command takes.
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    sampling_steps: usize,
    /// DDIM η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override a setting, KEY=VALUE (TOML value), after the flags, as every other command takes it; the keys are
    /// the fields --print-config shows (e.g. `sampler.steps=20`, `guidance_scale=3`, `data.image_size=32`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the resolved settings as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl SamplerArgs {
    /// Applies `--threads`.
    fn set_threads(&self) {
        if self.threads > 0 {
            tch::set_num_threads(self.threads);
        }
    }

    fn config(&self, net: &MainNetwork) -> SamplerConfig {
        let default_kind = match net.objective {
            lisa::diffusion::Objective::Flow => SamplerKind::Euler,
            _ => SamplerKind::Ddim,
        };
        SamplerConfig {
            kind: self.sampler.unwrap_or(default_kind),
            steps: self.sampling_steps,
            eta: self.eta,
            clip_sample: true,
        }
    }
}

#[derive(Args)]
struct SampleArgs {
    /// Model folder (`config.json` + `model.safetensors`), a run's `model/`, or a `checkpoint-N/`;
    /// default: the main network shipped in `assets/main-network`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Comma-separated class labels to generate, e.g. `0,0,7`; default: every class.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<i64>,
    /// Samples per label.
    #[arg(long, default_value_t = 8)]
    per_label: i64,
    /// Output PNG.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Also write every sample as its own PNG into this new (or empty) folder, with a `metadata.jsonl` naming each
    /// file's label, seed and conditions: for an external scorer, for browsing, or to read back as an imagefolder.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// A side network folder (a `lisa train` run's `side-network/`, or one of its checkpoints): sample
    /// under its control. Repeat to compose several (their residuals are summed, as diffusers'
    /// MultiControlNet). Needs --condition (one per side network) or --condition-from.
    #[arg(long)]
    controlnet: Vec<PathBuf>,
    /// A condition image (PNG/JPEG/BMP, resized to the model's size; white = 1), one per --controlnet, in order;
    /// read with as many channels as its side network takes (grey, or colour for one trained on colour maps).
    #[arg(long)]
    condition: Vec<PathBuf>,
    /// An ordinary image from which every side network extracts its own condition (e.g. edges, mask).
    #[arg(long, conflicts_with = "condition")]
    condition_from: Option<PathBuf>,
    /// Conditioning scale: multiplies a side network's residuals (0 = no control); one value for all, or one per --controlnet.
    #[arg(long, default_value = "1.0", value_delimiter = ',')]
    conditioning_scale: Vec<f64>,
    /// Fraction of the sampling steps after which the control starts acting (diffusers' control_guidance_start).
    #[arg(long, default_value_t = 0.0)]
    control_start: f64,
    /// Fraction of the sampling steps after which the control stops (diffusers' control_guidance_end).
    #[arg(long, default_value_t = 1.0)]
    control_end: f64,
    /// Classifier-free guidance scale on the label (1 = none; uses the main network's null label).
    #[arg(long, default_value_t = 1.0)]
    guidance_scale: f64,
    #[command(flatten)]
    sampler: SamplerArgs,
}

#[derive(Args)]
struct EvalArgs {
    /// Model folder to evaluate; default: the shipped main network.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Images per set (samples, real train, noise; capped by the test split's size).
    #[arg(long, default_value_t = 1000)]
    num_images: i64,
    /// Fashion-MNIST source for the real images: auto, embedded or debian.
    #[arg(long, default_value = "auto")]
    data_source: String,
    /// An imagefolder instead of Fashion-MNIST (read as the `--classifier` was trained on it: columns, size,
    /// channels, held-out part); default with `--classifier`: the data it was trained on.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A classifier folder written by `lisa classifier`: the Fréchet distance on its features (default: the
    /// shipped Fashion-MNIST classifier; an imagefolder needs one).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    sampler: SamplerArgs,
}

#[derive(Args)]
struct TintedFolderArgs {
    /// The folder to write (created; must not hold a metadata.jsonl yet).
    #[arg(long)]
    out: PathBuf,
    /// How many items (drawn at random, by --seed, from the split).
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Which Fashion-MNIST split: train or test.
    #[arg(long, default_value = "train")]
    split: String,
    /// Fashion-MNIST source: auto, embedded or debian.
    #[arg(long, default_value = "auto")]
    data_source: String,
    /// Seed of the draw and of the tints.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ClassifierArgs {
    /// The labelled imagefolder (integer `label` on every line); same as `--set data.dataset=...`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Folder for classifier.safetensors and classifier.json; same as `--set output_dir=...`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passes over the training images; same as `--set train.epochs=N`.
    #[arg(long)]
    epochs: Option<usize>,
    /// TOML config file; any key not given keeps its default (see --print-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set data.channels=3 --set train.batch_size=64`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// libtorch CPU threads (same as `--set threads=N`; 0 = default).
    #[arg(long)]
    threads: Option<i32>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct ExportArgs {
    /// A `checkpoint-N/` folder of a pretraining run.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The model folder to write (`config.json` + `model.safetensors`).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct TrainSdArgs {
    #[command(flatten)]
    run: RunFlags,
    /// The Stable Diffusion folder (same as `--set model=...`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The captioned imagefolder (same as `--set data=...`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Train without LISA (same as `--set lisa.enabled=false`).
    #[arg(long)]
    baseline: bool,
    /// Continue a run: `latest` (newest checkpoint in the output folder) or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
}

#[derive(Args)]
struct ExportControlnetArgs {
    /// A side network folder (`side-network/` of a run, or one of its `checkpoint-N/`).
    #[arg(long)]
    controlnet: PathBuf,
    /// The main network it was trained with: our model folder (default: the shipped one), or, for
    /// a `train-sd` side network, the Stable Diffusion folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The folder to write (`config.json` + `diffusion_pytorch_model.safetensors`).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    /// Folder for everything the demo writes.
    #[arg(long, default_value = "runs/demo")]
    output_dir: PathBuf,
    /// Training steps of each arm.
    #[arg(long, default_value_t = 150)]
    steps: u64,
    /// Seeds per arm.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
}

#[derive(Args)]
struct ToyArgs {
    /// Folder for toy-convergence.png, toy-drift.png and toy.json.
    #[arg(long, default_value = "runs/toy")]
    out: PathBuf,
    /// Training steps of each decoder and of the learned prior.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Master seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct DisentangleArgs {
    /// A `lisa compare` or `lisa ablate` run folder (with config.toml and seed-S/<arm>/). An earlier
    /// disentangle.json there, measured with the same settings, keeps its points for runs no longer on disk.
    #[arg(long)]
    run_dir: PathBuf,
    /// The side feature: `mid` or `down_<i>`; default: the run's LISA hook.
    #[arg(long)]
    hook: Option<String>,
    /// Conditions in the grid.
    #[arg(long, default_value_t = 16)]
    conditions: i64,
    /// Noisy inputs in the grid.
    #[arg(long, default_value_t = 16)]
    inputs: i64,
    /// Times t/T of the grid, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    times: Vec<f64>,
}

#[derive(Args)]
struct GuidanceArgs {
    /// A finished `lisa compare` run folder.
    #[arg(long)]
    run_dir: PathBuf,
    /// Guidance scales, comma-separated (1 = no guidance).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    scales: Vec<f64>,
    /// Held-out images per arm, seed and scale; default: the run's final evaluation size.
    #[arg(long)]
    images: Option<i64>,
}

#[derive(Args)]
struct ComposeArgs {
    /// A finished `lisa compare` run folder, once per condition (at least two).
    #[arg(long = "run-dir", required = true)]
    run_dirs: Vec<PathBuf>,
    /// Conditioning scale of each side network in the composition, comma-separated (one for all, or one per run).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    scales: Vec<f64>,
    /// Held-out images per sample set.
    #[arg(long, default_value_t = 200)]
    images: i64,
    /// Seed of the side networks used.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A `lisa compare` folder of a side network trained on the conditions stacked (`condition =
    /// "edges+mask"`, with condition dropout), measured on the same images given all and each condition.
    #[arg(long = "stacked-run")]
    stacked_run: Option<PathBuf>,
    /// Output folder for compose.md and compose.json.
    #[arg(long, default_value = "runs/compose")]
    out: PathBuf,
}

#[derive(Args)]
struct DeviceCheckArgs {
    #[command(flatten)]
    common: ControlArgs,
    /// Examples per step (same as `--set train.batch_size=N`).
    #[arg(long)]
    batch: Option<usize>,
}

#[derive(Args)]
struct BenchArgs {
    /// Main network folder (frozen); default: the shipped one in `assets/main-network`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Examples per training step (default 32; 1 with --real-size).
    #[arg(long)]
    batch: Option<i64>,
    /// libtorch CPU threads, ours and the reference's.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Timed steps per variant (run round-robin across the variants).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Untimed warm-up rounds (every variant steps once per round).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the initialisation and the inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Ours only: do not run the PyTorch reference.
    #[arg(long)]
    no_reference: bool,
    /// Python with torch and diffusers for the reference; default: `.venv/bin/python` of this repository.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Side n of the n×n×n f32 matmul timed for the machine's GEMM rate.
    #[arg(long, default_value_t = 2048)]
    gemm_size: i64,
    /// Examples per step that get the LISA term in the sub-batch variant (`lisa.sub_batch`), 1 to --batch;
    /// default a quarter of the batch.
    #[arg(long)]
    lisa_sub_batch: Option<i64>,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead of training steps, time sampling with the baseline- and LISA-trained side networks of this
    /// `lisa compare` folder (its first seed), alternating, `--reps` times each.
    #[arg(long)]
    sampling_run: Option<PathBuf>,
    /// Images per sampling timing (with --sampling-run).
    #[arg(long, default_value_t = 64)]
    sampling_images: i64,
    /// Instead, time the arms of one operating point: its configuration (as `lisa train --config` takes it),
    /// at its own batch and threads; the arms are named by `--arm`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// With --config: override a key, KEY=VALUE (TOML value), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// With --config: an arm to time, repeatable (baseline, lisa, random, condition, raw, sub8, crossnorm,
    /// crossnorm-lisa; default all);
    /// the first is the one the others are compared with.
    #[arg(long = "arm")]
    arms: Vec<String>,
    /// Instead, one ControlNet training step at a real model's size (the UNet of --unet-config with random
    /// weights; batch --batch, default 1 here), baseline and LISA, each with and without activation
    /// recomputation (and with bf16 frozen weights, see --bf16), ours and diffusers' (unless --no-reference),
    /// each in a process of its own: step time and peak RSS side by side.
    #[arg(long)]
    real_size: bool,
    /// With --real-size: a diffusers UNet config.json (default: configs/real-size/stable-diffusion-v1-5-unet.json).
    #[arg(long)]
    unet_config: Option<PathBuf>,
    /// With --real-size: the latents' side.
    #[arg(long, default_value_t = 64)]
    latent_size: i64,
    /// With --real-size: `cpu`, `cuda` or `cuda:N` (the other benchmarks run on the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With --real-size: also the bf16 variants (frozen UNet held in bf16, bf16 autocast) on a CPU without bf16
    /// units, where they are emulated (they run by default where the CPU has AVX-512 BF16 or AMX).
    #[arg(long)]
    bf16: bool,
    /// Runs one real-size variant in this process and prints its result as JSON (what --real-size runs).
    #[arg(long, hide = true)]
    real_size_variant: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Freed tensor memory stays in the heap for the next step instead of being unmapped and faulted back in.
    lisa::allocator::keep_freed_memory_for_reuse();
    let result = match cli.command {
        Command::Pretrain(a) => run_pretrain(a),
        Command::Sample(a) => run_sample(a),
        Command::Eval(a) => run_eval(a),
        Command::Classifier(a) => run_classifier(a),
        Command::Export(a) => run_export(a),
        Command::TintedFolder(a) => run_tinted_folder(a),
        Command::Train(a) => run_train(a),
        Command::TrainSd(a) => run_train_sd(a),
        Command::ExportControlnet(a) => run_export_controlnet(a),
        Command::Compare(a) => run_compare(a),
        Command::LrSweep(a) => run_lr_sweep(a),
        Command::Speedups(a) => run_speedups(a),
        Command::Contrast(a) => run_contrast(a),
        Command::Ablate(a) => run_ablate(a),
        Command::Demo(a) => run_demo(a),
        Command::Toy(a) => run_toy(a),
        Command::Disentangle(a) => run_disentangle(a),
        Command::Guidance(a) => run_guidance(a),
        Command::Compose(a) => run_compose(a),
        Command::Bench(a) => run_bench(a),
        Command::DeviceCheck(a) => run_device_check(a),
        Command::Launch(a) => match lisa::distributed::launch(a.nproc, a.master_port, &a.command) {
            Ok(0) => Ok(()),
            Ok(code) => return ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => Err(e.into()),
        },
    };
    // Every rank of a multi-process run leaves together (a last barrier), so none tears down its
    // connections while another still needs them.
    let result = result.and_then(|()| lisa::distributed::leave().map_err(Into::into));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, outermost first; a cause whose text the message before
            // it already contains (the library's errors quote their source) is not repeated.
            let mut msg: Vec<String> = Vec::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !msg.last().is_some_and(|m| m.contains(&cause)) {
                    msg.push(cause);
                }
            }
            // Under `lisa launch` / torchrun every process reads the same configuration and refuses it alike:
            // rank 0 alone says so.
            let config_error =
                e.chain().any(|c| matches!(c.downcast_ref::<lisa::Error>(), Some(lisa::Error::Config(_))));
            let other_rank = lisa::distributed::Launch::from_env().ok().flatten().is_some_and(|l| l.rank != 0);
            if !(config_error && other_rank) {
                eprintln!("error: {}", msg.join(": "));
            }
            ExitCode::FAILURE
        }
    }
}

fn run_pretrain(a: PretrainArgs) -> Result<()> {
    let cfg: PretrainConfig = lisa::config::load(a.run.config.as_deref(), &a.run.overrides())?;
    if a.run.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    let resume = resume_or_fresh(&cfg.output_dir, a.resume.as_deref())?;
    let summary = pretrain(&cfg, resume, a.run.quiet)?;
    println!(
        "trained {} steps ({} skipped), final loss {:.4}, {:.3} s/step; model in {}",
        summary.steps,
        summary.skipped_steps,
        summary.final_loss,
        summary.seconds_per_step,
        cfg.output_dir.join("model").display()
    );
    Ok(())
}

/// `--resume` as the run should take it: `latest` in a folder with no checkpoint yet starts a fresh run
/// (saying so), so that a job that requeues itself can always be started with `--resume latest`.
fn resume_or_fresh<'a>(output_dir: &std::path::Path, resume: Option<&'a str>) -> Result<Option<&'a str>> {
    let r = lisa::train::checkpoint::resume_or_fresh(output_dir, resume)?;
    if resume.is_some() && r.is_none() {
        eprintln!("note: no checkpoint in {} yet: --resume latest starts a fresh run", output_dir.display());
    }
    Ok(r)
}

/// The main network shipped with the repository.
fn shipped_model() -> PathBuf {
    lisa::pipeline::shipped_main_network()
}

fn load_model(dir: &std::path::Path) -> Result<MainNetwork> {
    MainNetwork::load(dir, Device::Cpu).with_context(|| format!("loading the model in {}", dir.display()))
}

fn run_sample(a: SampleArgs) -> Result<()> {
    a.sampler.set_threads();
    let net = load_model(&a.model.clone().unwrap_or_else(shipped_model))?;
    let request = SampleRequest {
        sampler: a.sampler.config(&net),
        seed: a.sampler.seed,
        labels: a.labels,
        per_label: a.per_label,
        out: a.out,
        out_dir: a.out_dir,
        controlnets: a.controlnet,
        conditions: a.condition,
        condition_from: a.condition_from,
        conditioning_scale: a.conditioning_scale,
        control_start: a.control_start,
        control_end: a.control_end,
        guidance_scale: a.guidance_scale,
    };
    let request = lisa::config::with_overrides(&request, &a.sampler.set)?;
    if a.sampler.print_config {
        print!("{}", lisa::config::to_toml(&request)?);
        return Ok(());
    }
    let done = sample_to_files(&net, &request)?;
    if let Some(dir) = &request.out_dir {
        println!("wrote {} samples and their metadata.jsonl into {}", done.samples, dir.display());
    }
    if done.condition_kinds.is_empty() {
        println!("wrote {} ({} samples)", request.out.display(), done.samples);
    } else {
        println!(
            "wrote {} (top row(s): the {} condition(s); {} samples below)",
            request.out.display(),
            done.condition_kinds.join(" + "),
            done.samples
        );
    }
    Ok(())
}

/// What `lisa eval` runs with, as `--set` and `--print-config` see it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalSettings {
    data: DataConfig,
    num_images: i64,
    sampler: SamplerConfig,
    seed: u64,
}

fn run_eval(a: EvalArgs) -> Result<()> {
    a.sampler.set_threads();
    let info = match &a.classifier {
        Some(dir) => Some(lisa::eval::load_classifier_dir(dir, Device::Cpu)?.2),
        None => None,
    };
    // The data as the classifier was trained on it (with --data naming the folder), else Fashion-MNIST.
    let mut data = match info.as_ref().and_then(|i| i.data.as_ref()) {
        Some(d) => d.config.clone(),
        None => DataConfig { source: a.data_source.clone(), ..DataConfig::default() },
    };
    if let Some(dir) = &a.data {
        data.dataset = dir.display().to_string();
    }
    if data.is_imagefolder() && a.classifier.is_none() {
        println!(
            "Fréchet distance skipped: there is no classifier for {0}; train one with `lisa classifier --data {0} \
             --out DIR` and pass `--classifier DIR`",
            data.dataset
        );
        return Ok(());
    }
    let net = load_model(&a.model.clone().unwrap_or_else(shipped_model))?;
    let settings = EvalSettings { data, num_images: a.num_images, sampler: a.sampler.config(&net), seed: a.sampler.seed };
    let EvalSettings { data, num_images, sampler, seed } = lisa::config::with_overrides(&settings, &a.sampler.set)?;
    if a.sampler.print_config {
        print!("{}", lisa::config::to_toml(&EvalSettings { data, num_images, sampler, seed })?);
        return Ok(());
    }
    let report = evaluate(&net, &data, a.classifier.as_deref(), num_images, &sampler, seed)?;
    println!("{}", report.table());
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn run_tinted_folder(a: TintedFolderArgs) -> Result<()> {
    use lisa::data::fashion_mnist::{Source, Split, DEBIAN_DIR};
    let split = match a.split.as_str() {
        "train" => Split::Train,
        "test" => Split::Test,
        other => anyhow::bail!("--split {other:?}: use train or test"),
    };
    let source = match a.data_source.as_str() {
        "auto" => Source::auto(),
        "embedded" => Source::Embedded,
        "debian" => Source::Debian(PathBuf::from(DEBIAN_DIR)),
        other => anyhow::bail!("--data-source {other:?}: use auto, embedded or debian"),
    };
    let wrote = lisa::data::tinted::write_tinted_folder(&a.out, &source, split, a.count, a.seed)?;
    println!(
        "wrote {} tinted images with their masks and {} (per class: {:?})",
        wrote.images,
        a.out.join("metadata.jsonl").display(),
        wrote.per_class
    );
    Ok(())
}

fn run_classifier(a: ClassifierArgs) -> Result<()> {
    let mut overrides = a.overrides.clone();
    for (key, v) in [("data.dataset", &a.data), ("output_dir", &a.out)] {
        if let Some(v) = v {
            overrides.push(format!("{key}={:?}", v.display().to_string()));
        }
    }
    if let Some(e) = a.epochs {
        overrides.push(format!("train.epochs={e}"));
    }
    if let Some(t) = a.threads {
        overrides.push(format!("threads={t}"));
    }
    let cfg: lisa::eval::ClassifierRunConfig = lisa::config::load(a.config.as_deref(), &overrides)?;
    if a.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    let info = lisa::eval::train_data_classifier(&cfg)?;
    let m = &info.train.model;
    let held = info.data.as_ref().map_or(0, |d| d.held_out_images);
    println!(
        "classifier for {}-channel {}×{} images of {} classes: {:.2}% accuracy on {held} held-out images; \
         written to {} (use it with `--classifier {}`)",
        m.in_channels,
        m.image_size,
        m.image_size,
        m.num_classes,
        100.0 * info.test_accuracy,
        cfg.output_dir.display(),
        cfg.output_dir.display()
    );
    Ok(())
}

fn run_export(a: ExportArgs) -> Result<()> {
    let net = load_model(&a.checkpoint)?;
    net.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {} ({} parameters)", a.out.display(), lisa::models::parameter_count(&net.vs));
    Ok(())
}

fn run_train_sd(a: TrainSdArgs) -> Result<()> {
    use lisa::experiments::latent::{train_latent, LatentControlConfig};
    let mut overrides = a.run.overrides();
    for (key, v) in [("model", &a.model), ("data", &a.data)] {
        if let Some(v) = v {
            overrides.push(format!("{key}={:?}", v.display().to_string()));
        }
    }
    if a.baseline {
        overrides.push("lisa.enabled=false".into());
    }
    let cfg: LatentControlConfig = lisa::config::load(a.run.config.as_deref(), &overrides)?;
    if a.run.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    cfg.validate()?;
    let resume = resume_or_fresh(&cfg.output_dir, a.resume.as_deref())?;
    if resume.is_none() {
        lisa::train::checkpoint::ensure_none(&cfg.output_dir)?;
    }
    let s = train_latent(&cfg, resume, a.run.quiet, &mut |m| eprintln!("{m}"))?;
    println!(
        "{}: {} steps on {} examples ({} prompts, latents {:?}), final loss {:.4}; side network in {}{}",
        s.arm,
        s.steps,
        s.examples,
        s.prompts,
        s.latent_shape,
        s.final_loss,
        s.side_network.display(),
        s.diffusers_controlnet.map(|d| format!(", diffusers ControlNet in {}", d.display())).unwrap_or_default()
    );
    Ok(())
}

fn run_export_controlnet(a: ExportControlnetArgs) -> Result<()> {
    let model = a.model.clone().unwrap_or_else(lisa::pipeline::shipped_main_network);
    // A Stable Diffusion folder needs prompts to load; the side network does not depend on them.
    let main = if model.join("unet").is_dir() {
        lisa::sd::load_main_network(&model, &[""], tch::Device::Cpu)?
    } else {
        lisa::pipeline::MainNetwork::load(&model, tch::Device::Cpu)?
    };
    let side = SideNetwork::load(&a.controlnet, &main)
        .with_context(|| format!("loading the side network in {}", a.controlnet.display()))?;
    side.export_diffusers(&a.out)?;
    println!("wrote {} (diffusers ControlNetModel)", a.out.display());
    Ok(())
}

fn run_train(a: TrainArgs) -> Result<()> {
    let extra = if a.baseline { vec!["lisa.enabled=false".to_string()] } else { vec![] };
    let cfg = a.common.load(&extra)?;
    if a.common.run.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    let resume = resume_or_fresh(&cfg.output_dir, a.resume.as_deref())?;
    if resume.is_none() {
        lisa::train::checkpoint::ensure_none(&cfg.output_dir)?;
    }
    let main = load_main(&cfg)?;
    let data = prepare_data(&cfg)?;
    let s = train_control(&cfg, &main, &data, resume, a.common.run.quiet)?;
    // Every process of a data-parallel run ends here with the same summary; one prints it.
    if !lisa::distributed::is_main_process() {
        return Ok(());
    }
    let frechet = match (s.frechet, s.frechet_floor, s.frechet_ceiling) {
        (Some(f), Some(lo), Some(hi)) => format!("Fréchet distance {f:.2} (floor {lo:.2}, ceiling {hi:.2})"),
        (Some(f), _, _) => format!("Fréchet distance {f:.2}"),
        (None, _, _) => "Fréchet distance skipped (no classifier for this data)".into(),
    };
    println!(
        "{} ({}): {} steps, {:.3} s/step; final {} {:.4} (shuffled conditions {:.4}), {frechet}; side network in {}",
        s.arm,
        s.condition,
        s.steps,
        s.step_seconds,
        s.metric,
        s.final_fidelity,
        s.final_fidelity_shuffled,
        cfg.output_dir.join("side-network").display()
    );
    if let Some(note) = frechet_skipped_note(&cfg) {
        eprintln!("{note}");
    }
    Ok(())
}

fn run_compare(a: CompareArgs) -> Result<()> {
    let extra: Vec<String> = a.seeds.iter().map(|s| format!("compare.seeds={s}")).collect();
    let cfg = a.common.load(&extra)?;
    if a.common.run.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    let report = compare(&cfg, a.resume, a.common.run.quiet)?;
    if !lisa::distributed::is_main_process() {
        return Ok(());
    }
    println!("{}", report.table());
    let out = &cfg.output_dir;
    println!(
        "plot: {}  grid (condition | baseline | LISA | ground truth): {}",
        out.join("fidelity.png").display(),
        out.join("samples.png").display()
    );
    Ok(())
}

fn run_lr_sweep(a: LrSweepArgs) -> Result<()> {
    let points = lisa::experiments::lr_sweep::lr_sweep(&a.dir)?;
    print!("{}", lisa::experiments::lr_sweep::sweep_table(&points));
    println!("plots: {}  {}", a.dir.join("lr-sweep-events.png").display(), a.dir.join("lr-sweep-curves.png").display());
    Ok(())
}

fn run_contrast(a: ContrastArgs) -> Result<()> {
    let list =
        lisa::experiments::contrast::contrast(&a.dirs, &a.reference, &a.candidate, a.step_costs.as_deref(), &a.out)?;
    let md = a.out.join("contrast.md");
    print!("{}", std::fs::read_to_string(&md).with_context(|| format!("reading {}", md.display()))?);
    eprintln!("{} contrasts written to {}", list.len(), a.out.display());
    Ok(())
}

fn run_speedups(a: SpeedupsArgs) -> Result<()> {
    let points = lisa::experiments::speedups::speedups(&a.runs, &a.out, a.step_costs.as_deref())?;
    let md = a.out.join("speedups.md");
    print!("{}", std::fs::read_to_string(&md).with_context(|| format!("reading {}", md.display()))?);
    eprintln!("{} operating points", points.len());
    println!("plots: {}  {}", a.out.join("speedups-50.png").display(), a.out.join("speedups-80.png").display());
    Ok(())
}

fn run_ablate(a: AblateArgs) -> Result<()> {
    let extra: Vec<String> = a.seeds.iter().map(|s| format!("compare.seeds={s}")).collect();
    let cfg = a.common.load(&extra)?;
    if a.common.run.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    let specs = if a.variants.is_empty() {
        let main = load_main(&cfg)?;
        let num_hooks = match &main.config.transformer {
            None => main.config.unet.skip_channels().len(),
            Some(t) => (if cfg.side_transformer_layers > 0 { cfg.side_transformer_layers } else { t.num_layers / 2 })
                .max(1) as usize,
        };
        let hook = if main.config.transformer.is_some() { "block" } else { "down" };
        lisa::experiments::ablate::default_variants(hook, num_hooks)
    } else {
        a.variants.clone()
    };
    let variants =
        specs.iter().map(|s| lisa::experiments::ablate::Variant::parse(s)).collect::<lisa::Result<Vec<_>>>()?;
    let report = lisa::experiments::ablate::ablate(&cfg, &variants, a.resume, a.common.run.quiet)?;
    println!("{}", report.table());
    println!("table: {}", cfg.output_dir.join("ablation.md").display());
    Ok(())
}

fn run_demo(a: DemoArgs) -> Result<()> {
    // A short comparison on the embedded subset: sized to take a few minutes on two CPU cores.
    let mut cfg = ControlConfig { output_dir: a.output_dir.clone(), ..ControlConfig::default() };
    cfg.data.source = "embedded".into();
    cfg.condition = "edges".into();
    cfg.train.steps = a.steps;
    cfg.train.checkpointing_steps = a.steps / 2;
    cfg.fidelity.every_steps = (a.steps / 5).max(1);
    cfg.fidelity.num_images = 32;
    cfg.final_eval.num_images = 100;
    cfg.compare.seeds = a.seeds;
    println!(
        "== lisa compare --task edges on the embedded Fashion-MNIST subset: {} steps per arm, {} seed(s)",
        a.steps, a.seeds
    );
    let report = compare(&cfg, false, false)?;
    println!("{}", report.table());
    let out = &cfg.output_dir;
    println!(
        "plot: {}\ngrid (condition | baseline | LISA | ground truth): {}",
        out.join("fidelity.png").display(),
        out.join("samples.png").display()
    );
    Ok(())
}

fn run_toy(a: ToyArgs) -> Result<()> {
    let cfg = lisa::toy::ToyConfig { steps: a.steps, seed: a.seed, ..Default::default() };
    let report = lisa::toy::run_toy(&cfg, &a.out)?;
    println!("{}", report.table());
    let (conv, drift, json) = (a.out.join("toy-convergence.png"), a.out.join("toy-drift.png"), a.out.join("toy.json"));
    println!("plots: {}  {}  numbers: {}", conv.display(), drift.display(), json.display());
    Ok(())
}

fn run_disentangle(a: DisentangleArgs) -> Result<()> {
    use lisa::experiments::disentangle::{disentangle, DisentangleConfig};
    let hook = a.hook.as_deref().map(str::parse).transpose()?;
    let cfg = DisentangleConfig {
        hook,
        num_conditions: a.conditions,
        num_inputs: a.inputs,
        unit_times: a.times,
        ..Default::default()
    };
    let report = disentangle(&a.run_dir, &cfg, &mut |m| eprintln!("{m}"))?;
    println!("{}", report.table());
    println!("written: {}", a.run_dir.join("disentangle.{md,json,csv,png}").display());
    Ok(())
}

fn run_guidance(a: GuidanceArgs) -> Result<()> {
    use lisa::experiments::guidance::{guidance_sweep, GuidanceConfig};
    let cfg = GuidanceConfig { guidance_scales: a.scales, num_images: a.images, ..Default::default() };
    let report = guidance_sweep(&a.run_dir, &cfg, &mut |m| eprintln!("{m}"))?;
    println!("{}", report.table());
    println!("written: {}", a.run_dir.join("guidance.{md,json}").display());
    Ok(())
}

fn run_compose(a: ComposeArgs) -> Result<()> {
    use lisa::experiments::compose::{compose, ComposeConfig};
    let cfg = ComposeConfig {
        runs: a.run_dirs,
        conditioning_scales: a.scales,
        num_images: a.images,
        seed: a.seed,
        stacked: a.stacked_run,
        ..Default::default()
    };
    let report = compose(&cfg, &a.out, &mut |m| eprintln!("{m}"))?;
    println!("{}", report.table());
    println!("written: {}", a.out.join("compose.{md,json}").display());
    Ok(())
}

fn run_device_check(a: DeviceCheckArgs) -> Result<()> {
    use lisa::experiments::device_check::{device_check, DEFAULT_OVERRIDES};
    use lisa::models::MixedPrecision;
    let defaults: Vec<String> = DEFAULT_OVERRIDES.iter().map(|s| s.to_string()).collect();
    // The device checked: `--device` (`cuda`, `cuda:N`; `cpu` runs the same comparisons on the CPU), else CUDA.
    let mut extra = if a.common.run.device.is_none() { vec!["device=\"cuda\"".to_string()] } else { vec![] };
    if let Some(b) = a.batch {
        extra.push(format!("train.batch_size={b}"));
    }
    let mut overrides = a.common.overrides();
    overrides.extend(extra);
    let cfg = a.common.load_with(&defaults, &overrides)?;
    if a.common.run.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    let report = device_check(&cfg, &[MixedPrecision::Bf16, MixedPrecision::Fp16], a.common.run.quiet)?;
    println!("{}", report.table());
    println!("report: {}", cfg.output_dir.join("device-check.json").display());
    if !report.passed() {
        anyhow::bail!("device-check: a comparison exceeded its tolerance (see the table above)");
    }
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    use lisa::experiments::bench::{repo_root, BenchConfig, ReferenceCommand};
    if let Some(config) = &a.config {
        use lisa::experiments::bench::arm_cost::{bench_arms, ArmKind};
        let cfg: lisa::experiments::control_config::ControlConfig =
            lisa::config::load_with_defaults(Some(config), &[], &a.set)?;
        let arms: Vec<ArmKind> = if a.arms.is_empty() {
            ArmKind::ALL.to_vec()
        } else {
            a.arms.iter().map(|n| ArmKind::parse(n)).collect::<lisa::Result<_>>()?
        };
        let report = bench_arms(&cfg, &arms, a.warmup, a.reps, &mut |m| eprintln!("{m}"))?;
        return print_and_save(&report.table(), &report, a.out.as_deref());
    }
    if a.real_size || a.real_size_variant.is_some() {
        use lisa::experiments::bench::real_size::{self, RealSizeConfig, RealSizeVariant};
        let batch = a.batch.unwrap_or(1);
        let cfg = RealSizeConfig {
            unet_config: a.unet_config.clone().unwrap_or_else(|| repo_root().join(real_size::DEFAULT_UNET_CONFIG)),
            latent_size: a.latent_size,
            batch,
            threads: a.threads,
            warmup: a.warmup,
            reps: a.reps,
            seed: a.seed,
            device: a.device.clone(),
        };
        if let Some(name) = &a.real_size_variant {
            let result = real_size::run_variant(&cfg, RealSizeVariant::parse(name)?, &mut |m| eprintln!("{m}"))?;
            println!("{}", serde_json::to_string(&result)?);
            return Ok(());
        }
        let exe = std::env::current_exe().context("finding this executable to run the variants")?;
        let reference = (!a.no_reference).then(|| {
            let mut cmd = ReferenceCommand::in_repo(&repo_root());
            if let Some(p) = &a.python {
                cmd.python = p.clone();
            }
            cmd
        });
        let variants = real_size::variants(a.bf16 || real_size::cpu_has_bf16());
        let report = real_size::bench_real_size(&cfg, &variants, &exe, reference.as_ref(), &mut |m| eprintln!("{m}"))?;
        return print_and_save(&report.table(), &report, a.out.as_deref());
    }
    if let Some(dir) = &a.sampling_run {
        let report = lisa::experiments::bench::bench_sampling(dir, a.sampling_images, a.reps, a.threads)?;
        return print_and_save(&report.table(), &report, a.out.as_deref());
    }
    let reference = (!a.no_reference).then(|| {
        let mut cmd = ReferenceCommand::in_repo(&repo_root());
        if let Some(p) = &a.python {
            cmd.python = p.clone();
        }
        cmd
    });
    let cfg = BenchConfig {
        main_network: a.model.clone().unwrap_or_else(shipped_model),
        batch: a.batch.unwrap_or(32),
        threads: a.threads,
        reps: a.reps,
        warmup: a.warmup,
        seed: a.seed,
        gemm_size: a.gemm_size,
        lisa_sub_batch: a.lisa_sub_batch.unwrap_or((a.batch.unwrap_or(32) / 4).max(1)),
        reference,
    };
    let report = lisa::experiments::bench::run_bench(&cfg, &mut |m| eprintln!("{m}"))?;
    print_and_save(&report.table(), &report, a.out.as_deref())
}

/// Prints a bench's table and, with `--out`, writes its result as JSON there.
fn print_and_save(table: &str, report: &impl serde::Serialize, out: Option<&std::path::Path>) -> Result<()> {
    println!("{table}");
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_string_pretty(report)?).with_context(|| format!("writing {}", out.display()))?;
        // On stderr, so that the table on stdout can be saved as it is.
        eprintln!("results: {}", out.display());
    }
    Ok(())
}
