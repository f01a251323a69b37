//! Tests of side-network training and LISA on tiny networks: exactness at initialisation, the
//! shared-encoder reference pass, where LISA's gradients go, the frozen main network, the
//! likelihood residual for every objective, and saving/loading.
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::*;
use crate::data::conditions::ConditionKind;
use crate::data::Dataset;
use crate::diffusion::objective::ObjectiveKind;
use crate::diffusion::{Objective, ObjectiveConfig, Prediction};
use crate::models::{ControlNetConfig, Hook, LabelEncoderConfig, UNetConfig};
use crate::pipeline::{MainNetwork, MainNetworkConfig};
use crate::train::step::{Batch, TaskLoss, TrainTask};
use crate::train::trainer::{self, RunDir, TrainConfig};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn tiny_main(objective: ObjectiveConfig) -> MainNetwork {
    let unet = UNetConfig::tiny();
    tch::manual_seed(7);
    let cfg = MainNetworkConfig {
        unet,
        label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 2 },
        objective,
        ..Default::default()
    };
    let mut main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
    main.freeze();
    main
}

fn eps() -> ObjectiveConfig {
    ObjectiveConfig::default()
}

fn side_for(main: &MainNetwork) -> SideNetwork {
    let cn = ControlNetConfig {
        conditioning_embedding_out_channels: vec![4, 8],
        ..ControlNetConfig::for_unet(&main.config.unet)
    };
    SideNetwork::from_main(main, ConditionKind::Edges, cn).unwrap()
}

fn head_for(main: &MainNetwork, hook: Hook, reference_pass: ReferencePass) -> LisaHead {
    let cfg = LisaConfig { hook, reference_pass, decoder_channel_floor: 8, ..LisaConfig::default() };
    LisaHead::new(main, &side_for(main), &cfg).unwrap()
}

/// Trains `side` and `head` for three steps (batch 4, lr 1e-2) on 8 random 8×8 single-channel images
/// with random conditions, logging every step into `dir`.
pub(super) fn train_three_steps(main: &MainNetwork, side: &SideNetwork, head: &LisaHead, dir: &std::path::Path) {
    let data = Dataset {
        images: Tensor::rand([8, 1, 8, 8], CPU) * 2.0 - 1.0,
        labels: Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]),
        num_classes: 3,
        class_names: vec!["a".into(), "b".into(), "c".into()],
        conditioning: Some(Tensor::rand([8, 1, 8, 8], CPU)),
    };
    let cfg = TrainConfig {
        steps: 3,
        batch_size: 4,
        lr_warmup_steps: 0,
        learning_rate: 1e-2,
        checkpointing_steps: 0,
        log_every: 1,
        ..Default::default()
    };
    let run = RunDir::plain(dir);
    let task = ControlTask::new(main, side, Some(head)).unwrap();
    let mut params = side.named_parameters();
    params.extend(head.named_parameters());
    trainer::train(&task, params, &data, &main.objective, &cfg, &run, |_, _| Ok(())).unwrap();
}

/// A noised batch of 4 with labels and conditions.
fn batch(main: &MainNetwork) -> (Batch, crate::diffusion::TrainingSample) {
    batch_with_labels(main, [0, 1, 2, 1])
}

/// A noised batch of 4 single-channel 8×8 images (seeded), with `labels` and random conditions.
pub(super) fn batch_with_labels(main: &MainNetwork, labels: [i64; 4]) -> (Batch, crate::diffusion::TrainingSample) {
    tch::manual_seed(11);
    let x0 = Tensor::rand([4, 1, 8, 8], CPU) * 2.0 - 1.0;
    let b = Batch { labels: Tensor::from_slice(&labels), condition: Some(Tensor::rand([4, 1, 8, 8], CPU)), x0, rows: None };
    let t = main.objective.sample_times(4, Device::Cpu);
    let s = main.objective.training_sample(&b.x0, &b.x0.randn_like(), &t).unwrap();
    (b, s)
}

/// Same shape and the same bits.
pub(super) fn bitwise_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

fn metric(loss: &TaskLoss, name: &str) -> f64 {
    loss.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| v.double_value(&[])).unwrap()
}

#[test]
fn controlled_output_equals_uncontrolled_output_at_initialisation() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let (b, s) = batch(&main);
    let task = ControlTask::new(&main, &side, None).unwrap();
    let f = task.forward(&s.x_t, &s.model_t, &b.labels, b.condition.as_ref().unwrap()).unwrap();
    let plain = main.predict(&s.x_t, &s.model_t, &b.labels).unwrap();
    assert!(bitwise_equal(&f.pred_full, &plain), "zero convs must leave the main network's output untouched");
    assert!(f.pred_main.is_none() && f.decoded.is_none(), "the baseline computes no reference pass and no decoder");
}

#[test]
fn shared_encoder_reference_pass_equals_a_full_second_forward_bit_for_bit() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let (b, s) = batch(&main);
    let shared = head_for(&main, Hook::Mid, ReferencePass::SharedEncoder);
    let full = head_for(&main, Hook::Mid, ReferencePass::Full);
    let cond = b.condition.as_ref().unwrap();
    let a =
        ControlTask::new(&main, &side, Some(&shared)).unwrap().forward(&s.x_t, &s.model_t, &b.labels, cond).unwrap();
    let f = ControlTask::new(&main, &side, Some(&full)).unwrap().forward(&s.x_t, &s.model_t, &b.labels, cond).unwrap();
    let reference = main.predict(&s.x_t, &s.model_t, &b.labels).unwrap();
    assert!(bitwise_equal(a.pred_main.as_ref().unwrap(), &reference));
    assert!(bitwise_equal(f.pred_main.as_ref().unwrap(), &reference));
    // And with trained (non-zero) zero convs, where pred_full differs from pred_main.
    tch::no_grad(|| {
        for (n, p) in side.named_parameters() {
            if n.starts_with("controlnet_") {
                let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.1));
            }
        }
    });
    let a =
        ControlTask::new(&main, &side, Some(&shared)).unwrap().forward(&s.x_t, &s.model_t, &b.labels, cond).unwrap();
    assert!(bitwise_equal(a.pred_main.as_ref().unwrap(), &reference));
    assert!(!bitwise_equal(&a.pred_full, &reference), "trained zero convs must change the controlled output");
}

