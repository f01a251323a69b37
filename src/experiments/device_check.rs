//! `lisa device-check`: is the accelerator seen, and does side-network training on it agree with the
//! CPU? The same short LISA run (same seed, data order, noise and initialisation: noise is drawn on the
//! host, see [`crate::rng::randn_on_host`]) is trained on the CPU in f32 and on the device in f32,
//! bf16 and fp16; the per-step losses are compared with tolerances and the step times reported.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

use super::arm::train_control;
use super::protocol::{load_main, prepare_data};
use super::control_config::ControlConfig;
use crate::eval::curves::read_curve;
use super::pretrain::device_from;
use crate::models::MixedPrecision;
use crate::{Error, Result};

/// f32 on the device against f32 on the CPU: per-step loss, relative. cuDNN's default TF32
/// convolutions on Ampere and later round inputs to 10-bit mantissas, so not 1e-6.
pub const F32_LOSS_TOLERANCE: f64 = 2e-2;
/// bf16/fp16 on the device against f32 on the device: per-step loss, relative.
pub const MIXED_LOSS_TOLERANCE: f64 = 5e-2;

/// One training run of the check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRun {
    /// `cpu f32`, `cuda:0 bf16`, ...
    pub label: String,
    /// The device's name as in the config (`cpu`, `cuda:0`).
    pub device: String,
    /// The compute precision.
    pub precision: MixedPrecision,
    /// The training loss at every step.
    pub losses: Vec<f64>,
    /// Mean wall time of a training step, seconds (the first steps include the device's warm-up).
    pub step_seconds: f64,
    /// Control fidelity of the finished side network.
    pub final_fidelity: f64,
}

/// One comparison and whether it held.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceComparison {
    /// What was compared.
    pub name: String,
    /// The largest per-step relative loss deviation seen.
    pub max_relative_deviation: f64,
    /// The tolerance.
    pub tolerance: f64,
    /// `max_relative_deviation <= tolerance`.
    pub passed: bool,
}

/// What `lisa device-check` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceCheckReport {
    /// libtorch sees a CUDA device.
    pub cuda_available: bool,
    /// CUDA devices seen.
    pub cuda_devices: i64,
    /// cuDNN is usable.
    pub cudnn_available: bool,
    /// The device checked.
    pub device: String,
    /// The runs, CPU f32 first.
    pub runs: Vec<DeviceRun>,
    /// Each device run's losses against its reference.
    pub comparisons: Vec<DeviceComparison>,
}

impl DeviceCheckReport {
    /// Every comparison held.
    pub fn passed(&self) -> bool {
        self.comparisons.iter().all(|c| c.passed)
    }

    /// A plain-text summary.
    pub fn table(&self) -> String {
        let mut s = format!(
            "CUDA available: {} ({} device(s)), cuDNN: {}; checked device: {}\n\n",
            self.cuda_available, self.cuda_devices, self.cudnn_available, self.device
        );
        s += "| run | s/step | first loss | last loss | final fidelity |\n|---|---|---|---|---|\n";
        for r in &self.runs {
            s += &format!(
                "| {} | {:.4} | {:.5} | {:.5} | {:.4} |\n",
                r.label,
                r.step_seconds,
                r.losses.first().copied().unwrap_or(f64::NAN),
                r.losses.last().copied().unwrap_or(f64::NAN),
                r.final_fidelity
            );
        }
        s += "\n| comparison | max relative loss deviation | tolerance | verdict |\n|---|---|---|---|\n";
        for c in &self.comparisons {
            s += &format!(
                "| {} | {:.2e} | {:.0e} | {} |\n",
                c.name,
                c.max_relative_deviation,
                c.tolerance,
                if c.passed { "ok" } else { "FAILED" }
            );
        }
        s
    }
}

