//! Visual control of a frozen main network: the ControlNet side network as a unit that can be
//! trained, saved and sampled ([`side`]), the LISA auxiliary objective ([`lisa`]), the training
//! step that joins them ([`task`]), and sampling under one or several side networks with
//! classifier-free guidance ([`sampling`]).
//!
//! One step, as the data travels (spec §3–§6):
//! `x_t, t, y, c` → side network (trainable) → zero-conv residuals + the hooked feature `h`;
//! frozen main encoder (once) → up path with residuals = `pred_full`;
//! LISA only: up path without residuals (no grad) = `pred_main`, `r = target − pred_main`,
//! `L = ‖pred_full − target‖² + λ·‖D(h, t) − r‖²`.
pub mod lisa;
pub mod sampling;
pub mod side;
pub mod task;

pub use lisa::{likelihood_residual, LisaConfig, LisaDistance, LisaHead, LisaTarget, ReferencePass, NUM_TIME_BUCKETS};
pub use sampling::{controlled_prediction, sample_controlled, sample_controlled_chunked, Control, ControlOptions};
pub use side::{SideModel, SideNetwork, SideNetworkConfig, SideOutput};
pub use task::ControlTask;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transformer_tests;
