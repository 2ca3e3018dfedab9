//! The fused nodes' kernels on the GPU (`kernels/fused.cu`), f32 storages in and out; the nodes
//! (`autograd::fused`) cast f16/bf16 around them, as the rest of the CUDA backend does. CPU twins:
//! `backend::cpu::fused` (named per function). Nothing here reads the device back.
//!
//! Launches: the GroupNorm passes are block per (sample, group) (`launch_rows`, 256 threads),
//! its affine reduction and the ODE combination grid-stride (`launch_n`, float4 where the
//! pointers allow); the loss is one block per (sample, chunk) pair ([`loss_chunking`]) and one
//! block to finish the terms.

use std::sync::Arc;

use anyhow::{Result, bail};
use cudarc::driver::DeviceRepr;

use super::f32ops::{f32_out, want_f32, want_len};
use super::gpu::{Arg, Gpu, Launch};
use super::storage::{CudaStorage, same_gpu};
use crate::backend::cpu::fused::GnGeom;
use crate::tensor::DType;

/// Slopes (or gradient outputs) one ODE launch takes: the kernels' `OdeTerms`/`OdeGrads`.
pub const ODE_MAX_TERMS: usize = 8;

/// `ode_combine_f32`'s `OdeTerms` and `ode_combine_backward_f32`'s `OdeGrads` (same layout):
/// up to [`ODE_MAX_TERMS`] device pointers, their coefficients, and how many are used.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OdeTerms {
    pub ptrs: [u64; ODE_MAX_TERMS],
    pub coeffs: [f32; ODE_MAX_TERMS],
    pub n_terms: i64,
}
// SAFETY: plain integers and floats, laid out as the kernels' structs
unsafe impl DeviceRepr for OdeTerms {}

impl OdeTerms {
    /// At most [`ODE_MAX_TERMS`] `(coefficient, pointer)` pairs; an error for more.
    pub fn new(terms: &[(f32, u64)]) -> Result<OdeTerms> {
        if terms.len() > ODE_MAX_TERMS {
            bail!("ode_combine: {} terms in one launch (at most {ODE_MAX_TERMS})", terms.len());
        }
        let mut t = OdeTerms { ptrs: [0; ODE_MAX_TERMS], coeffs: [0.0; ODE_MAX_TERMS], n_terms: terms.len() as i64 };
        for (i, &(c, p)) in terms.iter().enumerate() {
            t.ptrs[i] = p;
            t.coeffs[i] = c;
        }
        Ok(t)
    }
}

/// Results of [`group_norm_act_backward`]: `dscale`/`dshift` when the forward had them.
pub struct GnActGradsGpu {
    pub dx: CudaStorage,
    pub dgamma: CudaStorage,
    pub dbeta: CudaStorage,
    pub dscale: Option<CudaStorage>,
    pub dshift: Option<CudaStorage>,
}

fn opt_ptr(s: Option<&CudaStorage>) -> u64 {
    s.map_or(0, CudaStorage::ptr)
}

fn gn_check(op: &str, g: &GnGeom, x: &CudaStorage, gamma: &CudaStorage, beta: &CudaStorage, scale: Option<&CudaStorage>, shift: Option<&CudaStorage>) -> Result<Arc<Gpu>> {
    let mut all = vec![x, gamma, beta];
    all.extend(scale);
    all.extend(shift);
    let gpu = same_gpu(op, &all)?;
    if g.groups == 0 || !g.c.is_multiple_of(g.groups) {
        bail!("{op}: {} channels in {} groups", g.c, g.groups);
    }
    // x may be f16/bf16 in the forward (group_norm_act_forward_h16); the rest f32
    for t in &all[usize::from(x.storage_dtype().is_half())..] {
        want_f32(t, op)?;
    }
    want_len(x, g.n * g.c * g.s, op, "x")?;
    want_len(gamma, g.c, op, "gamma")?;
    want_len(beta, g.c, op, "beta")?;
    for (t, what) in [(scale, "scale"), (shift, "shift")] {
        if let Some(t) = t {
            want_len(t, g.n * g.c, op, what)?;
        }
    }
    Ok(gpu)
}

