//! Tests of the ControlNet side network and the LISA decoder: diffusers key names, copying from
//! the UNet, exactness of the zero-initialised fusion, hooks and their gradients, decoder shapes
//! and initialisation. Shapes are tiny to stay fast.
use std::collections::HashMap;

use tch::{nn, Device, Kind, Tensor};

use super::*;

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// A tiny UNet: levels 8, 16, 16 (attention on levels 1 and 2), one resnet per block.
fn tiny_unet() -> UNetConfig {
    UNetConfig::tiny()
}

fn tiny_cn() -> ControlNetConfig {
    ControlNetConfig { conditioning_embedding_out_channels: vec![4, 8], ..ControlNetConfig::for_unet(&tiny_unet()) }
}

/// A random UNet and a ControlNet copied from it, each in its own VarStore.
fn pair(cfg: &ControlNetConfig) -> (nn::VarStore, UNet2DConditionModel, nn::VarStore, ControlNetModel) {
    let uvs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(uvs.root(), &cfg.unet).unwrap();
    let cvs = nn::VarStore::new(Device::Cpu);
    let cn = ControlNetModel::from_unet(cvs.root(), &uvs.variables(), cfg).unwrap();
    (uvs, unet, cvs, cn)
}

/// Sample [b, in, 8, 8], timesteps [b], encoder_hidden_states [b, 2, 8], condition [b, 1, 8, 8].
fn inputs(b: i64) -> (Tensor, Tensor, Tensor, Tensor) {
    (
        Tensor::randn([b, 1, 8, 8], CPU),
        Tensor::rand([b], CPU) * 1000.0,
        Tensor::randn([b, 2, 8], CPU),
        Tensor::rand([b, 1, 8, 8], CPU),
    )
}

fn is_zero(t: &Tensor) -> bool {
    t.abs().sum(Kind::Float).double_value(&[]) == 0.0
}

fn zero_conv_names(vars: &HashMap<String, Tensor>) -> Vec<String> {
    let mut v: Vec<String> = vars
        .keys()
        .filter(|k| k.starts_with("controlnet_down_blocks.") || k.starts_with("controlnet_mid_block."))
        .cloned()
        .collect();
    v.sort();
    v
}

#[test]
fn controlnet_parameter_names_follow_diffusers() {
    let cfg = tiny_cn();
    let vs = nn::VarStore::new(Device::Cpu);
    let cn = ControlNetModel::new(vs.root(), &cfg).unwrap();
    let vars = vs.variables();
    for name in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "controlnet_cond_embedding.conv_in.weight",
        "controlnet_cond_embedding.blocks.0.weight",
        "controlnet_cond_embedding.blocks.1.weight",
        "controlnet_cond_embedding.conv_out.weight",
        "controlnet_down_blocks.0.weight",
        "controlnet_mid_block.bias",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.resnets.0.conv1.weight",
    ] {
        assert!(vars.contains_key(name), "missing {name}");
    }
    // No decoder (up path) in a ControlNet.
    assert!(!vars
        .keys()
        .any(|k| k.starts_with("up_blocks") || k.starts_with("conv_norm_out") || k.starts_with("conv_out")));
    // One zero conv per UNet skip sample, with the skip's channels, plus the mid one.
    let skips = cfg.unet.skip_channels();
    assert_eq!(cn.num_skips(), skips.len());
    for (i, c) in skips.iter().enumerate() {
        assert_eq!(vars[&format!("controlnet_down_blocks.{i}.weight")].size(), vec![*c, *c, 1, 1]);
    }
    assert!(!vars.contains_key(&format!("controlnet_down_blocks.{}.weight", skips.len())));
    assert_eq!(vars["controlnet_mid_block.weight"].size(), vec![16, 16, 1, 1]);
    assert_eq!(vars["controlnet_cond_embedding.conv_in.weight"].size(), vec![4, 1, 3, 3]);
    assert_eq!(vars["controlnet_cond_embedding.blocks.1.weight"].size(), vec![8, 4, 3, 3]);
    assert_eq!(vars["controlnet_cond_embedding.conv_out.weight"].size(), vec![8, 8, 3, 3]);
    // Every shared parameter has the UNet's name and shape.
    let uvs = nn::VarStore::new(Device::Cpu);
    let _u = UNet2DConditionModel::new(uvs.root(), &cfg.unet).unwrap();
    let uvars = uvs.variables();
    for (k, v) in &vars {
        if controlnet::SHARED_PREFIXES.iter().any(|p| k.starts_with(p)) {
            assert_eq!(uvars[k].size(), v.size(), "{k}");
        }
    }
}

