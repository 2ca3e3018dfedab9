//! The product subcommands: `pretrain`, `classifier`, `train`, `sample`, `eval`, `score`; and the
//! benchmarks (`bench unet | sample | round | kernels`).
pub mod bench;
pub mod bench_kernels;
pub mod classifier;
pub mod pretrain;
pub mod runconfig;
pub mod sample;
pub mod score;
pub mod sweep;
pub mod train;
