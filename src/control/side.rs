//! A trained side network as a unit: a [`ControlNetModel`] built from a main network, saved as a
//! folder (`config.json` + `model.safetensors`, diffusers parameter names) without the LISA decoder,
//! and the controlled prediction with its main network (sampling: [`super::sampling`]).
use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use crate::data::conditions::{ConditionKind, ConditionSet};
use crate::models::{
    diffusers, ControlNetConfig, ControlNetModel, ControlNetOutput, DiTControlNetConfig, DiTControlNetModel, Hook,
};
use crate::pipeline::{save_model_dir, MainNetwork, Residuals, SharedPass, CONFIG_FILE};
use crate::{Error, Result};

/// Prefix of the LISA decoder's parameter names in a side-network run's training checkpoints: they are saved
/// beside the side network's but never belong to it, so loading a side network skips them. Named here, with
/// the network whose checkpoints hold them, so that the side network never imports the LISA room.
pub const DECODER_PREFIX: &str = "lisa_decoder.";

/// What a saved side network folder records besides its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideNetworkConfig {
    /// The ControlNet architecture (diffusers `ControlNetModel` config fields), for a UNet main network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controlnet: Option<ControlNetConfig>,
    /// The ControlNet-Transformer architecture, for a transformer main network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer: Option<DiTControlNetConfig>,
    /// The condition it was trained on: `edges`, `mask`, `depth`, `lowres` or `skeleton`, or several
    /// stacked as channels (`edges+mask`).
    pub condition: String,
    /// The objective of the main network it was trained with (`epsilon`, `v_prediction` or `flow`),
    /// checked when it is loaded next to a main network.
    pub objective: String,
}

impl SideNetworkConfig {
    /// Channels of the condition the side network takes.
    pub fn conditioning_channels(&self) -> i64 {
        match (&self.controlnet, &self.transformer) {
            (Some(c), _) => c.conditioning_channels,
            (None, Some(t)) => t.conditioning_channels,
            (None, None) => 1,
        }
    }

    /// The ControlNet config, or an error naming `what` needs a UNet side network.
    pub fn controlnet(&self, what: &str) -> Result<&ControlNetConfig> {
        self.controlnet
            .as_ref()
            .ok_or_else(|| Error::Config(format!("{what} needs a UNet ControlNet; this side network is a transformer")))
    }
}

/// The side network proper.
#[derive(Debug)]
pub enum SideModel {
    /// diffusers' `ControlNetModel`, for a UNet main network.
    ControlNet(ControlNetModel),
    /// diffusers' `SD3ControlNetModel`-style ControlNet-Transformer, for a transformer main network.
    Transformer(DiTControlNetModel),
}

/// What a side network's forward pass gives: the residuals for the main network and, with a hook,
/// the hooked feature as a [B, C, h, w] map.
#[derive(Debug)]
pub struct SideOutput {
    /// The residuals (times the conditioning scale).
    pub residuals: Residuals,
    /// The input of the hooked zero layer, still attached to the graph.
    pub hooked: Option<Tensor>,
}

impl SideOutput {
    /// The residuals as diffusers' ControlNet returns them (a UNet side network's only).
    pub fn into_controlnet(self) -> Result<ControlNetOutput> {
        match self.residuals {
            Residuals::UNet { down, mid } => {
                Ok(ControlNetOutput { down_block_res_samples: down, mid_block_res_sample: mid, hooked: self.hooked })
            }
            Residuals::Blocks(_) => Err(Error::Config("a transformer side network has no ControlNet residuals".into())),
        }
    }
}

/// A side network and its own variables (nothing of the main network).
pub struct SideNetwork {
    /// The side network's variables, named as diffusers' ControlNet checkpoint keys.
    pub vs: nn::VarStore,
    /// The model.
    pub model: SideModel,
    /// Its configuration.
    pub config: SideNetworkConfig,
    /// The parsed condition(s), one per conditioning channel.
    pub condition: ConditionSet,
}

