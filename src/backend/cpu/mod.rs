//! The CPU reference backend: plain slices in, plain slices out, parallel with rayon.
//!
//! Every function here is a kernel with a matching backward kernel; the autograd layer
//! (`crate::autograd`) wires them into the tape.
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod norm;
pub mod simd;
pub mod winograd;

/// Work below this many elements stays on one thread.
pub const PAR_MIN: usize = 1 << 15;
