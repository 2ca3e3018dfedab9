//! The CUDA backend's storage: a pool buffer holding `len` elements of one dtype on one GPU,
//! shared by `Arc` (copy on write), and its [`BackendStorage`] implementation.
//!
//! Every op returns `Result`: out of device memory, a failed launch or a bad call is an error
//! whose context names the op and the GPU (`conv2d on cuda:0`). Two operands on different GPUs
//! are an error naming both; nothing is moved between devices silently.
//!
//! Dtypes. f32 runs the f32 kernels (`f32ops.rs`, `linalg.rs`, `conv.rs`). f16 and bf16 follow the
//! CPU reference's definition (`backend/cpu/storage.rs`) on the device: the operands are widened
//! to f32 by a cast kernel (`kernels/cast.cu`), the f32 op runs, and the result is rounded once
//! to the dtype by another cast kernel; statistics (GroupNorm's mean and rstd) and attention
//! probabilities stay f32. The GEMM-based ops read the 16-bit values directly: matmul, linear and
//! conv2d (forward and backward) run on the tensor cores (`cublasGemmEx` with f32 accumulation,
//! cuDNN f16/bf16 convolutions with f32 compute), with the same single rounding where the output
//! comes through an f32 epilogue (`kernels/half.cu`). The element-wise ops (binary, unary and its
//! backward) read and write 16-bit values in one pass too (half.cu: widen, the f32 kernels'
//! arithmetic, one rounding), bit for bit the widen-op-round they replace. i32 holds indices: embedding ids, dtype casts, and the data movement
//! ops (gather, broadcast, concat, narrow), which copy its bits; float ops on it are errors.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use half::{bf16, f16};

use super::cast::cast;
use super::gpu::{Arg, Gpu, GpuBuf};
use super::{conv, f32ops, linalg, optim};
use crate::backend::cpu::CpuStorage;
use crate::backend::{AdamStep, ArenaStep, AttnGeom, BackendStorage, BinaryOp, ConvGeom, NormGeom, RandomDist, UnaryOp};
use crate::tensor::{DType, Device};

/// Device memory of one dtype on one GPU: `len` elements from element `off` of a shared pool
/// buffer (a zero-copy view, e.g. one parameter of a flat arena; `off` keeps 4-byte alignment).
#[derive(Clone)]
pub struct CudaStorage {
    buf: Arc<GpuBuf>,
    off: usize,
    len: usize,
    dtype: DType,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage(cuda:{}, {} × {} at {})", self.buf.gpu().ordinal, self.len, self.dtype, self.off)
    }
}

/// 32-bit words that `n` elements of `dtype` occupy (the pool counts words).
pub fn words(n: usize, dtype: DType) -> usize {
    (n * dtype.size()).div_ceil(4)
}

