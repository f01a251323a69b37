//! Tests of the UNet: shapes, diffusers key names, residual placement, the encode/decode split,
//! per-sample timesteps, save/load, validation and gradients. Shapes are tiny to stay fast.
use tch::{nn, Device, Kind, Tensor};

use super::*;
use crate::Error;

/// A tiny config: `levels` levels of 8, 16, 16 channels, attention where `attn[i]`.
fn tiny(attn: &[bool], layers_per_block: i64) -> UNetConfig {
    let n = attn.len();
    let chans = [8, 16, 16, 16];
    UNetConfig {
        sample_size: 8,
        in_channels: 1,
        out_channels: 1,
        block_out_channels: chans[..n].to_vec(),
        layers_per_block,
        down_block_types: attn
            .iter()
            .map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string())
            .collect(),
        up_block_types: attn
            .iter()
            .rev()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
            .collect(),
        cross_attention_dim: 8,
        attention_head_dim: PerBlock::All(2),
        norm_num_groups: 4,
        ..UNetConfig::default()
    }
}

fn build(cfg: &UNetConfig) -> (nn::VarStore, UNet2DConditionModel) {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = UNet2DConditionModel::new(vs.root(), cfg).unwrap();
    (vs, m)
}

/// Random inputs: sample [b, in, h, w], timesteps [b] in (0, 1000), encoder_hidden_states [b, 2, cross_dim].
fn inputs(cfg: &UNetConfig, b: i64, h: i64, w: i64) -> (Tensor, Tensor, Tensor) {
    let opts = (Kind::Float, Device::Cpu);
    (
        Tensor::randn([b, cfg.in_channels, h, w], opts),
        Tensor::rand([b], opts) * 1000.0,
        Tensor::randn([b, 2, cfg.cross_attention_dim], opts),
    )
}

#[test]
fn output_shape_equals_input_shape() {
    let cases: Vec<(UNetConfig, i64, i64)> = vec![
        (tiny(&[false, false], 1), 8, 8),
        (tiny(&[false, true], 1), 8, 8),
        (tiny(&[true, true], 2), 8, 8),
        (tiny(&[false, true, true], 1), 8, 8),
        (tiny(&[false, true, true], 2), 8, 8),
        (tiny(&[true, false, true], 1), 10, 6), // odd intermediate size: 10×6 → 5×3 → 3×2
        (UNetConfig { use_linear_projection: true, ..tiny(&[false, true], 1) }, 8, 8),
        (UNetConfig { in_channels: 3, out_channels: 2, ..tiny(&[false, true], 1) }, 8, 8),
    ];
    for (cfg, h, w) in cases {
        let (_vs, m) = build(&cfg);
        let (x, t, c) = inputs(&cfg, 2, h, w);
        let y = tch::no_grad(|| m.forward(&x, &t, &c, None, None)).unwrap();
        assert_eq!(y.size(), vec![2, cfg.out_channels, h, w], "{cfg:?}");
        let enc = tch::no_grad(|| m.down_mid(&x, &t, &c)).unwrap();
        let shapes: Vec<[i64; 3]> = enc
            .down_block_res_samples
            .iter()
            .map(|s| {
                let z = s.size();
                [z[1], z[2], z[3]]
            })
            .collect();
        assert_eq!(shapes, cfg.skip_shapes(h, w), "{cfg:?}");
        assert_eq!(m.num_skips(), shapes.len());
        assert_eq!(cfg.skip_channels(), shapes.iter().map(|s| s[0]).collect::<Vec<_>>());
        let mid = enc.mid.size();
        assert_eq!([mid[1], mid[2], mid[3]], cfg.mid_shape(h, w));
    }
}

