//! 2-D convolution on the GPU (CPU twin: `backend/cpu/conv.rs`), forward, backward-data and
//! backward-filter, two ways:
//!
//! - **cuDNN** (when libcudnn loads): descriptors and algorithms chosen once per shape by cuDNN's
//!   heuristics (`*_v7`, deterministic algorithms preferred, workspace ≤ 1 GiB) and cached; the
//!   descriptors' math type is `CUDNN_FMA_MATH` unless TF32 is allowed, so f32 parity holds.
//! - **im2col + cuBLAS GEMM** (`ORWCFM_CONV=gemm`, or no cuDNN): `col = im2col(x)`, `y = W·col`
//!   batched over images; backward-data `col2im(Wᵀ·dy)`; backward-filter `Σ_n dy_n·col_nᵀ`.
//!   The batch is processed in chunks so that `col` stays under 256 MiB.
//!
//! The bias is added by `add_channel_bias_f32`; its gradient is a reduction of `dy`.
// The device implementations of the Tensor-level ops were removed with the engine-core rewrite;
// these launch helpers and cuDNN plans wait for the storage-level CUDA port (see pending.rs).
#![allow(dead_code)]

use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{Result, bail};

use super::gpu::{Arg, Gpu, cudnn_ok};
use crate::backend::cpu::conv::ConvGeom;

/// cuDNN descriptors and chosen algorithms for one shape.
pub struct ConvPlan {
    x: cudarc::cudnn::sys::cudnnTensorDescriptor_t,
    y: cudarc::cudnn::sys::cudnnTensorDescriptor_t,
    w: cudarc::cudnn::sys::cudnnFilterDescriptor_t,
    conv: cudarc::cudnn::sys::cudnnConvolutionDescriptor_t,
    fwd: (cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t, usize),
    bwd_data: (cudarc::cudnn::sys::cudnnConvolutionBwdDataAlgo_t, usize),
    bwd_filter: (cudarc::cudnn::sys::cudnnConvolutionBwdFilterAlgo_t, usize),
}
// SAFETY: descriptors are plain handles, used under the GPU's exec lock
unsafe impl Send for ConvPlan {}

/// The algorithm a convolution pass used, for reports.
pub fn method(g: &Gpu) -> &'static str {
    if g.cudnn().is_some() { "cudnn" } else { "im2col+cublas" }
}

const MAX_WORKSPACE: usize = 1 << 30;

/// Pick from cuDNN's ranked list: the first usable one, of math type `math` if given (FMA for
/// f32 parity: the heuristics may list tensor-op variants too), not in `exclude` (by algorithm
/// number), deterministic ones first.
macro_rules! pick {
    ($perf:expr, $count:expr, $math:expr, $exclude:expr) => {{
        use cudarc::cudnn::sys as cd;
        let usable: Vec<_> = $perf[..$count as usize]
            .iter()
            .filter(|p| p.status == cd::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= MAX_WORKSPACE && $math.is_none_or(|m| p.mathType == m) && !$exclude.contains(&(p.algo as u32)))
            .collect();
        let best = usable.iter().find(|p| p.determinism == cd::cudnnDeterminism_t::CUDNN_DETERMINISTIC).or(usable.first());
        match best {
            Some(p) => (p.algo, p.memory),
            None => bail!("cuDNN offers no usable algorithm"),
        }
    }};
}

