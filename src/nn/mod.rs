//! Neural-network modules with torchcfm's (and, for CLIP, Hugging Face's) parameter names.
pub mod classifier;
pub mod clip;
pub mod clip_tokenizer;
pub mod config;
pub mod load;
pub mod mlp;
pub mod params;
pub mod unet;
pub mod velocity;

pub use classifier::{Classifier, ClassifierConfig};
pub use clip::{ClipConfig, ClipModel, ClipProcessor};
pub use clip_tokenizer::ClipTokenizer;
pub use config::UNetConfig;
pub use load::{ConfigSource, LoadedModel, infer_config, load_model, model_from_raw, save_model};
pub use mlp::{Mlp, MlpConfig};
pub use params::ParamStore;
pub use unet::{Forward, Init, UNetModel};
pub use velocity::VelocityField;
