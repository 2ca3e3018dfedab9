//! The storage-level ops on f32 device data (and 32-bit data movement, which also moves i32):
//! each launches the kernels of `kernels/*.cu` on contiguous inputs whose shapes come with the
//! call, and returns a new storage (the `_in_place` ones write into their target, copied first
//! if shared). CPU twins: `backend/cpu` (named per function). Shapes are checked against the
//! storages' lengths, so a wrong call is an error, never an out-of-bounds access.
//!
//! The dtype handling (f16/bf16 widened to f32 and rounded back) is the caller's:
//! `storage.rs`.

use std::sync::Arc;

use anyhow::{Result, bail};

use super::gpu::{Arg, Gpu, GpuBuf, Launch};
use super::kargs::{BinGeom, ReduceGeom, Strided};
use super::storage::{CudaStorage, same_gpu};
use crate::backend::geom::broadcast_strides;
use crate::backend::{AdamStep, BinaryOp, RandomDist, UnaryOp};
use crate::tensor::DType;

pub(crate) fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// A new f32 storage of `n` values on `g`.
pub(crate) fn f32_out(g: &Arc<Gpu>, n: usize) -> Result<CudaStorage> {
    CudaStorage::alloc(g, n, DType::F32)
}

/// `x` must hold f32 values.
pub(crate) fn want_f32(x: &CudaStorage, op: &str) -> Result<()> {
    if x.storage_dtype() != DType::F32 {
        bail!("{op}: expected f32 values on the device, found {}", x.storage_dtype());
    }
    Ok(())
}

/// `x` must hold 32-bit elements (f32 or i32: data movement copies their bits).
fn want_words(x: &CudaStorage, op: &str) -> Result<()> {
    if x.storage_dtype().size() != 4 {
        bail!("{op}: expected 32-bit values on the device, found {}", x.storage_dtype());
    }
    Ok(())
}

/// `x` must hold exactly `n` values.
pub(crate) fn want_len(x: &CudaStorage, n: usize, op: &str, what: &str) -> Result<()> {
    if x.elements() != n {
        bail!("{op}: {what} holds {} values, its shape asks for {n}", x.elements());
    }
    Ok(())
}

/// Whether `from` broadcasts to `to` (NumPy rules).
fn broadcasts(from: &[usize], to: &[usize]) -> bool {
    from.len() <= to.len() && from.iter().rev().zip(to.iter().rev()).all(|(&f, &t)| f == t || f == 1)
}

/// The launch flag of the 16-bit kernels (half.cu): 1 for bf16, 0 for f16.
fn bf_flag(d: DType) -> Arg<'static> {
    Arg::U32(u32::from(d == DType::BF16))
}

/// f32, or one 16-bit dtype shared by all of `ts` (the element-wise ops read 16-bit values
/// directly: half.cu widens, applies the f32 arithmetic and rounds once, as the CPU reference).
fn elementwise_dtype(ts: &[&CudaStorage], op: &str) -> Result<DType> {
    let d = ts[0].storage_dtype();
    if !d.is_float() || ts.iter().any(|t| t.storage_dtype() != d) {
        bail!("{op}: operands of dtypes {:?} (one float dtype expected)", ts.iter().map(|t| t.storage_dtype()).collect::<Vec<_>>());
    }
    Ok(d)
}

/// `a op b` with broadcasting to `out` (CPU: `CpuStorage::binary`), in the operands' dtype.
pub fn binary(a: &CudaStorage, ash: &[usize], b: &CudaStorage, bsh: &[usize], out: &[usize], op: BinaryOp) -> Result<CudaStorage> {
    let g = same_gpu("binary", &[a, b])?;
    let d = elementwise_dtype(&[a, b], "binary")?;
    want_len(a, numel(ash), "binary", "the left operand")?;
    want_len(b, numel(bsh), "binary", "the right operand")?;
    let n = numel(out);
    let y = CudaStorage::alloc(&g, n, d)?;
    if n == 0 {
        return Ok(y);
    }
    let args = [Arg::I64(op as i64), Arg::Ptr(a.ptr()), Arg::Ptr(b.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64)];
    match (ash == out && bsh == out, d == DType::F32) {
        (true, true) => g.launch_n("binary_same_f32", n, &args)?,
        (true, false) => g.launch_n("binary_same_h16", n, &[&args[..], &[bf_flag(d)]].concat())?,
        (false, is_f32) => {
            let geom = BinGeom::try_new(ash, bsh, out)?;
            if is_f32 {
                g.launch_n("binary_f32", n, &[&args[..], &[Arg::Struct(&geom)]].concat())?;
            } else {
                g.launch_n("binary_h16", n, &[&args[..], &[Arg::Struct(&geom), bf_flag(d)]].concat())?;
            }
        }
    }
    Ok(y)
}