#[test]
fn lisa_loss_equals_mean_r_squared_with_the_zero_initialised_decoder() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let head = head_for(&main, Hook::Mid, ReferencePass::SharedEncoder);
    let (b, s) = batch(&main);
    let task = ControlTask::new(&main, &side, Some(&head)).unwrap();
    let out = task.loss(&b, &s).unwrap();
    let (l_lisa, r_sq, l_main) = (metric(&out, "l_lisa"), metric(&out, "r_sq"), metric(&out, "l_main"));
    assert!(r_sq > 0.1, "the residual of a random main network is not small: {r_sq}");
    assert_eq!(l_lisa, r_sq);
    let total = out.loss.double_value(&[]);
    assert!(
        (total - (l_main + 0.2 * l_lisa)).abs() < 1e-6 * total,
        "L = L_main + λ·L_lisa: {total} vs {l_main} + 0.2·{l_lisa}"
    );
    // Hand-computed r for ε-prediction: ε − main(x_t, t, y).
    let r = &s.target - main.predict(&s.x_t, &s.model_t, &b.labels).unwrap();
    assert_eq!(r.square().mean(Kind::Float).double_value(&[]), r_sq);
}

/// Names of side parameters whose gradient is defined and non-zero.
fn params_with_gradient(side: &SideNetwork) -> Vec<String> {
    side.named_parameters()
        .into_iter()
        .filter(|(_, p)| {
            let g = p.grad();
            g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0
        })
        .map(|(n, _)| n)
        .collect()
}

/// Backpropagates only the LISA term with a non-zero decoder output layer.
fn lisa_gradients(hook: Hook) -> (Vec<String>, Vec<String>) {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let head = head_for(&main, hook, ReferencePass::SharedEncoder);
    tch::no_grad(|| {
        let _ = head.decoder.conv_out.weight.shallow_clone().copy_(&(head.decoder.conv_out.weight.randn_like() * 0.1));
    });
    let (b, s) = batch(&main);
    let task = ControlTask::new(&main, &side, Some(&head)).unwrap();
    let f = task.forward(&s.x_t, &s.model_t, &b.labels, b.condition.as_ref().unwrap()).unwrap();
    let r = likelihood_residual(&s.target, f.pred_main.as_ref().unwrap());
    f.decoded.unwrap().mse_loss(&r, tch::Reduction::Mean).backward();
    let main_grads: Vec<String> =
        main.named_parameters().into_iter().filter(|(_, p)| p.grad().defined()).map(|(n, _)| n).collect();
    (params_with_gradient(&side), main_grads)
}

#[test]
fn lisa_gradients_reach_the_side_network_up_to_the_mid_hook_and_not_its_zero_convs() {
    let (with, main_grads) = lisa_gradients(Hook::Mid);
    assert!(main_grads.is_empty(), "the main network got gradients: {main_grads:?}");
    for name in [
        "conv_in.weight",
        // The embedding's output conv starts at zero (as in diffusers), so only it gets a gradient at first.
        "controlnet_cond_embedding.conv_out.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.2.attentions.0.proj_in.weight",
        "mid_block.resnets.1.conv2.weight",
    ] {
        assert!(with.iter().any(|n| n == name), "{name} has no LISA gradient; got {with:?}");
    }
    let leaked: Vec<&String> = with
        .iter()
        .filter(|n| n.starts_with("controlnet_down_blocks") || n.starts_with("controlnet_mid_block"))
        .collect();
    assert!(leaked.is_empty(), "LISA's loss must not pass through the zero convs: {leaked:?}");
}

#[test]
fn lisa_gradients_stop_at_an_early_hook() {
    // down_0 is conv_in's output plus the condition embedding: nothing after it may get a gradient.
    let (with, main_grads) = lisa_gradients(Hook::Down(0));
    assert!(main_grads.is_empty());
    assert!(
        with.iter().any(|n| n == "conv_in.weight") && with.iter().any(|n| n.starts_with("controlnet_cond_embedding."))
    );
    let after: Vec<&String> =
        with.iter().filter(|n| !n.starts_with("conv_in.") && !n.starts_with("controlnet_cond_embedding.")).collect();
    assert!(after.is_empty(), "parameters after the hook got LISA gradients: {after:?}");
}

#[test]
fn training_moves_the_side_network_and_decoder_but_never_the_main_network() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let head = head_for(&main, Hook::Mid, ReferencePass::SharedEncoder);
    let before: Vec<Tensor> = main.named_parameters().iter().map(|(_, p)| p.copy()).collect();
    let side_before: Vec<Tensor> = side.named_parameters().iter().map(|(_, p)| p.copy()).collect();
    let dir = tempfile::tempdir().unwrap();
    train_three_steps(&main, &side, &head, dir.path());
    for ((n, p), b) in main.named_parameters().iter().zip(&before) {
        assert!(bitwise_equal(p, b), "main parameter {n} changed");
        assert!(!p.grad().defined(), "main parameter {n} has a gradient");
    }
    let moved = side.named_parameters().iter().zip(&side_before).filter(|((_, p), b)| !bitwise_equal(p, b)).count();
    assert!(moved > side_before.len() / 2, "only {moved} of {} side parameters moved", side_before.len());
    assert!(
        head.decoder.conv_out.weight.abs().sum(Kind::Float).double_value(&[]) > 0.0,
        "the decoder output layer left zero"
    );
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    for col in ["l_main", "l_lisa", "r_sq", "lisa_ratio", "lisa_ratio_b0", "lisa_ratio_b9"] {
        assert!(header.split(',').any(|c| c == col), "metrics.csv lacks {col}: {header}");
    }
    assert!(!header.contains("lisa_err_b"), "bucket sums are turned into ratios: {header}");
    // Zero-initialised decoder: the first step's ratio is exactly 1 (nothing of r explained yet).
    let first: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let col = header.split(',').position(|c| c == "lisa_ratio").unwrap();
    assert_eq!(first[col].parse::<f64>().unwrap(), 1.0);
}

