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
//! `lisa bench` run) and compares every golden tensor. It also continues that step to a 6-step
//! trajectory (`trajectory_epsilon.safetensors`) and runs the initial state under v-prediction and
//! rectified flow (`step_v_prediction`, `step_flow`). No Python is needed here.
//!
//! Tolerance: a tensor matches when `max |ours − ref| ≤ 1e-5 · (1 + max |ref|)` (`TOL` below), and,
//! because that bound is loose for small-magnitude tensors (gradients), also
//! `max |ours − ref| ≤ 1e-4 · max |ref|` for every tensor whose scale is below 1. The
//! table printed by the test (`cargo test --test parity -- --nocapture`) gives both deviations per
//! tensor; a mismatch prints its first differing elements (index, ours, reference, abs/rel diff).
//!
//! One input is deliberately not compared at the network level: `x_t` is formed by diffusers'
//! `DDPMScheduler.add_noise` from a float32 ᾱ table, ours from a float64 one (see
//! `x_t_schedule_difference_is_float32_rounding` below); the network step runs on the golden `x_t`
//! so that its comparison is not polluted by the schedule's rounding.
mod common;
use common::golden::{Report, Tolerance};
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

/// `max |ours − ref| ≤ 1e-5 · (1 + max |ref|)`, and for tensors with `max |ref| < 1` also `≤ 1e-4 · max |ref|`.
const TOL: Tolerance = Tolerance { abs: 1e-5, rel_below_one: Some(1e-4) };

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
    let mut rep = Report::new(TOL);

    // Inputs as the objective forms them (x_t: see x_t_schedule_difference_is_float32_rounding).
    rep.compare_in("target", "target", &sample.target, &step["target"]);
    assert!(sample.model_t.equal(&step["timesteps"].to_kind(Kind::Float)), "network timesteps differ");

    // Forward: the side network's hooked feature and mid residual, then the step's predictions.
    tch::no_grad(|| {
        let encoder_hidden_states = main.label_encoder.forward(labels).unwrap();
        let out = side.residuals(&sample.x_t, &sample.model_t, &encoder_hidden_states, condition, 1.0, Some(head.hook), None).unwrap();
        rep.compare_in("forward", "hooked (mid-block output of the side network)", out.hooked.as_ref().unwrap(), &step["hooked"]);
        let lisa::pipeline::Residuals::UNet { mid, .. } = &out.residuals else { panic!("a UNet side network") };
        rep.compare_in("forward", "mid_residual (controlnet_mid_block output)", mid, &step["mid_residual"]);
    });
    let task = ControlTask::new(main, side, Some(head)).unwrap();
    let f = tch::no_grad(|| task.forward(&sample.x_t, &sample.model_t, labels, condition)).unwrap();
    rep.compare_in("forward", "pred_full", &f.pred_full, &step["pred_full"]);
    let pred_main = f.pred_main.as_ref().unwrap();
    rep.compare_in("forward", "pred_main (full second pass)", pred_main, &step["pred_main"]);
    rep.compare_in("forward", "r = target - pred_main", &likelihood_residual(&sample.target, pred_main), &step["r"]);
    rep.compare_in("forward", "decoded = D(h_mid, t)", f.decoded.as_ref().unwrap(), &step["decoded"]);
    // Our default shared-encoder reference pass must give the same pred_main.
    let shared = build(&cfg, ReferencePass::SharedEncoder);
    let shared_task = ControlTask::new(&shared.main, &shared.side, Some(&shared.head)).unwrap();
    let fs = tch::no_grad(|| shared_task.forward(&sample.x_t, &sample.model_t, labels, condition)).unwrap();
    rep.compare_in("forward", "pred_main (shared-encoder pass)", fs.pred_main.as_ref().unwrap(), &step["pred_main"]);

    // Loss and backward through our training step.
    let batch = Batch {
        x0: step["x0"].shallow_clone(),
        labels: labels.shallow_clone(),
        condition: Some(condition.shallow_clone()),
        rows: None,
    };
    let loss = task.loss(&batch, &sample).unwrap();
    let metric = |name: &str| loss.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| v.shallow_clone()).unwrap();
    rep.compare_in("loss", "l_main", &metric("l_main"), &step["l_main"]);
    rep.compare_in("loss", "l_lisa", &metric("l_lisa"), &step["l_lisa"]);
    rep.compare_in("loss", "loss = l_main + lambda * l_lisa", &loss.loss, &step["loss"]);
    loss.loss.backward();

    let mut params = side.named_parameters();
    params.extend(head.named_parameters());
    let by_name: HashMap<String, Tensor> = params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let named: Vec<String> = serde_json::from_value(cfg["named_parameters"].clone()).unwrap();
    for n in &named {
        let p = by_name.get(n).unwrap_or_else(|| panic!("no trainable parameter {n}"));
        rep.compare_in("grad", &format!("grad {n}"), &p.grad(), &step[&format!("grad.{n}")]);
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
    rep.compare_in("grad", "global grad norm (before clipping)", &Tensor::from(grads.grad_norm() as f32), &step["grad_norm"]);
    for n in &named {
        rep.compare_in("grad", &format!("clipped grad {n}"), &by_name[n].grad(), &step[&format!("clipped_grad.{n}")]);
    }
    let r = lisa::train::step::apply(grads, &mut opt, f64_of("lr"), None);
    assert_eq!(r.outcome, StepOutcome::Applied);
    for n in &named {
        rep.compare_in("after_step", &format!("after AdamW {n}"), &by_name[n], &step[&format!("after_step.{n}")]);
    }
    rep.finish();
}