#[test]
fn parameter_names_follow_diffusers() {
    let cfg = tiny(&[false, true, true], 2);
    let (vs, _m) = build(&cfg);
    let vars = vs.variables();
    for name in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "time_embedding.linear_2.bias",
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.resnets.0.time_emb_proj.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight",
        "down_blocks.1.attentions.0.norm.weight",
        "down_blocks.1.attentions.0.proj_in.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.norm3.bias",
        "mid_block.resnets.1.conv2.bias",
        "mid_block.attentions.0.proj_out.weight",
        "up_blocks.0.resnets.2.conv_shortcut.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.2.resnets.1.norm1.weight",
        "conv_norm_out.weight",
        "conv_out.bias",
    ] {
        assert!(vars.contains_key(name), "missing {name}");
    }
    // No biases on q/k/v, no attention in DownBlock2D, no downsampler on the last level.
    for name in [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.bias",
        "down_blocks.0.attentions.0.norm.weight",
        "down_blocks.2.downsamplers.0.conv.weight",
        "up_blocks.2.upsamplers.0.conv.weight",
        "down_blocks.0.resnets.0.conv_shortcut.weight",
    ] {
        assert!(!vars.contains_key(name), "unexpected {name}");
    }
    // Shapes as in a diffusers checkpoint: 1×1-conv projections are 4-D, GEGLU doubles the width.
    let dims = |n: &str| vars[n].size();
    assert_eq!(dims("down_blocks.1.attentions.0.proj_in.weight"), vec![16, 16, 1, 1]);
    assert_eq!(dims("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"), vec![2 * 4 * 16, 16]);
    assert_eq!(dims("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"), vec![16, 8]);
    assert_eq!(dims("up_blocks.0.resnets.2.conv1.weight"), vec![16, 32, 3, 3]);
    assert_eq!(dims("time_embedding.linear_1.weight"), vec![32, 8]);
    let lin = UNetConfig { use_linear_projection: true, ..cfg };
    let (vs, _m) = build(&lin);
    assert_eq!(vs.variables()["mid_block.attentions.0.proj_in.weight"].size(), vec![16, 16]);
}

#[test]
fn zero_residuals_are_exact_and_nonzero_residuals_matter() {
    let cfg = tiny(&[false, true, true], 1);
    let (_vs, m) = build(&cfg);
    let (x, t, c) = inputs(&cfg, 2, 8, 8);
    tch::no_grad(|| {
        let base = m.forward(&x, &t, &c, None, None).unwrap();
        let zeros: Vec<Tensor> = cfg
            .skip_shapes(8, 8)
            .iter()
            .map(|s| Tensor::zeros([2, s[0], s[1], s[2]], (Kind::Float, Device::Cpu)))
            .collect();
        let mid = cfg.mid_shape(8, 8);
        let zmid = Tensor::zeros([2, mid[0], mid[1], mid[2]], (Kind::Float, Device::Cpu));
        let y = m.forward(&x, &t, &c, Some(&zeros), Some(&zmid)).unwrap();
        assert!(y.equal(&base));
        // Each residual alone changes the output: they are all used.
        for i in 0..zeros.len() {
            let mut r: Vec<Tensor> = zeros.iter().map(|z| z.copy()).collect();
            r[i] = Tensor::randn_like(&r[i]);
            let y = m.forward(&x, &t, &c, Some(&r), None).unwrap();
            assert!(!y.equal(&base), "residual {i} had no effect");
        }
        let y = m.forward(&x, &t, &c, None, Some(&Tensor::randn_like(&zmid))).unwrap();
        assert!(!y.equal(&base));
        // A wrong number of residuals is an error, not a silent truncation.
        assert!(m.forward(&x, &t, &c, Some(&zeros[1..]), None).is_err());
    });
}

#[test]
fn up_of_down_mid_equals_forward() {
    let cfg = tiny(&[false, true, true], 2);
    let (_vs, m) = build(&cfg);
    let (x, t, c) = inputs(&cfg, 2, 8, 8);
    tch::no_grad(|| {
        let y = m.forward(&x, &t, &c, None, None).unwrap();
        let enc = m.down_mid(&x, &t, &c).unwrap();
        assert!(m.up(&enc, None, None).unwrap().equal(&y));
        // Decoding twice from one encoding (the frozen-encoder reuse) is also exact.
        let res: Vec<Tensor> = enc.down_block_res_samples.iter().map(Tensor::randn_like).collect();
        let mres = Tensor::randn_like(&enc.mid);
        let a = m.up(&enc, Some(&res), Some(&mres)).unwrap();
        assert!(m.up(&enc, None, None).unwrap().equal(&y));
        assert!(m.forward(&x, &t, &c, Some(&res), Some(&mres)).unwrap().equal(&a));
    });
}

