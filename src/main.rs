//! The `lisa` command line: parse, load the config, call the library.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tch::{Device, Kind, Tensor};

use lisa::diffusion::{SamplerConfig, SamplerKind};
use lisa::experiments::evaluate::evaluate;
use lisa::experiments::pretrain::{pretrain, DataConfig, PretrainConfig};
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
    /// Turn a training checkpoint into a model folder (its EMA weights when it has them).
    Export(ExportArgs),
    /// The main job on the embedded default: a short pretraining run (with a checkpoint, a resume and
    /// validation grids), then samples from and an evaluation of the shipped main network.
    Demo(DemoArgs),
}

#[derive(Args)]
struct PretrainArgs {
    /// TOML config file; any key not given keeps its default (see --print-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.steps=500 --set model.objective.prediction=v_prediction`.
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
    /// Continue a run: `latest` (newest checkpoint in the output folder) or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Clone)]
struct SamplerArgs {
    /// ddim, ddpm (DDPM objectives) or euler (flow matching). Default: ddim, or euler for flow models.
    #[arg(long)]
    sampler: Option<SamplerKind>,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    sampling_steps: usize,
    /// DDIM η (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplerArgs {
    fn config(&self, net: &MainNetwork) -> SamplerConfig {
        let default_kind = match net.objective {
            lisa::diffusion::Objective::Flow => SamplerKind::Euler,
            _ => SamplerKind::Ddim,
        };
        SamplerConfig { kind: self.sampler.unwrap_or(default_kind), steps: self.sampling_steps, eta: self.eta, clip_sample: true }
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
    /// Also write the report as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    sampler: SamplerArgs,
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
struct DemoArgs {
    /// Folder for everything the demo writes.
    #[arg(long, default_value = "runs/demo")]
    output_dir: PathBuf,
    /// Steps of the short pretraining run (it is interrupted at half and resumed).
    #[arg(long, default_value_t = 100)]
    steps: u64,
    /// Images for the evaluation of the shipped model.
    #[arg(long, default_value_t = 500)]
    num_images: i64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pretrain(a) => run_pretrain(a),
        Command::Sample(a) => run_sample(a),
        Command::Eval(a) => run_eval(a),
        Command::Export(a) => run_export(a),
        Command::Demo(a) => run_demo(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, outermost first.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run_pretrain(a: PretrainArgs) -> Result<()> {
    let mut overrides = a.overrides.clone();
    if let Some(d) = &a.output_dir {
        overrides.push(format!("output_dir={:?}", d.display().to_string()));
    }
    if let Some(s) = a.steps {
        overrides.push(format!("train.steps={s}"));
    }
    if let Some(t) = a.threads {
        overrides.push(format!("threads={t}"));
    }
    let cfg: PretrainConfig = lisa::config::load(a.config.as_deref(), &overrides)?;
    if a.print_config {
        print!("{}", lisa::config::to_toml(&cfg)?);
        return Ok(());
    }
    let summary = pretrain(&cfg, a.resume.as_deref(), a.quiet)?;
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

/// The main network shipped with the repository.
fn shipped_model() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/main-network"))
}

fn load_model(dir: &std::path::Path) -> Result<MainNetwork> {
    MainNetwork::load(dir, Device::Cpu).with_context(|| format!("loading the model in {}", dir.display()))
}

fn run_sample(a: SampleArgs) -> Result<()> {
    let net = load_model(&a.model.clone().unwrap_or_else(shipped_model))?;
    let k = net.config.label_encoder.num_classes;
    let labels: Vec<i64> = if a.labels.is_empty() { (0..k).collect() } else { a.labels.clone() };
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l > k) {
        anyhow::bail!("label {bad} is out of range: the model knows labels 0..{} ({k} = unconditional)", k - 1);
    }
    if a.per_label < 1 {
        anyhow::bail!("--per-label must be ≥ 1");
    }
    // Column-major grid: one column per label.
    let ys: Vec<i64> = (0..a.per_label).flat_map(|_| labels.iter().copied()).collect();
    let y = Tensor::from_slice(&ys);
    let images = net.sample(&y, &a.sampler.config(&net), a.sampler.seed)?;
    lisa::eval::grid::save_grid_scaled(&images, labels.len(), 2, 2, &a.out)?;
    println!("wrote {} ({} samples)", a.out.display(), ys.len());
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let net = load_model(&a.model.clone().unwrap_or_else(shipped_model))?;
    let data = DataConfig { source: a.data_source.clone(), ..DataConfig::default() };
    let report = evaluate(&net, &data, a.num_images, &a.sampler.config(&net), a.sampler.seed)?;
    println!("{}", report.table());
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn run_export(a: ExportArgs) -> Result<()> {
    let net = load_model(&a.checkpoint)?;
    net.save(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {} ({} parameters)", a.out.display(), lisa::models::parameter_count(&net.vs));
    Ok(())
}

fn run_demo(a: DemoArgs) -> Result<()> {
    let out = &a.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    println!("== 1/3: pretraining a small main network on the embedded Fashion-MNIST subset ({} steps)", a.steps);
    let half = (a.steps / 2).max(1);
    let mut cfg = PretrainConfig {
        output_dir: out.join("pretrain"),
        ..PretrainConfig::default()
    };
    cfg.data.source = "embedded".into();
    cfg.train.steps = half;
    cfg.train.batch_size = 32;
    cfg.train.checkpointing_steps = half;
    cfg.train.lr_warmup_steps = 20;
    cfg.train.ema_decay = 0.99;
    cfg.validation.num_images = 20;
    let first = pretrain(&cfg, None, false)?;
    println!("   stopped at step {} (loss {:.4}); resuming from the checkpoint", first.steps, first.final_loss);
    cfg.train.steps = a.steps;
    let done = pretrain(&cfg, Some("latest"), false)?;
    println!(
        "   finished at step {} (loss {:.4}, {:.3} s/step); metrics in {}, grids in {}",
        done.steps,
        done.final_loss,
        done.seconds_per_step,
        cfg.output_dir.join("metrics.csv").display(),
        cfg.output_dir.join("samples").display()
    );

    println!("== 2/3: samples from the shipped main network");
    let net = load_model(&shipped_model())?;
    let sampler = SamplerConfig { steps: 25, ..SamplerConfig::default() };
    let y = Tensor::arange(80, (Kind::Int64, Device::Cpu)).remainder(10);
    let images = net.sample(&y, &sampler, 0)?;
    let grid = out.join("shipped-samples.png");
    lisa::eval::grid::save_grid_scaled(&images, 10, 2, 2, &grid)?;
    println!("   wrote {} (one column per class)", grid.display());

    println!("== 3/3: evaluating the shipped main network");
    let report = evaluate(&net, &DataConfig::default(), a.num_images, &sampler, 0)?;
    println!("{}", report.table());
    std::fs::write(out.join("eval.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