/// `op(x)` element-wise in `x`'s dtype; `s` is the scalar of `AddScalar`/`MulScalar` (CPU:
/// `storage::unary_f32`).
pub fn unary(x: &CudaStorage, op: UnaryOp, s: f32) -> Result<CudaStorage> {
    let d = elementwise_dtype(&[x], "unary")?;
    let n = x.elements();
    let y = CudaStorage::alloc(x.gpu(), n, d)?;
    if n > 0 {
        let args = [Arg::I64(op as i64), Arg::F32(s), Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64)];
        if d == DType::F32 {
            x.gpu().launch_n("unary_f32", n, &args)?;
        } else {
            x.gpu().launch_n("unary_h16", n, &[&args[..], &[bf_flag(d)]].concat())?;
        }
    }
    Ok(y)
}

/// The input gradient of `y = op(x)` from the output gradient `gy`, in their dtype (CPU:
/// `storage::unary_backward_f32`). `AddScalar` and `MulScalar` are differentiated as their own ops.
pub fn unary_backward(gy: &CudaStorage, op: UnaryOp, x: &CudaStorage, y: &CudaStorage) -> Result<CudaStorage> {
    let g = same_gpu("unary_backward", &[gy, x, y])?;
    if matches!(op, UnaryOp::AddScalar | UnaryOp::MulScalar) {
        bail!("unary_backward: {op:?} is differentiated as its own op");
    }
    let n = gy.elements();
    let d = elementwise_dtype(&[gy, x, y], "unary_backward")?;
    for (t, what) in [(gy, "the gradient"), (x, "the input"), (y, "the output")] {
        want_len(t, n, "unary_backward", what)?;
    }
    let dx = CudaStorage::alloc(&g, n, d)?;
    if n > 0 {
        let args = [Arg::I64(op as i64), Arg::Ptr(gy.ptr()), Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::Ptr(dx.ptr()), Arg::I64(n as i64)];
        if d == DType::F32 {
            g.launch_n("unary_backward_f32", n, &args)?;
        } else {
            g.launch_n("unary_backward_h16", n, &[&args[..], &[bf_flag(d)]].concat())?;
        }
    }
    Ok(dx)
}

/// `y ← a·x + b·y` in place (`y`'s buffer copied first if it is shared).
pub fn axpby(y: &mut CudaStorage, a: f32, x: &CudaStorage, b: f32) -> Result<()> {
    let g = same_gpu("axpby", &[&*y, x])?;
    want_f32(y, "axpby")?;
    want_f32(x, "axpby")?;
    let n = y.elements();
    want_len(x, n, "axpby", "x")?;
    let yp = y.make_mut()?;
    if n > 0 {
        g.launch_n("axpby_f32", n, &[Arg::F32(a), Arg::Ptr(x.ptr()), Arg::F32(b), Arg::Ptr(yp), Arg::I64(n as i64)])?;
    }
    Ok(())
}

