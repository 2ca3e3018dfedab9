//! The product subcommands: `pretrain`, `classifier`, `train`, `sample`, `eval`; and the
//! benchmarks (`bench unet | sample | round | kernels`).
pub mod bench;
pub mod bench_kernels;
pub mod classifier;
pub mod pretrain;
pub mod runconfig;
pub mod sample;
pub mod sweep;
pub mod train;
