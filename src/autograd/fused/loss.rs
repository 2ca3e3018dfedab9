//! The ORW-CFM-W2 loss (`orw::loss`) as one node:
//! `total = mean_i w_i mean_pix (v − u)² + α mean (v − v_ref)²`, with the terms
//! `[fm, w2, total]` as an f32 tensor on the loss's device (aux output: read it once, for
//! logging) and, when `v` needs a gradient, `dL/dv` computed in the same pass and saved.
//!
//! CUDA (`kernels/fused.cu` through `backend::cuda::fused::orw_loss`): one pass over `v`, `u`,
//! `v_ref` writes per-(sample, chunk) partial sums and `dL/dv`, one block finishes the terms on
//! the device (the output is a view of the terms' total); the backward scales the saved `dL/dv`
//! by the upstream gradient read on the device (one read and one write of `B·P` values, where
//! recomputing would read `v`, `u`, `v_ref` again, and no host read of the gradient).
//!
//! Only `v` is differentiated (`u`, `w` and `v_ref` are data). Inputs: `[v, u, w]` or
//! `[v, u, w, v_ref]`, `v`, `u`, `v_ref` of one shape `[B, ...]` and `w [B]`.

use anyhow::{Result, bail};

use super::{cuda_f32s, in_dtype};
use crate::autograd::Var;
use crate::autograd::custom::{Args, CustomFwd, CustomOp, Shaped, apply_custom};
use crate::backend::cpu::CpuStorage;
use crate::backend::cpu::fused::{orw_loss_backward, orw_loss_forward, orw_loss_forward_backward};
use crate::backend::cuda::{CudaStorage, fused as cuda_fused};
use crate::backend::{BackendStorage, UnaryOp};
use crate::tensor::{DType, Tensor};

/// The loss with W2 coefficient `alpha` (0 without `v_ref`).
#[derive(Clone, Copy, Debug)]
pub struct OrwLossOp {
    pub alpha: f32,
}

impl OrwLossOp {
    /// Checks the shapes and gradient flags; returns the batch size.
    fn check(&self, shapes: &[&[usize]], need: &[bool]) -> Result<usize> {
        if shapes.len() != 3 && shapes.len() != 4 {
            bail!("orw_loss: {} inputs (v, u, w and optionally v_ref)", shapes.len());
        }
        let v = shapes[0];
        let b = v.first().copied().unwrap_or(0);
        if b == 0 || shapes[1] != v || shapes.get(3).is_some_and(|r| *r != v) {
            bail!("orw_loss: v {v:?}, u {:?}, v_ref {:?} (one shape [B, ...] expected)", shapes[1], shapes.get(3));
        }
        if shapes[2] != [b] {
            bail!("orw_loss: weights of shape {:?} for a batch of {b}", shapes[2]);
        }
        if shapes.len() == 3 && self.alpha != 0.0 {
            bail!("orw_loss: α = {} without v_ref", self.alpha);
        }
        if need.iter().skip(1).any(|&n| n) {
            bail!("orw_loss: only v is differentiated (u, w and v_ref are data)");
        }
        Ok(b)
    }
}