#[test]
fn likelihood_residual_matches_hand_computed_values_for_every_objective() {
    let x0 = Tensor::from_slice(&[0.5f32, -0.25, 1.0, 0.0]).view([4, 1, 1, 1]);
    let noise = Tensor::from_slice(&[0.1f32, 0.7, -1.2, 2.0]).view([4, 1, 1, 1]);
    let pred_main = Tensor::from_slice(&[0.3f32, -0.1, 0.0, 1.5]).view([4, 1, 1, 1]);
    let (x0v, nv, pv) = ([0.5f64, -0.25, 1.0, 0.0], [0.1f64, 0.7, -1.2, 2.0], [0.3f64, -0.1, 0.0, 1.5]);
    let check = |obj: &Objective, t: &Tensor, want: &dyn Fn(usize) -> f64| {
        let s = obj.training_sample(&x0, &noise, t).unwrap();
        let r = likelihood_residual(&s.target, &pred_main);
        for i in 0..4 {
            let got = r.double_value(&[i as i64, 0, 0, 0]);
            assert!((got - want(i)).abs() < 1e-5, "{}: r[{i}] = {got}, want {}", obj.name(), want(i));
        }
    };
    // ε-prediction: r = ε − pred.
    let t = Tensor::from_slice(&[0i64, 10, 500, 999]);
    check(&Objective::new(&eps()).unwrap(), &t, &|i| nv[i] - pv[i]);
    // v-prediction: r = ᾱ_t^½·ε − (1−ᾱ_t)^½·x0 − pred, ᾱ from the linear schedule computed here in f64.
    let vcfg = ObjectiveConfig { prediction: Prediction::VPrediction, ..eps() };
    let betas: Vec<f64> = (0..1000).map(|i| 1e-4 + (0.02 - 1e-4) * i as f64 / 999.0).collect();
    let abar = |t: usize| betas[..=t].iter().map(|b| 1.0 - b).product::<f64>();
    let ts = [0usize, 10, 500, 999];
    check(&Objective::new(&vcfg).unwrap(), &t, &|i| {
        let a = abar(ts[i]);
        a.sqrt() * nv[i] - (1.0 - a).sqrt() * x0v[i] - pv[i]
    });
    // Flow matching: r = (ε − x0) − pred, whatever t.
    let fcfg = ObjectiveConfig { kind: ObjectiveKind::Flow, ..eps() };
    check(&Objective::new(&fcfg).unwrap(), &Tensor::from_slice(&[0.0f32, 0.3, 0.6, 0.99]), &|i| nv[i] - x0v[i] - pv[i]);
}

#[test]
fn bucket_sums_split_examples_by_unit_time() {
    let decoded = Tensor::zeros([3, 1, 2, 2], CPU);
    let r = Tensor::from_slice(&[1.0f32, 1., 1., 1., 2., 2., 2., 2., 3., 3., 3., 3.]).view([3, 1, 2, 2]);
    let unit_t = Tensor::from_slice(&[0.05f32, 0.07, 0.95]);
    let (err, rsq) = lisa::bucket_sums(&decoded, &r, &unit_t).unwrap();
    let v: Vec<f32> = Vec::try_from(&rsq).unwrap();
    assert_eq!(v, vec![5.0, 0., 0., 0., 0., 0., 0., 0., 0., 9.0]);
    assert!(bitwise_equal(&err, &rsq), "a zero decoder's error is r²");
}

#[test]
fn side_network_saves_without_the_decoder_and_loads_checkpoints() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let head = head_for(&main, Hook::Mid, ReferencePass::SharedEncoder);
    tch::no_grad(|| {
        for (_, p) in side.named_parameters() {
            let _ = p.shallow_clone().copy_(&p.randn_like());
        }
    });
    let dir = tempfile::tempdir().unwrap();
    side.save(dir.path()).unwrap();
    let names: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("model.safetensors")).unwrap().into_iter().collect();
    assert_eq!(names.len(), side.named_parameters().len(), "exactly the baseline's parameters are saved");
    assert!(names.keys().all(|n| !n.starts_with(lisa::DECODER_PREFIX)));
    let loaded = SideNetwork::load(dir.path(), &main).unwrap();
    for ((n, a), (_, b)) in side.named_parameters().iter().zip(loaded.named_parameters()) {
        assert!(bitwise_equal(a, &b), "{n} differs after loading");
    }
    // A training checkpoint holds the decoder too: it is skipped when loading the side network.
    let ck = dir.path().join("checkpoint-1");
    std::fs::create_dir_all(&ck).unwrap();
    let mut all = side.named_parameters();
    all.extend(head.named_parameters());
    let named: Vec<(&str, &Tensor)> = all.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, ck.join("model.safetensors")).unwrap();
    SideNetwork::load(&ck, &main).unwrap();
    // A side network next to a different main network is refused with a clear message.
    let other = tiny_main(ObjectiveConfig { prediction: Prediction::VPrediction, ..eps() });
    let e = SideNetwork::load(dir.path(), &other).err().unwrap().to_string();
    assert!(e.contains("epsilon") && e.contains("v_prediction"), "{e}");
}

#[test]
fn an_unfrozen_main_network_is_refused() {
    let cfg = tiny_main(eps()).config.clone();
    let main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
    let side = side_for(&main);
    assert!(ControlTask::new(&main, &side, None).is_err());
}

/// A side network whose zero convs and embedding output are no longer zero, so control is visible.
fn trained_side(main: &MainNetwork) -> SideNetwork {
    let side = side_for(main);
    tch::manual_seed(5);
    tch::no_grad(|| {
        for (n, p) in side.named_parameters() {
            if n.starts_with("controlnet_") {
                let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.2));
            }
        }
    });
    side
}

fn control<'a>(side: &'a SideNetwork, c: &Tensor, options: ControlOptions) -> Control<'a> {
    Control { side, condition: c.shallow_clone(), options }
}

