//! The CUDA backend's storage: a pool buffer holding `len` elements of one dtype on one GPU,
//! shared by `Arc` (copy on write), and its [`BackendStorage`](crate::backend::BackendStorage)
//! implementation.

use std::sync::Arc;

use anyhow::{Result, bail};

use super::gpu::{Gpu, GpuBuf};
use crate::tensor::DType;

/// Device memory of one dtype on one GPU.
#[derive(Clone)]
pub struct CudaStorage {
    buf: Arc<GpuBuf>,
    len: usize,
    dtype: DType,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage(cuda:{}, {} × {})", self.buf.gpu().ordinal, self.len, self.dtype)
    }
}

/// 32-bit words that `n` elements of `dtype` occupy (the pool counts words).
pub fn words(n: usize, dtype: DType) -> usize {
    (n * dtype.size()).div_ceil(4)
}

impl CudaStorage {
    /// A storage over `buf`, which must hold at least `len` elements of `dtype`.
    pub fn new(buf: GpuBuf, len: usize, dtype: DType) -> Result<Self> {
        if buf.len() < words(len, dtype) {
            bail!("a GPU buffer of {} words cannot hold {len} {dtype} values", buf.len());
        }
        Ok(CudaStorage { buf: Arc::new(buf), len, dtype })
    }
    /// Uninitialised room for `len` elements of `dtype` on `g`.
    pub fn alloc(g: &Arc<Gpu>, len: usize, dtype: DType) -> Result<Self> {
        CudaStorage::new(g.alloc(words(len, dtype))?, len, dtype)
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        self.buf.gpu()
    }
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
    pub fn buf(&self) -> &GpuBuf {
        &self.buf
    }
    pub fn storage_dtype(&self) -> DType {
        self.dtype
    }
    pub fn elements(&self) -> usize {
        self.len
    }
    /// The buffer for writing in place: copied first on the device if it is shared.
    pub fn make_mut(&mut self) -> Result<&GpuBuf> {
        if Arc::get_mut(&mut self.buf).is_none() {
            let copy = self.buf.gpu().duplicate(&self.buf)?;
            self.buf = Arc::new(copy);
        }
        Ok(&self.buf)
    }
    /// Whether two storages share device memory.
    pub fn ptr_eq(&self, o: &CudaStorage) -> bool {
        Arc::ptr_eq(&self.buf, &o.buf)
    }
}
