//! The engine's ops on a GPU, f32: each function mirrors a CPU twin in `backend/cpu` (named in
//! its comment) and launches the kernels of `kernels/*.cu`, cuBLAS (GEMMs, TF32 off unless
//! allowed) or cuDNN (see `conv.rs`). Inputs on the CPU are uploaded to the other input's GPU
//! (constants such as loss weights); outputs are new pool buffers.
//!
//! Failures inside an op (out of memory, a driver error) panic with the op's name: ops return
//! values, not `Result`s, as on the CPU.

use std::sync::Arc;

use anyhow::{bail, Result};
use cudarc::driver::DeviceRepr;

use super::gpu::{Arg, Gpu, GpuBuf};
use crate::backend::cpu::elementwise::broadcast_strides;
use crate::tensor::{contiguous_strides, Device, Tensor};

/// Unwrap an op's result; a GPU failure inside an op panics with its name.
pub(crate) fn ck<T>(r: Result<T>, op: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA op {op} failed: {e:#}"))
}

/// The GPU of the first CUDA tensor among `ts`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn gpu_of(ts: &[&Tensor]) -> Arc<Gpu> {
    for t in ts {
        if let Some(b) = t.gpu_buf() {
            return b.gpu().clone();
        }
    }
    panic!("a CUDA op got no tensor on a GPU")
}

/// `t` on `g` (uploaded if it is on the CPU).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn on(g: &Arc<Gpu>, t: &Tensor) -> Tensor {
    match t.gpu_buf() {
        Some(b) if b.gpu().ordinal == g.ordinal => t.clone(),
        _ => ck(t.to_device(Device::Cuda(g.ordinal)), "upload"),
    }
}

#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
fn ptr(t: &Tensor) -> u64 {
    t.gpu_buf().expect("tensor on the GPU").ptr()
}

fn out(g: &Arc<Gpu>, shape: &[usize], op: &str) -> GpuBuf {
    ck(g.alloc(shape.iter().product()), op)
}

fn i64s<const N: usize>(v: &[usize], what: &str) -> [i64; N] {
    assert!(v.len() <= N, "{what}: {} axes (at most {N} on the GPU)", v.len());
    let mut a = [0i64; N];
    for (x, &y) in a.iter_mut().zip(v) {
        *x = y as i64;
    }
    a
}

// ---------------------------------------------------------------- element-wise

/// `binary_f32`'s geometry (the kernel's `BinGeom`): the output shape and each operand's strides
/// in the output's index space.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BinGeom {
    pub ndim: i64,
    pub shape: [i64; 8],
    pub sa: [i64; 8],
    pub sb: [i64; 8],
}

impl BinGeom {
    pub fn new(a: &[usize], b: &[usize], out: &[usize]) -> BinGeom {
        BinGeom { ndim: out.len() as i64, shape: i64s(out, "binary"), sa: i64s(&broadcast_strides(a, out), "binary"), sb: i64s(&broadcast_strides(b, out), "binary") }
    }
}
unsafe impl DeviceRepr for BinGeom {}

/// `reduce_sum_f32`'s geometry: kept axes (they index the output) and reduced axes, with their
/// strides in the input.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReduceGeom {
    pub nk: i64,
    pub nr: i64,
    pub kshape: [i64; 8],
    pub kstride: [i64; 8],
    pub rshape: [i64; 8],
    pub rstride: [i64; 8],
}

impl ReduceGeom {
    /// The geometry of summing a contiguous `from` down to `to` (NumPy broadcasting rules), with
    /// the output and reduction sizes.
    pub fn new(from: &[usize], to: &[usize]) -> (ReduceGeom, usize, usize) {
        assert!(to.len() <= from.len(), "sum_to_shape {from:?} -> {to:?}");
        let pad = from.len() - to.len();
        let to_p: Vec<usize> = std::iter::repeat_n(1, pad).chain(to.iter().copied()).collect();
        let st = contiguous_strides(from);
        let (mut ks, mut kst, mut rs, mut rst) = (vec![], vec![], vec![], vec![]);
        for i in 0..from.len() {
            if to_p[i] == from[i] {
                if from[i] != 1 {
                    ks.push(from[i]);
                    kst.push(st[i]);
                }
            } else {
                assert_eq!(to_p[i], 1, "sum_to_shape {from:?} -> {to:?}");
                rs.push(from[i]);
                rst.push(st[i]);
            }
        }
        let geom = ReduceGeom { nk: ks.len() as i64, nr: rs.len() as i64, kshape: i64s(&ks, "sum"), kstride: i64s(&kst, "sum"), rshape: i64s(&rs, "sum"), rstride: i64s(&rst, "sum") };
        (geom, to.iter().product(), rs.iter().product())
    }
}
unsafe impl DeviceRepr for ReduceGeom {}

/// `gather_strided_f32`'s view: a shape and the source strides of its axes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub ndim: i64,
    pub shape: [i64; 8],
    pub strides: [i64; 8],
}

impl Strided {
    pub fn new(shape: &[usize], strides: &[usize]) -> Strided {
        Strided { ndim: shape.len() as i64, shape: i64s(shape, "gather"), strides: i64s(strides, "gather") }
    }
}
unsafe impl DeviceRepr for Strided {}

/// Binary op codes of `binary_f32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bin {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

/// Unary op codes of `unary_f32` / `unary_backward_f32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Un {
    AddScalar = 0,
    MulScalar = 1,
    Exp = 2,
    Relu = 3,
    Square = 4,
    Silu = 5,
    Sigmoid = 6,
    Neg = 7,
}

