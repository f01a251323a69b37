//! diffusers-layout model folders on local disk (no hub): reading a component's `config.json` into
//! our configs, loading its weights by name, and writing a ControlNet folder that diffusers'
//! `ControlNetModel.from_pretrained` loads.
//!
//! A Stable Diffusion folder has one sub-folder per component (`unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`, optionally `controlnet/`); each model folder holds `config.json` and
//! its weights as safetensors (`diffusion_pytorch_model.safetensors` for diffusers models,
//! `model.safetensors` for transformers models; a `.fp16` variant or a sharded `*.index.json` works
//! too). Weights may be stored in float16 or bfloat16; they are converted to the variables' kind.
//!
//! Configs are checked, not trusted: a field that changes the network in a way our models do not
//! implement (a class embedding, another activation, another time embedding, ...) is an error that
//! names the field, rather than a silently different network.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tch::{nn, Device, Tensor};

use super::controlnet::{ControlNetConfig, ControlNetModel};
use super::unet::{PerBlock, UNet2DConditionModel, UNetConfig};
use crate::{Error, Result};

/// The weights file of a diffusers model folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The weights file of a transformers model folder (the text encoder).
pub const TRANSFORMERS_WEIGHTS_FILE: &str = "model.safetensors";
/// The config file of a model folder.
pub const CONFIG_FILE: &str = "config.json";
/// The diffusers version whose config keys [`controlnet_config_to_json`] writes.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Reads a JSON file, with errors that name it.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// Reads `dir/config.json` as a JSON object.
pub fn read_config(dir: &Path) -> Result<Map<String, Value>> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::format(
            dir,
            format!("no {CONFIG_FILE} here: not a diffusers/transformers model folder (give the component folder, e.g. <model>/unet)"),
        ));
    }
    match read_json(&path)? {
        Value::Object(m) => Ok(m),
        _ => Err(Error::format(&path, "expected a JSON object")),
    }
}

/// The safetensors files holding a model folder's weights named `file` (e.g.
/// `diffusion_pytorch_model.safetensors`): the file itself, else its `.fp16` variant, else the
/// shards listed in its `.index.json` (or the `.fp16` variant's).
pub fn weight_files(dir: &Path, file: &str) -> Result<Vec<PathBuf>> {
    let stem = file.strip_suffix(".safetensors").unwrap_or(file);
    for name in [file.to_string(), format!("{stem}.fp16.safetensors")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![p]);
        }
        let index = dir.join(format!("{name}.index.json"));
        if index.is_file() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::format(&index, "no \"weight_map\" object: not a safetensors shard index"))?;
            let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
        }
    }
    let bin = dir.join(format!("{stem}.bin"));
    let hint = if bin.is_file() {
        format!("only {} (PyTorch pickle) is here; convert it to safetensors first", bin.display())
    } else {
        "no weights found".to_string()
    };
    Err(Error::format(dir, format!("{file} (or its .fp16 variant or a shard index) is missing: {hint}")))
}

/// Reads every tensor of the weight files of [`weight_files`].
pub fn read_weights(dir: &Path, file: &str) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for f in weight_files(dir, file)? {
        out.extend(crate::weights::read_tensors(&f)?);
    }
    Ok(out)
}

/// All variables of `vs`, sorted by name.
pub fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Two config values are the same: equal JSON, numbers compared as numbers (`1` = `1.0`), and a
/// list (diffusers allows one value per block for many fields) is the same as `d` when every
/// element is.
fn same(v: &Value, d: &Value) -> bool {
    match (v, d) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), d) if !d.is_array() => a.iter().all(|x| same(x, d)),
        _ => v == d,
    }
}

/// Errors when a field that our model does not implement has a value other than its default
/// (missing or `null` counts as the default where the default is `null`).
fn check_unsupported(cfg: &Map<String, Value>, fields: &[(&str, Value)], what: &str, path: &Path) -> Result<()> {
    for (key, default) in fields {
        let v = cfg.get(*key).unwrap_or(&Value::Null);
        if v.is_null() || same(v, default) {
            continue;
        }
        return Err(Error::format(
            path,
            format!("{what}: {key} = {v} is not supported (only {default} is); this model cannot be loaded"),
        ));
    }
    Ok(())
}

