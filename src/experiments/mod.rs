//! Experiments: orchestration only (load data, build networks, call the trainer, sample, evaluate).
//! No model or loss code lives here except the one-line task that says what is regressed onto what.
pub mod ablate;
pub mod arm;
pub mod bench;
pub mod compare;
pub mod compose;
pub mod contrast;
pub mod control_config;
pub mod device_check;
pub mod disentangle;
pub mod evaluate;
pub mod guidance;
pub mod latent;
pub mod latent_cache;
pub mod lr_sweep;
pub mod pretrain;
pub mod protocol;
pub mod sample;
pub mod speedups;
pub mod study;