/// `f(a, b)` broadcast to `out_shape` (CPU: `elementwise::binary`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn binary(a: &Tensor, b: &Tensor, out_shape: &[usize], op: Bin) -> Tensor {
    let g = gpu_of(&[a, b]);
    let (a, b) = (on(&g, a), on(&g, b));
    let n: usize = out_shape.iter().product();
    let y = out(&g, out_shape, "binary");
    if a.shape() == out_shape && b.shape() == out_shape {
        ck(g.launch_n("binary_same_f32", n, &[Arg::I64(op as i64), Arg::Ptr(ptr(&a)), Arg::Ptr(ptr(&b)), Arg::Ptr(y.ptr()), Arg::I64(n as i64)]), "binary");
    } else {
        let geom = BinGeom::new(a.shape(), b.shape(), out_shape);
        ck(g.launch_n("binary_f32", n, &[Arg::I64(op as i64), Arg::Ptr(ptr(&a)), Arg::Ptr(ptr(&b)), Arg::Ptr(y.ptr()), Arg::I64(n as i64), Arg::Struct(&geom)]), "binary");
    }
    Tensor::from_gpu(y, out_shape)
}

/// `f(x)` element-wise; `s` is the scalar of `AddScalar`/`MulScalar`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn unary(x: &Tensor, op: Un, s: f32) -> Tensor {
    let g = gpu_of(&[x]);
    let n = x.numel();
    let y = out(&g, x.shape(), "unary");
    ck(g.launch_n("unary_f32", n, &[Arg::I64(op as i64), Arg::F32(s), Arg::Ptr(ptr(x)), Arg::Ptr(y.ptr()), Arg::I64(n as i64)]), "unary");
    Tensor::from_gpu(y, x.shape())
}

/// The input gradient of `unary(x, op)` given its output `y` and output gradient `gy`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn unary_backward(op: Un, gy: &Tensor, x: &Tensor, y: &Tensor) -> Tensor {
    let g = gpu_of(&[gy, x, y]);
    let (gy, x, y) = (on(&g, gy), on(&g, x), on(&g, y));
    let n = gy.numel();
    let dx = out(&g, gy.shape(), "unary_backward");
    ck(g.launch_n("unary_backward_f32", n, &[Arg::I64(op as i64), Arg::Ptr(ptr(&gy)), Arg::Ptr(ptr(&x)), Arg::Ptr(ptr(&y)), Arg::Ptr(dx.ptr()), Arg::I64(n as i64)]), "unary_backward");
    Tensor::from_gpu(dx, gy.shape())
}

/// A tensor of `shape` filled with `v` on `g`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn full(g: &Arc<Gpu>, shape: &[usize], v: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let y = out(g, shape, "full");
    ck(g.launch_n("fill_f32", n, &[Arg::Ptr(y.ptr()), Arg::F32(v), Arg::I64(n as i64)]), "full");
    Tensor::from_gpu(y, shape)
}

/// Move an in-place target onto `g` (if it is on the CPU or another GPU).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
fn to_gpu_in_place(g: &Arc<Gpu>, t: &mut Tensor) {
    if !matches!(t.gpu_buf(), Some(b) if b.gpu().ordinal == g.ordinal) {
        *t = on(g, t);
    }
}

/// `y ← a·x + b·y` in place (copying `y`'s buffer first if it is shared; a `y` on the CPU is
/// moved to `x`'s GPU first).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn axpby(a: f32, x: &Tensor, b: f32, y: &mut Tensor) {
    let g = gpu_of(&[x, y]);
    to_gpu_in_place(&g, y);
    let x = on(&g, x);
    assert_eq!(x.shape(), y.shape(), "axpby shapes");
    let n = y.numel() as i64;
    let yp = ck(y.gpu_buf_mut(), "axpby").ptr();
    ck(g.launch_n("axpby_f32", n as usize, &[Arg::F32(a), Arg::Ptr(ptr(&x)), Arg::F32(b), Arg::Ptr(yp), Arg::I64(n)]), "axpby");
}

/// `x ← x·s` in place.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn scale_in_place(x: &mut Tensor, s: f32) {
    let g = gpu_of(&[x]);
    let n = x.numel() as i64;
    let p = ck(x.gpu_buf_mut(), "scale").ptr();
    ck(g.launch_n("unary_f32", n as usize, &[Arg::I64(Un::MulScalar as i64), Arg::F32(s), Arg::Ptr(p), Arg::Ptr(p), Arg::I64(n)]), "scale");
}

// ---------------------------------------------------------------- reductions and layout

/// `x` (of shape `from`) summed down to `to` (CPU: `elementwise::sum_to_shape`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn sum_to_shape(x: &Tensor, from: &[usize], to: &[usize]) -> Tensor {
    let g = gpu_of(&[x]);
    let (geom, out_n, red_n) = ReduceGeom::new(from, to);
    if red_n == 1 {
        return x.reshape(to);
    }
    let y = out(&g, to, "sum");
    ck(g.launch_rows("reduce_sum_f32", out_n, &[Arg::Ptr(ptr(x)), Arg::Ptr(y.ptr()), Arg::I64(out_n as i64), Arg::I64(red_n as i64), Arg::Struct(&geom)]), "sum");
    Tensor::from_gpu(y, to)
}

/// A copy of the strided view `(shape, strides)` of `x`'s buffer (CPU: `gather_strided`):
/// permutations, and broadcasts (stride 0).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn gather_strided(x: &Tensor, shape: &[usize], strides: &[usize]) -> Tensor {
    let g = gpu_of(&[x]);
    let n: usize = shape.iter().product();
    let s = Strided::new(shape, strides);
    let y = out(&g, shape, "gather");
    ck(g.launch_n("gather_strided_f32", n, &[Arg::Ptr(ptr(x)), Arg::Ptr(y.ptr()), Arg::I64(n as i64), Arg::Struct(&s)]), "gather");
    Tensor::from_gpu(y, shape)
}

