//! Differentiable ops. Each computes its value with [`Tensor`]'s ops (so on whatever device and
//! in whatever dtype its inputs are) and records a backward written once, in tensor ops.

use anyhow::{Result, bail};

use super::Var;
use crate::backend::{QkvOrder, UnaryOp};
use crate::rng::philox::Philox;
use crate::tensor::Tensor;

/// The gradient of a broadcast operand: `g` summed down to `to` (shared when nothing was broadcast).
fn reduce_to(g: &Tensor, to: &[usize]) -> Result<Tensor> {
    g.sum_to_shape(to)
}

// ---------------------------------------------------------------- elementwise, broadcasting

/// `a + b` with NumPy broadcasting.
pub fn add(a: &Var, b: &Var) -> Result<Var> {
    let v = a.value().add(&b.value())?;
    let (sa, sb) = (a.shape(), b.shape());
    Ok(Var::from_op(v, vec![a.clone(), b.clone()], "add", move |g| Ok(vec![Some(reduce_to(g, &sa)?), Some(reduce_to(g, &sb)?)])))
}

/// `a − b` with broadcasting.
pub fn sub(a: &Var, b: &Var) -> Result<Var> {
    let v = a.value().sub(&b.value())?;
    let (sa, sb) = (a.shape(), b.shape());
    Ok(Var::from_op(v, vec![a.clone(), b.clone()], "sub", move |g| Ok(vec![Some(reduce_to(g, &sa)?), Some(reduce_to(g, &sb)?.neg()?)])))
}

/// `a ⊙ b` with broadcasting.
pub fn mul(a: &Var, b: &Var) -> Result<Var> {
    let (av, bv) = (a.value(), b.value());
    let v = av.mul(&bv)?;
    let (ra, rb) = (a.requires_grad(), b.requires_grad());
    Ok(Var::from_op(v, vec![a.clone(), b.clone()], "mul", move |g| {
        let ga = if ra { Some(reduce_to(&g.mul(&bv)?, av.shape())?) } else { None };
        let gb = if rb { Some(reduce_to(&g.mul(&av)?, bv.shape())?) } else { None };
        Ok(vec![ga, gb])
    }))
}

/// `a / b` with broadcasting.
pub fn div(a: &Var, b: &Var) -> Result<Var> {
    let (av, bv) = (a.value(), b.value());
    let v = av.div(&bv)?;
    let (ra, rb) = (a.requires_grad(), b.requires_grad());
    let (sa, yv) = (av.shape().to_vec(), v.clone());
    Ok(Var::from_op(v, vec![a.clone(), b.clone()], "div", move |g| {
        let ga = if ra { Some(reduce_to(&g.div(&bv)?, &sa)?) } else { None };
        // d(a/b)/db = −(a/b)/b
        let gb = if rb { Some(reduce_to(&g.mul(&yv.div(&bv)?.neg()?)?, bv.shape())?) } else { None };
        Ok(vec![ga, gb])
    }))
}

/// `x + s`.
pub fn add_scalar(x: &Var, s: f32) -> Result<Var> {
    let y = x.value().add_scalar(s)?;
    Ok(Var::from_op(y, vec![x.clone()], "add_scalar", |g| Ok(vec![Some(g.clone())])))
}

/// `x · s`.
pub fn mul_scalar(x: &Var, s: f32) -> Result<Var> {
    let y = x.value().mul_scalar(s)?;
    Ok(Var::from_op(y, vec![x.clone()], "mul_scalar", move |g| Ok(vec![Some(g.mul_scalar(s)?)])))
}

/// A unary op whose backward needs its input and output.
fn unary(x: &Var, name: &'static str, op: UnaryOp) -> Result<Var> {
    let xv = x.value();
    let y = xv.unary(op, 0.0)?;
    let yv = y.clone();
    Ok(Var::from_op(y, vec![x.clone()], name, move |g| Ok(vec![Some(g.unary_backward(op, &xv, &yv)?)])))
}

/// `x · σ(x)`.
pub fn silu(x: &Var) -> Result<Var> {
    unary(x, "silu", UnaryOp::Silu)
}
/// `x·Φ(x)`, the exact GELU (PyTorch's default `gelu`).
pub fn gelu(x: &Var) -> Result<Var> {
    unary(x, "gelu", UnaryOp::Gelu)
}
/// `x·σ(1.702·x)`, CLIP's QuickGELU.
pub fn quick_gelu(x: &Var) -> Result<Var> {
    unary(x, "quick_gelu", UnaryOp::QuickGelu)
}
/// Logistic sigmoid.
pub fn sigmoid(x: &Var) -> Result<Var> {
    unary(x, "sigmoid", UnaryOp::Sigmoid)
}
/// `exp(x)`.
pub fn exp(x: &Var) -> Result<Var> {
    unary(x, "exp", UnaryOp::Exp)
}
/// `max(x, 0)`.
pub fn relu(x: &Var) -> Result<Var> {
    unary(x, "relu", UnaryOp::Relu)
}
/// `x²`.
pub fn square(x: &Var) -> Result<Var> {
    unary(x, "square", UnaryOp::Square)
}

