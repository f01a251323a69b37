//! Parity with diffusers and transformers on a tiny Stable-Diffusion-layout folder (llm.c style).
//!
//! `scripts/make-tiny-diffusers.py tests/golden-diffusers` builds, with fixed seeds and no download,
//! a UNet2DConditionModel (SD1.5-shaped, and an SD2.1-shaped variant), ControlNetModel.from_unet,
//! AutoencoderKL, CLIPTextModel and a CLIP BPE tokenizer in diffusers' folder layout (float16
//! weights), and the inputs and outputs of each forward pass (`golden/`). These tests load each
//! component from its folder BY NAME through the crate's loaders, run OUR forward passes on the
//! golden inputs and compare. No Python is needed, except by the last check of
//! `controlnet_export_loads_in_diffusers`, which runs diffusers on our export when a Python with
//! diffusers is found (`LISA_PYTHON`, `.venv/bin/python`, or the venv `.libtorch` points into) and
//! says that it skipped otherwise.
//!
//! Tolerance: a tensor matches when `max |ours − ref| ≤ TOL · (1 + max |ref|)`; the table printed
//! by each test (`cargo test --test diffusers -- --nocapture`) gives the deviations per tensor, and a
//! mismatch prints its first differing elements.
mod common;
use common::golden::{Report, Tolerance};
use common::lisa;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lisa::control::{ControlTask, LisaConfig, LisaHead, SideNetwork};
use lisa::data::ConditionKind;
use lisa::diffusion::{BetaSchedule, Prediction};
use lisa::models::{diffusers, AutoencoderKL, ClipTextModel, ClipTokenizer, ControlNetConfig, UNetConfig};
use lisa::pipeline::{MainNetwork, MainNetworkConfig};
use lisa::train::optim::{AdamW, AdamWConfig};
use lisa::train::step::{Batch, TrainTask};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// `max |ours − ref| ≤ 1e-5 · (1 + max |ref|)`.
const TOL: Tolerance = Tolerance { abs: 1e-5, rel_below_one: None };

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("golden-diffusers")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = root().join("golden").join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!("cannot read {}: {e} (regenerate with scripts/make-tiny-diffusers.py)", path.display())
        })
        .into_iter()
        .collect()
}