/// `x` of shape `from` repeated to `to` (CPU: `broadcast_to`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn broadcast_to(x: &Tensor, from: &[usize], to: &[usize]) -> Tensor {
    if from == to {
        return x.reshape(to);
    }
    gather_strided(x, to, &broadcast_strides(from, to))
}

/// Sum of squares of every element of every tensor (f64), one download for all.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn sum_squares(ts: &[&Tensor]) -> f64 {
    if ts.is_empty() {
        return 0.0;
    }
    let g = gpu_of(ts);
    const BLOCKS: usize = 64;
    // doubles in f32 words: two per partial
    let partial = ck(g.alloc(2 * BLOCKS * ts.len()), "sum_squares");
    for (i, t) in ts.iter().enumerate() {
        let t = on(&g, t);
        ck(g.launch("sum_squares_partial_f32", BLOCKS as u32, 256, &[Arg::Ptr(ptr(&t)), Arg::I64(t.numel() as i64), Arg::Ptr(partial.ptr() + (i * BLOCKS * 8) as u64)]), "sum_squares");
    }
    let words = ck(g.download(&partial), "sum_squares");
    words.chunks(2).map(|w| f64::from_bits(w[0].to_bits() as u64 | ((w[1].to_bits() as u64) << 32))).sum()
}

#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
fn rows_op(name: &'static str, a: &Tensor, b: Option<&Tensor>, n: usize) -> Tensor {
    let g = gpu_of(&[a]);
    let rows = a.numel() / n;
    let y = out(&g, a.shape(), name);
    let mut args = vec![Arg::Ptr(ptr(a))];
    let b = b.map(|b| on(&g, b));
    if let Some(b) = &b {
        args.push(Arg::Ptr(ptr(b)));
    }
    args.extend([Arg::Ptr(y.ptr()), Arg::I64(rows as i64), Arg::I64(n as i64)]);
    ck(g.launch_rows(name, rows, &args), name);
    Tensor::from_gpu(y, a.shape())
}

/// Softmax over rows of `n` (CPU: `softmax_rows`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn softmax_rows(x: &Tensor, n: usize) -> Tensor {
    rows_op("softmax_rows_f32", x, None, n)
}
/// CPU: `softmax_rows_backward`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn softmax_rows_backward(y: &Tensor, dy: &Tensor, n: usize) -> Tensor {
    rows_op("softmax_rows_backward_f32", y, Some(dy), n)
}
/// Log-softmax over rows of `n` (CPU: `ops::log_softmax`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn log_softmax_rows(x: &Tensor, n: usize) -> Tensor {
    rows_op("log_softmax_rows_f32", x, None, n)
}
/// `dx = g − exp(y)·Σg` per row, `y` the log-probabilities.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn log_softmax_rows_backward(y: &Tensor, gy: &Tensor, n: usize) -> Tensor {
    rows_op("log_softmax_rows_backward_f32", y, Some(gy), n)
}

fn outer_inner(shape: &[usize], axis: usize) -> (usize, usize) {
    (shape[..axis].iter().product(), shape[axis + 1..].iter().product())
}

#[allow(clippy::too_many_arguments)]
fn copy_slab(g: &Gpu, src: u64, dst: u64, outer: usize, len: usize, src_stride: usize, src_off: usize, dst_stride: usize, dst_off: usize) {
    let a = [Arg::Ptr(src), Arg::Ptr(dst), Arg::I64(outer as i64), Arg::I64(len as i64), Arg::I64(src_stride as i64), Arg::I64(src_off as i64), Arg::I64(dst_stride as i64), Arg::I64(dst_off as i64)];
    ck(g.launch_n("copy_slab_f32", outer * len, &a), "copy");
}

/// Concatenation along `axis` (CPU: `elementwise::concat`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn concat(parts: &[Tensor], axis: usize) -> Tensor {
    let refs: Vec<&Tensor> = parts.iter().collect();
    let g = gpu_of(&refs);
    let mut shape = parts[0].shape().to_vec();
    shape[axis] = parts.iter().map(|p| p.shape()[axis]).sum();
    let (outer, inner) = outer_inner(&shape, axis);
    let y = out(&g, &shape, "concat");
    let mut start = 0;
    for p in parts {
        let p = on(&g, p);
        let len = p.shape()[axis] * inner;
        copy_slab(&g, ptr(&p), y.ptr(), outer, len, len, 0, shape[axis] * inner, start * inner);
        start += p.shape()[axis];
    }
    Tensor::from_gpu(y, &shape)
}

/// `[start, start+len)` along `axis` (CPU: `elementwise::narrow`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Tensor {
    let g = gpu_of(&[x]);
    let shape = x.shape();
    let (outer, inner) = outer_inner(shape, axis);
    let mut os = shape.to_vec();
    os[axis] = len;
    let y = out(&g, &os, "narrow");
    copy_slab(&g, ptr(x), y.ptr(), outer, len * inner, shape[axis] * inner, start * inner, len * inner, 0);
    Tensor::from_gpu(y, &os)
}

/// The gradient of [`narrow`]: `gy` placed in zeros of `shape` (CPU: `narrow_backward`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn narrow_backward(gy: &Tensor, shape: &[usize], axis: usize, start: usize, len: usize) -> Tensor {
    let g = gpu_of(&[gy]);
    let (outer, inner) = outer_inner(shape, axis);
    let y = full(&g, shape, 0.0);
    copy_slab(&g, ptr(gy), ptr(&y), outer, len * inner, len * inner, 0, shape[axis] * inner, start * inner);
    y
}