/// Softmax over the last axis.
pub fn softmax(x: &Var) -> Result<Var> {
    let y = x.value().softmax()?;
    let yv = y.clone();
    Ok(Var::from_op(y, vec![x.clone()], "softmax", move |g| Ok(vec![Some(yv.softmax_backward(g)?)])))
}

/// Log-softmax over the last axis (stable: shifted by the row maximum).
pub fn log_softmax(x: &Var) -> Result<Var> {
    let y = x.value().log_softmax()?;
    let yv = y.clone();
    Ok(Var::from_op(y, vec![x.clone()], "log_softmax", move |g| Ok(vec![Some(yv.log_softmax_backward(g)?)])))
}

/// Cast to `dtype` (the gradient is cast back to the input's dtype).
pub fn to_dtype(x: &Var, dtype: crate::tensor::DType) -> Result<Var> {
    let xv = x.value();
    if xv.dtype() == dtype {
        return Ok(x.clone());
    }
    let from = xv.dtype();
    Ok(Var::from_op(xv.to_dtype(dtype)?, vec![x.clone()], "to_dtype", move |g| Ok(vec![Some(g.to_dtype(from)?)])))
}

// ---------------------------------------------------------------- reductions

/// Sum over all elements (a scalar of shape `[]`).
pub fn sum_all(x: &Var) -> Result<Var> {
    let s = x.value().sum_all()?;
    let shape = x.shape();
    Ok(Var::from_op(s, vec![x.clone()], "sum_all", move |g| Ok(vec![Some(g.broadcast_to(&shape)?)])))
}

/// Mean over all elements.
pub fn mean_all(x: &Var) -> Result<Var> {
    let n = x.value().numel() as f32;
    mul_scalar(&sum_all(x)?, 1.0 / n)
}

/// Sum over `axes`; `keepdim` keeps them as size 1.
pub fn sum_axes(x: &Var, axes: &[usize], keepdim: bool) -> Result<Var> {
    let shape = x.shape();
    if let Some(&a) = axes.iter().find(|&&a| a >= shape.len()) {
        bail!("sum_axes: axis {a} out of range for {shape:?}");
    }
    let kept: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let out_shape: Vec<usize> = if keepdim { kept.clone() } else { shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect() };
    let v = x.value().sum_to_shape(&kept)?.reshape(&out_shape)?;
    Ok(Var::from_op(v, vec![x.clone()], "sum_axes", move |g| Ok(vec![Some(g.reshape(&kept)?.broadcast_to(&shape)?)])))
}

/// Mean over `axes`.
pub fn mean_axes(x: &Var, axes: &[usize], keepdim: bool) -> Result<Var> {
    let shape = x.shape();
    let n: usize = axes.iter().map(|&a| shape.get(a).copied().unwrap_or(1)).product();
    mul_scalar(&sum_axes(x, axes, keepdim)?, 1.0 / n as f32)
}

/// Mean-square error `mean((a − b)²)` over all elements.
pub fn mse_loss(a: &Var, b: &Var) -> Result<Var> {
    mean_all(&square(&sub(a, b)?)?)
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
    let lv = logits.value();
    let pick = Tensor::from_vec(pick, &sh).to_dtype(lv.dtype())?.to_device(lv.device())?;
    sum_all(&mul(&log_softmax(logits)?, &Var::constant(pick))?)
}

// ---------------------------------------------------------------- shape and data movement

/// Same data, new shape.
pub fn reshape(x: &Var, shape: &[usize]) -> Result<Var> {
    let xv = x.value();
    let old = xv.shape().to_vec();
    Ok(Var::from_op(xv.reshape(shape)?, vec![x.clone()], "reshape", move |g| Ok(vec![Some(g.reshape(&old)?)])))
}

/// Permute axes (`out.shape[i] = x.shape[perm[i]]`).
pub fn permute(x: &Var, perm: &[usize]) -> Result<Var> {
    let y = x.value().permute(perm)?;
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    Ok(Var::from_op(y, vec![x.clone()], "permute", move |g| Ok(vec![Some(g.permute(&inv)?)])))
}