#[test]
fn per_sample_timesteps_match_separate_runs() {
    let cfg = tiny(&[false, true], 1);
    let (_vs, m) = build(&cfg);
    let (x, _, c) = inputs(&cfg, 3, 8, 8);
    // Continuous flow-matching times, and a shared scalar timestep.
    let t = Tensor::from_slice(&[0.05f32, 0.5, 0.937]);
    tch::no_grad(|| {
        let y = m.forward(&x, &t, &c, None, None).unwrap();
        for i in 0..3 {
            let yi = m.forward(&x.narrow(0, i, 1), &t.narrow(0, i, 1), &c.narrow(0, i, 1), None, None).unwrap();
            let d = (y.narrow(0, i, 1) - yi).abs().max().double_value(&[]);
            assert!(d < 1e-5, "row {i} differs by {d}");
        }
        let s = m.forward(&x, &Tensor::from(0.5f32), &c, None, None).unwrap();
        let full = m.forward(&x, &Tensor::from_slice(&[0.5f32; 3]), &c, None, None).unwrap();
        assert!(s.equal(&full));
        // Integer timesteps work too; a wrong length is an error.
        let ti = Tensor::from_slice(&[10i64, 500, 999]);
        assert!(m.forward(&x, &ti, &c, None, None).is_ok());
        assert!(m.forward(&x, &Tensor::from_slice(&[1.0f32, 2.0]), &c, None, None).is_err());
    });
}

#[test]
fn timestep_projection_matches_diffusers_formula() {
    // flip_sin_to_cos: [cos(t·f_i), sin(t·f_i)], f_i = exp(-ln(10000)·i/half).
    let tp = blocks::Timesteps::new(8, true, 0.0, Device::Cpu).unwrap();
    let e = tp.forward(&Tensor::from_slice(&[3.0f32])).unwrap();
    let v: Vec<f32> = Vec::try_from(e.view([-1])).unwrap();
    for i in 0..4 {
        let f = (-(10000f64).ln() * i as f64 / 4.0).exp();
        assert!((v[i] as f64 - (3.0 * f).cos()).abs() < 1e-5);
        assert!((v[4 + i] as f64 - (3.0 * f).sin()).abs() < 1e-5);
    }
}

#[test]
fn safetensors_round_trip_gives_identical_output() {
    let cfg = tiny(&[false, true], 1);
    let (vs, m) = build(&cfg);
    let (x, t, c) = inputs(&cfg, 2, 8, 8);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unet.safetensors");
    vs.save(&path).unwrap();
    let (mut vs2, m2) = build(&cfg);
    tch::no_grad(|| {
        assert!(!m2.forward(&x, &t, &c, None, None).unwrap().equal(&m.forward(&x, &t, &c, None, None).unwrap()));
        vs2.load(&path).unwrap();
        let a = m.forward(&x, &t, &c, None, None).unwrap();
        let b = m2.forward(&x, &t, &c, None, None).unwrap();
        assert!(a.equal(&b));
    });
}