fn plan(g: &Gpu, k: &ConvGeom) -> Result<ConvPlan> {
    use cudarc::cudnn::sys as cd;
    let h = g.cudnn().expect("cuDNN handle");
    let (ho, wo) = ((k.h + 2 * k.pad - k.kh) / k.stride + 1, (k.w + 2 * k.pad - k.kw) / k.stride + 1);
    let f = cd::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let nchw = cd::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    // SAFETY: out-pointers to fresh descriptors, then plain setters and queries on them
    unsafe {
        let mut p = ConvPlan {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            fwd: (std::mem::zeroed(), 0),
            bwd_data: (std::mem::zeroed(), 0),
            bwd_filter: (std::mem::zeroed(), 0),
        };
        cudnn_ok(cd::cudnnCreateTensorDescriptor(&mut p.x), "tensor descriptor")?;
        cudnn_ok(cd::cudnnCreateTensorDescriptor(&mut p.y), "tensor descriptor")?;
        cudnn_ok(cd::cudnnCreateFilterDescriptor(&mut p.w), "filter descriptor")?;
        cudnn_ok(cd::cudnnCreateConvolutionDescriptor(&mut p.conv), "convolution descriptor")?;
        cudnn_ok(cd::cudnnSetTensor4dDescriptor(p.x, nchw, f, k.n as i32, k.cin as i32, k.h as i32, k.w as i32), "x descriptor")?;
        cudnn_ok(cd::cudnnSetTensor4dDescriptor(p.y, nchw, f, k.n as i32, k.cout as i32, ho as i32, wo as i32), "y descriptor")?;
        cudnn_ok(cd::cudnnSetFilter4dDescriptor(p.w, f, nchw, k.cout as i32, k.cin as i32, k.kh as i32, k.kw as i32), "w descriptor")?;
        cudnn_ok(cd::cudnnSetConvolution2dDescriptor(p.conv, k.pad as i32, k.pad as i32, k.stride as i32, k.stride as i32, 1, 1, cd::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION, f), "convolution")?;
        let math = if g.tf32 { cd::cudnnMathType_t::CUDNN_DEFAULT_MATH } else { cd::cudnnMathType_t::CUDNN_FMA_MATH };
        cudnn_ok(cd::cudnnSetConvolutionMathType(p.conv, math), "math type")?;
        let mut count = 0i32;
        let mut fwd: [cd::cudnnConvolutionFwdAlgoPerf_t; 16] = std::mem::zeroed();
        cudnn_ok(cd::cudnnGetConvolutionForwardAlgorithm_v7(h, p.x, p.w, p.conv, p.y, 16, &mut count, fwd.as_mut_ptr()), "forward algorithm")?;
        // f32 parity (TF32 off) also leaves out the FFT and Winograd algorithms, whose rounding
        // differs most from a direct convolution
        let exact = !g.tf32;
        let want_math = exact.then_some(math);
        let (ex_fwd, ex_data, ex_filter): (&[u32], &[u32], &[u32]) = if exact { (&[4, 5, 6, 7], &[2, 3, 4, 5], &[2, 4, 5, 6]) } else { (&[], &[], &[]) };
        p.fwd = pick!(fwd, count, want_math, ex_fwd);
        let mut ws = 0usize;
        cudnn_ok(cd::cudnnGetConvolutionForwardWorkspaceSize(h, p.x, p.w, p.conv, p.y, p.fwd.0, &mut ws), "forward workspace")?;
        p.fwd.1 = p.fwd.1.max(ws);
        let mut bd: [cd::cudnnConvolutionBwdDataAlgoPerf_t; 16] = std::mem::zeroed();
        cudnn_ok(cd::cudnnGetConvolutionBackwardDataAlgorithm_v7(h, p.w, p.y, p.conv, p.x, 16, &mut count, bd.as_mut_ptr()), "backward-data algorithm")?;
        p.bwd_data = pick!(bd, count, want_math, ex_data);
        cudnn_ok(cd::cudnnGetConvolutionBackwardDataWorkspaceSize(h, p.w, p.y, p.conv, p.x, p.bwd_data.0, &mut ws), "backward-data workspace")?;
        p.bwd_data.1 = p.bwd_data.1.max(ws);
        let mut bf: [cd::cudnnConvolutionBwdFilterAlgoPerf_t; 16] = std::mem::zeroed();
        cudnn_ok(cd::cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, p.x, p.y, p.conv, p.w, 16, &mut count, bf.as_mut_ptr()), "backward-filter algorithm")?;
        p.bwd_filter = pick!(bf, count, want_math, ex_filter);
        cudnn_ok(cd::cudnnGetConvolutionBackwardFilterWorkspaceSize(h, p.x, p.y, p.conv, p.w, p.bwd_filter.0, &mut ws), "backward-filter workspace")?;
        p.bwd_filter.1 = p.bwd_filter.1.max(ws);
        Ok(p)
    }
}

