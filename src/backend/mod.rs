//! Numeric backends. The CPU backend is the reference for every op.
pub mod cpu;
pub mod cuda;
