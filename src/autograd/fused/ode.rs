//! `x + Σ c_i k_i`, the state update of a fixed-grid ODE step (Euler: one term; midpoint: one
//! term, the midpoint slope; RK4 / 3-8 rule: four), as one node.
//!
//! CPU: `ode_combine` (one pass, the sum accumulated in f64 per element, rounded once). CUDA: the
//! same sum in one launch (`kernels/fused.cu` `ode_combine_f32`, float4 where aligned; one launch
//! per 8 non-zero terms), f16/bf16 widened to f32 around it; the backward's `dk_i` in one launch.
//! Composition: one `axpby` per term in f32 (how `flow::ode` combined stages before).
//! Backward: `dx = g`, `dk_i = c_i g`; nothing saved.

use anyhow::{Result, bail};

use super::{cuda_f32s, float_dtype, in_dtype};
use crate::autograd::Var;
use crate::autograd::custom::{Args, CustomFwd, CustomOp, Shaped, apply_custom};
use crate::backend::BackendStorage;
use crate::backend::cpu::CpuStorage;
use crate::backend::cpu::fused::ode_combine as ode_combine_kernel;
use crate::backend::cuda::{CudaStorage, fused as cuda_fused};
use crate::tensor::{DType, Tensor};

/// `x + Σ coeffs[i] · k_i`. Inputs: `[x, k_1, …, k_n]`, one shape.
#[derive(Clone, Debug)]
pub struct OdeCombine {
    pub coeffs: Vec<f32>,
}

impl OdeCombine {
    fn check(&self, shapes: &[&[usize]]) -> Result<()> {
        if shapes.len() != self.coeffs.len() + 1 {
            bail!("ode_combine: {} inputs for {} coefficients (x and one slope per coefficient)", shapes.len(), self.coeffs.len());
        }
        if let Some(s) = shapes.iter().find(|s| *s != &shapes[0]) {
            bail!("ode_combine: a slope of shape {s:?} for a state of shape {:?}", shapes[0]);
        }
        Ok(())
    }
}

impl CustomOp for OdeCombine {
    fn name(&self) -> &'static str {
        "ode_combine"
    }

    fn cpu_fwd(&self, xs: &Args<CpuStorage>, _need: &[bool]) -> Result<CustomFwd<Shaped<CpuStorage>>> {
        self.check(&xs.iter().map(|p| p.1).collect::<Vec<_>>())?;
        let dt = float_dtype(self.name(), xs)?;
        let v: Vec<_> = xs.iter().map(|p| p.0.f32s()).collect();
        let terms: Vec<(f64, &[f32])> = self.coeffs.iter().zip(&v[1..]).map(|(&c, k)| (c as f64, &k[..])).collect();
        Ok(CustomFwd { out: (in_dtype(ode_combine_kernel(&v[0], &terms), dt), xs[0].1.to_vec()), aux: Vec::new(), saved: Vec::new() })
    }

    fn cpu_bwd(&self, xs: &Args<CpuStorage>, _saved: &Args<CpuStorage>, g: (&CpuStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CpuStorage>>> {
        let gv = g.0.f32s();
        let mut grads = vec![if need[0] { Some(g.0.to_dtype(xs[0].0.dtype())?) } else { None }];
        for (i, &c) in self.coeffs.iter().enumerate() {
            // c·g rounded once, like the kernel's f64 products
            grads.push(need[i + 1].then(|| in_dtype(gv.iter().map(|&v| (c as f64 * v as f64) as f32).collect(), xs[i + 1].0.dtype())));
        }
        Ok(grads)
    }

    fn cuda_fwd(&self, xs: &Args<CudaStorage>, _need: &[bool]) -> Result<CustomFwd<Shaped<CudaStorage>>> {
        self.check(&xs.iter().map(|p| p.1).collect::<Vec<_>>())?;
        let dt = float_dtype(self.name(), xs)?;
        let v = cuda_f32s(xs)?;
        let terms: Vec<(f32, &CudaStorage)> = self.coeffs.iter().copied().zip(&v[1..]).collect();
        Ok(CustomFwd { out: (cuda_fused::ode_combine(&v[0], &terms)?.to_dtype(dt)?, xs[0].1.to_vec()), aux: Vec::new(), saved: Vec::new() })
    }

    fn cuda_bwd(&self, xs: &Args<CudaStorage>, _saved: &Args<CudaStorage>, g: (&CudaStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CudaStorage>>> {
        let mut grads = vec![if need[0] { Some(g.0.to_dtype(xs[0].0.dtype())?) } else { None }];
        let wanted: Vec<usize> = (0..self.coeffs.len()).filter(|&i| need[i + 1]).collect();
        let mut dks = if wanted.is_empty() { Vec::new() } else { cuda_fused::ode_combine_backward(&g.0.to_dtype(DType::F32)?, &wanted.iter().map(|&i| self.coeffs[i]).collect::<Vec<_>>())? }.into_iter();
        for i in 0..self.coeffs.len() {
            grads.push(if need[i + 1] { dks.next().map(|d| d.to_dtype(xs[i + 1].0.dtype())).transpose()? } else { None });
        }
        Ok(grads)
    }

    fn fwd_composed(&self, xs: &[Tensor], _need: &[bool]) -> Result<CustomFwd<Tensor>> {
        self.check(&xs.iter().map(|t| t.shape()).collect::<Vec<_>>())?;
        let mut out = xs[0].clone();
        for (&c, k) in self.coeffs.iter().zip(&xs[1..]) {
            out.axpby_in_place(c, k, 1.0)?;
        }
        Ok(CustomFwd { out, aux: Vec::new(), saved: Vec::new() })
    }

    fn bwd_composed(&self, xs: &[Tensor], _saved: &[Tensor], g: &Tensor, need: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut grads = vec![if need[0] { Some(g.to_dtype(xs[0].dtype())?) } else { None }];
        for (i, &c) in self.coeffs.iter().enumerate() {
            grads.push(if need[i + 1] { Some(g.mul_scalar(c)?.to_dtype(xs[i + 1].dtype())?) } else { None });
        }
        Ok(grads)
    }
}

/// `x + Σ c_i k_i` as one node.
pub fn ode_combine(x: &Var, terms: &[(f32, &Var)]) -> Result<Var> {
    let mut inputs = vec![x];
    inputs.extend(terms.iter().map(|t| t.1));
    Ok(apply_custom(OdeCombine { coeffs: terms.iter().map(|t| t.0).collect() }, &inputs)?.0)
}

/// `x + Σ c_i k_i` of plain tensors (no tape): the ODE solvers' step combination.
pub fn ode_combine_tensors(x: &Tensor, terms: &[(f32, &Tensor)]) -> Result<Tensor> {
    let mut inputs = vec![x];
    inputs.extend(terms.iter().map(|t| t.1));
    let op = OdeCombine { coeffs: terms.iter().map(|t| t.0).collect() };
    Ok(Tensor::apply_custom(&op, &inputs, &vec![false; inputs.len()])?.out)
}