impl CudaStorage {
    /// A storage over `buf`, which must hold at least `len` elements of `dtype`.
    pub fn new(buf: GpuBuf, len: usize, dtype: DType) -> Result<Self> {
        if buf.len() < words(len, dtype) {
            bail!("a GPU buffer of {} words cannot hold {len} {dtype} values", buf.len());
        }
        Ok(CudaStorage { buf: Arc::new(buf), off: 0, len, dtype })
    }
    /// Uninitialised room for `len` elements of `dtype` on `g`.
    pub fn alloc(g: &Arc<Gpu>, len: usize, dtype: DType) -> Result<Self> {
        CudaStorage::new(g.alloc(words(len, dtype))?, len, dtype)
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        self.buf.gpu()
    }
    /// The device address of the first element of this view.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr() + (self.off * self.dtype.size()) as u64
    }
    pub fn storage_dtype(&self) -> DType {
        self.dtype
    }
    pub fn elements(&self) -> usize {
        self.len
    }
    /// The address of this view for writing in place: when another storage holds the buffer,
    /// just this view is copied first on the device (copy on write).
    pub fn make_mut(&mut self) -> Result<u64> {
        if Arc::get_mut(&mut self.buf).is_none() {
            let g = self.buf.gpu().clone();
            let copy = g.copy_words(self.ptr(), words(self.len, self.dtype))?;
            self.buf = Arc::new(copy);
            self.off = 0;
        }
        Ok(self.ptr())
    }
    /// The identity of this view: (its buffer's unique id, offset, length), for caches of CUDA
    /// graphs that read it (an address can be reused once freed, the id cannot).
    pub fn identity(&self) -> (u64, usize, usize) {
        (self.buf.id(), self.off, self.len)
    }
    /// Whether two storages are the same view of the same device memory.
    pub fn ptr_eq(&self, o: &CudaStorage) -> bool {
        Arc::ptr_eq(&self.buf, &o.buf) && self.off == o.off && self.len == o.len
    }
    /// Elements `[off, off + len)`, sharing this storage's device memory (a zero-copy view);
    /// the start must stay 4-byte aligned (any `off` for f32/i32, an even one for f16/bf16).
    pub fn view(&self, off: usize, len: usize) -> Result<Self> {
        if off.checked_add(len).is_none_or(|end| end > self.len) {
            bail!("a view of [{off}, {}) of a GPU storage of {} values", off + len, self.len);
        }
        if !(off * self.dtype.size()).is_multiple_of(4) {
            bail!("a view at element {off} of {} values is not 4-byte aligned", self.dtype);
        }
        Ok(CudaStorage { buf: self.buf.clone(), off: self.off + off, len, dtype: self.dtype })
    }
    /// Whether this is the view `[off, off + len)` of `arena` (same memory, not a copy).
    pub fn is_view_of(&self, arena: &CudaStorage, off: usize, len: usize) -> bool {
        Arc::ptr_eq(&self.buf, &arena.buf) && self.dtype == arena.dtype && self.off == arena.off + off && self.len == len
    }

    /// Host values uploaded to `g` in their dtype (f16/bf16 as their 16-bit words).
    pub fn from_cpu(g: &Arc<Gpu>, s: &CpuStorage) -> Result<Self> {
        let (buf, len) = match s {
            CpuStorage::F32(d) => (g.upload_slice(d.as_slice()), d.len()),
            CpuStorage::F16(d) => (g.upload_slice(bytemuck::cast_slice::<f16, u16>(d)), d.len()),
            CpuStorage::BF16(d) => (g.upload_slice(bytemuck::cast_slice::<bf16, u16>(d)), d.len()),
            CpuStorage::I32(d) => (g.upload_slice(d.as_slice()), d.len()),
        };
        let buf = buf.with_context(|| format!("copying {len} {} values to cuda:{}", s.dtype(), g.ordinal))?;
        CudaStorage::new(buf, len, s.dtype())
    }

    /// `n` copies of `v` in `dtype` on `g` (rounded to nearest even for f16/bf16, truncated for
    /// i32, exactly as `CpuStorage::from_f32_as`).
    /// `n` Philox draws of `dist` at `(seed, offset)`, made on the GPU in f32 and rounded once to
    /// `dtype` (CPU: `CpuStorage::philox`).
    pub fn philox(g: &Arc<Gpu>, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Self> {
        if !dtype.is_float() {
            bail!("a random draw of {n} {dist:?} values cannot be stored as {dtype}");
        }
        on_gpu(g, "philox", || cast(&f32ops::philox(g, n, dist, seed, offset)?, dtype))
    }

    pub fn full(g: &Arc<Gpu>, n: usize, v: f32, dtype: DType) -> Result<Self> {
        let word = match dtype {
            DType::F32 => v.to_bits(),
            DType::F16 => u32::from(f16::from_f32(v).to_bits()) * 0x1_0001,
            DType::BF16 => u32::from(bf16::from_f32(v).to_bits()) * 0x1_0001,
            DType::I32 => (v as i32) as u32,
        };
        let y = CudaStorage::alloc(g, n, dtype).with_context(|| format!("full on cuda:{}", g.ordinal))?;
        let nw = words(n, dtype);
        if nw > 0 {
            g.launch_n("fill_u32", nw, &[Arg::Ptr(y.ptr()), Arg::U32(word), Arg::I64(nw as i64)]).with_context(|| format!("full on cuda:{}", g.ordinal))?;
        }
        Ok(y)
    }

    /// The values as f32 for a float op named `op`: shared when f32, widened by a kernel when
    /// f16/bf16; an error for i32.
    fn float(&self, op: &str) -> Result<CudaStorage> {
        if self.dtype == DType::I32 {
            bail!("{op}: a float op got an i32 tensor");
        }
        cast(self, DType::F32)
    }

    /// The values as f32, i32 included (converted), as the CPU's `f32s`.
    fn f32s(&self) -> Result<CudaStorage> {
        cast(self, DType::F32)
    }

    /// Values with 32-bit elements for a data movement op: f32 and i32 as they are (their bits
    /// move), f16/bf16 widened (exactly).
    fn words32(&self) -> Result<CudaStorage> {
        if self.dtype.size() == 4 { Ok(self.clone()) } else { cast(self, DType::F32) }
    }

    /// An op's f32 (or 32-bit) result in this storage's dtype.
    fn out(&self, v: CudaStorage) -> Result<CudaStorage> {
        cast(&v, self.dtype)
    }
}