/// One line per convolution shape planned so far: cuDNN's chosen algorithms and workspaces, or
/// that it falls back to im2col + cuBLAS (for the GPU check's log).
pub fn plan_report(g: &Gpu) -> Vec<String> {
    let cache = g.conv_cache.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<String> = cache
        .iter()
        .map(|(k, p)| match p {
            Some(p) => format!("{k:?}: fwd {:?} ({} B), bwd-data {:?} ({} B), bwd-filter {:?} ({} B)", p.fwd.0, p.fwd.1, p.bwd_data.0, p.bwd_data.1, p.bwd_filter.0, p.bwd_filter.1),
            None => format!("{k:?}: im2col + cuBLAS (no cuDNN algorithm)"),
        })
        .collect();
    out.sort();
    out
}

/// Whether cuDNN serves this shape: a plan is made on first use and cached; a shape cuDNN offers
/// no usable algorithm for is remembered and goes the im2col+cuBLAS way (said once).
fn cudnn_serves(g: &Gpu, k: &ConvGeom) -> bool {
    if g.cudnn().is_none() {
        return false;
    }
    let mut cache = g.conv_cache.lock().unwrap_or_else(|e| e.into_inner());
    if !cache.contains_key(k) {
        let p = plan(g, k);
        if let Err(e) = &p {
            eprintln!("warning: cuDNN cannot serve the convolution {k:?} ({e:#}); it runs as im2col + cuBLAS");
        }
        cache.insert(*k, p.ok());
    }
    cache[k].is_some()
}

/// Run `f` with the cached plan of `k` (see [`cudnn_serves`]).
fn with_plan<R>(g: &Gpu, k: &ConvGeom, f: impl FnOnce(&ConvPlan) -> Result<R>) -> Result<R> {
    let cache = g.conv_cache.lock().unwrap_or_else(|e| e.into_inner());
    match cache.get(k) {
        Some(Some(p)) => f(p),
        _ => bail!("no cuDNN plan for {k:?}"),
    }
}

fn geom_args(c: &ConvGeom, n: usize) -> [Arg<'static>; 10] {
    [c.cin, c.h, c.w, c.kh, c.kw, c.stride, c.pad, c.ho(), c.wo(), n].map(|v| Arg::I64(v as i64))
}

/// Images per im2col chunk: `col` (K·P floats per image) under 256 MiB.
fn chunk(c: &ConvGeom) -> usize {
    let per = c.cin * c.kh * c.kw * c.ho() * c.wo() * 4;
    ((256usize << 20) / per.max(1)).clamp(1, c.n)
}

fn im2col(g: &Arc<Gpu>, x: u64, col: u64, c: &ConvGeom, n: usize) -> Result<()> {
    let a = geom_args(c, n);
    let k = c.cin * c.kh * c.kw;
    let args = [Arg::Ptr(x), Arg::Ptr(col), a[9], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]];
    g.launch_n("im2col_f32", n * k * c.ho() * c.wo(), &args)
}

fn col2im(g: &Arc<Gpu>, col: u64, x: u64, c: &ConvGeom, n: usize) -> Result<()> {
    let a = geom_args(c, n);
    let args = [Arg::Ptr(col), Arg::Ptr(x), a[9], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]];
    g.launch_n("col2im_f32", n * c.cin * c.h * c.w, &args)
}

const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;
fn one() -> *const c_void {
    &ONE as *const f32 as *const c_void
}
fn zero() -> *const c_void {
    &ZERO as *const f32 as *const c_void
}