#[test]
fn guidance_combines_the_unconditional_and_conditional_branches_with_control_in_both() {
    let main = tiny_main(eps());
    let side = trained_side(&main);
    let (b, s) = batch(&main);
    let c = b.condition.as_ref().unwrap();
    let ctl = [control(&side, c, ControlOptions::default())];
    let plain = controlled_prediction(&main, &ctl, &s.x_t, &s.model_t, &b.labels, 1.0, 0, 10).unwrap();
    assert!(bitwise_equal(&plain, &side.predict(&main, &s.x_t, &s.model_t, &b.labels, c, 1.0).unwrap()));
    let null = main.label_encoder.null_labels(4, Device::Cpu).unwrap();
    let uncond = side.predict(&main, &s.x_t, &s.model_t, &null, c, 1.0).unwrap();
    let guided = controlled_prediction(&main, &ctl, &s.x_t, &s.model_t, &b.labels, 3.0, 0, 10).unwrap();
    let want = &uncond + (&plain - &uncond) * 3.0;
    let diff = (&guided - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "guided prediction differs from u + 3·(c − u) by {diff}");
}

#[test]
fn control_windows_scales_and_several_side_networks() {
    let main = tiny_main(eps());
    let side = trained_side(&main);
    let (b, s) = batch(&main);
    let c = b.condition.as_ref().unwrap();
    let (x, t, y) = (&s.x_t, &s.model_t, &b.labels);
    let none = controlled_prediction(&main, &[], x, t, y, 1.0, 0, 10).unwrap();
    assert!(bitwise_equal(&none, &main.predict(x, t, y).unwrap()));
    let full =
        controlled_prediction(&main, &[control(&side, c, ControlOptions::default())], x, t, y, 1.0, 0, 10).unwrap();
    assert!(!bitwise_equal(&full, &none), "the trained side network must change the prediction");
    // Scale 0: exactly the main network.
    let zero = ControlOptions { conditioning_scale: 0.0, ..ControlOptions::default() };
    assert!(bitwise_equal(
        &controlled_prediction(&main, &[control(&side, c, zero)], x, t, y, 1.0, 0, 10).unwrap(),
        &none
    ));
    // A window over the second half: off at step 0, on at step 9 of 10.
    let late = ControlOptions { start: 0.5, ..ControlOptions::default() };
    assert!(bitwise_equal(
        &controlled_prediction(&main, &[control(&side, c, late)], x, t, y, 1.0, 0, 10).unwrap(),
        &none
    ));
    assert!(bitwise_equal(
        &controlled_prediction(&main, &[control(&side, c, late)], x, t, y, 1.0, 9, 10).unwrap(),
        &full
    ));
    assert!((0..10).map(|i| late.active(i, 10)).eq([false; 5].into_iter().chain([true; 5])));
    let early = ControlOptions { end: 0.3, ..ControlOptions::default() };
    assert!((0..10).map(|i| early.active(i, 10)).eq([true; 3].into_iter().chain([false; 7])));
    // Two side networks' residuals add: the same network twice at scale ½ is the network once.
    let half = ControlOptions { conditioning_scale: 0.5, ..ControlOptions::default() };
    let twice =
        controlled_prediction(&main, &[control(&side, c, half), control(&side, c, half)], x, t, y, 1.0, 0, 10).unwrap();
    let diff = (&twice - &full).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "two half-scale controls differ from one full one by {diff}");
    assert!(ControlOptions { start: 0.6, end: 0.4, ..ControlOptions::default() }.validate().is_err());
}

#[test]
fn controlled_sampling_is_reproducible_and_checks_condition_counts() {
    let main = tiny_main(eps());
    let side = trained_side(&main);
    let c = Tensor::rand([3, 1, 8, 8], CPU);
    let y = Tensor::from_slice(&[0i64, 1, 2]);
    let sampler = crate::diffusion::SamplerConfig { steps: 3, ..Default::default() };
    let a = sample_controlled(&main, &[control(&side, &c, ControlOptions::default())], &y, &sampler, 2.0, 9).unwrap();
    let b = sample_controlled(&main, &[control(&side, &c, ControlOptions::default())], &y, &sampler, 2.0, 9).unwrap();
    assert!(bitwise_equal(&a, &b));
    let chunked =
        sample_controlled_chunked(&main, &[control(&side, &c, ControlOptions::default())], &y, &sampler, 2.0, 9, 2)
            .unwrap();
    assert_eq!(chunked.size(), vec![3, 1, 8, 8]);
    let e = sample_controlled(
        &main,
        &[control(&side, &c.narrow(0, 0, 2), ControlOptions::default())],
        &y,
        &sampler,
        1.0,
        9,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("3 labels but 2 condition images"), "{e}");
}

fn head_with(main: &MainNetwork, cfg: LisaConfig) -> LisaHead {
    LisaHead::new(main, &side_for(main), &LisaConfig { decoder_channel_floor: 8, ..cfg }).unwrap()
}

