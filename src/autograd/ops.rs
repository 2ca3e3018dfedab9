//! Differentiable ops. Each computes its value with the CPU backend and records its backward.

use anyhow::{Result, bail};

use super::Var;
use crate::backend::cpu::attention::{AttnGeom, QkvOrder, attention_backward, attention_forward};
use crate::backend::cpu::conv::{ConvGeom, conv2d_backward, conv2d_forward};
use crate::backend::cpu::elementwise as ew;
use crate::backend::cpu::gemm::{Mat, sgemm, threads_for};
use crate::backend::cpu::norm::{group_norm_backward, group_norm_forward};
use crate::backend::cpu::{PAR_MIN, simd};
use crate::backend::cuda::ops::{self as gpu, Bin, Un};
use crate::rng::Rng;
use crate::tensor::Tensor;

fn t(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape)
}

/// Whether an op runs on the GPU: when any of its inputs is there (CPU inputs are uploaded).
fn on_gpu(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.is_cuda())
}

// ---------------------------------------------------------------- elementwise, broadcasting

fn broadcast(a: &Var, b: &Var, what: &str) -> Vec<usize> {
    let (sa, sb) = (a.shape(), b.shape());
    ew::broadcast_shape(&sa, &sb).unwrap_or_else(|| panic!("{what}: shapes {sa:?} and {sb:?} do not broadcast"))
}

/// The gradient of a broadcast operand: `g` summed down to `to` (shared, not copied, when no
/// broadcasting happened).
fn reduce_to(g: &Tensor, from: &[usize], to: &[usize]) -> Tensor {
    if from == to {
        g.clone()
    } else if g.is_cuda() {
        gpu::sum_to_shape(g, from, to)
    } else {
        t(ew::sum_to_shape(g.data(), from, to), to)
    }
}

