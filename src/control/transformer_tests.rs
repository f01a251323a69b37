//! Tests of the transformer pair under control and LISA, on a tiny DiT main network whose
//! zero-initialised layers (adaLN-Zero, output) are given random values so that it computes a
//! non-trivial function: exactness at initialisation, the shared-embedding reference pass, SD3's
//! residual grouping, where LISA's gradients go, training, saving and sampling.
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::tests::bitwise_equal;
use super::*;
use crate::data::conditions::ConditionKind;
use crate::diffusion::objective::ObjectiveKind;
use crate::diffusion::{ObjectiveConfig, SamplerConfig, SamplerKind};
use crate::models::{ControlNetConfig, DiTConfig, Hook, LabelEncoderConfig};
use crate::pipeline::{Backbone, MainNetwork, MainNetworkConfig};
use crate::train::step::{Batch, TrainTask};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn tiny_dit() -> DiTConfig {
    DiTConfig {
        sample_size: 8,
        patch_size: 2,
        num_layers: 4,
        num_attention_heads: 2,
        attention_head_dim: 4,
        pooled_projection_dim: 8,
        mlp_ratio: 2,
        ..DiTConfig::default()
    }
}

fn flow() -> ObjectiveConfig {
    ObjectiveConfig { kind: ObjectiveKind::Flow, ..ObjectiveConfig::default() }
}

/// A frozen tiny DiT main network with every parameter random (no layer left at zero).
fn dit_main(objective: ObjectiveConfig) -> MainNetwork {
    tch::manual_seed(5);
    let cfg = MainNetworkConfig {
        transformer: Some(tiny_dit()),
        label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 2 },
        objective,
        ..Default::default()
    };
    randomized(MainNetwork::new(&cfg, Device::Cpu).unwrap())
}

/// `main` with every parameter drawn from N(0, 0.2²) (no layer left at zero), frozen.
fn randomized(mut main: MainNetwork) -> MainNetwork {
    tch::no_grad(|| {
        for (_, p) in main.named_parameters() {
            let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.2));
        }
    });
    main.freeze();
    main
}

fn dit_side(main: &MainNetwork, layers: i64) -> SideNetwork {
    SideNetwork::for_main(main, ConditionKind::Edges, ControlNetConfig::default(), layers).unwrap()
}

fn head(main: &MainNetwork, side: &SideNetwork, hook: Hook, reference_pass: ReferencePass) -> LisaHead {
    LisaHead::new(main, side, &LisaConfig { hook, reference_pass, decoder_channel_floor: 8, ..LisaConfig::default() })
        .unwrap()
}

fn batch(main: &MainNetwork) -> (Batch, crate::diffusion::TrainingSample) {
    super::tests::batch_with_labels(main, [0, 1, 2, 3])
}

fn randomize(side: &SideNetwork, prefix: &str) {
    tch::no_grad(|| {
        for (n, p) in side.named_parameters() {
            if n.starts_with(prefix) {
                let _ = p.shallow_clone().copy_(&(p.randn_like() * 0.1));
            }
        }
    });
}