#[test]
fn invalid_configs_are_rejected() {
    let bad = |cfg: UNetConfig, needle: &str| {
        let vs = nn::VarStore::new(Device::Cpu);
        match UNet2DConditionModel::new(vs.root(), &cfg) {
            Err(Error::Config(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("expected a config error about {needle}, got {other:?}"),
        }
    };
    let ok = tiny(&[false, true], 1);
    bad(UNetConfig { block_out_channels: vec![8, 16, 16], ..ok.clone() }, "down_block_types");
    bad(UNetConfig { block_out_channels: vec![], ..ok.clone() }, "empty");
    bad(UNetConfig { block_out_channels: vec![8, 18], ..ok.clone() }, "norm_num_groups");
    bad(UNetConfig { down_block_types: vec!["DownBlock2D".into(), "AttnDownBlock2D".into()], ..ok.clone() }, "AttnDownBlock2D");
    bad(UNetConfig { up_block_types: vec!["UpBlock2D".into(), "Up".into()], ..ok.clone() }, "up block type");
    bad(UNetConfig { mid_block_type: "UNetMidBlock2D".into(), ..ok.clone() }, "mid_block_type");
    bad(UNetConfig { attention_head_dim: PerBlock::All(3), ..ok.clone() }, "attention heads");
    bad(UNetConfig { attention_head_dim: PerBlock::Each(vec![2, 2, 2]), ..ok.clone() }, "attention_head_dim");
    bad(UNetConfig { transformer_layers_per_block: PerBlock::All(0), ..ok.clone() }, "transformer_layers_per_block");
    bad(UNetConfig { layers_per_block: 0, ..ok.clone() }, "layers_per_block");
    bad(UNetConfig { norm_eps: 0.0, ..ok.clone() }, "norm_eps");
    bad(UNetConfig { cross_attention_dim: 0, ..ok.clone() }, "cross_attention_dim");
    bad(UNetConfig { in_channels: 0, ..ok }, "in_channels");
    assert!(UNetConfig::default().validate().is_ok());
}

#[test]
fn diffusers_config_json_loads() {
    // The UNet part of an SD-1.5-style config.json (abridged), with fields we ignore.
    let json = r#"{
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;
    let cfg: UNetConfig = serde_json::from_str(json).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.attention_head_dim, PerBlock::All(8));
    assert_eq!(cfg.mid_block_config().cross_attn.num_heads, 8);
    assert_eq!(cfg.skip_channels(), vec![320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]);
    // SD 2.x lists heads per block.
    let cfg2: UNetConfig =
        serde_json::from_str(r#"{"attention_head_dim": [2, 4, 4], "use_linear_projection": true}"#).unwrap();
    assert_eq!(cfg2.cross_attn(1).num_heads, 4);
    cfg2.validate().unwrap();
    let back: UNetConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn gradient_reaches_conv_in() {
    let cfg = tiny(&[false, true], 1);
    let (_vs, m) = build(&cfg);
    let (x, t, c) = inputs(&cfg, 2, 8, 8);
    let loss = m.forward(&x, &t, &c, None, None).unwrap().square().mean(Kind::Float);
    loss.backward();
    let g = m.conv_in.weight.grad();
    assert!(g.defined());
    assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let g = m.time_embedding.linear_1.weight.grad();
    assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn label_encoder_feeds_the_unet() {
    let cfg = tiny(&[false, true], 1);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let unet = UNet2DConditionModel::new(&root / "unet", &cfg).unwrap();
    let lcfg = LabelEncoderConfig { num_classes: 10, num_tokens: 3 };
    let enc = LabelEncoder::new(&root / "label_encoder", &lcfg, cfg.cross_attention_dim).unwrap();
    assert_eq!(vs.variables()["label_encoder.embedding.weight"].size(), vec![11, 3 * 8]);
    assert_eq!(enc.null_label(), 10);
    let y = Tensor::from_slice(&[0i64, 9, 10]);
    let encoder_hidden_states = enc.forward(&y).unwrap();
    assert_eq!(encoder_hidden_states.size(), vec![3, 3, 8]);
    assert!(encoder_hidden_states.get(2).equal(&enc.forward(&enc.null_labels(1, Device::Cpu).unwrap()).unwrap().get(0)));
    let (x, t, _) = inputs(&cfg, 3, 8, 8);
    let out = tch::no_grad(|| unet.forward(&x, &t, &encoder_hidden_states, None, None)).unwrap();
    assert_eq!(out.size(), x.size());
    assert!(LabelEncoder::new(&root / "bad", &LabelEncoderConfig { num_classes: 0, num_tokens: 1 }, 8).is_err());
}

#[test]
fn default_config_parameter_count() {
    let cfg = UNetConfig::default();
    let (vs, m) = build(&cfg);
    let n = parameter_count(&vs);
    println!("default UNet parameters: {n}");
    assert_eq!(n, trainable_parameter_count(&vs));
    assert!(n > 100_000 && n < 10_000_000, "{n}");
    assert_eq!(m.num_skips(), 6);
    let (x, t, c) = inputs(&cfg, 1, 32, 32);
    let y = tch::no_grad(|| m.forward(&x, &t, &c, None, None)).unwrap();
    assert_eq!(y.size(), vec![1, 1, 32, 32]);
}

/// Plain attention from the formula, to check the fused and single-token fast paths.
fn reference_attention(a: &blocks::Attention, x: &Tensor, ctx: &Tensor, heads: i64) -> Tensor {
    let (b, n, _) = x.size3().unwrap();
    let m = ctx.size()[1];
    let split = |t: Tensor, l: i64| t.view([b, l, heads, -1]).transpose(1, 2);
    let q = split(x.linear::<Tensor>(&a.to_q.weight, None), n);
    let k = split(ctx.linear::<Tensor>(&a.to_k.weight, None), m);
    let v = split(ctx.linear::<Tensor>(&a.to_v.weight, None), m);
    let d = q.size()[3] as f64;
    let w = (q.matmul(&k.transpose(-1, -2)) / d.sqrt()).softmax(-1, Kind::Float);
    let o = w.matmul(&v).transpose(1, 2).reshape([b, n, -1]);
    o.linear(&a.to_out.weight, a.to_out.bias.as_ref())
}

#[test]
fn attention_fast_paths_match_the_formula() {
    let vs = nn::VarStore::new(Device::Cpu);
    let self_attn = blocks::Attention::new(vs.root() / "a1", 8, None, 2, 4).unwrap();
    let cross = blocks::Attention::new(vs.root() / "a2", 8, Some(6), 2, 4).unwrap();
    let x = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-5;
        assert!(close(&self_attn.forward(&x, None).unwrap(), &reference_attention(&self_attn, &x, &x, 2)));
        for m in [1, 3] {
            let c = Tensor::randn([2, m, 6], (Kind::Float, Device::Cpu));
            let y = cross.forward(&x, Some(&c)).unwrap();
            assert_eq!(y.size(), vec![2, 5, 8]);
            assert!(close(&y, &reference_attention(&cross, &x, &c, 2)), "m = {m}");
        }
    });
}

/// Rough CPU timing of the default model (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn bench_default_forward_backward() {
    let cfg = UNetConfig::default();
    let (vs, m) = build(&cfg);
    let (x, t, c) = inputs(&cfg, 32, 32, 32);
    for _ in 0..2 {
        let _ = m.forward(&x, &t, &c, None, None).unwrap().square().mean(Kind::Float);
    }
    let n = 5;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let _ = tch::no_grad(|| m.forward(&x, &t, &c, None, None).unwrap());
    }
    let fwd = start.elapsed().as_secs_f64() / n as f64;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let loss = m.forward(&x, &t, &c, None, None).unwrap().square().mean(Kind::Float);
        loss.backward();
    }
    let fb = start.elapsed().as_secs_f64() / n as f64;
    println!("batch 32, 32×32, {} params, {} threads: no-grad forward {:.1} ms, forward+backward {:.1} ms",
        parameter_count(&vs), tch::get_num_threads(), fwd * 1e3, fb * 1e3);
}

