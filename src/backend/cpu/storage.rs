//! The CPU backend's storage and its [`BackendStorage`] implementation: f32 kernels from this
//! folder, with f16/bf16 widened to f32 per op and rounded once at its end (the reference the
//! GPU's mixed-precision kernels are checked against).

use std::borrow::Cow;

use anyhow::{Result, bail};
use half::{bf16, f16};
use rayon::prelude::*;

use super::attention::{qkv_attention_backward, qkv_attention_forward};
use super::buf::Buf;
use super::conv::{Addend, conv2d_backward, conv2d_forward_add, conv2d_forward_cached};
use super::elementwise as ew;
use super::gemm::{Mat, sgemm, threads_for};
use super::norm::{group_norm_backward, group_norm_forward};
use super::{PAR_MIN, simd};
use crate::backend::{AdamStep, ArenaStep, AttnGeom, BackendStorage, BinaryOp, ConvGeom, NormGeom, RandomDist, UnaryOp};
use crate::rng::philox;
use crate::tensor::{DType, Device};

/// Host memory of one dtype: a view ([`Buf`]) of values shared by `Arc` (copy on write), so
/// that a tensor may be a zero-copy slice of a flat arena.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Buf<f32>),
    F16(Buf<f16>),
    BF16(Buf<bf16>),
    I32(Buf<i32>),
}

fn par_convert<S: Copy + Send + Sync, D: Send>(src: &[S], f: impl Fn(S) -> D + Sync + Send) -> Vec<D> {
    if src.len() >= PAR_MIN { src.par_iter().map(|&v| f(v)).collect() } else { src.iter().map(|&v| f(v)).collect() }
}

impl CpuStorage {
    pub fn from_f32(v: Vec<f32>) -> Self {
        CpuStorage::F32(Buf::new(v))
    }
    /// f32 values rounded (round to nearest even) into `dtype`.
    pub fn from_f32_as(v: Vec<f32>, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(Buf::new(v)),
            DType::F16 => CpuStorage::F16(Buf::new(par_convert(&v, f16::from_f32))),
            DType::BF16 => CpuStorage::BF16(Buf::new(par_convert(&v, bf16::from_f32))),
            DType::I32 => CpuStorage::I32(Buf::new(par_convert(&v, |x| x as i32))),
        }
    }
    /// The values as f32: borrowed for f32, widened otherwise.
    pub fn f32s(&self) -> Cow<'_, [f32]> {
        match self {
            CpuStorage::F32(d) => Cow::Borrowed(d.as_slice()),
            CpuStorage::F16(d) => Cow::Owned(par_convert(d, f16::to_f32)),
            CpuStorage::BF16(d) => Cow::Owned(par_convert(d, bf16::to_f32)),
            CpuStorage::I32(d) => Cow::Owned(par_convert(d, |x| x as f32)),
        }
    }
    /// The values of an f32 storage.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match self {
            CpuStorage::F32(d) => Ok(d),
            s => bail!("expected f32 values, found {}", s.dtype()),
        }
    }
    /// Mutable f32 values (copied first if shared).
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        match self {
            CpuStorage::F32(d) => Ok(d.make_mut()),
            s => bail!("expected f32 values, found {}", s.dtype()),
        }
    }
    pub fn as_i32(&self) -> Result<&[i32]> {
        match self {
            CpuStorage::I32(d) => Ok(d),
            s => bail!("expected i32 indices, found {}", s.dtype()),
        }
    }
    /// The raw bytes (little endian), for writing files.
    pub fn bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(d) => bytemuck::cast_slice(d),
            CpuStorage::F16(d) => bytemuck::cast_slice(d),
            CpuStorage::BF16(d) => bytemuck::cast_slice(d),
            CpuStorage::I32(d) => bytemuck::cast_slice(d),
        }
    }
    /// Whether two storages are the same view of the same memory.
    pub fn ptr_eq(&self, o: &CpuStorage) -> bool {
        match (self, o) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => a.same_view(b),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => a.same_view(b),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => a.same_view(b),
            (CpuStorage::I32(a), CpuStorage::I32(b)) => a.same_view(b),
            _ => false,
        }
    }
    /// Elements `[off, off + len)`, sharing this storage's memory (a zero-copy view).
    pub fn view(&self, off: usize, len: usize) -> Result<Self> {
        let v = match self {
            CpuStorage::F32(d) => d.view(off, len).map(CpuStorage::F32),
            CpuStorage::F16(d) => d.view(off, len).map(CpuStorage::F16),
            CpuStorage::BF16(d) => d.view(off, len).map(CpuStorage::BF16),
            CpuStorage::I32(d) => d.view(off, len).map(CpuStorage::I32),
        };
        v.ok_or_else(|| anyhow::anyhow!("a view of [{off}, {}) of a storage of {} values", off + len, self.len()))
    }
    /// Whether this is the view `[off, off + len)` of `arena` (same memory, not a copy).
    pub fn is_view_of(&self, arena: &CpuStorage, off: usize, len: usize) -> bool {
        match (self, arena) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => a.is_view_of(b, off, len),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => a.is_view_of(b, off, len),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => a.is_view_of(b, off, len),
            (CpuStorage::I32(a), CpuStorage::I32(b)) => a.is_view_of(b, off, len),
            _ => false,
        }
    }
    fn float(&self, op: &str) -> Result<Cow<'_, [f32]>> {
        if self.dtype() == DType::I32 {
            bail!("{op}: a float op got an i32 tensor");
        }
        Ok(self.f32s())
    }
    /// An op's f32 result in this storage's dtype.
    fn out(&self, v: Vec<f32>) -> Self {
        CpuStorage::from_f32_as(v, self.dtype())
    }
    /// The `n` values of the Philox draw `(seed, offset)` of `dist`, rounded once to `dtype`
    /// (the reference of [`BackendStorage::philox_like`]).
    pub fn philox(n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Self> {
        if !dtype.is_float() {
            bail!("a random draw of {n} {dist:?} values cannot be stored as {dtype}");
        }
        let mut v = vec![0.0f32; n];
        match dist {
            RandomDist::Uniform => philox::fill_uniform(seed, offset, &mut v),
            RandomDist::Normal => philox::fill_normal(seed, offset, &mut v),
        }
        Ok(CpuStorage::from_f32_as(v, dtype))
    }
}