#[test]
fn ablation_targets_and_distances_at_initialisation() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let (b, s) = batch(&main);
    let c = b.condition.as_ref().unwrap();
    let loss_of = |head: &LisaHead| {
        let task = ControlTask::new(&main, &side, Some(head)).unwrap();
        let f = task.forward(&s.x_t, &s.model_t, &b.labels, c).unwrap();
        (task.loss(&b, &s).unwrap(), f.pred_main.is_some())
    };
    let mean_sq = |t: &Tensor| t.square().mean(Kind::Float).double_value(&[]);
    // Raw target: no reference pass; with the zero decoder L_lisa = mean(target²).
    let (out, has_ref) = loss_of(&head_with(&main, LisaConfig { target: LisaTarget::Raw, ..LisaConfig::default() }));
    assert!(!has_ref, "the raw-target control needs no reference pass");
    assert_eq!(metric(&out, "l_lisa"), mean_sq(&s.target));
    // Condition target: the condition scaled to [-1, 1].
    let (out, has_ref) =
        loss_of(&head_with(&main, LisaConfig { target: LisaTarget::Condition, ..LisaConfig::default() }));
    assert!(!has_ref);
    assert_eq!(metric(&out, "l_lisa"), mean_sq(&(c * 2.0 - 1.0)));
    // Random target: same per-example RMS as r, different values. (It is drawn from libtorch's global
    // generator, which the trainer reseeds every step; test threads share it, so no seed check here.)
    let random = head_with(&main, LisaConfig { target: LisaTarget::Random, ..LisaConfig::default() });
    let (a, has_ref) = loss_of(&random);
    let residual = loss_of(&head_with(&main, LisaConfig::default())).0;
    assert!(has_ref);
    let ratio = metric(&a, "l_lisa") / metric(&residual, "l_lisa");
    assert!(metric(&a, "l_lisa") != metric(&residual, "l_lisa") && (0.5..2.0).contains(&ratio), "{ratio}");
    // Cosine distance: a zero output has cosine 0 with anything, so the loss starts at exactly 1.
    let (out, _) = loss_of(&head_with(&main, LisaConfig { distance: LisaDistance::Cosine, ..LisaConfig::default() }));
    assert_eq!(metric(&out, "l_lisa"), 1.0);
}

#[test]
fn decoder_capacity_multiplier_widens_every_hidden_conv() {
    let main = tiny_main(eps());
    let one = head_with(&main, LisaConfig { hook: Hook::Down(3), ..LisaConfig::default() });
    let two =
        head_with(&main, LisaConfig { hook: Hook::Down(3), decoder_channel_multiplier: 2, ..LisaConfig::default() });
    assert!(!one.decoder.blocks.is_empty());
    for (a, b) in one.decoder.blocks.iter().zip(&two.decoder.blocks) {
        assert_eq!(b.conv.weight.size()[0], 2 * a.conv.weight.size()[0]);
    }
    // The convs grow (the first one 2×, later ones 4×); the time projection to the feature's width does not.
    let convs = |h: &LisaHead| h.decoder.blocks.iter().map(|b| b.conv.weight.numel()).sum::<usize>();
    assert!(convs(&two) >= 2 * convs(&one), "{} vs {}", convs(&two), convs(&one));
}

#[test]
fn condition_dropout_zeroes_whole_channels_of_a_stacked_condition() {
    let main = tiny_main(eps());
    let cn = ControlNetConfig {
        conditioning_channels: 2,
        conditioning_embedding_out_channels: vec![4, 8],
        ..ControlNetConfig::for_unet(&main.config.unet)
    };
    let set: crate::data::conditions::ConditionSet = "edges+mask".parse().unwrap();
    let side = SideNetwork::from_main(&main, set, cn).unwrap();
    // Non-zero zero convs, so that the condition reaches the prediction.
    tch::no_grad(|| {
        for (name, mut p) in side.named_parameters() {
            if name.starts_with("controlnet_") {
                let _ = p.copy_(&(p.randn_like() * 0.1));
            }
        }
    });
    let (mut b, s) = batch(&main);
    b.condition = Some(Tensor::rand([4, 2, 8, 8], CPU) + 0.1);
    let p = 0.5;
    let plain = ControlTask::new(&main, &side, None).unwrap();
    let dropping = ControlTask::new(&main, &side, None).unwrap().with_condition_dropout(p).unwrap();

    // The task draws its keep mask from libtorch's global generator. Reseeded, it draws the mask predicted here;
    // but tests running in parallel share that generator, so when another test drew in between, the loss is
    // matched against every whole-channel mask (4 examples × 2 channels: 2^8) applied by hand instead.
    let cond = b.condition.as_ref().unwrap().shallow_clone();
    let masked_loss = |bits: u32| {
        let keep: Vec<f32> = (0..8).map(|i| ((bits >> i) & 1) as f32).collect();
        let keep = Tensor::from_slice(&keep).view([4, 2, 1, 1]);
        let by_hand =
            Batch { x0: b.x0.shallow_clone(), labels: b.labels.shallow_clone(), condition: Some(&cond * keep), rows: None };
        plain.loss(&by_hand, &s).unwrap().loss.double_value(&[])
    };
    tch::manual_seed(3);
    let with_dropout = dropping.loss(&b, &s).unwrap().loss.double_value(&[]);
    tch::manual_seed(3);
    let keep = Vec::<f32>::try_from(Tensor::rand([8], CPU).ge(p).to_kind(Kind::Float)).unwrap();
    let predicted = keep.iter().enumerate().map(|(i, &k)| (k as u32) << i).sum::<u32>();
    assert!(
        predicted != 0 && predicted != 255,
        "the test's seed should drop some channels and keep others (mask {predicted:#010b})"
    );
    let matched = if masked_loss(predicted) == with_dropout {
        Some(predicted)
    } else {
        (0..256).find(|&m| masked_loss(m) == with_dropout)
    };
    assert!(matched.is_some(), "the loss with dropout, {with_dropout}, matches no whole-channel mask");
    assert_ne!(with_dropout, masked_loss(255), "nothing was dropped");

    for bad in [-0.1, 1.0, f64::NAN] {
        assert!(ControlTask::new(&main, &side, None).unwrap().with_condition_dropout(bad).is_err(), "{bad} accepted");
    }
    // A stacked side network needs one conditioning channel per condition.
    let one = ControlNetConfig { conditioning_channels: 1, ..side.config.controlnet.clone().unwrap() };
    let err =
        SideNetwork::from_main(&main, "edges+mask".parse::<crate::data::conditions::ConditionSet>().unwrap(), one)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("2 conditioning channels"), "{err}");
}

