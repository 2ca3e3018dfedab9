//! Fused ops: an op with its own forward and backward on each backend that the tape records as
//! one node (candle's `CustomOp` is the model).
//!
//! A [`CustomOp`] says, per backend, how to compute its output (plus optional outputs without
//! gradient, `aux`) from its inputs and what it keeps for the backward (`saved`, its choice:
//! statistics, a log-sum-exp, a gradient computed in the same pass, or nothing), and how to turn
//! the output's gradient and that saved state into the inputs' gradients. The CPU side is
//! required (the CPU is the truth); the CUDA side defaults to [`CustomOp::fwd_composed`] /
//! [`CustomOp::bwd_composed`], the op written in today's device-generic [`Tensor`] ops, until a
//! fused kernel replaces it. Which backend runs is decided in one place,
//! [`crate::tensor::Storage::custom_fwd`]; nothing here asks where a tensor lives.
//!
//! Inputs arrive contiguous with their shapes; outputs, aux and saved come back with theirs.
//! Dtypes follow the CPU backend's rule: f16/bf16 operands are widened to f32, the op runs in f32
//! (statistics, softmax and losses in f32 or wider) and each result is rounded once to its dtype.

use anyhow::Result;

use super::{Var, grad_enabled};
use crate::tensor::Tensor;
pub use crate::tensor::custom::{Args, Composed, CustomFwd, CustomOp, Shaped};

/// Apply `op` to `inputs`: its output as one node of the tape (when gradients are enabled and an
/// input requires them), and its aux outputs as plain tensors.
pub fn apply_custom<O: CustomOp>(op: O, inputs: &[&Var]) -> Result<(Var, Vec<Tensor>)> {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.value()).collect();
    let record = grad_enabled() && inputs.iter().any(|v| v.requires_grad());
    let need: Vec<bool> = inputs.iter().map(|v| record && v.requires_grad()).collect();
    let refs: Vec<&Tensor> = xs.iter().collect();
    let CustomFwd { out, aux, saved } = Tensor::apply_custom(&op, &refs, &need)?;
    let parents: Vec<Var> = inputs.iter().map(|&v| v.clone()).collect();
    let name = op.name();
    // not recorded (no_grad, or no input needs a gradient): from_op drops the closure and the saved state
    let var = Var::from_op(out, parents, name, move |g| Tensor::custom_backward(&op, &xs, &saved, g, &need));
    Ok((var, aux))
}