/// One Adam update of `p` with gradient `gr` and moments `m`, `v`, all f32, in place (CPU:
/// `CpuStorage::adam_in_place`).
pub fn adam(p: &mut CudaStorage, gr: &CudaStorage, m: &mut CudaStorage, v: &mut CudaStorage, h: &AdamStep) -> Result<()> {
    let g = same_gpu("adam", &[&*p, gr, &*m, &*v])?;
    let n = p.elements();
    for (t, what) in [(&*p, "the parameter"), (gr, "the gradient"), (&*m, "the first moment"), (&*v, "the second moment")] {
        want_f32(t, "adam")?;
        want_len(t, n, "adam", what)?;
    }
    let pp = p.make_mut()?;
    let mp = m.make_mut()?;
    let vp = v.make_mut()?;
    if n == 0 {
        return Ok(());
    }
    let a =
        [Arg::Ptr(pp), Arg::Ptr(gr.ptr()), Arg::Ptr(mp), Arg::Ptr(vp), Arg::I64(n as i64), Arg::F32(h.step_size), Arg::F32(h.beta1), Arg::F32(h.beta2), Arg::F32(h.eps), Arg::F32(h.bc2_sqrt), Arg::F32(h.weight_decay)];
    g.launch_n("adam_step_f32", n, &a)
}

/// `Σ x²` over every element of every tensor, in f64, with one read-back for all.
pub fn sum_squares(ts: &[&CudaStorage]) -> Result<f64> {
    if ts.is_empty() {
        return Ok(0.0);
    }
    let g = same_gpu("sum_squares", ts)?;
    let (partial, n) = square_partials(&g, ts)?;
    let mut sums = vec![0.0f64; n];
    g.download_into(&partial, &mut sums)?;
    Ok(sums.iter().sum())
}

/// `Σ x²` over all of `ts`, left on the device as the f32 pair `[hi, lo]` of the f64 sum (CPU:
/// `CpuStorage::sum_squares_on_device`): per-tensor partial sums in double, then one block adds
/// them in a fixed order. Nothing is read back.
pub fn sum_squares_on_device(g: &Arc<Gpu>, ts: &[&CudaStorage]) -> Result<CudaStorage> {
    if ts.is_empty() {
        return CudaStorage::full(g, 2, 0.0, DType::F32);
    }
    let out = f32_out(g, 2)?;
    let (partial, n) = square_partials(g, ts)?;
    g.launch("sum_partials_split_f64", Launch::linear(1, 256).any_block(), &[Arg::Ptr(partial.ptr()), Arg::I64(n as i64), Arg::Ptr(out.ptr())])?;
    Ok(out)
}

/// The first stage of both sums of squares: per tensor, 64 partial sums of `x²` in double
/// (`sum_squares_partial_f32`); returns the buffer and how many doubles it holds.
fn square_partials(g: &Arc<Gpu>, ts: &[&CudaStorage]) -> Result<(GpuBuf, usize)> {
    const BLOCKS: usize = 64;
    // doubles, two words each
    let partial = g.alloc(2 * BLOCKS * ts.len())?;
    for (i, t) in ts.iter().enumerate() {
        want_f32(t, "sum_squares")?;
        let dst = partial.ptr() + (i * BLOCKS * 8) as u64;
        g.launch("sum_squares_partial_f32", Launch::linear(BLOCKS as u32, 256).any_block(), &[Arg::Ptr(t.ptr()), Arg::I64(t.elements() as i64), Arg::Ptr(dst)])?;
    }
    Ok((partial, BLOCKS * ts.len()))
}

// ---------------------------------------------------------------- random draws (kernels/rng.cu)

/// `n` Philox draws of `dist` at `(seed, offset)` in f32 (CPU: `rng::philox::fill_uniform` /
/// `fill_normal`, the same bits for uniforms, normals to the device's `logf`/`sincosf`).
pub fn philox(g: &Arc<Gpu>, n: usize, dist: RandomDist, seed: u64, offset: u64) -> Result<CudaStorage> {
    let y = f32_out(g, n)?;
    if n > 0 {
        let k = match dist {
            RandomDist::Uniform => "philox_uniform_f32",
            RandomDist::Normal => "philox_normal_f32",
        };
        g.launch_n(k, crate::rng::philox::blocks_for(n) as usize, &[Arg::Ptr(y.ptr()), Arg::I64(n as i64), Arg::I64(seed as i64), Arg::I64(offset as i64)])?;
    }
    Ok(y)
}