#[test]
fn lisa_term_on_a_sub_batch_is_the_whole_batch_term_over_those_examples() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let mut head = head_with(&main, LisaConfig::default());
    // Non-zero zero convs and decoder, so that every output carries the side network's feature.
    tch::no_grad(|| {
        for (n, p) in side.named_parameters().into_iter().chain(head.named_parameters()) {
            if n.starts_with("controlnet_") || n.starts_with(lisa::DECODER_PREFIX) {
                let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.1));
            }
        }
    });
    let (b, s) = batch(&main);
    let c = b.condition.as_ref().unwrap();
    let whole = ControlTask::new(&main, &side, Some(&head)).unwrap().forward(&s.x_t, &s.model_t, &b.labels, c).unwrap();
    let whole_loss = ControlTask::new(&main, &side, Some(&head)).unwrap().loss(&b, &s).unwrap();
    head.sub_batch = 2;
    let task = ControlTask::new(&main, &side, Some(&head)).unwrap();
    let sub = task.forward(&s.x_t, &s.model_t, &b.labels, c).unwrap();
    let (pred_main, decoded) = (sub.pred_main.as_ref().unwrap(), sub.decoded.as_ref().unwrap());
    assert_eq!((pred_main.size()[0], decoded.size()[0]), (2, 2), "reference pass and decoder on 2 of 4 examples");
    assert!(bitwise_equal(&sub.pred_full, &whole.pred_full), "the diffusion term still covers the whole batch");
    let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-5;
    assert!(close(pred_main, &whole.pred_main.as_ref().unwrap().narrow(0, 0, 2)));
    assert!(close(decoded, &whole.decoded.as_ref().unwrap().narrow(0, 0, 2)));
    let out = task.loss(&b, &s).unwrap();
    assert_eq!(metric(&out, "l_main"), metric(&whole_loss, "l_main"));
    let r = likelihood_residual(&s.target.narrow(0, 0, 2), &whole.pred_main.as_ref().unwrap().narrow(0, 0, 2));
    let expected = (whole.decoded.as_ref().unwrap().narrow(0, 0, 2) - r).square().mean(Kind::Float).double_value(&[]);
    assert!(
        (metric(&out, "l_lisa") - expected).abs() < 1e-6 * expected.max(1.0),
        "{} vs {expected}",
        metric(&out, "l_lisa")
    );
    assert!(metric(&out, "l_lisa") != metric(&whole_loss, "l_lisa"), "a different estimate of the same loss");
    // A sub-batch larger than the batch is the whole batch; a negative one is refused.
    head.sub_batch = 64;
    let all = ControlTask::new(&main, &side, Some(&head)).unwrap().loss(&b, &s).unwrap();
    assert_eq!(metric(&all, "l_lisa"), metric(&whole_loss, "l_lisa"));
    let e = LisaConfig { sub_batch: -1, ..LisaConfig::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("lisa.sub_batch"), "{e}");
}

/// Images whose condition is the image itself (scaled to [0, 1]): a side network can learn to use it.
fn self_conditioned(n: i64, seed: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let x = Tensor::rand([n, 1, 8, 8], CPU) * 2.0 - 1.0;
    let y = Tensor::randint(3, [n], (Kind::Int64, Device::Cpu));
    let c = (&x + 1.0) / 2.0;
    (x, y, c)
}

