//! One arm: training one side network (baseline or LISA) against the frozen main network, with control
//! fidelity measured on the protocol's fixed held-out set every few steps, its final evaluation, and the
//! summary a finished arm reports.
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::control_config::{ControlConfig, LabelInput};
use super::protocol::{
    check_classifier_fits, check_data_fits, condition_channels, fidelity_sampler, final_classifier, save_triptych,
    uniform_noise, ControlData, FrechetFeatures,
};
use crate::control::{ControlTask, LisaHead, SideNetwork};
use crate::data::Dataset;
use crate::eval::curves::{mean_aucc, mean_column, read_curve};
use crate::eval::fidelity::{fidelity, higher_is_better, metric_name};
use crate::eval::frechet_distance;
use crate::eval::loss_gain::{HeldOutLoss, LossGain};
use crate::pipeline::MainNetwork;
use crate::train::log::{LogFormat, MetricsLog};
use crate::train::tensorboard::{self, ReportTo};
use crate::train::trainer::{self, RunDir, TrainConfig};
use crate::{Error, Result};

/// The first final-evaluation samples of an arm, kept for comparison grids.
pub const FINAL_SAMPLES: &str = "final-samples.safetensors";

/// What a finished arm reports (`summary.json` in its folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmSummary {
    /// `baseline` or `lisa`.
    pub arm: String,
    /// The run's seed.
    pub seed: u64,
    /// The condition.
    pub condition: String,
    /// Steps trained.
    pub steps: u64,
    /// Mean wall time of a training step (forward, backward, update; no evaluation), seconds.
    pub step_seconds: f64,
    /// The fidelity metric's name.
    pub metric: String,
    /// Whether larger fidelity values are better.
    pub higher_is_better: bool,
    /// `(step, fidelity)` on the held-out set during training.
    pub curve: Vec<(u64, f64)>,
    /// Mean fidelity over training: area under the curve divided by the steps covered (mAUCC).
    pub mean_aucc: f64,
    /// Fidelity of the final network on the final-evaluation set.
    pub final_fidelity: f64,
    /// The same samples scored against shuffled conditions: the level of a network that ignores them.
    pub final_fidelity_shuffled: f64,
    /// Fréchet distance of the final samples to the held-out images (classifier features): on the shipped
    /// Fashion-MNIST classifier for Fashion-MNIST, on `final_eval.classifier` when one is given; absent for an
    /// imagefolder without one (skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frechet: Option<f64>,
    /// With `final_eval.classifier`: the Fréchet distance of as many real training images to the held-out
    /// images (the floor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frechet_floor: Option<f64>,
    /// With `final_eval.classifier`: the Fréchet distance of as many images of uniform noise to the held-out
    /// images (the ceiling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frechet_ceiling: Option<f64>,
    /// With `final_eval.classifier`: that classifier folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frechet_classifier: Option<String>,
    /// Images in the final evaluation.
    pub final_eval_images: i64,
    /// Clips only: the final samples' mean temporal flicker (see [`crate::eval::video`]; 0 for real clips).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporal_flicker: Option<f64>,
    /// Imagefolders only: the held-out set that was sampled, scored and taken as the Fréchet reference
    /// (never the training images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<String>,
    /// Trainable parameters of the side network (what is saved).
    pub side_parameters: i64,
    /// Parameters of the LISA decoder (training only; 0 for the baseline).
    pub decoder_parameters: i64,
    /// `(step, held-out diffusion-loss gain)` during training (empty when it was not measured).
    #[serde(default)]
    pub loss_gain_curve: Vec<(u64, f64)>,
}

