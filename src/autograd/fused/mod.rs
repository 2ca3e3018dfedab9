//! The fused tape nodes ([`CustomOp`](super::custom::CustomOp)s), each with a CPU kernel pair from
//! `backend::cpu::fused` and a composition of today's tensor ops (the unfused reference in tests;
//! on CUDA every node runs its fused kernels: `group_norm_act`, `orw_loss` and `ode_combine`
//! `kernels/fused.cu` through `backend::cuda::fused`, the attention `kernels/attention.cu` through
//! `backend::cuda::attention`):
//!
//! * [`group_norm_act`]: `act(GroupNorm(x) · (1 + scale) + shift)`, saving only `mean`, `rstd`;
//! * [`attention`]: torchcfm's QKV attention (either head order), flash-style on the CPU, saving
//!   the output and the per-row log-sum-exp, not the `T × T` probabilities;
//! * [`orw_loss`]: the ORW-CFM-W2 loss terms and `dL/dv` in one pass, the terms as a tensor on
//!   the loss's device (no host read);
//! * [`ode_combine`]: `x + Σ c_i k_i`, the Euler / midpoint / RK4 step combinations.

mod attention;
mod loss;
mod norm_act;
mod ode;

pub use attention::{Attention, attention};
pub use loss::{OrwLossOp, orw_loss};
pub use norm_act::{GroupNormAct, group_norm_act};
pub use ode::{OdeCombine, ode_combine, ode_combine_tensors};

pub use crate::backend::cpu::fused::Act;

use anyhow::{Result, bail};

use crate::backend::BackendStorage;
use crate::backend::cpu::CpuStorage;
use crate::backend::cuda::CudaStorage;
use crate::tensor::DType;

/// The dtype shared by float operands `xs` (an error naming `op` otherwise), as the CPU backend
/// requires (and the CUDA kernels, which run in f32 between casts).
fn float_dtype<S: BackendStorage>(op: &str, xs: &[(&S, &[usize])]) -> Result<DType> {
    let d = xs[0].0.dtype();
    for (i, (s, _)) in xs.iter().enumerate() {
        if !s.dtype().is_float() {
            bail!("{op}: input {i} is {}, a float op needs float inputs", s.dtype());
        }
        if s.dtype() != d {
            bail!("{op}: inputs of dtypes {d} and {} (cast one with to_dtype)", s.dtype());
        }
    }
    Ok(d)
}

/// The CUDA inputs widened to f32 for the fused kernels (shared when already f32; an i32 input is
/// converted, so callers check float dtypes first).
fn cuda_f32s(xs: &[(&CudaStorage, &[usize])]) -> Result<Vec<CudaStorage>> {
    xs.iter().map(|p| p.0.to_dtype(DType::F32)).collect()
}

/// `v` rounded once into `dtype` (shared when it is f32).
fn in_dtype(v: Vec<f32>, dtype: DType) -> CpuStorage {
    CpuStorage::from_f32_as(v, dtype)
}