/// The broadcast binary op on the GPU, or `f` on the CPU.
fn bin(a: &Tensor, b: &Tensor, out: &[usize], op: Bin, f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Tensor {
    if on_gpu(&[a, b]) { gpu::binary(a, b, out, op) } else { t(ew::binary(a.data(), a.shape(), b.data(), b.shape(), out, f), out) }
}

/// `a + b` with NumPy broadcasting.
pub fn add(a: &Var, b: &Var) -> Var {
    let out = broadcast(a, b, "add");
    let (av, bv) = (a.value(), b.value());
    let v = bin(&av, &bv, &out, Bin::Add, |x, y| x + y);
    let (sa, sb, so) = (a.shape(), b.shape(), out.clone());
    Var::from_op(v, vec![a.clone(), b.clone()], "add", move |g| vec![Some(reduce_to(g, &so, &sa)), Some(reduce_to(g, &so, &sb))])
}

/// `a − b` with broadcasting.
pub fn sub(a: &Var, b: &Var) -> Var {
    let out = broadcast(a, b, "sub");
    let (av, bv) = (a.value(), b.value());
    let v = bin(&av, &bv, &out, Bin::Sub, |x, y| x - y);
    let (sa, sb, so) = (a.shape(), b.shape(), out.clone());
    Var::from_op(v, vec![a.clone(), b.clone()], "sub", move |g| {
        if g.is_cuda() {
            return vec![Some(reduce_to(g, &so, &sa)), Some(gpu::unary(&reduce_to(g, &so, &sb), Un::Neg, 0.0))];
        }
        let gb: Vec<f32> = ew::sum_to_shape(g.data(), &so, &sb).into_iter().map(|v| -v).collect();
        vec![Some(reduce_to(g, &so, &sa)), Some(t(gb, &sb))]
    })
}

/// `a ⊙ b` with broadcasting.
pub fn mul(a: &Var, b: &Var) -> Var {
    let out = broadcast(a, b, "mul");
    let (av, bv) = (a.value(), b.value());
    let v = bin(&av, &bv, &out, Bin::Mul, |x, y| x * y);
    let (sa, sb, so) = (a.shape(), b.shape(), out.clone());
    let (ra, rb) = (a.requires_grad(), b.requires_grad());
    Var::from_op(v, vec![a.clone(), b.clone()], "mul", move |g| {
        if on_gpu(&[g, &av, &bv]) {
            let ga = ra.then(|| reduce_to(&gpu::binary(g, &bv, &so, Bin::Mul), &so, &sa));
            let gb = rb.then(|| reduce_to(&gpu::binary(g, &av, &so, Bin::Mul), &so, &sb));
            return vec![ga, gb];
        }
        let ga = ra.then(|| {
            let p = ew::binary(g.data(), &so, bv.data(), &sb, &so, |x, y| x * y);
            t(ew::sum_to_shape(&p, &so, &sa), &sa)
        });
        let gb = rb.then(|| {
            let p = ew::binary(g.data(), &so, av.data(), &sa, &so, |x, y| x * y);
            t(ew::sum_to_shape(&p, &so, &sb), &sb)
        });
        vec![ga, gb]
    })
}

/// `a / b` with broadcasting.
pub fn div(a: &Var, b: &Var) -> Var {
    let out = broadcast(a, b, "div");
    let (av, bv) = (a.value(), b.value());
    let v = bin(&av, &bv, &out, Bin::Div, |x, y| x / y);
    let (sa, sb, so) = (a.shape(), b.shape(), out.clone());
    let (ra, rb) = (a.requires_grad(), b.requires_grad());
    let yv = v.clone();
    Var::from_op(v, vec![a.clone(), b.clone()], "div", move |g| {
        if on_gpu(&[g, &av, &bv]) {
            let ga = ra.then(|| reduce_to(&gpu::binary(g, &bv, &so, Bin::Div), &so, &sa));
            // d(a/b)/db = −(a/b)/b
            let gb = rb.then(|| {
                let q = gpu::unary(&gpu::binary(&yv, &bv, &so, Bin::Div), Un::Neg, 0.0);
                reduce_to(&gpu::binary(g, &q, &so, Bin::Mul), &so, &sb)
            });
            return vec![ga, gb];
        }
        let ga = ra.then(|| {
            let p = ew::binary(g.data(), &so, bv.data(), &sb, &so, |x, y| x / y);
            t(ew::sum_to_shape(&p, &so, &sa), &sa)
        });
        let gb = rb.then(|| {
            // d(a/b)/db = −(a/b)/b
            let q = ew::binary(yv.data(), &so, bv.data(), &sb, &so, |y, b| -y / b);
            let p = ew::zip_map(g.data(), &q, |x, y| x * y);
            t(ew::sum_to_shape(&p, &so, &sb), &sb)
        });
        vec![ga, gb]
    })
}

/// `x + s`.
pub fn add_scalar(x: &Var, s: f32) -> Var {
    let xv = x.value();
    let y = if xv.is_cuda() { gpu::unary(&xv, Un::AddScalar, s) } else { t(ew::map(xv.data(), |v| v + s), xv.shape()) };
    Var::from_op(y, vec![x.clone()], "add_scalar", |g| vec![Some(g.clone())])
}

/// `x · s`.
pub fn mul_scalar(x: &Var, s: f32) -> Var {
    let xv = x.value();
    let y = if xv.is_cuda() { gpu::unary(&xv, Un::MulScalar, s) } else { t(ew::map(xv.data(), |v| v * s), xv.shape()) };
    Var::from_op(y, vec![x.clone()], "mul_scalar", move |g| {
        if g.is_cuda() {
            return vec![Some(gpu::unary(g, Un::MulScalar, s))];
        }
        vec![Some(t(ew::map(g.data(), |v| v * s), g.shape()))]
    })
}

/// Unary op with derivative `dfdx(x, y)`.
fn unary(x: &Var, name: &'static str, code: Un, f: impl Fn(f32) -> f32 + Sync + Send, dfdx: impl Fn(f32, f32) -> f32 + Sync + Send + 'static) -> Var {
    let xv = x.value();
    if xv.is_cuda() {
        let y = gpu::unary(&xv, code, 0.0);
        let yv = y.clone();
        return Var::from_op(y, vec![x.clone()], name, move |g| vec![Some(gpu::unary_backward(code, g, &xv, &yv))]);
    }
    let y = t(ew::map(xv.data(), f), xv.shape());
    let yv = y.clone();
    Var::from_op(y, vec![x.clone()], name, move |g| {
        let d = ew::zip3_map(g.data(), xv.data(), yv.data(), |g, x, y| g * dfdx(x, y));
        vec![Some(t(d, g.shape()))]
    })
}

/// `x · σ(x)`.
pub fn silu(x: &Var) -> Var {
    let xv = x.value();
    if xv.is_cuda() {
        let y = gpu::unary(&xv, Un::Silu, 0.0);
        let yv = y.clone();
        return Var::from_op(y, vec![x.clone()], "silu", move |g| vec![Some(gpu::unary_backward(Un::Silu, g, &xv, &yv))]);
    }
    let y = t(par_unary(xv.data(), simd::silu), xv.shape());
    Var::from_op(y, vec![x.clone()], "silu", move |g| {
        let mut dx = vec![0.0f32; g.numel()];
        let chunk = PAR_MIN;
        if dx.len() >= 2 * chunk {
            use rayon::prelude::*;
            dx.par_chunks_mut(chunk).zip(xv.data().par_chunks(chunk)).zip(g.data().par_chunks(chunk)).for_each(|((o, x), g)| simd::silu_backward(x, g, o));
        } else {
            simd::silu_backward(xv.data(), g.data(), &mut dx);
        }
        vec![Some(t(dx, g.shape()))]
    })
}

/// Logistic sigmoid.
pub fn sigmoid(x: &Var) -> Var {
    let xv = x.value();
    if xv.is_cuda() {
        let y = gpu::unary(&xv, Un::Sigmoid, 0.0);
        let yv = y.clone();
        return Var::from_op(y, vec![x.clone()], "sigmoid", move |g| vec![Some(gpu::unary_backward(Un::Sigmoid, g, &xv, &yv))]);
    }
    let y = t(par_unary(xv.data(), simd::sigmoid), xv.shape());
    let yv = y.clone();
    Var::from_op(y, vec![x.clone()], "sigmoid", move |g| vec![Some(t(ew::zip_map(g.data(), yv.data(), |g, y| g * y * (1.0 - y)), g.shape()))])
}

/// `out = f(x)` for a slice kernel, in parallel chunks for large inputs.
fn par_unary(x: &[f32], f: fn(&[f32], &mut [f32])) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    if x.len() >= 2 * PAR_MIN {
        use rayon::prelude::*;
        y.par_chunks_mut(PAR_MIN).zip(x.par_chunks(PAR_MIN)).for_each(|(o, i)| f(i, o));
    } else {
        f(x, &mut y);
    }
    y
}