#[test]
fn controlnet_config_reads_a_flat_diffusers_config_and_validates() {
    let json = r#"{"in_channels": 1, "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 2,
        "conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256], "conditioning_downscale": 8,
        "_class_name": "ControlNetModel"}"#;
    let cfg: ControlNetConfig = serde_json::from_str(json).unwrap();
    assert_eq!(cfg.unet.block_out_channels, vec![8, 16]);
    assert_eq!(cfg.conditioning_channels, 3);
    assert_eq!(cfg.num_stride2(), 3);
    cfg.validate().unwrap();
    let back: ControlNetConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    for bad in [
        ControlNetConfig { conditioning_downscale: 3, ..tiny_cn() },
        ControlNetConfig { conditioning_downscale: 4, ..tiny_cn() }, // needs 2 stride-2 stages, has 1
        ControlNetConfig { conditioning_channels: 0, ..tiny_cn() },
        ControlNetConfig { conditioning_embedding_out_channels: vec![], ..tiny_cn() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn conditioning_downscale_sets_the_condition_resolution() {
    let cfg = ControlNetConfig { conditioning_downscale: 2, ..tiny_cn() };
    let vs = nn::VarStore::new(Device::Cpu);
    let cn = ControlNetModel::new(vs.root(), &cfg).unwrap();
    let (x, t, c, _) = inputs(2);
    tch::no_grad(|| {
        let out = cn.forward(&x, &t, &c, &Tensor::rand([2, 1, 16, 16], CPU), 1.0, None, None).unwrap();
        assert_eq!(out.down_block_res_samples[0].size(), vec![2, 8, 8, 8]);
        // A condition at the sample's resolution is an error that says what to do.
        let e = cn.forward(&x, &t, &c, &Tensor::rand([2, 1, 8, 8], CPU), 1.0, None, None).unwrap_err();
        assert!(e.to_string().contains("conditioning_downscale"), "{e}");
    });
}

#[test]
fn from_unet_copies_shared_weights_exactly_and_keeps_zero_convs() {
    let cfg = tiny_cn();
    let uvs = nn::VarStore::new(Device::Cpu);
    let _unet = UNet2DConditionModel::new(uvs.root(), &cfg.unet).unwrap();
    // Under a prefix, next to other variables, to check names are resolved relative to the path.
    let vs = nn::VarStore::new(Device::Cpu);
    let _cn = ControlNetModel::from_unet(vs.root() / "controlnet", &uvs.variables(), &cfg).unwrap();
    let vars = vs.variables();
    let mut copied = 0;
    for (k, u) in uvs.variables() {
        if controlnet::SHARED_PREFIXES.iter().any(|p| k.starts_with(p)) {
            assert!(vars[&format!("controlnet.{k}")].equal(&u), "{k} not copied");
            copied += 1;
        }
    }
    assert!(copied > 50, "{copied}");
    let mine: HashMap<String, Tensor> =
        vars.into_iter().filter_map(|(k, v)| k.strip_prefix("controlnet.").map(|s| (s.to_string(), v))).collect();
    let zs = zero_conv_names(&mine);
    assert_eq!(zs.len(), 2 * (cfg.unet.skip_channels().len() + 1));
    for k in zs
        .iter()
        .map(String::as_str)
        .chain(["controlnet_cond_embedding.conv_out.weight", "controlnet_cond_embedding.conv_out.bias"])
    {
        assert!(is_zero(&mine[k]), "{k} not zero");
    }
    assert!(!is_zero(&mine["controlnet_cond_embedding.conv_in.weight"]));
    // A different encoder is a clear error, in both directions.
    let deeper = ControlNetConfig { unet: UNetConfig { layers_per_block: 2, ..cfg.unet.clone() }, ..cfg.clone() };
    let vs2 = nn::VarStore::new(Device::Cpu);
    let e = ControlNetModel::from_unet(vs2.root(), &uvs.variables(), &deeper).unwrap_err();
    assert!(e.to_string().contains("UNet has no parameter"), "{e}");
    assert!(vs2.variables().is_empty(), "a failed from_unet left variables behind");
    let uvs2 = nn::VarStore::new(Device::Cpu);
    let _u2 = UNet2DConditionModel::new(uvs2.root(), &deeper.unet).unwrap();
    let e = ControlNetModel::from_unet(nn::VarStore::new(Device::Cpu).root(), &uvs2.variables(), &cfg).unwrap_err();
    assert!(e.to_string().contains("ControlNet has no parameter"), "{e}");
    let wider = ControlNetConfig { unet: UNetConfig { cross_attention_dim: 16, ..cfg.unet.clone() }, ..cfg.clone() };
    let e = ControlNetModel::from_unet(nn::VarStore::new(Device::Cpu).root(), &uvs.variables(), &wider).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
}

#[test]
fn controlled_output_equals_uncontrolled_at_init_and_scale_zero() {
    let cfg = tiny_cn();
    let (_uvs, unet, cvs, cn) = pair(&cfg);
    let (x, t, c, cond) = inputs(2);
    tch::no_grad(|| {
        let base = unet.forward(&x, &t, &c, None, None).unwrap();
        let out = cn.forward(&x, &t, &c, &cond, 1.0, None, None).unwrap();
        assert_eq!(out.down_block_res_samples.len(), unet.num_skips());
        let y = unet.forward(&x, &t, &c, Some(&out.down_block_res_samples), Some(&out.mid_block_res_sample)).unwrap();
        assert!(y.equal(&base), "zero-initialised ControlNet changed the output");
        // Perturb every zero conv (and the embedding's conv_out): the control now matters...
        for (k, v) in cvs.variables() {
            if k.starts_with("controlnet_down_blocks.")
                || k.starts_with("controlnet_mid_block.")
                || k.starts_with("controlnet_cond_embedding.conv_out")
            {
                let _ = v.shallow_clone().copy_(&(Tensor::randn_like(&v) * 0.1));
            }
        }
        let out = cn.forward(&x, &t, &c, &cond, 1.0, None, None).unwrap();
        let y = unet.forward(&x, &t, &c, Some(&out.down_block_res_samples), Some(&out.mid_block_res_sample)).unwrap();
        assert!(!y.equal(&base));
        // ...and the condition too.
        let out2 = cn.forward(&x, &t, &c, &Tensor::rand_like(&cond), 1.0, None, None).unwrap();
        assert!(!out2.mid_block_res_sample.equal(&out.mid_block_res_sample));
        // Scale 0 restores the uncontrolled output exactly.
        let out = cn.forward(&x, &t, &c, &cond, 0.0, None, None).unwrap();
        let y = unet.forward(&x, &t, &c, Some(&out.down_block_res_samples), Some(&out.mid_block_res_sample)).unwrap();
        assert!(y.equal(&base));
    });
}

#[test]
fn side_network_encoder_equals_the_unet_encoder_at_init() {
    // The embedding's conv_out is zero, so the copied encoder sees exactly the UNet's input and
    // every hookable feature equals the UNet's own skip sample / mid output, bit for bit.
    let cfg = tiny_cn();
    let (_uvs, unet, _cvs, cn) = pair(&cfg);
    let (x, t, c, cond) = inputs(2);
    tch::no_grad(|| {
        let enc = unet.down_mid(&x, &t, &c).unwrap();
        for l in cn.hookable_layers(8, 8) {
            let h = cn.forward(&x, &t, &c, &cond, 1.0, Some(l.hook), None).unwrap().hooked.unwrap();
            let want = match l.hook {
                Hook::Mid => &enc.mid,
                Hook::Down(i) => &enc.down_block_res_samples[i],
                Hook::Block(_) => unreachable!("a UNet ControlNet lists no transformer blocks"),
            };
            assert!(h.equal(want), "{} differs from the UNet's feature", l.hook);
        }
    });
}

#[test]
fn hook_parses_and_prints() {
    assert_eq!("mid".parse::<Hook>().unwrap(), Hook::Mid);
    assert_eq!("down_5".parse::<Hook>().unwrap(), Hook::Down(5));
    assert_eq!(Hook::Down(5).to_string(), "down_5");
    for bad in ["", "up_1", "down_", "down_x", "down_-1", "Mid"] {
        assert!(bad.parse::<Hook>().is_err(), "{bad}");
    }
    let h: Hook = serde_json::from_str("\"down_3\"").unwrap();
    assert_eq!(h, Hook::Down(3));
    assert_eq!(serde_json::to_string(&Hook::Mid).unwrap(), "\"mid\"");
}

/// Zeroes the accumulated gradients of `vs`.
fn zero_grads(vs: &nn::VarStore) {
    for v in vs.trainable_variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn grad_is_zero(v: &Tensor) -> bool {
    let g = v.grad();
    !g.defined() || is_zero(&g)
}

#[test]
fn hooked_feature_has_the_reported_shape_and_trains_the_side_network_only_up_to_the_hook() {
    let cfg = tiny_cn();
    let (_uvs, _unet, cvs, cn) = pair(&cfg);
    let (x, t, c, cond) = inputs(2);
    let layers = cn.hookable_layers(8, 8);
    assert_eq!(layers.len(), cn.num_skips() + 1);
    assert_eq!(layers.last().unwrap().hook, Hook::Mid);
    let vars = cvs.variables();
    let zs = zero_conv_names(&vars);
    for l in &layers {
        zero_grads(&cvs);
        let out = cn.forward(&x, &t, &c, &cond, 1.0, Some(l.hook), None).unwrap();
        let h = out.hooked.expect("hooked feature");
        assert_eq!(h.size(), vec![2, l.channels, l.height, l.width], "{}", l.hook);
        assert!(h.requires_grad());
        h.square().mean(Kind::Float).backward();
        assert!(!grad_is_zero(&cn.conv_in.weight), "{}: no gradient at conv_in", l.hook);
        assert!(
            !grad_is_zero(&cn.controlnet_cond_embedding.conv_out.weight),
            "{}: no gradient at the embedding",
            l.hook
        );
        assert!(!grad_is_zero(&cn.time_embedding.linear_2.weight) || l.hook == Hook::Down(0), "{}", l.hook);
        for k in &zs {
            assert!(grad_is_zero(&vars[k]), "{}: zero conv {k} got a gradient", l.hook);
        }
    }
    // Once the embedding's conv_out is non-zero (after some training) the gradient reaches its first conv.
    tch::no_grad(|| {
        let w = &cn.controlnet_cond_embedding.conv_out.weight;
        let _ = w.shallow_clone().copy_(&(Tensor::randn_like(w) * 0.1));
    });
    zero_grads(&cvs);
    let out = cn.forward(&x, &t, &c, &cond, 1.0, Some(Hook::Mid), None).unwrap();
    out.hooked.unwrap().square().mean(Kind::Float).backward();
    assert!(!grad_is_zero(&cn.controlnet_cond_embedding.conv_in.weight));
    // Unknown hooks are errors.
    let e = cn.forward(&x, &t, &c, &cond, 1.0, Some(Hook::Down(cn.num_skips())), None).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

fn decoder(cin: i64, r: i64, out: i64, floor: i64) -> (nn::VarStore, LisaDecoder) {
    let vs = nn::VarStore::new(Device::Cpu);
    let d = LisaDecoder::new(vs.root(), cin, r, out, 1, &DecoderConfig { channel_floor: floor, ..Default::default() })
        .unwrap();
    (vs, d)
}

#[test]
fn decoder_shapes_blocks_and_zero_init() {
    for (k, r) in [(0usize, 8i64), (1, 4), (2, 2)] {
        let (vs, d) = decoder(16, r, 8, 8);
        assert_eq!(d.num_blocks(), k);
        assert_eq!(d.conv_refine.is_some(), k == 0);
        let h = Tensor::randn([3, 16, r, r], CPU);
        let y = d.forward(&h, &(Tensor::rand([3], CPU) * 1000.0)).unwrap();
        assert_eq!(y.size(), vec![3, 1, 8, 8]);
        assert!(is_zero(&y), "k = {k}: output not zero at init");
        let vars = vs.variables();
        for i in 0..k {
            assert!(vars.contains_key(&format!("blocks.{i}.conv.weight")));
        }
        for n in ["time_linear.weight", "time_linear.bias", "conv_out.weight", "conv_out.bias"] {
            assert!(vars.contains_key(n), "{n}");
        }
        assert_eq!(vars["time_linear.weight"].size(), vec![16, 256]);
    }
    // The channel rule, literally: C → max(C/2, floor); 1×1 first conv from ≥ 512 channels;
    // k = 0 keeps C when C ≤ floor.
    let (_vs, d) = decoder(32, 8, 32, 64);
    assert_eq!(d.blocks[0].conv.weight.size(), vec![64, 32, 3, 3]); // widened to the floor
    assert_eq!(d.blocks[1].conv.weight.size(), vec![64, 64, 3, 3]);
    assert_eq!(d.conv_out.weight.size(), vec![1, 64, 3, 3]);
    let (_vs, d) = decoder(512, 4, 16, 64);
    assert_eq!(d.blocks[0].conv.weight.size(), vec![256, 512, 1, 1]);
    assert_eq!(d.blocks[1].conv.weight.size(), vec![128, 256, 3, 3]);
    let (_vs, d) = decoder(32, 8, 8, 64);
    assert_eq!(d.conv_refine.as_ref().unwrap().weight.size(), vec![32, 32, 3, 3]);
    let (_vs, d) = decoder(256, 8, 8, 64);
    assert_eq!(d.conv_refine.as_ref().unwrap().weight.size(), vec![128, 256, 3, 3]);
    // Non power-of-two ratios and wrong feature sizes are errors.
    let vs = nn::VarStore::new(Device::Cpu);
    assert!(LisaDecoder::new(vs.root(), 16, 3, 8, 1, &DecoderConfig::default()).is_err());
    assert!(LisaDecoder::new(vs.root(), 16, 16, 8, 1, &DecoderConfig::default()).is_err());
    let (_vs, d) = decoder(16, 4, 8, 8);
    assert!(d.forward(&Tensor::randn([1, 16, 8, 8], CPU), &Tensor::from_slice(&[1.0f32])).is_err());
}

#[test]
fn decoder_output_depends_on_time_once_trained() {
    let (_vs, d) = decoder(16, 4, 8, 8);
    tch::no_grad(|| {
        let w = &d.conv_out.weight;
        let _ = w.shallow_clone().copy_(&Tensor::randn_like(w));
    });
    let h = Tensor::randn([1, 16, 4, 4], CPU);
    let y1 = d.forward(&h, &Tensor::from_slice(&[10.0f32])).unwrap();
    let y2 = d.forward(&h, &Tensor::from_slice(&[500.0f32])).unwrap();
    assert!(!is_zero(&y1));
    assert!(!y1.equal(&y2), "the time embedding has no effect");
    // The projection is [cos, sin] with base 10000: column 0 is cos(t), column 128 sin(t).
    let t = Tensor::from_slice(&[10.0f32, 500.0]);
    let e = d.time_proj.forward(&t).unwrap();
    assert_eq!(e.size(), vec![2, 256]);
    assert!(e.select(1, 0).allclose(&t.cos(), 1e-5, 1e-5, false));
    assert!(e.select(1, 128).allclose(&t.sin(), 1e-5, 1e-5, false));
    let f = (-(10000f64).ln() / 128.0).exp();
    assert!(e.select(1, 129).allclose(&(&t * f).sin(), 1e-5, 1e-5, false));
    // A scalar timestep is shared by the batch.
    let h2 = Tensor::cat(&[&h, &h], 0);
    let y = d.forward(&h2, &Tensor::from(10.0f32)).unwrap();
    let diff = (y.get(1) - y1.get(0)).abs().max().double_value(&[]);
    // Not bit-exact: libtorch may pick another conv kernel for batch 2.
    assert!(diff < 1e-4, "batched scalar timestep differs by {diff}");
    // Gradients reach the hooked feature and the time projection.
    let h = h.set_requires_grad(true);
    d.forward(&h, &Tensor::from_slice(&[10.0f32])).unwrap().square().sum(Kind::Float).backward();
    assert!(!is_zero(&h.grad()));
    assert!(!grad_is_zero(&d.time_linear.weight));
}

#[test]
fn default_side_network_and_decoder_parameter_counts() {
    let cfg = ControlNetConfig::default();
    let vs = nn::VarStore::new(Device::Cpu);
    let cn = ControlNetModel::new(vs.root(), &cfg).unwrap();
    let side = parameter_count(&vs);
    let mid = *cn.hookable_layers(32, 32).last().unwrap();
    assert_eq!(mid.hook, Hook::Mid);
    let dvs = nn::VarStore::new(Device::Cpu);
    let dec =
        LisaDecoder::new(dvs.root(), mid.channels, mid.height, 32, cfg.unet.out_channels, &DecoderConfig::default())
            .unwrap();
    let n = parameter_count(&dvs);
    println!(
        "default side network: {side} parameters; LISA decoder (hook mid, {}x{}x{} -> 1x32x32, {} blocks): {n} ({:.1}% of the side network)",
        mid.channels,
        mid.height,
        mid.width,
        dec.num_blocks(),
        100.0 * n as f64 / side as f64
    );
    for l in cn.hookable_layers(32, 32) {
        println!("  hook {}: {}x{}x{}", l.hook, l.channels, l.height, l.width);
    }
    for floor in [32, 16] {
        let v = nn::VarStore::new(Device::Cpu);
        let _d = LisaDecoder::new(
            v.root(),
            mid.channels,
            mid.height,
            32,
            1,
            &DecoderConfig { channel_floor: floor, ..Default::default() },
        )
        .unwrap();
        println!("  decoder with channel_floor {floor}: {} parameters", parameter_count(&v));
    }
    assert_eq!(dec.num_blocks(), 2);
    assert!(n < side / 4, "decoder {n} vs side network {side}");
    let (x, t, c) = (Tensor::randn([1, 1, 32, 32], CPU), Tensor::from_slice(&[3.0f32]), Tensor::randn([1, 1, 64], CPU));
    let out =
        tch::no_grad(|| cn.forward(&x, &t, &c, &Tensor::rand([1, 1, 32, 32], CPU), 1.0, Some(Hook::Mid), None)).unwrap();
    let y = tch::no_grad(|| dec.forward(out.hooked.as_ref().unwrap(), &t)).unwrap();
    assert_eq!(y.size(), vec![1, 1, 32, 32]);
}

fn cross_norm_cn(scale: f64) -> ControlNetConfig {
    ControlNetConfig { cross_norm_scale: Some(scale), ..tiny_cn() }
}

#[test]
fn cross_normalization_matches_its_formula_on_a_hand_computed_example() {
    // Side feature [1, 2, 3, 4] and main feature [0, 0, 2, 2] (one example, 4 channels): mean_c 2.5,
    // std_c = sqrt(5/3), mean_m 1, std_m = sqrt(4/3) (unbiased, as torch.std).
    let h_c = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).reshape([1, 4, 1, 1]);
    let h_m = Tensor::from_slice(&[0.0f64, 0.0, 2.0, 2.0]).reshape([1, 4, 1, 1]);
    let out: Vec<f64> = Vec::try_from(controlnet::cross_normalize(&h_c, &h_m).unwrap().flatten(0, -1)).unwrap();
    let (std_c, std_m) = ((5.0f64 / 3.0).sqrt(), (4.0f64 / 3.0).sqrt());
    for (o, c) in out.iter().zip([1.0, 2.0, 3.0, 4.0]) {
        let want = (c - 2.5) * std_m / (std_c + controlnet::CROSS_NORM_EPS) + 1.0;
        assert!((o - want).abs() < 1e-12, "{o} vs {want}");
    }
}

#[test]
fn cross_normalization_gives_each_example_the_main_features_statistics_whatever_the_side_features_scale() {
    tch::manual_seed(3);
    let f64s = (Kind::Double, Device::Cpu);
    let per_example = |v: [f64; 3]| Tensor::from_slice(&v).reshape([3, 1, 1, 1]);
    let h_c = Tensor::randn([3, 4, 5, 5], f64s);
    let h_m = Tensor::randn([3, 4, 5, 5], f64s) * per_example([0.5, 2.0, 7.0]) + per_example([-1.0, 0.0, 3.0]);
    let out = controlnet::cross_normalize(&h_c, &h_m).unwrap();
    let dims: &[i64] = &[1, 2, 3];
    let close = |a: &Tensor, b: &Tensor, tol: f64| (a - b).abs().max().double_value(&[]) < tol;
    assert!(close(&out.mean_dim(dims, false, None), &h_m.mean_dim(dims, false, None), 1e-9), "per-example means");
    assert!(close(&out.std_dim(dims, true, false), &h_m.std_dim(dims, true, false), 1e-5), "per-example stds");
    // Shifting and rescaling the side feature (per example, by a positive factor) changes nothing but ε's share.
    let moved = &h_c * per_example([3.0, 0.2, 10.0]) + 5.0;
    assert!(close(&controlnet::cross_normalize(&moved, &h_m).unwrap(), &out, 1e-3));
    let e = controlnet::cross_normalize(&h_c, &h_m.narrow(1, 0, 2)).unwrap_err().to_string();
    assert!(e.contains("differ in shape"), "{e}");
}

#[test]
fn a_cross_normalized_controlnet_has_no_zero_convs_and_starts_by_adding_scale_times_the_main_features() {
    let cfg = cross_norm_cn(0.35);
    let (_uvs, unet, cvs, cn) = pair(&cfg);
    assert!(zero_conv_names(&cvs.variables()).is_empty(), "no zero convolutions");
    let (x, t, c, cond) = inputs(2);
    let main = unet.down_mid(&x, &t, &c).unwrap();
    let out = cn.forward(&x, &t, &c, &cond, 0.5, None, Some(&main)).unwrap();
    assert_eq!(out.down_block_res_samples.len(), main.down_block_res_samples.len());
    // At initialisation the side encoder is the main one and the condition embedding is zero, so each side
    // feature is the main feature: cross-normalized, it is that feature again (up to ε), times 0.35 · 0.5.
    let sites = out.down_block_res_samples.iter().zip(&main.down_block_res_samples);
    for (r, m) in sites.chain([(&out.mid_block_res_sample, &main.mid)]) {
        let want = m * (0.35 * 0.5);
        let err = (r - &want).abs().max().double_value(&[]);
        assert!(err < 1e-4 * want.abs().max().double_value(&[]).max(1.0), "off 0.175 · main by {err}");
    }
    // Without the main features it cannot run, and says what it needs.
    let e = cn.forward(&x, &t, &c, &cond, 1.0, None, None).unwrap_err().to_string();
    assert!(e.contains("main network's encoder features"), "{e}");
}

#[test]
fn a_cross_norm_scale_must_be_positive_and_such_a_network_does_not_export_to_diffusers() {
    for bad in [0.0, -0.1, f64::NAN] {
        let e = cross_norm_cn(bad).validate().unwrap_err().to_string();
        assert!(e.contains("cross_norm_scale"), "{e}");
    }
    let e = diffusers::controlnet_config_to_json(&cross_norm_cn(0.35)).unwrap_err().to_string();
    assert!(e.contains("cannot be exported to diffusers") && e.contains("zero_conv"), "{e}");
    // The field is not written for a diffusers ControlNet: a zero-conv config serialises as before.
    let json = serde_json::to_value(tiny_cn()).unwrap();
    assert!(json.get("cross_norm_scale").is_none());
    let back: ControlNetConfig = serde_json::from_value(serde_json::to_value(cross_norm_cn(0.35)).unwrap()).unwrap();
    assert_eq!(back.cross_norm_scale, Some(0.35));
}
