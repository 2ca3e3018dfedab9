//! Interim: the CUDA storage's ops through host memory (download, the CPU reference, upload),
//! while the device implementation is merged. Correct on every dtype, and slow.

use std::sync::Arc;

use anyhow::Result;

use super::gpu::Gpu;
use super::storage::CudaStorage;
use crate::backend::cpu::CpuStorage;
use crate::backend::{AdamStep, AttnGeom, BackendStorage, BinaryOp, ConvGeom, NormGeom, RandomDist, UnaryOp};
use crate::tensor::{DType, Device};

impl CudaStorage {
    pub fn from_cpu(g: &Arc<Gpu>, s: &CpuStorage) -> Result<Self> {
        let bytes = s.bytes();
        let mut w = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut w)[..bytes.len()].copy_from_slice(bytes);
        let f: &[f32] = bytemuck::cast_slice(&w);
        CudaStorage::new(g.upload(f)?, s.len(), s.dtype())
    }
    pub fn full(g: &Arc<Gpu>, n: usize, v: f32, dtype: DType) -> Result<Self> {
        CudaStorage::from_cpu(g, &CpuStorage::from_f32_as(vec![v; n], dtype))
    }
    /// The Philox draw `(seed, offset)` of `dist` on the GPU (interim: drawn by the CPU reference
    /// and uploaded; the port launches `philox_uniform_f32` / `philox_normal_f32`).
    pub fn philox(g: &Arc<Gpu>, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Self> {
        CudaStorage::from_cpu(g, &CpuStorage::philox(n, dist, seed, offset, dtype)?)
    }
    fn host(&self) -> Result<CpuStorage> {
        let w = self.gpu().download(self.buf())?;
        let b: &[u8] = bytemuck::cast_slice(&w);
        let n = self.elements();
        let bytes = &b[..n * self.storage_dtype().size()];
        Ok(match self.storage_dtype() {
            DType::F32 => CpuStorage::F32(Arc::new(bytemuck::pod_collect_to_vec(bytes))),
            DType::F16 => CpuStorage::F16(Arc::new(bytemuck::pod_collect_to_vec(bytes))),
            DType::BF16 => CpuStorage::BF16(Arc::new(bytemuck::pod_collect_to_vec(bytes))),
            DType::I32 => CpuStorage::I32(Arc::new(bytemuck::pod_collect_to_vec(bytes))),
        })
    }
    fn up(&self, s: CpuStorage) -> Result<Self> {
        CudaStorage::from_cpu(self.gpu(), &s)
    }
}

