//! The interface of a fused op: its own forward and backward per backend (candle's `CustomOp` is
//! the model). [`crate::autograd::custom`] records one as a single node of the tape; which
//! backend runs it is decided in one place, [`crate::tensor::Storage::custom_fwd`].

use anyhow::Result;

use crate::backend::cpu::CpuStorage;
use crate::backend::cuda::CudaStorage;
use crate::tensor::Tensor;

/// A backend storage with its shape (contiguous, row-major).
pub type Shaped<S> = (S, Vec<usize>);
/// An op's inputs (or saved state) on one backend, borrowed with their shapes.
pub type Args<'a, S> = [(&'a S, &'a [usize])];

/// What a forward returns: `T` is `(storage, shape)` on a backend, or a [`Tensor`].
#[derive(Clone, Debug)]
pub struct CustomFwd<T> {
    /// The output, the one the tape differentiates.
    pub out: T,
    /// Further outputs without gradient (the loss's terms, say).
    pub aux: Vec<T>,
    /// What the backward needs beyond the op's inputs (empty when no gradient was asked for is fine).
    pub saved: Vec<T>,
}

impl<T> CustomFwd<T> {
    /// The same results, each converted by `f`.
    pub fn try_map<U>(self, mut f: impl FnMut(T) -> Result<U>) -> Result<CustomFwd<U>> {
        Ok(CustomFwd { out: f(self.out)?, aux: self.aux.into_iter().map(&mut f).collect::<Result<_>>()?, saved: self.saved.into_iter().map(&mut f).collect::<Result<_>>()? })
    }
}

/// An op with its own forward and backward per backend, recorded on the tape as one node.
///
/// `need[i]` says whether input `i` needs a gradient (all false when nothing is recorded, so a
/// forward can skip work only its backward would use). A backward returns one entry per input,
/// `None` where `need` is false, each shaped and typed like its input.
pub trait CustomOp: 'static {
    /// The op's name: its node on the tape, its kernels, its tests and its benchmark.
    fn name(&self) -> &'static str;

    /// The forward on the CPU backend.
    fn cpu_fwd(&self, xs: &Args<CpuStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CpuStorage>>>;
    /// The backward on the CPU backend from the inputs, the forward's `saved` and the output's gradient `g`.
    fn cpu_bwd(&self, xs: &Args<CpuStorage>, saved: &Args<CpuStorage>, g: (&CpuStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CpuStorage>>>;

    /// The op composed of today's tensor ops (any device): the CUDA default and the unfused
    /// reference the fused kernels are tested against. Its `saved` may differ from `cpu_fwd`'s:
    /// a backward only ever sees the state its own forward saved.
    fn fwd_composed(&self, xs: &[Tensor], need: &[bool]) -> Result<CustomFwd<Tensor>>;
    /// The backward of [`CustomOp::fwd_composed`].
    fn bwd_composed(&self, xs: &[Tensor], saved: &[Tensor], g: &Tensor, need: &[bool]) -> Result<Vec<Option<Tensor>>>;

    /// The forward on the CUDA backend (by default [`CustomOp::fwd_composed`]).
    fn cuda_fwd(&self, xs: &Args<CudaStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CudaStorage>>> {
        crate::tensor::storage::cuda_fwd_composed(self, xs, need)
    }
    /// The backward on the CUDA backend (by default [`CustomOp::bwd_composed`]).
    fn cuda_bwd(&self, xs: &Args<CudaStorage>, saved: &Args<CudaStorage>, g: (&CudaStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CudaStorage>>> {
        crate::tensor::storage::cuda_bwd_composed(self, xs, saved, g, need)
    }
}

/// An op run as its composition on every backend, the CPU included: the unfused reference on the
/// tape (tests, benchmarks), through the same dispatch as the fused op.
pub struct Composed<O>(pub O);

impl<O: CustomOp> CustomOp for Composed<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, xs: &Args<CpuStorage>, need: &[bool]) -> Result<CustomFwd<Shaped<CpuStorage>>> {
        crate::tensor::storage::cpu_fwd_composed(&self.0, xs, need)
    }
    fn cpu_bwd(&self, xs: &Args<CpuStorage>, saved: &Args<CpuStorage>, g: (&CpuStorage, &[usize]), need: &[bool]) -> Result<Vec<Option<CpuStorage>>> {
        crate::tensor::storage::cpu_bwd_composed(&self.0, xs, saved, g, need)
    }
    fn fwd_composed(&self, xs: &[Tensor], need: &[bool]) -> Result<CustomFwd<Tensor>> {
        self.0.fwd_composed(xs, need)
    }
    fn bwd_composed(&self, xs: &[Tensor], saved: &[Tensor], g: &Tensor, need: &[bool]) -> Result<Vec<Option<Tensor>>> {
        self.0.bwd_composed(xs, saved, g, need)
    }
}
