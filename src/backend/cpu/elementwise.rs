//! Elementwise maps, broadcasting binary ops, reductions and data movement.

use rayon::prelude::*;

use super::PAR_MIN;

/// `Φ(x) = erfc(−x/√2)/2`, the standard normal CDF, to about 1e-7 relative everywhere (the
/// Chebyshev-fitted erfc of Numerical Recipes §6.2, evaluated in f64): GELU's CPU twin of CUDA's
/// `erfcf`.
pub fn normal_cdf(x: f32) -> f32 {
    let z = -(x as f64) * std::f64::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let p = -1.265_512_23 + t * (1.000_023_68 + t * (0.374_091_96 + t * (0.096_784_18 + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc_a = t * (-a * a + p).exp();
    let erfc = if z >= 0.0 { erfc_a } else { 2.0 - erfc_a };
    (0.5 * erfc) as f32
}

/// Apply `f` to every element (parallel for large inputs).
pub fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    if x.len() >= PAR_MIN { x.par_iter().map(|&v| f(v)).collect() } else { x.iter().map(|&v| f(v)).collect() }
}

/// `f(a_i, b_i)` for equal-length slices.
pub fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    if a.len() >= PAR_MIN { a.par_iter().zip(b.par_iter()).map(|(&x, &y)| f(x, y)).collect() } else { a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect() }
}

/// `f(a_i, b_i, c_i)` for equal-length slices.
pub fn zip3_map(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    assert!(a.len() == b.len() && b.len() == c.len());
    if a.len() >= PAR_MIN { (a, b, c).into_par_iter().map(|(&x, &y, &z)| f(x, y, z)).collect() } else { a.iter().zip(b).zip(c).map(|((&x, &y), &z)| f(x, y, z)).collect() }
}

/// `a += b`, in parallel for large slices.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add_assign: length mismatch");
    if a.len() >= PAR_MIN {
        a.par_chunks_mut(8192).zip(b.par_chunks(8192)).for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(p, q)| *p += q));
    } else {
        a.iter_mut().zip(b).for_each(|(p, q)| *p += q);
    }
}

/// NumPy broadcasting of two shapes, or `None` if incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

pub use crate::backend::geom::broadcast_strides;

/// Offset of the first element of output row `row` (all axes but the last) under `strides`.
#[inline]
fn row_offset(mut row: usize, shape: &[usize], strides: &[usize]) -> usize {
    let nd = shape.len();
    let mut off = 0;
    for ax in (0..nd.saturating_sub(1)).rev() {
        let d = shape[ax];
        off += (row % d) * strides[ax];
        row /= d;
    }
    off
}

/// Broadcasting binary op: `out = f(a, b)` with `out` of the broadcast shape.
pub fn binary(a: &[f32], ash: &[usize], b: &[f32], bsh: &[usize], out_shape: &[usize], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    if ash == bsh {
        return zip_map(a, b, f);
    }
    let n: usize = out_shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    let sa = broadcast_strides(ash, out_shape);
    let sb = broadcast_strides(bsh, out_shape);
    let last = *out_shape.last().unwrap_or(&1);
    let (la, lb) = (*sa.last().unwrap_or(&0), *sb.last().unwrap_or(&0));
    let mut out = vec![0.0f32; n];
    let body = |(row, o): (usize, &mut [f32])| {
        let oa = row_offset(row, out_shape, &sa);
        let ob = row_offset(row, out_shape, &sb);
        for (j, v) in o.iter_mut().enumerate() {
            *v = f(a[oa + j * la], b[ob + j * lb]);
        }
    };
    if out_shape.is_empty() {
        out[0] = f(a[0], b[0]);
    } else if n >= PAR_MIN {
        out.par_chunks_mut(last).enumerate().for_each(body);
    } else {
        out.chunks_mut(last).enumerate().for_each(body);
    }
    out
}