/// The GPU that all of `ts` are on, or an error naming two different ones.
pub(crate) fn same_gpu(op: &str, ts: &[&CudaStorage]) -> Result<Arc<Gpu>> {
    let Some(first) = ts.first() else { bail!("{op}: no operands") };
    let g = first.gpu();
    if let Some(o) = ts.iter().find(|t| !Arc::ptr_eq(t.gpu(), g)) {
        bail!("{op}: operands on cuda:{} and cuda:{} (move one to the other's device first)", g.ordinal, o.gpu().ordinal);
    }
    Ok(g.clone())
}

fn same_dtype(op: &str, ts: &[&CudaStorage]) -> Result<()> {
    let d = ts[0].dtype;
    if let Some(o) = ts.iter().find(|t| t.dtype != d) {
        bail!("{op}: operands of dtypes {d} and {} (cast one with to_dtype)", o.dtype);
    }
    Ok(())
}

/// `f()` with the op and the GPU as the error's context.
fn on_gpu<T>(g: &Gpu, op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    f().with_context(|| format!("{op} on cuda:{}", g.ordinal))
}

impl BackendStorage for CudaStorage {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
    fn device(&self) -> Device {
        Device::Cuda(self.gpu().ordinal)
    }
    fn to_cpu_storage(&self) -> Result<CpuStorage> {
        let g = self.gpu();
        on_gpu(g, "copy to the host", || {
            Ok(match self.dtype {
                DType::F32 => {
                    let mut v = vec![0.0f32; self.len];
                    g.download_from(self.ptr(), &mut v)?;
                    CpuStorage::F32(v.into())
                }
                DType::F16 => {
                    let mut v = vec![f16::ZERO; self.len];
                    g.download_from(self.ptr(), bytemuck::cast_slice_mut::<f16, u16>(&mut v))?;
                    CpuStorage::F16(v.into())
                }
                DType::BF16 => {
                    let mut v = vec![bf16::ZERO; self.len];
                    g.download_from(self.ptr(), bytemuck::cast_slice_mut::<bf16, u16>(&mut v))?;
                    CpuStorage::BF16(v.into())
                }
                DType::I32 => {
                    let mut v = vec![0i32; self.len];
                    g.download_from(self.ptr(), &mut v)?;
                    CpuStorage::I32(v.into())
                }
            })
        })
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        on_gpu(self.gpu(), "to_dtype", || cast(self, dtype))
    }
    fn full_like(&self, n: usize, v: f32, dtype: DType) -> Result<Self> {
        CudaStorage::full(self.gpu(), n, v, dtype)
    }
    fn philox_like(&self, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Self> {
        CudaStorage::philox(self.gpu(), n, dist, seed, offset, dtype)
    }
    fn dropout(&self, p: f32, seed: u64, offset: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            bail!("dropout probability {p} is not in [0, 1]");
        }
        on_gpu(self.gpu(), "dropout", || self.out(f32ops::dropout(&self.float("dropout")?, p, seed, offset)?))
    }

