//! lisa: train ControlNet-style side networks for diffusion models with Likelihood Score Alignment
//! (LISA), and measure what it buys.
//!
//! The modules follow the pipeline: data → models → diffusion objectives → side networks and LISA → training → sampling →
//! evaluation → CLI.
#![warn(missing_docs)]

pub mod allocator;
pub mod config;
pub mod control;
pub mod data;
pub mod diffusion;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod experiments;
pub mod fuzzing;
pub mod models;
pub mod pipeline;
pub mod rng;
pub mod sd;
pub mod toy;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