/// Sum `x` (of shape `from`) down to `to`, where `to` broadcasts to `from` (the backward of
/// broadcasting).
pub fn sum_to_shape(x: &[f32], from: &[usize], to: &[usize]) -> Vec<f32> {
    if from == to {
        return x.to_vec();
    }
    let n_to: usize = to.iter().product();
    let st = broadcast_strides(to, from);
    let mut out = vec![0.0f64; n_to];
    if from.is_empty() {
        return vec![x[0]];
    }
    let last = *from.last().unwrap();
    let ls = *st.last().unwrap();
    for (row, xr) in x.chunks(last).enumerate() {
        let o = row_offset(row, from, &st);
        if ls == 0 {
            out[o] += xr.iter().map(|&v| v as f64).sum::<f64>();
        } else {
            for (j, &v) in xr.iter().enumerate() {
                out[o + j] += v as f64;
            }
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// `x` of shape `from` broadcast (copied) to the shape `to`.
pub fn broadcast_to(x: &[f32], from: &[usize], to: &[usize]) -> Vec<f32> {
    gather_strided(x, to, &broadcast_strides(from, to))
}

/// Copy a strided view (`shape`, element `strides` into `src`) into a contiguous vector.
pub fn gather_strided(src: &[f32], shape: &[usize], strides: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    if shape.is_empty() {
        return vec![src[0]];
    }
    let last = *shape.last().unwrap();
    let ls = *strides.last().unwrap();
    let mut out = vec![0.0f32; n];
    let body = |(row, o): (usize, &mut [f32])| {
        let base = row_offset(row, shape, strides);
        for (j, v) in o.iter_mut().enumerate() {
            *v = src[base + j * ls];
        }
    };
    if n >= PAR_MIN {
        out.par_chunks_mut(last).enumerate().for_each(body);
    } else {
        out.chunks_mut(last).enumerate().for_each(body);
    }
    out
}

/// Sum over the given axes (result keeps those axes with size 1).
pub fn sum_axes_keepdim(x: &[f32], shape: &[usize], axes: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let mut to = shape.to_vec();
    for &a in axes {
        to[a] = 1;
    }
    (sum_to_shape(x, shape, &to), to)
}

/// Concatenate contiguous tensors along `axis`; all other dims must agree.
pub fn concat(parts: &[(&[f32], &[usize])], axis: usize) -> (Vec<f32>, Vec<usize>) {
    let mut shape = parts[0].1.to_vec();
    shape[axis] = parts.iter().map(|p| p.1[axis]).sum();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(total);
    for o in 0..outer {
        for (d, s) in parts {
            let block = s[axis] * inner;
            out.extend_from_slice(&d[o * block..(o + 1) * block]);
        }
    }
    (out, shape)
}

/// The piece `[start, start+len)` of `x` along `axis`.
pub fn narrow(x: &[f32], shape: &[usize], axis: usize, start: usize, len: usize) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let d = shape[axis];
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        out.extend_from_slice(&x[(o * d + start) * inner..(o * d + start + len) * inner]);
    }
    out
}

/// Backward of [`narrow`]: place `g` into a zero tensor of `shape`.
pub fn narrow_backward(g: &[f32], shape: &[usize], axis: usize, start: usize, len: usize) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let d = shape[axis];
    let mut out = vec![0.0f32; shape.iter().product()];
    for o in 0..outer {
        out[(o * d + start) * inner..(o * d + start + len) * inner].copy_from_slice(&g[o * len * inner..(o + 1) * len * inner]);
    }
    out
}

/// Nearest-neighbour 2× upsampling of `[N, C, H, W]`.
pub fn upsample_nearest2x(x: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; nc * 4 * h * w];
    let body = |(p, o): (usize, &mut [f32])| {
        let src = &x[p * h * w..(p + 1) * h * w];
        for i in 0..2 * h {
            let sr = &src[(i / 2) * w..(i / 2 + 1) * w];
            let orow = &mut o[i * 2 * w..(i + 1) * 2 * w];
            for j in 0..w {
                orow[2 * j] = sr[j];
                orow[2 * j + 1] = sr[j];
            }
        }
    };
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(4 * h * w).enumerate().for_each(body);
    } else {
        out.chunks_mut(4 * h * w).enumerate().for_each(body);
    }
    out
}