/// `y = x · m`, the dropout mask of `(seed, offset, p)` (CPU: `rng::philox::dropout`).
pub fn dropout(x: &CudaStorage, p: f32, seed: u64, offset: u64) -> Result<CudaStorage> {
    want_f32(x, "dropout")?;
    let n = x.elements();
    let y = f32_out(x.gpu(), n)?;
    if n > 0 {
        let blocks = crate::rng::philox::blocks_for(n) as usize;
        x.gpu().launch_n("dropout_f32", blocks, &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::Ptr(0), Arg::I64(n as i64), Arg::F32(p), Arg::I64(seed as i64), Arg::I64(offset as i64)])?;
    }
    Ok(y)
}

// ---------------------------------------------------------------- reductions and layout

/// `x` (of shape `from`) summed down to `to` (CPU: `elementwise::sum_to_shape`; sums in double).
pub fn sum_to_shape(x: &CudaStorage, from: &[usize], to: &[usize]) -> Result<CudaStorage> {
    want_f32(x, "sum_to_shape")?;
    want_len(x, numel(from), "sum_to_shape", "the input")?;
    let (geom, out_n, red_n) = ReduceGeom::try_new(from, to)?;
    if red_n == 1 {
        return Ok(x.clone());
    }
    let y = f32_out(x.gpu(), out_n)?;
    if out_n > 0 {
        x.gpu().launch_rows("reduce_sum_f32", out_n, &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(out_n as i64), Arg::I64(red_n as i64), Arg::Struct(&geom)])?;
    }
    Ok(y)
}

/// A contiguous copy of the strided view `(shape, strides)` of `x` (CPU:
/// `elementwise::gather_strided`): permutations, and broadcasts (stride 0). 32-bit elements
/// (f32, or i32 moved bit for bit).
pub fn gather_strided(x: &CudaStorage, shape: &[usize], strides: &[usize]) -> Result<CudaStorage> {
    want_words(x, "gather_strided")?;
    let s = Strided::try_new(shape, strides)?;
    let reach = Strided::extent(shape, strides);
    if reach > x.elements() {
        bail!("gather_strided: the view {shape:?} / {strides:?} reaches {reach} values of {}", x.elements());
    }
    let n = numel(shape);
    let y = CudaStorage::alloc(x.gpu(), n, x.storage_dtype())?;
    if n > 0 {
        x.gpu().launch_n("gather_strided_f32", n, &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64), Arg::Struct(&s)])?;
    }
    Ok(y)
}

/// `x` of shape `from` repeated to `to` (CPU: `elementwise::broadcast_to`); 32-bit elements.
pub fn broadcast_to(x: &CudaStorage, from: &[usize], to: &[usize]) -> Result<CudaStorage> {
    want_len(x, numel(from), "broadcast_to", "the input")?;
    if from == to {
        return Ok(x.clone());
    }
    if !broadcasts(from, to) {
        bail!("broadcast_to: {from:?} does not broadcast to {to:?}");
    }
    gather_strided(x, to, &broadcast_strides(from, to))
}

fn rows_op(name: &str, a: &CudaStorage, b: Option<&CudaStorage>, n: usize) -> Result<CudaStorage> {
    let g = match b {
        Some(b) => same_gpu(name, &[a, b])?,
        None => a.gpu().clone(),
    };
    // rows of 0 are rows of 1, as on the CPU (`chunks(n.max(1))`)
    let n = n.max(1);
    want_f32(a, name)?;
    let len = a.elements();
    if !len.is_multiple_of(n) {
        bail!("{name}: {len} values are not rows of {n}");
    }
    if let Some(b) = b {
        want_f32(b, name)?;
        want_len(b, len, name, "the gradient")?;
    }
    let rows = len / n;
    let y = f32_out(&g, len)?;
    if rows == 0 {
        return Ok(y);
    }
    let mut args = vec![Arg::Ptr(a.ptr())];
    if let Some(b) = b {
        args.push(Arg::Ptr(b.ptr()));
    }
    args.extend([Arg::Ptr(y.ptr()), Arg::I64(rows as i64), Arg::I64(n as i64)]);
    g.launch_rows(name, rows, &args)?;
    Ok(y)
}

