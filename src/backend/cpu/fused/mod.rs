//! Fused CPU reference kernels, each forward and backward: the CPU side of the single tape nodes
//! of `crate::autograd::fused` (benchmarked against the unfused chains by `benches/fused.rs`):
//!
//! * [`norm_act`]: `act(GroupNorm(x) · (1 + scale) + shift)` (torchcfm's ResBlock norms);
//! * [`attention`]: flash-style QKV attention (online softmax over key tiles, only the per-row
//!   log-sum-exp saved; the backward recomputes the probabilities tile by tile);
//! * [`loss`]: the ORW-CFM-W2 loss values and `dL/dv` in one pass;
//! * [`ode`]: `x + Σ c_i k_i` (the Euler / midpoint / RK4 step combinations).
//!
//! What each backward needs (besides its forward's inputs and the upstream gradient):
//! `group_norm_act_backward`: the forward's `mean`, `rstd [N·groups]` (f32); flash attention:
//! the forward's `out [B, C, T]` and `lse [B·heads, T]`; the loss and the ODE combination: nothing.
//!
//! Every reduction runs in a fixed order (per-block partial sums added sequentially), so results
//! do not depend on the number of rayon threads.

/// A function whose body is compiled for each instruction-set level and picked at run time
/// ([`crate::multiversion`]; Rust does not contract `a·b + c` into an FMA, so every level rounds
/// identically).
macro_rules! dispatch {
    ($($t:tt)*) => { crate::multiversion! { $($t)* } };
}

pub mod attention;
pub mod loss;
pub mod norm_act;
pub mod ode;

pub use attention::{FLASH_TILE, FLASH_TILE_BUDGET, flash_attention_backward, flash_attention_backward_tiled, flash_attention_forward, flash_attention_forward_tiled, flash_tiles};
pub use loss::{OrwLossValue, orw_loss_backward, orw_loss_forward, orw_loss_forward_backward};
pub use norm_act::{Act, GnActGrads, GnGeom, group_norm_act_backward, group_norm_act_forward};
pub use ode::{ode_combine, ode_combine_backward};

/// Fixed chunk length for element-parallel loops (fixed, so partial sums do not depend on the
/// thread count).
pub(crate) const CHUNK: usize = 1 << 14;
