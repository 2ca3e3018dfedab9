//! `act(GroupNorm(x) · (1 + scale) + shift)` as one node: torchcfm's `in_layers` (`silu(GN(x))`),
//! its `out_layers` with `use_scale_shift_norm` (`silu(GN(h)·(1 + scale) + shift)`) or without
//! (`silu(GN(h + emb))`, the add done before), and the output head.
//!
//! CPU: `group_norm_act_forward/backward` (statistics in f64, saved `mean`, `rstd` in f32; the
//! backward recomputes the pre-activation from `x`). CUDA: the same in `kernels/fused.cu`
//! (`backend::cuda::fused`: one launch forward, two backward), f16/bf16 widened to f32 around
//! them. Composition: GroupNorm, the modulation, SiLU, as the U-Net ran them before this node
//! existed.

use anyhow::{Result, bail};

use super::{cuda_f32s, float_dtype, in_dtype};
use crate::autograd::Var;
use crate::autograd::custom::{Args, CustomFwd, CustomOp, Shaped, apply_custom};
use crate::backend::cpu::CpuStorage;
use crate::backend::cpu::fused::{Act, GnGeom, group_norm_act_backward, group_norm_act_forward};
use crate::backend::cuda::{CudaStorage, fused as cuda_fused};
use crate::backend::{BackendStorage, UnaryOp};
use crate::tensor::{DType, Tensor};

/// GroupNorm over `x [N, C, ...]` in `groups` groups with affine `[C]` parameters, then an
/// optional per-(sample, channel) modulation by `scale`, `shift` (`N·C` values each), then `act`.
/// Inputs: `[x, gamma, beta]` or `[x, gamma, beta, scale, shift]`.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormAct {
    pub groups: usize,
    pub eps: f32,
    pub act: Act,
}

impl GroupNormAct {
    fn geom(&self, shapes: &[&[usize]]) -> Result<GnGeom> {
        if shapes.len() != 3 && shapes.len() != 5 {
            bail!("group_norm_act: {} inputs (x, gamma, beta and optionally scale, shift)", shapes.len());
        }
        let xs = shapes[0];
        if xs.len() < 2 {
            bail!("group_norm_act expects x [N, C, ...], got {xs:?}");
        }
        let (n, c) = (xs[0], xs[1]);
        if self.groups == 0 || !c.is_multiple_of(self.groups) {
            bail!("group_norm_act: {c} channels are not divisible into {} groups", self.groups);
        }
        if shapes[1] != [c] || shapes[2] != [c] {
            bail!("group_norm_act: affine shapes {:?} and {:?} for {c} channels", shapes[1], shapes[2]);
        }
        for (what, sh) in shapes.iter().skip(3).enumerate() {
            if sh.iter().product::<usize>() != n * c || sh.first() != Some(&n) {
                bail!("group_norm_act: {} of shape {sh:?} for x {xs:?} (expected [N, C] values)", ["scale", "shift"][what]);
            }
        }
        Ok(GnGeom { n, c, s: xs[2..].iter().product(), groups: self.groups, eps: self.eps })
    }
}

/// `[N, C, 1, …]` for broadcasting a per-(sample, channel) value over `x`'s spatial axes.
fn per_channel(x: &[usize]) -> Vec<usize> {
    let mut s = vec![1; x.len()];
    s[..2].copy_from_slice(&x[..2]);
    s
}

