//! The engine's ops on a GPU at the `Tensor` level, f32 (legacy: the old autograd calls them
//! until the engine core moves to `BackendStorage`, whose CUDA implementation is `storage.rs`
//! over `f32ops.rs`, `linalg.rs` and `conv.rs`). Each function mirrors a CPU twin in
//! `backend/cpu` (named in its comment) and launches the kernels of `kernels/*.cu`, cuBLAS
//! (GEMMs, TF32 off unless allowed) or cuDNN (see `conv.rs`). Inputs on the CPU are uploaded to
//! the other input's GPU (constants such as loss weights); outputs are new pool buffers.
//!
//! Failures inside an op (out of memory, a driver error) panic with the op's name: ops return
//! values, not `Result`s, as on the CPU. The kernel argument structs and the GEMM plumbing live
//! in `kargs.rs` and `gemm.rs` (re-exported here).

use std::sync::Arc;

use anyhow::Result;

pub use super::gemm::{CublasCall, Gemm, Operand, attention_backward_gemms, attention_forward_gemms, gemm, run_gemm};
use super::gpu::{Arg, Gpu, GpuBuf, Launch};
pub use super::kargs::{BinGeom, ReduceGeom, Strided};
use crate::backend::geom::AttnGeom;
use crate::backend::geom::broadcast_strides;
use crate::tensor::{Device, Tensor};