    // ------------------------------------------------------------ element-wise
    fn binary(&self, a: &[usize], rhs: &Self, b: &[usize], out: &[usize], op: BinaryOp) -> Result<Self> {
        on_gpu(self.gpu(), "binary", || {
            same_gpu("binary", &[self, rhs])?;
            same_dtype("binary", &[self, rhs])?;
            if self.dtype.is_half() {
                return f32ops::binary(self, a, rhs, b, out, op);
            }
            let y = f32ops::binary(&self.float("binary")?, a, &rhs.float("binary")?, b, out, op)?;
            self.out(y)
        })
    }
    fn unary(&self, op: UnaryOp, scalar: f32) -> Result<Self> {
        on_gpu(self.gpu(), "unary", || if self.dtype.is_half() { f32ops::unary(self, op, scalar) } else { self.out(f32ops::unary(&self.float("unary")?, op, scalar)?) })
    }
    fn unary_backward(&self, op: UnaryOp, x: &Self, y: &Self) -> Result<Self> {
        on_gpu(self.gpu(), "unary_backward", || {
            same_gpu("unary_backward", &[self, x, y])?;
            same_dtype("unary_backward", &[self, x, y])?;
            if self.dtype.is_half() {
                return f32ops::unary_backward(self, op, x, y);
            }
            self.out(f32ops::unary_backward(&self.f32s()?, op, &x.f32s()?, &y.f32s()?)?)
        })
    }
    fn sum_to_shape(&self, from: &[usize], to: &[usize]) -> Result<Self> {
        on_gpu(self.gpu(), "sum_to_shape", || self.out(f32ops::sum_to_shape(&self.float("sum")?, from, to)?))
    }
    fn broadcast_to(&self, from: &[usize], to: &[usize]) -> Result<Self> {
        on_gpu(self.gpu(), "broadcast_to", || {
            if self.dtype == DType::I32 {
                bail!("broadcast_to: a float op got an i32 tensor");
            }
            self.out(f32ops::broadcast_to(&self.words32()?, from, to)?)
        })
    }
    fn gather_strided(&self, shape: &[usize], strides: &[usize]) -> Result<Self> {
        on_gpu(self.gpu(), "gather_strided", || self.out(f32ops::gather_strided(&self.words32()?, shape, strides)?))
    }
    fn softmax_rows(&self, n: usize) -> Result<Self> {
        on_gpu(self.gpu(), "softmax_rows", || self.out(f32ops::softmax_rows(&self.float("softmax")?, n)?))
    }
    fn softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self> {
        on_gpu(self.gpu(), "softmax_rows_backward", || {
            same_gpu("softmax_backward", &[self, dy])?;
            same_dtype("softmax_backward", &[self, dy])?;
            self.out(f32ops::softmax_rows_backward(&self.f32s()?, &dy.f32s()?, n)?)
        })
    }
    fn log_softmax_rows(&self, n: usize) -> Result<Self> {
        on_gpu(self.gpu(), "log_softmax_rows", || self.out(f32ops::log_softmax_rows(&self.float("log_softmax")?, n)?))
    }
    fn log_softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self> {
        on_gpu(self.gpu(), "log_softmax_rows_backward", || {
            same_gpu("log_softmax_backward", &[self, dy])?;
            same_dtype("log_softmax_backward", &[self, dy])?;
            self.out(f32ops::log_softmax_rows_backward(&self.f32s()?, &dy.f32s()?, n)?)
        })
    }

    // ------------------------------------------------------------ layout
    fn concat(parts: &[(&Self, &[usize])], axis: usize) -> Result<Self> {
        let Some((first, _)) = parts.first() else { bail!("concat of no tensors") };
        on_gpu(first.gpu(), "concat", || {
            let ps: Vec<&CudaStorage> = parts.iter().map(|p| p.0).collect();
            same_gpu("concat", &ps)?;
            same_dtype("concat", &ps)?;
            let vals: Vec<CudaStorage> = ps.iter().map(|p| p.words32()).collect::<Result<_>>()?;
            let refs: Vec<(&CudaStorage, &[usize])> = vals.iter().zip(parts).map(|(v, p)| (v, p.1)).collect();
            first.out(f32ops::concat(&refs, axis)?)
        })
    }
    fn narrow(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self> {
        on_gpu(self.gpu(), "narrow", || self.out(f32ops::narrow(&self.words32()?, shape, axis, start, len)?))
    }
    fn narrow_backward(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self> {
        on_gpu(self.gpu(), "narrow_backward", || self.out(f32ops::narrow_backward(&self.words32()?, shape, axis, start, len)?))
    }
    fn upsample_nearest2x(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        on_gpu(self.gpu(), "upsample_nearest2x", || self.out(f32ops::upsample_nearest2x(&self.float("upsample_nearest2x")?, nc, h, w)?))
    }
    fn upsample_nearest2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        on_gpu(self.gpu(), "upsample_nearest2x_backward", || self.out(f32ops::upsample_nearest2x_backward(&self.f32s()?, nc, h, w)?))
    }
    fn avg_pool2x(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        on_gpu(self.gpu(), "avg_pool2x", || self.out(f32ops::avg_pool2x(&self.float("avg_pool2x")?, nc, h, w)?))
    }
    fn avg_pool2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        on_gpu(self.gpu(), "avg_pool2x_backward", || self.out(f32ops::avg_pool2x_backward(&self.f32s()?, nc, h, w)?))
    }
    fn embedding(&self, ids: &Self, num: usize, dim: usize) -> Result<Self> {
        on_gpu(self.gpu(), "embedding", || {
            same_gpu("embedding", &[self, ids])?;
            self.out(f32ops::embedding(&self.float("embedding")?, ids, num, dim)?)
        })
    }
    fn embedding_backward(&self, ids: &Self, num: usize, dim: usize) -> Result<Self> {
        on_gpu(self.gpu(), "embedding_backward", || {
            same_gpu("embedding_backward", &[self, ids])?;
            self.out(f32ops::embedding_backward(&self.f32s()?, ids, num, dim)?)
        })
    }
    fn timestep_embedding(&self, dim: usize, max_period: f32) -> Result<Self> {
        on_gpu(self.gpu(), "timestep_embedding", || self.out(f32ops::timestep_embedding(&self.float("timestep_embedding")?, dim, max_period)?))
    }
    fn timestep_embedding_backward(&self, gy: &Self, dim: usize, max_period: f32) -> Result<Self> {
        on_gpu(self.gpu(), "timestep_embedding_backward", || {
            same_gpu("timestep_embedding_backward", &[self, gy])?;
            self.out(f32ops::timestep_embedding_backward(&self.f32s()?, &gy.f32s()?, dim, max_period)?)
        })
    }