/// `exp(x)`.
pub fn exp(x: &Var) -> Var {
    unary(x, "exp", Un::Exp, f32::exp, |_, y| y)
}

/// `max(x, 0)`.
pub fn relu(x: &Var) -> Var {
    unary(x, "relu", Un::Relu, |v| v.max(0.0), |x, _| if x > 0.0 { 1.0 } else { 0.0 })
}

/// `x²`.
pub fn square(x: &Var) -> Var {
    unary(x, "square", Un::Square, |v| v * v, |x, _| 2.0 * x)
}

/// Softmax over the last axis.
pub fn softmax(x: &Var) -> Var {
    let xv = x.value();
    let n = *xv.shape().last().expect("softmax of a scalar");
    if xv.is_cuda() {
        let y = gpu::softmax_rows(&xv, n);
        let yv = y.clone();
        return Var::from_op(y, vec![x.clone()], "softmax", move |g| vec![Some(gpu::softmax_rows_backward(&yv, g, n))]);
    }
    let y = t(ew::softmax_rows(xv.data(), n), xv.shape());
    let yv = y.clone();
    Var::from_op(y, vec![x.clone()], "softmax", move |g| vec![Some(t(ew::softmax_rows_backward(yv.data(), g.data(), n), g.shape()))])
}

// ---------------------------------------------------------------- reductions

/// Sum over all elements (a scalar of shape `[]`).
pub fn sum_all(x: &Var) -> Var {
    let xv = x.value();
    if xv.is_cuda() {
        let shape = xv.shape().to_vec();
        let s = gpu::sum_to_shape(&xv, &shape, &[]);
        return Var::from_op(s, vec![x.clone()], "sum_all", move |g| vec![Some(gpu::broadcast_to(g, &[], &shape))]);
    }
    let s = xv.sum() as f32;
    let shape = xv.shape().to_vec();
    Var::from_op(Tensor::scalar(s), vec![x.clone()], "sum_all", move |g| vec![Some(Tensor::full(&shape, g.item()))])
}

/// Mean over all elements.
pub fn mean_all(x: &Var) -> Var {
    let n = x.value().numel() as f32;
    mul_scalar(&sum_all(x), 1.0 / n)
}

/// Sum over `axes`; `keepdim` keeps them as size 1.
pub fn sum_axes(x: &Var, axes: &[usize], keepdim: bool) -> Var {
    let xv = x.value();
    let shape = xv.shape().to_vec();
    for &a in axes {
        assert!(a < shape.len(), "sum_axes: axis {a} out of range for {shape:?}");
    }
    let kept: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let out_shape: Vec<usize> = if keepdim { kept.clone() } else { shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect() };
    if xv.is_cuda() {
        let v = gpu::sum_to_shape(&xv, &shape, &kept).reshape(&out_shape);
        return Var::from_op(v, vec![x.clone()], "sum_axes", move |g| vec![Some(gpu::broadcast_to(g, &kept, &shape))]);
    }
    let (v, kept) = ew::sum_axes_keepdim(xv.data(), &shape, axes);
    Var::from_op(t(v, &out_shape), vec![x.clone()], "sum_axes", move |g| vec![Some(t(ew::broadcast_to(g.data(), &kept, &shape), &shape))])
}

