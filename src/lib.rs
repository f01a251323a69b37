//! lisa: train ControlNet-style side networks for diffusion models with Likelihood Score Alignment
//! (LISA), and measure what it buys.
//!
//! The modules follow the pipeline: data → models → diffusion objectives → training → sampling →
//! evaluation → CLI.
pub mod data;
pub mod error;
pub mod eval;
pub mod rng;

pub use error::{Error, Result};