fn tokens() -> Value {
    let p = root().join("golden").join("tokens.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Our text encoder's `encoder_hidden_states` for the golden prompts: tokenizer → CLIPTextModel.
fn our_text_states() -> Tensor {
    let tok = ClipTokenizer::load(&root().join("tokenizer")).unwrap();
    let (_vs, text) = ClipTextModel::load(&root().join("text_encoder"), Device::Cpu).unwrap();
    let t = tokens();
    let prompts: Vec<&str> = t["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let input_ids = tok.encode_batch(&prompts[..2], Device::Cpu).unwrap();
    tch::no_grad(|| text.forward(&input_ids)).unwrap().last_hidden_state
}

#[test]
fn tokenizer_matches_transformers_clip_tokenizer() {
    let tok = ClipTokenizer::load(&root().join("tokenizer")).unwrap();
    let t = tokens();
    assert_eq!(tok.max_length as u64, t["max_length"].as_u64().unwrap());
    let prompts = t["prompts"].as_array().unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_str().unwrap();
        assert_eq!(tok.encode_unpadded(p).unwrap(), ids(&t["input_ids_unpadded"][i]), "unpadded ids of {p:?}");
        assert_eq!(tok.encode(p).unwrap(), ids(&t["input_ids"][i]), "padded ids of {p:?}");
    }
    println!("{} prompts tokenized exactly as transformers' CLIPTokenizer", prompts.len());
}

#[test]
fn clip_text_encoder_matches_transformers() {
    let g = golden("text_encoder.safetensors");
    let (_vs, text) = ClipTextModel::load(&root().join("text_encoder"), Device::Cpu).unwrap();
    let out = tch::no_grad(|| text.forward(&g["input_ids"])).unwrap();
    let mut rep = Report::new(TOL);
    rep.compare("last_hidden_state", &out.last_hidden_state, &g["last_hidden_state"]);
    rep.compare("pooler_output", &out.pooler_output, &g["pooler_output"]);
    // The whole text path: our tokenizer's ids into our encoder.
    rep.compare("tokenizer -> text encoder", &our_text_states(), &g["last_hidden_state"]);
    rep.finish();
}

#[test]
fn vae_matches_diffusers_autoencoder_kl() {
    let g = golden("vae.safetensors");
    let (_vs, vae) = AutoencoderKL::load(&root().join("vae"), Device::Cpu).unwrap();
    assert_eq!(vae.config.scaling_factor, 0.18215);
    let mut rep = Report::new(TOL);
    tch::no_grad(|| {
        let dist = vae.encode(&g["image"]).unwrap();
        rep.compare("encode: mean", &dist.mean, &g["mean"]);
        rep.compare("encode: logvar", &dist.logvar, &g["logvar"]);
        rep.compare("decode", &vae.decode(&g["latents"]).unwrap(), &g["decoded"]);
    });
    rep.finish();
}

/// The folder's weights are float16, so holding the frozen components in f16 (`train.mixed_precision =
/// "fp16"`, diffusers' `weight_dtype`) loses nothing: outside an autocast region they compute in f32 from the
/// widened weights, bit for bit as when held in f32. In bf16 they round (8 bits of mantissa against f16's 11).
#[test]
fn frozen_components_held_in_half_precision_compute_in_f32_as_diffusers_within_rounding() {
    use lisa::models::precision::{hold_in, MixedPrecision};
    let (gv, gt, gu) = (golden("vae.safetensors"), golden("text_encoder.safetensors"), golden("unet.safetensors"));
    let outputs = |precision: MixedPrecision| -> Vec<(&'static str, Tensor)> {
        let (mut vae_vs, vae) = AutoencoderKL::load(&root().join("vae"), Device::Cpu).unwrap();
        let (mut text_vs, text) = ClipTextModel::load(&root().join("text_encoder"), Device::Cpu).unwrap();
        let (mut unet_vs, unet) = diffusers::load_unet(&root().join("unet"), Device::Cpu).unwrap();
        for vs in [&mut vae_vs, &mut text_vs, &mut unet_vs] {
            vs.freeze();
            hold_in(vs, precision).unwrap();
            let kind = precision.kind().unwrap_or(Kind::Float);
            assert!(vs.variables().values().all(|v| v.kind() == kind), "{precision:?}: held");
        }
        tch::no_grad(|| {
            vec![
                ("vae decode", vae.decode(&gv["latents"]).unwrap()),
                ("vae encode: mean", vae.encode(&gv["image"]).unwrap().mean),
                ("text encoder", text.forward(&gt["input_ids"]).unwrap().last_hidden_state),
                ("unet", unet.forward(&gu["sample"], &gu["timesteps"], &gu["encoder_hidden_states"], None, None).unwrap()),
            ]
        })
    };
    let f32_held = outputs(MixedPrecision::No);
    let references = [&gv["decoded"], &gv["mean"], &gt["last_hidden_state"], &gu["out"]];
    for (((what, f16), (_, f32)), reference) in outputs(MixedPrecision::Fp16).iter().zip(&f32_held).zip(references) {
        assert_eq!(f16.kind(), Kind::Float, "{what}: computed in f32");
        assert!(f16.equal(f32), "{what}: f16-held weights are the file's values, so the output is the f32-held one");
        let mut rep = Report::new(TOL);
        rep.compare(what, f16, reference);
        rep.finish();
    }
    // bf16 rounds the weights: close to diffusers' f32 output, not equal (seen when written: within 2.3e-2).
    let mut rep = Report::new(Tolerance { abs: 2e-2, rel_below_one: None });
    for ((what, bf16), reference) in outputs(MixedPrecision::Bf16).iter().zip(references) {
        assert!(!bf16.equal(reference), "{what}: bf16 rounds");
        rep.compare(what, bf16, reference);
    }
    rep.finish();
}

fn unet_config(folder: &str) -> UNetConfig {
    let dir = root().join(folder);
    diffusers::unet_config_from_json(&diffusers::read_config(&dir).unwrap(), &dir.join("config.json")).unwrap()
}

#[test]
fn unet_matches_diffusers_with_text_encoder_states() {
    let g = golden("unet.safetensors");
    let (_vs, unet) = diffusers::load_unet(&root().join("unet"), Device::Cpu).unwrap();
    let mut rep = Report::new(TOL);
    tch::no_grad(|| {
        let out = unet.forward(&g["sample"], &g["timesteps"], &g["encoder_hidden_states"], None, None).unwrap();
        rep.compare("unet (golden text states)", &out, &g["out"]);
        let ours = our_text_states();
        rep.compare("encoder_hidden_states (ours)", &ours, &g["encoder_hidden_states"]);
        let out = unet.forward(&g["sample"], &g["timesteps"], &ours, None, None).unwrap();
        rep.compare("unet (our tokenizer + text encoder)", &out, &g["out"]);
    });
    rep.finish();
}

#[test]
fn sd21_style_unet_matches_diffusers() {
    let g = golden("unet.safetensors");
    let cfg = unet_config("unet-sd21");
    assert!(cfg.use_linear_projection);
    let (_vs, unet) = diffusers::load_unet(&root().join("unet-sd21"), Device::Cpu).unwrap();
    let mut rep = Report::new(TOL);
    let out =
        tch::no_grad(|| unet.forward(&g["sample"], &g["timesteps"], &g["encoder_hidden_states"], None, None)).unwrap();
    rep.compare("unet-sd21", &out, &golden("unet-sd21.safetensors")["out"]);
    rep.finish();
}

fn compare_controlnet(rep: &mut Report, what: &str, down: &[Tensor], mid: &Tensor, g: &HashMap<String, Tensor>) {
    let n = g.keys().filter(|k| k.starts_with("down_")).count();
    assert_eq!(down.len(), n, "{what}: number of down residuals");
    for (i, d) in down.iter().enumerate() {
        rep.compare(&format!("{what}: down_{i}"), d, &g[&format!("down_{i}")]);
    }
    rep.compare(&format!("{what}: mid"), mid, &g["mid"]);
}

#[test]
fn controlnet_matches_diffusers() {
    let g = golden("unet.safetensors");
    let unet_cfg = unet_config("unet");
    let (_uvs, unet) = diffusers::load_unet(&root().join("unet"), Device::Cpu).unwrap();
    let (_cvs, cn) = diffusers::load_controlnet(&root().join("controlnet"), Some(&unet_cfg), Device::Cpu).unwrap();
    assert_eq!(cn.config.conditioning_downscale, 8, "four diffusers stages downscale by 8");
    let scale = g["conditioning_scale"].double_value(&[]);
    let mut rep = Report::new(TOL);
    tch::no_grad(|| {
        let out = cn
            .forward(&g["sample"], &g["timesteps"], &g["encoder_hidden_states"], &g["controlnet_cond"], scale, None, None)
            .unwrap();
        compare_controlnet(&mut rep, "controlnet", &out.down_block_res_samples, &out.mid_block_res_sample, &g);
        let pred = unet
            .forward(
                &g["sample"],
                &g["timesteps"],
                &g["encoder_hidden_states"],
                Some(&out.down_block_res_samples),
                Some(&out.mid_block_res_sample),
            )
            .unwrap();
        rep.compare("unet + controlnet residuals", &pred, &g["out_controlled"]);
    });
    rep.finish();
}

/// A main network around the golden UNet (its label encoder stays random: only the UNet matters here).
fn golden_main() -> MainNetwork {
    let unet = unet_config("unet");
    let cfg = MainNetworkConfig { unet, ..MainNetworkConfig::default() };
    let main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
    let params: Vec<(String, Tensor)> =
        main.named_parameters().into_iter().filter(|(n, _)| !n.starts_with("label_encoder.")).collect();
    let dir = root().join("unet");
    lisa::weights::load_into(&params, diffusers::read_weights(&dir, diffusers::WEIGHTS_FILE).unwrap(), &dir).unwrap();
    main
}

/// Config values are the same (numbers as numbers).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q)),
        _ => a == b,
    }
}