/// Largest per-step relative deviation of `a` from `reference` (infinite when they differ in length or
/// either is non-finite).
pub fn max_relative_deviation(a: &[f64], reference: &[f64]) -> f64 {
    if a.len() != reference.len() || a.is_empty() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(reference)
        .map(|(x, r)| {
            let d = (x - r).abs() / r.abs().max(1e-12);
            if d.is_finite() {
                d
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// Runs the check: `cfg` is the run to repeat (its `device` is the device checked; `auto` means CUDA,
/// and no CUDA device is an error); each run writes into `cfg.output_dir/<label>/`. `precisions` are
/// the device's runs (f32 is always first).
pub fn device_check(cfg: &ControlConfig, precisions: &[MixedPrecision], quiet: bool) -> Result<DeviceCheckReport> {
    let device = match cfg.device.as_str() {
        "auto" => "cuda".to_string(),
        d => d.to_string(),
    };
    let resolved = device_from(&device)?;
    if device.starts_with("cuda") && !matches!(resolved, Device::Cuda(_)) {
        return Err(Error::Config(format!("device-check: '{device}' is not available")));
    }
    let data = prepare_data(cfg)?;
    let mut runs: Vec<DeviceRun> = Vec::new();
    let mut plan = vec![("cpu".to_string(), MixedPrecision::No)];
    plan.push((device.clone(), MixedPrecision::No));
    plan.extend(precisions.iter().filter(|p| **p != MixedPrecision::No).map(|p| (device.clone(), *p)));
    for (dev, precision) in plan {
        let label = match precision {
            MixedPrecision::No => format!("{dev} f32"),
            p => format!("{dev} {p}"),
        };
        let dir = cfg.output_dir.join(label.replace([' ', ':'], "-"));
        let run_cfg = ControlConfig {
            device: dev.clone(),
            output_dir: dir.clone(),
            train: crate::train::trainer::TrainConfig { mixed_precision: precision, log_every: 1, ..cfg.train.clone() },
            ..cfg.clone()
        };
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        eprintln!("device-check: training {label}");
        let main = load_main(&run_cfg)?;
        let summary = train_control(&run_cfg, &main, &data, None, quiet)?;
        runs.push(DeviceRun {
            label,
            device: dev,
            precision,
            losses: losses(&dir)?,
            step_seconds: summary.step_seconds,
            final_fidelity: summary.final_fidelity,
        });
    }
    let compare = |name: String, a: &DeviceRun, r: &DeviceRun, tolerance: f64| {
        let d = max_relative_deviation(&a.losses, &r.losses);
        DeviceComparison { name, max_relative_deviation: d, tolerance, passed: d <= tolerance }
    };
    let mut comparisons =
        vec![compare(format!("{} vs {}", runs[1].label, runs[0].label), &runs[1], &runs[0], F32_LOSS_TOLERANCE)];
    for r in &runs[2..] {
        comparisons.push(compare(format!("{} vs {}", r.label, runs[1].label), r, &runs[1], MIXED_LOSS_TOLERANCE));
    }
    let report = DeviceCheckReport {
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        device,
        runs,
        comparisons,
    };
    let path = cfg.output_dir.join("device-check.json");
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(report)
}

/// The per-step training losses of a run folder (`metrics.csv` logged every step).
fn losses(dir: &Path) -> Result<Vec<f64>> {
    Ok(read_curve(&dir.join("metrics.csv"), "loss")?.into_iter().map(|(_, l)| l).collect())
}

/// The check's run, as overrides of `lisa train`'s defaults (a config file and `--set` go on top):
/// 20 steps, fidelity at the first and last step on 16 images, a 64-image final evaluation.
pub const DEFAULT_OVERRIDES: [&str; 7] = [
    "output_dir=\"runs/device-check\"",
    "train.steps=20",
    "train.checkpointing_steps=0",
    "fidelity.every_steps=1000000",
    "fidelity.num_images=16",
    "final_eval.num_images=64",
    "final_eval.chunk=64",
];

/// `lisa train`'s defaults with [`DEFAULT_OVERRIDES`], writing into `output_dir`.
pub fn default_config(output_dir: PathBuf) -> Result<ControlConfig> {
    let overrides: Vec<String> = DEFAULT_OVERRIDES.iter().map(|s| s.to_string()).collect();
    let cfg: ControlConfig = crate::config::load(None, &overrides)?;
    Ok(ControlConfig { output_dir, ..cfg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_deviation_is_the_worst_step_and_refuses_mismatched_runs() {
        assert_eq!(max_relative_deviation(&[1.0, 2.2], &[1.0, 2.0]), 0.10000000000000009);
        assert_eq!(max_relative_deviation(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(max_relative_deviation(&[f64::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(max_relative_deviation(&[], &[]), f64::INFINITY);
    }
}