/// The fields of diffusers' `UNet2DConditionModel` that must keep their default for our UNet.
fn unet_unsupported() -> Vec<(&'static str, Value)> {
    vec![
        ("act_fn", json!("silu")),
        ("center_input_sample", json!(false)),
        ("class_embed_type", Value::Null),
        ("num_class_embeds", Value::Null),
        ("addition_embed_type", Value::Null),
        ("addition_time_embed_dim", Value::Null),
        ("projection_class_embeddings_input_dim", Value::Null),
        ("class_embeddings_concat", json!(false)),
        ("encoder_hid_dim", Value::Null),
        ("encoder_hid_dim_type", Value::Null),
        ("time_embedding_type", json!("positional")),
        ("time_embedding_dim", Value::Null),
        ("time_embedding_act_fn", Value::Null),
        ("timestep_post_act", Value::Null),
        ("time_cond_proj_dim", Value::Null),
        ("resnet_time_scale_shift", json!("default")),
        ("resnet_skip_time_act", json!(false)),
        ("resnet_out_scale_factor", json!(1.0)),
        ("only_cross_attention", json!(false)),
        ("mid_block_only_cross_attention", json!(false)),
        ("dual_cross_attention", json!(false)),
        ("cross_attention_norm", Value::Null),
        ("attention_type", json!("default")),
        ("reverse_transformer_layers_per_block", Value::Null),
        ("conv_in_kernel", json!(3)),
        ("conv_out_kernel", json!(3)),
        ("downsample_padding", json!(1)),
        ("mid_block_scale_factor", json!(1.0)),
        ("dropout", json!(0.0)),
    ]
}

