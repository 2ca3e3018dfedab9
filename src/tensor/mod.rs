//! Dense tensors: shape, strides, device, f32 storage.
//!
//! Storage is f32 on the host, shared by `Arc` so that copies of a model's parameters are
//! cheap (copy on write). Half precision (`f16`, `bf16`) exists for loading and casting.
//! Every tensor produced by an op is contiguous (row-major); `strides()` reports its layout.

use std::fmt;
use std::sync::Arc;

use anyhow::{Result, bail};

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

/// Where a tensor's values are: host memory or a GPU buffer, shared by `Arc` (copy on write).
#[derive(Clone)]
enum Storage {
    Host(Arc<Vec<f32>>),
    Cuda(Arc<crate::backend::cuda::GpuBuf>),
}

/// A dense f32 tensor.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    strides: Vec<usize>,
    data: Storage,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.data {
            Storage::Host(d) => {
                let n = d.len().min(6);
                write!(f, "Tensor{:?} on cpu {:?}{}", self.shape, &d[..n], if d.len() > 6 { " …" } else { "" })
            }
            Storage::Cuda(b) => write!(f, "Tensor{:?} on cuda:{}", self.shape, b.gpu().ordinal),
        }
    }
}

impl Tensor {
    /// A tensor from data and shape; the lengths must agree.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(data.len(), n, "Tensor::from_vec: {} values for shape {:?}", data.len(), shape);
        Tensor { strides: contiguous_strides(shape), shape: shape.to_vec(), data: Storage::Host(Arc::new(data)) }
    }

    /// A tensor over a GPU buffer holding `shape`'s number of values.
    pub fn from_gpu(buf: crate::backend::cuda::GpuBuf, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(buf.len(), n, "Tensor::from_gpu: {} values for shape {:?}", buf.len(), shape);
        Tensor { strides: contiguous_strides(shape), shape: shape.to_vec(), data: Storage::Cuda(Arc::new(buf)) }
    }

    /// The GPU buffer of a CUDA tensor (None on the CPU).
    pub fn gpu_buf(&self) -> Option<&crate::backend::cuda::GpuBuf> {
        match &self.data {
            Storage::Cuda(b) => Some(b),
            Storage::Host(_) => None,
        }
    }

    /// The GPU buffer for writing in place: copied first on the device if it is shared.
    pub fn gpu_buf_mut(&mut self) -> Result<&crate::backend::cuda::GpuBuf> {
        let Storage::Cuda(b) = &mut self.data else { bail!("gpu_buf_mut of a CPU tensor") };
        if Arc::get_mut(b).is_none() {
            let copy = b.gpu().duplicate(b)?;
            *b = Arc::new(copy);
        }
        Ok(b)
    }

    /// This tensor on `device` (shared, not copied, when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match (&self.data, device) {
            (Storage::Host(_), Device::Cpu) => Ok(self.clone()),
            (Storage::Cuda(b), Device::Cuda(i)) if b.gpu().ordinal == i => Ok(self.clone()),
            (Storage::Host(d), Device::Cuda(i)) => {
                let g = crate::backend::cuda::gpu(i)?;
                Ok(Tensor::from_gpu(g.upload(d)?, &self.shape))
            }
            (Storage::Cuda(b), Device::Cpu) => Ok(Tensor::from_vec(b.gpu().download(b)?, &self.shape)),
            (Storage::Cuda(_), Device::Cuda(_)) => self.to_device(Device::Cpu)?.to_device(device),
        }
    }

    /// This tensor in host memory (downloaded from a GPU; shared when already there).
    pub fn to_cpu(&self) -> Tensor {
        self.to_device(Device::Cpu).unwrap_or_else(|e| panic!("copying a {:?} tensor from the GPU: {e:#}", self.shape))
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.data, Storage::Cuda(_))
    }

    /// Checked variant of [`Tensor::from_vec`] for user data.
    pub fn try_from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            bail!("{} values cannot fill a tensor of shape {:?} ({} values)", data.len(), shape, n);
        }
        Ok(Tensor::from_vec(data, shape))
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::from_vec(vec![0.0; shape.iter().product()], shape)
    }

    pub fn full(shape: &[usize], v: f32) -> Tensor {
        Tensor::from_vec(vec![v; shape.iter().product()], shape)
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

    /// From half-precision values.
    pub fn from_f16(data: &[half::f16], shape: &[usize]) -> Tensor {
        Tensor::from_vec(data.iter().map(|v| v.to_f32()).collect(), shape)
    }

    pub fn from_bf16(data: &[half::bf16], shape: &[usize]) -> Tensor {
        Tensor::from_vec(data.iter().map(|v| v.to_f32()).collect(), shape)
    }

    pub fn to_f16(&self) -> Vec<half::f16> {
        self.host().iter().map(|&v| half::f16::from_f32(v)).collect()
    }

    pub fn to_bf16(&self) -> Vec<half::bf16> {
        self.host().iter().map(|&v| half::bf16::from_f32(v)).collect()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn device(&self) -> Device {
        match &self.data {
            Storage::Host(_) => Device::Cpu,
            Storage::Cuda(b) => Device::Cuda(b.gpu().ordinal),
        }
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
    /// The values of a CPU tensor. A CUDA tensor's values must be brought over with
    /// [`Tensor::to_cpu`] first (an explicit copy at the edge); asking here is a bug and panics.
    pub fn data(&self) -> &[f32] {
        match &self.data {
            Storage::Host(d) => d,
            Storage::Cuda(b) => panic!("data() of a {:?} tensor on cuda:{}: copy it to the host with to_cpu() first", self.shape, b.gpu().ordinal),
        }
    }
    /// Mutable access to a CPU tensor; copies the storage first if it is shared.
    pub fn data_mut(&mut self) -> &mut [f32] {
        let shape = self.shape.clone();
        match &mut self.data {
            Storage::Host(d) => Arc::make_mut(d).as_mut_slice(),
            Storage::Cuda(_) => panic!("data_mut() of a {shape:?} tensor on a GPU"),
        }
    }
    /// The values on the host (downloaded from a GPU).
    pub fn into_vec(self) -> Vec<f32> {
        match self.data {
            Storage::Host(d) => Arc::try_unwrap(d).unwrap_or_else(|a| (*a).clone()),
            Storage::Cuda(_) => self.to_cpu().into_vec(),
        }
    }
    /// The values on the host (downloaded from a GPU).
    pub fn to_vec(&self) -> Vec<f32> {
        match &self.data {
            Storage::Host(d) => d.to_vec(),
            Storage::Cuda(_) => self.to_cpu().into_vec(),
        }
    }
    /// Whether two tensors share storage (a cheap copy).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        match (&self.data, &other.data) {
            (Storage::Host(a), Storage::Host(b)) => Arc::ptr_eq(a, b),
            (Storage::Cuda(a), Storage::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Same data, new shape (same number of elements).
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(n, self.numel(), "reshape {:?} -> {:?}", self.shape, shape);
        Tensor { shape: shape.to_vec(), strides: contiguous_strides(shape), data: self.data.clone() }
    }

    /// Materialised permutation of the axes (`out.shape[i] = self.shape[perm[i]]`).
    pub fn permute(&self, perm: &[usize]) -> Tensor {
        assert_eq!(perm.len(), self.ndim());
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let src_strides: Vec<usize> = perm.iter().map(|&p| self.strides[p]).collect();
        match &self.data {
            Storage::Host(d) => Tensor::from_vec(crate::backend::cpu::elementwise::gather_strided(d, &shape, &src_strides), &shape),
            Storage::Cuda(_) => crate::backend::cuda::ops::gather_strided(self, &shape, &src_strides),
        }
    }

    /// Host values, borrowed for a CPU tensor and downloaded for a CUDA one.
    fn host(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.data {
            Storage::Host(d) => std::borrow::Cow::Borrowed(d.as_slice()),
            Storage::Cuda(_) => std::borrow::Cow::Owned(self.to_vec()),
        }
    }

    pub fn item(&self) -> f32 {
        assert_eq!(self.numel(), 1, "item() of a tensor with {} elements", self.numel());
        self.host()[0]
    }

    pub fn sum(&self) -> f64 {
        self.host().iter().map(|&v| v as f64).sum()
    }

    pub fn norm(&self) -> f64 {
        self.host().iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
    }

    pub fn max_abs(&self) -> f32 {
        self.host().iter().fold(0.0f32, |m, &v| m.max(v.abs()))
    }

    pub fn all_finite(&self) -> bool {
        self.host().iter().all(|v| v.is_finite())
    }

    /// Relative error ‖self − reference‖ / ‖reference‖ (either may be on a GPU).
    pub fn rel_err(&self, reference: &Tensor) -> f64 {
        assert_eq!(self.shape, reference.shape, "rel_err: shapes differ");
        crate::util::rel_err(&self.host(), &reference.host())
    }
}