/// A finished edges run of 100 steps, for tests of the reports.
#[cfg(test)]
pub(crate) fn example_summary(seed: u64, final_fidelity: f64) -> ArmSummary {
    ArmSummary {
        arm: "x".into(),
        seed,
        condition: "edges".into(),
        steps: 100,
        step_seconds: 1.0,
        metric: "edge_f1".into(),
        higher_is_better: true,
        curve: vec![(0, 0.5), (50, 0.7), (100, 0.8)],
        mean_aucc: 0.0,
        final_fidelity,
        final_fidelity_shuffled: 0.4,
        frechet: Some(10.0),
        frechet_floor: None,
        frechet_ceiling: None,
        frechet_classifier: None,
        final_eval_images: 10,
        temporal_flicker: None,
        held_out: None,
        side_parameters: 1,
        decoder_parameters: 0,
        loss_gain_curve: vec![],
    }
}

/// Trains one arm as configured into `cfg.output_dir`: checkpoints, `metrics.csv`, `fidelity.csv`,
/// `samples/step-N.png` (condition | sample | ground truth), the final `side-network/` and `summary.json`.
pub fn train_control(
    cfg: &ControlConfig,
    main: &MainNetwork,
    data: &ControlData,
    resume: Option<&str>,
    quiet: bool,
) -> Result<ArmSummary> {
    cfg.validate()?;
    // The run records the settings its data used.
    let cfg = &ControlConfig { data: cfg.data.as_applied(), ..cfg.clone() };
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads);
    }
    check_data_fits(cfg, main)?;
    let known = main.config.label_encoder.num_classes;
    if cfg.label == LabelInput::Class && data.train.num_classes > known {
        return Err(Error::Config(format!(
            "the dataset has {} classes but the main network {} knows {known}; use a main network pretrained on \
             this data",
            data.train.num_classes,
            cfg.main_network_dir().display()
        )));
    }
    // A classifier that does not fit the data is refused before training, not after it.
    if let Some((_, info)) = final_classifier(cfg)? {
        check_classifier_fits(cfg, &info, &data.eval_images, Some(data.train.num_classes))?;
    }
    let set = cfg.condition_set()?;
    let kind = set.primary();
    let scored = cfg.scored_kind()?;
    let device = main.vs.device();
    let out = &cfg.output_dir;

    // The same seed gives both arms the same side-network initialisation (the decoder is built after it).
    tch::manual_seed(cfg.train.seed as i64);
    let controlnet = cfg.controlnet_config(&main.config.unet, condition_channels(cfg, &data.eval_conditions)?);
    let mut side = SideNetwork::for_main(main, set.clone(), controlnet, cfg.side_transformer_layers)?;
    side.set_gradient_checkpointing(cfg.train.gradient_checkpointing)?;
    main.set_gradient_checkpointing(cfg.train.gradient_checkpointing)?;
    let head = if cfg.lisa.enabled { Some(LisaHead::new(main, &side, &cfg.lisa)?) } else { None };
    let task = ControlTask::new(main, &side, head.as_ref())?.with_condition_dropout(cfg.condition_dropout)?;
    let mut params = side.named_parameters();
    if let Some(h) = &head {
        params.extend(h.named_parameters());
    }

    let train_data = Dataset {
        images: data.train.images.to_device(device),
        labels: cfg.main_labels(main, &data.train.labels)?.to_device(device),
        num_classes: data.train.num_classes,
        class_names: data.train.class_names.clone(),
        conditioning: data.train.conditioning.as_ref().map(|c| c.to_device(device)),
    };
    let eval_labels = cfg.main_labels(main, &data.eval_labels)?;
    let n_fid = cfg.fidelity.num_images.min(data.eval_images.size()[0]);
    let (fid_y, fid_c, fid_x) = (
        eval_labels.narrow(0, 0, n_fid),
        data.eval_conditions.narrow(0, 0, n_fid),
        data.eval_images.narrow(0, 0, n_fid),
    );
    // The trainer calls back after every step; `measure` decides what is due.
    let train_cfg = TrainConfig { validation_steps: 1, ..cfg.train.clone() };
    let run = RunDir {
        output_dir: out,
        resume,
        run_description: run_description(cfg),
        description_defaults: run_description(&ControlConfig::default()),
        quiet,
        files: side_run_files(cfg, &side)?,
    };
    // Everything the trainer would refuse is refused before the folder is touched.
    cfg.data.check_training_size(train_data.len(), train_cfg.batch_size)?;
    trainer::preflight(&train_data, &train_cfg, &run)?;
    let _lock = crate::train::lock::RunLock::acquire(out)?;
    let resume_step = match resume {
        Some(r) => {
            let dir = crate::train::checkpoint::resolve(out, r)?;
            let state = crate::train::checkpoint::read_state(&dir)?;
            state.get("step").and_then(|s| s.as_u64())
        }
        None => None,
    };
    // Built after the side network and decoder, whose initialisation follows the seed set above.
    let held_out_loss = if cfg.fidelity.loss_gain_every > 0 {
        let n = cfg.fidelity.loss_gain_images.min(data.eval_images.size()[0]);
        Some(HeldOutLoss::new(
            main,
            &main.objective,
            &data.eval_images.narrow(0, 0, n),
            &eval_labels.narrow(0, 0, n),
            &data.eval_conditions.narrow(0, 0, n),
            crate::rng::derive_seed(cfg.fidelity.seed, 1),
        )?)
    } else {
        None
    };
    // In a multi-process run rank 0 alone measures and writes; the trainer calls back only there.
    let main_process = crate::distributed::is_main_process();
    let mut fid_log = None;
    if main_process {
        let mut log = MetricsLog::open_file(out.join("fidelity.csv"), LogFormat::Csv, resume_step)?;
        if cfg.train.reports_to(ReportTo::Tensorboard) {
            log.mirror_to(tensorboard::open(out, resume_step)?, "fidelity");
        }
        fid_log = Some(log);
    }
    let samples_dir = out.join("samples");
    if main_process {
        std::fs::create_dir_all(&samples_dir).map_err(|e| Error::io(&samples_dir, e))?;
    }
    let metric = metric_name(scored);
    let last = cfg.train.steps;
    let mut measure = |step: u64| -> Result<()> {
        let sampled = cfg.fidelity.fidelity_due(step, last);
        let gain_due = held_out_loss.is_some() && cfg.fidelity.loss_gain_due(step, last);
        if !sampled && !gain_due {
            return Ok(());
        }
        let mut row = vec![(metric.to_string(), f64::NAN), ("eval_seconds".to_string(), f64::NAN)];
        if sampled {
            let t0 = std::time::Instant::now();
            let samples =
                side.sample_chunked(main, &fid_y, &fid_c, &fidelity_sampler(cfg, main), 1.0, cfg.fidelity.seed, 64)?;
            // With stacked conditions the curve scores the first; all are given.
            let score = fidelity(scored, &samples, &set.channels_of(&fid_c, kind)?)?;
            row = vec![(metric.to_string(), score.mean), ("eval_seconds".into(), t0.elapsed().as_secs_f64())];
            let k = n_fid.min(8);
            save_triptych(
                &fid_c.narrow(0, 0, k),
                &[samples.narrow(0, 0, k)],
                &fid_x.narrow(0, 0, k),
                &samples_dir.join(format!("step-{step}.png")),
            )?;
            tensorboard::mirror_image(out, step, "validation/samples", &samples_dir.join(format!("step-{step}.png")))?;
        }
        if let Some(h) = held_out_loss.as_ref() {
            if gain_due {
                let t0 = std::time::Instant::now();
                row.extend(h.gain(main, &side)?.columns());
                row.push(("loss_gain_seconds".into(), t0.elapsed().as_secs_f64()));
            } else {
                row.extend(LossGain::missing_columns());
                row.push(("loss_gain_seconds".into(), f64::NAN));
            }
        }
        match fid_log.as_mut() {
            Some(log) => {
                log.write(step, &row)?;
                log.flush()
            }
            None => Ok(()),
        }
    };
    if resume.is_none() && main_process {
        measure(0)?;
    }
    trainer::train(&task, params, &train_data, &main.objective, &train_cfg, &run, |step, _| measure(step))?;
    drop(fid_log);
    if !main_process {
        // The other ranks return rank 0's summary once it is written, so that callers go on alike.
        if let Some(g) = crate::distributed::current() {
            g.barrier()?;
        }
        let path = out.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        return serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()));
    }

    side.save(&out.join("side-network"))?;
    let curve = read_curve(&out.join("fidelity.csv"), metric)?;
    let step_seconds = mean_column(&out.join("metrics.csv"), "step_seconds")?;
    let summary = final_evaluation(cfg, main, &side, data, curve, step_seconds)?;
    let summary = ArmSummary {
        decoder_parameters: head.as_ref().map_or(0, |h| crate::models::parameter_count(&h.vs)),
        loss_gain_curve: if held_out_loss.is_some() {
            read_curve(&out.join("fidelity.csv"), "loss_gain")?
        } else {
            vec![]
        },
        ..summary
    };
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(out.join("summary.json"), text).map_err(|e| Error::io(out.join("summary.json"), e))?;
    if let Some(g) = crate::distributed::current() {
        g.barrier()?;
    }
    Ok(summary)
}

