//! ORW-CFM-W2: online reward-weighted conditional flow matching with a W2 regulariser.
pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod run;
pub mod step_graph;
pub mod trainer;

pub use config::OrwConfig;
pub use run::{OnStep, RunEnd, TrainHooks};
pub use trainer::{NoiseStreams, PairedBatch, StepMetrics, Trainer, pair_batch, sample_model, sample_model_with_noise};