/// The single step continued for the golden trajectory's length (`trajectory_epsilon.safetensors`): every step on
/// its own golden inputs, through the training step (loss, backward, clip, AdamW) with the optimizer's moments and
/// bias correction carried across steps; per step the losses and the gradient norm, at the end the parameters.
#[test]
fn a_multi_step_trajectory_matches_the_pytorch_diffusers_reference() {
    let cfg = config();
    let (first, traj) = (read("step_epsilon.safetensors"), read("trajectory_epsilon.safetensors"));
    let steps = cfg["trajectory_steps"].as_u64().expect("config.json: trajectory_steps") as usize;
    let nets = build(&cfg, ReferencePass::Full);
    let Nets { main, side, head } = &nets;
    let task = ControlTask::new(main, side, Some(head)).unwrap();
    let mut params = side.named_parameters();
    params.extend(head.named_parameters());
    let by_name: HashMap<String, Tensor> = params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let o = &cfg["optimizer"];
    let f64_of = |k: &str| o[k].as_f64().unwrap();
    let mut opt = AdamW::new(
        params,
        AdamWConfig { beta1: f64_of("beta1"), beta2: f64_of("beta2"), eps: f64_of("eps"), weight_decay: f64_of("weight_decay") },
    );
    let settings = StepSettings { max_grad_norm: f64_of("max_grad_norm"), mixed_precision: MixedPrecision::No };
    let mut rep = Report::new(TOL);
    for k in 0..steps {
        let input = |name: &str| match k {
            0 => first[name].shallow_clone(),
            _ => traj[&format!("{k}.{name}")].shallow_clone(),
        };
        let golden = |name: &str| match k {
            0 => first[name].shallow_clone(),
            _ => traj[&format!("{k}.{name}")].shallow_clone(),
        };
        let batch = Batch { x0: input("x0"), labels: input("labels"), condition: Some(input("condition")), rows: None };
        let ours = main.objective.training_sample(&batch.x0, &input("noise"), &input("timesteps")).unwrap();
        // x_t as the reference formed it (see x_t_schedule_difference_is_float32_rounding).
        let given = [TrainingSample { x_t: input("x_t"), ..ours }];
        opt.zero_grad();
        let grads = lisa::train::step::backward(
            &task,
            &opt,
            &main.objective,
            std::slice::from_ref(&batch),
            Noise::Given(&given),
            settings,
            None,
        )
        .unwrap();
        let r = lisa::train::step::apply(grads, &mut opt, f64_of("lr"), None);
        assert_eq!(r.outcome, StepOutcome::Applied);
        let metric = |n: &str| r.metrics.iter().find(|(m, _)| m == n).map(|(_, v)| *v).unwrap();
        let group = format!("step {}", k + 1);
        for (name, ours) in [("l_main", metric("l_main")), ("l_lisa", metric("l_lisa")), ("loss", r.loss), ("grad_norm", r.grad_norm)] {
            rep.compare_in(&group, &format!("step {}: {name}", k + 1), &Tensor::from(ours), &golden(name));
        }
    }
    let named: Vec<String> = serde_json::from_value(cfg["named_parameters"].clone()).unwrap();
    for n in &named {
        rep.compare_in("final", &format!("after {steps} steps: {n}"), &by_name[n], &traj[&format!("final.{n}")]);
    }
    rep.finish();
}