#[test]
fn held_out_loss_gain_is_zero_at_initialisation_and_rises_with_controlled_training() {
    use crate::eval::loss_gain::HeldOutLoss;
    let main = tiny_main(eps());
    let side = side_for(&main);
    let (hx, hy, hc) = self_conditioned(40, 1);
    let held_out = HeldOutLoss::new(&main, &main.objective, &hx, &hy, &hc, 9).unwrap();
    let g0 = held_out.gain(&main, &side).unwrap();
    assert_eq!(g0.overall, 0.0, "zero convs leave every prediction exactly as the main network's");
    assert!(g0.by_bucket.iter().all(|&g| g == 0.0), "{:?}", g0.by_bucket);
    assert_eq!(g0.by_bucket.len(), NUM_TIME_BUCKETS);
    assert!(held_out.uncontrolled_loss() > 0.0);

    // The baseline (no LISA) trained on other images whose condition reveals the image.
    let (x, y, c) = self_conditioned(64, 2);
    let data =
        Dataset { images: x, labels: y, num_classes: 3, class_names: vec!["a".into(); 3], conditioning: Some(c) };
    let cfg = TrainConfig {
        steps: 30,
        batch_size: 16,
        lr_warmup_steps: 0,
        learning_rate: 3e-3,
        checkpointing_steps: 0,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::plain(dir.path());
    let task = ControlTask::new(&main, &side, None).unwrap();
    trainer::train(&task, side.named_parameters(), &data, &main.objective, &cfg, &run, |_, _| Ok(())).unwrap();
    let g = held_out.gain(&main, &side).unwrap();
    assert!(g.overall > 0.0, "held-out gain after controlled training: {}", g.overall);
    // The same network measured twice gives the same value: the batch, noise and timesteps are fixed.
    assert_eq!(held_out.gain(&main, &side).unwrap(), g);
}

#[test]
fn lisa_switched_off_after_its_last_step_is_the_baselines_step_with_the_same_log_columns() {
    let main = tiny_main(eps());
    let side = side_for(&main);
    let cfg = LisaConfig { hook: Hook::Mid, decoder_channel_floor: 8, last_step: 2, ..LisaConfig::default() };
    let head = LisaHead::new(&main, &side, &cfg).unwrap();
    let (task, baseline) = (ControlTask::new(&main, &side, Some(&head)).unwrap(), ControlTask::new(&main, &side, None).unwrap());
    let (b, s) = batch(&main);
    let names = |l: &TaskLoss| l.metrics.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    task.begin_step(0);
    let on = task.loss(&b, &s).unwrap();
    // Steps 1 and 2 (indices 0, 1) carry the term: the zero decoder's L_lisa = mean(r²) > 0 adds λ·L_lisa.
    assert!(metric(&on, "l_lisa") > 0.0);
    assert!(on.loss.double_value(&[]) > metric(&on, "l_main"));
    task.begin_step(1);
    assert!(task.loss(&b, &s).unwrap().loss.double_value(&[]) > metric(&on, "l_main"));
    // Step 3 (index 2) on: the baseline's loss, bit for bit, and LISA's columns kept as NaN.
    task.begin_step(2);
    let off = task.loss(&b, &s).unwrap();
    assert!(bitwise_equal(&off.loss, &baseline.loss(&b, &s).unwrap().loss));
    assert_eq!(names(&off), names(&on));
    assert!(metric(&off, "l_lisa").is_nan() && metric(&off, "r_sq_b9").is_nan());
    // 0 keeps the term on every step.
    let always = LisaHead::new(&main, &side, &LisaConfig { last_step: 0, ..cfg.clone() }).unwrap();
    assert!(always.active_at(0) && always.active_at(1_000_000));
    assert!(head.active_at(1) && !head.active_at(2));

    // Through the trainer: the log's rows for steps 1-2 carry the term, step 3 NaN, in the same columns.
    let dir = tempfile::tempdir().unwrap();
    train_three_steps(&main, &side, &head, dir.path());
    let log = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let rows: Vec<&str> = log.lines().collect();
    let col = rows[0].split(',').position(|c| c == "l_lisa").unwrap();
    let l_lisa: Vec<f64> = rows[1..].iter().map(|r| r.split(',').nth(col).unwrap().parse().unwrap()).collect();
    assert_eq!(l_lisa.len(), 3, "{log}");
    assert!(l_lisa[0].is_finite() && l_lisa[1].is_finite() && l_lisa[2].is_nan(), "{l_lisa:?}");
}

#[test]
fn a_cross_normalized_side_network_trains_with_lisa_saves_loads_and_samples() {
    let main = tiny_main(eps());
    let cn = ControlNetConfig {
        conditioning_embedding_out_channels: vec![4, 8],
        cross_norm_scale: Some(0.35),
        ..ControlNetConfig::for_unet(&main.config.unet)
    };
    let side = SideNetwork::from_main(&main, ConditionKind::Edges, cn).unwrap();
    assert!(side.needs_main_features());
    let cfg = LisaConfig { hook: Hook::Down(2), decoder_channel_floor: 8, ..LisaConfig::default() };
    let head = LisaHead::new(&main, &side, &cfg).unwrap();
    let (b, s) = batch(&main);
    let task = ControlTask::new(&main, &side, Some(&head)).unwrap();
    task.loss(&b, &s).unwrap().loss.backward();
    // The diffusion loss (through the cross-normalized residuals) and the LISA term reach the side network.
    let params: HashMap<String, Tensor> = side.named_parameters().into_iter().collect();
    let grad = |name: &str| params[name].grad().abs().sum(Kind::Double).double_value(&[]);
    assert_eq!(grad("controlnet_cond_embedding.conv_in.weight"), 0.0, "conv_out is zero: nothing flows past it yet");
    assert!(grad("controlnet_cond_embedding.conv_out.weight") > 0.0);
    assert!(grad("conv_in.weight") > 0.0);
    assert!(params.keys().all(|n| !n.starts_with("controlnet_down_blocks")));
    // Saved and loaded, it gives the same controlled prediction (its config records the connection).
    tch::no_grad(|| {
        for p in params.values() {
            let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.1));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    side.save(dir.path()).unwrap();
    let loaded = SideNetwork::load(dir.path(), &main).unwrap();
    let c = b.condition.as_ref().unwrap();
    let predict = |n: &SideNetwork| tch::no_grad(|| n.predict(&main, &s.x_t, &s.model_t, &b.labels, c, 1.0)).unwrap();
    let (a, l) = (predict(&side), predict(&loaded));
    assert!(bitwise_equal(&a, &l));
    let plain = tch::no_grad(|| main.predict(&s.x_t, &s.model_t, &b.labels)).unwrap();
    assert!(!bitwise_equal(&a, &plain), "the control changes the prediction");
    // The sampler's controlled prediction is predict's.
    let control = sampling::Control { side: &loaded, condition: c.shallow_clone(), options: Default::default() };
    let sampled =
        tch::no_grad(|| sampling::controlled_prediction(&main, &[control], &s.x_t, &s.model_t, &b.labels, 1.0, 0, 1))
            .unwrap();
    assert!(bitwise_equal(&sampled, &l));
    let e = loaded.export_diffusers(&dir.path().join("diffusers")).unwrap_err().to_string();
    assert!(e.contains("cannot be exported to diffusers"), "{e}");
}

/// Gradients of the side network and the LISA head after one backward of the task's loss on `(b, s)`, with the
/// side network's blocks recomputed or not, under `precision` (gradients cleared first).
fn step_gradients(
    main: &MainNetwork,
    side: &mut SideNetwork,
    head: &LisaHead,
    (b, s): &(Batch, crate::diffusion::TrainingSample),
    precision: crate::models::MixedPrecision,
    recompute: bool,
) -> Vec<(String, Tensor)> {
    side.set_gradient_checkpointing(recompute).unwrap();
    main.set_gradient_checkpointing(recompute).unwrap();
    let params: Vec<(String, Tensor)> = side.named_parameters().into_iter().chain(head.named_parameters()).collect();
    for (_, p) in &params {
        p.shallow_clone().zero_grad();
    }
    let task = ControlTask::new(main, side, Some(head)).unwrap();
    let out = crate::models::autocast(precision, || task.loss(b, s)).unwrap();
    out.loss.backward();
    let mut grads: Vec<(String, Tensor)> = params.iter().map(|(n, p)| (n.clone(), p.grad().copy())).collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}

#[cfg(lisa_checkpoint)]
#[test]
fn recomputed_side_blocks_give_the_plain_gradients_with_the_lisa_hook_inside_them() {
    use crate::models::MixedPrecision;
    let main = tiny_main(eps());
    let data = batch(&main);
    // down_1 is the output of down block 0's first resnet, inside a recomputed block; mid is the mid block's.
    for hook in [Hook::Down(1), Hook::Mid] {
        let mut side = side_for(&main);
        let head = head_for(&main, hook, ReferencePass::SharedEncoder);
        // Non-zero zero convs and decoder output, so that every block gets gradients from both terms.
        tch::no_grad(|| {
            for (n, p) in side.named_parameters().into_iter().chain(head.named_parameters()) {
                if n.starts_with("controlnet_down_blocks") || n.starts_with("controlnet_mid_block") || n.contains("conv_out") {
                    let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.1));
                }
            }
        });
        for precision in [MixedPrecision::No, MixedPrecision::Bf16] {
            let plain = step_gradients(&main, &mut side, &head, &data, precision, false);
            let recomputed = step_gradients(&main, &mut side, &head, &data, precision, true);
            assert_eq!(plain.len(), recomputed.len());
            let mut worst = (0.0f64, String::new());
            for ((name, p), (_, r)) in plain.iter().zip(&recomputed) {
                assert!(p.defined() && r.defined(), "{name}: gradient missing ({precision:?}, {hook})");
                let scale = p.abs().max().double_value(&[]).max(1e-12);
                let d = (p - r).abs().max().double_value(&[]) / scale;
                if d > worst.0 {
                    worst = (d, name.clone());
                }
            }
            // The same kernels run on the same inputs; only the order in which a tensor's gradient contributions
            // are summed may differ (a block's input also feeds a skip), so rounding is all that may differ. Seen
            // when written: 1e-6 of the largest gradient in f32, bit-identical under bf16.
            assert!(worst.0 < 1e-5, "{precision:?}, {hook}: {} differs by {:.2e} of its largest gradient", worst.1, worst.0);
            let nonzero = plain.iter().filter(|(_, g)| g.abs().sum(Kind::Float).double_value(&[]) > 0.0).count();
            assert!(nonzero > plain.len() / 2, "most parameters get gradients: {nonzero} of {}", plain.len());
        }
    }
}