#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
fn image_op(name: &'static str, x: &Tensor, out_shape: &[usize], nc: usize, h: usize, w: usize) -> Tensor {
    let g = gpu_of(&[x]);
    let y = out(&g, out_shape, name);
    let n = out_shape.iter().product::<usize>();
    ck(g.launch_n(name, n, &[Arg::Ptr(ptr(x)), Arg::Ptr(y.ptr()), Arg::I64(nc as i64), Arg::I64(h as i64), Arg::I64(w as i64)]), name);
    Tensor::from_gpu(y, out_shape)
}

/// Nearest 2× upsampling of `[N, C, H, W]`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn upsample2x(x: &Tensor) -> Tensor {
    let s = x.shape();
    image_op("upsample2x_f32", x, &[s[0], s[1], 2 * s[2], 2 * s[3]], s[0] * s[1], s[2], s[3])
}
/// Its gradient: `gy [N, C, 2H, 2W] → [N, C, H, W]` (`in_shape`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn upsample2x_backward(gy: &Tensor, in_shape: &[usize]) -> Tensor {
    let s = in_shape;
    image_op("upsample2x_backward_f32", gy, s, s[0] * s[1], s[2], s[3])
}
/// 2×2 average pooling, stride 2.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn avgpool2x(x: &Tensor) -> Tensor {
    let s = x.shape();
    image_op("avgpool2x_f32", x, &[s[0], s[1], s[2] / 2, s[3] / 2], s[0] * s[1], s[2], s[3])
}
/// Its gradient, to `in_shape`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn avgpool2x_backward(gy: &Tensor, in_shape: &[usize]) -> Tensor {
    let s = in_shape;
    image_op("avgpool2x_backward_f32", gy, s, s[0] * s[1], s[2], s[3])
}

/// Row `ids[r]` of `w [num, dim]` for each r.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn embedding(w: &Tensor, ids: &[usize]) -> Tensor {
    let g = gpu_of(&[w]);
    let dim = w.shape()[1];
    let idb = ck(g.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>()), "embedding");
    let y = out(&g, &[ids.len(), dim], "embedding");
    ck(g.launch_n("embedding_forward_f32", ids.len() * dim, &[Arg::Ptr(ptr(w)), Arg::Ptr(idb.ptr()), Arg::Ptr(y.ptr()), Arg::I64(ids.len() as i64), Arg::I64(dim as i64)]), "embedding");
    Tensor::from_gpu(y, &[ids.len(), dim])
}

/// The weight gradient of [`embedding`].
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn embedding_backward(gy: &Tensor, ids: &[usize], num: usize) -> Tensor {
    let g = gpu_of(&[gy]);
    let dim = gy.shape()[1];
    let idb = ck(g.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>()), "embedding_backward");
    let y = out(&g, &[num, dim], "embedding_backward");
    let a = [Arg::Ptr(ptr(gy)), Arg::Ptr(idb.ptr()), Arg::Ptr(y.ptr()), Arg::I64(ids.len() as i64), Arg::I64(num as i64), Arg::I64(dim as i64)];
    ck(g.launch_n("embedding_backward_f32", num * dim, &a), "embedding_backward");
    Tensor::from_gpu(y, &[num, dim])
}

/// torchcfm's sinusoidal embedding of `t [B]` → `[B, dim]`.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f32) -> Tensor {
    let g = gpu_of(&[t]);
    let b = t.numel();
    let y = out(&g, &[b, dim], "timestep_embedding");
    let lmp = (max_period as f64).ln() as f32;
    ck(g.launch_n("timestep_embedding_f32", b * dim, &[Arg::Ptr(ptr(t)), Arg::Ptr(y.ptr()), Arg::I64(b as i64), Arg::I64(dim as i64), Arg::F32(lmp)]), "timestep_embedding");
    Tensor::from_gpu(y, &[b, dim])
}

/// Its gradient with respect to `t`, from the embedding `emb` and its gradient.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn timestep_embedding_backward(emb: &Tensor, gy: &Tensor, max_period: f32) -> Tensor {
    let g = gpu_of(&[emb, gy]);
    let gy = on(&g, gy);
    let (b, dim) = (emb.shape()[0], emb.shape()[1]);
    let y = out(&g, &[b], "timestep_embedding_backward");
    let lmp = (max_period as f64).ln() as f32;
    ck(g.launch_n("timestep_embedding_backward_f32", b, &[Arg::Ptr(ptr(emb)), Arg::Ptr(ptr(&gy)), Arg::Ptr(y.ptr()), Arg::I64(b as i64), Arg::I64(dim as i64), Arg::F32(lmp)]), "timestep_embedding_backward");
    Tensor::from_gpu(y, &[b])
}

/// `y[n, c, s] += bias[c]` in place.
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn add_channel_bias(y: &mut Tensor, bias: &Tensor) {
    let g = gpu_of(&[y]);
    let bias = on(&g, bias);
    let s = y.shape().to_vec();
    let (n, c, sp) = (s[0], s[1], s[2..].iter().product::<usize>());
    let yp = ck(y.gpu_buf_mut(), "bias").ptr();
    ck(g.launch_n("add_channel_bias_f32", n * c * sp, &[Arg::Ptr(yp), Arg::Ptr(ptr(&bias)), Arg::I64(n as i64), Arg::I64(c as i64), Arg::I64(sp as i64)]), "bias");
}

// ---------------------------------------------------------------- GEMM (cuBLAS)

/// A row-major operand of a GEMM: device pointer, whether it is used transposed, and the
/// element stride between batch items.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub trans: bool,
    pub batch_stride: i64,
}