impl BackendStorage for CudaStorage {
    fn dtype(&self) -> DType {
        self.storage_dtype()
    }
    fn len(&self) -> usize {
        self.elements()
    }
    fn device(&self) -> Device {
        Device::Cuda(self.gpu().ordinal)
    }
    fn to_cpu_storage(&self) -> Result<CpuStorage> {
        self.host()
    }
    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.up(self.host()?.to_dtype(dtype)?)
    }
    fn full_like(&self, n: usize, v: f32, dtype: DType) -> Result<Self> {
        CudaStorage::full(self.gpu(), n, v, dtype)
    }
    fn philox_like(&self, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Self> {
        CudaStorage::philox(self.gpu(), n, dist, seed, offset, dtype)
    }
    fn dropout(&self, p: f32, seed: u64, offset: u64) -> Result<Self> {
        self.up(self.host()?.dropout(p, seed, offset)?)
    }
    fn binary(&self, a: &[usize], rhs: &Self, b: &[usize], out: &[usize], op: BinaryOp) -> Result<Self> {
        self.up(self.host()?.binary(a, &rhs.host()?, b, out, op)?)
    }
    fn unary(&self, op: UnaryOp, scalar: f32) -> Result<Self> {
        self.up(self.host()?.unary(op, scalar)?)
    }
    fn unary_backward(&self, op: UnaryOp, x: &Self, y: &Self) -> Result<Self> {
        self.up(self.host()?.unary_backward(op, &x.host()?, &y.host()?)?)
    }
    fn sum_to_shape(&self, from: &[usize], to: &[usize]) -> Result<Self> {
        self.up(self.host()?.sum_to_shape(from, to)?)
    }
    fn broadcast_to(&self, from: &[usize], to: &[usize]) -> Result<Self> {
        self.up(self.host()?.broadcast_to(from, to)?)
    }
    fn gather_strided(&self, shape: &[usize], strides: &[usize]) -> Result<Self> {
        self.up(self.host()?.gather_strided(shape, strides)?)
    }
    fn softmax_rows(&self, n: usize) -> Result<Self> {
        self.up(self.host()?.softmax_rows(n)?)
    }
    fn softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self> {
        self.up(self.host()?.softmax_rows_backward(&dy.host()?, n)?)
    }
    fn log_softmax_rows(&self, n: usize) -> Result<Self> {
        self.up(self.host()?.log_softmax_rows(n)?)
    }
    fn log_softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self> {
        self.up(self.host()?.log_softmax_rows_backward(&dy.host()?, n)?)
    }
    fn concat(parts: &[(&Self, &[usize])], axis: usize) -> Result<Self> {
        let hs: Vec<CpuStorage> = parts.iter().map(|p| p.0.host()).collect::<Result<_>>()?;
        let refs: Vec<(&CpuStorage, &[usize])> = hs.iter().zip(parts).map(|(h, p)| (h, p.1)).collect();
        parts[0].0.up(CpuStorage::concat(&refs, axis)?)
    }
    fn narrow(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self> {
        self.up(self.host()?.narrow(shape, axis, start, len)?)
    }
    fn narrow_backward(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self> {
        self.up(self.host()?.narrow_backward(shape, axis, start, len)?)
    }
    fn upsample_nearest2x(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        self.up(self.host()?.upsample_nearest2x(nc, h, w)?)
    }
    fn upsample_nearest2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        self.up(self.host()?.upsample_nearest2x_backward(nc, h, w)?)
    }
    fn avg_pool2x(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        self.up(self.host()?.avg_pool2x(nc, h, w)?)
    }
    fn avg_pool2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self> {
        self.up(self.host()?.avg_pool2x_backward(nc, h, w)?)
    }
    fn embedding(&self, ids: &Self, num: usize, dim: usize) -> Result<Self> {
        self.up(self.host()?.embedding(&ids.host()?, num, dim)?)
    }
    fn embedding_backward(&self, ids: &Self, num: usize, dim: usize) -> Result<Self> {
        self.up(self.host()?.embedding_backward(&ids.host()?, num, dim)?)
    }
    fn timestep_embedding(&self, dim: usize, max_period: f32) -> Result<Self> {
        self.up(self.host()?.timestep_embedding(dim, max_period)?)
    }
    fn timestep_embedding_backward(&self, gy: &Self, dim: usize, max_period: f32) -> Result<Self> {
        self.up(self.host()?.timestep_embedding_backward(&gy.host()?, dim, max_period)?)
    }
    fn matmul(&self, ta: bool, b: &Self, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Result<Self> {
        self.up(self.host()?.matmul(ta, &b.host()?, tb, m, n, k, alpha)?)
    }
    fn linear(&self, w: &Self, bias: Option<&Self>, n: usize, i: usize, o: usize) -> Result<Self> {
        let bh = bias.map(|b| b.host()).transpose()?;
        self.up(self.host()?.linear(&w.host()?, bh.as_ref(), n, i, o)?)
    }
    fn conv2d(&self, w: &Self, bias: Option<&Self>, g: &ConvGeom) -> Result<Self> {
        let bh = bias.map(|b| b.host()).transpose()?;
        self.up(self.host()?.conv2d(&w.host()?, bh.as_ref(), g)?)
    }
    fn conv2d_backward(&self, w: &Self, dy: &Self, g: &ConvGeom, need_dx: bool) -> Result<(Option<Self>, Self, Self)> {
        let (dx, dw, db) = self.host()?.conv2d_backward(&w.host()?, &dy.host()?, g, need_dx)?;
        Ok((dx.map(|d| self.up(d)).transpose()?, self.up(dw)?, self.up(db)?))
    }
    fn group_norm(&self, gamma: &Self, beta: &Self, g: &NormGeom) -> Result<(Self, Self, Self)> {
        let (y, m, r) = self.host()?.group_norm(&gamma.host()?, &beta.host()?, g)?;
        Ok((self.up(y)?, self.up(m)?, self.up(r)?))
    }
    fn group_norm_backward(&self, dy: &Self, gamma: &Self, mean: &Self, rstd: &Self, g: &NormGeom) -> Result<(Self, Self, Self)> {
        let (a, b, c) = self.host()?.group_norm_backward(&dy.host()?, &gamma.host()?, &mean.host()?, &rstd.host()?, g)?;
        Ok((self.up(a)?, self.up(b)?, self.up(c)?))
    }
    fn attention(&self, g: &AttnGeom) -> Result<(Self, Self)> {
        let (o, p) = self.host()?.attention(g)?;
        Ok((self.up(o)?, self.up(p)?))
    }
    fn attention_backward(&self, probs: &Self, dout: &Self, g: &AttnGeom) -> Result<Self> {
        self.up(self.host()?.attention_backward(&probs.host()?, &dout.host()?, g)?)
    }
    fn axpby_in_place(&mut self, a: f32, x: &Self, b: f32) -> Result<()> {
        let mut h = self.host()?;
        h.axpby_in_place(a, &x.host()?, b)?;
        *self = self.up(h)?;
        Ok(())
    }
    fn adam_in_place(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &AdamStep) -> Result<()> {
        let (mut p, mut mh, mut vh) = (self.host()?, m.host()?, v.host()?);
        p.adam_in_place(&grad.host()?, &mut mh, &mut vh, h)?;
        *self = self.up(p)?;
        *m = m.up(mh)?;
        *v = v.up(vh)?;
        Ok(())
    }
    fn sum_squares(ts: &[&Self]) -> Result<f64> {
        let hs: Vec<CpuStorage> = ts.iter().map(|t| t.host()).collect::<Result<_>>()?;
        CpuStorage::sum_squares(&hs.iter().collect::<Vec<_>>())
    }
    fn sum_squares_on_device(ts: &[&Self]) -> Result<Self> {
        let hs: Vec<CpuStorage> = ts.iter().map(|t| t.host()).collect::<Result<_>>()?;
        ts[0].up(CpuStorage::sum_squares_on_device(&hs.iter().collect::<Vec<_>>())?)
    }
}