    // ------------------------------------------------------------ GEMM, conv, norm, attention
    fn matmul(&self, ta: bool, b: &Self, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Result<Self> {
        on_gpu(self.gpu(), "matmul", || {
            same_gpu("matmul", &[self, b])?;
            same_dtype("matmul", &[self, b])?;
            if self.dtype.is_half() {
                return linalg::matmul_h16(self, ta, b, tb, m, n, k, alpha);
            }
            self.out(linalg::matmul(&self.float("matmul")?, ta, &b.float("matmul")?, tb, m, n, k, alpha)?)
        })
    }
    fn linear(&self, w: &Self, bias: Option<&Self>, n: usize, i: usize, o: usize) -> Result<Self> {
        on_gpu(self.gpu(), "linear", || {
            same_gpu("linear", &[self, w])?;
            same_dtype("linear", &[self, w])?;
            let bias = match bias {
                Some(b) => {
                    same_gpu("linear bias", &[self, b])?;
                    same_dtype("linear bias", &[self, b])?;
                    Some(b.f32s()?)
                }
                None => None,
            };
            if self.dtype.is_half() {
                return linalg::linear_h16(self, w, bias.as_ref(), n, i, o);
            }
            self.out(linalg::linear(&self.float("linear")?, &w.float("linear")?, bias.as_ref(), n, i, o)?)
        })
    }
    fn conv2d(&self, w: &Self, bias: Option<&Self>, g: &ConvGeom) -> Result<Self> {
        on_gpu(self.gpu(), "conv2d", || {
            same_gpu("conv2d", &[self, w])?;
            same_dtype("conv2d", &[self, w])?;
            let bias = match bias {
                Some(b) => {
                    same_gpu("conv2d bias", &[self, b])?;
                    Some(b.f32s()?)
                }
                None => None,
            };
            if self.dtype.is_half() {
                return conv::conv2d(self, w, bias.as_ref(), g);
            }
            self.out(conv::conv2d_f32(&self.float("conv2d")?, &w.f32s()?, bias.as_ref(), g)?)
        })
    }
    fn conv2d_backward(&self, w: &Self, dy: &Self, g: &ConvGeom, need_dx: bool) -> Result<(Option<Self>, Self, Self)> {
        on_gpu(self.gpu(), "conv2d_backward", || {
            same_gpu("conv2d_backward", &[self, w, dy])?;
            same_dtype("conv2d_backward", &[self, w, dy])?;
            if self.dtype.is_half() {
                let (dx, dw, db) = conv::conv2d_backward(self, w, dy, g, need_dx)?;
                return Ok((dx, dw, self.out(db)?));
            }
            let (dx, dw, db) = conv::conv2d_backward_f32(&self.f32s()?, &w.f32s()?, &dy.f32s()?, g, need_dx)?;
            Ok((dx.map(|d| self.out(d)).transpose()?, self.out(dw)?, self.out(db)?))
        })
    }
    fn group_norm(&self, gamma: &Self, beta: &Self, g: &NormGeom) -> Result<(Self, Self, Self)> {
        on_gpu(self.gpu(), "group_norm", || {
            same_gpu("group_norm", &[self, gamma, beta])?;
            same_dtype("group_norm", &[self, gamma, beta])?;
            let (y, mean, rstd) = linalg::group_norm(&self.float("group_norm")?, &gamma.f32s()?, &beta.f32s()?, g)?;
            Ok((self.out(y)?, mean, rstd))
        })
    }
    fn group_norm_backward(&self, dy: &Self, gamma: &Self, mean: &Self, rstd: &Self, g: &NormGeom) -> Result<(Self, Self, Self)> {
        on_gpu(self.gpu(), "group_norm_backward", || {
            same_gpu("group_norm_backward", &[self, dy, gamma, mean, rstd])?;
            for s in [mean, rstd] {
                if s.dtype != DType::F32 {
                    bail!("group_norm_backward: expected f32 statistics, found {}", s.dtype);
                }
            }
            let (dx, dw, db) = linalg::group_norm_backward(&self.f32s()?, &dy.f32s()?, &gamma.f32s()?, mean, rstd, g)?;
            Ok((self.out(dx)?, gamma.out(dw)?, gamma.out(db)?))
        })
    }
    fn qkv_attention(&self, g: &AttnGeom) -> Result<(Self, Self)> {
        on_gpu(self.gpu(), "qkv_attention", || {
            let (out, probs) = linalg::qkv_attention(&self.float("qkv_attention")?, g)?;
            Ok((self.out(out)?, probs))
        })
    }
    fn qkv_attention_backward(&self, probs: &Self, dout: &Self, g: &AttnGeom) -> Result<Self> {
        on_gpu(self.gpu(), "qkv_attention_backward", || {
            same_gpu("qkv_attention_backward", &[self, probs, dout])?;
            if probs.dtype != DType::F32 {
                bail!("qkv_attention_backward: expected f32 probabilities, found {}", probs.dtype);
            }
            self.out(linalg::qkv_attention_backward(&self.f32s()?, probs, &dout.f32s()?, g)?)
        })
    }

    // ------------------------------------------------------------ in place, optimiser
    fn axpby_in_place(&mut self, a: f32, x: &Self, b: f32) -> Result<()> {
        let g = self.gpu().clone();
        on_gpu(&g, "axpby", || {
            same_gpu("axpby", &[self, x])?;
            if self.len != x.len {
                bail!("axpby: {} and {} values", self.len, x.len);
            }
            let xf = x.float("axpby")?;
            if self.dtype == DType::F32 {
                return f32ops::axpby(self, a, &xf, b);
            }
            let mut y = self.float("axpby")?;
            f32ops::axpby(&mut y, a, &xf, b)?;
            *self = self.out(y)?;
            Ok(())
        })
    }
    fn adam_in_place(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &AdamStep) -> Result<()> {
        let g = self.gpu().clone();
        on_gpu(&g, "adam", || {
            same_gpu("adam", &[self, grad, m, v])?;
            for s in [&*self, &*m, &*v] {
                if s.dtype != DType::F32 {
                    bail!("adam: expected f32 parameters and moments, found {}", s.dtype);
                }
            }
            let gf = grad.float("adam")?;
            f32ops::adam(self, &gf, m, v, h)
        })
    }
    fn adam_arena(&mut self, grad: &Self, m: &mut Self, v: &mut Self, ema: Option<&mut Self>, h: &ArenaStep) -> Result<()> {
        let g = self.gpu().clone();
        on_gpu(&g, "adam_arena", || {
            let gf = grad.float("adam_arena")?;
            optim::adam_arena(self, &gf, m, v, ema, h)
        })
    }
    fn sum_squares_on_device(ts: &[&Self]) -> Result<Self> {
        let Some(first) = ts.first() else { bail!("sum_squares_on_device: no tensors (the device is unknown)") };
        on_gpu(first.gpu(), "sum_squares", || {
            let g = same_gpu("sum_squares", ts)?;
            let vals: Vec<CudaStorage> = ts.iter().map(|t| t.f32s()).collect::<Result<_>>()?;
            let refs: Vec<&CudaStorage> = vals.iter().collect();
            f32ops::sum_squares_on_device(&g, &refs)
        })
    }
    fn sum_squares(ts: &[&Self]) -> Result<f64> {
        let Some(first) = ts.first() else { return Ok(0.0) };
        on_gpu(first.gpu(), "sum_squares", || {
            same_gpu("sum_squares", ts)?;
            let vals: Vec<CudaStorage> = ts.iter().map(|t| t.f32s()).collect::<Result<_>>()?;
            let refs: Vec<&CudaStorage> = vals.iter().collect();
            f32ops::sum_squares(&refs)
        })
    }
}
