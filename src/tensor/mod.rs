//! Dense tensors: shape, strides, and a typed storage on one device.
//!
//! A tensor's storage ([`Storage`]) carries its dtype (f32, f16, bf16, i32) and lives on the CPU
//! or a GPU, shared by `Arc` so that copies of a model's parameters are cheap (copy on write).
//! Every op is a method here that forwards to the backend of its operands ([`storage`] is the
//! one dispatch point) and returns a `Result`; mixing devices is an error naming both. Every
//! tensor produced by an op is contiguous (row-major); `strides()` reports its layout.

pub mod arena;
pub mod custom;
pub mod graph;
mod ops;
mod random;
pub mod storage;

use anyhow::{Result, bail};
use std::fmt;

/// Where a tensor lives. The CPU is the reference backend; CUDA devices are named here so that
/// configuration and command lines can speak of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parse `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" || s == "gpu" {
            return Ok(Device::Cuda(0));
        }
        if let Some(n) = s.strip_prefix("cuda:")
            && let Ok(i) = n.parse::<usize>()
        {
            return Ok(Device::Cuda(i));
        }
        bail!("unknown device '{s}': expected cpu, cuda or cuda:N")
    }

    /// Wait for the work queued on this device (a no-op on the CPU); surfaces asynchronous GPU errors.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => crate::backend::cuda::gpu(*i)?.sync(),
        }
    }

    /// Whether this is a GPU.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Check that tensors can be placed on this device (opens a GPU on first use).
    pub fn ensure_available(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            // opening the GPU probes the driver (one clear error without one), compiles or loads
            // the kernels and creates the library handles
            Device::Cuda(i) => crate::backend::cuda::gpu(*i).map(|_| ()),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Element types of a tensor's storage: f32, f16 and bf16 values, i32 labels and indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
}

impl DType {
    pub fn parse(s: &str) -> Result<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "i32" | "int32" => Ok(DType::I32),
            _ => bail!("unknown dtype '{s}': expected f32, f16, bf16 or i32"),
        }
    }
    /// A `--precision` value: a float dtype.
    pub fn parse_precision(s: &str) -> Result<DType> {
        match DType::parse(s) {
            Ok(d) if d.is_float() => Ok(d),
            _ => bail!("unknown precision '{s}': expected f32, f16 or bf16"),
        }
    }
    /// Bytes per element.
    pub fn size(&self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    pub fn is_float(&self) -> bool {
        !matches!(self, DType::I32)
    }
    /// f16 or bf16.
    pub fn is_half(&self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }
    pub fn name(&self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Row-major strides of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

pub use storage::Storage;

use crate::backend::cpu::CpuStorage;

/// A dense tensor.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    strides: Vec<usize>,
    storage: Storage,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.storage {
            Storage::Cpu(c) => {
                let d = c.f32s();
                let n = d.len().min(6);
                write!(f, "Tensor{:?} {} on cpu {:?}{}", self.shape, self.dtype(), &d[..n], if d.len() > 6 { " …" } else { "" })
            }
            Storage::Cuda(_) => write!(f, "Tensor{:?} {} on {}", self.shape, self.dtype(), self.device()),
        }
    }
}

