//! Parity with the authors' LISA training step in PyTorch + diffusers (llm.c style).
//!
//! `bench/reference.py --dump-golden tests/golden` builds diffusers' `UNet2DConditionModel` and
//! `ControlNetModel.from_unet` at a tiny configuration (tests/golden/config.json), the authors'
//! LightweightDecoder, our label encoder; runs one LISA step (full second forward for `pred_main`,
//! as the authors) and one AdamW step with gradient-norm clipping; and writes the initial weights
//! (under our names), the inputs, every intermediate, the losses, named gradients, the gradient
//! norm and the parameters after the step. This test builds OUR networks from the same config
//! through the crate's API (`MainNetwork`, `SideNetwork::from_main`, `LisaHead`), copies the golden
//! weights in by name, runs OUR forward (`ControlTask::forward`, `ControlTask::loss`) and then the
//! training step itself (`lisa::train::step`: backward, clip, AdamW — what the training loop and
//! `lisa bench` run) and compares every golden tensor. No Python is needed here.
//!
//! Tolerance: a tensor matches when `max |ours − ref| ≤ 1e-5 · (1 + max |ref|)` (TOL below), and,
//! because that bound is loose for small-magnitude tensors (gradients), also
//! `max |ours − ref| ≤ 1e-4 · max |ref|` (REL_TOL) for every tensor whose scale is below 1. The
//! table printed by the test (`cargo test --test parity -- --nocapture`) gives both deviations per
//! tensor; a mismatch prints its first differing elements (index, ours, reference, abs/rel diff).
//!
//! One input is deliberately not compared at the network level: `x_t` is formed by diffusers'
//! `DDPMScheduler.add_noise` from a float32 ᾱ table, ours from a float64 one (see
//! `x_t_schedule_difference_is_float32_rounding` below); the network step runs on the golden `x_t`
//! so that its comparison is not polluted by the schedule's rounding.
mod common;
use common::unravel;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lisa::control::{likelihood_residual, ControlTask, LisaConfig, LisaHead, ReferencePass, SideNetwork};
use lisa::data::ConditionKind;
use lisa::diffusion::TrainingSample;
use lisa::models::ControlNetConfig;
use lisa::pipeline::{MainNetwork, MainNetworkConfig};
use lisa::models::precision::MixedPrecision;
use lisa::train::optim::{AdamW, AdamWConfig};
use lisa::train::step::{Noise, StepOutcome, StepSettings};
use lisa::train::step::{Batch, TrainTask};
use tch::{Device, Kind, Tensor};

/// `max |ours − ref| ≤ TOL · (1 + max |ref|)`.
const TOL: f64 = 1e-5;
/// For tensors with `max |ref| < 1`: also `max |ours − ref| ≤ REL_TOL · max |ref|`.
const REL_TOL: f64 = 1e-4;
/// Mismatching elements printed per tensor.
const SHOW: usize = 5;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("golden")
}

fn read(name: &str) -> HashMap<String, Tensor> {
    let path = golden_dir().join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e} (regenerate with bench/reference.py --dump-golden)", path.display()))
        .into_iter()
        .collect()
}