/// Concatenate along `axis`.
pub fn concat(xs: &[Var], axis: usize) -> Result<Var> {
    let vals: Vec<Tensor> = xs.iter().map(|x| x.value()).collect();
    let y = Tensor::concat(&vals, axis)?;
    let sizes: Vec<usize> = vals.iter().map(|v| v.shape()[axis]).collect();
    Ok(Var::from_op(y, xs.to_vec(), "concat", move |g| {
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let piece = g.narrow(axis, start, len)?;
                start += len;
                Ok(Some(piece))
            })
            .collect()
    }))
}

/// The slice `[start, start+len)` along `axis`.
pub fn narrow(x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
    let xv = x.value();
    let shape = xv.shape().to_vec();
    Ok(Var::from_op(xv.narrow(axis, start, len)?, vec![x.clone()], "narrow", move |g| Ok(vec![Some(g.narrow_backward(&shape, axis, start, len)?)])))
}

/// Nearest-neighbour 2× upsampling of `[N, C, H, W]` (`F.interpolate(scale_factor=2, mode="nearest")`).
pub fn upsample_nearest2x(x: &Var) -> Result<Var> {
    let xv = x.value();
    let s = xv.shape().to_vec();
    Ok(Var::from_op(xv.upsample_nearest2x()?, vec![x.clone()], "upsample_nearest2x", move |g| Ok(vec![Some(g.upsample_nearest2x_backward(&s)?)])))
}

/// 2×2 average pooling, stride 2 (`F.avg_pool2d(kernel_size=2, stride=2)`).
pub fn avg_pool2x(x: &Var) -> Result<Var> {
    let xv = x.value();
    let s = xv.shape().to_vec();
    Ok(Var::from_op(xv.avg_pool2x()?, vec![x.clone()], "avg_pool2x", move |g| Ok(vec![Some(g.avg_pool2x_backward(&s)?)])))
}

/// Rows of `weight [num, dim]` picked by `ids` (an `nn.Embedding` lookup) → `[len(ids), dim]`.
pub fn embedding(weight: &Var, ids: &[usize]) -> Result<Var> {
    let wv = weight.value();
    if wv.ndim() != 2 {
        bail!("embedding: table of shape {:?}", wv.shape());
    }
    let num = wv.shape()[0];
    if let Some(&bad) = ids.iter().find(|&&i| i >= num) {
        bail!("class label {bad} is out of range for an embedding of {num} classes");
    }
    let idt = Tensor::from_indices(ids)?.to_device(wv.device())?;
    Ok(Var::from_op(wv.embedding(&idt)?, vec![weight.clone()], "embedding", move |g| Ok(vec![Some(g.embedding_backward(&idt, num)?)])))
}

/// Inverted dropout: zero with probability `p`, scale survivors by `1/(1−p)`. The mask is the
/// next Philox draw of `stream` (one value per element; the stream moves past it), made by the
/// backend on the tensor's device, so CPU and GPU runs drop the same units and nothing is
/// uploaded. The backward regenerates the mask from the draw's `(seed, offset)` instead of
/// keeping it: no activation-sized buffer lives on the tape, and the recomputation is the same
/// kernel applied to the gradient.
pub fn dropout(x: &Var, p: f32, stream: &mut Philox) -> Result<Var> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let xv = x.value();
    let (seed, offset) = (stream.seed(), stream.reserve(xv.numel()));
    let y = xv.dropout_philox(p, seed, offset)?;
    Ok(Var::from_op(y, vec![x.clone()], "dropout", move |g| Ok(vec![Some(g.dropout_philox(p, seed, offset)?)])))
}

/// torchcfm's sinusoidal `timestep_embedding(t, dim)`: `t [B] → [B, dim]`, `[cos | sin]`.
pub fn timestep_embedding(tv: &Var, dim: usize) -> Result<Var> {
    let emb = tv.value().timestep_embedding(dim)?;
    let ev = emb.clone();
    Ok(Var::from_op(emb, vec![tv.clone()], "timestep_embedding", move |g| Ok(vec![Some(ev.timestep_embedding_backward(g)?)])))
}

// ---------------------------------------------------------------- matmul, linear, conv

/// `a [M, K] · b [K, N]`.
pub fn matmul(a: &Var, b: &Var) -> Result<Var> {
    let (av, bv) = (a.value(), b.value());
    let y = av.matmul(&bv)?;
    let (ra, rb) = (a.requires_grad(), b.requires_grad());
    Ok(Var::from_op(y, vec![a.clone(), b.clone()], "matmul", move |g| {
        let ga = if ra { Some(g.matmul_t(false, &bv, true, 1.0)?) } else { None };
        let gb = if rb { Some(av.matmul_t(true, g, false, 1.0)?) } else { None };
        Ok(vec![ga, gb])
    }))
}