impl Tensor {
    /// A tensor over a storage holding `shape`'s number of values.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if storage.len() != n {
            bail!("{} values cannot fill a tensor of shape {shape:?} ({n} values)", storage.len());
        }
        Ok(Tensor { strides: contiguous_strides(shape), shape: shape.to_vec(), storage })
    }
    /// An op's result: the backend gave `shape`'s number of values (checked in debug builds).
    pub(crate) fn from_op(storage: Storage, shape: &[usize]) -> Tensor {
        debug_assert_eq!(storage.len(), shape.iter().product::<usize>(), "op output for shape {shape:?}");
        Tensor { strides: contiguous_strides(shape), shape: shape.to_vec(), storage }
    }
    /// An f32 CPU tensor from data and shape; the lengths must agree.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(data.len(), n, "Tensor::from_vec: {} values for shape {:?}", data.len(), shape);
        Tensor::from_op(Storage::Cpu(CpuStorage::from_f32(data)), shape)
    }
    /// Checked variant of [`Tensor::from_vec`] for user data.
    pub fn try_from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_storage(Storage::Cpu(CpuStorage::from_f32(data)), shape)
    }
    /// An f16 CPU tensor (kept in f16).
    pub fn from_f16(data: Vec<half::f16>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_storage(Storage::Cpu(CpuStorage::F16(data.into())), shape)
    }
    /// A bf16 CPU tensor (kept in bf16).
    pub fn from_bf16(data: Vec<half::bf16>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_storage(Storage::Cpu(CpuStorage::BF16(data.into())), shape)
    }
    /// An i32 CPU tensor (labels, indices).
    pub fn from_i32(data: Vec<i32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_storage(Storage::Cpu(CpuStorage::I32(data.into())), shape)
    }
    /// Class labels or indices as an i32 tensor of shape `[len]`.
    pub fn from_indices(ids: &[usize]) -> Result<Tensor> {
        let v = ids.iter().map(|&i| i32::try_from(i).map_err(|_| anyhow::anyhow!("index {i} does not fit in i32"))).collect::<Result<Vec<i32>>>()?;
        Tensor::from_i32(v, &[ids.len()])
    }
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::from_vec(vec![0.0; shape.iter().product()], shape)
    }
    pub fn full(shape: &[usize], v: f32) -> Tensor {
        Tensor::from_vec(vec![v; shape.iter().product()], shape)
    }
    /// `v` everywhere, in `dtype` on `device`.
    pub fn full_on(shape: &[usize], v: f32, dtype: DType, device: Device) -> Result<Tensor> {
        Ok(Tensor::from_op(Storage::full(device, shape.iter().product(), v, dtype)?, shape))
    }
    /// `v` everywhere with this tensor's dtype and device.
    pub fn full_like(&self, v: f32) -> Result<Tensor> {
        Tensor::full_on(&self.shape, v, self.dtype(), self.device())
    }
    pub fn zeros_like(&self) -> Result<Tensor> {
        self.full_like(0.0)
    }
    pub fn scalar(v: f32) -> Tensor {
        Tensor::from_vec(vec![v], &[])
    }
    pub fn randn(shape: &[usize], rng: &mut crate::rng::Rng) -> Tensor {
        Tensor::from_vec(rng.normal_vec(shape.iter().product()), shape)
    }
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut crate::rng::Rng) -> Tensor {
        Tensor::from_vec(rng.uniform_vec(shape.iter().product(), lo, hi), shape)
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn device(&self) -> Device {
        self.storage.device()
    }
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    /// This tensor on `device` (shared, not copied, when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        Ok(Tensor::from_op(self.storage.to_device(device)?, &self.shape))
    }
    /// This tensor in host memory (downloaded from a GPU; shared when already there).
    pub fn to_cpu(&self) -> Result<Tensor> {
        self.to_device(Device::Cpu)
    }
    /// This tensor in `dtype` (shared when it already is).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        Ok(Tensor::from_op(self.storage.to_dtype(dtype)?, &self.shape))
    }

    /// The values of an f32 CPU tensor. Other tensors must be brought over with
    /// [`Tensor::to_cpu`] / [`Tensor::to_dtype`] first (explicit copies at the edge); asking
    /// here is a bug and panics.
    pub fn data(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(CpuStorage::F32(d)) => d,
            _ => panic!("data() of a {:?} {} tensor on {}: use to_cpu()/to_dtype(F32) or values() first", self.shape, self.dtype(), self.device()),
        }
    }
    /// Mutable access to an f32 CPU tensor; copies the storage first if it is shared.
    pub fn data_mut(&mut self) -> &mut [f32] {
        let (shape, dt, dev) = (self.shape.clone(), self.dtype(), self.device());
        match &mut self.storage {
            Storage::Cpu(c @ CpuStorage::F32(_)) => c.as_f32_mut().expect("f32"),
            _ => panic!("data_mut() of a {shape:?} {dt} tensor on {dev}"),
        }
    }
    /// The values as f32 on the host (downloaded from a GPU, widened from f16/bf16/i32).
    pub fn values(&self) -> Result<Vec<f32>> {
        Ok(match &self.storage {
            Storage::Cpu(c) => c.f32s().into_owned(),
            Storage::Cuda(_) => self.storage.to_cpu_storage()?.f32s().into_owned(),
        })
    }
    /// [`Tensor::values`] where a failure is a bug (tests, host-side code on CPU tensors).
    pub fn to_vec(&self) -> Vec<f32> {
        self.values().unwrap_or_else(|e| panic!("reading a {:?} tensor from {}: {e:#}", self.shape, self.device()))
    }
    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(CpuStorage::F32(d)) => d.into_vec(),
            _ => self.to_vec(),
        }
    }
    /// The i32 values of an index tensor, on the host.
    pub fn indices(&self) -> Result<Vec<i32>> {
        Ok(self.storage.to_cpu_storage()?.as_i32()?.to_vec())
    }
    /// The values in f16 / bf16 on the host (rounded once if not already stored so).
    pub fn to_f16(&self) -> Result<Vec<half::f16>> {
        match self.to_dtype(DType::F16)?.storage.to_cpu_storage()? {
            CpuStorage::F16(d) => Ok(d.to_vec()),
            _ => unreachable!("cast to f16"),
        }
    }
    pub fn to_bf16(&self) -> Result<Vec<half::bf16>> {
        match self.to_dtype(DType::BF16)?.storage.to_cpu_storage()? {
            CpuStorage::BF16(d) => Ok(d.to_vec()),
            _ => unreachable!("cast to bf16"),
        }
    }
    /// Whether two tensors share storage (a cheap copy).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        self.storage.ptr_eq(&other.storage)
    }

    /// The value of a one-element tensor.
    pub fn scalar_value(&self) -> Result<f32> {
        if self.numel() != 1 {
            bail!("a scalar was expected, got a tensor of shape {:?}", self.shape);
        }
        Ok(self.values()?[0])
    }
    pub fn item(&self) -> f32 {
        self.scalar_value().unwrap_or_else(|e| panic!("item(): {e:#}"))
    }
    pub fn sum(&self) -> f64 {
        self.to_vec().iter().map(|&v| v as f64).sum()
    }
    pub fn norm(&self) -> f64 {
        self.to_vec().iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
    }
    pub fn max_abs(&self) -> f32 {
        self.to_vec().iter().fold(0.0f32, |m, &v| m.max(v.abs()))
    }
    pub fn all_finite(&self) -> bool {
        self.to_vec().iter().all(|v| v.is_finite())
    }
    /// Relative error ‖self − reference‖ / ‖reference‖ (either may be on a GPU or in half precision).
    pub fn rel_err(&self, reference: &Tensor) -> f64 {
        assert_eq!(self.shape, reference.shape, "rel_err: shapes differ");
        crate::util::rel_err(&self.to_vec(), &reference.to_vec())
    }
}