/// Backward of [`upsample_nearest2x`]: sum each 2×2 block.
pub fn upsample_nearest2x_backward(g: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; nc * h * w];
    for p in 0..nc {
        let gp = &g[p * 4 * h * w..(p + 1) * 4 * h * w];
        let o = &mut out[p * h * w..(p + 1) * h * w];
        for i in 0..2 * h {
            for j in 0..2 * w {
                o[(i / 2) * w + j / 2] += gp[i * 2 * w + j];
            }
        }
    }
    out
}

/// 2×2 average pooling with stride 2 (floor) of `[N, C, H, W]`.
pub fn avg_pool2x(x: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![0.0f32; nc * ho * wo];
    for p in 0..nc {
        let s = &x[p * h * w..(p + 1) * h * w];
        for i in 0..ho {
            for j in 0..wo {
                let a = s[2 * i * w + 2 * j] + s[2 * i * w + 2 * j + 1] + s[(2 * i + 1) * w + 2 * j] + s[(2 * i + 1) * w + 2 * j + 1];
                out[p * ho * wo + i * wo + j] = 0.25 * a;
            }
        }
    }
    out
}

pub fn avg_pool2x_backward(g: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![0.0f32; nc * h * w];
    for p in 0..nc {
        let o = &mut out[p * h * w..(p + 1) * h * w];
        for i in 0..ho {
            for j in 0..wo {
                let v = 0.25 * g[p * ho * wo + i * wo + j];
                o[2 * i * w + 2 * j] = v;
                o[2 * i * w + 2 * j + 1] = v;
                o[(2 * i + 1) * w + 2 * j] = v;
                o[(2 * i + 1) * w + 2 * j + 1] = v;
            }
        }
    }
    out
}

/// Softmax over the last axis (rows of length `n`), computed with a max shift in f32
/// and an f64 normaliser.
pub fn softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let body = super::simd::softmax_inplace;
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(n).for_each(body);
    } else {
        out.chunks_mut(n).for_each(body);
    }
    out
}

/// Backward of softmax over rows: `dx = y ⊙ (dy − Σ dy⊙y)`.
pub fn softmax_rows_backward(y: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
    let mut out = dy.to_vec();
    let body = |(o, yr): (&mut [f32], &[f32])| super::simd::softmax_backward_inplace(yr, o);
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(n).zip(y.par_chunks(n)).for_each(body);
    } else {
        out.chunks_mut(n).zip(y.chunks(n)).for_each(body);
    }
    out
}

/// Sinusoidal timestep embedding exactly as torchcfm's `timestep_embedding`:
/// `[cos(t·f_k) | sin(t·f_k)]` with `f_k = exp(−ln(max_period)·k/half)`, zero-padded if `dim` is odd.
pub fn timestep_embedding(t: &[f32], dim: usize, max_period: f32) -> Vec<f32> {
    let half = dim / 2;
    let freqs = timestep_freqs(half, max_period);
    let mut out = vec![0.0f32; t.len() * dim];
    for (i, &tv) in t.iter().enumerate() {
        let row = &mut out[i * dim..(i + 1) * dim];
        for k in 0..half {
            let a = tv * freqs[k];
            row[k] = a.cos();
            row[half + k] = a.sin();
        }
    }
    out
}

/// The frequencies used by [`timestep_embedding`], computed in f32 as PyTorch does.
pub fn timestep_freqs(half: usize, max_period: f32) -> Vec<f32> {
    (0..half).map(|k| (-((max_period as f64).ln() as f32) * k as f32 / half as f32).exp()).collect()
}