#[test]
fn the_side_transformer_copies_the_main_blocks_and_leaves_the_output_untouched_at_initialisation() {
    let main = dit_main(flow());
    let side = dit_side(&main, 0);
    let t = side.config.transformer.as_ref().unwrap();
    assert_eq!(t.num_layers, 2, "0 layers = half of the main network's 4");
    let main_params: HashMap<String, Tensor> = main.named_parameters().into_iter().collect();
    let mut copied = 0;
    for (n, p) in side.named_parameters() {
        if n.starts_with("controlnet_blocks.") || n.starts_with("pos_embed_input.") {
            assert_eq!(p.abs().sum(Kind::Float).double_value(&[]), 0.0, "{n} must start at zero");
        } else {
            assert!(bitwise_equal(&p, &main_params[&n]), "{n} is not the main network's");
            copied += 1;
        }
    }
    assert!(copied > 10 && !side.named_parameters().iter().any(|(n, _)| n.starts_with("transformer_blocks.2.")));
    let (b, s) = batch(&main);
    let task = ControlTask::new(&main, &side, None).unwrap();
    let f = task.forward(&s.x_t, &s.model_t, &b.labels, b.condition.as_ref().unwrap()).unwrap();
    let plain = main.predict(&s.x_t, &s.model_t, &b.labels).unwrap();
    assert!(plain.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(bitwise_equal(&f.pred_full, &plain), "zero layers must leave the main network's output untouched");
}

#[test]
fn shared_embedding_reference_pass_equals_a_full_second_forward_bit_for_bit() {
    let main = dit_main(flow());
    let side = dit_side(&main, 2);
    randomize(&side, "controlnet_blocks.");
    randomize(&side, "pos_embed_input.");
    let (b, s) = batch(&main);
    let cond = b.condition.as_ref().unwrap();
    let reference = main.predict(&s.x_t, &s.model_t, &b.labels).unwrap();
    for pass in [ReferencePass::SharedEncoder, ReferencePass::Full] {
        let h = head(&main, &side, Hook::Mid, pass);
        let f = ControlTask::new(&main, &side, Some(&h)).unwrap().forward(&s.x_t, &s.model_t, &b.labels, cond).unwrap();
        assert!(bitwise_equal(f.pred_main.as_ref().unwrap(), &reference), "{pass:?}");
        assert!(!bitwise_equal(&f.pred_full, &reference), "trained zero layers must change the controlled output");
    }
}

#[test]
fn residuals_are_added_after_the_main_blocks_in_sd3_groups() {
    let main = dit_main(flow());
    let Backbone::Transformer(dit) = &main.backbone else { panic!("not a transformer") };
    let (b, s) = batch(&main);
    let encoder_hidden_states = main.label_encoder.forward(&b.labels).unwrap();
    let emb = dit.embed(&s.x_t, &s.model_t, &encoder_hidden_states).unwrap();
    let r: Vec<Tensor> = (0..2).map(|_| emb.tokens.randn_like()).collect();
    let got = dit.run_blocks(&emb, Some(&r)).unwrap();
    // 4 blocks, 2 residuals: blocks 0 and 1 take r[0], blocks 2 and 3 take r[1].
    let mut x = emb.tokens.shallow_clone();
    for (i, block) in dit.transformer_blocks.iter().enumerate() {
        x = block.forward(&x, &emb.c).unwrap() + &r[i / 2];
    }
    assert!(bitwise_equal(&got, &dit.output(&x, &emb.c).unwrap()));
    // The same through the main network's generic path; lists that do not fit are refused.
    let shared = crate::pipeline::SharedPass::Transformer(emb);
    let blocks = |r: Vec<Tensor>| crate::pipeline::Residuals::Blocks(r);
    assert!(bitwise_equal(
        &got,
        &main.up(&shared, Some(&blocks(r.iter().map(Tensor::shallow_clone).collect()))).unwrap()
    ));
    assert!(main.up(&shared, Some(&blocks(vec![]))).is_err(), "an empty residual list is refused");
    assert!(
        main.up(&shared, Some(&blocks((0..5).map(|_| r[0].shallow_clone()).collect()))).is_err(),
        "more residuals than blocks"
    );
    let unet_like = crate::pipeline::Residuals::UNet { down: vec![], mid: r[0].shallow_clone() };
    let e = main.up(&shared, Some(&unet_like)).unwrap_err().to_string();
    assert!(e.contains("architecture"), "{e}");
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

#[test]
fn lisa_on_a_transformer_starts_at_mean_r_squared_and_trains_the_side_network_up_to_the_hooked_block() {
    let main = dit_main(flow());
    let side = dit_side(&main, 3);
    let (b, s) = batch(&main);
    // Zero-initialised decoder: L_lisa = mean(r²), r = velocity target − main prediction.
    let h = head(&main, &side, Hook::Block(0), ReferencePass::SharedEncoder);
    let out = ControlTask::new(&main, &side, Some(&h)).unwrap().loss(&b, &s).unwrap();
    let get = |name: &str| out.metrics.iter().find(|(n, _)| n == name).unwrap().1.double_value(&[]);
    let r = &s.target - main.predict(&s.x_t, &s.model_t, &b.labels).unwrap();
    assert_eq!(get("l_lisa"), get("r_sq"));
    assert_eq!(r.square().mean(Kind::Float).double_value(&[]), get("r_sq"));

    // Only the LISA term, with a non-zero decoder output: gradients reach block 0 and what feeds it.
    tch::no_grad(|| {
        let _ = h.decoder.conv_out.weight.shallow_clone().copy_(&(h.decoder.conv_out.weight.randn_like() * 0.1));
    });
    let f = ControlTask::new(&main, &side, Some(&h))
        .unwrap()
        .forward(&s.x_t, &s.model_t, &b.labels, b.condition.as_ref().unwrap())
        .unwrap();
    let r = likelihood_residual(&s.target, f.pred_main.as_ref().unwrap());
    f.decoded.unwrap().mse_loss(&r, tch::Reduction::Mean).backward();
    let with = params_with_gradient(&side);
    for name in [
        "pos_embed.proj.weight",
        "pos_embed_input.proj.weight",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "time_text_embed.text_embedder.linear_2.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.ff.net.2.weight",
        "transformer_blocks.0.norm1.linear.weight",
    ] {
        assert!(with.iter().any(|n| n == name), "{name} has no LISA gradient; got {with:?}");
    }
    let after: Vec<&String> = with
        .iter()
        .filter(|n| {
            n.starts_with("controlnet_blocks.")
                || n.starts_with("transformer_blocks.1.")
                || n.starts_with("transformer_blocks.2.")
        })
        .collect();
    assert!(after.is_empty(), "parameters after the hook got LISA gradients: {after:?}");
    assert!(main.named_parameters().iter().all(|(_, p)| !p.grad().defined()), "the main network got gradients");

    // `mid` is the last side block; a block the side network lacks is refused with the choices.
    let mid = head(&main, &side, Hook::Mid, ReferencePass::SharedEncoder);
    assert_eq!(mid.hook, Hook::Mid);
    let e = LisaHead::new(&main, &side, &LisaConfig { hook: Hook::Block(3), ..LisaConfig::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("block_3 does not exist") && e.contains("block_0, block_1, block_2"), "{e}");
    let e = LisaHead::new(&main, &side, &LisaConfig { hook: Hook::Down(0), ..LisaConfig::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("down_0 does not exist"), "{e}");
}

#[test]
fn a_transformer_side_network_trains_saves_loads_and_samples() {
    let main = dit_main(flow());
    let side = dit_side(&main, 2);
    let h = head(&main, &side, Hook::Mid, ReferencePass::SharedEncoder);
    let before: Vec<Tensor> = main.named_parameters().iter().map(|(_, p)| p.copy()).collect();
    let side_before: Vec<Tensor> = side.named_parameters().iter().map(|(_, p)| p.copy()).collect();
    let dir = tempfile::tempdir().unwrap();
    super::tests::train_three_steps(&main, &side, &h, dir.path());
    for ((n, p), b) in main.named_parameters().iter().zip(&before) {
        assert!(bitwise_equal(p, b), "main parameter {n} changed");
    }
    let moved = side.named_parameters().iter().zip(&side_before).filter(|((_, p), b)| !bitwise_equal(p, b)).count();
    assert!(moved > side_before.len() / 2, "only {moved} of {} side parameters moved", side_before.len());

    // Saved without the decoder, loaded back identical, refused next to a UNet main network.
    let saved = dir.path().join("side-network");
    side.save(&saved).unwrap();
    let text = std::fs::read_to_string(saved.join("config.json")).unwrap();
    assert!(text.contains("\"transformer\"") && !text.contains("\"controlnet\""), "{text}");
    // The main network's folder holds no unused UNet section either, and loads back identical.
    main.save(&dir.path().join("main")).unwrap();
    let text = std::fs::read_to_string(dir.path().join("main/config.json")).unwrap();
    assert!(text.contains("\"transformer\"") && !text.contains("\"unet\""), "{text}");
    let again = MainNetwork::load(&dir.path().join("main"), Device::Cpu).unwrap();
    assert_eq!(again.config, main.config);
    let loaded = SideNetwork::load(&saved, &main).unwrap();
    for ((n, a), (_, b)) in side.named_parameters().iter().zip(loaded.named_parameters()) {
        assert!(bitwise_equal(a, &b), "{n} differs after loading");
    }
    let unet_main =
        MainNetwork::new(&MainNetworkConfig { objective: flow(), ..Default::default() }, Device::Cpu).unwrap();
    let e = SideNetwork::load(&saved, &unet_main).err().unwrap().to_string();
    assert!(e.contains("different architecture"), "{e}");
    assert!(side.export_diffusers(&dir.path().join("export")).is_err(), "no diffusers ControlNet for a transformer");

    // Controlled sampling with guidance: reproducible, and the control changes the samples.
    let y = Tensor::from_slice(&[0i64, 2]);
    let c = Tensor::rand([2, 1, 8, 8], CPU);
    let sampler = SamplerConfig { kind: SamplerKind::Euler, steps: 3, ..SamplerConfig::default() };
    let control = |scale: f64| Control {
        side: &loaded,
        condition: c.shallow_clone(),
        options: ControlOptions { conditioning_scale: scale, ..ControlOptions::default() },
    };
    let a = sample_controlled(&main, &[control(1.0)], &y, &sampler, 2.0, 9).unwrap();
    let again = sample_controlled(&main, &[control(1.0)], &y, &sampler, 2.0, 9).unwrap();
    let off = sample_controlled(&main, &[control(0.0)], &y, &sampler, 2.0, 9).unwrap();
    assert!(bitwise_equal(&a, &again));
    assert!(!bitwise_equal(&a, &off));
    assert_eq!(a.size(), [2, 1, 8, 8]);
}

#[test]
fn a_video_transformer_attends_across_frames_and_lisa_decodes_frame_by_frame() {
    tch::manual_seed(5);
    let cfg = MainNetworkConfig {
        transformer: Some(DiTConfig { num_frames: 4, ..tiny_dit() }),
        label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 1 },
        objective: flow(),
        ..Default::default()
    };
    let main = randomized(MainNetwork::new(&cfg, Device::Cpu).unwrap());
    assert_eq!((main.config.in_channels(), main.config.num_frames()), (4, 4));
    let x = Tensor::randn([2, 4, 8, 8], CPU);
    let t = Tensor::from_slice(&[100i64, 800]);
    let y = Tensor::from_slice(&[0i64, 2]);
    let out = main.predict(&x, &t, &y).unwrap();
    assert_eq!(out.size(), [2, 4, 8, 8]);
    // Space-time attention: changing frame 3 changes the prediction of frame 0.
    let x2 = Tensor::cat(&[x.narrow(1, 0, 3), x.narrow(1, 3, 1) + 1.0], 1);
    let out2 = main.predict(&x2, &t, &y).unwrap();
    assert!(!out.narrow(1, 0, 1).equal(&out2.narrow(1, 0, 1)), "frames must see each other");
    // The frames' positions differ: the same frame content in every slot gives different outputs per slot.
    let same = x.narrow(1, 0, 1).repeat([1, 4, 1, 1]);
    let o = main.predict(&same, &t, &y).unwrap();
    assert!(!o.narrow(1, 0, 1).equal(&o.narrow(1, 1, 1)), "frames need a temporal position");

    let side = dit_side(&main, 1);
    let h = head(&main, &side, Hook::Mid, ReferencePass::SharedEncoder);
    assert_eq!(h.frames, 4);
    let c = Tensor::rand([2, 4, 8, 8], CPU);
    let task = ControlTask::new(&main, &side, Some(&h)).unwrap();
    let f = task.forward(&x, &t, &y, &c).unwrap();
    assert!(f.pred_full.equal(&out), "zero layers leave the clip's prediction untouched");
    assert_eq!(f.decoded.as_ref().unwrap().size(), [2, 4, 8, 8], "frames back as channels");
    // The decoder sees each frame with its clip's timestep: frame-folded decoding equals decoding each clip alone.
    tch::no_grad(|| {
        let _ = h.decoder.conv_out.weight.shallow_clone().copy_(&(h.decoder.conv_out.weight.randn_like() * 0.1));
    });
    let f = tch::no_grad(|| task.forward(&x, &t, &y, &c)).unwrap();
    let one =
        tch::no_grad(|| task.forward(&x.narrow(0, 1, 1), &t.narrow(0, 1, 1), &y.narrow(0, 1, 1), &c.narrow(0, 1, 1)))
            .unwrap();
    let diff = (f.decoded.unwrap().narrow(0, 1, 1) - one.decoded.unwrap()).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "{diff}");
    // A condition with the wrong number of frames is refused.
    assert!(task.forward(&x, &t, &y, &c.narrow(1, 0, 1)).is_err());
}

#[test]
fn cross_normalization_is_refused_for_a_transformer_side_network_with_the_setting_to_use() {
    let main = dit_main(flow());
    let cn = ControlNetConfig { cross_norm_scale: Some(0.35), ..ControlNetConfig::default() };
    let e = SideNetwork::for_main(&main, ConditionKind::Edges, cn, 2).err().unwrap().to_string();
    assert!(e.contains("UNet side networks") && e.contains("zero_conv"), "{e}");
}