/// The files a side-network run keeps beside its checkpoints: its `config.toml`, and the side network's
/// `config.json`, so that the run folder doubles as a side-network folder for its checkpoints.
pub fn side_run_files<C: Serialize>(cfg: &C, side: &SideNetwork) -> Result<Vec<(String, Vec<u8>)>> {
    let side_cfg = serde_json::to_string_pretty(&side.config).map_err(|e| Error::Config(e.to_string()))?;
    Ok(vec![
        ("config.toml".into(), crate::config::to_toml(cfg)?.into_bytes()),
        (crate::pipeline::CONFIG_FILE.into(), side_cfg.into_bytes()),
    ])
}

/// What a resumed side-network run must share with the run that wrote its checkpoint.
fn run_description(cfg: &ControlConfig) -> serde_json::Value {
    serde_json::json!({
        "main_network": cfg.main_network_dir(), "condition": cfg.condition, "given_kind": cfg.given_kind,
        "condition_dropout": cfg.condition_dropout, "data": cfg.data,
        "conditioning_embedding_out_channels": cfg.conditioning_embedding_out_channels,
        "lisa": cfg.lisa, "train": cfg.train, "fidelity": cfg.fidelity, "label": cfg.label,
    })
}

/// Samples the final-evaluation set with the finished side network and scores it.
fn final_evaluation(
    cfg: &ControlConfig,
    main: &MainNetwork,
    side: &SideNetwork,
    data: &ControlData,
    curve: Vec<(u64, f64)>,
    step_seconds: f64,
) -> Result<ArmSummary> {
    let kind = side.condition.primary();
    let scored = cfg.scored_kind()?;
    let n = cfg.final_eval.num_images.min(data.eval_images.size()[0]);
    let y = cfg.main_labels(main, &data.eval_labels.narrow(0, 0, n))?;
    let (c, x) = (data.eval_conditions.narrow(0, 0, n), data.eval_images.narrow(0, 0, n));
    let samples =
        side.sample_chunked(main, &y, &c, &fidelity_sampler(cfg, main), 1.0, cfg.fidelity.seed, cfg.final_eval.chunk)?;
    let first = samples.narrow(0, 0, n.min(32)).contiguous();
    let path = cfg.output_dir.join(FINAL_SAMPLES);
    Tensor::write_safetensors(&[("samples", &first)], &path).map_err(|e| Error::format(&path, e.to_string()))?;
    let primary = side.condition.channels_of(&c, kind)?;
    let score = fidelity(scored, &samples, &primary)?;
    // Shift by one: every sample meets another image's condition.
    let shuffled = fidelity(scored, &samples, &primary.roll([1], [0]))?;
    let x = x.to_device(Device::Cpu);
    let (mut frechet_floor, mut frechet_ceiling) = (None, None);
    let frechet = match FrechetFeatures::load(cfg)? {
        Some(features) => {
            if let Some(info) = &features.own {
                check_classifier_fits(cfg, info, &x, Some(data.train.num_classes))?;
            }
            let reference = features.stats(cfg, &x)?;
            if features.own.is_some() {
                // The floor: as many training images (a fixed choice), the ceiling: uniform noise, against the
                // same held-out images.
                let mut idx: Vec<i64> = (0..data.train.len() as i64).collect();
                crate::rng::SplitMix64::new(crate::rng::derive_seed(cfg.fidelity.seed, 2)).shuffle(&mut idx);
                idx.truncate(n as usize);
                let train_x = data.train.images.f_index_select(0, &Tensor::from_slice(&idx))?.to_device(Device::Cpu);
                let noise = uniform_noise(&x.size(), crate::rng::derive_seed(cfg.fidelity.seed, 3))?;
                frechet_floor = Some(frechet_distance(&features.stats(cfg, &train_x)?, &reference)?);
                frechet_ceiling = Some(frechet_distance(&features.stats(cfg, &noise)?, &reference)?);
            }
            Some(frechet_distance(&features.stats(cfg, &samples)?, &reference)?)
        }
        None => None,
    };
    Ok(ArmSummary {
        arm: cfg.arm().into(),
        seed: cfg.train.seed,
        condition: cfg.condition.clone(),
        steps: curve.last().map_or(0, |p| p.0),
        step_seconds,
        metric: metric_name(scored).into(),
        higher_is_better: higher_is_better(scored),
        mean_aucc: mean_aucc(&curve),
        curve,
        final_fidelity: score.mean,
        final_fidelity_shuffled: shuffled.mean,
        frechet,
        frechet_floor,
        frechet_ceiling,
        frechet_classifier: (!cfg.final_eval.classifier.as_os_str().is_empty())
            .then(|| cfg.final_eval.classifier.display().to_string()),
        final_eval_images: n,
        temporal_flicker: match &cfg.data.video {
            Some(v) if samples.size()[1] > 1 => {
                let f = crate::eval::video::temporal_flicker(&samples, v.item_size)?;
                Some(f.iter().sum::<f64>() / f.len().max(1) as f64)
            }
            _ => None,
        },
        held_out: cfg.data.held_out_description(),
        side_parameters: crate::models::parameter_count(&side.vs),
        decoder_parameters: 0,
        loss_gain_curve: vec![],
    })
}

/// The summary of an arm that a resumed `compare` or `ablate` can reuse: finished (`summary.json` in
/// `arm.output_dir`, at `arm.train.steps`) and scored with the classifier now configured. An arm finished with
/// another classifier is not reused, so that its final evaluation runs again (from its last checkpoint) and
/// every arm's Fréchet distance comes from the same classifier; it says so on stderr.
pub fn finished_arm(arm: &ControlConfig) -> Option<ArmSummary> {
    let path = arm.output_dir.join("summary.json");
    let s: ArmSummary = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
    if s.steps != arm.train.steps {
        return None;
    }
    let configured =
        (!arm.final_eval.classifier.as_os_str().is_empty()).then(|| arm.final_eval.classifier.display().to_string());
    if s.frechet_classifier != configured {
        eprintln!(
            "{}: finished, but its Fréchet distance was measured with {}; its final evaluation runs again with {}",
            arm.output_dir.display(),
            s.frechet_classifier.as_deref().unwrap_or("the shipped classifier or none"),
            configured.as_deref().unwrap_or("the shipped classifier or none")
        );
        return None;
    }
    Some(s)
}