/// [`BackendStorage::adam_arena`] on one chunk: the formulas of `mul_scalar`, `adam_in_place` and
/// `axpby_in_place`, element by element.
fn adam_arena_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], ema: Option<&mut [f32]>, h: &ArenaStep) {
    let AdamStep { step_size, beta1: b1, beta2: b2, eps, bc2_sqrt, weight_decay: wd } = h.adam;
    let s = h.grad_scale;
    for i in 0..p.len() {
        let mut gv = g[i] * s;
        if wd != 0.0 {
            gv += wd * p[i];
        }
        m[i] += (gv - m[i]) * (1.0 - b1);
        v[i] = v[i] * b2 + (1.0 - b2) * gv * gv;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        p[i] -= step_size * m[i] / denom;
    }
    if let Some(e) = ema {
        let (a, b) = (1.0 - h.ema_decay, h.ema_decay);
        e.iter_mut().zip(p.iter()).for_each(|(y, &x)| *y = *y * b + x * a);
    }
}

/// An f64 as the f32 pair `[hi, lo]` of [`BackendStorage::sum_squares_on_device`].
pub fn split_f64(s: f64) -> [f32; 2] {
    let hi = s as f32;
    let lo = if hi.is_finite() { (s - hi as f64) as f32 } else { 0.0 };
    [hi, lo]
}

fn same_dtype(op: &str, ts: &[&CpuStorage]) -> Result<()> {
    let d = ts[0].dtype();
    if let Some(o) = ts.iter().find(|t| t.dtype() != d) {
        bail!("{op}: operands of dtypes {d} and {} (cast one with to_dtype)", o.dtype());
    }
    Ok(())
}

/// The CPU unary kernels by op code (SiLU and sigmoid vectorised and parallel).
pub fn unary_f32(x: &[f32], op: UnaryOp, s: f32) -> Vec<f32> {
    match op {
        UnaryOp::AddScalar => ew::map(x, |v| v + s),
        UnaryOp::MulScalar => ew::map(x, |v| v * s),
        UnaryOp::Exp => ew::map(x, f32::exp),
        UnaryOp::Relu => ew::map(x, |v| v.max(0.0)),
        UnaryOp::Square => ew::map(x, |v| v * v),
        UnaryOp::Neg => ew::map(x, |v| -v),
        UnaryOp::Silu => par_slices(x, simd::silu),
        UnaryOp::Sigmoid => par_slices(x, simd::sigmoid),
        UnaryOp::Gelu => ew::map(x, |v| v * ew::normal_cdf(v)),
        UnaryOp::QuickGelu => par_slices(x, simd::quick_gelu),
    }
}

