//! The one place that picks a backend: [`Storage`] holds a CPU or a CUDA storage and forwards
//! each op to that backend's [`BackendStorage`] implementation. Operands on different devices
//! are an error naming both; nothing is copied behind the caller's back.

use anyhow::{Result, bail};

use super::custom::{Args, CustomFwd, CustomOp, Shaped};
use super::{DType, Device, Tensor};
use crate::backend::cpu::CpuStorage;
use crate::backend::cuda::CudaStorage;
use crate::backend::{AdamStep, ArenaStep, AttnGeom, BackendStorage, BinaryOp, ConvGeom, NormGeom, RandomDist, UnaryOp};

/// A tensor's values: host memory or a GPU buffer, in one dtype.
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

/// Check that every operand of `op` is on one device.
pub fn same_device(op: &str, ts: &[&Storage]) -> Result<Device> {
    let d = ts[0].device();
    if let Some(o) = ts.iter().map(|t| t.device()).find(|&o| o != d) {
        bail!("{op}: operands on {d} and {o}; move one with to_device first");
    }
    Ok(d)
}

/// `match` the operands' backends (all on one device, checked first) and run `$body` with the
/// backend storages bound to the same names; the result is wrapped back with `$wrap`.
macro_rules! on_backend {
    ($op:expr, [$($x:ident),+], $body:expr) => {{
        same_device($op, &[$(&$x),+])?;
        match ($($x),+,) {
            ($(Storage::Cpu($x)),+,) => { let _p = crate::backend::cpu::profile::scope($op); let r = $body; r.map(|v| v.into_storage()) }
            ($(Storage::Cuda($x)),+,) => { let r = $body; r.map(|v| v.into_storage()) }
            #[allow(unreachable_patterns)]
            _ => unreachable!("same_device checked the devices"),
        }
    }};
}