/// Per-block CPU timing (run with `--ignored --nocapture`): GFLOP/s of a resnet vs a transformer.
#[test]
#[ignore]
fn bench_blocks() {
    let vs = nn::VarStore::new(Device::Cpu);
    let r = blocks::ResnetBlock2D::new(vs.root() / "r", 64, 64, 128, 8, 1e-5).unwrap();
    let ca = blocks::CrossAttnConfig { num_heads: 4, cross_attention_dim: 64, transformer_layers: 1, use_linear_projection: false };
    let a = blocks::Transformer2DModel::new(vs.root() / "a", 64, 8, &ca).unwrap();
    let x = Tensor::randn([32, 64, 16, 16], (Kind::Float, Device::Cpu));
    let temb = Tensor::randn([32, 128], (Kind::Float, Device::Cpu));
    let encoder_hidden_states = Tensor::randn([32, 1, 64], (Kind::Float, Device::Cpu));
    let time = |f: &dyn Fn() -> Tensor| {
        let _ = f();
        let s = std::time::Instant::now();
        for _ in 0..5 {
            let _ = f();
        }
        s.elapsed().as_secs_f64() / 5.0
    };
    let tr = time(&|| {
        let y = r.forward(&x, &temb).unwrap().sum(Kind::Float);
        y.backward();
        y
    });
    let ta = time(&|| {
        let y = a.forward(&x, &encoder_hidden_states).unwrap().sum(Kind::Float);
        y.backward();
        y
    });
    let ehs2 = Tensor::randn([32, 2, 64], (Kind::Float, Device::Cpu));
    let ta2 = time(&|| {
        let y = a.forward(&x, &ehs2).unwrap().sum(Kind::Float);
        y.backward();
        y
    });
    let tok = Tensor::randn([32, 256, 64], (Kind::Float, Device::Cpu));
    let tsa = time(&|| {
        let y = a.transformer_blocks[0].attn1.forward(&tok, None).unwrap().sum(Kind::Float);
        y.backward();
        y
    });
    let tff = time(&|| {
        let y = a.transformer_blocks[0].ff.forward(&tok).unwrap().sum(Kind::Float);
        y.backward();
        y
    });
    let tgn = time(&|| {
        let y = a.norm.forward(&x).unwrap().sum(Kind::Float);
        y.backward();
        y
    });
    println!("fwd+bwd: resnet {:.1} transformer(1 tok) {:.1} transformer(2 tok) {:.1} self-attn {:.1} ff {:.1} groupnorm {:.1}",
        tr * 1e3, ta * 1e3, ta2 * 1e3, tsa * 1e3, tff * 1e3, tgn * 1e3);
    tch::no_grad(|| {
        let tr = time(&|| r.forward(&x, &temb).unwrap());
        let ta = time(&|| a.forward(&x, &encoder_hidden_states).unwrap());
        let a1 = &a.transformer_blocks[0].attn1;
        let tok = Tensor::randn([32, 256, 64], (Kind::Float, Device::Cpu));
        let tt = time(&|| a1.forward(&tok, None).unwrap());
        let tf = time(&|| a.transformer_blocks[0].ff.forward(&tok).unwrap());
        let tl = time(&|| a1.to_q.forward(&tok).unwrap());
        let b0 = &a.transformer_blocks[0];
        let t_gn = time(&|| a.norm.forward(&x).unwrap().permute([0, 2, 3, 1]).reshape([32, 256, 64]));
        let t_pin = time(&|| a.proj_in.forward(&tok).unwrap());
        let t_ln = time(&|| b0.norm1.forward(&tok).unwrap());
        let t_a2 = time(&|| b0.attn2.forward(&tok, Some(&encoder_hidden_states)).unwrap());
        let t_blk = time(&|| b0.forward(&tok, &encoder_hidden_states).unwrap());
        let t_out = time(&|| x.f_add(&a.proj_out.forward(&tok).unwrap().view([32, 16, 16, 64]).permute([0, 3, 1, 2])).unwrap());
        println!("gn+perm {:.1} proj_in {:.1} ln {:.1} attn2 {:.1} block {:.1} out {:.1}", t_gn*1e3, t_pin*1e3, t_ln*1e3, t_a2*1e3, t_blk*1e3, t_out*1e3);
        println!("resnet {:.1} ms ({:.1} GFLOP/s); transformer {:.1} ms; self-attn {:.1} ms; ff {:.1} ms ({:.1} GFLOP/s); linear {:.2} ms ({:.1} GFLOP/s)",
            tr * 1e3, 2.0 * 2.0 * 32.0 * 256.0 * 64.0 * 64.0 * 9.0 / tr / 1e9,
            ta * 1e3, tt * 1e3, tf * 1e3, 3.0 * 2.0 * 8192.0 * 64.0 * 512.0 / 2.0 * 1.0 / tf / 1e9 * 1.0,
            tl * 1e3, 2.0 * 8192.0 * 64.0 * 64.0 / tl / 1e9);
    });
}

/// SDPA vs explicit attention, forward + backward (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn bench_sdpa_variants() {
    let mk = || Tensor::randn([32, 4, 256, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (q, k, v) = (mk(), mk(), mk());
    let time = |f: &dyn Fn() -> Tensor| {
        let _ = f();
        let s = std::time::Instant::now();
        for _ in 0..5 {
            let y = f().sum(Kind::Float);
            y.backward();
        }
        s.elapsed().as_secs_f64() / 5.0 * 1e3
    };
    let sdpa = time(&|| Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false));
    let qt = q.transpose(1, 2).contiguous().transpose(1, 2);
    let sdpa_strided = time(&|| Tensor::scaled_dot_product_attention::<Tensor>(&qt, &k, &v, None, 0.0, false, None, false));
    let math = time(&|| (q.matmul(&k.transpose(-1, -2)) * 0.25).softmax(-1, Kind::Float).matmul(&v));
    println!("fwd+bwd ms: sdpa {sdpa:.1} sdpa(strided q) {sdpa_strided:.1} math {math:.1}");
}
