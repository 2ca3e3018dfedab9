//! The product subcommands: `pretrain`, `classifier`, `train`, `sample`, `eval`.
pub mod classifier;
pub mod pretrain;
pub mod runconfig;
pub mod sample;
pub mod train;
