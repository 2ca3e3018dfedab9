//! Neural-network modules with torchcfm's parameter names.
pub mod config;
pub mod params;
pub mod unet;

pub use config::UNetConfig;
pub use params::ParamStore;
pub use unet::{Forward, Init, UNetModel};