/// `act(GN(x) · (1 + scale) + shift)` (CPU: `group_norm_act_forward`): `(y, mean, rstd)`, the
/// statistics `[N·groups]` f32. One launch. `x` f32, or f16/bf16 (then `y` too: read and written
/// as 16 bits by `group_norm_act_forward_h16`, bit for bit the f32 kernel between a widening and
/// a rounding); the affine parameters f32.
pub fn group_norm_act_forward(
    x: &CudaStorage,
    gamma: &CudaStorage,
    beta: &CudaStorage,
    scale: Option<&CudaStorage>,
    shift: Option<&CudaStorage>,
    g: &GnGeom,
    silu: bool,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let op = "group_norm_act";
    let gpu = gn_check(op, g, x, gamma, beta, scale, shift)?;
    let ng = g.n * g.groups;
    let dt = x.storage_dtype();
    let (y, mean, rstd) = (CudaStorage::alloc(&gpu, x.elements(), dt)?, f32_out(&gpu, ng)?, f32_out(&gpu, ng)?);
    if ng == 0 || g.c * g.s == 0 {
        // no elements: the statistics of empty blocks are zeros, as on the CPU
        return Ok((y, CudaStorage::full(&gpu, ng, 0.0, DType::F32)?, CudaStorage::full(&gpu, ng, 0.0, DType::F32)?));
    }
    let args = [
        Arg::Ptr(x.ptr()),
        Arg::Ptr(gamma.ptr()),
        Arg::Ptr(beta.ptr()),
        Arg::Ptr(opt_ptr(scale)),
        Arg::Ptr(opt_ptr(shift)),
        Arg::Ptr(y.ptr()),
        Arg::Ptr(mean.ptr()),
        Arg::Ptr(rstd.ptr()),
        Arg::I64(g.n as i64),
        Arg::I64(g.c as i64),
        Arg::I64(g.s as i64),
        Arg::I64(g.groups as i64),
        Arg::F32(g.eps),
        Arg::I64(silu as i64),
    ];
    if dt.is_half() {
        gpu.launch_rows("group_norm_act_forward_h16", ng, &[&args[..], &[Arg::U32(u32::from(dt == DType::BF16))]].concat())?;
    } else {
        gpu.launch_rows("group_norm_act_forward_f32", ng, &args)?;
    }
    Ok((y, mean, rstd))
}

/// The backward from `dy` and the forward's `mean`, `rstd` (CPU: `group_norm_act_backward`): one
/// block-per-(sample, group) launch for `dx`, `dscale`, `dshift` and the per-sample terms of
/// `dgamma`/`dbeta`, one small launch summing those over the samples.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act_backward(
    x: &CudaStorage,
    dy: &CudaStorage,
    gamma: &CudaStorage,
    beta: &CudaStorage,
    scale: Option<&CudaStorage>,
    shift: Option<&CudaStorage>,
    mean: &CudaStorage,
    rstd: &CudaStorage,
    g: &GnGeom,
    silu: bool,
) -> Result<GnActGradsGpu> {
    let op = "group_norm_act_backward";
    let gpu = gn_check(op, g, x, gamma, beta, scale, shift)?;
    same_gpu(op, &[x, dy, mean, rstd])?;
    for (t, what, n) in [(dy, "dy", x.elements()), (mean, "mean", g.n * g.groups), (rstd, "rstd", g.n * g.groups)] {
        want_f32(t, op)?;
        want_len(t, n, op, what)?;
    }
    let nc = g.n * g.c;
    let dx = f32_out(&gpu, x.elements())?;
    let dscale = scale.map(|_| f32_out(&gpu, nc)).transpose()?;
    let dshift = shift.map(|_| f32_out(&gpu, nc)).transpose()?;
    if nc == 0 || g.s == 0 {
        let z = |n| CudaStorage::full(&gpu, n, 0.0, DType::F32);
        return Ok(GnActGradsGpu { dx, dgamma: z(g.c)?, dbeta: z(g.c)?, dscale: scale.map(|_| z(nc)).transpose()?, dshift: shift.map(|_| z(nc)).transpose()? });
    }
    // (dgamma, dbeta) terms per (sample, channel), doubles: two words each
    let part = gpu.alloc(4 * nc)?;
    let args = [
        Arg::Ptr(x.ptr()),
        Arg::Ptr(dy.ptr()),
        Arg::Ptr(gamma.ptr()),
        Arg::Ptr(beta.ptr()),
        Arg::Ptr(opt_ptr(scale)),
        Arg::Ptr(opt_ptr(shift)),
        Arg::Ptr(mean.ptr()),
        Arg::Ptr(rstd.ptr()),
        Arg::Ptr(dx.ptr()),
        Arg::Ptr(opt_ptr(dscale.as_ref())),
        Arg::Ptr(opt_ptr(dshift.as_ref())),
        Arg::Ptr(part.ptr()),
        Arg::I64(g.n as i64),
        Arg::I64(g.c as i64),
        Arg::I64(g.s as i64),
        Arg::I64(g.groups as i64),
        Arg::I64(silu as i64),
    ];
    gpu.launch_rows("group_norm_act_backward_f32", g.n * g.groups, &args)?;
    let (dgamma, dbeta) = (f32_out(&gpu, g.c)?, f32_out(&gpu, g.c)?);
    gpu.launch_n("group_norm_act_backward_affine_f32", g.c, &[Arg::Ptr(part.ptr()), Arg::Ptr(dgamma.ptr()), Arg::Ptr(dbeta.ptr()), Arg::I64(g.n as i64), Arg::I64(g.c as i64)])?;
    Ok(GnActGradsGpu { dx, dgamma, dbeta, dscale, dshift })
}

