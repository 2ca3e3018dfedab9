//! Reading and writing weights and tensors: safetensors and PyTorch `.pt` checkpoints.
pub mod image;
pub mod model;
pub mod pt;
pub mod safetensors;
