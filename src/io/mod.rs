//! Reading and writing weights and tensors: safetensors and PyTorch `.pt` checkpoints.
pub mod model;
pub mod pt;
pub mod safetensors;