impl Operand {
    #[cfg(any())]
    pub fn n(t: &Tensor) -> Operand {
        Operand { ptr: ptr(t), trans: false, batch_stride: 0 }
    }
    #[cfg(any())]
    pub fn t(t: &Tensor) -> Operand {
        Operand { ptr: ptr(t), trans: true, batch_stride: 0 }
    }
}

/// One row-major GEMM `C[m, n] = α·op(A)·op(B) + β·C` over `batch` items (C's items `c_stride`
/// apart).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
    pub c: u64,
    pub c_stride: i64,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
}

/// The column-major cuBLAS call that computes a [`Gemm`]: `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLAS'
/// first operand is B. (Kept apart from the call so that tests can check the mapping on the CPU
/// against a reference column-major GEMM.)
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CublasCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub stride_a: i64,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: i64,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: i64,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
}

impl Gemm {
    pub fn cublas(&self) -> CublasCall {
        let (m, n, k) = (self.m, self.n, self.k);
        CublasCall {
            trans_a: self.b.trans,
            trans_b: self.a.trans,
            m: n,
            n: m,
            k,
            a: self.b.ptr,
            lda: if self.b.trans { k } else { n },
            stride_a: self.b.batch_stride,
            b: self.a.ptr,
            ldb: if self.a.trans { m } else { k },
            stride_b: self.a.batch_stride,
            c: self.c,
            ldc: n,
            stride_c: self.c_stride,
            alpha: self.alpha,
            beta: self.beta,
            batch: self.batch,
        }
    }
}

/// Run a [`Gemm`] with cuBLAS on the GPU's stream.
pub fn run_gemm(g: &Gpu, op: &Gemm) -> Result<()> {
    use cudarc::cublas::sys::{self as cb, cublasOperation_t as Op};
    if op.m == 0 || op.n == 0 {
        return Ok(());
    }
    let c = op.cublas();
    if g.is_sim() {
        return super::sim::gemm(&c);
    }
    let t = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
    let _x = g.exec.lock().unwrap_or_else(|e| e.into_inner());
    g.bind()?;
    // SAFETY: the pointers are live device buffers holding the operands at these sizes; the
    // scalars are host pointers (cuBLAS' default pointer mode)
    let s = unsafe {
        if c.batch == 1 {
            cb::cublasSgemm_v2(g.blas(), t(c.trans_a), t(c.trans_b), c.m as i32, c.n as i32, c.k as i32, &c.alpha, c.a as *const f32, c.lda as i32, c.b as *const f32, c.ldb as i32, &c.beta, c.c as *mut f32, c.ldc as i32)
        } else {
            cb::cublasSgemmStridedBatched(g.blas(), t(c.trans_a), t(c.trans_b), c.m as i32, c.n as i32, c.k as i32, &c.alpha, c.a as *const f32, c.lda as i32, c.stride_a, c.b as *const f32, c.ldb as i32, c.stride_b, &c.beta, c.c as *mut f32, c.ldc as i32, c.stride_c, c.batch as i32)
        }
    };
    if s != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("cuBLAS sgemm {}x{}x{} (batch {}) failed: {s:?}", op.m, op.n, op.k, op.batch);
    }
    Ok(())
}

/// [`run_gemm`] from its parts.
#[allow(clippy::too_many_arguments)]
pub fn gemm(g: &Gpu, m: usize, n: usize, k: usize, a: Operand, b: Operand, c: u64, c_stride: i64, alpha: f32, beta: f32, batch: usize) -> Result<()> {
    run_gemm(g, &Gemm { m, n, k, a, b, c, c_stride, alpha, beta, batch })
}

/// `a [M, K] · b [K, N]` with optional transposes of the stored matrices: `ta` means `a` is
/// stored `[K, M]`, `tb` that `b` is stored `[N, K]`.
#[allow(clippy::too_many_arguments)]
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn matmul(a: &Tensor, ta: bool, b: &Tensor, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Tensor {
    let g = gpu_of(&[a, b]);
    let (a, b) = (on(&g, a), on(&g, b));
    let y = out(&g, &[m, n], "matmul");
    let (oa, ob) = (if ta { Operand::t(&a) } else { Operand::n(&a) }, if tb { Operand::t(&b) } else { Operand::n(&b) });
    ck(gemm(&g, m, n, k, oa, ob, y.ptr(), 0, alpha, 0.0, 1), "matmul");
    Tensor::from_gpu(y, &[m, n])
}

/// `x [N, I] · wᵀ + b` with `w [O, I]` (CPU: `ops::linear`: the bias is laid down first, then
/// the product accumulated onto it).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let g = gpu_of(&[x, w]);
    let (x, w) = (on(&g, x), on(&g, w));
    let (n, i, o) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    let (y, beta) = match b {
        // a fresh buffer even for n = 1 (broadcast_to would share the bias, which the GEMM
        // then accumulates into)
        Some(b) => (gather_strided(&on(&g, b), &[n, o], &broadcast_strides(&[1, o], &[n, o])), 1.0),
        None => (Tensor::from_gpu(out(&g, &[n, o], "linear"), &[n, o]), 0.0),
    };
    ck(gemm(&g, n, o, i, Operand::n(&x), Operand::t(&w), ptr(&y), 0, 1.0, beta, 1), "linear");
    y
}

// ---------------------------------------------------------------- group norm