/// Turn a backend result (one storage, or a tuple of them) into [`Storage`]s.
pub trait IntoStorage {
    type Out;
    fn into_storage(self) -> Self::Out;
}
impl IntoStorage for CpuStorage {
    type Out = Storage;
    fn into_storage(self) -> Storage {
        Storage::Cpu(self)
    }
}
impl IntoStorage for CudaStorage {
    type Out = Storage;
    fn into_storage(self) -> Storage {
        Storage::Cuda(self)
    }
}
impl<A: IntoStorage, B: IntoStorage> IntoStorage for (A, B) {
    type Out = (A::Out, B::Out);
    fn into_storage(self) -> Self::Out {
        (self.0.into_storage(), self.1.into_storage())
    }
}
impl<A: IntoStorage, B: IntoStorage, C: IntoStorage> IntoStorage for (A, B, C) {
    type Out = (A::Out, B::Out, C::Out);
    fn into_storage(self) -> Self::Out {
        (self.0.into_storage(), self.1.into_storage(), self.2.into_storage())
    }
}
impl<A: IntoStorage> IntoStorage for Option<A> {
    type Out = Option<A::Out>;
    fn into_storage(self) -> Self::Out {
        self.map(|a| a.into_storage())
    }
}
impl IntoStorage for () {
    type Out = ();
    fn into_storage(self) {}
}
impl IntoStorage for f64 {
    type Out = f64;
    fn into_storage(self) -> f64 {
        self
    }
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => s.device(),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn ptr_eq(&self, o: &Storage) -> bool {
        match (self, o) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.ptr_eq(b),
            (Storage::Cuda(a), Storage::Cuda(b)) => a.ptr_eq(b),
            _ => false,
        }
    }
    /// The values in host memory.
    pub fn to_cpu_storage(&self) -> Result<CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s.clone()),
            Storage::Cuda(s) => s.to_cpu_storage(),
        }
    }
    /// These values on `device` (shared when already there).
    pub fn to_device(&self, device: Device) -> Result<Storage> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let host = self.to_cpu_storage()?;
        Ok(match device {
            Device::Cpu => Storage::Cpu(host),
            Device::Cuda(i) => Storage::Cuda(CudaStorage::from_cpu(&crate::backend::cuda::gpu(i)?, &host)?),
        })
    }
    /// `n` copies of `v` in `dtype` on `device`.
    pub fn full(device: Device, n: usize, v: f32, dtype: DType) -> Result<Storage> {
        Ok(match device {
            Device::Cpu => Storage::Cpu(CpuStorage::from_f32_as(vec![v; n], dtype)),
            Device::Cuda(i) => Storage::Cuda(CudaStorage::full(&crate::backend::cuda::gpu(i)?, n, v, dtype)?),
        })
    }
    /// The `n` values of the Philox draw `(seed, offset)` of `dist`, made on `device`, in `dtype`.
    pub fn philox(device: Device, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Storage> {
        Ok(match device {
            Device::Cpu => Storage::Cpu(CpuStorage::philox(n, dist, seed, offset, dtype)?),
            Device::Cuda(i) => Storage::Cuda(CudaStorage::philox(&crate::backend::cuda::gpu(i)?, n, dist, seed, offset, dtype)?),
        })
    }
    /// The same draw on this storage's device.
    pub fn philox_like(&self, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Storage> {
        let a = self;
        on_backend!("philox", [a], a.philox_like(n, dist, seed, offset, dtype))
    }
    pub fn dropout(&self, p: f32, seed: u64, offset: u64) -> Result<Storage> {
        let a = self;
        on_backend!("dropout", [a], a.dropout(p, seed, offset))
    }
    pub fn to_dtype(&self, dtype: DType) -> Result<Storage> {
        let a = self;
        on_backend!("to_dtype", [a], a.to_dtype(dtype))
    }

    pub fn binary(&self, sa: &[usize], rhs: &Storage, sb: &[usize], out: &[usize], op: BinaryOp) -> Result<Storage> {
        let (a, b) = (self, rhs);
        on_backend!("binary", [a, b], a.binary(sa, b, sb, out, op))
    }
    pub fn unary(&self, op: UnaryOp, s: f32) -> Result<Storage> {
        let a = self;
        on_backend!("unary", [a], a.unary(op, s))
    }
    pub fn unary_backward(&self, op: UnaryOp, x: &Storage, y: &Storage) -> Result<Storage> {
        let g = self;
        on_backend!("unary_backward", [g, x, y], g.unary_backward(op, x, y))
    }
    pub fn sum_to_shape(&self, from: &[usize], to: &[usize]) -> Result<Storage> {
        let a = self;
        on_backend!("sum_to_shape", [a], a.sum_to_shape(from, to))
    }
    pub fn broadcast_to(&self, from: &[usize], to: &[usize]) -> Result<Storage> {
        let a = self;
        on_backend!("broadcast_to", [a], a.broadcast_to(from, to))
    }
    pub fn gather_strided(&self, shape: &[usize], strides: &[usize]) -> Result<Storage> {
        let a = self;
        on_backend!("permute", [a], a.gather_strided(shape, strides))
    }
    pub fn softmax_rows(&self, n: usize) -> Result<Storage> {
        let a = self;
        on_backend!("softmax", [a], a.softmax_rows(n))
    }
    pub fn softmax_rows_backward(&self, dy: &Storage, n: usize) -> Result<Storage> {
        let y = self;
        on_backend!("softmax_backward", [y, dy], y.softmax_rows_backward(dy, n))
    }
    pub fn log_softmax_rows(&self, n: usize) -> Result<Storage> {
        let a = self;
        on_backend!("log_softmax", [a], a.log_softmax_rows(n))
    }
    pub fn log_softmax_rows_backward(&self, dy: &Storage, n: usize) -> Result<Storage> {
        let y = self;
        on_backend!("log_softmax_backward", [y, dy], y.log_softmax_rows_backward(dy, n))
    }
    pub fn concat(parts: &[(&Storage, &[usize])], axis: usize) -> Result<Storage> {
        let all: Vec<&Storage> = parts.iter().map(|p| p.0).collect();
        if all.is_empty() {
            bail!("concat of no tensors");
        }
        same_device("concat", &all)?;
        match all[0] {
            Storage::Cpu(_) => {
                let _p = crate::backend::cpu::profile::scope("concat");
                let ps: Vec<(&CpuStorage, &[usize])> = parts.iter().map(|(s, sh)| (if let Storage::Cpu(c) = s { c } else { unreachable!() }, *sh)).collect();
                Ok(Storage::Cpu(CpuStorage::concat(&ps, axis)?))
            }
            Storage::Cuda(_) => {
                let ps: Vec<(&CudaStorage, &[usize])> = parts.iter().map(|(s, sh)| (if let Storage::Cuda(c) = s { c } else { unreachable!() }, *sh)).collect();
                Ok(Storage::Cuda(CudaStorage::concat(&ps, axis)?))
            }
        }
    }
    pub fn narrow(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Storage> {
        let a = self;
        on_backend!("narrow", [a], a.narrow(shape, axis, start, len))
    }
    pub fn narrow_backward(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Storage> {
        let a = self;
        on_backend!("narrow_backward", [a], a.narrow_backward(shape, axis, start, len))
    }
    pub fn upsample_nearest2x(&self, nc: usize, h: usize, w: usize) -> Result<Storage> {
        let a = self;
        on_backend!("upsample_nearest2x", [a], a.upsample_nearest2x(nc, h, w))
    }
    pub fn upsample_nearest2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Storage> {
        let a = self;
        on_backend!("upsample_nearest2x_backward", [a], a.upsample_nearest2x_backward(nc, h, w))
    }
    pub fn avg_pool2x(&self, nc: usize, h: usize, w: usize) -> Result<Storage> {
        let a = self;
        on_backend!("avg_pool2x", [a], a.avg_pool2x(nc, h, w))
    }
    pub fn avg_pool2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Storage> {
        let a = self;
        on_backend!("avg_pool2x_backward", [a], a.avg_pool2x_backward(nc, h, w))
    }
    pub fn embedding(&self, ids: &Storage, num: usize, dim: usize) -> Result<Storage> {
        let w = self;
        on_backend!("embedding", [w, ids], w.embedding(ids, num, dim))
    }
    pub fn embedding_backward(&self, ids: &Storage, num: usize, dim: usize) -> Result<Storage> {
        let g = self;
        on_backend!("embedding_backward", [g, ids], g.embedding_backward(ids, num, dim))
    }
    pub fn timestep_embedding(&self, dim: usize, max_period: f32) -> Result<Storage> {
        let a = self;
        on_backend!("timestep_embedding", [a], a.timestep_embedding(dim, max_period))
    }
    pub fn timestep_embedding_backward(&self, gy: &Storage, dim: usize, max_period: f32) -> Result<Storage> {
        let e = self;
        on_backend!("timestep_embedding_backward", [e, gy], e.timestep_embedding_backward(gy, dim, max_period))
    }
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(&self, ta: bool, b: &Storage, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Result<Storage> {
        let a = self;
        on_backend!("matmul", [a, b], a.matmul(ta, b, tb, m, n, k, alpha))
    }
    pub fn linear(&self, w: &Storage, bias: Option<&Storage>, n: usize, i: usize, o: usize) -> Result<Storage> {
        let x = self;
        match bias {
            Some(bias) => on_backend!("linear", [x, w, bias], x.linear(w, Some(bias), n, i, o)),
            None => on_backend!("linear", [x, w], x.linear(w, None, n, i, o)),
        }
    }
    pub fn conv2d(&self, w: &Storage, bias: Option<&Storage>, g: &ConvGeom) -> Result<Storage> {
        let x = self;
        match bias {
            Some(bias) => on_backend!("conv2d", [x, w, bias], x.conv2d(w, Some(bias), g)),
            None => on_backend!("conv2d", [x, w], x.conv2d(w, None, g)),
        }
    }
    pub fn conv2d_backward(&self, w: &Storage, dy: &Storage, g: &ConvGeom, need_dx: bool) -> Result<(Option<Storage>, Storage, Storage)> {
        let x = self;
        on_backend!("conv2d_backward", [x, w, dy], x.conv2d_backward(w, dy, g, need_dx))
    }
    pub fn group_norm(&self, gamma: &Storage, beta: &Storage, g: &NormGeom) -> Result<(Storage, Storage, Storage)> {
        let x = self;
        on_backend!("group_norm", [x, gamma, beta], x.group_norm(gamma, beta, g))
    }
    pub fn group_norm_backward(&self, dy: &Storage, gamma: &Storage, mean: &Storage, rstd: &Storage, g: &NormGeom) -> Result<(Storage, Storage, Storage)> {
        let x = self;
        on_backend!("group_norm_backward", [x, dy, gamma, mean, rstd], x.group_norm_backward(dy, gamma, mean, rstd, g))
    }
    pub fn qkv_attention(&self, g: &AttnGeom) -> Result<(Storage, Storage)> {
        let a = self;
        on_backend!("qkv_attention", [a], a.qkv_attention(g))
    }
    pub fn qkv_attention_backward(&self, probs: &Storage, dout: &Storage, g: &AttnGeom) -> Result<Storage> {
        let q = self;
        on_backend!("qkv_attention_backward", [q, probs, dout], q.qkv_attention_backward(probs, dout, g))
    }
    pub fn axpby_in_place(&mut self, a: f32, x: &Storage, b: f32) -> Result<()> {
        same_device("axpby", &[self, x])?;
        match (self, x) {
            (Storage::Cpu(y), Storage::Cpu(x)) => y.axpby_in_place(a, x, b),
            (Storage::Cuda(y), Storage::Cuda(x)) => y.axpby_in_place(a, x, b),
            _ => unreachable!("same_device checked the devices"),
        }
    }
    pub fn adam_in_place(&mut self, grad: &Storage, m: &mut Storage, v: &mut Storage, h: &AdamStep) -> Result<()> {
        same_device("adam", &[self, grad, m, v])?;
        match (self, grad, m, v) {
            (Storage::Cpu(p), Storage::Cpu(g), Storage::Cpu(m), Storage::Cpu(v)) => p.adam_in_place(g, m, v, h),
            (Storage::Cuda(p), Storage::Cuda(g), Storage::Cuda(m), Storage::Cuda(v)) => p.adam_in_place(g, m, v, h),
            _ => unreachable!("same_device checked the devices"),
        }
    }
    /// The optimiser's one pass over flat arenas (see [`BackendStorage::adam_arena`]).
    pub fn adam_arena(&mut self, grad: &Storage, m: &mut Storage, v: &mut Storage, ema: Option<&mut Storage>, h: &ArenaStep) -> Result<()> {
        match ema {
            Some(e) => {
                same_device("adam_arena", &[self, grad, m, v, e])?;
                match (self, grad, m, v, e) {
                    (Storage::Cpu(p), Storage::Cpu(g), Storage::Cpu(m), Storage::Cpu(v), Storage::Cpu(e)) => p.adam_arena(g, m, v, Some(e), h),
                    (Storage::Cuda(p), Storage::Cuda(g), Storage::Cuda(m), Storage::Cuda(v), Storage::Cuda(e)) => p.adam_arena(g, m, v, Some(e), h),
                    _ => unreachable!("same_device checked the devices"),
                }
            }
            None => {
                same_device("adam_arena", &[self, grad, m, v])?;
                match (self, grad, m, v) {
                    (Storage::Cpu(p), Storage::Cpu(g), Storage::Cpu(m), Storage::Cpu(v)) => p.adam_arena(g, m, v, None, h),
                    (Storage::Cuda(p), Storage::Cuda(g), Storage::Cuda(m), Storage::Cuda(v)) => p.adam_arena(g, m, v, None, h),
                    _ => unreachable!("same_device checked the devices"),
                }
            }
        }
    }
    /// Elements `[off, off + len)` of this storage, sharing its memory (a zero-copy view).
    pub fn view(&self, off: usize, len: usize) -> Result<Storage> {
        Ok(match self {
            Storage::Cpu(s) => Storage::Cpu(s.view(off, len)?),
            Storage::Cuda(s) => Storage::Cuda(s.view(off, len)?),
        })
    }
    /// Whether this is the view `[off, off + len)` of `arena` (its memory, not a copy).
    pub fn is_view_of(&self, arena: &Storage, off: usize, len: usize) -> bool {
        match (self, arena) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.is_view_of(b, off, len),
            (Storage::Cuda(a), Storage::Cuda(b)) => a.is_view_of(b, off, len),
            _ => false,
        }
    }
    pub fn sum_squares(ts: &[&Storage]) -> Result<f64> {
        if ts.is_empty() {
            return Ok(0.0);
        }
        same_device("sum_squares", ts)?;
        match ts[0] {
            Storage::Cpu(_) => CpuStorage::sum_squares(&ts.iter().map(|s| if let Storage::Cpu(c) = s { c } else { unreachable!() }).collect::<Vec<_>>()),
            Storage::Cuda(_) => CudaStorage::sum_squares(&ts.iter().map(|s| if let Storage::Cuda(c) = s { c } else { unreachable!() }).collect::<Vec<_>>()),
        }
    }
    /// `Σ x²` as the device-resident f32 pair `[hi, lo]` (see [`BackendStorage::sum_squares_on_device`]).
    pub fn sum_squares_on_device(ts: &[&Storage]) -> Result<Storage> {
        if ts.is_empty() {
            bail!("sum_squares_on_device of no tensors (no device to put the sum on)");
        }
        same_device("sum_squares", ts)?;
        Ok(match ts[0] {
            Storage::Cpu(_) => Storage::Cpu(CpuStorage::sum_squares_on_device(&ts.iter().map(|s| if let Storage::Cpu(c) = s { c } else { unreachable!() }).collect::<Vec<_>>())?),
            Storage::Cuda(_) => Storage::Cuda(CudaStorage::sum_squares_on_device(&ts.iter().map(|s| if let Storage::Cuda(c) = s { c } else { unreachable!() }).collect::<Vec<_>>())?),
        })
    }
}

// ------------------------------------------------------------------ custom (fused) ops

fn some_cpu(s: &Storage) -> Option<&CpuStorage> {
    if let Storage::Cpu(c) = s { Some(c) } else { None }
}
fn some_cuda(s: &Storage) -> Option<&CudaStorage> {
    if let Storage::Cuda(c) = s { Some(c) } else { None }
}
/// `(storage, shape)` pairs as the backend `S`'s storages (the devices were checked to agree).
fn backend_args<'a, S>(xs: &[(&'a Storage, &'a [usize])], pick: impl Fn(&'a Storage) -> Option<&'a S>) -> Vec<(&'a S, &'a [usize])> {
    xs.iter().map(|&(s, sh)| (pick(s).expect("same_device checked the devices"), sh)).collect()
}

impl Storage {
    /// Run a custom op's forward on its inputs' backend.
    pub fn custom_fwd<O: CustomOp + ?Sized>(op: &O, xs: &[(&Storage, &[usize])], need: &[bool]) -> Result<CustomFwd<Shaped<Storage>>> {
        let all: Vec<&Storage> = xs.iter().map(|p| p.0).collect();
        if all.is_empty() {
            bail!("{}: a custom op without inputs", op.name());
        }
        same_device(op.name(), &all)?;
        match all[0] {
            Storage::Cpu(_) => {
                let _p = crate::backend::cpu::profile::scope(op.name());
                op.cpu_fwd(&backend_args(xs, some_cpu), need)?
            }
            .try_map(|(s, sh)| Ok((Storage::Cpu(s), sh))),
            Storage::Cuda(_) => op.cuda_fwd(&backend_args(xs, some_cuda), need)?.try_map(|(s, sh)| Ok((Storage::Cuda(s), sh))),
        }
    }
    /// Run a custom op's backward on the backend of its inputs, saved state and output gradient `g`.
    pub fn custom_bwd<O: CustomOp + ?Sized>(op: &O, xs: &[(&Storage, &[usize])], saved: &[(&Storage, &[usize])], g: (&Storage, &[usize]), need: &[bool]) -> Result<Vec<Option<Storage>>> {
        let mut all: Vec<&Storage> = xs.iter().chain(saved).map(|p| p.0).collect();
        all.push(g.0);
        same_device(op.name(), &all)?;
        Ok(match g.0 {
            Storage::Cpu(gc) => {
                let _p = crate::backend::cpu::profile::enabled().then(|| crate::backend::cpu::profile::scope(&format!("{} backward", op.name())));
                op.cpu_bwd(&backend_args(xs, some_cpu), &backend_args(saved, some_cpu), (gc, g.1), need)?.into_iter().map(|d| d.map(Storage::Cpu)).collect()
            }
            Storage::Cuda(gc) => op.cuda_bwd(&backend_args(xs, some_cuda), &backend_args(saved, some_cuda), (gc, g.1), need)?.into_iter().map(|d| d.map(Storage::Cuda)).collect(),
        })
    }
}

/// Backend storages as tensors (shared, not copied).
fn as_tensors<S: Clone>(xs: &[(&S, &[usize])], wrap: impl Fn(S) -> Storage) -> Result<Vec<Tensor>> {
    xs.iter().map(|&(s, sh)| Tensor::from_storage(wrap(s.clone()), sh)).collect()
}

/// A tensor's storage on the backend `S`: an error when the composition left that backend.
fn from_tensor<S: Clone>(name: &str, t: &Tensor, unwrap: impl Fn(&Storage) -> Option<&S>) -> Result<S> {
    match unwrap(t.storage()) {
        Some(s) => Ok(s.clone()),
        None => bail!("{name}: its composition returned a tensor on {}, not on its inputs' device", t.device()),
    }
}

fn composed_fwd<O: CustomOp + ?Sized, S: Clone>(op: &O, xs: &[(&S, &[usize])], need: &[bool], wrap: impl Fn(S) -> Storage, unwrap: impl Fn(&Storage) -> Option<&S> + Copy) -> Result<CustomFwd<Shaped<S>>> {
    let ts = as_tensors(xs, wrap)?;
    op.fwd_composed(&ts, need)?.try_map(|t| Ok((from_tensor(op.name(), &t, unwrap)?, t.shape().to_vec())))
}

fn composed_bwd<O: CustomOp + ?Sized, S: Clone>(
    op: &O,
    xs: &[(&S, &[usize])],
    saved: &[(&S, &[usize])],
    g: (&S, &[usize]),
    need: &[bool],
    wrap: impl Fn(S) -> Storage + Copy,
    unwrap: impl Fn(&Storage) -> Option<&S> + Copy,
) -> Result<Vec<Option<S>>> {
    let (ts, ss) = (as_tensors(xs, wrap)?, as_tensors(saved, wrap)?);
    let gt = Tensor::from_storage(wrap(g.0.clone()), g.1)?;
    op.bwd_composed(&ts, &ss, &gt, need)?.into_iter().map(|d| d.map(|t| from_tensor(op.name(), &t, unwrap)).transpose()).collect()
}

/// [`CustomOp::cuda_fwd`]'s default: the op's composition of tensor ops, on the CUDA storages.
pub fn cuda_fwd_composed<O: CustomOp + ?Sized>(op: &O, xs: &Args<CudaStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CudaStorage>>> {
    composed_fwd(op, xs, need, Storage::Cuda, some_cuda)
}
/// [`CustomOp::cuda_bwd`]'s default.
pub fn cuda_bwd_composed<O: CustomOp + ?Sized>(op: &O, xs: &Args<CudaStorage>, saved: &Args<CudaStorage>, g: (&CudaStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CudaStorage>>> {
    composed_bwd(op, xs, saved, g, need, Storage::Cuda, some_cuda)
}
/// The composition on the CPU (for [`crate::tensor::custom::Composed`]).
pub fn cpu_fwd_composed<O: CustomOp + ?Sized>(op: &O, xs: &Args<CpuStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CpuStorage>>> {
    composed_fwd(op, xs, need, Storage::Cpu, some_cpu)
}
pub fn cpu_bwd_composed<O: CustomOp + ?Sized>(op: &O, xs: &Args<CpuStorage>, saved: &Args<CpuStorage>, g: (&CpuStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CpuStorage>>> {
    composed_bwd(op, xs, saved, g, need, Storage::Cpu, some_cpu)
}