/// `x [N, in] · wᵀ + b` with `w [out, in]` (`nn.Linear`).
pub fn linear(x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let (xv, wv) = (x.value(), w.value());
    let bv = b.map(|b| b.value());
    let y = xv.linear(&wv, bv.as_ref())?;
    let mut parents = vec![x.clone(), w.clone()];
    parents.extend(b.cloned());
    let (rx, has_b) = (x.requires_grad(), b.is_some());
    let o = wv.shape()[0];
    Ok(Var::from_op(y, parents, "linear", move |g| {
        let gx = if rx { Some(g.matmul_t(false, &wv, false, 1.0)?) } else { None };
        let mut out = vec![gx, Some(g.matmul_t(true, &xv, false, 1.0)?)];
        if has_b {
            out.push(Some(g.sum_to_shape(&[o])?));
        }
        Ok(out)
    }))
}

/// 2-D convolution `x [N, Cin, H, W]`, `w [Cout, Cin, kh, kw]`, optional bias, stride, zero padding.
pub fn conv2d(x: &Var, w: &Var, b: Option<&Var>, stride: usize, pad: usize) -> Result<Var> {
    let (xv, wv) = (x.value(), w.value());
    let geom = xv.conv_geom(&wv, stride, pad)?;
    let bv = b.map(|b| b.value());
    let y = xv.conv2d(&wv, bv.as_ref(), stride, pad)?;
    let mut parents = vec![x.clone(), w.clone()];
    parents.extend(b.cloned());
    let (rx, has_b) = (x.requires_grad(), b.is_some());
    Ok(Var::from_op(y, parents, "conv2d", move |gy| {
        let (dx, dw, db) = xv.conv2d_backward(&wv, gy, &geom, rx)?;
        let mut out = vec![dx, Some(dw)];
        if has_b {
            out.push(Some(db));
        }
        Ok(out)
    }))
}

/// `conv2d(x, w, b) + a`, `a` of the output's shape or `[N, Cout, 1, 1]`, as one node
/// ([`Tensor::conv2d_add`]): the gradient of `a` is the output's, summed over the pixels for the
/// per-channel form.
pub fn conv2d_add(x: &Var, w: &Var, b: Option<&Var>, a: &Var, stride: usize, pad: usize) -> Result<Var> {
    let (xv, wv, av) = (x.value(), w.value(), a.value());
    let geom = xv.conv_geom(&wv, stride, pad)?;
    let bv = b.map(|b| b.value());
    let y = xv.conv2d_add(&wv, bv.as_ref(), &av, stride, pad)?;
    let mut parents = vec![x.clone(), w.clone()];
    parents.extend(b.cloned());
    parents.push(a.clone());
    let (rx, has_b, ra, sa) = (x.requires_grad(), b.is_some(), a.requires_grad(), a.shape());
    Ok(Var::from_op(y, parents, "conv2d_add", move |gy| {
        let (dx, dw, db) = xv.conv2d_backward(&wv, gy, &geom, rx)?;
        let mut out = vec![dx, Some(dw)];
        if has_b {
            out.push(Some(db));
        }
        out.push(if ra { Some(reduce_to(gy, &sa)?) } else { None });
        Ok(out)
    }))
}

/// `GroupNorm(groups, C, eps)` over `[N, C, *]` with affine `w`, `b` of shape `[C]`.
pub fn group_norm(x: &Var, w: &Var, b: &Var, groups: usize, eps: f32) -> Result<Var> {
    let (xv, wv, bv) = (x.value(), w.value(), b.value());
    let geom = xv.norm_geom(&wv, &bv, groups, eps)?;
    let (y, mean, rstd) = xv.group_norm(&wv, &bv, &geom)?;
    Ok(Var::from_op(y, vec![x.clone(), w.clone(), b.clone()], "group_norm", move |g| {
        let (dx, dw, db) = xv.group_norm_backward(g, &wv, &mean, &rstd, &geom)?;
        Ok(vec![Some(dx), Some(dw), Some(db)])
    }))
}

/// torchcfm's QKV attention: `qkv [B, 3·C, T] → [B, C, T]` with `heads` heads in the given channel order.
pub fn qkv_attention(qkv: &Var, heads: usize, order: QkvOrder) -> Result<Var> {
    let v = qkv.value();
    let geom = v.attn_geom(heads, order)?;
    let (out, probs) = v.qkv_attention(&geom)?;
    Ok(Var::from_op(out, vec![qkv.clone()], "qkv_attention", move |gd| Ok(vec![Some(v.qkv_attention_backward(&probs, gd, &geom)?)])))
}
