//! ORW-CFM-W2: online reward-weighted conditional flow matching with a W2 regulariser.
pub mod loss;
