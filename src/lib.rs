//! orwcfm-fast: ORW-CFM-W2 reward fine-tuning of Torch-CFM flow-matching U-Nets.
//!
//! Layers, from the bottom up:
//! - [`tensor`]: dense f32 tensors with shape/strides and a [`tensor::Device`];
//! - [`backend::cpu`]: the reference implementation of every numeric kernel;
//! - [`autograd`]: a reverse-mode tape over those kernels ([`autograd::Var`]);
//! - [`nn`]: torchcfm's `UNetModelWrapper`, parameter for parameter;
//! - [`io`]: safetensors and PyTorch `.pt` checkpoints.
pub mod autograd;
pub mod backend;
pub mod cli;
pub mod commands;
pub mod data;
pub mod eval;
pub mod flow;
pub mod io;
pub mod logging;
pub mod nn;
pub mod optim;
pub mod orw;
pub mod plot;
pub mod pretrain;
pub mod reward;
pub mod rng;
pub mod tensor;
pub mod toy2d;
pub mod util;