#[test]
fn a_frozen_main_network_held_in_half_precision_gives_the_f32_held_loss_and_gradients_within_rounding() {
    use crate::models::precision::{self, MixedPrecision};
    for precision in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
        let kind = precision.kind().unwrap();
        // One main network, side network, head and batch for both runs (other tests reseed the global generator
        // concurrently, so nothing is drawn twice).
        let mut main = tiny_main(eps());
        // Norm scales and shifts away from their exact 1 and 0, so that holding them in half precision rounds.
        tch::no_grad(|| {
            for (n, p) in main.named_parameters() {
                if n.contains("norm") {
                    let _ = p.shallow_clone().copy_(&(&p + p.randn_like() * 0.1));
                }
            }
        });
        let data = batch(&main);
        let mut side = side_for(&main);
        let head = head_for(&main, Hook::Mid, ReferencePass::SharedEncoder);
        // Non-zero zero convs and decoder output, so that the side network reaches the loss.
        tch::no_grad(|| {
            for (n, p) in side.named_parameters().into_iter().chain(head.named_parameters()) {
                if n.starts_with("controlnet_down_blocks") || n.starts_with("controlnet_mid_block") || n.contains("conv_out") {
                    let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.1));
                }
            }
        });
        let mut run = |held: bool| {
            if held {
                main.hold_weights_in(precision).unwrap();
                assert!(main.vs.variables().values().all(|v| v.kind() == kind), "{precision:?}: every frozen weight held");
            }
            let grads = step_gradients(&main, &mut side, &head, &data, precision, false);
            for (n, g) in &grads {
                assert_eq!(g.kind(), Kind::Float, "{precision:?}: {n}'s gradient stays f32 beside held weights");
            }
            let task = ControlTask::new(&main, &side, Some(&head)).unwrap();
            let loss = tch::no_grad(|| precision::autocast(precision, || task.loss(&data.0, &data.1))).unwrap();
            // Outside an autocast region the held network computes in f32 too (sampling, evaluation).
            let plain = tch::no_grad(|| main.predict(&data.1.x_t, &data.1.model_t, &data.0.labels)).unwrap();
            assert_eq!(plain.kind(), Kind::Float);
            let metric = |name: &str| loss.metrics.iter().find(|(n, _)| n == name).unwrap().1.double_value(&[]);
            (metric("l_main"), metric("l_lisa"), grads)
        };
        let (main_f32, lisa_f32, grads_f32) = run(false);
        let (main_held, lisa_held, grads_held) = run(true);
        // Inside the region, convolutions and matmuls see the same reduced weights either way (bit-identical
        // losses at the norms' initial 1 and 0); what differs is the rounding of the norms' scales and shifts.
        // Seen when written: losses within 8e-4 relative (bf16) and 5e-5 (fp16), all gradients together within
        // 1.9e-2 / 2.1e-3 of their norm. The tolerances leave about 3-5x of room.
        let (loss_tol, grad_tol) = if precision == MixedPrecision::Bf16 { (4e-3, 6e-2) } else { (2.5e-4, 1e-2) };
        for (what, a, b) in [("main loss", main_f32, main_held), ("LISA loss", lisa_f32, lisa_held)] {
            let rel = (a - b).abs() / a.abs();
            assert!(rel < loss_tol, "{precision:?}: {what} {a} (f32-held) vs {b} (held), {rel:.2e} relative");
        }
        // Over all trainable parameters together: |g_held - g_f32| / |g_f32|.
        let flat = |g: &[(String, Tensor)]| Tensor::cat(&g.iter().map(|(_, t)| t.flatten(0, -1)).collect::<Vec<_>>(), 0);
        let (a, b) = (flat(&grads_f32), flat(&grads_held));
        let rel = (&a - &b).norm().double_value(&[]) / a.norm().double_value(&[]);
        eprintln!("{precision:?}: losses {main_f32} / {main_held}, {lisa_f32} / {lisa_held}; gradients {rel:.2e}");
        assert!(rel > 0.0, "{precision:?}: the held norms round, so something must differ");
        assert!(rel < grad_tol, "{precision:?}: the gradients differ by {rel:.2e} of their norm");
    }
    // A trainable network is not held in half precision.
    let mut trainable = MainNetwork::new(&tiny_main(eps()).config, Device::Cpu).unwrap();
    let e = trainable.hold_weights_in(MixedPrecision::Bf16).unwrap_err().to_string();
    assert!(e.contains("freeze the network first"), "{e}");
    assert!(trainable.vs.variables().values().all(|v| v.kind() == Kind::Float), "nothing was cast");
}
