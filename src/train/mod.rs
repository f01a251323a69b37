//! Training: the loop (`trainer`), the one optimizer update it runs (`step`), fp16 loss scaling, AdamW with saved state, the LR schedule, EMA, atomic checkpoints
//! and metric logs (CSV/JSONL, and TensorBoard event files).
pub mod checkpoint;
pub mod ema;
pub mod lr;
pub mod lock;
pub mod log;
pub mod loss_scaler;
pub mod optim;
pub mod step;
pub mod tensorboard;
pub mod trainer;