/// Softmax over rows of `n` (CPU: `elementwise::softmax_rows`).
pub fn softmax_rows(x: &CudaStorage, n: usize) -> Result<CudaStorage> {
    rows_op("softmax_rows_f32", x, None, n)
}
/// `dx` from the softmax output `y` and `dy` (CPU: `elementwise::softmax_rows_backward`).
pub fn softmax_rows_backward(y: &CudaStorage, dy: &CudaStorage, n: usize) -> Result<CudaStorage> {
    rows_op("softmax_rows_backward_f32", y, Some(dy), n)
}
/// Log-softmax over rows of `n` (CPU: `storage::log_softmax_rows`).
pub fn log_softmax_rows(x: &CudaStorage, n: usize) -> Result<CudaStorage> {
    rows_op("log_softmax_rows_f32", x, None, n)
}
/// `dx = dy − exp(y)·Σdy` per row, `y` the log-probabilities (CPU: `storage::log_softmax_rows_backward`).
pub fn log_softmax_rows_backward(y: &CudaStorage, dy: &CudaStorage, n: usize) -> Result<CudaStorage> {
    rows_op("log_softmax_rows_backward_f32", y, Some(dy), n)
}

fn outer_inner(shape: &[usize], axis: usize) -> (usize, usize) {
    (shape[..axis].iter().product(), shape[axis + 1..].iter().product())
}

/// For o < outer, j < len: `dst[o·dst_stride + dst_off + j] = src[o·src_stride + src_off + j]`.
#[allow(clippy::too_many_arguments)]
fn copy_slab(g: &Gpu, src: u64, dst: u64, outer: usize, len: usize, src_stride: usize, src_off: usize, dst_stride: usize, dst_off: usize) -> Result<()> {
    if outer * len == 0 {
        return Ok(());
    }
    let a = [Arg::Ptr(src), Arg::Ptr(dst), Arg::I64(outer as i64), Arg::I64(len as i64), Arg::I64(src_stride as i64), Arg::I64(src_off as i64), Arg::I64(dst_stride as i64), Arg::I64(dst_off as i64)];
    g.launch_n("copy_slab_f32", outer * len, &a)
}

/// Concatenation along `axis` (CPU: `elementwise::concat`); 32-bit elements of one dtype.
pub fn concat(parts: &[(&CudaStorage, &[usize])], axis: usize) -> Result<CudaStorage> {
    let Some(&(first, shape0)) = parts.first() else { bail!("concat of no tensors") };
    let all: Vec<&CudaStorage> = parts.iter().map(|p| p.0).collect();
    let g = same_gpu("concat", &all)?;
    if axis >= shape0.len() {
        bail!("concat: axis {axis} of shapes with {} axes", shape0.len());
    }
    let mut shape = shape0.to_vec();
    shape[axis] = 0;
    for &(p, s) in parts {
        want_words(p, "concat")?;
        if p.storage_dtype() != first.storage_dtype() {
            bail!("concat: operands of dtypes {} and {} (cast one with to_dtype)", first.storage_dtype(), p.storage_dtype());
        }
        want_len(p, numel(s), "concat", "a part")?;
        let same_rest = s.len() == shape0.len() && s.iter().zip(shape0).enumerate().all(|(i, (a, b))| i == axis || a == b);
        if !same_rest {
            bail!("concat along axis {axis}: shapes {shape0:?} and {s:?}");
        }
        shape[axis] += s[axis];
    }
    let (outer, inner) = outer_inner(&shape, axis);
    let y = CudaStorage::alloc(&g, numel(&shape), first.storage_dtype())?;
    let mut start = 0;
    for &(p, s) in parts {
        let len = s[axis] * inner;
        copy_slab(&g, p.ptr(), y.ptr(), outer, len, len, 0, shape[axis] * inner, start * inner)?;
        start += s[axis];
    }
    Ok(y)
}

