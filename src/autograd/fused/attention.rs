//! torchcfm's QKV self-attention (`QKVAttentionLegacy`, or `QKVAttention` with
//! `use_new_attention_order`) as one node: `qkv [B, 3·C, T] → out [B, C, T]`.
//!
//! CPU: flash-style (`flash_attention_forward/backward`) when a gradient is needed: no more than
//! one tile of the `T × T` scores exists at a time, and the node saves the output (in f32) and
//! the per-row log-sum-exp `[B·heads, T]`, not the probabilities. Without a gradient (sampling)
//! nothing is saved, and when the probabilities would fit in cache ([`FLASH_MIN_PROB_BYTES`])
//! the backend's own attention kernel, faster on the CPU there, computes it. CUDA: the flash
//! kernels of `kernels/attention.cu` (`cuda::attention`), saving the same state. Composition: the
//! attention kernel pair that saves the probabilities (`Tensor::qkv_attention`).

use anyhow::{Result, bail};

use super::{float_dtype, in_dtype};
use crate::autograd::Var;
use crate::autograd::custom::{Args, CustomFwd, CustomOp, Shaped, apply_custom};
use crate::backend::cpu::CpuStorage;
use crate::backend::cpu::fused::{flash_attention_backward, flash_attention_forward};
use crate::backend::cuda::CudaStorage;
use crate::backend::cuda::attention as cuda_attention;
use crate::backend::cuda::cast::cast;
use crate::backend::{AttnGeom, BackendStorage, QkvOrder};
use crate::tensor::{DType, Tensor};

/// Below this many bytes of `T × T` probabilities an inference forward uses the backend's
/// attention kernel instead of flash (see [`Attention::cpu_fwd`]'s comment).
pub const FLASH_MIN_PROB_BYTES: usize = 16 << 20;

/// QKV attention with `heads` heads in the channel order `order`. Input: `[qkv]`.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub heads: usize,
    pub order: QkvOrder,
}

impl Attention {
    fn geom(&self, s: &[usize]) -> Result<AttnGeom> {
        if s.len() != 3 || self.heads == 0 || !s[1].is_multiple_of(3 * self.heads) {
            bail!("flash_attention: qkv of shape {s:?} with {} heads (expected [B, 3·heads·ch, T])", self.heads);
        }
        Ok(AttnGeom { b: s[0], heads: self.heads, ch: s[1] / (3 * self.heads), t: s[2], order: self.order })
    }
}