fn config() -> serde_json::Value {
    let path = golden_dir().join("config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Copies the golden weights into `params` by name (under no-grad), after checking that both name
/// sets and all shapes agree; every disagreement is listed.
fn load(what: &str, params: &[(String, Tensor)], golden: &HashMap<String, Tensor>) {
    let ours: HashMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut problems = Vec::new();
    let mut only_ours: Vec<&str> = ours.keys().filter(|n| !golden.contains_key(**n)).copied().collect();
    let mut only_ref: Vec<&str> = golden.keys().filter(|n| !ours.contains_key(n.as_str())).map(String::as_str).collect();
    only_ours.sort_unstable();
    only_ref.sort_unstable();
    for n in &only_ours {
        problems.push(format!("  {n}: ours only"));
    }
    for n in &only_ref {
        problems.push(format!("  {n}: reference only"));
    }
    for (n, t) in &ours {
        if let Some(g) = golden.get(*n) {
            if g.size() != t.size() {
                problems.push(format!("  {n}: shape ours {:?}, reference {:?}", t.size(), g.size()));
            }
        }
    }
    assert!(problems.is_empty(), "{what}: parameter names/shapes differ from the reference:\n{}", problems.join("\n"));
    tch::no_grad(|| {
        for (n, t) in params {
            t.shallow_clone().copy_(&golden[n].to_kind(t.kind()));
        }
    });
}

/// Collects per-tensor comparisons and reports them as a table; failures are asserted at the end.
#[derive(Default)]
struct Report {
    rows: Vec<String>,
    failures: Vec<String>,
    /// (group, max abs diff, max abs diff / max|ref|) per tensor.
    stats: Vec<(String, f64, f64)>,
}

impl Report {
    fn compare(&mut self, group: &str, name: &str, ours: &Tensor, reference: &Tensor) {
        let (o, r) = (ours.detach().to_device(Device::Cpu).to_kind(Kind::Double), reference.to_kind(Kind::Double));
        if o.size() != r.size() {
            let msg = format!("{name}: shape ours {:?}, reference {:?}", o.size(), r.size());
            self.rows.push(format!("{name:<72} SHAPE MISMATCH"));
            self.failures.push(msg);
            return;
        }
        let diff = (&o - &r).abs();
        let max_abs = diff.max().double_value(&[]);
        let scale = r.abs().max().double_value(&[]);
        let bound = if scale < 1.0 { (TOL * (1.0 + scale)).min(REL_TOL * scale) } else { TOL * (1.0 + scale) };
        let rel = if scale > 0.0 { max_abs / scale } else { max_abs };
        let ok = max_abs <= bound && max_abs.is_finite();
        self.stats.push((group.to_string(), max_abs, rel));
        self.rows.push(format!(
            "{name:<72} {:>14} max|ref| {scale:<10.4e} max|diff| {max_abs:<10.3e} rel {rel:<10.3e} bound {bound:<9.2e} {}",
            format!("{:?}", o.size()),
            if ok { "ok" } else { "MISMATCH" }
        ));
        if ok {
            return;
        }
        let flat_o = o.flatten(0, -1);
        let flat_r = r.flatten(0, -1);
        let flat_d = diff.flatten(0, -1);
        let shape = o.size();
        let bad = flat_d.gt(bound).nonzero().flatten(0, -1);
        let n_bad = bad.size()[0];
        let mut msg = format!(
            "{name} {shape:?}: max|diff| {max_abs:.3e} > bound {bound:.3e} (max|ref| {scale:.4e}); {n_bad} of {} elements exceed it:",
            flat_o.size()[0]
        );
        for k in 0..(n_bad as usize).min(SHOW) {
            let i = bad.int64_value(&[k as i64]);
            let (a, b) = (flat_o.double_value(&[i]), flat_r.double_value(&[i]));
            let d = (a - b).abs();
            msg.push_str(&format!(
                "\n    at {:?}: ours {a:+.9e}  ref {b:+.9e}  abs {d:.3e}  rel {:.3e}",
                unravel(i, &shape),
                d / b.abs().max(f64::MIN_POSITIVE)
            ));
        }
        self.failures.push(msg);
    }

    fn finish(self) {
        println!("{}", self.rows.join("\n"));
        let mut groups: Vec<String> = self.stats.iter().map(|s| s.0.clone()).collect();
        groups.dedup();
        println!("\nmax deviation per group (abs, and abs / max|ref|):");
        for g in &groups {
            let (a, r) = self
                .stats
                .iter()
                .filter(|s| &s.0 == g)
                .fold((0f64, 0f64), |(a, r), s| (a.max(s.1), r.max(s.2)));
            println!("  {g:<12} abs {a:.3e}   rel {r:.3e}");
        }
        assert!(self.failures.is_empty(), "{} tensor(s) differ from the reference:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

struct Nets {
    main: MainNetwork,
    side: SideNetwork,
    head: LisaHead,
}

fn build(cfg: &serde_json::Value, reference_pass: ReferencePass) -> Nets {
    let main_cfg: MainNetworkConfig = serde_json::from_value(cfg["main"].clone()).unwrap();
    let mut main = MainNetwork::new(&main_cfg, Device::Cpu).unwrap();
    load("main network", &main.named_parameters(), &read("main.safetensors"));
    main.freeze();
    let cn = &cfg["controlnet"];
    let controlnet = ControlNetConfig {
        unet: main_cfg.unet.clone(),
        conditioning_channels: cn["conditioning_channels"].as_i64().unwrap(),
        conditioning_embedding_out_channels: serde_json::from_value(cn["conditioning_embedding_out_channels"].clone()).unwrap(),
        conditioning_downscale: cn["conditioning_downscale"].as_i64().unwrap(),
        cross_norm_scale: None,
    };
    let side = SideNetwork::from_main(&main, ConditionKind::Mask, controlnet).unwrap();
    load("side network", &side.named_parameters(), &read("side.safetensors"));
    let mut lisa: LisaConfig = serde_json::from_value(cfg["lisa"].clone()).unwrap();
    lisa.reference_pass = reference_pass;
    let head = LisaHead::new(&main, &side, &lisa).unwrap();
    load("LISA decoder", &head.named_parameters(), &read("decoder.safetensors"));
    Nets { main, side, head }
}

/// The golden step's training sample: our `model_t`/`unit_t`/`target` from the objective, the
/// reference's `x_t` (see the module doc).
fn golden_sample(nets: &Nets, step: &HashMap<String, Tensor>) -> TrainingSample {
    let ours = nets.main.objective.training_sample(&step["x0"], &step["noise"], &step["timesteps"]).unwrap();
    TrainingSample { x_t: step["x_t"].shallow_clone(), ..ours }
}

#[test]
fn lisa_step_matches_the_pytorch_diffusers_reference() {
    let cfg = config();
    let step = read("step_epsilon.safetensors");
    let nets = build(&cfg, ReferencePass::Full);
    let Nets { main, side, head } = &nets;
    let sample = golden_sample(&nets, &step);
    let (labels, condition) = (&step["labels"], &step["condition"]);
    let mut rep = Report::default();

    // Inputs as the objective forms them (x_t: see x_t_schedule_difference_is_float32_rounding).
    rep.compare("target", "target", &sample.target, &step["target"]);
    assert!(sample.model_t.equal(&step["timesteps"].to_kind(Kind::Float)), "network timesteps differ");

    // Forward: the side network's hooked feature and mid residual, then the step's predictions.
    tch::no_grad(|| {
        let encoder_hidden_states = main.label_encoder.forward(labels).unwrap();
        let out = side.residuals(&sample.x_t, &sample.model_t, &encoder_hidden_states, condition, 1.0, Some(head.hook), None).unwrap();
        rep.compare("forward", "hooked (mid-block output of the side network)", out.hooked.as_ref().unwrap(), &step["hooked"]);
        let lisa::pipeline::Residuals::UNet { mid, .. } = &out.residuals else { panic!("a UNet side network") };
        rep.compare("forward", "mid_residual (controlnet_mid_block output)", mid, &step["mid_residual"]);
    });
    let task = ControlTask::new(main, side, Some(head)).unwrap();
    let f = tch::no_grad(|| task.forward(&sample.x_t, &sample.model_t, labels, condition)).unwrap();
    rep.compare("forward", "pred_full", &f.pred_full, &step["pred_full"]);
    let pred_main = f.pred_main.as_ref().unwrap();
    rep.compare("forward", "pred_main (full second pass)", pred_main, &step["pred_main"]);
    rep.compare("forward", "r = target - pred_main", &likelihood_residual(&sample.target, pred_main), &step["r"]);
    rep.compare("forward", "decoded = D(h_mid, t)", f.decoded.as_ref().unwrap(), &step["decoded"]);
    // Our default shared-encoder reference pass must give the same pred_main.
    let shared = build(&cfg, ReferencePass::SharedEncoder);
    let shared_task = ControlTask::new(&shared.main, &shared.side, Some(&shared.head)).unwrap();
    let fs = tch::no_grad(|| shared_task.forward(&sample.x_t, &sample.model_t, labels, condition)).unwrap();
    rep.compare("forward", "pred_main (shared-encoder pass)", fs.pred_main.as_ref().unwrap(), &step["pred_main"]);

    // Loss and backward through our training step.
    let batch = Batch {
        x0: step["x0"].shallow_clone(),
        labels: labels.shallow_clone(),
        condition: Some(condition.shallow_clone()),
        rows: None,
    };
    let loss = task.loss(&batch, &sample).unwrap();
    let metric = |name: &str| loss.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| v.shallow_clone()).unwrap();
    rep.compare("loss", "l_main", &metric("l_main"), &step["l_main"]);
    rep.compare("loss", "l_lisa", &metric("l_lisa"), &step["l_lisa"]);
    rep.compare("loss", "loss = l_main + lambda * l_lisa", &loss.loss, &step["loss"]);
    loss.loss.backward();

    let mut params = side.named_parameters();
    params.extend(head.named_parameters());
    let by_name: HashMap<String, Tensor> = params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let named: Vec<String> = serde_json::from_value(cfg["named_parameters"].clone()).unwrap();
    for n in &named {
        let p = by_name.get(n).unwrap_or_else(|| panic!("no trainable parameter {n}"));
        rep.compare("grad", &format!("grad {n}"), &p.grad(), &step[&format!("grad.{n}")]);
    }
    let untouched: Vec<&String> = params.iter().filter(|(_, p)| !p.grad().defined()).map(|(n, _)| n).collect();
    assert!(untouched.is_empty(), "parameters without a gradient (the reference has one for each): {untouched:?}");

    // The whole update as training runs it (lisa::train::step: loss, backward, clip, AdamW), on the golden
    // sample: gradients from zero again, then the clipped gradients and the weights after AdamW.
    let o = &cfg["optimizer"];
    let f64_of = |k: &str| o[k].as_f64().unwrap();
    let mut opt = AdamW::new(
        params,
        AdamWConfig { beta1: f64_of("beta1"), beta2: f64_of("beta2"), eps: f64_of("eps"), weight_decay: f64_of("weight_decay") },
    );
    opt.zero_grad();
    let settings = StepSettings { max_grad_norm: f64_of("max_grad_norm"), mixed_precision: MixedPrecision::No };
    let given = [sample];
    let grads = lisa::train::step::backward(&task, &opt, &main.objective, std::slice::from_ref(&batch), Noise::Given(&given), settings, None)
        .unwrap();
    rep.compare("grad", "global grad norm (before clipping)", &Tensor::from(grads.grad_norm() as f32), &step["grad_norm"]);
    for n in &named {
        rep.compare("grad", &format!("clipped grad {n}"), &by_name[n].grad(), &step[&format!("clipped_grad.{n}")]);
    }
    let r = lisa::train::step::apply(grads, &mut opt, f64_of("lr"), None);
    assert_eq!(r.outcome, StepOutcome::Applied);
    for n in &named {
        rep.compare("after_step", &format!("after AdamW {n}"), &by_name[n], &step[&format!("after_step.{n}")]);
    }
    rep.finish();
}

/// diffusers' `DDPMScheduler` keeps ᾱ in float32 (`torch.cumprod` of float32 `1 − β`); ours is a
/// float64 product rounded once. `x_t` therefore differs by float32 rounding of ᾱ_t accumulated
/// over t steps, which this bounds (and prints) separately from the network's parity.
#[test]
fn x_t_schedule_difference_is_float32_rounding() {
    let cfg = config();
    let main_cfg: MainNetworkConfig = serde_json::from_value(cfg["main"].clone()).unwrap();
    let main = MainNetwork::new(&main_cfg, Device::Cpu).unwrap();
    let step = read("step_epsilon.safetensors");
    let ours = main.objective.training_sample(&step["x0"], &step["noise"], &step["timesteps"]).unwrap();
    let mut rep = Report::default();
    rep.compare("x_t", "x_t (ours: f64 schedule; ref: DDPMScheduler.add_noise, f32 schedule)", &ours.x_t, &step["x_t"]);
    rep.finish();
}

#[test]
fn golden_files_are_present_and_small() {
    let dir = golden_dir();
    let mut total = 0;
    for f in ["config.json", "main.safetensors", "side.safetensors", "decoder.safetensors", "step_epsilon.safetensors"] {
        let p: &Path = &dir.join(f);
        total += std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).len();
    }
    assert!(total < 600_000, "golden tensors take {total} bytes; keep them small");
}