/// Mean over `axes`.
pub fn mean_axes(x: &Var, axes: &[usize], keepdim: bool) -> Var {
    let shape = x.shape();
    let n: usize = axes.iter().map(|&a| shape[a]).product();
    mul_scalar(&sum_axes(x, axes, keepdim), 1.0 / n as f32)
}

/// Mean-square error `mean((a − b)²)` over all elements.
pub fn mse_loss(a: &Var, b: &Var) -> Var {
    mean_all(&square(&sub(a, b)))
}

/// Log-softmax over the last axis (stable: shifted by the row maximum).
pub fn log_softmax(x: &Var) -> Var {
    let xv = x.value();
    let n = *xv.shape().last().expect("log_softmax of a scalar");
    if xv.is_cuda() {
        let y = gpu::log_softmax_rows(&xv, n);
        let yv = y.clone();
        return Var::from_op(y, vec![x.clone()], "log_softmax", move |g| vec![Some(gpu::log_softmax_rows_backward(&yv, g, n))]);
    }
    let mut y = xv.to_vec();
    for row in y.chunks_mut(n) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row.iter().map(|&v| ((v - m) as f64).exp()).sum::<f64>().ln() as f32;
        row.iter_mut().for_each(|v| *v -= lse);
    }
    let y = t(y, xv.shape());
    let yv = y.clone();
    Var::from_op(y, vec![x.clone()], "log_softmax", move |g| {
        // dx = g − softmax · Σ g
        let mut dx = g.to_vec();
        for (d, yr) in dx.chunks_mut(n).zip(yv.data().chunks(n)) {
            let s: f32 = d.iter().sum();
            d.iter_mut().zip(yr).for_each(|(d, &l)| *d -= l.exp() * s);
        }
        vec![Some(t(dx, g.shape()))]
    })
}

/// Mean cross-entropy of `logits [N, K]` against class indices (`F.cross_entropy`).
pub fn cross_entropy(logits: &Var, labels: &[usize]) -> Result<Var> {
    let sh = logits.shape();
    if sh.len() != 2 || sh[0] != labels.len() {
        bail!("cross_entropy: logits {sh:?} for {} labels", labels.len());
    }
    if let Some(&bad) = labels.iter().find(|&&c| c >= sh[1]) {
        bail!("cross_entropy: label {bad} out of range for {} classes", sh[1]);
    }
    let k = sh[1];
    let mut pick = vec![0.0f32; sh[0] * k];
    for (i, &c) in labels.iter().enumerate() {
        pick[i * k + c] = -1.0 / labels.len() as f32;
    }
    Ok(sum_all(&mul(&log_softmax(logits), &Var::constant(t(pick, &sh)))))
}

// ---------------------------------------------------------------- shape and data movement

/// Same data, new shape.
pub fn reshape(x: &Var, shape: &[usize]) -> Var {
    let xv = x.value();
    let old = xv.shape().to_vec();
    Var::from_op(xv.reshape(shape), vec![x.clone()], "reshape", move |g| vec![Some(g.reshape(&old))])
}

/// Permute axes (`out.shape[i] = x.shape[perm[i]]`).
pub fn permute(x: &Var, perm: &[usize]) -> Var {
    let xv = x.value();
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    Var::from_op(xv.permute(perm), vec![x.clone()], "permute", move |g| vec![Some(g.permute(&inv))])
}