/// GroupNorm forward: `(y, mean, rstd)` (CPU: `norm::group_norm_forward`).
#[allow(clippy::too_many_arguments)]
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, n: usize, c: usize, s: usize, groups: usize, eps: f32) -> (Tensor, Tensor, Tensor) {
    let g = gpu_of(&[x]);
    let (gamma, beta) = (on(&g, gamma), on(&g, beta));
    let y = out(&g, x.shape(), "group_norm");
    let mean = out(&g, &[n * groups], "group_norm");
    let rstd = out(&g, &[n * groups], "group_norm");
    let a = [
        Arg::Ptr(ptr(x)),
        Arg::Ptr(ptr(&gamma)),
        Arg::Ptr(ptr(&beta)),
        Arg::Ptr(y.ptr()),
        Arg::Ptr(mean.ptr()),
        Arg::Ptr(rstd.ptr()),
        Arg::I64(n as i64),
        Arg::I64(c as i64),
        Arg::I64(s as i64),
        Arg::I64(groups as i64),
        Arg::F32(eps),
    ];
    ck(g.launch_rows("group_norm_forward_f32", n * groups, &a), "group_norm");
    (Tensor::from_gpu(y, x.shape()), Tensor::from_gpu(mean, &[n * groups]), Tensor::from_gpu(rstd, &[n * groups]))
}

/// GroupNorm backward: `(dx, dgamma, dbeta)`.
#[allow(clippy::too_many_arguments)]
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn group_norm_backward(x: &Tensor, dy: &Tensor, gamma: &Tensor, mean: &Tensor, rstd: &Tensor, n: usize, c: usize, s: usize, groups: usize) -> (Tensor, Tensor, Tensor) {
    let g = gpu_of(&[x]);
    let (dy, gamma) = (on(&g, dy), on(&g, gamma));
    let dx = out(&g, x.shape(), "group_norm_backward");
    let dgamma = out(&g, &[c], "group_norm_backward");
    let dbeta = out(&g, &[c], "group_norm_backward");
    let dims = [Arg::I64(n as i64), Arg::I64(c as i64), Arg::I64(s as i64), Arg::I64(groups as i64)];
    let mut a = vec![Arg::Ptr(ptr(x)), Arg::Ptr(ptr(&dy)), Arg::Ptr(ptr(&gamma)), Arg::Ptr(ptr(mean)), Arg::Ptr(ptr(rstd)), Arg::Ptr(dx.ptr())];
    a.extend(dims);
    ck(g.launch_rows("group_norm_backward_input_f32", n * groups, &a), "group_norm_backward");
    let mut a = vec![Arg::Ptr(ptr(x)), Arg::Ptr(ptr(&dy)), Arg::Ptr(ptr(mean)), Arg::Ptr(ptr(rstd)), Arg::Ptr(dgamma.ptr()), Arg::Ptr(dbeta.ptr())];
    a.extend(dims);
    ck(g.launch_rows("group_norm_backward_affine_f32", c, &a), "group_norm_backward");
    (Tensor::from_gpu(dx, x.shape()), Tensor::from_gpu(dgamma, &[c]), Tensor::from_gpu(dbeta, &[c]))
}

// ---------------------------------------------------------------- attention

use crate::backend::cpu::attention::{AttnGeom, QkvOrder};

/// The q, k, v operands (offset, batch stride) and the number of GEMM calls: the legacy order
/// has one uniform stride over all batch·head items; the new order is batched over heads within
/// each batch item.
fn attn_layout(a: &AttnGeom) -> (Vec<usize>, usize, [usize; 3], i64) {
    let (c, ct) = (a.heads * a.ch, a.ch * a.t);
    match a.order {
        QkvOrder::Legacy => (vec![0], a.b * a.heads, [0, ct, 2 * ct], (3 * ct) as i64),
        QkvOrder::New => ((0..a.b).map(|bi| bi * 3 * c * a.t).collect(), a.heads, [0, c * a.t, 2 * c * a.t], ct as i64),
    }
}

/// The GEMMs of attention's forward around the row softmax: `[S = scale·qᵀk into probs]`, then
/// `[out = v·Pᵀ]`, for buffers at the given addresses (bytes).
pub fn attention_forward_gemms(a: &AttnGeom, qkv: u64, probs: u64, out: u64) -> [Vec<Gemm>; 2] {
    let (t, ch) = (a.t, a.ch);
    let scale = 1.0 / (ch as f32).sqrt();
    let (bases, count, offs, stride) = attn_layout(a);
    let at = |off: usize, trans: bool| Operand { ptr: qkv + 4 * off as u64, trans, batch_stride: stride };
    let item = |base: u64, ci: usize, size: usize, trans: bool| Operand { ptr: base + 4 * (ci * count * size) as u64, trans, batch_stride: size as i64 };
    let mut s = Vec::new();
    let mut o = Vec::new();
    for (ci, &b0) in bases.iter().enumerate() {
        let p = item(probs, ci, t * t, false);
        s.push(Gemm { m: t, n: t, k: ch, a: at(b0 + offs[0], true), b: at(b0 + offs[1], false), c: p.ptr, c_stride: (t * t) as i64, alpha: scale, beta: 0.0, batch: count });
        let oc = item(out, ci, ch * t, false);
        o.push(Gemm { m: ch, n: t, k: t, a: at(b0 + offs[2], false), b: Operand { trans: true, ..p }, c: oc.ptr, c_stride: (ch * t) as i64, alpha: 1.0, beta: 0.0, batch: count });
    }
    [s, o]
}

