//! Dense tensors: shape, strides, device, f32 storage.
//!
//! Storage is f32 on the host, shared by `Arc` so that copies of a model's parameters are
//! cheap (copy on write). Half precision (`f16`, `bf16`) exists for loading and casting.
//! Every tensor produced by an op is contiguous (row-major); `strides()` reports its layout.

use std::fmt;
use std::sync::Arc;

use anyhow::{bail, Result};

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
            && let Ok(i) = n.parse::<usize>() {
                return Ok(Device::Cuda(i));
            }
        bail!("unknown device '{s}': expected cpu, cuda or cuda:N")
    }

    /// Check that tensors can be placed on this device in this build.
    pub fn ensure_available(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => {
                let d = crate::backend::cuda::probe(*i)?;
                bail!(
                    "cuda:{i} is a {} (sm_{}{}), but this version's ops run on the CPU only (the CUDA kernels are the next step); use --device cpu",
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1
                )
            }
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

/// Element types that tensors can be loaded from or saved as. Computation is in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn parse(s: &str) -> Result<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => bail!("unknown dtype '{s}': expected f32, f16 or bf16"),
        }
    }
    pub fn size(&self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
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

/// A dense f32 tensor.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    strides: Vec<usize>,
    data: Arc<Vec<f32>>,
    device: Device,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.numel().min(6);
        write!(f, "Tensor{:?} on {} {:?}{}", self.shape, self.device, &self.data[..n], if self.numel() > 6 { " …" } else { "" })
    }
}

impl Tensor {
    /// A tensor from data and shape; the lengths must agree.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(data.len(), n, "Tensor::from_vec: {} values for shape {:?}", data.len(), shape);
        Tensor { strides: contiguous_strides(shape), shape: shape.to_vec(), data: Arc::new(data), device: Device::Cpu }
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
        self.data.iter().map(|&v| half::f16::from_f32(v)).collect()
    }

    pub fn to_bf16(&self) -> Vec<half::bf16> {
        self.data.iter().map(|&v| half::bf16::from_f32(v)).collect()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// Mutable access; copies the storage first if it is shared.
    pub fn data_mut(&mut self) -> &mut [f32] {
        Arc::make_mut(&mut self.data).as_mut_slice()
    }
    pub fn into_vec(self) -> Vec<f32> {
        Arc::try_unwrap(self.data).unwrap_or_else(|a| (*a).clone())
    }
    pub fn to_vec(&self) -> Vec<f32> {
        self.data.to_vec()
    }
    /// Whether two tensors share storage (a cheap copy).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    /// Same data, new shape (same number of elements).
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(n, self.numel(), "reshape {:?} -> {:?}", self.shape, shape);
        Tensor { shape: shape.to_vec(), strides: contiguous_strides(shape), data: self.data.clone(), device: self.device }
    }

    /// Materialised permutation of the axes (`out.shape[i] = self.shape[perm[i]]`).
    pub fn permute(&self, perm: &[usize]) -> Tensor {
        assert_eq!(perm.len(), self.ndim());
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let src_strides: Vec<usize> = perm.iter().map(|&p| self.strides[p]).collect();
        let out = crate::backend::cpu::elementwise::gather_strided(&self.data, &shape, &src_strides);
        Tensor::from_vec(out, &shape)
    }

    pub fn item(&self) -> f32 {
        assert_eq!(self.numel(), 1, "item() of a tensor with {} elements", self.numel());
        self.data[0]
    }

    pub fn sum(&self) -> f64 {
        self.data.iter().map(|&v| v as f64).sum()
    }

    pub fn norm(&self) -> f64 {
        self.data.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
    }

    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0.0f32, |m, &v| m.max(v.abs()))
    }

    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// Relative error ‖self − reference‖ / ‖reference‖.
    pub fn rel_err(&self, reference: &Tensor) -> f64 {
        assert_eq!(self.shape, reference.shape, "rel_err: shapes differ");
        crate::util::rel_err(&self.data, &reference.data)
    }
}
