//! Networks of a real model's size built from published configs (`configs/real-size/`) with random weights:
//! our UNet and its ControlNet have exactly diffusers' parameter counts. The expected counts were written
//! down from diffusers 0.42.1 (`UNet2DConditionModel(**config)` and `ControlNetModel.from_unet` of it, on
//! the meta device), not computed by our code.
use std::path::Path;

use tch::{nn, Device};

use lisa::models::diffusers::{read_json, unet_config_from_json};
use lisa::models::{ControlNetConfig, ControlNetModel, UNet2DConditionModel, UNetConfig};

fn published(name: &str) -> UNetConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/real-size").join(name);
    let json = read_json(&path).unwrap();
    unet_config_from_json(json.as_object().unwrap(), &path).unwrap()
}

fn parameters(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// Builds the UNet and the ControlNet of `config` one after the other (each freed before the next), returning
/// their parameter counts.
fn counts(config: &UNetConfig) -> (i64, i64) {
    let unet = {
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = UNet2DConditionModel::new(vs.root(), config).unwrap();
        parameters(&vs)
    };
    let controlnet = {
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = ControlNetModel::new(vs.root(), &ControlNetConfig::diffusers_from_unet(config)).unwrap();
        parameters(&vs)
    };
    (unet, controlnet)
}

#[test]
fn stable_diffusion_1_5_has_diffusers_parameter_counts() {
    assert_eq!(counts(&published("stable-diffusion-v1-5-unet.json")), (859_520_964, 361_279_120));
}

#[test]
fn stable_diffusion_2_1_has_diffusers_parameter_counts() {
    assert_eq!(counts(&published("stable-diffusion-2-1-unet.json")), (865_910_724, 364_228_240));
}