/// The GEMMs of attention's backward around the row-softmax backward (which turns dP into dS in
/// place): `[dV = dout·P, dP = doutᵀ·v]`, then `[dQ = scale·k·dSᵀ, dK = scale·q·dS]`.
pub fn attention_backward_gemms(a: &AttnGeom, qkv: u64, probs: u64, dout: u64, dqkv: u64, dp: u64) -> [Vec<Gemm>; 2] {
    let (t, ch) = (a.t, a.ch);
    let scale = 1.0 / (ch as f32).sqrt();
    let (bases, count, offs, stride) = attn_layout(a);
    let at = |base: u64, off: usize, trans: bool| Operand { ptr: base + 4 * off as u64, trans, batch_stride: stride };
    let item = |base: u64, ci: usize, size: usize, trans: bool| Operand { ptr: base + 4 * (ci * count * size) as u64, trans, batch_stride: size as i64 };
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for (ci, &b0) in bases.iter().enumerate() {
        let d_out = item(dout, ci, ch * t, false);
        let p = item(probs, ci, t * t, false);
        let dpp = item(dp, ci, t * t, false);
        first.push(Gemm { m: ch, n: t, k: t, a: d_out, b: p, c: at(dqkv, b0 + offs[2], false).ptr, c_stride: stride, alpha: 1.0, beta: 0.0, batch: count });
        first.push(Gemm { m: t, n: t, k: ch, a: Operand { trans: true, ..d_out }, b: at(qkv, b0 + offs[2], false), c: dpp.ptr, c_stride: (t * t) as i64, alpha: 1.0, beta: 0.0, batch: count });
        second.push(Gemm { m: ch, n: t, k: t, a: at(qkv, b0 + offs[1], false), b: Operand { trans: true, ..dpp }, c: at(dqkv, b0 + offs[0], false).ptr, c_stride: stride, alpha: scale, beta: 0.0, batch: count });
        second.push(Gemm { m: ch, n: t, k: t, a: at(qkv, b0 + offs[0], false), b: dpp, c: at(dqkv, b0 + offs[1], false).ptr, c_stride: stride, alpha: scale, beta: 0.0, batch: count });
    }
    [first, second]
}

/// torchcfm's QKV attention: `(out [B, C, T], probs [B·H, T, T])` (CPU: `attention_forward`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn attention(qkv: &Tensor, a: &AttnGeom) -> (Tensor, Tensor) {
    let g = gpu_of(&[qkv]);
    let (t, ch, bh) = (a.t, a.ch, a.b * a.heads);
    let probs = out(&g, &[bh, t, t], "attention");
    let o = out(&g, &[a.b, a.heads * ch, t], "attention");
    let [s, pv] = attention_forward_gemms(a, ptr(qkv), probs.ptr(), o.ptr());
    for op in &s {
        ck(run_gemm(&g, op), "attention");
    }
    ck(g.launch_rows("softmax_rows_f32", bh * t, &[Arg::Ptr(probs.ptr()), Arg::Ptr(probs.ptr()), Arg::I64((bh * t) as i64), Arg::I64(t as i64)]), "attention");
    for op in &pv {
        ck(run_gemm(&g, op), "attention");
    }
    (Tensor::from_gpu(o, &[a.b, a.heads * ch, t]), Tensor::from_gpu(probs, &[bh, t, t]))
}

/// `dqkv` from `dout` and the saved probabilities (CPU: `attention_backward`).
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn attention_backward(qkv: &Tensor, probs: &Tensor, dout: &Tensor, a: &AttnGeom) -> Tensor {
    let g = gpu_of(&[qkv]);
    let dout = on(&g, dout);
    let (t, bh) = (a.t, a.b * a.heads);
    let dqkv = out(&g, qkv.shape(), "attention_backward");
    let dp = out(&g, &[bh, t, t], "attention_backward");
    let [first, second] = attention_backward_gemms(a, ptr(qkv), ptr(probs), ptr(&dout), dqkv.ptr(), dp.ptr());
    for op in &first {
        ck(run_gemm(&g, op), "attention_backward");
    }
    ck(g.launch_rows("softmax_rows_backward_f32", bh * t, &[Arg::Ptr(ptr(probs)), Arg::Ptr(dp.ptr()), Arg::Ptr(dp.ptr()), Arg::I64((bh * t) as i64), Arg::I64(t as i64)]), "attention_backward");
    for op in &second {
        ck(run_gemm(&g, op), "attention_backward");
    }
    Tensor::from_gpu(dqkv, qkv.shape())
}

// ---------------------------------------------------------------- optimiser

/// One Adam update of `p` with gradient `gr` and moments `m`, `v`, all in place (CPU: `Adam::step`).
#[allow(clippy::too_many_arguments)]
#[cfg(any())] // interim: the Tensor-level op, replaced by the storage-level one at merge
pub fn adam_step(p: &mut Tensor, gr: &Tensor, m: &mut Tensor, v: &mut Tensor, step_size: f32, beta1: f32, beta2: f32, eps: f32, bc2_sqrt: f32, weight_decay: f32) {
    let g = gpu_of(&[p]);
    let gr = on(&g, gr);
    to_gpu_in_place(&g, m);
    to_gpu_in_place(&g, v);
    let n = p.numel();
    let pp = ck(p.gpu_buf_mut(), "adam").ptr();
    let mp = ck(m.gpu_buf_mut(), "adam").ptr();
    let vp = ck(v.gpu_buf_mut(), "adam").ptr();
    let a = [
        Arg::Ptr(pp),
        Arg::Ptr(ptr(&gr)),
        Arg::Ptr(mp),
        Arg::Ptr(vp),
        Arg::I64(n as i64),
        Arg::F32(step_size),
        Arg::F32(beta1),
        Arg::F32(beta2),
        Arg::F32(eps),
        Arg::F32(bc2_sqrt),
        Arg::F32(weight_decay),
    ];
    ck(g.launch_n("adam_step_f32", n, &a), "adam");
}