impl SideNetwork {
    /// A new side network for `main` initialised as diffusers' `ControlNetModel.from_unet`: the
    /// encoder copied from the main UNet, fresh conditioning embedding, zero convs at zero.
    pub fn from_main(
        main: &MainNetwork,
        condition: impl Into<ConditionSet>,
        controlnet: ControlNetConfig,
    ) -> Result<Self> {
        let condition = condition.into();
        main.unet("a ControlNet side network (use SideNetwork::from_main_transformer)")?;
        if controlnet.unet != main.config.unet {
            return Err(Error::Config(
                "the side network's UNet config must be the main network's (it copies the main encoder)".into(),
            ));
        }
        check_channels(&condition, controlnet.conditioning_channels).map_err(Error::Config)?;
        let vs = nn::VarStore::new(main.vs.device());
        let params: HashMap<String, Tensor> = main.vs.variables();
        let model = SideModel::ControlNet(ControlNetModel::from_unet(vs.root(), &params, &controlnet)?);
        let config = SideNetworkConfig {
            controlnet: Some(controlnet),
            transformer: None,
            condition: condition.to_string(),
            objective: main.objective.name().into(),
        };
        Ok(Self { vs, model, config, condition })
    }

    /// A new ControlNet-Transformer side network for a transformer `main` (as diffusers'
    /// `SD3ControlNetModel.from_transformer`): embeddings and the first `cfg.num_layers` blocks copied,
    /// condition embedding and output layers at zero.
    pub fn from_main_transformer(
        main: &MainNetwork,
        condition: impl Into<ConditionSet>,
        cfg: DiTControlNetConfig,
    ) -> Result<Self> {
        let condition = condition.into();
        if main.config.transformer.as_ref() != Some(&cfg.transformer) {
            return Err(Error::Config(
                "the side transformer's config must be the main network's transformer (it copies its blocks)".into(),
            ));
        }
        check_channels(&condition, cfg.conditioning_channels).map_err(Error::Config)?;
        let vs = nn::VarStore::new(main.vs.device());
        let params: HashMap<String, Tensor> = main.vs.variables();
        let model = SideModel::Transformer(DiTControlNetModel::from_transformer(vs.root(), &params, &cfg)?);
        let config = SideNetworkConfig {
            controlnet: None,
            transformer: Some(cfg),
            condition: condition.to_string(),
            objective: main.objective.name().into(),
        };
        Ok(Self { vs, model, config, condition })
    }

    /// A freshly initialised side network of `main` with the architecture recorded in `config` (as a
    /// run's step 0 when the generator is seeded as the run seeded it).
    pub fn initial(main: &MainNetwork, condition: impl Into<ConditionSet>, config: &SideNetworkConfig) -> Result<Self> {
        match (&config.controlnet, &config.transformer) {
            (Some(c), _) => Self::from_main(main, condition, c.clone()),
            (None, Some(t)) => Self::from_main_transformer(main, condition, t.clone()),
            (None, None) => Err(Error::Config("a side network config needs `controlnet` or `transformer`".into())),
        }
    }

    /// Turns activation recomputation of the side network on or off (`train.gradient_checkpointing`): its
    /// down blocks and mid block keep only their inputs and run again in backward. A transformer side network
    /// has no recomputation yet and refuses it.
    pub fn set_gradient_checkpointing(&mut self, on: bool) -> Result<()> {
        match &mut self.model {
            SideModel::ControlNet(cn) => {
                if on && !crate::models::checkpoint::available() {
                    return Err(Error::Config(
                        "train.gradient_checkpointing needs the activation-recomputation shim, which this build \
                         lacks (libtorch's autograd headers were not found when it was built); rebuild against a \
                         full libtorch or set train.gradient_checkpointing = false"
                            .into(),
                    ));
                }
                cn.gradient_checkpointing = on;
                Ok(())
            }
            SideModel::Transformer(_) if on => Err(Error::Config(
                "train.gradient_checkpointing is built for UNet side networks (ControlNetModel) only; set it to \
                 false for a transformer side network"
                    .into(),
            )),
            SideModel::Transformer(_) => Ok(()),
        }
    }