impl CustomOp for OrwLossOp {
    fn name(&self) -> &'static str {
        "orw_loss"
    }

    fn cpu_fwd(&self, xs: &Args<CpuStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CpuStorage>>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|p| p.1).collect();
        self.check(&shapes, need)?;
        if let Some(i) = xs.iter().position(|p| !p.0.dtype().is_float()) {
            bail!("orw_loss: input {i} is {}", xs[i].0.dtype());
        }
        let v: Vec<_> = xs.iter().map(|p| p.0.f32s()).collect();
        let vref = v.get(3).map(|r| &r[..]);
        let (val, saved) = if need[0] {
            let (val, dv) = orw_loss_forward_backward(&v[0], &v[1], vref, &v[2], self.alpha, 1.0);
            (val, vec![(CpuStorage::from_f32(dv), xs[0].1.to_vec())])
        } else {
            (orw_loss_forward(&v[0], &v[1], vref, &v[2], self.alpha), Vec::new())
        };
        let terms = vec![val.fm as f32, val.w2 as f32, val.total as f32];
        Ok(CustomFwd { out: (CpuStorage::from_f32(vec![terms[2]]), Vec::new()), aux: vec![(CpuStorage::from_f32(terms), vec![3])], saved })
    }

    fn cpu_bwd(&self, xs: &Args<CpuStorage>, saved: &Args<CpuStorage>, g: (&CpuStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CpuStorage>>> {
        let mut grads = vec![None; xs.len()];
        if !need[0] {
            return Ok(grads);
        }
        let [(dv, _)] = saved else { bail!("orw_loss: saved state of {} tensors", saved.len()) };
        let (gv, dt) = (g.0.f32s()[0], xs[0].0.dtype());
        grads[0] = Some(if gv == 1.0 {
            // the gradient the forward computed (shared when v is f32)
            dv.to_dtype(dt)?
        } else {
            // the kernel's own scaling by the upstream gradient (one rounding), from the inputs
            let v: Vec<_> = xs.iter().map(|p| p.0.f32s()).collect();
            in_dtype(orw_loss_backward(&v[0], &v[1], v.get(3).map(|r| &r[..]), &v[2], self.alpha, gv), dt)
        });
        Ok(grads)
    }

    fn cuda_fwd(&self, xs: &Args<CudaStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CudaStorage>>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|p| p.1).collect();
        self.check(&shapes, need)?;
        if let Some(i) = xs.iter().position(|p| !p.0.dtype().is_float()) {
            bail!("orw_loss: input {i} is {}", xs[i].0.dtype());
        }
        let v = cuda_f32s(xs)?;
        let (terms, dv) = cuda_fused::orw_loss(&v[0], &v[1], &v[2], v.get(3), self.alpha, need[0])?;
        let total = terms.view(2, 1)?;
        Ok(CustomFwd { out: (total, Vec::new()), aux: vec![(terms, vec![3])], saved: dv.map(|d| (d, xs[0].1.to_vec())).into_iter().collect() })
    }

    fn cuda_bwd(&self, xs: &Args<CudaStorage>, saved: &Args<CudaStorage>, g: (&CudaStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CudaStorage>>> {
        let mut grads = vec![None; xs.len()];
        if !need[0] {
            return Ok(grads);
        }
        let [(dv, _)] = saved else { bail!("orw_loss: saved state of {} tensors", saved.len()) };
        grads[0] = Some(cuda_fused::orw_loss_scale(dv, &g.0.to_dtype(DType::F32)?)?.to_dtype(xs[0].0.dtype())?);
        Ok(grads)
    }

    fn fwd_composed(&self, xs: &[Tensor], need: &[bool]) -> Result<CustomFwd<Tensor>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|t| t.shape()).collect();
        let b = self.check(&shapes, need)?;
        // in f32, as the CPU kernel
        let f: Vec<Tensor> = xs.iter().map(|t| t.to_dtype(DType::F32)).collect::<Result<_>>()?;
        let (v, u, w) = (&f[0], &f[1], &f[2]);
        let p = v.numel() / b;
        let mut per = vec![1; v.ndim()];
        per[0] = b;
        let d = v.sub(u)?;
        let fm_i = d.unary(UnaryOp::Square, 0.0)?.sum_to_shape(&per)?.reshape(&[b])?.mul_scalar(1.0 / p as f32)?;
        let fm = fm_i.mul(w)?.sum_all()?.mul_scalar(1.0 / b as f32)?;
        let e = f.get(3).map(|r| v.sub(r)).transpose()?;
        let w2 = match &e {
            Some(e) => e.unary(UnaryOp::Square, 0.0)?.sum_all()?.mul_scalar(1.0 / (b * p) as f32)?,
            None => fm.full_like(0.0)?,
        };
        let total = fm.add(&w2.mul_scalar(self.alpha)?)?;
        let terms = Tensor::concat(&[fm.reshape(&[1])?, w2.reshape(&[1])?, total.reshape(&[1])?], 0)?;
        let mut saved = Vec::new();
        if need[0] {
            let c = 2.0 / (b * p) as f32;
            let mut dv = d.mul(&w.reshape(&per)?)?.mul_scalar(c)?;
            if let Some(e) = &e {
                dv = dv.add(&e.mul_scalar(c * self.alpha)?)?;
            }
            saved.push(dv);
        }
        Ok(CustomFwd { out: total, aux: vec![terms], saved })
    }

    fn bwd_composed(&self, xs: &[Tensor], saved: &[Tensor], g: &Tensor, need: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut grads = vec![None; xs.len()];
        if need[0] {
            let [dv] = saved else { bail!("orw_loss: saved state of {} tensors", saved.len()) };
            grads[0] = Some(dv.mul(g)?.to_dtype(xs[0].dtype())?);
        }
        Ok(grads)
    }
}

/// The ORW-CFM-W2 loss of the velocity `v` against the target `u` with per-sample weights `w [B]`
/// and, when `alpha ≠ 0`, the reference velocity `v_ref`: the differentiable total (shape `[]`)
/// and the terms `[fm, w2, total]` (f32, on `v`'s device).
pub fn orw_loss(v: &Var, u: &Tensor, w: &Tensor, v_ref: Option<&Tensor>, alpha: f32) -> Result<(Var, Tensor)> {
    let mut data = vec![Var::constant(u.clone()), Var::constant(w.clone())];
    if alpha != 0.0 {
        let Some(r) = v_ref else { bail!("orw_loss: α = {alpha} needs the reference velocity") };
        data.push(Var::constant(r.clone()));
    }
    let mut inputs = vec![v];
    inputs.extend(data.iter());
    let (total, mut aux) = apply_custom(OrwLossOp { alpha }, &inputs)?;
    Ok((total, aux.remove(0)))
}