/// The Python of a venv with diffusers, if there is one: `LISA_PYTHON`, `.venv/bin/python`, or the
/// venv that `.libtorch` points into (`<venv>/lib/pythonX.Y/site-packages/torch`).
fn reference_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LISA_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let local = repo.join(".venv").join("bin").join("python");
    if local.is_file() {
        return Some(local);
    }
    let torch = std::fs::canonicalize(repo.join(".libtorch")).ok()?;
    let python = torch.ancestors().nth(4)?.join("bin").join("python");
    python.is_file().then_some(python)
}

/// Runs diffusers' ControlNetModel.from_pretrained(`export`) on `inputs`; None (with the reason
/// printed) when no Python with diffusers is available.
fn run_diffusers_controlnet(export: &Path, inputs: &Path, out: &Path) -> Option<HashMap<String, Tensor>> {
    let Some(python) = reference_python() else {
        println!("SKIPPED the diffusers check of the export: no Python venv found (set LISA_PYTHON or run scripts/setup-reference.sh)");
        return None;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join("make-tiny-diffusers.py");
    let result = Command::new(&python)
        .arg(&script)
        .arg("--check-controlnet")
        .arg(export)
        .arg("--inputs")
        .arg(inputs)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&result.stderr);
    match result.status.code() {
        Some(0) => {}
        Some(3) => {
            println!(
                "SKIPPED the diffusers check of the export: {} cannot import torch/diffusers ({})",
                python.display(),
                stderr.trim()
            );
            return None;
        }
        _ => panic!("diffusers could not load or run our export ({}):\n{stderr}", result.status),
    }
    Some(Tensor::read_safetensors(out).unwrap().into_iter().collect())
}