/// Concatenate along `axis`.
pub fn concat(xs: &[Var], axis: usize) -> Var {
    let vals: Vec<Tensor> = xs.iter().map(|x| x.value()).collect();
    for v in &vals[1..] {
        let (a, b) = (vals[0].shape(), v.shape());
        assert!(a.len() == b.len() && a.iter().zip(b).enumerate().all(|(i, (x, y))| i == axis || x == y), "concat: shapes {a:?} and {b:?} differ off axis {axis}");
    }
    let sizes: Vec<usize> = vals.iter().map(|v| v.shape()[axis]).collect();
    let refs: Vec<&Tensor> = vals.iter().collect();
    if on_gpu(&refs) {
        let y = gpu::concat(&vals, axis);
        return Var::from_op(y, xs.to_vec(), "concat", move |g| {
            let mut start = 0;
            sizes
                .iter()
                .map(|&len| {
                    let piece = gpu::narrow(g, axis, start, len);
                    start += len;
                    Some(piece)
                })
                .collect()
        });
    }
    let parts: Vec<(&[f32], &[usize])> = vals.iter().map(|v| (v.data(), v.shape())).collect();
    let (data, shape) = ew::concat(&parts, axis);
    let out_shape = shape.clone();
    Var::from_op(t(data, &shape), xs.to_vec(), "concat", move |g| {
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let mut s = out_shape.clone();
                s[axis] = len;
                let piece = ew::narrow(g.data(), &out_shape, axis, start, len);
                start += len;
                Some(t(piece, &s))
            })
            .collect()
    })
}

/// The slice `[start, start+len)` along `axis`.
pub fn narrow(x: &Var, axis: usize, start: usize, len: usize) -> Var {
    let xv = x.value();
    let shape = xv.shape().to_vec();
    assert!(start + len <= shape[axis], "narrow out of range");
    let mut out = shape.clone();
    out[axis] = len;
    if xv.is_cuda() {
        return Var::from_op(gpu::narrow(&xv, axis, start, len), vec![x.clone()], "narrow", move |g| vec![Some(gpu::narrow_backward(g, &shape, axis, start, len))]);
    }
    Var::from_op(t(ew::narrow(xv.data(), &shape, axis, start, len), &out), vec![x.clone()], "narrow", move |g| vec![Some(t(ew::narrow_backward(g.data(), &shape, axis, start, len), &shape))])
}

/// Nearest-neighbour 2× upsampling of `[N, C, H, W]` (`F.interpolate(scale_factor=2, mode="nearest")`).
pub fn upsample_nearest2x(x: &Var) -> Var {
    let xv = x.value();
    let s = xv.shape().to_vec();
    assert_eq!(s.len(), 4, "upsample expects NCHW");
    if xv.is_cuda() {
        return Var::from_op(gpu::upsample2x(&xv), vec![x.clone()], "upsample", move |g| vec![Some(gpu::upsample2x_backward(g, &s))]);
    }
    let (nc, h, w) = (s[0] * s[1], s[2], s[3]);
    Var::from_op(t(ew::upsample_nearest2x(xv.data(), nc, h, w), &[s[0], s[1], 2 * h, 2 * w]), vec![x.clone()], "upsample", move |g| vec![Some(t(ew::upsample_nearest2x_backward(g.data(), nc, h, w), &s))])
}

/// 2×2 average pooling, stride 2 (`F.avg_pool2d(kernel_size=2, stride=2)`).
pub fn avg_pool2x(x: &Var) -> Var {
    let xv = x.value();
    let s = xv.shape().to_vec();
    assert_eq!(s.len(), 4, "avg_pool expects NCHW");
    if xv.is_cuda() {
        return Var::from_op(gpu::avgpool2x(&xv), vec![x.clone()], "avg_pool", move |g| vec![Some(gpu::avgpool2x_backward(g, &s))]);
    }
    let (nc, h, w) = (s[0] * s[1], s[2], s[3]);
    Var::from_op(t(ew::avg_pool2x(xv.data(), nc, h, w), &[s[0], s[1], h / 2, w / 2]), vec![x.clone()], "avg_pool", move |g| vec![Some(t(ew::avg_pool2x_backward(g.data(), nc, h, w), &s))])
}

/// Rows of `weight [num, dim]` picked by `ids` (an `nn.Embedding` lookup) → `[len(ids), dim]`.
pub fn embedding(weight: &Var, ids: &[usize]) -> Result<Var> {
    let wv = weight.value();
    let (num, dim) = (wv.shape()[0], wv.shape()[1]);
    if let Some(&bad) = ids.iter().find(|&&i| i >= num) {
        bail!("class label {bad} is out of range for an embedding of {num} classes");
    }
    if wv.is_cuda() {
        let ids = ids.to_vec();
        return Ok(Var::from_op(gpu::embedding(&wv, &ids), vec![weight.clone()], "embedding", move |g| vec![Some(gpu::embedding_backward(g, &ids, num))]));
    }
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &i in ids {
        out.extend_from_slice(&wv.data()[i * dim..(i + 1) * dim]);
    }
    let ids = ids.to_vec();
    Ok(Var::from_op(t(out, &[ids.len(), dim]), vec![weight.clone()], "embedding", move |g| {
        let mut gw = vec![0.0f32; num * dim];
        for (r, &i) in ids.iter().enumerate() {
            for (a, b) in gw[i * dim..(i + 1) * dim].iter_mut().zip(&g.data()[r * dim..(r + 1) * dim]) {
                *a += b;
            }
        }
        vec![Some(t(gw, &[num, dim]))]
    }))
}