fn check_narrow(op: &str, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<()> {
    if axis >= shape.len() || start + len > shape[axis] {
        bail!("{op}: [{start}, {}) along axis {axis} of {shape:?}", start + len);
    }
    Ok(())
}

/// `[start, start+len)` along `axis` of `x` (of `shape`) (CPU: `elementwise::narrow`); 32-bit elements.
pub fn narrow(x: &CudaStorage, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<CudaStorage> {
    want_words(x, "narrow")?;
    want_len(x, numel(shape), "narrow", "the input")?;
    check_narrow("narrow", shape, axis, start, len)?;
    let (outer, inner) = outer_inner(shape, axis);
    let y = CudaStorage::alloc(x.gpu(), outer * len * inner, x.storage_dtype())?;
    copy_slab(x.gpu(), x.ptr(), y.ptr(), outer, len * inner, shape[axis] * inner, start * inner, len * inner, 0)?;
    Ok(y)
}

/// The gradient of [`narrow`]: `gy` placed in zeros of `shape` (CPU: `elementwise::narrow_backward`).
pub fn narrow_backward(gy: &CudaStorage, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<CudaStorage> {
    want_words(gy, "narrow_backward")?;
    check_narrow("narrow_backward", shape, axis, start, len)?;
    let (outer, inner) = outer_inner(shape, axis);
    want_len(gy, outer * len * inner, "narrow_backward", "the gradient")?;
    let y = CudaStorage::full(gy.gpu(), numel(shape), 0.0, gy.storage_dtype())?;
    copy_slab(gy.gpu(), gy.ptr(), y.ptr(), outer, len * inner, len * inner, 0, shape[axis] * inner, start * inner)?;
    Ok(y)
}

fn image_op(name: &str, x: &CudaStorage, in_n: usize, out_n: usize, nc: usize, h: usize, w: usize) -> Result<CudaStorage> {
    want_f32(x, name)?;
    want_len(x, in_n, name, "the input")?;
    let y = f32_out(x.gpu(), out_n)?;
    if out_n > 0 {
        x.gpu().launch_n(name, out_n, &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(nc as i64), Arg::I64(h as i64), Arg::I64(w as i64)])?;
    }
    Ok(y)
}

/// Nearest 2× upsampling of `[nc, h, w]` (CPU: `elementwise::upsample_nearest2x`).
pub fn upsample_nearest2x(x: &CudaStorage, nc: usize, h: usize, w: usize) -> Result<CudaStorage> {
    image_op("upsample_nearest2x_f32", x, nc * h * w, nc * 4 * h * w, nc, h, w)
}
/// Its gradient, `[nc, 2h, 2w] → [nc, h, w]`.
pub fn upsample_nearest2x_backward(gy: &CudaStorage, nc: usize, h: usize, w: usize) -> Result<CudaStorage> {
    image_op("upsample_nearest2x_backward_f32", gy, nc * 4 * h * w, nc * h * w, nc, h, w)
}
/// 2×2 average pooling, stride 2 (floor), of `[nc, h, w]` (CPU: `elementwise::avg_pool2x`).
pub fn avg_pool2x(x: &CudaStorage, nc: usize, h: usize, w: usize) -> Result<CudaStorage> {
    image_op("avg_pool2x_f32", x, nc * h * w, nc * (h / 2) * (w / 2), nc, h, w)
}
/// Its gradient back to `[nc, h, w]`.
pub fn avg_pool2x_backward(gy: &CudaStorage, nc: usize, h: usize, w: usize) -> Result<CudaStorage> {
    image_op("avg_pool2x_backward_f32", gy, nc * (h / 2) * (w / 2), nc * h * w, nc, h, w)
}

/// The ids of an embedding, checked on the host: an id outside the table is an error (as on the
/// CPU), not an out-of-bounds read on the device. This reads the ids back (a few bytes; the
/// stream waits for them).
fn check_ids(ids: &CudaStorage, num: usize) -> Result<()> {
    if ids.storage_dtype() != DType::I32 {
        bail!("expected i32 indices, found {}", ids.storage_dtype());
    }
    let host = crate::backend::BackendStorage::to_cpu_storage(ids)?;
    if let Some(&bad) = host.as_i32()?.iter().find(|&&i| i < 0 || i as usize >= num) {
        bail!("index {bad} is out of range for an embedding of {num} rows");
    }
    Ok(())
}

/// Rows `ids[r]` of the table `w [num, dim]` (CPU: `CpuStorage::embedding`).
pub fn embedding(w: &CudaStorage, ids: &CudaStorage, num: usize, dim: usize) -> Result<CudaStorage> {
    let g = same_gpu("embedding", &[w, ids])?;
    want_f32(w, "embedding")?;
    want_len(w, num * dim, "embedding", "the table")?;
    check_ids(ids, num)?;
    let nids = ids.elements();
    let y = f32_out(&g, nids * dim)?;
    if nids * dim > 0 {
        g.launch_n("embedding_forward_f32", nids * dim, &[Arg::Ptr(w.ptr()), Arg::Ptr(ids.ptr()), Arg::Ptr(y.ptr()), Arg::I64(nids as i64), Arg::I64(dim as i64)])?;
    }
    Ok(y)
}

/// The table's gradient `[num, dim]` from the rows' gradient `gy [ids, dim]`.
pub fn embedding_backward(gy: &CudaStorage, ids: &CudaStorage, num: usize, dim: usize) -> Result<CudaStorage> {
    let g = same_gpu("embedding_backward", &[gy, ids])?;
    want_f32(gy, "embedding_backward")?;
    check_ids(ids, num)?;
    let nids = ids.elements();
    want_len(gy, nids * dim, "embedding_backward", "the gradient")?;
    let y = f32_out(&g, num * dim)?;
    if num * dim > 0 {
        let a = [Arg::Ptr(gy.ptr()), Arg::Ptr(ids.ptr()), Arg::Ptr(y.ptr()), Arg::I64(nids as i64), Arg::I64(num as i64), Arg::I64(dim as i64)];
        g.launch_n("embedding_backward_f32", num * dim, &a)?;
    }
    Ok(y)
}

/// torchcfm's sinusoidal embedding of `t [b]` → `[b, dim]` (CPU: `elementwise::timestep_embedding`).
pub fn timestep_embedding(t: &CudaStorage, dim: usize, max_period: f32) -> Result<CudaStorage> {
    want_f32(t, "timestep_embedding")?;
    let b = t.elements();
    let y = f32_out(t.gpu(), b * dim)?;
    let lmp = (max_period as f64).ln() as f32;
    if b * dim > 0 {
        t.gpu().launch_n("timestep_embedding_f32", b * dim, &[Arg::Ptr(t.ptr()), Arg::Ptr(y.ptr()), Arg::I64(b as i64), Arg::I64(dim as i64), Arg::F32(lmp)])?;
    }
    Ok(y)
}

/// `dt [b]` from the embedding `e [b, dim]` and its gradient (CPU: `storage::timestep_embedding_backward`).
pub fn timestep_embedding_backward(e: &CudaStorage, gy: &CudaStorage, dim: usize, max_period: f32) -> Result<CudaStorage> {
    let g = same_gpu("timestep_embedding_backward", &[e, gy])?;
    want_f32(e, "timestep_embedding_backward")?;
    want_f32(gy, "timestep_embedding_backward")?;
    let b = e.elements().checked_div(dim).unwrap_or(0);
    want_len(e, b * dim, "timestep_embedding_backward", "the embedding")?;
    want_len(gy, b * dim, "timestep_embedding_backward", "the gradient")?;
    let y = f32_out(&g, b)?;
    let lmp = (max_period as f64).ln() as f32;
    if b > 0 {
        g.launch_n("timestep_embedding_backward_f32", b, &[Arg::Ptr(e.ptr()), Arg::Ptr(gy.ptr()), Arg::Ptr(y.ptr()), Arg::I64(b as i64), Arg::I64(dim as i64), Arg::F32(lmp)])?;
    }
    Ok(y)
}

/// `y[n, c, s] += bias[c]` in place (the bias of a convolution).
pub fn add_channel_bias(y: &mut CudaStorage, bias: &CudaStorage, n: usize, c: usize, s: usize) -> Result<()> {
    let g = same_gpu("bias", &[&*y, bias])?;
    want_f32(y, "bias")?;
    want_f32(bias, "bias")?;
    want_len(y, n * c * s, "bias", "the output")?;
    want_len(bias, c, "bias", "the bias")?;
    let yp = y.make_mut()?;
    if n * c * s > 0 {
        g.launch_n("add_channel_bias_f32", n * c * s, &[Arg::Ptr(yp), Arg::Ptr(bias.ptr()), Arg::I64(n as i64), Arg::I64(c as i64), Arg::I64(s as i64)])?;
    }
    Ok(())
}
