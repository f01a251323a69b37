//! A Stable Diffusion model folder on local disk (diffusers layout, SD1.x/SD2.x class) as the frozen
//! main network of side-network training in latent space.
//!
//! The folder's UNet becomes the [`MainNetwork`]'s UNet, its scheduler config the objective, and its
//! text path (CLIP tokenizer + text encoder) is run once over the training prompts: the prompts'
//! `encoder_hidden_states` become the rows of the main network's conditioning table, so prompt `i`
//! is label `i` and the last row, the null label, is the empty prompt (SD's unconditional input for
//! classifier-free guidance). Everything downstream — the side network copied from the UNet, the
//! training step with or without LISA, sampling — is unchanged. The VAE is loaded separately
//! ([`AutoencoderKL::load`]) to turn images into latents and back.
//!
//! The table costs `prompts × tokens × width` floats (77 × 768 × 4 B ≈ 236 KB per prompt for SD1.5):
//! fine for a folder of a few thousand captioned images, not for millions.
use std::path::Path;

use serde_json::{Map, Value};
use tch::{Device, Tensor};

use crate::diffusion::objective::ObjectiveKind;
use crate::diffusion::{BetaSchedule, ObjectiveConfig, Prediction};
use crate::models::diffusers::{self, read_json};
use crate::models::{AutoencoderKL, ClipTextModel, ClipTokenizer, LabelEncoderConfig};
use crate::pipeline::{MainNetwork, MainNetworkConfig};
use crate::{Error, Result};

/// The component folders of a Stable Diffusion folder that [`load_main_network`] reads.
pub const COMPONENTS: [&str; 4] = ["unet", "text_encoder", "tokenizer", "scheduler"];

/// Our objective from a diffusers scheduler config (`scheduler/scheduler_config.json`, any of the
/// DDPM-family schedulers SD ships with: DDPM, DDIM, PNDM, Euler, ...): β schedule, its endpoints,
/// the number of training timesteps and the prediction type. Features that change the training
/// distribution and that we do not implement are errors naming the field.
pub fn objective_from_scheduler_config(cfg: &Map<String, Value>, path: &Path) -> Result<ObjectiveConfig> {
    let str_of = |k: &str, d: &str| cfg.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
    let f64_of = |k: &str, d: f64| cfg.get(k).and_then(Value::as_f64).unwrap_or(d);
    let err = |m: String| Err(Error::format(path, m));
    if cfg.get("trained_betas").is_some_and(|v| !v.is_null()) {
        return err("trained_betas (an explicit β table) is not supported; use a named beta_schedule".into());
    }
    if cfg.get("rescale_betas_zero_snr").and_then(Value::as_bool).unwrap_or(false) {
        return err("rescale_betas_zero_snr = true is not supported".into());
    }
    let beta_schedule = match str_of("beta_schedule", "linear").as_str() {
        "linear" => BetaSchedule::Linear,
        "scaled_linear" => BetaSchedule::ScaledLinear,
        "squaredcos_cap_v2" => BetaSchedule::Cosine,
        other => {
            return err(format!(
                "beta_schedule {other:?} is not supported (use \"linear\", \"scaled_linear\" or \"squaredcos_cap_v2\")"
            ))
        }
    };
    let prediction = match str_of("prediction_type", "epsilon").as_str() {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::VPrediction,
        other => {
            return err(format!("prediction_type {other:?} is not supported (use \"epsilon\" or \"v_prediction\")"))
        }
    };
    let steps = cfg.get("num_train_timesteps").and_then(Value::as_u64).unwrap_or(1000);
    Ok(ObjectiveConfig {
        kind: ObjectiveKind::Ddpm,
        prediction,
        beta_schedule,
        num_train_timesteps: steps as usize,
        beta_start: f64_of("beta_start", 0.0001),
        beta_end: f64_of("beta_end", 0.02),
    })
}

/// Checks that `dir` is a Stable Diffusion folder with every component [`load_main_network`] needs.
fn check_folder(dir: &Path) -> Result<()> {
    let missing: Vec<&str> = COMPONENTS.iter().copied().filter(|c| !dir.join(c).is_dir()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::format(
        dir,
        format!(
            "not a Stable Diffusion folder in diffusers layout: no {} sub-folder{} (expected {})",
            missing.join(", "),
            if missing.len() > 1 { "s" } else { "" },
            COMPONENTS.join(", ")
        ),
    ))
}

/// The `encoder_hidden_states` [N, tokens, width] of `prompts`, with the folder's tokenizer and
/// text encoder (loaded for this call and dropped).
pub fn encode_prompts(dir: &Path, prompts: &[&str], device: Device) -> Result<Tensor> {
    let tokenizer = ClipTokenizer::load(&dir.join("tokenizer"))?;
    let (_vs, text) = ClipTextModel::load(&dir.join("text_encoder"), device)?;
    let ids = tokenizer.encode_batch(prompts, device)?;
    Ok(tch::no_grad(|| text.forward(&ids))?.last_hidden_state)
}

/// Loads the Stable Diffusion folder `dir` as a main network conditioned on `prompts`: label `i`
/// is `prompts[i]`, label `prompts.len()` the empty prompt (see the module doc). Not frozen; call
/// [`MainNetwork::freeze`] before training a side network.
pub fn load_main_network(dir: &Path, prompts: &[&str], device: Device) -> Result<MainNetwork> {
    check_folder(dir)?;
    if prompts.is_empty() {
        return Err(Error::Config("a Stable Diffusion main network needs at least one prompt".into()));
    }
    let unet_dir = dir.join("unet");
    let unet =
        diffusers::unet_config_from_json(&diffusers::read_config(&unet_dir)?, &unet_dir.join(diffusers::CONFIG_FILE))?;
    let sched_path = dir.join("scheduler").join("scheduler_config.json");
    let sched = match read_json(&sched_path)? {
        Value::Object(m) => m,
        _ => return Err(Error::format(&sched_path, "expected a JSON object")),
    };
    let objective = objective_from_scheduler_config(&sched, &sched_path)?;

    let mut all: Vec<&str> = prompts.to_vec();
    all.push("");
    let states = encode_prompts(dir, &all, device)?;
    let (_, tokens, width) = states.size3()?;
    if width != unet.cross_attention_dim {
        return Err(Error::format(
            dir,
            format!(
                "the text encoder's width {width} is not the UNet's cross_attention_dim {}: the components do not belong together",
                unet.cross_attention_dim
            ),
        ));
    }
    let label_encoder = LabelEncoderConfig { num_classes: prompts.len() as i64, num_tokens: tokens };
    let config = MainNetworkConfig { unet, label_encoder, objective, transformer: None };
    let main = MainNetwork::new(&config, device)?;
    let params: Vec<(String, Tensor)> =
        main.named_parameters().into_iter().filter(|(n, _)| !n.starts_with("label_encoder.")).collect();
    let weights = diffusers::read_weights(&unet_dir, diffusers::WEIGHTS_FILE)?;
    crate::weights::load_into(&params, weights, &unet_dir.join(diffusers::WEIGHTS_FILE))?;
    tch::no_grad(|| -> Result<()> {
        let table = states.f_reshape([all.len() as i64, tokens * width])?;
        let _ = main.label_encoder.embedding.shallow_clone().f_copy_(&table)?;
        Ok(())
    })?;
    Ok(main)
}

/// Loads the folder's VAE (`dir/vae`).
pub fn load_vae(dir: &Path, device: Device) -> Result<(tch::nn::VarStore, AutoencoderKL)> {
    AutoencoderKL::load(&dir.join("vae"), device)
}