/// `dx` of a unary op from `g`, its input `x` and output `y`.
pub fn unary_backward_f32(op: UnaryOp, g: &[f32], x: &[f32], y: &[f32], s: f32) -> Vec<f32> {
    match op {
        UnaryOp::AddScalar => g.to_vec(),
        UnaryOp::MulScalar => ew::map(g, |v| v * s),
        UnaryOp::Exp => ew::zip_map(g, y, |g, y| g * y),
        UnaryOp::Relu => ew::zip_map(g, x, |g, x| if x > 0.0 { g } else { 0.0 }),
        UnaryOp::Square => ew::zip_map(g, x, |g, x| g * (2.0 * x)),
        UnaryOp::Neg => ew::map(g, |v| -v),
        UnaryOp::Sigmoid => ew::zip_map(g, y, |g, y| g * y * (1.0 - y)),
        UnaryOp::Gelu => ew::zip_map(g, x, |g, x| g * (ew::normal_cdf(x) + x * 0.398_942_3 * (-0.5 * x * x).exp())),
        UnaryOp::QuickGelu => ew::zip_map(g, x, |g, x| {
            let s = 1.0 / (1.0 + (-1.702 * x).exp());
            g * s * (1.0 + 1.702 * x * (1.0 - s))
        }),
        UnaryOp::Silu => {
            let mut dx = vec![0.0f32; g.len()];
            if dx.len() >= 2 * PAR_MIN {
                dx.par_chunks_mut(PAR_MIN).zip(x.par_chunks(PAR_MIN)).zip(g.par_chunks(PAR_MIN)).for_each(|((o, x), g)| simd::silu_backward(x, g, o));
            } else {
                simd::silu_backward(x, g, &mut dx);
            }
            dx
        }
    }
}

/// `out = f(x)` for a slice kernel, in parallel chunks for large inputs.
fn par_slices(x: &[f32], f: fn(&[f32], &mut [f32])) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    if x.len() >= 2 * PAR_MIN {
        y.par_chunks_mut(PAR_MIN).zip(x.par_chunks(PAR_MIN)).for_each(|(o, i)| f(i, o));
    } else {
        f(x, &mut y);
    }
    y
}

fn binary_f32(op: BinaryOp) -> fn(f32, f32) -> f32 {
    match op {
        BinaryOp::Add => |x, y| x + y,
        BinaryOp::Sub => |x, y| x - y,
        BinaryOp::Mul => |x, y| x * y,
        BinaryOp::Div => |x, y| x / y,
    }
}

/// Log-softmax over rows of `n` (shifted by the row maximum, f64 normaliser).
pub fn log_softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    for row in y.chunks_mut(n.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row.iter().map(|&v| ((v - m) as f64).exp()).sum::<f64>().ln() as f32;
        row.iter_mut().for_each(|v| *v -= lse);
    }
    y
}

/// `dx = g − softmax · Σ g` per row, from the log-softmax output `y`.
pub fn log_softmax_rows_backward(y: &[f32], g: &[f32], n: usize) -> Vec<f32> {
    let mut dx = g.to_vec();
    for (d, yr) in dx.chunks_mut(n.max(1)).zip(y.chunks(n.max(1))) {
        let s: f32 = d.iter().sum();
        d.iter_mut().zip(yr).for_each(|(d, &l)| *d -= l.exp() * s);
    }
    dx
}

/// `dt` of the timestep embedding from the embedding `e` and its gradient `gd`.
pub fn timestep_embedding_backward(e: &[f32], gd: &[f32], dim: usize, max_period: f32) -> Vec<f32> {
    let half = dim / 2;
    let b = e.len().checked_div(dim).unwrap_or(0);
    let freqs = ew::timestep_freqs(half, max_period);
    // d cos(t f)/dt = −f sin(t f);  d sin(t f)/dt = f cos(t f)
    (0..b)
        .map(|i| {
            let mut s = 0.0f64;
            for k in 0..half {
                let (c, sn) = (e[i * dim + k], e[i * dim + half + k]);
                s += (gd[i * dim + k] * -freqs[k] * sn + gd[i * dim + half + k] * freqs[k] * c) as f64;
            }
            s as f32
        })
        .collect()
}

