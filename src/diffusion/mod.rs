//! Diffusion objectives and samplers: DDPM noise schedules with ε- or v-prediction, and rectified
//! flow matching. [`Objective`] is the one place that knows how `x_t`, the training target and a
//! sampler step are formed, so everything above it (training, LISA, sampling) is objective-agnostic.
pub mod objective;
pub mod sampler;
pub mod schedule;

pub use objective::{Objective, ObjectiveConfig, Prediction, TrainingSample};
pub use sampler::{Sampler, SamplerConfig, SamplerKind};
pub use schedule::{BetaSchedule, NoiseSchedule};
