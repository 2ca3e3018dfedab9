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

use std::ffi::c_void;
use std::sync::Arc;

use anyhow::{Result, bail};

use super::f32ops::{add_channel_bias, want_f32, want_len};
use super::gemm::{GemmTypes, Operand, gemm_typed};
use super::gpu::{Arg, Gpu, cudnn_ok};
use super::storage::{CudaStorage, same_gpu};
use crate::backend::geom::ConvGeom;
use crate::tensor::DType;

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

fn plan(g: &Gpu, k: &ConvGeom, dt: DType) -> Result<ConvPlan> {
    use cudarc::cudnn::sys as cd;
    let Some(h) = g.cudnn() else { bail!("no cuDNN handle") };
    let (ho, wo) = ((k.h + 2 * k.pad - k.kh) / k.stride + 1, (k.w + 2 * k.pad - k.kw) / k.stride + 1);
    // the tensors in their dtype; the convolution's arithmetic (accumulation) always f32
    let f = cd::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let data = match dt {
        DType::F16 => cd::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => cd::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        _ => f,
    };
    let half = data != f;
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
        cudnn_ok(cd::cudnnSetTensor4dDescriptor(p.x, nchw, data, k.n as i32, k.cin as i32, k.h as i32, k.w as i32), "x descriptor")?;
        cudnn_ok(cd::cudnnSetTensor4dDescriptor(p.y, nchw, data, k.n as i32, k.cout as i32, ho as i32, wo as i32), "y descriptor")?;
        cudnn_ok(cd::cudnnSetFilter4dDescriptor(p.w, data, nchw, k.cout as i32, k.cin as i32, k.kh as i32, k.kw as i32), "w descriptor")?;
        cudnn_ok(cd::cudnnSetConvolution2dDescriptor(p.conv, k.pad as i32, k.pad as i32, k.stride as i32, k.stride as i32, 1, 1, cd::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION, f), "convolution")?;
        // f16/bf16: the tensor cores; f32: FMA math (parity) unless TF32 is allowed
        let math = if half {
            cd::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else if g.tf32 {
            cd::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            cd::cudnnMathType_t::CUDNN_FMA_MATH
        };
        cudnn_ok(cd::cudnnSetConvolutionMathType(p.conv, math), "math type")?;
        let mut count = 0i32;
        let mut fwd: [cd::cudnnConvolutionFwdAlgoPerf_t; 16] = std::mem::zeroed();
        cudnn_ok(cd::cudnnGetConvolutionForwardAlgorithm_v7(h, p.x, p.w, p.conv, p.y, 16, &mut count, fwd.as_mut_ptr()), "forward algorithm")?;
        // f32 parity (TF32 off) also leaves out the FFT and Winograd algorithms, whose rounding
        // differs most from a direct convolution
        let exact = !g.tf32 && !half;
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
        .map(|((k, dt), p)| match p {
            Some(p) => format!("{k:?} {dt}: fwd {:?} ({} B), bwd-data {:?} ({} B), bwd-filter {:?} ({} B)", p.fwd.0, p.fwd.1, p.bwd_data.0, p.bwd_data.1, p.bwd_filter.0, p.bwd_filter.1),
            None => format!("{k:?} {dt}: im2col + cuBLAS (no cuDNN algorithm)"),
        })
        .collect();
    out.sort();
    out
}

/// Whether cuDNN serves this shape: a plan is made on first use and cached; a shape cuDNN offers
/// no usable algorithm for is remembered and goes the im2col+cuBLAS way (said once).
fn cudnn_serves(g: &Gpu, k: &ConvGeom, dt: DType) -> bool {
    if g.cudnn().is_none() {
        return false;
    }
    let mut cache = g.conv_cache.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry((*k, dt))
        .or_insert_with(|| {
            let p = plan(g, k, dt);
            if let Err(e) = &p {
                eprintln!("warning: cuDNN cannot serve the {dt} convolution {k:?} ({e:#}); it runs as im2col + cuBLAS");
            }
            p.ok()
        })
        .is_some()
}

/// Run `f` with the cached plan of `k` (see [`cudnn_serves`]).
fn with_plan<R>(g: &Gpu, k: &ConvGeom, dt: DType, f: impl FnOnce(&ConvPlan) -> Result<R>) -> Result<R> {
    let cache = g.conv_cache.lock().unwrap_or_else(|e| e.into_inner());
    match cache.get(&(*k, dt)) {
        Some(Some(p)) => f(p),
        _ => bail!("no cuDNN plan for the {dt} convolution {k:?}"),
    }
}

fn geom_args(c: &ConvGeom, n: usize) -> [Arg<'static>; 10] {
    [c.cin, c.h, c.w, c.kh, c.kw, c.stride, c.pad, c.ho(), c.wo(), n].map(|v| Arg::I64(v as i64))
}

/// Images per im2col chunk: the column buffers (`bytes` per element of the K·P of an image:
/// 4 for f32, 2 + 4 for a 16-bit `col` and its f32 gradient) under 256 MiB.
fn chunk(c: &ConvGeom, bytes: usize) -> usize {
    let per = c.cin * c.kh * c.kw * c.ho() * c.wo() * bytes;
    ((256usize << 20) / per.max(1)).clamp(1, c.n)
}

/// The unfolded images (`im2col_f32`, or for f16/bf16 `im2col_h16`, which copies the 16-bit values).
fn im2col(g: &Arc<Gpu>, x: u64, col: u64, c: &ConvGeom, n: usize, dt: DType) -> Result<()> {
    let a = geom_args(c, n);
    let k = c.cin * c.kh * c.kw;
    let args = [Arg::Ptr(x), Arg::Ptr(col), a[9], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]];
    g.launch_n(if dt == DType::F32 { "im2col_f32" } else { "im2col_h16" }, n * k * c.ho() * c.wo(), &args)
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

/// `y = conv2d(x, w)` (no bias) into `y`, for buffers at these device addresses holding `dt`
/// values, except that `y` is f32 where 16-bit operands take the im2col path (no cuDNN plan for
/// the shape and dtype, [`cudnn_serves`]): the tensor-core GEMM's f32 output, which the caller
/// rounds once with the bias.
fn forward_into(g: &Arc<Gpu>, x: u64, w: u64, y: u64, c: &ConvGeom, dt: DType) -> Result<()> {
    if c.n == 0 {
        return Ok(());
    }
    let es = dt.size() as u64;
    if let Some(h) = g.cudnn().filter(|_| cudnn_serves(g, c, dt)) {
        let _x = g.exec.lock().unwrap_or_else(|e| e.into_inner());
        g.bind()?;
        with_plan(g, c, dt, |p| {
            let ws = g.alloc(p.fwd.1.div_ceil(4))?;
            use cudarc::cudnn::sys as cd;
            // SAFETY: descriptors match the buffers' shapes and dtype; the workspace is as large
            // as asked; the scaling factors are f32 for f32, f16 and bf16 data
            unsafe {
                cudnn_ok(cd::cudnnConvolutionForward(h, one(), p.x, x as *const c_void, p.w, w as *const c_void, p.conv, p.fwd.0, ws.ptr() as *mut c_void, p.fwd.1, zero(), p.y, y as *mut c_void), "convolution forward")
            }
        })
    } else {
        let (kk, pp) = (c.cin * c.kh * c.kw, c.ho() * c.wo());
        let step = chunk(c, dt.size());
        let col = g.alloc(super::storage::words(step * kk * pp, dt))?;
        // 16-bit operands on the tensor cores, f32 accumulation and an f32 output
        let types = if dt == DType::F32 { GemmTypes::F32 } else { GemmTypes::to_f32(dt) };
        for n0 in (0..c.n).step_by(step) {
            let nb = step.min(c.n - n0);
            im2col(g, x + es * (n0 * c.cin * c.h * c.w) as u64, col.ptr(), c, nb, dt)?;
            // y_n [Cout, P] = W [Cout, K] · col_n [K, P]
            let wop = Operand { ptr: w, trans: false, batch_stride: 0 };
            let cop = Operand { ptr: col.ptr(), trans: false, batch_stride: (kk * pp) as i64 };
            gemm_typed(g, types, c.cout, pp, kk, wop, cop, y + 4 * (n0 * c.cout * pp) as u64, (c.cout * pp) as i64, 1.0, 0.0, nb)?;
        }
        Ok(())
    }
}

/// `dw` (and `dx` when given) of a convolution from `dy`, for buffers at these addresses, all
/// holding `dt` values (f16/bf16: the im2col path accumulates `dw` and the column gradient in
/// f32 and rounds each once).
#[allow(clippy::too_many_arguments)]
fn backward_into(g: &Arc<Gpu>, x: u64, w: u64, dy: u64, dx: Option<u64>, dw: u64, c: &ConvGeom, dt: DType) -> Result<()> {
    if c.n == 0 {
        // no images: a zero weight gradient
        let n = super::storage::words(c.cout * c.k(), dt);
        if n > 0 {
            g.launch_n("fill_u32", n, &[Arg::Ptr(dw), Arg::U32(0), Arg::I64(n as i64)])?;
        }
        return Ok(());
    }
    let es = dt.size() as u64;
    if let Some(h) = g.cudnn().filter(|_| cudnn_serves(g, c, dt)) {
        use cudarc::cudnn::sys as cd;
        let _x = g.exec.lock().unwrap_or_else(|e| e.into_inner());
        g.bind()?;
        with_plan(g, c, dt, |p| {
            let ws = g.alloc(p.bwd_filter.1.max(p.bwd_data.1).div_ceil(4))?;
            // SAFETY: as in the forward
            unsafe {
                cudnn_ok(
                    cd::cudnnConvolutionBackwardFilter(h, one(), p.x, x as *const c_void, p.y, dy as *const c_void, p.conv, p.bwd_filter.0, ws.ptr() as *mut c_void, p.bwd_filter.1, zero(), p.w, dw as *mut c_void),
                    "convolution backward-filter",
                )?;
                if let Some(dx) = dx {
                    cudnn_ok(
                        cd::cudnnConvolutionBackwardData(h, one(), p.w, w as *const c_void, p.y, dy as *const c_void, p.conv, p.bwd_data.0, ws.ptr() as *mut c_void, p.bwd_data.1, zero(), p.x, dx as *mut c_void),
                        "convolution backward-data",
                    )?;
                }
            }
            Ok(())
        })
    } else {
        let (kk, pp) = (c.cin * c.kh * c.kw, c.ho() * c.wo());
        let half = dt != DType::F32;
        let step = chunk(c, if half { dt.size() + 4 } else { 4 });
        let col = g.alloc(super::storage::words(step * kk * pp, dt))?;
        // f32 accumulators for 16-bit operands: dW over all images, and the column gradient
        let dw32 = if half { Some(g.alloc(c.cout * kk)?) } else { None };
        let dcol = if half && dx.is_some() { Some(g.alloc(step * kk * pp)?) } else { None };
        let dx32 = match dx {
            Some(_) if half => Some(g.alloc(c.n * c.cin * c.h * c.w)?),
            _ => None,
        };
        let types = if half { GemmTypes::to_f32(dt) } else { GemmTypes::F32 };
        let dw_acc = dw32.as_ref().map_or(dw, |b| b.ptr());
        for n0 in (0..c.n).step_by(step) {
            let nb = step.min(c.n - n0);
            im2col(g, x + es * (n0 * c.cin * c.h * c.w) as u64, col.ptr(), c, nb, dt)?;
            // dW [Cout, K] += dy_n [Cout, P] · col_nᵀ, image by image (one accumulator)
            for i in 0..nb {
                let dyo = Operand { ptr: dy + es * ((n0 + i) * c.cout * pp) as u64, trans: false, batch_stride: 0 };
                let co = Operand { ptr: col.ptr() + es * (i * kk * pp) as u64, trans: true, batch_stride: 0 };
                let beta = if n0 + i == 0 { 0.0 } else { 1.0 };
                gemm_typed(g, types, c.cout, kk, pp, dyo, co, dw_acc, 0, 1.0, beta, 1)?;
            }
            if let Some(dx) = dx {
                // dcol_n [K, P] = Wᵀ · dy_n (f32), then scattered back by col2im (a gather)
                let dcol_ptr = dcol.as_ref().map_or(col.ptr(), |b| b.ptr());
                let dx_ptr = dx32.as_ref().map_or(dx, |b| b.ptr());
                let wop = Operand { ptr: w, trans: true, batch_stride: 0 };
                let dyo = Operand { ptr: dy + es * (n0 * c.cout * pp) as u64, trans: false, batch_stride: (c.cout * pp) as i64 };
                gemm_typed(g, types, kk, pp, c.cout, wop, dyo, dcol_ptr, (kk * pp) as i64, 1.0, 0.0, nb)?;
                col2im(g, dcol_ptr, dx_ptr + 4 * (n0 * c.cin * c.h * c.w) as u64, c, nb)?;
            }
        }
        // the f32 accumulators rounded once to the dtype
        let bf = Arg::U32(u32::from(dt == DType::BF16));
        if let Some(b) = &dw32 {
            let n = c.cout * kk;
            g.launch_n("bias_round_h16", n, &[Arg::Ptr(b.ptr()), Arg::Ptr(0), Arg::Ptr(dw), Arg::I64(n as i64), Arg::I64(1), Arg::I64(1), bf])?;
        }
        if let (Some(b), Some(dx)) = (&dx32, dx) {
            let n = c.n * c.cin * c.h * c.w;
            g.launch_n("bias_round_h16", n, &[Arg::Ptr(b.ptr()), Arg::Ptr(0), Arg::Ptr(dx), Arg::I64(n as i64), Arg::I64(1), Arg::I64(1), bf])?;
        }
        Ok(())
    }
}

fn check_geom(c: &ConvGeom, op: &str) -> Result<()> {
    if c.stride == 0 || c.kh == 0 || c.kw == 0 || c.h + 2 * c.pad < c.kh || c.w + 2 * c.pad < c.kw {
        bail!("{op}: no output for {c:?}");
    }
    Ok(())
}

/// `conv2d(x, w) + bias` → `[n, cout, ho, wo]`, f32 (CPU: `conv::conv2d_forward`).
pub fn conv2d_f32(x: &CudaStorage, w: &CudaStorage, bias: Option<&CudaStorage>, c: &ConvGeom) -> Result<CudaStorage> {
    want_f32(x, "conv2d")?;
    want_f32(w, "conv2d")?;
    conv2d(x, w, bias, c)
}

/// `conv2d(x, w) + bias` in the operands' dtype (f32, f16 or bf16; the bias f32), computed as the
/// CPU reference defines it for 16-bit values: exact operands, f32 accumulation, the output
/// rounded once after the bias (im2col path: the tensor-core GEMM's f32 output and
/// `bias_round_h16`). cuDNN's half convolutions write the 16-bit output themselves, so there the
/// bias is a second rounding (`add_bias_h16`).
pub fn conv2d(x: &CudaStorage, w: &CudaStorage, bias: Option<&CudaStorage>, c: &ConvGeom) -> Result<CudaStorage> {
    let g = same_gpu("conv2d", &[x, w])?;
    check_geom(c, "conv2d")?;
    let dt = x.storage_dtype();
    if w.storage_dtype() != dt || !dt.is_float() {
        bail!("conv2d: input {dt} and weight {}", w.storage_dtype());
    }
    if let Some(b) = bias {
        want_f32(b, "conv2d bias")?;
    }
    want_len(x, c.in_shape().iter().product(), "conv2d", "the input")?;
    want_len(w, c.weight_shape().iter().product(), "conv2d", "the weight")?;
    let n_out: usize = c.out_shape().iter().product();
    if dt == DType::F32 {
        let mut y = CudaStorage::alloc(&g, n_out, DType::F32)?;
        forward_into(&g, x.ptr(), w.ptr(), y.ptr(), c, dt)?;
        if let Some(b) = bias {
            add_channel_bias(&mut y, b, c.n, c.cout, c.ho() * c.wo())?;
        }
        return Ok(y);
    }
    let bf = Arg::U32(u32::from(dt == DType::BF16));
    let p = (c.ho() * c.wo()) as i64;
    if cudnn_serves(&g, c, dt) {
        let y = CudaStorage::alloc(&g, n_out, dt)?;
        forward_into(&g, x.ptr(), w.ptr(), y.ptr(), c, dt)?;
        if let Some(b) = bias.filter(|_| n_out > 0) {
            g.launch_n("add_bias_h16", n_out, &[Arg::Ptr(y.ptr()), Arg::Ptr(b.ptr()), Arg::I64(n_out as i64), Arg::I64(c.cout as i64), Arg::I64(p), bf])?;
        }
        return Ok(y);
    }
    let y32 = CudaStorage::alloc(&g, n_out, DType::F32)?;
    forward_into(&g, x.ptr(), w.ptr(), y32.ptr(), c, dt)?;
    let y = CudaStorage::alloc(&g, n_out, dt)?;
    if n_out > 0 {
        let bp = bias.map_or(0, |b| b.ptr());
        g.launch_n("bias_round_h16", n_out, &[Arg::Ptr(y32.ptr()), Arg::Ptr(bp), Arg::Ptr(y.ptr()), Arg::I64(n_out as i64), Arg::I64(c.cout as i64), Arg::I64(p), bf])?;
    }
    Ok(y)
}

/// `(dx if need_dx, dw, db)` of [`conv2d_f32`] from the input, the weight and `dy`, f32 (CPU:
/// `conv::conv2d_backward`).
pub fn conv2d_backward_f32(x: &CudaStorage, w: &CudaStorage, dy: &CudaStorage, c: &ConvGeom, need_dx: bool) -> Result<(Option<CudaStorage>, CudaStorage, CudaStorage)> {
    for t in [x, w, dy] {
        want_f32(t, "conv2d_backward")?;
    }
    conv2d_backward(x, w, dy, c, need_dx)
}

/// `(dx if need_dx, dw, db)` of [`conv2d`] in the operands' dtype: `dx` and `dw` accumulated in
/// f32 and rounded once; `db` in f32 (the caller rounds it to the bias' dtype).
pub fn conv2d_backward(x: &CudaStorage, w: &CudaStorage, dy: &CudaStorage, c: &ConvGeom, need_dx: bool) -> Result<(Option<CudaStorage>, CudaStorage, CudaStorage)> {
    let g = same_gpu("conv2d_backward", &[x, w, dy])?;
    check_geom(c, "conv2d_backward")?;
    let dt = x.storage_dtype();
    for (t, shape, what) in [(x, c.in_shape(), "the input"), (w, c.weight_shape(), "the weight"), (dy, c.out_shape(), "the output gradient")] {
        if t.storage_dtype() != dt || !dt.is_float() {
            bail!("conv2d_backward: {what} is {}, the input {dt}", t.storage_dtype());
        }
        want_len(t, shape.iter().product(), "conv2d_backward", what)?;
    }
    let dw = CudaStorage::alloc(&g, w.elements(), dt)?;
    let dx = if need_dx { Some(CudaStorage::alloc(&g, x.elements(), dt)?) } else { None };
    backward_into(&g, x.ptr(), w.ptr(), dy.ptr(), dx.as_ref().map(|d| d.ptr()), dw.ptr(), c, dt)?;
    let dy32 = super::cast::cast(dy, DType::F32)?;
    let db = super::f32ops::sum_to_shape(&dy32, &c.out_shape(), &[c.cout, 1, 1])?;
    Ok((dx, dw, db))
}
