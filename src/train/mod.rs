//! Training: the loop (`trainer`), AdamW with saved state, the LR schedule, EMA, atomic checkpoints
//! and metric logs.
pub mod checkpoint;
pub mod ema;
pub mod lr;
pub mod lock;
pub mod log;
pub mod optim;
pub mod trainer;