#[cfg(test)]
mod tests {
    //! The host-side logic of the GEMM-based ops, checked without a GPU: each [`Gemm`] is turned
    //! into its cuBLAS call and executed by a reference column-major GEMM over a flat memory
    //! (addresses are byte offsets into it), then compared with the CPU backend.
    use super::*;
    use crate::backend::cpu::attention::{attention_backward as cpu_attn_bwd, attention_forward as cpu_attn_fwd};
    use crate::backend::cpu::elementwise::{softmax_rows as cpu_softmax, softmax_rows_backward as cpu_softmax_bwd};
    use crate::rng::Rng;

    /// cuBLAS' `sgemm(_strided_batched)` semantics, column-major, on host memory.
    fn emulate(mem: &mut [f32], c: &CublasCall) {
        for bi in 0..c.batch {
            let ao = (c.a / 4) as i64 + bi as i64 * c.stride_a;
            let bo = (c.b / 4) as i64 + bi as i64 * c.stride_b;
            let co = (c.c / 4) as i64 + bi as i64 * c.stride_c;
            for j in 0..c.n {
                for i in 0..c.m {
                    let mut acc = 0.0f64;
                    for p in 0..c.k {
                        let ai = if c.trans_a { p + i * c.lda } else { i + p * c.lda };
                        let bj = if c.trans_b { j + p * c.ldb } else { p + j * c.ldb };
                        acc += mem[(ao + ai as i64) as usize] as f64 * mem[(bo + bj as i64) as usize] as f64;
                    }
                    let ci = (co + (i + j * c.ldc) as i64) as usize;
                    let old = if c.beta == 0.0 { 0.0 } else { c.beta * mem[ci] };
                    mem[ci] = c.alpha * acc as f32 + old;
                }
            }
        }
    }

    fn run(mem: &mut [f32], ops: &[Gemm]) {
        for op in ops {
            emulate(mem, &op.cublas());
        }
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        let e = crate::util::rel_err(a, b);
        assert!(e < 1e-5, "{what}: rel err {e:e}");
    }

    #[test]
    fn row_major_gemm_maps_to_cublas_for_every_transpose() {
        let mut r = Rng::new(1);
        let (m, n, k) = (5usize, 7usize, 3usize);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = r.normal_vec(m * k); // stored [m,k], or [k,m] when ta
            let b = r.normal_vec(k * n); // stored [k,n], or [n,k] when tb
            let c0 = r.normal_vec(m * n);
            let mut mem = [a.clone(), b.clone(), c0.clone()].concat();
            let op = Gemm {
                m,
                n,
                k,
                a: Operand { ptr: 0, trans: ta, batch_stride: 0 },
                b: Operand { ptr: 4 * (m * k) as u64, trans: tb, batch_stride: 0 },
                c: 4 * (m * k + k * n) as u64,
                c_stride: 0,
                alpha: 0.5,
                beta: 1.0,
                batch: 1,
            };
            run(&mut mem, &[op]);
            let want: Vec<f32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    let s: f32 = (0..k).map(|p| (if ta { a[p * m + i] } else { a[i * k + p] }) * (if tb { b[j * k + p] } else { b[p * n + j] })).sum();
                    0.5 * s + c0[idx]
                })
                .collect();
            close(&mem[m * k + k * n..], &want, &format!("ta={ta} tb={tb}"));
        }
    }

    fn attention_case(order: QkvOrder) {
        let mut r = Rng::new(2);
        let a = AttnGeom { b: 2, heads: 3, ch: 4, t: 5, order };
        let (c, t, bh) = (a.heads * a.ch, a.t, a.b * a.heads);
        let qkv = r.normal_vec(a.b * 3 * c * t);
        let dout = r.normal_vec(a.b * c * t);
        // memory: qkv | probs | out | dout | dqkv | dp
        let sizes = [qkv.len(), bh * t * t, a.b * c * t, dout.len(), qkv.len(), bh * t * t];
        let mut at = vec![0usize];
        for s in sizes {
            at.push(at.last().unwrap() + s);
        }
        let mut mem = vec![f32::NAN; at[6]];
        mem[at[0]..at[1]].copy_from_slice(&qkv);
        mem[at[3]..at[4]].copy_from_slice(&dout);
        let addr = |i: usize| 4 * at[i] as u64;
        let [s, pv] = attention_forward_gemms(&a, addr(0), addr(1), addr(2));
        run(&mut mem, &s);
        let p = cpu_softmax(&mem[at[1]..at[2]], t);
        mem[at[1]..at[2]].copy_from_slice(&p);
        run(&mut mem, &pv);
        let (want_out, want_p) = cpu_attn_fwd(&qkv, &a);
        close(&mem[at[1]..at[2]], &want_p, &format!("{order:?} probabilities"));
        close(&mem[at[2]..at[3]], &want_out, &format!("{order:?} output"));
        let [first, second] = attention_backward_gemms(&a, addr(0), addr(1), addr(3), addr(4), addr(5));
        run(&mut mem, &first);
        let ds = cpu_softmax_bwd(&mem[at[1]..at[2]], &mem[at[5]..at[6]], t);
        mem[at[5]..at[6]].copy_from_slice(&ds);
        run(&mut mem, &second);
        let want_d = cpu_attn_bwd(&qkv, &want_p, &dout, &a);
        assert!(mem[at[4]..at[5]].iter().all(|v| v.is_finite()), "{order:?}: dqkv has unwritten elements");
        close(&mem[at[4]..at[5]], &want_d, &format!("{order:?} dqkv"));
    }

    #[test]
    fn attention_gemm_plan_matches_the_cpu_legacy_order() {
        attention_case(QkvOrder::Legacy);
    }

    #[test]
    fn attention_gemm_plan_matches_the_cpu_new_order() {
        attention_case(QkvOrder::New);
    }
}