impl CustomOp for GroupNormAct {
    fn name(&self) -> &'static str {
        "group_norm_act"
    }

    fn cpu_fwd(&self, xs: &Args<CpuStorage>, _need: &[bool]) -> Result<CustomFwd<Shaped<CpuStorage>>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|p| p.1).collect();
        let g = self.geom(&shapes)?;
        let dt = float_dtype(self.name(), xs)?;
        let v: Vec<_> = xs.iter().map(|p| p.0.f32s()).collect();
        let (scale, shift) = (v.get(3).map(|s| &s[..]), v.get(4).map(|s| &s[..]));
        let (y, mean, rstd) = group_norm_act_forward(&v[0], &g, &v[1], &v[2], scale, shift, self.act);
        let st = vec![g.n * g.groups];
        Ok(CustomFwd { out: (in_dtype(y, dt), xs[0].1.to_vec()), aux: Vec::new(), saved: vec![(CpuStorage::from_f32(mean), st.clone()), (CpuStorage::from_f32(rstd), st)] })
    }

    fn cpu_bwd(&self, xs: &Args<CpuStorage>, saved: &Args<CpuStorage>, g: (&CpuStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CpuStorage>>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|p| p.1).collect();
        let geom = self.geom(&shapes)?;
        let dt = float_dtype(self.name(), xs)?;
        let v: Vec<_> = xs.iter().map(|p| p.0.f32s()).collect();
        let (scale, shift) = (v.get(3).map(|s| &s[..]), v.get(4).map(|s| &s[..]));
        let gr = group_norm_act_backward(&v[0], &g.0.f32s(), &geom, &v[1], &v[2], scale, shift, self.act, saved[0].0.as_f32()?, saved[1].0.as_f32()?);
        let mut out = vec![Some(gr.dx), Some(gr.dgamma), Some(gr.dbeta)];
        if xs.len() == 5 {
            out.push(gr.dscale);
            out.push(gr.dshift);
        }
        Ok(out.into_iter().zip(need).map(|(d, &n)| d.filter(|_| n).map(|d| in_dtype(d, dt))).collect())
    }

    fn cuda_fwd(&self, xs: &Args<CudaStorage>, _need: &[bool]) -> Result<CustomFwd<Shaped<CudaStorage>>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|p| p.1).collect();
        let g = self.geom(&shapes)?;
        let dt = float_dtype(self.name(), xs)?;
        // x read and y written in their dtype (16 bits: one pass); the affine parameters widened
        let p = cuda_f32s(&xs[1..])?;
        let (y, mean, rstd) = cuda_fused::group_norm_act_forward(xs[0].0, &p[0], &p[1], p.get(2), p.get(3), &g, self.act == Act::Silu)?;
        let st = vec![g.n * g.groups];
        Ok(CustomFwd { out: (y.to_dtype(dt)?, xs[0].1.to_vec()), aux: Vec::new(), saved: vec![(mean, st.clone()), (rstd, st)] })
    }

    fn cuda_bwd(&self, xs: &Args<CudaStorage>, saved: &Args<CudaStorage>, g: (&CudaStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CudaStorage>>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|p| p.1).collect();
        let geom = self.geom(&shapes)?;
        let dt = float_dtype(self.name(), xs)?;
        let [(mean, _), (rstd, _)] = saved else { bail!("group_norm_act: saved state of {} tensors", saved.len()) };
        if mean.dtype() != DType::F32 || rstd.dtype() != DType::F32 {
            bail!("group_norm_act: expected f32 statistics, found {} and {}", mean.dtype(), rstd.dtype());
        }
        let v = cuda_f32s(xs)?;
        let dy = g.0.to_dtype(DType::F32)?;
        let gr = cuda_fused::group_norm_act_backward(&v[0], &dy, &v[1], &v[2], v.get(3), v.get(4), mean, rstd, &geom, self.act == Act::Silu)?;
        let mut out = vec![Some(gr.dx), Some(gr.dgamma), Some(gr.dbeta)];
        if xs.len() == 5 {
            out.push(gr.dscale);
            out.push(gr.dshift);
        }
        out.into_iter().zip(need).map(|(d, &n)| d.filter(|_| n).map(|d| d.to_dtype(dt)).transpose()).collect()
    }

    fn fwd_composed(&self, xs: &[Tensor], _need: &[bool]) -> Result<CustomFwd<Tensor>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|t| t.shape()).collect();
        self.geom(&shapes)?;
        let (x, gamma, beta) = (&xs[0], &xs[1], &xs[2]);
        let ng = x.norm_geom(gamma, beta, self.groups, self.eps)?;
        let (y, mean, rstd) = x.group_norm(gamma, beta, &ng)?;
        let pc = per_channel(x.shape());
        let z = if xs.len() == 5 { y.mul(&xs[3].reshape(&pc)?.add_scalar(1.0)?)?.add(&xs[4].reshape(&pc)?)? } else { y.clone() };
        let out = match self.act {
            Act::Silu => z.unary(UnaryOp::Silu, 0.0)?,
            Act::None => z.clone(),
        };
        Ok(CustomFwd { out: out.clone(), aux: Vec::new(), saved: vec![mean, rstd, y, z, out] })
    }

    fn bwd_composed(&self, xs: &[Tensor], saved: &[Tensor], g: &Tensor, need: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (x, gamma, beta) = (&xs[0], &xs[1], &xs[2]);
        let [mean, rstd, y, z, out] = saved else { bail!("group_norm_act: saved state of {} tensors", saved.len()) };
        let ng = x.norm_geom(gamma, beta, self.groups, self.eps)?;
        let dz = match self.act {
            Act::Silu => g.unary_backward(UnaryOp::Silu, z, out)?,
            Act::None => g.clone(),
        };
        let pc = per_channel(x.shape());
        let (dy, mut rest) = if xs.len() == 5 {
            let dscale = if need[3] { Some(dz.mul(y)?.sum_to_shape(&pc)?.reshape(xs[3].shape())?) } else { None };
            let dshift = if need[4] { Some(dz.sum_to_shape(&pc)?.reshape(xs[4].shape())?) } else { None };
            (dz.mul(&xs[3].reshape(&pc)?.add_scalar(1.0)?)?, vec![dscale, dshift])
        } else {
            (dz, Vec::new())
        };
        let (dx, dgamma, dbeta) = x.group_norm_backward(&dy, gamma, mean, rstd, &ng)?;
        let mut grads = vec![need[0].then_some(dx), need[1].then_some(dgamma), need[2].then_some(dbeta)];
        grads.append(&mut rest);
        Ok(grads)
    }
}

/// `act(GroupNorm(groups, C, eps)(x) · (1 + scale) + shift)` as one node; `scale_shift` is
/// `(scale, shift)` with `N·C` values each (any shape `[N, ...]`), or `None` for `act(GN(x))`.
pub fn group_norm_act(x: &Var, gamma: &Var, beta: &Var, scale_shift: Option<(&Var, &Var)>, groups: usize, eps: f32, act: Act) -> Result<Var> {
    let mut inputs = vec![x, gamma, beta];
    if let Some((s, h)) = scale_shift {
        inputs.extend([s, h]);
    }
    Ok(apply_custom(GroupNormAct { groups, eps, act }, &inputs)?.0)
}