#[test]
fn controlnet_export_loads_in_diffusers_and_imports_back() {
    let g = golden("unet.safetensors");
    let main = golden_main();
    let scale = g["conditioning_scale"].double_value(&[]);
    let run = |side: &SideNetwork| {
        tch::no_grad(|| {
            side.residuals(
                &g["sample"],
                &g["timesteps"],
                &g["encoder_hidden_states"],
                &g["controlnet_cond"],
                scale,
                None,
                None,
            )
        })
        .unwrap()
        .into_controlnet()
        .unwrap()
    };
    let mut rep = Report::new(TOL);

    // Import diffusers' ControlNet as a side network of the main network.
    let side = SideNetwork::import_diffusers(&root().join("controlnet"), &main, ConditionKind::Edges).unwrap();
    let ours = run(&side);
    compare_controlnet(&mut rep, "imported", &ours.down_block_res_samples, &ours.mid_block_res_sample, &g);

    // Export: the config has diffusers' keys and values, the weights diffusers' names and values.
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("controlnet");
    side.export_diffusers(&export).unwrap();
    let read = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (mine, theirs) = (read(&export.join("config.json")), read(&root().join("controlnet").join("config.json")));
    let (mine, theirs) = (mine.as_object().unwrap(), theirs.as_object().unwrap());
    let mut keys_m: Vec<&String> = mine.keys().collect();
    let mut keys_t: Vec<&String> = theirs.keys().collect();
    keys_m.sort();
    keys_t.sort();
    assert_eq!(keys_m, keys_t, "exported config keys differ from diffusers' ControlNetModel config");
    for (k, v) in theirs {
        if k != "_diffusers_version" {
            assert!(same_json(&mine[k], v), "config {k}: ours {}, diffusers {v}", mine[k]);
        }
    }
    let reference: HashMap<String, Tensor> =
        diffusers::read_weights(&root().join("controlnet"), diffusers::WEIGHTS_FILE).unwrap().into_iter().collect();
    let exported: HashMap<String, Tensor> =
        diffusers::read_weights(&export, diffusers::WEIGHTS_FILE).unwrap().into_iter().collect();
    assert_eq!(exported.len(), reference.len(), "number of exported tensors");
    for (n, t) in &reference {
        let e = exported.get(n).unwrap_or_else(|| panic!("export lacks {n}"));
        assert_eq!(e.kind(), Kind::Float, "{n} is exported as float32");
        assert!(e.equal(&t.to_kind(Kind::Float)), "{n} changed on export");
    }

    // Import the export again (to continue training): identical residuals, every parameter trainable.
    let again = SideNetwork::import_diffusers(&export, &main, ConditionKind::Edges).unwrap();
    let back = run(&again);
    for (a, b) in back.down_block_res_samples.iter().zip(&ours.down_block_res_samples) {
        assert!(a.equal(b), "re-imported residuals differ");
    }
    assert!(back.mid_block_res_sample.equal(&ours.mid_block_res_sample));
    let out = again
        .residuals(&g["sample"], &g["timesteps"], &g["encoder_hidden_states"], &g["controlnet_cond"], 1.0, None, None)
        .unwrap()
        .into_controlnet()
        .unwrap();
    let loss = out
        .down_block_res_samples
        .iter()
        .fold(out.mid_block_res_sample.square().sum(Kind::Float), |l, d| l + d.square().sum(Kind::Float));
    loss.backward();
    let without: Vec<String> =
        again.named_parameters().into_iter().filter(|(_, p)| !p.grad().defined()).map(|(n, _)| n).collect();
    assert!(without.is_empty(), "parameters without a gradient after import: {without:?}");

    // Continue training: one SGD step with those gradients, then export the trained network.
    tch::no_grad(|| {
        for (_, p) in again.named_parameters() {
            let step = p.grad() * 1e-3;
            let _ = p.shallow_clone().f_sub_(&step).unwrap();
        }
    });
    let trained = run(&again);
    let moved = (&trained.mid_block_res_sample - &ours.mid_block_res_sample).abs().max().double_value(&[]);
    assert!(moved > 1e-4, "the SGD step did not change the residuals ({moved})");
    let trained_export = tmp.path().join("controlnet-trained");
    again.export_diffusers(&trained_export).unwrap();

    // diffusers itself on our exports, when a Python with diffusers is around.
    let inputs = tmp.path().join("inputs.safetensors");
    let names = ["sample", "timesteps", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"];
    let tensors: Vec<(&str, &Tensor)> = names.iter().map(|n| (*n, &g[*n])).collect();
    Tensor::write_safetensors(&tensors, &inputs).unwrap();
    if let Some(d) = run_diffusers_controlnet(&export, &inputs, &tmp.path().join("diffusers-out.safetensors")) {
        compare_controlnet(
            &mut rep,
            "diffusers on our export",
            &ours.down_block_res_samples,
            &ours.mid_block_res_sample,
            &d,
        );
    }
    if let Some(d) =
        run_diffusers_controlnet(&trained_export, &inputs, &tmp.path().join("diffusers-trained.safetensors"))
    {
        let (down, mid) = (&trained.down_block_res_samples, &trained.mid_block_res_sample);
        compare_controlnet(&mut rep, "diffusers on our export after training", down, mid, &d);
    }
    rep.finish();
}

#[test]
fn pixel_space_side_networks_refuse_export_with_a_reason() {
    let main = golden_main();
    let mut cfg = ControlNetConfig::for_unet(&main.config.unet);
    cfg.conditioning_channels = 3;
    let side = SideNetwork::from_main(&main, ConditionKind::Edges, cfg).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = side.export_diffusers(&tmp.path().join("cn")).unwrap_err().to_string();
    assert!(err.contains("conditioning_downscale") && err.contains("cannot be exported"), "{err}");
}

#[test]
fn unsupported_diffusers_configs_are_errors_that_name_the_field() {
    let dir = root().join("unet");
    let mut cfg = diffusers::read_config(&dir).unwrap();
    cfg.insert("class_embed_type".into(), Value::String("timestep".into()));
    let err = diffusers::unet_config_from_json(&cfg, &dir.join("config.json")).unwrap_err().to_string();
    assert!(err.contains("class_embed_type"), "{err}");
    // A ControlNet made for another UNet.
    let cn_dir = root().join("controlnet");
    let other = unet_config("unet-sd21");
    let err = diffusers::load_controlnet(&cn_dir, Some(&other), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("not made for this UNet") && err.contains("use_linear_projection"), "{err}");
    // Weights that do not fit the config: every problem listed.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::copy(root().join("unet-sd21").join(diffusers::WEIGHTS_FILE), tmp.path().join(diffusers::WEIGHTS_FILE))
        .unwrap();
    let err = diffusers::load_unet(tmp.path(), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("shape differs") && err.contains("proj_in.weight"), "{err}");
}

#[test]
fn sd_folder_as_main_network_trains_a_controlnet_with_lisa_in_latent_space() {
    let t = tokens();
    let prompts: Vec<&str> = t["prompts"].as_array().unwrap().iter().take(3).map(|p| p.as_str().unwrap()).collect();
    let mut main = lisa::sd::load_main_network(&root(), &prompts, Device::Cpu).unwrap();
    main.freeze();
    let o = &main.config.objective;
    assert_eq!(
        (o.beta_schedule, o.prediction, o.num_train_timesteps),
        (BetaSchedule::ScaledLinear, Prediction::Epsilon, 1000)
    );
    assert_eq!((o.beta_start, o.beta_end), (0.00085, 0.012));
    assert_eq!(main.config.label_encoder.num_classes, 3);

    // Label i is prompt i: the main network on labels 0, 1 is diffusers' UNet on the text encoder's states.
    let g = golden("unet.safetensors");
    let mut rep = Report::new(TOL);
    let pred = tch::no_grad(|| main.predict(&g["sample"], &g["timesteps"], &Tensor::from_slice(&[0i64, 1]))).unwrap();
    rep.compare("main network (prompt table, labels 0, 1)", &pred, &g["out"]);
    rep.finish();

    // Latent space: VAE latents of the images; conditions at image resolution (2× the latents here,
    // as SD's are 8×).
    let (_vvs, vae) = lisa::sd::load_vae(&root(), Device::Cpu).unwrap();
    tch::manual_seed(0);
    let images = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let x0 = tch::no_grad(|| vae.encode_latents(&images)).unwrap();
    assert_eq!(x0.size(), [2, 4, 8, 8]);
    let condition = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let side_cfg = ControlNetConfig {
        conditioning_channels: 3,
        conditioning_embedding_out_channels: vec![8, 16],
        conditioning_downscale: 2,
        ..ControlNetConfig::for_unet(&main.config.unet)
    };
    let side = SideNetwork::from_main(&main, ConditionKind::Edges, side_cfg).unwrap();
    let head = LisaHead::new(&main, &side, &LisaConfig::default()).unwrap();
    let task = ControlTask::new(&main, &side, Some(&head)).unwrap();
    let batch = Batch { x0, labels: Tensor::from_slice(&[0i64, 2]), condition: Some(condition), rows: None };
    let noise = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let sample = main.objective.training_sample(&batch.x0, &noise, &Tensor::from_slice(&[100i64, 700])).unwrap();
    let mut params = side.named_parameters();
    params.extend(head.named_parameters());
    let mut opt = AdamW::new(params, AdamWConfig::default());
    let mut losses = Vec::new();
    for _ in 0..8 {
        let l = task.loss(&batch, &sample).unwrap();
        let metric = |n: &str| l.metrics.iter().find(|(m, _)| m == n).unwrap().1.double_value(&[]);
        losses.push((l.loss.double_value(&[]), metric("l_main"), metric("l_lisa")));
        opt.zero_grad();
        l.loss.backward();
        opt.step(1e-3);
    }
    println!("(loss, l_main, l_lisa) per step: {losses:?}");
    assert!(losses.iter().all(|(l, m, d)| l.is_finite() && m.is_finite() && d.is_finite()));
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last.0 < first.0 && last.2 < first.2, "8 steps on one batch did not lower the loss: {losses:?}");
    // The trained side network is a diffusers ControlNet (two stages: downscale 2).
    let tmp = tempfile::tempdir().unwrap();
    side.export_diffusers(&tmp.path().join("controlnet")).unwrap();
}