/// diffusers' defaults of the `UNet2DConditionModel` fields we read (a saved config lists every
/// field, so these matter only for hand-written configs).
fn unet_defaults() -> Map<String, Value> {
    let v = json!({
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 1280,
        "transformer_layers_per_block": 1,
        "attention_head_dim": 8,
        "num_attention_heads": null,
        "use_linear_projection": false,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// The names of our [`UNetConfig`] fields, which are diffusers' names.
const UNET_FIELDS: [&str; 16] = [
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "cross_attention_dim",
    "attention_head_dim",
    "transformer_layers_per_block",
    "norm_num_groups",
    "norm_eps",
    "flip_sin_to_cos",
    "freq_shift",
    "use_linear_projection",
];

/// Our [`UNetConfig`] from the UNet fields of a diffusers `UNet2DConditionModel` or
/// `ControlNetModel` config object read from `path` (`what` names the class in errors).
fn unet_fields_from_json(cfg: &Map<String, Value>, path: &Path, what: &str) -> Result<UNetConfig> {
    let mut merged = unet_defaults();
    for (k, v) in cfg {
        if merged.contains_key(k) && !v.is_null() {
            merged.insert(k.clone(), v.clone());
        }
    }
    // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`; both are head
    // counts for this model (see UNetConfig::attention_head_dim).
    if let Some(h) = cfg.get("num_attention_heads").filter(|v| !v.is_null()) {
        merged.insert("attention_head_dim".into(), h.clone());
    }
    let ours: Map<String, Value> = UNET_FIELDS.iter().map(|k| (k.to_string(), merged[*k].clone())).collect();
    let config: UNetConfig = serde_json::from_value(Value::Object(ours)).map_err(|e| {
        Error::format(
            path,
            format!("{what}: a field has a form this model does not support (e.g. a per-block list): {e}"),
        )
    })?;
    config.validate().map_err(|e| Error::format(path, format!("{what}: {e}")))?;
    Ok(config)
}

/// Our [`UNetConfig`] from a diffusers `UNet2DConditionModel` config (`unet/config.json`), read from
/// `path`. Unsupported features are errors (see the module doc).
pub fn unet_config_from_json(cfg: &Map<String, Value>, path: &Path) -> Result<UNetConfig> {
    check_class(cfg, "UNet2DConditionModel", path)?;
    check_unsupported(cfg, &unet_unsupported(), "UNet2DConditionModel", path)?;
    unet_fields_from_json(cfg, path, "UNet2DConditionModel")
}

fn check_class(cfg: &Map<String, Value>, class: &str, path: &Path) -> Result<()> {
    match cfg.get("_class_name").and_then(Value::as_str) {
        Some(c) if c != class => Err(Error::format(path, format!("this is a {c} config, not a {class} one"))),
        _ => Ok(()),
    }
}

/// Loads a diffusers `UNet2DConditionModel` folder (`<model>/unet`) onto `device`.
pub fn load_unet(dir: &Path, device: Device) -> Result<(nn::VarStore, UNet2DConditionModel)> {
    let cfg = read_config(dir)?;
    let config = unet_config_from_json(&cfg, &dir.join(CONFIG_FILE))?;
    let vs = nn::VarStore::new(device);
    let unet = UNet2DConditionModel::new(vs.root(), &config)?;
    crate::weights::load_into(&named_variables(&vs), read_weights(dir, WEIGHTS_FILE)?, &dir.join(WEIGHTS_FILE))?;
    Ok((vs, unet))
}

/// The fields of diffusers' `ControlNetModel` that must keep their default for our ControlNet.
fn controlnet_unsupported() -> Vec<(&'static str, Value)> {
    let keep = [
        "act_fn",
        "class_embed_type",
        "num_class_embeds",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "encoder_hid_dim",
        "encoder_hid_dim_type",
        "resnet_time_scale_shift",
        "only_cross_attention",
        "downsample_padding",
        "mid_block_scale_factor",
    ];
    let mut v: Vec<(&'static str, Value)> = unet_unsupported().into_iter().filter(|(k, _)| keep.contains(k)).collect();
    v.push(("controlnet_conditioning_channel_order", json!("rgb")));
    v.push(("global_pool_conditions", json!(false)));
    v
}

/// The encoder fields a ControlNet shares with its UNet (those in diffusers' ControlNet config).
fn encoder_fields(u: &UNetConfig) -> Value {
    json!({
        "in_channels": u.in_channels,
        "block_out_channels": u.block_out_channels,
        "layers_per_block": u.layers_per_block,
        "down_block_types": u.down_block_types,
        "mid_block_type": u.mid_block_type,
        "cross_attention_dim": u.cross_attention_dim,
        "attention_head_dim": u.attention_head_dim,
        "transformer_layers_per_block": u.transformer_layers_per_block,
        "norm_num_groups": u.norm_num_groups,
        "norm_eps": u.norm_eps,
        "flip_sin_to_cos": u.flip_sin_to_cos,
        "freq_shift": u.freq_shift,
        "use_linear_projection": u.use_linear_projection,
    })
}

/// Our [`ControlNetConfig`] from a diffusers `ControlNetModel` config (`controlnet/config.json`)
/// read from `path`.
///
/// A diffusers config has no decoder fields; with `unet` (the main network's UNet) they come from
/// it, after checking that every encoder field agrees with it (a ControlNet only works with the
/// UNet it was made from). Without, `out_channels` is `in_channels` and the up blocks mirror the
/// down blocks. diffusers' conditioning embedding halves the resolution at every stage transition,
/// so `conditioning_downscale` is `2^(stages − 1)` (8 for SD's four stages).
pub fn controlnet_config_from_json(
    cfg: &Map<String, Value>,
    path: &Path,
    unet: Option<&UNetConfig>,
) -> Result<ControlNetConfig> {
    check_class(cfg, "ControlNetModel", path)?;
    check_unsupported(cfg, &controlnet_unsupported(), "ControlNetModel", path)?;
    let mut fields = cfg.clone();
    // Decoder fields (ignored by the ControlNet itself), mirrored from the encoder.
    let down: Vec<String> = match cfg.get("down_block_types") {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::format(path, format!("down_block_types is not a list of names: {e}")))?,
        None => vec![],
    };
    let up: Vec<String> = down.iter().rev().map(|t| t.replace("Down", "Up")).collect();
    if !down.is_empty() {
        fields.insert("up_block_types".into(), json!(up));
    }
    let in_channels = cfg.get("in_channels").cloned().unwrap_or(json!(4));
    fields.insert("out_channels".into(), in_channels);
    let mut encoder = unet_fields_from_json(&fields, path, "ControlNetModel")?;
    if let Some(u) = unet {
        let (mine, theirs) = (encoder_fields(&encoder), encoder_fields(u));
        let (Value::Object(a), Value::Object(b)) = (&mine, &theirs) else { unreachable!() };
        let differ: Vec<String> = a
            .iter()
            .filter(|(k, v)| !same(v, &b[k.as_str()]))
            .map(|(k, v)| format!("{k}: ControlNet {v}, UNet {}", b[k.as_str()]))
            .collect();
        if !differ.is_empty() {
            return Err(Error::format(
                path,
                format!(
                    "this ControlNet was not made for this UNet (its encoder differs; use the UNet it was trained with): {}",
                    differ.join("; ")
                ),
            ));
        }
        encoder = u.clone();
    }
    let conditioning_embedding_out_channels: Vec<i64> = match cfg.get("conditioning_embedding_out_channels") {
        Some(v) if !v.is_null() => serde_json::from_value(v.clone())
            .map_err(|e| Error::format(path, format!("conditioning_embedding_out_channels: {e}")))?,
        _ => vec![16, 32, 96, 256],
    };
    let conditioning_channels = match cfg.get("conditioning_channels") {
        Some(v) if !v.is_null() => {
            v.as_i64().ok_or_else(|| Error::format(path, format!("conditioning_channels = {v} is not an integer")))?
        }
        _ => 3,
    };
    let stages = conditioning_embedding_out_channels.len().max(1);
    let config = ControlNetConfig {
        unet: encoder,
        conditioning_channels,
        conditioning_embedding_out_channels,
        conditioning_downscale: 1 << (stages - 1),
        cross_norm_scale: None,
    };
    config.validate().map_err(|e| Error::format(path, format!("ControlNetModel: {e}")))?;
    Ok(config)
}

/// A JSON number for `x`: an integer when `x` is one (diffusers writes `freq_shift: 0`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// diffusers' `ControlNetModel` config (every key `ControlNetModel.save_pretrained` writes) for
/// `cfg`. Errors when diffusers' ControlNet cannot express it: its conditioning embedding halves the
/// resolution at every stage transition, so `conditioning_downscale` must be `2^(stages − 1)`.
pub fn controlnet_config_to_json(cfg: &ControlNetConfig) -> Result<Value> {
    cfg.validate()?;
    if let Some(scale) = cfg.cross_norm_scale {
        return Err(Error::Config(format!(
            "this side network joins the main network by cross-normalization (cross_norm_scale = {scale}), which \
             diffusers' ControlNetModel cannot express (it adds zero-convolution outputs, and its pipelines never \
             hand the UNet's own features to the ControlNet); it cannot be exported to diffusers. Sample with it \
             here (lisa sample), or train side networks meant for diffusers with side_connection = \"zero_conv\""
        )));
    }
    let stages = cfg.conditioning_embedding_out_channels.len();
    let needed = 1i64 << (stages - 1);
    if cfg.conditioning_downscale != needed {
        return Err(Error::Config(format!(
            "this side network's conditioning embedding downscales by {} but diffusers' ControlNetModel, with {stages} \
             stages ({:?}), always downscales by {needed} (every stage transition has stride 2); it cannot be \
             exported to diffusers. Train side networks meant for diffusers with conditioning_downscale = \
             2^(stages - 1), e.g. 8 with four stages as Stable Diffusion",
            cfg.conditioning_downscale, cfg.conditioning_embedding_out_channels
        )));
    }
    let u = &cfg.unet;
    let per_block = |p: &PerBlock| match p {
        PerBlock::All(v) => json!(v),
        PerBlock::Each(v) => json!(v),
    };
    Ok(json!({
        "_class_name": "ControlNetModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "addition_embed_type": null,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": null,
        "attention_head_dim": per_block(&u.attention_head_dim),
        "block_out_channels": u.block_out_channels,
        "class_embed_type": null,
        "conditioning_channels": cfg.conditioning_channels,
        "conditioning_embedding_out_channels": cfg.conditioning_embedding_out_channels,
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": u.cross_attention_dim,
        "down_block_types": u.down_block_types,
        "downsample_padding": 1,
        "encoder_hid_dim": null,
        "encoder_hid_dim_type": null,
        "flip_sin_to_cos": u.flip_sin_to_cos,
        "freq_shift": number(u.freq_shift),
        "global_pool_conditions": false,
        "in_channels": u.in_channels,
        "layers_per_block": u.layers_per_block,
        "mid_block_scale_factor": 1,
        "mid_block_type": u.mid_block_type,
        "norm_eps": u.norm_eps,
        "norm_num_groups": u.norm_num_groups,
        "num_attention_heads": null,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "projection_class_embeddings_input_dim": null,
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": per_block(&u.transformer_layers_per_block),
        "upcast_attention": false,
        "use_linear_projection": u.use_linear_projection,
    }))
}

/// Loads a diffusers `ControlNetModel` folder onto `device`; `unet` as in
/// [`controlnet_config_from_json`].
pub fn load_controlnet(
    dir: &Path,
    unet: Option<&UNetConfig>,
    device: Device,
) -> Result<(nn::VarStore, ControlNetModel)> {
    let cfg = read_config(dir)?;
    let config = controlnet_config_from_json(&cfg, &dir.join(CONFIG_FILE), unet)?;
    let vs = nn::VarStore::new(device);
    let model = ControlNetModel::new(vs.root(), &config)?;
    crate::weights::load_into(&named_variables(&vs), read_weights(dir, WEIGHTS_FILE)?, &dir.join(WEIGHTS_FILE))?;
    Ok((vs, model))
}

/// Writes a diffusers `ControlNetModel` folder: `config.json` ([`controlnet_config_to_json`]) and
/// `diffusion_pytorch_model.safetensors` with `params` (diffusers' keys, as our variables are
/// named) in float32, each through a temporary file and a rename.
pub fn save_controlnet(dir: &Path, cfg: &ControlNetConfig, params: &[(String, Tensor)]) -> Result<()> {
    let config = controlnet_config_to_json(cfg)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cpu: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(tch::Kind::Float)?)))
        .collect::<Result<_>>()?;
    crate::weights::write_tensors(&dir.join(WEIGHTS_FILE), &cpu)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Config(e.to_string()))?;
    crate::weights::write_atomic(&dir.join(CONFIG_FILE), (text + "\n").as_bytes())?;
    Ok(())
}