    /// A new side network of the kind `main` takes: a ControlNet with `controlnet`'s settings for a UNet,
    /// a ControlNet-Transformer of `transformer_layers` blocks (0 = half the main network's) for a transformer.
    pub fn for_main(
        main: &MainNetwork,
        condition: impl Into<ConditionSet>,
        controlnet: ControlNetConfig,
        transformer_layers: i64,
    ) -> Result<Self> {
        let condition = condition.into();
        match &main.config.transformer {
            None => Self::from_main(main, condition, controlnet),
            Some(_) if controlnet.cross_norm_scale.is_some() => Err(Error::Config(
                "cross-normalization (side_connection = \"cross_norm\") is built for UNet side networks; a \
                 transformer's side network joins through its zero linear layers (side_connection = \"zero_conv\")"
                    .into(),
            )),
            Some(t) => {
                let layers = if transformer_layers > 0 { transformer_layers } else { (t.num_layers / 2).max(1) };
                let cfg = DiTControlNetConfig {
                    conditioning_channels: controlnet.conditioning_channels,
                    ..DiTControlNetConfig::for_transformer(t, layers)
                };
                Self::from_main_transformer(main, condition, cfg)
            }
        }
    }

    /// Loads a side network folder (or a `checkpoint-N/` of a side-network run, whose `config.json`
    /// is in the folder above) for use with `main`.
    pub fn load(dir: &Path, main: &MainNetwork) -> Result<Self> {
        let cfg_path = [dir.join(CONFIG_FILE), dir.join("..").join(CONFIG_FILE)]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!("no {CONFIG_FILE} here or in the folder above: not a side network folder"),
            })?;
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: SideNetworkConfig = serde_json::from_str(&text)
            .map_err(|e| Error::format(&cfg_path, format!("not a side network config: {e}")))?;
        let fits = match (&config.controlnet, &config.transformer) {
            (Some(c), None) => main.config.transformer.is_none() && c.unet == main.config.unet,
            (None, Some(t)) => main.config.transformer.as_ref() == Some(&t.transformer),
            _ => {
                return Err(Error::format(
                    &cfg_path,
                    "a side network config needs exactly one of `controlnet` and `transformer`",
                ))
            }
        };
        if !fits {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: "this side network was built for a main network with a different architecture; \
                      pass the main network it was trained with (--model)"
                    .into(),
            });
        }
        if config.objective != main.objective.name() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!(
                    "this side network was trained with a {} main network, not {}",
                    config.objective,
                    main.objective.name()
                ),
            });
        }
        let condition: ConditionSet = config.condition.parse()?;
        check_channels(&condition, config.conditioning_channels())
            .map_err(|msg| Error::Checkpoint { path: cfg_path.clone(), msg })?;
        let vs = nn::VarStore::new(main.vs.device());
        let model = match (&config.controlnet, &config.transformer) {
            (Some(c), _) => SideModel::ControlNet(ControlNetModel::new(vs.root(), c)?),
            (None, Some(t)) => SideModel::Transformer(DiTControlNetModel::new(vs.root(), t)?),
            (None, None) => unreachable!("checked above"),
        };
        let side = Self { vs, model, config, condition };
        let file = "model.safetensors";
        let tensors = crate::weights::read_tensors(&dir.join(file))?;
        // A side-network run's checkpoint also holds the LISA decoder; it is not part of the side network.
        let tensors =
            tensors.into_iter().filter(|(n, _)| !n.starts_with(DECODER_PREFIX)).collect();
        crate::weights::load_into(&side.named_parameters(), tensors, &dir.join(file))?;
        Ok(side)
    }

    /// Writes `config.json` and `model.safetensors` (the side network only) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_model_dir(dir, &self.config, &self.named_parameters())
    }

    /// Writes the side network as a diffusers `ControlNetModel` folder (`config.json` +
    /// `diffusion_pytorch_model.safetensors`) that `ControlNetModel.from_pretrained(dir)` loads and
    /// runs to the same residuals. Errors when diffusers cannot express its conditioning embedding
    /// (see [`diffusers::controlnet_config_to_json`]).
    pub fn export_diffusers(&self, dir: &Path) -> Result<()> {
        diffusers::save_controlnet(dir, self.config.controlnet("diffusers export")?, &self.named_parameters())
    }

    /// Imports a diffusers `ControlNetModel` folder (one exported by [`SideNetwork::export_diffusers`]
    /// or trained elsewhere) as a trainable side network of `main` for conditions of kind
    /// `condition`, e.g. to continue training it. Its encoder must match the main UNet's.
    pub fn import_diffusers(dir: &Path, main: &MainNetwork, condition: ConditionKind) -> Result<Self> {
        main.unet("importing a diffusers ControlNet")?;
        let cfg = diffusers::read_config(dir)?;
        let controlnet =
            diffusers::controlnet_config_from_json(&cfg, &dir.join(diffusers::CONFIG_FILE), Some(&main.config.unet))?;
        let vs = nn::VarStore::new(main.vs.device());
        let model = SideModel::ControlNet(ControlNetModel::new(vs.root(), &controlnet)?);
        let config = SideNetworkConfig {
            controlnet: Some(controlnet),
            transformer: None,
            condition: condition.name().into(),
            objective: main.objective.name().into(),
        };
        let condition = ConditionSet::from(condition);
        let side = Self { vs, model, config, condition };
        let tensors = diffusers::read_weights(dir, diffusers::WEIGHTS_FILE)?;
        crate::weights::load_into(&side.named_parameters(), tensors, &dir.join(diffusers::WEIGHTS_FILE))?;
        Ok(side)
    }

    /// All parameters, named as in the saved files, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether [`Self::residuals`] needs the main network's own pass on the same inputs (a cross-normalized
    /// ControlNet, [`ControlNetConfig::cross_norm_scale`]).
    pub fn needs_main_features(&self) -> bool {
        matches!(&self.model, SideModel::ControlNet(m) if m.config.cross_norm_scale.is_some())
    }

    /// Runs the side network: residuals for the main network (times `scale`) and, with `hook`, the
    /// hooked feature. `encoder_hidden_states` is the main network's label encoding of `y`; `main` the main
    /// network's own [`MainNetwork::down_mid`] on the same inputs, required when
    /// [`Self::needs_main_features`] (the residuals then depend on it), ignored otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn residuals(
        &self,
        x_t: &Tensor,
        model_t: &Tensor,
        encoder_hidden_states: &Tensor,
        condition: &Tensor,
        scale: f64,
        hook: Option<Hook>,
        main: Option<&SharedPass>,
    ) -> Result<SideOutput> {
        Ok(match &self.model {
            SideModel::ControlNet(m) => {
                let main = match main {
                    Some(SharedPass::UNet(e)) => Some(e),
                    _ => None,
                };
                let out = m.forward(x_t, model_t, encoder_hidden_states, condition, scale, hook, main)?;
                SideOutput {
                    residuals: Residuals::UNet { down: out.down_block_res_samples, mid: out.mid_block_res_sample },
                    hooked: out.hooked,
                }
            }
            SideModel::Transformer(m) => {
                let out = m.forward(x_t, model_t, encoder_hidden_states, condition, scale, hook)?;
                SideOutput { residuals: Residuals::Blocks(out.block_samples), hooked: out.hooked }
            }
        })
    }

    /// The layers a LISA hook can attach to, for the main network's sample size.
    pub fn hookable_layers(&self, sample_size: i64) -> Vec<crate::models::HookableLayer> {
        match &self.model {
            SideModel::ControlNet(m) => m.hookable_layers(sample_size, sample_size),
            SideModel::Transformer(m) => m.config.hookable_layers(),
        }
    }

    /// The controlled prediction `main(x_t, t, y; residuals = side(x_t, t, y, c))`.
    pub fn predict(
        &self,
        main: &MainNetwork,
        x_t: &Tensor,
        model_t: &Tensor,
        y: &Tensor,
        condition: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let encoder_hidden_states = main.label_encoder.forward(y)?;
        let shared = main.down_mid(x_t, model_t, &encoder_hidden_states)?;
        let side = self.residuals(x_t, model_t, &encoder_hidden_states, condition, scale, None, Some(&shared))?;
        main.up(&shared, Some(&side.residuals))
    }
}

/// A stacked side network takes one conditioning channel per condition (a single condition may come
/// as a grey or an RGB image).
fn check_channels(condition: &ConditionSet, conditioning_channels: i64) -> std::result::Result<(), String> {
    if condition.len() == 1 || conditioning_channels == condition.len() as i64 {
        Ok(())
    } else {
        Err(format!(
            "the side network for {condition} needs {} conditioning channels (one per condition), but its config has {}",
            condition.len(),
            conditioning_channels
        ))
    }
}