fn check_ids(ids: &[i32], num: usize) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= num) {
        bail!("index {bad} is out of range for an embedding of {num} rows");
    }
    Ok(())
}

impl BackendStorage for CpuStorage {
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I32(_) => DType::I32,
        }
    }
    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(d) => d.len(),
            CpuStorage::F16(d) => d.len(),
            CpuStorage::BF16(d) => d.len(),
            CpuStorage::I32(d) => d.len(),
        }
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn to_cpu_storage(&self) -> Result<CpuStorage> {
        Ok(self.clone())
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        Ok(match (self, dtype) {
            (CpuStorage::I32(d), _) => CpuStorage::from_f32_as(d.iter().map(|&v| v as f32).collect(), dtype),
            (s, DType::I32) => CpuStorage::I32(Buf::new(s.f32s().iter().map(|&v| v as i32).collect())),
            // f16 ↔ bf16 through f32 is exact on the way up and rounds once on the way down
            (s, d) => CpuStorage::from_f32_as(s.f32s().into_owned(), d),
        })
    }
    fn full_like(&self, n: usize, v: f32, dtype: DType) -> Result<Self> {
        Ok(CpuStorage::from_f32_as(vec![v; n], dtype))
    }
    fn philox_like(&self, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Self> {
        CpuStorage::philox(n, dist, seed, offset, dtype)
    }
    fn dropout(&self, p: f32, seed: u64, offset: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            bail!("dropout probability {p} is not in [0, 1]");
        }
        let x = self.float("dropout")?;
        // every value is written by its part (not zeroed first)
        let chunk = philox::DROPOUT_CHUNK;
        let (y, _) = super::par_fill_chunks(x.len(), chunk, |i, yc| philox::dropout_part(seed, offset, p, i * chunk, &x[i * chunk..i * chunk + yc.len()], yc));
        Ok(self.out(y))
    }

    fn binary(&self, a: &[usize], rhs: &Self, b: &[usize], out: &[usize], op: BinaryOp) -> Result<Self> {
        same_dtype("binary", &[self, rhs])?;
        let (x, y) = (self.float("binary")?, rhs.float("binary")?);
        Ok(self.out(ew::binary(&x, a, &y, b, out, binary_f32(op))))
    }
    fn unary(&self, op: UnaryOp, scalar: f32) -> Result<Self> {
        Ok(self.out(unary_f32(&self.float("unary")?, op, scalar)))
    }
    fn unary_backward(&self, op: UnaryOp, x: &Self, y: &Self) -> Result<Self> {
        same_dtype("unary_backward", &[self, x, y])?;
        // the scalar of MulScalar is not known here: MulScalar's backward is a MulScalar
        if matches!(op, UnaryOp::AddScalar | UnaryOp::MulScalar) {
            bail!("unary_backward: {op:?} is differentiated as its own op");
        }
        Ok(self.out(unary_backward_f32(op, &self.f32s(), &x.f32s(), &y.f32s(), 0.0)))
    }
    fn sum_to_shape(&self, from: &[usize], to: &[usize]) -> Result<Self> {
        Ok(self.out(ew::sum_to_shape(&self.float("sum")?, from, to)))
    }
    fn broadcast_to(&self, from: &[usize], to: &[usize]) -> Result<Self> {
        Ok(self.out(ew::broadcast_to(&self.float("broadcast_to")?, from, to)))
    }
    fn gather_strided(&self, shape: &[usize], strides: &[usize]) -> Result<Self> {
        Ok(match self {
            CpuStorage::I32(d) => {
                // indices move exactly: through f32 only below 2^24
                let f: Vec<f32> = d.iter().map(|&v| f32::from_bits(v as u32)).collect();
                CpuStorage::I32(Buf::new(ew::gather_strided(&f, shape, strides).into_iter().map(|v| v.to_bits() as i32).collect()))
            }
            s => s.out(ew::gather_strided(&s.f32s(), shape, strides)),
        })
    }
    fn softmax_rows(&self, n: usize) -> Result<Self> {
        Ok(self.out(ew::softmax_rows(&self.float("softmax")?, n)))
    }
    fn softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self> {
        same_dtype("softmax_backward", &[self, dy])?;
        Ok(self.out(ew::softmax_rows_backward(&self.f32s(), &dy.f32s(), n)))
    }
    fn log_softmax_rows(&self, n: usize) -> Result<Self> {
        Ok(self.out(log_softmax_rows(&self.float("log_softmax")?, n)))
    }
    fn log_softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self> {
        same_dtype("log_softmax_backward", &[self, dy])?;
        Ok(self.out(log_softmax_rows_backward(&self.f32s(), &dy.f32s(), n)))
    }

    fn concat(parts: &[(&Self, &[usize])], axis: usize) -> Result<Self> {
        let Some((first, _)) = parts.first() else { bail!("concat of no tensors") };
        let ps: Vec<&CpuStorage> = parts.iter().map(|p| p.0).collect();
        same_dtype("concat", &ps)?;
        let vals: Vec<Cow<[f32]>> = parts.iter().map(|p| p.0.f32s()).collect();
        let refs: Vec<(&[f32], &[usize])> = vals.iter().zip(parts).map(|(v, p)| (v.as_ref(), p.1)).collect();
        Ok(first.out(ew::concat(&refs, axis).0))
    }
    fn narrow(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self> {
        Ok(self.out(ew::narrow(&self.f32s(), shape, axis, start, len)))
    }
    fn narrow_backward(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self> {
        Ok(self.out(ew::narrow_backward(&self.f32s(), shape, axis, start, len)))
    }
    fn upsample_nearest2x(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        Ok(self.out(ew::upsample_nearest2x(&self.float("upsample_nearest2x")?, nc, h, w)))
    }
    fn upsample_nearest2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        Ok(self.out(ew::upsample_nearest2x_backward(&self.f32s(), nc, h, w)))
    }
    fn avg_pool2x(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        Ok(self.out(ew::avg_pool2x(&self.float("avg_pool2x")?, nc, h, w)))
    }
    fn avg_pool2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        Ok(self.out(ew::avg_pool2x_backward(&self.f32s(), nc, h, w)))
    }
    fn embedding(&self, ids: &Self, num: usize, dim: usize) -> Result<Self> {
        let ids = ids.as_i32()?;
        check_ids(ids, num)?;
        let w = self.float("embedding")?;
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &i in ids {
            out.extend_from_slice(&w[i as usize * dim..(i as usize + 1) * dim]);
        }
        Ok(self.out(out))
    }
    fn embedding_backward(&self, ids: &Self, num: usize, dim: usize) -> Result<Self> {
        let ids = ids.as_i32()?;
        check_ids(ids, num)?;
        let g = self.f32s();
        let mut gw = vec![0.0f32; num * dim];
        for (r, &i) in ids.iter().enumerate() {
            let i = i as usize;
            for (a, b) in gw[i * dim..(i + 1) * dim].iter_mut().zip(&g[r * dim..(r + 1) * dim]) {
                *a += b;
            }
        }
        Ok(self.out(gw))
    }
    fn timestep_embedding(&self, dim: usize, max_period: f32) -> Result<Self> {
        Ok(self.out(ew::timestep_embedding(&self.float("timestep_embedding")?, dim, max_period)))
    }
    fn timestep_embedding_backward(&self, gy: &Self, dim: usize, max_period: f32) -> Result<Self> {
        Ok(self.out(timestep_embedding_backward(&self.f32s(), &gy.f32s(), dim, max_period)))
    }

    fn matmul(&self, ta: bool, b: &Self, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Result<Self> {
        same_dtype("matmul", &[self, b])?;
        let (av, bv) = (self.float("matmul")?, b.float("matmul")?);
        let ma = if ta { Mat::rm_t(&av, m) } else { Mat::rm(&av, k) };
        let mb = if tb { Mat::rm_t(&bv, k) } else { Mat::rm(&bv, n) };
        let mut y = vec![0.0f32; m * n];
        sgemm(m, n, k, ma, mb, &mut y, n, false, alpha, threads_for(m, n, k));
        Ok(self.out(y))
    }
    fn linear(&self, w: &Self, bias: Option<&Self>, n: usize, i: usize, o: usize) -> Result<Self> {
        same_dtype("linear", &[self, w])?;
        let (xv, wv) = (self.float("linear")?, w.float("linear")?);
        let mut y = vec![0.0f32; n * o];
        if let Some(b) = bias {
            same_dtype("linear bias", &[self, b])?;
            let bv = b.f32s();
            if bv.len() != o {
                bail!("linear: a bias of {} values for {o} outputs", bv.len());
            }
            for r in y.chunks_mut(o.max(1)) {
                r.copy_from_slice(&bv);
            }
        }
        sgemm(n, o, i, Mat::rm(&xv, i), Mat::rm_t(&wv, i), &mut y, o, bias.is_some(), 1.0, threads_for(n, o, i));
        Ok(self.out(y))
    }
    fn conv2d(&self, w: &Self, bias: Option<&Self>, g: &ConvGeom) -> Result<Self> {
        same_dtype("conv2d", &[self, w])?;
        let bv = bias.map(|b| b.f32s());
        // f32 weights are their own buffer, whose stamp keys the kernel cache
        let w_buf = match w {
            CpuStorage::F32(b) => Some(b),
            _ => None,
        };
        Ok(self.out(conv2d_forward_cached(&self.float("conv2d")?, &w.f32s(), w_buf, bv.as_deref(), g)))
    }
    fn conv2d_backward(&self, w: &Self, dy: &Self, g: &ConvGeom, need_dx: bool) -> Result<(Option<Self>, Self, Self)> {
        same_dtype("conv2d_backward", &[self, w, dy])?;
        let (dx, dw, db) = conv2d_backward(&self.f32s(), &w.f32s(), &dy.f32s(), g, need_dx);
        Ok((dx.map(|d| self.out(d)), self.out(dw), self.out(db)))
    }
    fn group_norm(&self, gamma: &Self, beta: &Self, g: &NormGeom) -> Result<(Self, Self, Self)> {
        same_dtype("group_norm", &[self, gamma, beta])?;
        let (y, mean, rstd) = group_norm_forward(&self.float("group_norm")?, g.n, g.c, g.s, g.groups, g.eps, &gamma.f32s(), &beta.f32s());
        Ok((self.out(y), CpuStorage::from_f32(mean), CpuStorage::from_f32(rstd)))
    }
    fn group_norm_backward(&self, dy: &Self, gamma: &Self, mean: &Self, rstd: &Self, g: &NormGeom) -> Result<(Self, Self, Self)> {
        let (dx, dw, db) = group_norm_backward(&self.f32s(), &dy.f32s(), g.n, g.c, g.s, g.groups, &gamma.f32s(), mean.as_f32()?, rstd.as_f32()?);
        Ok((self.out(dx), gamma.out(dw), gamma.out(db)))
    }
    fn qkv_attention(&self, g: &AttnGeom) -> Result<(Self, Self)> {
        let (out, probs) = qkv_attention_forward(&self.float("qkv_attention")?, g);
        Ok((self.out(out), CpuStorage::from_f32(probs)))
    }
    fn qkv_attention_backward(&self, probs: &Self, dout: &Self, g: &AttnGeom) -> Result<Self> {
        Ok(self.out(qkv_attention_backward(&self.f32s(), probs.as_f32()?, &dout.f32s(), g)))
    }

    fn axpby_in_place(&mut self, a: f32, x: &Self, b: f32) -> Result<()> {
        if self.len() != x.len() {
            bail!("axpby: {} and {} values", self.len(), x.len());
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(xv)) = (&*self, x) {
            let xv = xv.clone();
            let y = self.as_f32_mut()?;
            if a == 1.0 && b == 1.0 {
                ew::add_assign(y, &xv);
            } else {
                y.iter_mut().zip(xv.iter()).for_each(|(y, &x)| *y = *y * b + x * a);
            }
            return Ok(());
        }
        let (xv, yv) = (x.float("axpby")?, self.float("axpby")?);
        let r = if a == 1.0 && b == 1.0 { ew::zip_map(&yv, &xv, |y, x| y + x) } else { ew::zip_map(&yv, &xv, |y, x| y * b + x * a) };
        *self = self.out(r);
        Ok(())
    }
    fn adam_in_place(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &AdamStep) -> Result<()> {
        let gd = grad.float("adam")?;
        let (md, vd) = (m.as_f32_mut()?, v.as_f32_mut()?);
        let AdamStep { step_size, beta1: b1, beta2: b2, eps, bc2_sqrt, weight_decay: wd } = *h;
        let pd = self.as_f32_mut()?;
        if pd.len() != gd.len() || md.len() != pd.len() || vd.len() != pd.len() {
            bail!("adam: parameter, gradient and moments differ in length");
        }
        let body = |(((pv, &gv), mv), vv): (((&mut f32, &f32), &mut f32), &mut f32)| {
            let g = if wd != 0.0 { gv + wd * *pv } else { gv };
            *mv += (g - *mv) * (1.0 - b1); // torch: exp_avg.lerp_(grad, 1 - beta1)
            *vv = *vv * b2 + (1.0 - b2) * g * g;
            let denom = vv.sqrt() / bc2_sqrt + eps;
            *pv -= step_size * *mv / denom;
        };
        if pd.len() >= PAR_MIN {
            pd.par_iter_mut().zip(gd.par_iter()).zip(md.par_iter_mut()).zip(vd.par_iter_mut()).for_each(body);
        } else {
            pd.iter_mut().zip(gd.iter()).zip(md.iter_mut()).zip(vd.iter_mut()).for_each(body);
        }
        Ok(())
    }
    fn adam_arena(&mut self, grad: &Self, m: &mut Self, v: &mut Self, ema: Option<&mut Self>, h: &ArenaStep) -> Result<()> {
        let n = self.len();
        if grad.len() != n || m.len() != n || v.len() != n || ema.as_ref().is_some_and(|e| e.len() != n) {
            bail!("adam_arena: parameter, gradient, moment and EMA arenas differ in length");
        }
        let gd = grad.float("adam_arena")?;
        let (md, vd, pd) = (m.as_f32_mut()?, v.as_f32_mut()?, self.as_f32_mut()?);
        let ed = match ema {
            Some(e) => Some(e.as_f32_mut()?),
            None => None,
        };
        // the chunks of one pass: each element is independent, so any split gives the same bits
        const CHUNK: usize = 1 << 14;
        let run = |c: usize, p: &mut [f32], e: Option<&mut [f32]>, m: &mut [f32], v: &mut [f32]| {
            let r = c * CHUNK..c * CHUNK + p.len();
            adam_arena_chunk(p, &gd[r], m, v, e, h);
        };
        match ed {
            Some(ed) if n >= PAR_MIN => {
                pd.par_chunks_mut(CHUNK).zip(ed.par_chunks_mut(CHUNK)).zip(md.par_chunks_mut(CHUNK)).zip(vd.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (((p, e), m), v))| run(c, p, Some(e), m, v))
            }
            None if n >= PAR_MIN => pd.par_chunks_mut(CHUNK).zip(md.par_chunks_mut(CHUNK)).zip(vd.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, ((p, m), v))| run(c, p, None, m, v)),
            ed => run(0, pd, ed, md, vd),
        }
        Ok(())
    }
    fn sum_squares(ts: &[&Self]) -> Result<f64> {
        Ok(ts.iter().map(|t| t.f32s().iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum())
    }
    fn sum_squares_on_device(ts: &[&Self]) -> Result<Self> {
        Ok(CpuStorage::from_f32(split_f64(Self::sum_squares(ts)?).to_vec()))
    }
}

impl CpuStorage {
    /// `conv2d(self, w, bias) + a` in one pass over the output, all operands f32: `a` of the
    /// output's shape, or `[N, Cout]` values (one per sample and channel) when `per_channel`.
    pub fn conv2d_add(&self, w: &Self, bias: Option<&Self>, a: &Self, per_channel: bool, g: &ConvGeom) -> Result<Self> {
        let (CpuStorage::F32(xb), CpuStorage::F32(wb), CpuStorage::F32(ab)) = (self, w, a) else { bail!("conv2d_add: f32 operands only") };
        if bias.is_some_and(|b| b.dtype() != DType::F32) {
            bail!("conv2d_add: f32 operands only");
        }
        let want = if per_channel { g.n * g.cout } else { g.n * g.cout * g.ho() * g.wo() };
        if ab.len() != want {
            bail!("conv2d_add: {} values to add, the output needs {want}", ab.len());
        }
        let add = if per_channel { Addend::PerChannel(ab) } else { Addend::Full(ab) };
        let bv = bias.map(|b| b.f32s());
        Ok(self.out(conv2d_forward_add(xb, wb, Some(wb), bv.as_deref(), Some(add), g)))
    }
}