/// Unwrap an op's result; a GPU failure inside an op panics with its name.
pub(crate) fn ck<T>(r: Result<T>, op: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA op {op} failed: {e:#}"))
}

/// The GPU of the first CUDA tensor among `ts`.
pub fn gpu_of(ts: &[&Tensor]) -> Arc<Gpu> {
    for t in ts {
        if let Some(b) = t.gpu_buf() {
            return b.gpu().clone();
        }
    }
    panic!("a CUDA op got no tensor on a GPU")
}

/// `t` on `g` (uploaded if it is on the CPU).
pub fn on(g: &Arc<Gpu>, t: &Tensor) -> Tensor {
    match t.gpu_buf() {
        Some(b) if b.gpu().ordinal == g.ordinal => t.clone(),
        _ => ck(t.to_device(Device::Cuda(g.ordinal)), "upload"),
    }
}

fn ptr(t: &Tensor) -> u64 {
    t.gpu_buf().expect("tensor on the GPU").ptr()
}

fn out(g: &Arc<Gpu>, shape: &[usize], op: &str) -> GpuBuf {
    ck(g.alloc(shape.iter().product()), op)
}

// ---------------------------------------------------------------- element-wise

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
pub fn unary(x: &Tensor, op: Un, s: f32) -> Tensor {
    let g = gpu_of(&[x]);
    let n = x.numel();
    let y = out(&g, x.shape(), "unary");
    ck(g.launch_n("unary_f32", n, &[Arg::I64(op as i64), Arg::F32(s), Arg::Ptr(ptr(x)), Arg::Ptr(y.ptr()), Arg::I64(n as i64)]), "unary");
    Tensor::from_gpu(y, x.shape())
}

/// The input gradient of `unary(x, op)` given its output `y` and output gradient `gy`.
pub fn unary_backward(op: Un, gy: &Tensor, x: &Tensor, y: &Tensor) -> Tensor {
    let g = gpu_of(&[gy, x, y]);
    let (gy, x, y) = (on(&g, gy), on(&g, x), on(&g, y));
    let n = gy.numel();
    let dx = out(&g, gy.shape(), "unary_backward");
    ck(g.launch_n("unary_backward_f32", n, &[Arg::I64(op as i64), Arg::Ptr(ptr(&gy)), Arg::Ptr(ptr(&x)), Arg::Ptr(ptr(&y)), Arg::Ptr(dx.ptr()), Arg::I64(n as i64)]), "unary_backward");
    Tensor::from_gpu(dx, gy.shape())
}

/// A tensor of `shape` filled with `v` on `g`.
pub fn full(g: &Arc<Gpu>, shape: &[usize], v: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let y = out(g, shape, "full");
    ck(g.launch_n("fill_f32", n, &[Arg::Ptr(y.ptr()), Arg::F32(v), Arg::I64(n as i64)]), "full");
    Tensor::from_gpu(y, shape)
}

/// Move an in-place target onto `g` (if it is on the CPU or another GPU).
fn to_gpu_in_place(g: &Arc<Gpu>, t: &mut Tensor) {
    if !matches!(t.gpu_buf(), Some(b) if b.gpu().ordinal == g.ordinal) {
        *t = on(g, t);
    }
}

/// `y ← a·x + b·y` in place (copying `y`'s buffer first if it is shared; a `y` on the CPU is
/// moved to `x`'s GPU first).
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
pub fn scale_in_place(x: &mut Tensor, s: f32) {
    let g = gpu_of(&[x]);
    let n = x.numel() as i64;
    let p = ck(x.gpu_buf_mut(), "scale").ptr();
    ck(g.launch_n("unary_f32", n as usize, &[Arg::I64(Un::MulScalar as i64), Arg::F32(s), Arg::Ptr(p), Arg::Ptr(p), Arg::I64(n)]), "scale");
}

// ---------------------------------------------------------------- reductions and layout

/// `x` (of shape `from`) summed down to `to` (CPU: `elementwise::sum_to_shape`).
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
pub fn gather_strided(x: &Tensor, shape: &[usize], strides: &[usize]) -> Tensor {
    let g = gpu_of(&[x]);
    let n: usize = shape.iter().product();
    let s = Strided::new(shape, strides);
    let y = out(&g, shape, "gather");
    ck(g.launch_n("gather_strided_f32", n, &[Arg::Ptr(ptr(x)), Arg::Ptr(y.ptr()), Arg::I64(n as i64), Arg::Struct(&s)]), "gather");
    Tensor::from_gpu(y, shape)
}

/// `x` of shape `from` repeated to `to` (CPU: `broadcast_to`).
pub fn broadcast_to(x: &Tensor, from: &[usize], to: &[usize]) -> Tensor {
    if from == to {
        return x.reshape(to);
    }
    gather_strided(x, to, &broadcast_strides(from, to))
}

/// Sum of squares of every element of every tensor (f64), one download for all.
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
        ck(g.launch("sum_squares_partial_f32", Launch::linear(BLOCKS as u32, 256).any_block(), &[Arg::Ptr(ptr(&t)), Arg::I64(t.numel() as i64), Arg::Ptr(partial.ptr() + (i * BLOCKS * 8) as u64)]), "sum_squares");
    }
    let words = ck(g.download(&partial), "sum_squares");
    words.chunks(2).map(|w| f64::from_bits(w[0].to_bits() as u64 | ((w[1].to_bits() as u64) << 32))).sum()
}

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
pub fn softmax_rows(x: &Tensor, n: usize) -> Tensor {
    rows_op("softmax_rows_f32", x, None, n)
}
/// CPU: `softmax_rows_backward`.
pub fn softmax_rows_backward(y: &Tensor, dy: &Tensor, n: usize) -> Tensor {
    rows_op("softmax_rows_backward_f32", y, Some(dy), n)
}
/// Log-softmax over rows of `n` (CPU: `ops::log_softmax`).
pub fn log_softmax_rows(x: &Tensor, n: usize) -> Tensor {
    rows_op("log_softmax_rows_f32", x, None, n)
}
/// `dx = g − exp(y)·Σg` per row, `y` the log-probabilities.
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
pub fn narrow_backward(gy: &Tensor, shape: &[usize], axis: usize, start: usize, len: usize) -> Tensor {
    let g = gpu_of(&[gy]);
    let (outer, inner) = outer_inner(shape, axis);
    let y = full(&g, shape, 0.0);
    copy_slab(&g, ptr(gy), ptr(&y), outer, len * inner, len * inner, 0, shape[axis] * inner, start * inner);
    y
}

fn image_op(name: &'static str, x: &Tensor, out_shape: &[usize], nc: usize, h: usize, w: usize) -> Tensor {
    let g = gpu_of(&[x]);
    let y = out(&g, out_shape, name);
    let n = out_shape.iter().product::<usize>();
    ck(g.launch_n(name, n, &[Arg::Ptr(ptr(x)), Arg::Ptr(y.ptr()), Arg::I64(nc as i64), Arg::I64(h as i64), Arg::I64(w as i64)]), name);
    Tensor::from_gpu(y, out_shape)
}