/// Inverted dropout: zero with probability `p`, scale survivors by `1/(1−p)`. The mask comes from `rng`.
pub fn dropout(x: &Var, p: f32, rng: &mut Rng) -> Var {
    if p <= 0.0 {
        return x.clone();
    }
    let xv = x.value();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..xv.numel()).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
    if xv.is_cuda() {
        // the mask is drawn on the host from the same generator, so CPU and GPU runs drop the same units
        let m = gpu::on(&gpu::gpu_of(&[&xv]), &t(mask, xv.shape()));
        let shape = xv.shape().to_vec();
        return Var::from_op(gpu::binary(&xv, &m, &shape, Bin::Mul), vec![x.clone()], "dropout", move |g| vec![Some(gpu::binary(g, &m, &shape, Bin::Mul))]);
    }
    let y = ew::zip_map(xv.data(), &mask, |a, m| a * m);
    Var::from_op(t(y, xv.shape()), vec![x.clone()], "dropout", move |g| vec![Some(t(ew::zip_map(g.data(), &mask, |a, m| a * m), g.shape()))])
}

/// torchcfm's sinusoidal `timestep_embedding(t, dim)`: `t [B] → [B, dim]`, `[cos | sin]`.
pub fn timestep_embedding(tv: &Var, dim: usize) -> Var {
    let tt = tv.value();
    assert_eq!(tt.ndim(), 1, "timestep_embedding expects t of shape [B]");
    let b = tt.numel();
    if tt.is_cuda() {
        let emb = gpu::timestep_embedding(&tt, dim, 10000.0);
        let ev = emb.clone();
        return Var::from_op(emb, vec![tv.clone()], "timestep_embedding", move |g| vec![Some(gpu::timestep_embedding_backward(&ev, g, 10000.0))]);
    }
    let v = ew::timestep_embedding(tt.data(), dim, 10000.0);
    let half = dim / 2;
    let freqs = ew::timestep_freqs(half, 10000.0);
    let emb = t(v, &[b, dim]);
    let ev = emb.clone();
    Var::from_op(emb, vec![tv.clone()], "timestep_embedding", move |g| {
        // d cos(t f)/dt = −f sin(t f);  d sin(t f)/dt = f cos(t f)
        let (e, gd) = (ev.data(), g.data());
        let gt: Vec<f32> = (0..b)
            .map(|i| {
                let mut s = 0.0f64;
                for k in 0..half {
                    let (c, sn) = (e[i * dim + k], e[i * dim + half + k]);
                    s += (gd[i * dim + k] * -freqs[k] * sn + gd[i * dim + half + k] * freqs[k] * c) as f64;
                }
                s as f32
            })
            .collect();
        vec![Some(t(gt, &[b]))]
    })
}

// ---------------------------------------------------------------- matmul, linear, conv

/// `a [M, K] · b [K, N]`.
pub fn matmul(a: &Var, b: &Var) -> Var {
    let (av, bv) = (a.value(), b.value());
    assert!(av.ndim() == 2 && bv.ndim() == 2 && av.shape()[1] == bv.shape()[0], "matmul {:?} x {:?}", av.shape(), bv.shape());
    let (m, k, n) = (av.shape()[0], av.shape()[1], bv.shape()[1]);
    let (ra, rb) = (a.requires_grad(), b.requires_grad());
    if on_gpu(&[&av, &bv]) {
        return Var::from_op(gpu::matmul(&av, false, &bv, false, m, n, k, 1.0), vec![a.clone(), b.clone()], "matmul", move |g| {
            vec![ra.then(|| gpu::matmul(g, false, &bv, true, m, k, n, 1.0)), rb.then(|| gpu::matmul(&av, true, g, false, k, n, m, 1.0))]
        });
    }
    let mut y = vec![0.0f32; m * n];
    sgemm(m, n, k, Mat::rm(av.data(), k), Mat::rm(bv.data(), n), &mut y, n, false, 1.0, threads_for(m, n, k));
    Var::from_op(t(y, &[m, n]), vec![a.clone(), b.clone()], "matmul", move |g| {
        let ga = ra.then(|| {
            let mut d = vec![0.0f32; m * k];
            sgemm(m, k, n, Mat::rm(g.data(), n), Mat::rm_t(bv.data(), n), &mut d, k, false, 1.0, threads_for(m, k, n));
            t(d, &[m, k])
        });
        let gb = rb.then(|| {
            let mut d = vec![0.0f32; k * n];
            sgemm(k, n, m, Mat::rm_t(av.data(), k), Mat::rm(g.data(), n), &mut d, n, false, 1.0, threads_for(k, n, m));
            t(d, &[k, n])
        });
        vec![ga, gb]
    })
}