/// `x + Σ c_i k_i` (CPU: `backend::cpu::fused::ode_combine`): zero coefficients dropped, the sum
/// in double, rounded once; one launch per [`ODE_MAX_TERMS`] terms (beyond that, the state is
/// rounded to f32 between launches).
pub fn ode_combine(x: &CudaStorage, terms: &[(f32, &CudaStorage)]) -> Result<CudaStorage> {
    let op = "ode_combine";
    let mut all = vec![x];
    all.extend(terms.iter().map(|t| t.1));
    let gpu = same_gpu(op, &all)?;
    let n = x.elements();
    for (i, t) in all.iter().enumerate() {
        want_f32(t, op)?;
        want_len(t, n, op, if i == 0 { "the state" } else { "a slope" })?;
    }
    let live: Vec<(f32, u64)> = terms.iter().filter(|t| t.0 != 0.0).map(|t| (t.0, t.1.ptr())).collect();
    let out = f32_out(&gpu, n)?;
    if n == 0 {
        return Ok(out);
    }
    let mut src = x.ptr();
    let mut chunks: Vec<&[(f32, u64)]> = live.chunks(ODE_MAX_TERMS).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for chunk in chunks {
        let t = OdeTerms::new(chunk)?;
        // grid-stride over float4 quads (the kernel falls back to scalars where misaligned)
        gpu.launch_n("ode_combine_f32", n.div_ceil(4), &[Arg::Ptr(src), Arg::Ptr(out.ptr()), Arg::I64(n as i64), Arg::Struct(&t)])?;
        src = out.ptr();
    }
    Ok(out)
}

/// `c_i · g` for each coefficient (CPU: `ode_combine_backward`'s `dk_i`), one launch (per
/// [`ODE_MAX_TERMS`] outputs) reading `g` once.
pub fn ode_combine_backward(g: &CudaStorage, coeffs: &[f32]) -> Result<Vec<CudaStorage>> {
    want_f32(g, "ode_combine_backward")?;
    let gpu = g.gpu().clone();
    let n = g.elements();
    let outs: Vec<CudaStorage> = coeffs.iter().map(|_| f32_out(&gpu, n)).collect::<Result<_>>()?;
    if n == 0 {
        return Ok(outs);
    }
    let pairs: Vec<(f32, u64)> = coeffs.iter().zip(&outs).map(|(&c, o)| (c, o.ptr())).collect();
    for chunk in pairs.chunks(ODE_MAX_TERMS) {
        let t = OdeTerms::new(chunk)?;
        gpu.launch_n("ode_combine_backward_f32", n.div_ceil(4), &[Arg::Ptr(g.ptr()), Arg::I64(n as i64), Arg::Struct(&t)])?;
    }
    Ok(outs)
}