impl CustomOp for Attention {
    fn name(&self) -> &'static str {
        "flash_attention"
    }

    fn cpu_fwd(&self, xs: &Args<CpuStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CpuStorage>>> {
        let [(qkv, shape)] = xs else { bail!("flash_attention: {} inputs, expected qkv alone", xs.len()) };
        let g = self.geom(shape)?;
        let dt = float_dtype(self.name(), xs)?;
        let oshape = g.out_shape().to_vec();
        if !need[0] && g.b * g.heads * g.t * g.t * 4 <= FLASH_MIN_PROB_BYTES {
            // inference (the ODE sampler) with probabilities small enough to stay in cache: the
            // backend's kernel that forms them is faster on the CPU than flash (CIFAR-10 recipe,
            // batch 4: 1.03× slower U-Net forward with flash); larger ones (torchcfm's MNIST
            // example at batch 32: 78 MB) go through flash, 1.37× faster there. Nothing is saved
            // either way; the two agree to rounding (1e-6)
            let (out, _probs) = qkv.qkv_attention(&g)?;
            return Ok(CustomFwd { out: (out, oshape), aux: Vec::new(), saved: Vec::new() });
        }
        let (out, lse) = flash_attention_forward(&qkv.f32s(), &g);
        // the backward's D = Σ dO·O wants the output before rounding: kept in f32 (shared when it is f32)
        let out32 = CpuStorage::from_f32(out);
        let y = if dt == DType::F32 { out32.clone() } else { out32.to_dtype(dt)? };
        Ok(CustomFwd { out: (y, oshape.clone()), aux: Vec::new(), saved: vec![(out32, oshape), (CpuStorage::from_f32(lse), vec![g.b * g.heads, g.t])] })
    }

    fn cpu_bwd(&self, xs: &Args<CpuStorage>, saved: &Args<CpuStorage>, g: (&CpuStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CpuStorage>>> {
        let [(qkv, shape)] = xs else { bail!("flash_attention: {} inputs, expected qkv alone", xs.len()) };
        let [(out, _), (lse, _)] = saved else { bail!("flash_attention: saved state of {} tensors", saved.len()) };
        if !need[0] {
            return Ok(vec![None]);
        }
        let geom = self.geom(shape)?;
        let d = flash_attention_backward(&qkv.f32s(), out.as_f32()?, lse.as_f32()?, &g.0.f32s(), &geom);
        Ok(vec![Some(in_dtype(d, qkv.dtype()))])
    }

    /// Flash kernels (`cuda::attention`, f32: f16/bf16 are widened around them, the output
    /// rounded once, as the CPU node) for heads of up to [`cuda_attention::MAX_HEAD_DIM`]
    /// channels, with or without a gradient (nothing `T × T` either way); wider heads take the
    /// composition.
    fn cuda_fwd(&self, xs: &Args<CudaStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CudaStorage>>> {
        let [(qkv, shape)] = xs else { bail!("flash_attention: {} inputs, expected qkv alone", xs.len()) };
        let g = self.geom(shape)?;
        if !cuda_attention::supported(&g) {
            return crate::tensor::storage::cuda_fwd_composed(self, xs, need);
        }
        let dt = qkv.dtype();
        if !dt.is_float() {
            bail!("flash_attention: qkv is {dt}, a float op needs float inputs");
        }
        let (out32, lse) = cuda_attention::flash_attention_forward(&cast(qkv, DType::F32)?, &g)?;
        let oshape = g.out_shape().to_vec();
        let y = cast(&out32, dt)?;
        let saved = if need[0] { vec![(out32, oshape.clone()), (lse, vec![g.b * g.heads, g.t])] } else { Vec::new() };
        Ok(CustomFwd { out: (y, oshape), aux: Vec::new(), saved })
    }

    fn cuda_bwd(&self, xs: &Args<CudaStorage>, saved: &Args<CudaStorage>, g: (&CudaStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CudaStorage>>> {
        let [(qkv, shape)] = xs else { bail!("flash_attention: {} inputs, expected qkv alone", xs.len()) };
        if !need[0] {
            return Ok(vec![None]);
        }
        let geom = self.geom(shape)?;
        if !cuda_attention::supported(&geom) {
            // the composed forward saved the probabilities
            return crate::tensor::storage::cuda_bwd_composed(self, xs, saved, g, need);
        }
        let [(out, _), (lse, _)] = saved else { bail!("flash_attention: saved state of {} tensors", saved.len()) };
        let d = cuda_attention::flash_attention_backward(&cast(qkv, DType::F32)?, out, lse, &cast(g.0, DType::F32)?, &geom)?;
        Ok(vec![Some(cast(&d, qkv.dtype())?)])
    }

    fn fwd_composed(&self, xs: &[Tensor], _need: &[bool]) -> Result<CustomFwd<Tensor>> {
        let [qkv] = xs else { bail!("flash_attention: {} inputs, expected qkv alone", xs.len()) };
        let (out, probs) = qkv.qkv_attention(&self.geom(qkv.shape())?)?;
        Ok(CustomFwd { out, aux: Vec::new(), saved: vec![probs] })
    }

    fn bwd_composed(&self, xs: &[Tensor], saved: &[Tensor], g: &Tensor, need: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let ([qkv], [probs]) = (xs, saved) else { bail!("flash_attention: {} inputs and {} saved tensors", xs.len(), saved.len()) };
        Ok(vec![if need[0] { Some(qkv.qkv_attention_backward(probs, g, &self.geom(qkv.shape())?)?) } else { None }])
    }
}

/// torchcfm's QKV attention of `qkv [B, 3·C, T]` with `heads` heads in `order`, as one node.
pub fn attention(qkv: &Var, heads: usize, order: QkvOrder) -> Result<Var> {
    Ok(apply_custom(Attention { heads, order }, &[qkv])?.0)
}