/// `x [N, in] · wᵀ + b` with `w [out, in]` (`nn.Linear`).
pub fn linear(x: &Var, w: &Var, b: Option<&Var>) -> Var {
    let (xv, wv) = (x.value(), w.value());
    assert!(xv.ndim() == 2 && wv.ndim() == 2 && xv.shape()[1] == wv.shape()[1], "linear: input {:?}, weight {:?}", xv.shape(), wv.shape());
    let (n, i, o) = (xv.shape()[0], xv.shape()[1], wv.shape()[0]);
    if on_gpu(&[&xv, &wv]) || b.is_some_and(|b| b.value().is_cuda()) {
        let bv = b.map(|b| b.value());
        let mut parents = vec![x.clone(), w.clone()];
        parents.extend(b.cloned());
        let (rx, has_b) = (x.requires_grad(), b.is_some());
        return Var::from_op(gpu::linear(&xv, &wv, bv.as_ref()), parents, "linear", move |g| {
            let mut out = vec![rx.then(|| gpu::matmul(g, false, &wv, false, n, i, o, 1.0)), Some(gpu::matmul(g, true, &xv, false, o, i, n, 1.0))];
            if has_b {
                out.push(Some(gpu::sum_to_shape(g, &[n, o], &[o])));
            }
            out
        });
    }
    let mut y = vec![0.0f32; n * o];
    if let Some(b) = b {
        let bv = b.value();
        assert_eq!(bv.shape(), &[o], "linear bias");
        for r in y.chunks_mut(o) {
            r.copy_from_slice(bv.data());
        }
    }
    sgemm(n, o, i, Mat::rm(xv.data(), i), Mat::rm_t(wv.data(), i), &mut y, o, b.is_some(), 1.0, threads_for(n, o, i));
    let mut parents = vec![x.clone(), w.clone()];
    if let Some(b) = b {
        parents.push(b.clone());
    }
    let (rx, has_b) = (x.requires_grad(), b.is_some());
    Var::from_op(t(y, &[n, o]), parents, "linear", move |g| {
        let gx = rx.then(|| {
            let mut d = vec![0.0f32; n * i];
            sgemm(n, i, o, Mat::rm(g.data(), o), Mat::rm(wv.data(), i), &mut d, i, false, 1.0, threads_for(n, i, o));
            t(d, &[n, i])
        });
        let mut dw = vec![0.0f32; o * i];
        sgemm(o, i, n, Mat::rm_t(g.data(), o), Mat::rm(xv.data(), i), &mut dw, i, false, 1.0, threads_for(o, i, n));
        let mut out = vec![gx, Some(t(dw, &[o, i]))];
        if has_b {
            out.push(Some(t(ew::sum_to_shape(g.data(), &[n, o], &[o]), &[o])));
        }
        out
    })
}

/// 2-D convolution `x [N, Cin, H, W]`, `w [Cout, Cin, kh, kw]`, optional bias, stride, zero padding.
pub fn conv2d(x: &Var, w: &Var, b: Option<&Var>, stride: usize, pad: usize) -> Var {
    let (xv, wv) = (x.value(), w.value());
    let (xs, ws) = (xv.shape(), wv.shape());
    assert!(xs.len() == 4 && ws.len() == 4 && xs[1] == ws[1], "conv2d: input {xs:?}, weight {ws:?}");
    let g = ConvGeom { n: xs[0], cin: xs[1], h: xs[2], w: xs[3], cout: ws[0], kh: ws[2], kw: ws[3], stride, pad };
    assert!(g.h + 2 * pad >= g.kh && g.w + 2 * pad >= g.kw, "conv2d: input {xs:?} smaller than kernel {ws:?}");
    let bv = b.map(|b| b.value());
    if on_gpu(&[&xv, &wv]) {
        let y = crate::backend::cuda::conv::conv2d_forward(&xv, &wv, bv.as_ref(), &g);
        let mut parents = vec![x.clone(), w.clone()];
        parents.extend(b.cloned());
        let (rx, has_b) = (x.requires_grad(), b.is_some());
        return Var::from_op(y, parents, "conv2d", move |gy| {
            let (dx, dw, db) = crate::backend::cuda::conv::conv2d_backward(&xv, &wv, gy, &g, rx);
            let mut out = vec![dx, Some(dw)];
            if has_b {
                out.push(Some(db));
            }
            out
        });
    }
    let y = conv2d_forward(xv.data(), wv.data(), bv.as_ref().map(|b| b.data()), &g);
    let mut parents = vec![x.clone(), w.clone()];
    if let Some(b) = b {
        parents.push(b.clone());
    }
    let (rx, has_b) = (x.requires_grad(), b.is_some());
    let (xshape, wshape) = (xs.to_vec(), ws.to_vec());
    Var::from_op(t(y, &[g.n, g.cout, g.ho(), g.wo()]), parents, "conv2d", move |gy| {
        let (dx, dw, db) = conv2d_backward(xv.data(), wv.data(), gy.data(), &g, rx);
        let mut out = vec![dx.map(|d| t(d, &xshape)), Some(t(dw, &wshape))];
        if has_b {
            out.push(Some(t(db, &[g.cout])));
        }
        out
    })
}