#[test]
fn scheduler_configs_map_to_our_objective() {
    let path = Path::new("scheduler_config.json");
    let map = |v: Value| v.as_object().unwrap().clone();
    let sd21 = map(serde_json::json!({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "v_prediction"}));
    let o = lisa::sd::objective_from_scheduler_config(&sd21, path).unwrap();
    assert_eq!((o.beta_schedule, o.prediction), (BetaSchedule::ScaledLinear, Prediction::VPrediction));
    let cos = map(serde_json::json!({"beta_schedule": "squaredcos_cap_v2"}));
    assert_eq!(lisa::sd::objective_from_scheduler_config(&cos, path).unwrap().beta_schedule, BetaSchedule::Cosine);
    for (bad, field) in [
        (serde_json::json!({"beta_schedule": "sigmoid"}), "beta_schedule"),
        (serde_json::json!({"prediction_type": "sample"}), "prediction_type"),
        (serde_json::json!({"trained_betas": [0.1, 0.2]}), "trained_betas"),
        (serde_json::json!({"rescale_betas_zero_snr": true}), "rescale_betas_zero_snr"),
    ] {
        let err = lisa::sd::objective_from_scheduler_config(&map(bad), path).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}

#[test]
fn incomplete_sd_folders_are_errors_that_say_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("unet")).unwrap();
    let err = lisa::sd::load_main_network(tmp.path(), &["a cat"], Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("text_encoder, tokenizer, scheduler"), "{err}");
}