/// Nearest 2× upsampling of `[N, C, H, W]`.
pub fn upsample2x(x: &Tensor) -> Tensor {
    let s = x.shape();
    image_op("upsample2x_f32", x, &[s[0], s[1], 2 * s[2], 2 * s[3]], s[0] * s[1], s[2], s[3])
}
/// Its gradient: `gy [N, C, 2H, 2W] → [N, C, H, W]` (`in_shape`).
pub fn upsample2x_backward(gy: &Tensor, in_shape: &[usize]) -> Tensor {
    let s = in_shape;
    image_op("upsample2x_backward_f32", gy, s, s[0] * s[1], s[2], s[3])
}
/// 2×2 average pooling, stride 2.
pub fn avgpool2x(x: &Tensor) -> Tensor {
    let s = x.shape();
    image_op("avgpool2x_f32", x, &[s[0], s[1], s[2] / 2, s[3] / 2], s[0] * s[1], s[2], s[3])
}
/// Its gradient, to `in_shape`.
pub fn avgpool2x_backward(gy: &Tensor, in_shape: &[usize]) -> Tensor {
    let s = in_shape;
    image_op("avgpool2x_backward_f32", gy, s, s[0] * s[1], s[2], s[3])
}

/// Row `ids[r]` of `w [num, dim]` for each r.
pub fn embedding(w: &Tensor, ids: &[usize]) -> Tensor {
    let g = gpu_of(&[w]);
    let dim = w.shape()[1];
    let idb = ck(g.upload_i32(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>()), "embedding");
    let y = out(&g, &[ids.len(), dim], "embedding");
    ck(g.launch_n("embedding_forward_f32", ids.len() * dim, &[Arg::Ptr(ptr(w)), Arg::Ptr(idb.ptr()), Arg::Ptr(y.ptr()), Arg::I64(ids.len() as i64), Arg::I64(dim as i64)]), "embedding");
    Tensor::from_gpu(y, &[ids.len(), dim])
}

/// The weight gradient of [`embedding`].
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
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f32) -> Tensor {
    let g = gpu_of(&[t]);
    let b = t.numel();
    let y = out(&g, &[b, dim], "timestep_embedding");
    let lmp = (max_period as f64).ln() as f32;
    ck(g.launch_n("timestep_embedding_f32", b * dim, &[Arg::Ptr(ptr(t)), Arg::Ptr(y.ptr()), Arg::I64(b as i64), Arg::I64(dim as i64), Arg::F32(lmp)]), "timestep_embedding");
    Tensor::from_gpu(y, &[b, dim])
}

/// Its gradient with respect to `t`, from the embedding `emb` and its gradient.
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
pub fn add_channel_bias(y: &mut Tensor, bias: &Tensor) {
    let g = gpu_of(&[y]);
    let bias = on(&g, bias);
    let s = y.shape().to_vec();
    let (n, c, sp) = (s[0], s[1], s[2..].iter().product::<usize>());
    let yp = ck(y.gpu_buf_mut(), "bias").ptr();
    ck(g.launch_n("add_channel_bias_f32", n * c * sp, &[Arg::Ptr(yp), Arg::Ptr(ptr(&bias)), Arg::I64(n as i64), Arg::I64(c as i64), Arg::I64(sp as i64)]), "bias");
}

// ---------------------------------------------------------------- GEMM (cuBLAS)

impl Operand {
    pub fn n(t: &Tensor) -> Operand {
        Operand { ptr: ptr(t), trans: false, batch_stride: 0 }
    }
    pub fn t(t: &Tensor) -> Operand {
        Operand { ptr: ptr(t), trans: true, batch_stride: 0 }
    }
}

/// `a [M, K] · b [K, N]` with optional transposes of the stored matrices: `ta` means `a` is
/// stored `[K, M]`, `tb` that `b` is stored `[N, K]`.
#[allow(clippy::too_many_arguments)]
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

/// torchcfm's QKV attention: `(out [B, C, T], probs [B·H, T, T])` (CPU: `attention_forward`).
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
pub fn adam_step(p: &mut Tensor, gr: &Tensor, m: &mut Tensor, v: &mut Tensor, step_size: f32, beta1: f32, beta2: f32, eps: f32, bc2_sqrt: f32, weight_decay: f32) {
    let g = gpu_of(&[p]);
    let gr = on(&g, gr);
    to_gpu_in_place(&g, m);
    to_gpu_in_place(&g, v);
    let n = p.numel();
    let pp = ck(p.gpu_buf_mut(), "adam").ptr();
    let mp = ck(m.gpu_buf_mut(), "adam").ptr();
    let vp = ck(v.gpu_buf_mut(), "adam").ptr();
    let a = [Arg::Ptr(pp), Arg::Ptr(ptr(&gr)), Arg::Ptr(mp), Arg::Ptr(vp), Arg::I64(n as i64), Arg::F32(step_size), Arg::F32(beta1), Arg::F32(beta2), Arg::F32(eps), Arg::F32(bc2_sqrt), Arg::F32(weight_decay)];
    ck(g.launch_n("adam_step_f32", n, &a), "adam");
}
