//! Dtype conversions on the device (`kernels/cast.cu`), bit for bit the CPU reference's (the
//! `half` crate's round-to-nearest-even conversions, Rust's `as` between f32 and i32).

use anyhow::Result;

use super::gpu::Arg;
use super::storage::CudaStorage;
use crate::tensor::DType;

fn run(x: &CudaStorage, kernel: &str, to: DType) -> Result<CudaStorage> {
    let n = x.elements();
    let y = CudaStorage::alloc(x.gpu(), n, to)?;
    if n > 0 {
        x.gpu().launch_n(kernel, n, &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64)])?;
    }
    Ok(y)
}

/// `x` in `to`: shared when it already is; f16 ↔ bf16 and i32 ↔ f16/bf16 go through f32, as on
/// the CPU (exact on the way up, one rounding on the way down).
pub fn cast(x: &CudaStorage, to: DType) -> Result<CudaStorage> {
    use DType::*;
    match (x.storage_dtype(), to) {
        (a, b) if a == b => Ok(x.clone()),
        (F32, F16) => run(x, "cast_f32_to_f16", F16),
        (F32, BF16) => run(x, "cast_f32_to_bf16", BF16),
        (F32, I32) => run(x, "cast_f32_to_i32", I32),
        (F16, F32) => run(x, "cast_f16_to_f32", F32),
        (BF16, F32) => run(x, "cast_bf16_to_f32", F32),
        (I32, F32) => run(x, "cast_i32_to_f32", F32),
        (_, b) => cast(&cast(x, F32)?, b),
    }
}
