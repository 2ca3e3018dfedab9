//! The storage-level GEMM-based and normalisation ops on f32 device data: matmul, linear (cuBLAS,
//! TF32 off unless allowed), GroupNorm (`kernels/norm.cu`) and QKV attention (GEMMs around the
//! row softmax). CPU twins in `backend/cpu` (`gemm`, `norm`, `attention`).

use anyhow::{Result, bail};

use super::f32ops::{f32_out, gather_strided, want_f32, want_len};
use super::gemm::{GemmTypes, Operand, gemm, gemm_typed, qkv_attention_backward_gemms, qkv_attention_forward_gemms, run_gemm};
use super::gpu::Arg;
use super::storage::{CudaStorage, same_gpu};
use crate::backend::geom::{AttnGeom, NormGeom};
use crate::tensor::DType;

/// `alpha · op(a) · op(b)` with `op(a)` `[m, k]` and `op(b)` `[k, n]`; `ta` means `a` is stored
/// `[k, m]`, `tb` that `b` is stored `[n, k]` (CPU: `CpuStorage::matmul`).
#[allow(clippy::too_many_arguments)]
pub fn matmul(a: &CudaStorage, ta: bool, b: &CudaStorage, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Result<CudaStorage> {
    let g = same_gpu("matmul", &[a, b])?;
    want_f32(a, "matmul")?;
    want_f32(b, "matmul")?;
    want_len(a, m * k, "matmul", "the left matrix")?;
    want_len(b, k * n, "matmul", "the right matrix")?;
    if k == 0 {
        return CudaStorage::full(&g, m * n, 0.0, DType::F32);
    }
    let y = f32_out(&g, m * n)?;
    gemm(&g, m, n, k, Operand::at(a.ptr(), ta), Operand::at(b.ptr(), tb), y.ptr(), 0, alpha, 0.0, 1)?;
    Ok(y)
}

/// `x [n, i] · wᵀ + bias` with `w [o, i]` (CPU: `CpuStorage::linear`: the bias is laid down
/// first, then the product accumulated onto it).
pub fn linear(x: &CudaStorage, w: &CudaStorage, bias: Option<&CudaStorage>, n: usize, i: usize, o: usize) -> Result<CudaStorage> {
    let g = same_gpu("linear", &[x, w])?;
    want_f32(x, "linear")?;
    want_f32(w, "linear")?;
    want_len(x, n * i, "linear", "the input")?;
    want_len(w, o * i, "linear", "the weight")?;
    let (y, beta) = match bias {
        Some(b) => {
            same_gpu("linear", &[x, b])?;
            want_f32(b, "linear")?;
            if b.elements() != o {
                bail!("linear: a bias of {} values for {o} outputs", b.elements());
            }
            // a fresh buffer even for n = 1: the GEMM accumulates into it
            (gather_strided(b, &[n, o], &[0, 1])?, 1.0)
        }
        None if i == 0 => (CudaStorage::full(&g, n * o, 0.0, DType::F32)?, 0.0),
        None => (f32_out(&g, n * o)?, 0.0),
    };
    if i > 0 {
        gemm(&g, n, o, i, Operand::at(x.ptr(), false), Operand::at(w.ptr(), true), y.ptr(), 0, 1.0, beta, 1)?;
    }
    Ok(y)
}

/// [`matmul`] of 16-bit operands on the tensor cores (`cublasGemmEx`, f32 accumulation), the
/// output in their dtype, rounded once (CPU: `CpuStorage::matmul` of f16/bf16 storages).
#[allow(clippy::too_many_arguments)]
pub fn matmul_h16(a: &CudaStorage, ta: bool, b: &CudaStorage, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Result<CudaStorage> {
    let g = same_gpu("matmul", &[a, b])?;
    let dt = want_h16(&[a, b], "matmul")?;
    want_len(a, m * k, "matmul", "the left matrix")?;
    want_len(b, k * n, "matmul", "the right matrix")?;
    if k == 0 {
        return CudaStorage::full(&g, m * n, 0.0, dt);
    }
    let y = CudaStorage::alloc(&g, m * n, dt)?;
    gemm_typed(&g, GemmTypes::all(dt), m, n, k, Operand::at(a.ptr(), ta), Operand::at(b.ptr(), tb), y.ptr(), 0, alpha, 0.0, 1)?;
    Ok(y)
}

/// [`linear`] of 16-bit `x` and `w` (the bias f32): the tensor-core GEMM into f32, then the bias
/// added and the sum rounded once by `bias_round_h16` (CPU: `CpuStorage::linear`).
pub fn linear_h16(x: &CudaStorage, w: &CudaStorage, bias: Option<&CudaStorage>, n: usize, i: usize, o: usize) -> Result<CudaStorage> {
    let g = same_gpu("linear", &[x, w])?;
    let dt = want_h16(&[x, w], "linear")?;
    want_len(x, n * i, "linear", "the input")?;
    want_len(w, o * i, "linear", "the weight")?;
    if let Some(b) = bias {
        same_gpu("linear", &[x, b])?;
        want_f32(b, "linear")?;
        if b.elements() != o {
            bail!("linear: a bias of {} values for {o} outputs", b.elements());
        }
    }
    if bias.is_none() && i > 0 {
        let y = CudaStorage::alloc(&g, n * o, dt)?;
        gemm_typed(&g, GemmTypes::all(dt), n, o, i, Operand::at(x.ptr(), false), Operand::at(w.ptr(), true), y.ptr(), 0, 1.0, 0.0, 1)?;
        return Ok(y);
    }
    let y32 = if i > 0 { f32_out(&g, n * o)? } else { CudaStorage::full(&g, n * o, 0.0, DType::F32)? };
    if i > 0 {
        gemm_typed(&g, GemmTypes::to_f32(dt), n, o, i, Operand::at(x.ptr(), false), Operand::at(w.ptr(), true), y32.ptr(), 0, 1.0, 0.0, 1)?;
    }
    let y = CudaStorage::alloc(&g, n * o, dt)?;
    if n * o > 0 {
        let bp = bias.map_or(0, |b| b.ptr());
        let bf = Arg::U32(u32::from(dt == DType::BF16));
        g.launch_n("bias_round_h16", n * o, &[Arg::Ptr(y32.ptr()), Arg::Ptr(bp), Arg::Ptr(y.ptr()), Arg::I64((n * o) as i64), Arg::I64(o.max(1) as i64), Arg::I64(1), bf])?;
    }
    Ok(y)
}

/// The common 16-bit dtype of `ts`, or an error.
fn want_h16(ts: &[&CudaStorage], op: &str) -> Result<DType> {
    let d = ts[0].storage_dtype();
    if !matches!(d, DType::F16 | DType::BF16) || ts.iter().any(|t| t.storage_dtype() != d) {
        bail!("{op}: expected f16 or bf16 operands of one dtype, found {:?}", ts.iter().map(|t| t.storage_dtype()).collect::<Vec<_>>());
    }
    Ok(d)
}

fn check_norm(g: &NormGeom, op: &str) -> Result<()> {
    if g.groups == 0 || !g.c.is_multiple_of(g.groups) {
        bail!("{op}: {} channels in {} groups", g.c, g.groups);
    }
    Ok(())
}

/// GroupNorm forward: `(y, mean, rstd)`, mean and rstd `[n·groups]` (CPU: `norm::group_norm_forward`).
pub fn group_norm(x: &CudaStorage, gamma: &CudaStorage, beta: &CudaStorage, k: &NormGeom) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let g = same_gpu("group_norm", &[x, gamma, beta])?;
    check_norm(k, "group_norm")?;
    let (n, c, s, groups) = (k.n, k.c, k.s, k.groups);
    for (t, len, what) in [(x, n * c * s, "the input"), (gamma, c, "gamma"), (beta, c, "beta")] {
        want_f32(t, "group_norm")?;
        want_len(t, len, "group_norm", what)?;
    }
    let y = f32_out(&g, n * c * s)?;
    let mean = f32_out(&g, n * groups)?;
    let rstd = f32_out(&g, n * groups)?;
    if n * groups == 0 {
        return Ok((y, mean, rstd));
    }
    let a = [
        Arg::Ptr(x.ptr()),
        Arg::Ptr(gamma.ptr()),
        Arg::Ptr(beta.ptr()),
        Arg::Ptr(y.ptr()),
        Arg::Ptr(mean.ptr()),
        Arg::Ptr(rstd.ptr()),
        Arg::I64(n as i64),
        Arg::I64(c as i64),
        Arg::I64(s as i64),
        Arg::I64(groups as i64),
        Arg::F32(k.eps),
    ];
    g.launch_rows("group_norm_forward_f32", n * groups, &a)?;
    Ok((y, mean, rstd))
}

/// GroupNorm backward: `(dx, dgamma, dbeta)` (CPU: `norm::group_norm_backward`).
pub fn group_norm_backward(x: &CudaStorage, dy: &CudaStorage, gamma: &CudaStorage, mean: &CudaStorage, rstd: &CudaStorage, k: &NormGeom) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let g = same_gpu("group_norm_backward", &[x, dy, gamma, mean, rstd])?;
    check_norm(k, "group_norm_backward")?;
    let (n, c, s, groups) = (k.n, k.c, k.s, k.groups);
    for (t, len, what) in [(x, n * c * s, "the input"), (dy, n * c * s, "the gradient"), (gamma, c, "gamma"), (mean, n * groups, "the means"), (rstd, n * groups, "the rstds")] {
        want_f32(t, "group_norm_backward")?;
        want_len(t, len, "group_norm_backward", what)?;
    }
    let dx = f32_out(&g, n * c * s)?;
    let dgamma = f32_out(&g, c)?;
    let dbeta = f32_out(&g, c)?;
    if c == 0 {
        return Ok((dx, dgamma, dbeta));
    }
    let dims = [Arg::I64(n as i64), Arg::I64(c as i64), Arg::I64(s as i64), Arg::I64(groups as i64)];
    if n > 0 {
        let mut a = vec![Arg::Ptr(x.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(gamma.ptr()), Arg::Ptr(mean.ptr()), Arg::Ptr(rstd.ptr()), Arg::Ptr(dx.ptr())];
        a.extend(dims);
        g.launch_rows("group_norm_backward_input_f32", n * groups, &a)?;
    }
    let mut a = vec![Arg::Ptr(x.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(mean.ptr()), Arg::Ptr(rstd.ptr()), Arg::Ptr(dgamma.ptr()), Arg::Ptr(dbeta.ptr())];
    a.extend(dims);
    g.launch_rows("group_norm_backward_affine_f32", c, &a)?;
    Ok((dx, dgamma, dbeta))
}

fn check_attn(qkv: &CudaStorage, a: &AttnGeom, op: &str) -> Result<()> {
    want_f32(qkv, op)?;
    want_len(qkv, a.qkv_shape().iter().product(), op, "qkv")
}

/// torchcfm's QKV attention: `(out [b, heads·ch, t], probs [b·heads, t, t])` (CPU:
/// `attention::qkv_attention_forward`).
pub fn qkv_attention(qkv: &CudaStorage, a: &AttnGeom) -> Result<(CudaStorage, CudaStorage)> {
    check_attn(qkv, a, "qkv_attention")?;
    let g = qkv.gpu().clone();
    let (t, ch, bh) = (a.t, a.ch, a.b * a.heads);
    let probs = f32_out(&g, bh * t * t)?;
    let out_n = a.out_shape().iter().product();
    if bh * t == 0 {
        return Ok((f32_out(&g, out_n)?, probs));
    }
    if ch == 0 {
        bail!("attention: heads of no channels");
    }
    let o = f32_out(&g, out_n)?;
    let [s, pv] = qkv_attention_forward_gemms(a, qkv.ptr(), probs.ptr(), o.ptr());
    for op in &s {
        run_gemm(&g, op)?;
    }
    g.launch_rows("softmax_rows_f32", bh * t, &[Arg::Ptr(probs.ptr()), Arg::Ptr(probs.ptr()), Arg::I64((bh * t) as i64), Arg::I64(t as i64)])?;
    for op in &pv {
        run_gemm(&g, op)?;
    }
    Ok((o, probs))
}

/// `dqkv` from `dout` and the saved probabilities (CPU: `attention::qkv_attention_backward`).
pub fn qkv_attention_backward(qkv: &CudaStorage, probs: &CudaStorage, dout: &CudaStorage, a: &AttnGeom) -> Result<CudaStorage> {
    let g = same_gpu("qkv_attention_backward", &[qkv, probs, dout])?;
    check_attn(qkv, a, "qkv_attention_backward")?;
    let (t, bh) = (a.t, a.b * a.heads);
    want_f32(probs, "qkv_attention_backward")?;
    want_len(probs, bh * t * t, "qkv_attention_backward", "the probabilities")?;
    want_f32(dout, "qkv_attention_backward")?;
    want_len(dout, a.out_shape().iter().product(), "qkv_attention_backward", "the output gradient")?;
    let dqkv = f32_out(&g, qkv.elements())?;
    if qkv.elements() == 0 {
        return Ok(dqkv);
    }
    let dp = f32_out(&g, bh * t * t)?;
    let [first, second] = qkv_attention_backward_gemms(a, qkv.ptr(), probs.ptr(), dout.ptr(), dqkv.ptr(), dp.ptr());
    for op in &first {
        run_gemm(&g, op)?;
    }
    g.launch_rows("softmax_rows_backward_f32", bh * t, &[Arg::Ptr(probs.ptr()), Arg::Ptr(dp.ptr()), Arg::Ptr(dp.ptr()), Arg::I64((bh * t) as i64), Arg::I64(t as i64)])?;
    for op in &second {
        run_gemm(&g, op)?;
    }
    Ok(dqkv)
}