#[test]
fn fp16_variants_bfloat16_weights_and_sharded_checkpoints_load() {
    let src = root().join("unet");
    let weights = diffusers::read_weights(&src, diffusers::WEIGHTS_FILE).unwrap();
    let expect: HashMap<String, Tensor> = weights.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::Float))).collect();
    let check = |dir: &Path, rounded: &dyn Fn(&Tensor) -> Tensor| {
        let (vs, _unet) = diffusers::load_unet(dir, Device::Cpu).unwrap();
        for (n, t) in diffusers::named_variables(&vs) {
            assert_eq!(t.kind(), Kind::Float, "{n}");
            assert!(t.equal(&rounded(&expect[&n])), "{n} differs after loading from {}", dir.display());
        }
    };
    let write = |path: &Path, tensors: &[(String, Tensor)]| {
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&named, path).unwrap();
    };
    let copy_config = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    };
    let tmp = tempfile::tempdir().unwrap();

    // The `.fp16` variant, stored as bfloat16.
    let bf16_dir = tmp.path().join("bf16");
    copy_config(&bf16_dir);
    let bf16: Vec<(String, Tensor)> = weights.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::BFloat16))).collect();
    write(&bf16_dir.join("diffusion_pytorch_model.fp16.safetensors"), &bf16);
    check(&bf16_dir, &|t: &Tensor| t.to_kind(Kind::BFloat16).to_kind(Kind::Float));

    // Two shards and their index.
    let shard_dir = tmp.path().join("sharded");
    copy_config(&shard_dir);
    let (a, b): (Vec<_>, Vec<_>) =
        weights.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).partition(|(n, _)| n.starts_with("down_blocks."));
    let mut map = serde_json::Map::new();
    for (file, part) in [("part-1.safetensors", &a), ("part-2.safetensors", &b)] {
        write(&shard_dir.join(file), part);
        for (n, _) in part.iter() {
            map.insert(n.clone(), Value::String(file.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(shard_dir.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    check(&shard_dir, &|t: &Tensor| t.shallow_clone());
}

#[test]
fn golden_folder_is_small() {
    let mut total = 0;
    for e in walk(&root()) {
        total += std::fs::metadata(&e).unwrap().len();
    }
    assert!(total < 3_000_000, "tests/golden-diffusers takes {total} bytes; keep it small");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn train_sd_trains_a_latent_controlnet_on_a_captioned_imagefolder_resumes_and_exports_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Six RGB images with a square of one colour and its outline as the condition; two captions.
    let mut lines = Vec::new();
    for i in 0..6u32 {
        let (lo, hi) = (2 + i % 3, 10 + i % 4);
        let inside = |x: u32, y: u32| (lo..hi).contains(&x) && (lo..hi).contains(&y);
        let colour = if i % 2 == 0 { [220, 40, 40] } else { [40, 40, 220] };
        image::RgbImage::from_fn(16, 16, |x, y| image::Rgb(if inside(x, y) { colour } else { [0, 0, 0] }))
            .save(data.join(format!("{i}.png")))
            .unwrap();
        let edge = |x: u32, y: u32| inside(x, y) && !(inside(x + 1, y + 1) && x > lo && y > lo);
        image::GrayImage::from_fn(16, 16, |x, y| image::Luma([if edge(x, y) { 255 } else { 0 }]))
            .save(data.join(format!("{i}_edges.png")))
            .unwrap();
        let text = if i % 2 == 0 { "a red square" } else { "a blue square" };
        lines.push(format!(r#"{{"image": "{i}.png", "conditioning_image": "{i}_edges.png", "text": "{text}"}}"#));
    }
    std::fs::write(data.join("metadata.jsonl"), lines.join("\n")).unwrap();
    let out = dir.path().join("run");
    let model = root();
    let args = |steps: &str| -> Vec<String> {
        [
            "train-sd", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--output-dir",
            out.to_str().unwrap(), "--steps", steps, "--quiet", "--device", "cpu", "--set", "resolution=16",
            "--set", "conditioning_embedding_out_channels=[8, 16]", "--set", "train.batch_size=2", "--set",
            "train.checkpointing_steps=1", "--set", "validation.every_steps=1", "--set", "validation.num_images=2",
            "--set", "validation.sampler.steps=2", "--set", "threads=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| lisa(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, stdout, stderr) = run(args("2"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("6 examples (2 prompts, latents [4, 8, 8])"), "{stdout}");
    for f in ["samples/step-1.png", "samples/step-2.png", "controlnet/config.json", "side-network/model.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(metrics.lines().next().unwrap().contains("l_lisa"), "{metrics}");
    let side_cfg = std::fs::read_to_string(out.join("side-network/config.json")).unwrap();
    assert!(side_cfg.contains("\"given\""), "{side_cfg}");

    // With train.mixed_precision = bf16 the frozen UNet and VAE are held in bf16 (diffusers' weight_dtype): the
    // run goes through encoding, training, validation sampling and export, and its first loss is the f32 run's
    // within bf16's rounding (seen when written: 0.03 % apart, with the same first logging interval).
    let first_loss = |run: &Path| -> f64 {
        let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
        let mut lines = text.lines();
        let col = lines.next().unwrap().split(',').position(|c| c == "l_main").unwrap();
        lines.next().unwrap().split(',').nth(col).unwrap().parse().unwrap()
    };
    let held = dir.path().join("run-bf16");
    let mut bf16 = args("2");
    let at = bf16.iter().position(|a| a == out.to_str().unwrap()).unwrap();
    bf16[at] = held.to_str().unwrap().into();
    bf16.extend(["--set".into(), "train.mixed_precision=\"bf16\"".into()]);
    let (ok, _, stderr) = run(bf16);
    assert!(ok, "{stderr}");
    assert!(held.join("controlnet/config.json").is_file() && held.join("samples/step-1.png").is_file());
    let (f32_loss, bf16_loss) = (first_loss(&out), first_loss(&held));
    assert!((f32_loss - bf16_loss).abs() < 3e-3 * f32_loss, "first loss {f32_loss} (f32) vs {bf16_loss} (bf16 held)");

    // Resuming continues from the last checkpoint; a new run into the folder is refused.
    let mut more = args("3");
    more.extend(["--resume".into(), "latest".into()]);
    let (ok, _, stderr) = run(more);
    assert!(ok, "{stderr}");
    assert!(out.join("samples/step-3.png").is_file());
    let (ok, _, stderr) = run(args("3"));
    assert!(!ok && stderr.contains("checkpoint"), "{stderr}");

    // The exported ControlNet imports back to the saved side network's residuals, and the
    // export-controlnet command writes the same folder.
    let prompts = ["a blue square", "a red square"];
    let main = lisa::sd::load_main_network(&model, &prompts, Device::Cpu).unwrap();
    let saved = SideNetwork::load(&out.join("side-network"), &main).unwrap();
    let imported = SideNetwork::import_diffusers(&out.join("controlnet"), &main, ConditionKind::Given).unwrap();
    tch::manual_seed(1);
    let x = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let c = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[10i64, 500]);
    let encoder_hidden_states = main.label_encoder.forward(&Tensor::from_slice(&[0i64, 1])).unwrap();
    let (a, b) = tch::no_grad(|| {
        let run = |s: &SideNetwork| s.residuals(&x, &t, &encoder_hidden_states, &c, 1.0, None, None).unwrap().into_controlnet().unwrap();
        (run(&saved), run(&imported))
    });
    assert!(a.mid_block_res_sample.equal(&b.mid_block_res_sample));
    assert!(a.mid_block_res_sample.abs().max().double_value(&[]) > 0.0, "trained zero convs are no longer zero");
    let again = dir.path().join("exported");
    let (ok, _, stderr) = lisa(&[
        "export-controlnet", "--controlnet", out.join("side-network").to_str().unwrap(), "--model",
        model.to_str().unwrap(), "--out", again.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read(again.join("config.json")).unwrap(),
        std::fs::read(out.join("controlnet/config.json")).unwrap()
    );

    // Captions are required: an imagefolder with integer labels is refused with the reason.
    std::fs::write(data.join("metadata.jsonl"), r#"{"image": "0.png", "conditioning_image": "0_edges.png", "label": 1}"#)
        .unwrap();
    let mut fresh = args("1");
    fresh[6] = dir.path().join("run2").display().to_string();
    let (ok, _, stderr) = run(fresh);
    assert!(!ok && stderr.contains("needs captions") && stderr.lines().count() == 1, "{stderr}");
}

/// train-sd's encoded-data cache: a second run reuses every row; a changed image re-encodes that example alone;
/// a changed VAE weight file re-encodes everything; rows read back as the in-memory loader gives the conditions,
/// and a deleted cache encodes to the same latents again.
#[test]
fn the_latent_cache_reencodes_exactly_what_changed() {
    use lisa::data::imagefolder::{open_index, Columns, LoadOptions};
    use lisa::data::TrainingExamples;
    use lisa::experiments::latent_cache::{encode_or_reuse, CacheRequest};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut lines = Vec::new();
    for i in 0..5u8 {
        image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([i * 40, (x * 16) as u8, (y * 16) as u8]))
            .save(data.join(format!("{i}.png")))
            .unwrap();
        image::GrayImage::from_fn(16, 16, |x, _| image::Luma([if x == u32::from(i) { 255 } else { 0 }]))
            .save(data.join(format!("{i}_c.png")))
            .unwrap();
        lines.push(format!(r#"{{"image": "{i}.png", "conditioning_image": "{i}_c.png", "text": "p{}"}}"#, i % 2));
    }
    std::fs::write(data.join("metadata.jsonl"), lines.join("\n")).unwrap();
    let vae_dir = dir.path().join("vae");
    std::fs::create_dir_all(&vae_dir).unwrap();
    for f in std::fs::read_dir(root().join("vae")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, vae_dir.join(f.file_name().unwrap())).unwrap();
    }
    let opts = LoadOptions {
        size: 16,
        channels: 3,
        columns: Columns { label: String::new(), ..Columns::default() },
        ..LoadOptions::default()
    };
    let cache = dir.path().join("cache");
    let encode = || {
        let (_vs, vae) = AutoencoderKL::load(&vae_dir, Device::Cpu).unwrap();
        let index = open_index(&data, &opts).unwrap();
        let req = CacheRequest {
            vae_dir: &vae_dir,
            root: &cache,
            resolution: 16,
            seed: 3,
            vae_precision: Default::default(),
            device: Device::Cpu,
        };
        encode_or_reuse(&index, &vae, &req, &mut |_| {}).unwrap()
    };
    let all: Vec<i64> = (0..5).collect();
    let first = encode();
    assert_eq!((first.encoded, first.reused), (5, 0));
    let (latents, labels, conditions) = first.batch(&all).unwrap();
    assert_eq!(latents.size(), [5, 4, 8, 8]);
    assert_eq!(labels, Tensor::from_slice(&[0i64, 1, 0, 1, 0]));
    let in_memory = lisa::data::imagefolder::load_with(&data, &opts).unwrap();
    assert!(conditions.unwrap().equal(in_memory.conditioning.as_ref().unwrap()), "conditions as the loader reads them");

    let again = encode();
    assert_eq!((again.encoded, again.reused), (0, 5));
    assert!(again.batch(&all).unwrap().0.equal(&latents));

    // One image changes: that example alone is encoded again.
    image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9])).save(data.join("2.png")).unwrap();
    let changed = encode();
    assert_eq!((changed.encoded, changed.reused), (1, 4));
    let now = changed.batch(&all).unwrap().0;
    for i in 0..5 {
        assert_eq!(now.get(i).equal(&latents.get(i)), i != 2, "row {i}");
    }

    // The same rows encode to the same latents from an empty cache (each draw is seeded by its example).
    std::fs::remove_dir_all(&cache).unwrap();
    let fresh = encode();
    assert_eq!(fresh.encoded, 5);
    assert!(fresh.batch(&all).unwrap().0.equal(&now));

    // A changed weight file: a new cache, everything encoded again, every latent different.
    let weights = vae_dir.join("diffusion_pytorch_model.safetensors");
    let mut tensors = Tensor::read_safetensors(&weights).unwrap();
    let (_, w) = tensors.iter_mut().find(|(n, _)| n == "encoder.conv_in.weight").unwrap();
    *w = &*w + 0.01;
    Tensor::write_safetensors(&tensors, &weights).unwrap();
    let retrained = encode();
    assert_eq!((retrained.encoded, retrained.reused), (5, 0));
    assert_ne!(retrained.dir, fresh.dir);
    let moved = retrained.batch(&all).unwrap().0;
    for i in 0..5 {
        assert!(!moved.get(i).equal(&now.get(i)), "row {i}");
    }
}
