//! The variants `lisa bench` times and one timed training step of ours (the trainer's own step).
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::control::ControlTask;
use crate::diffusion::Objective;
use crate::eval::flops::StepFlops;
use crate::models::precision::MixedPrecision;
use crate::train::loss_scaler::LossScaler;
use crate::train::optim::AdamW;
use crate::train::step::{train_step, Batch, Noise, StepOutcome, StepSettings};
use crate::{Error, Result};

/// One timed training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Our baseline (no LISA term).
    OursBaseline,
    /// Our LISA, `pred_main` from the shared encoder (spec §6).
    OursLisaShared,
    /// Our LISA, `pred_main` from a full second forward (as the authors).
    OursLisaFull,
    /// Our LISA (shared encoder) with the LISA term on a sub-batch (`lisa.sub_batch`): an unbiased
    /// estimate of the same loss, with more variance; not the authors' algorithm.
    OursLisaSubBatch,
    /// The reference's baseline.
    ReferenceBaseline,
    /// The reference's (authors') LISA, with its full second forward.
    ReferenceLisa,
}

impl Variant {
    /// Every variant, in table order.
    pub const ALL: [Variant; 6] = [
        Variant::OursBaseline,
        Variant::OursLisaShared,
        Variant::OursLisaFull,
        Variant::OursLisaSubBatch,
        Variant::ReferenceBaseline,
        Variant::ReferenceLisa,
    ];

    /// The row label.
    pub fn label(self) -> &'static str {
        match self {
            Variant::OursBaseline => "ours, baseline",
            Variant::OursLisaShared => "ours, LISA (shared encoder)",
            Variant::OursLisaFull => "ours, LISA (full 2nd forward)",
            Variant::OursLisaSubBatch => "ours, LISA (shared encoder, LISA term on a sub-batch)",
            Variant::ReferenceBaseline => "reference, baseline",
            Variant::ReferenceLisa => "reference, LISA (full 2nd forward)",
        }
    }

    /// Whether this runs in our process.
    pub fn is_ours(self) -> bool {
        matches!(
            self,
            Variant::OursBaseline | Variant::OursLisaShared | Variant::OursLisaFull | Variant::OursLisaSubBatch
        )
    }

    /// The reference script's arm name (`baseline` or `lisa`), for the reference's variants.
    pub fn reference_arm(self) -> Option<&'static str> {
        match self {
            Variant::ReferenceBaseline => Some("baseline"),
            Variant::ReferenceLisa => Some("lisa"),
            _ => None,
        }
    }
}

/// FLOPs of one training step of each variant (the per-layer counting is [`crate::eval::flops`]).
impl StepFlops {
    /// FLOPs of one training step of `variant` at `batch`, `lisa_examples` of which get the LISA term in
    /// the sub-batch variant.
    pub fn per_step(&self, variant: Variant, batch: i64, lisa_examples: i64) -> f64 {
        let baseline = (3.0 * self.side + self.main_encoder + 2.0 * self.main_up) * batch as f64;
        let shared_lisa = self.main_up + 3.0 * self.decoder;
        match variant {
            Variant::OursBaseline | Variant::ReferenceBaseline => baseline,
            Variant::OursLisaShared => baseline + shared_lisa * batch as f64,
            Variant::OursLisaSubBatch => baseline + shared_lisa * lisa_examples as f64,
            Variant::OursLisaFull | Variant::ReferenceLisa => {
                baseline + (self.main_encoder + shared_lisa) * batch as f64
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Peak RSS

/// One training step of ours: the trainer's own [`train_step`] (host-drawn noise reseeded from the
/// step, autocast, backward, clip, the host reads, AdamW, zero_grad), under fp16 with the trainer's loss
/// scaler (`scaler`, one per arm, kept across its steps); its seconds. An fp16 step whose gradients overflowed
/// is timed like any other (the trainer skips its update too); any other non-finite step is an error.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ours_step(
    task: &ControlTask,
    opt: &mut AdamW,
    objective: &Objective,
    batch: &Batch,
    seed: u64,
    round: u64,
    lr: f64,
    settings: StepSettings,
    scaler: Option<&mut LossScaler>,
) -> Result<f64> {
    let t0 = Instant::now();
    let noise = Noise::Seeded { seed, first_counter: round };
    let scaled = scaler.is_some();
    let r = train_step(task, opt, objective, std::slice::from_ref(batch), noise, lr, settings, scaler)?;
    match r.outcome {
        StepOutcome::Applied => {}
        StepOutcome::Overflow if scaled => {}
        _ => {
            return Err(Error::Training(format!(
                "bench: non-finite loss ({}) or gradient norm ({})",
                r.loss, r.grad_norm
            )))
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The trainer's loss scaler for an arm, where the step runs under fp16 (`None` otherwise).
pub(crate) fn loss_scaler_for(settings: StepSettings) -> Option<LossScaler> {
    (settings.mixed_precision == MixedPrecision::Fp16).then(LossScaler::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{LisaConfig, LisaHead, SideNetwork};
    use crate::data::conditions::ConditionKind;
    use crate::eval::flops::{shapes, FlopContext};
    use crate::models::{ControlNetConfig, Hook, LabelEncoderConfig, UNetConfig};
    use crate::pipeline::{MainNetwork, MainNetworkConfig};
    use tch::Device;

    #[test]
    fn every_weight_of_main_side_and_decoder_is_placed_and_lisa_costs_more() {
        let unet = UNetConfig::tiny();
        let cfg = MainNetworkConfig {
            unet: unet.clone(),
            label_encoder: LabelEncoderConfig { num_classes: 3, num_tokens: 2 },
            ..Default::default()
        };
        let mut main = MainNetwork::new(&cfg, Device::Cpu).unwrap();
        main.freeze();
        let cn =
            ControlNetConfig { conditioning_embedding_out_channels: vec![4, 8], ..ControlNetConfig::for_unet(&unet) };
        let side = SideNetwork::from_main(&main, ConditionKind::Edges, cn).unwrap();
        for hook in [Hook::Mid, Hook::Down(0)] {
            let lc = LisaConfig { hook, decoder_channel_floor: 4, ..LisaConfig::default() };
            let head = LisaHead::new(&main, &side, &lc).unwrap();
            let res = if hook == Hook::Mid { 2 } else { 8 };
            let ctx =
                FlopContext { unet: unet.clone(), size: 8, label_tokens: 2, cond_stride2: 0, decoder_feature_res: res };
            let f = StepFlops::count(
                &ctx,
                &shapes(&main.named_parameters()),
                &shapes(&side.named_parameters()),
                &shapes(&head.named_parameters()),
            );
            assert!(f.unrecognised.is_empty(), "{:?}", f.unrecognised);
            assert!(f.side > 0.0 && f.main_encoder > 0.0 && f.main_up > 0.0 && f.decoder > 0.0, "{f:?}");
            let step = |v| f.per_step(v, 4, 1);
            assert!(step(Variant::OursBaseline) < step(Variant::OursLisaSubBatch));
            assert!(step(Variant::OursLisaSubBatch) < step(Variant::OursLisaShared));
            assert_eq!(f.per_step(Variant::OursLisaSubBatch, 4, 4), step(Variant::OursLisaShared));
            assert!(step(Variant::OursLisaShared) < step(Variant::OursLisaFull));
            assert_eq!(step(Variant::OursLisaFull), step(Variant::ReferenceLisa));
            assert_eq!(step(Variant::OursBaseline), step(Variant::ReferenceBaseline));
            assert_eq!(step(Variant::OursBaseline), 4.0 * (3.0 * f.side + f.main_encoder + 2.0 * f.main_up));
        }
    }
}