/// How [`orw_loss`] splits each sample of `p` values: `(chunk, nchunks)`, chunks of a multiple
/// of 4 values, at least 2048 and about 1024 pairs in all (a few blocks per SM on an H200).
pub fn loss_chunking(b: usize, p: usize) -> (usize, usize) {
    let chunk = (b * p).div_ceil(1024).next_multiple_of(4).max(2048);
    (chunk, p.div_ceil(chunk).max(1))
}

/// The ORW-CFM-W2 loss terms `[fm, w2, total]` (f32 on the device) and, when `want_dv`, `dL/dv`
/// for an upstream gradient of 1, in one pass over `v`, `u`, `v_ref` (CPU:
/// `orw_loss_forward_backward`): per-(sample, chunk) partial sums in double, then one block
/// finishes the terms. `v_ref` is `None` without a W2 term (α must then be 0).
pub fn orw_loss(v: &CudaStorage, u: &CudaStorage, w: &CudaStorage, vref: Option<&CudaStorage>, alpha: f32, want_dv: bool) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let op = "orw_loss";
    let mut all = vec![v, u, w];
    all.extend(vref);
    let gpu = same_gpu(op, &all)?;
    for t in &all {
        want_f32(t, op)?;
    }
    let b = w.elements();
    if b == 0 || !v.elements().is_multiple_of(b) {
        bail!("{op}: {} values for a batch of {b}", v.elements());
    }
    if vref.is_none() && alpha != 0.0 {
        bail!("{op}: α = {alpha} without v_ref");
    }
    let p = v.elements() / b;
    want_len(u, v.elements(), op, "u")?;
    if let Some(r) = vref {
        want_len(r, v.elements(), op, "v_ref")?;
    }
    let dv = want_dv.then(|| f32_out(&gpu, v.elements())).transpose()?;
    if p == 0 {
        return Ok((CudaStorage::full(&gpu, 3, 0.0, DType::F32)?, dv));
    }
    let terms = f32_out(&gpu, 3)?;
    let (chunk, nchunks) = loss_chunking(b, p);
    let pairs = b * nchunks;
    // two doubles (four words) per pair
    let partial = gpu.alloc(4 * pairs)?;
    let args = [
        Arg::Ptr(v.ptr()),
        Arg::Ptr(u.ptr()),
        Arg::Ptr(opt_ptr(vref)),
        Arg::Ptr(w.ptr()),
        Arg::Ptr(opt_ptr(dv.as_ref())),
        Arg::Ptr(partial.ptr()),
        Arg::I64(b as i64),
        Arg::I64(p as i64),
        Arg::I64(chunk as i64),
        Arg::I64(nchunks as i64),
        Arg::F32(alpha),
    ];
    gpu.launch_rows("orw_loss_partial_f32", pairs, &args)?;
    let fin = [Arg::Ptr(partial.ptr()), Arg::Ptr(w.ptr()), Arg::I64(b as i64), Arg::I64(p as i64), Arg::I64(nchunks as i64), Arg::F32(alpha), Arg::Ptr(terms.ptr())];
    gpu.launch("orw_loss_finish_f32", Launch::linear(1, 256).any_block(), &fin)?;
    Ok((terms, dv))
}

/// `g · dv` with the one-value upstream gradient `g` read on the device (the loss node's
/// backward: no host read of `g`).
pub fn orw_loss_scale(dv: &CudaStorage, g: &CudaStorage) -> Result<CudaStorage> {
    let op = "orw_loss backward";
    let gpu = same_gpu(op, &[dv, g])?;
    want_f32(dv, op)?;
    want_f32(g, op)?;
    want_len(g, 1, op, "the upstream gradient")?;
    let n = dv.elements();
    let out = f32_out(&gpu, n)?;
    if n > 0 {
        gpu.launch_n("orw_loss_scale_f32", n.div_ceil(4), &[Arg::Ptr(dv.ptr()), Arg::Ptr(g.ptr()), Arg::Ptr(out.ptr()), Arg::I64(n as i64)])?;
    }
    Ok(out)
}