/// `GroupNorm(groups, C, eps)` over `[N, C, *]` with affine `w`, `b` of shape `[C]`.
pub fn group_norm(x: &Var, w: &Var, b: &Var, groups: usize, eps: f32) -> Var {
    let xv = x.value();
    let s = xv.shape().to_vec();
    assert!(s.len() >= 2, "group_norm expects [N, C, ...]");
    let (n, c) = (s[0], s[1]);
    assert!(c % groups == 0, "group_norm: {c} channels are not divisible into {groups} groups");
    let sp: usize = s[2..].iter().product();
    let (wv, bv) = (w.value(), b.value());
    assert!(wv.shape() == [c] && bv.shape() == [c], "group_norm affine shapes");
    if xv.is_cuda() {
        let (y, mean, rstd) = gpu::group_norm(&xv, &wv, &bv, n, c, sp, groups, eps);
        return Var::from_op(y, vec![x.clone(), w.clone(), b.clone()], "group_norm", move |g| {
            let (dx, dw, db) = gpu::group_norm_backward(&xv, g, &wv, &mean, &rstd, n, c, sp, groups);
            vec![Some(dx), Some(dw), Some(db)]
        });
    }
    let (y, mean, rstd) = group_norm_forward(xv.data(), n, c, sp, groups, eps, wv.data(), bv.data());
    Var::from_op(t(y, &s), vec![x.clone(), w.clone(), b.clone()], "group_norm", move |g| {
        let (dx, dw, db) = group_norm_backward(xv.data(), g.data(), n, c, sp, groups, wv.data(), &mean, &rstd);
        vec![Some(t(dx, &s)), Some(t(dw, &[c])), Some(t(db, &[c]))]
    })
}

/// torchcfm's QKV attention: `qkv [B, 3·C, T] → [B, C, T]` with `heads` heads in the given channel order.
pub fn qkv_attention(qkv: &Var, heads: usize, order: QkvOrder) -> Var {
    let v = qkv.value();
    let s = v.shape().to_vec();
    assert!(s.len() == 3 && s[1].is_multiple_of(3 * heads), "qkv_attention: shape {s:?} with {heads} heads");
    let g = AttnGeom { b: s[0], heads, ch: s[1] / (3 * heads), t: s[2], order };
    if v.is_cuda() {
        let (out, probs) = gpu::attention(&v, &g);
        return Var::from_op(out, vec![qkv.clone()], "qkv_attention", move |gd| vec![Some(gpu::attention_backward(&v, &probs, gd, &g))]);
    }
    let (out, probs) = attention_forward(v.data(), &g);
    Var::from_op(t(out, &[s[0], s[1] / 3, s[2]]), vec![qkv.clone()], "qkv_attention", move |gd| vec![Some(t(attention_backward(v.data(), &probs, gd.data(), &g), &s))])
}

// ---------------------------------------------------------------- operator sugar

impl std::ops::Add for &Var {
    type Output = Var;
    fn add(self, o: &Var) -> Var {
        add(self, o)
    }
}
impl std::ops::Sub for &Var {
    type Output = Var;
    fn sub(self, o: &Var) -> Var {
        sub(self, o)
    }
}
impl std::ops::Mul for &Var {
    type Output = Var;
    fn mul(self, o: &Var) -> Var {
        mul(self, o)
    }
}
impl std::ops::Div for &Var {
    type Output = Var;
    fn div(self, o: &Var) -> Var {
        div(self, o)
    }
}