/// The same initial state and inputs under v-prediction and rectified flow (`step_v_prediction.safetensors`,
/// `step_flow.safetensors`): the noised input and target as our objective forms them, the predictions, LISA's
/// residual and decoder, the losses and the gradients.
#[test]
fn v_prediction_and_flow_steps_match_the_pytorch_diffusers_reference() {
    for (file, kind, prediction) in
        [("step_v_prediction.safetensors", "ddpm", "v_prediction"), ("step_flow.safetensors", "flow", "epsilon")]
    {
        let mut cfg = config();
        cfg["main"]["objective"]["kind"] = kind.into();
        cfg["main"]["objective"]["prediction"] = prediction.into();
        let g = read(file);
        let nets = build(&cfg, ReferencePass::Full);
        let Nets { main, side, head } = &nets;
        let flow = kind == "flow";
        let label = if flow { "flow" } else { prediction };
        // Raw times as our objective takes them: DDPM timesteps, or flow's unit times.
        let t = if flow { g["unit_t"].shallow_clone() } else { g["timesteps"].shallow_clone() };
        let ours = main.objective.training_sample(&g["x0"], &g["noise"], &t).unwrap();
        let mut rep = Report::new(TOL);
        rep.compare_in(label, &format!("{label}: x_t"), &ours.x_t, &g["x_t"]);
        rep.compare_in(label, &format!("{label}: target"), &ours.target, &g["target"]);
        rep.compare_in(label, &format!("{label}: network timesteps"), &ours.model_t, &g["timesteps"]);
        // DDPM's x_t as the reference formed it (see x_t_schedule_difference_is_float32_rounding).
        let sample = if flow { ours } else { TrainingSample { x_t: g["x_t"].shallow_clone(), ..ours } };
        let (labels, condition) = (&g["labels"], &g["condition"]);
        let task = ControlTask::new(main, side, Some(head)).unwrap();
        let f = tch::no_grad(|| task.forward(&sample.x_t, &sample.model_t, labels, condition)).unwrap();
        let pred_main = f.pred_main.as_ref().unwrap();
        for (name, ours, reference) in [
            ("pred_full", &f.pred_full, &g["pred_full"]),
            ("pred_main", pred_main, &g["pred_main"]),
            ("r = target - pred_main", &likelihood_residual(&sample.target, pred_main), &g["r"]),
            ("decoded", f.decoded.as_ref().unwrap(), &g["decoded"]),
        ] {
            rep.compare_in(label, &format!("{label}: {name}"), ours, reference);
        }
        let batch = Batch { x0: g["x0"].shallow_clone(), labels: labels.shallow_clone(), condition: Some(condition.shallow_clone()), rows: None };
        let loss = task.loss(&batch, &sample).unwrap();
        let metric = |name: &str| loss.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| v.shallow_clone()).unwrap();
        rep.compare_in(label, &format!("{label}: l_main"), &metric("l_main"), &g["l_main"]);
        rep.compare_in(label, &format!("{label}: l_lisa"), &metric("l_lisa"), &g["l_lisa"]);
        rep.compare_in(label, &format!("{label}: loss"), &loss.loss, &g["loss"]);
        loss.loss.backward();
        let mut params = side.named_parameters();
        params.extend(head.named_parameters());
        let by_name: HashMap<String, Tensor> = params.into_iter().collect();
        let named: Vec<String> = serde_json::from_value(cfg["named_parameters"].clone()).unwrap();
        for n in &named {
            rep.compare_in(label, &format!("{label}: grad {n}"), &by_name[n].grad(), &g[&format!("grad.{n}")]);
        }
        rep.finish();
    }
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
    let mut rep = Report::new(TOL);
    rep.compare_in("x_t", "x_t (ours: f64 schedule; ref: DDPMScheduler.add_noise, f32 schedule)", &ours.x_t, &step["x_t"]);
    rep.finish();
}

#[test]
fn golden_files_are_present_and_small() {
    let dir = golden_dir();
    let mut total = 0;
    let files =
        ["config.json", "main.safetensors", "side.safetensors", "decoder.safetensors", "step_epsilon.safetensors"];
    let more = ["trajectory_epsilon.safetensors", "step_v_prediction.safetensors", "step_flow.safetensors"];
    for f in files.into_iter().chain(more) {
        let p: &Path = &dir.join(f);
        total += std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).len();
    }
    assert!(total < 800_000, "golden tensors take {total} bytes; keep them small");
}

#[test]
fn the_golden_comparator_fails_beyond_its_bound_and_names_the_first_differing_element() {
    let reference = Tensor::from_slice(&[0.5f32, -0.25, 0.125, 0.0]).reshape([2, 2]);
    let mut rep = Report::new(TOL);
    rep.compare_in("forward", "within the bound", &(&reference + 1e-6), &reference);
    rep.finish();
    let mut rep = Report::new(TOL);
    let ours = reference.copy();
    let _ = ours.get(1).get(0).fill_(0.126);
    rep.compare_in("forward", "one element off", &ours, &reference);
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rep.finish())).unwrap_err();
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("1 tensor(s) differ") && msg.contains("at [1, 0]"), "{msg}");
}
