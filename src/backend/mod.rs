//! Numeric backends behind [`Tensor`](crate::tensor::Tensor)'s ops: the CPU reference and CUDA.
//!
//! Each backend has one storage type (a flat buffer of one [`DType`] on one device) and
//! implements [`BackendStorage`] for it: every op the engine has, forward and backward, on
//! contiguous row-major data whose shapes come with the call. `crate::tensor::Storage` is the
//! one place that chooses a backend; code above it never asks where a tensor lives. Ops return
//! `Result`: a GPU failure (out of memory, a failed launch) is an error, not a panic.
//!
//! Precision: f16 and bf16 storages are computed as the CPU reference defines them: operands
//! are widened to f32, the op runs in f32 (GEMMs and convolutions accumulate in f32; GroupNorm
//! statistics and softmax are f32) and the result is rounded once to the storage's dtype.
//! Integer storage (I32) holds labels and indices; float ops on it are errors.
pub mod cpu;
pub mod cuda;
pub mod geom;

use anyhow::Result;

pub use geom::{AttnGeom, ConvGeom, NormGeom, QkvOrder};

use crate::tensor::{DType, Device};

/// Broadcast binary ops (codes shared with the CUDA kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

/// Element-wise unary ops (codes shared with the CUDA kernels); `AddScalar` and `MulScalar`
/// take the op's scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    AddScalar = 0,
    MulScalar = 1,
    Exp = 2,
    Relu = 3,
    Square = 4,
    Silu = 5,
    Sigmoid = 6,
    Neg = 7,
    /// `x·Φ(x)` with the exact (erf) normal CDF: PyTorch's `gelu`, Hugging Face's `"gelu"`.
    Gelu = 8,
    /// `x·σ(1.702·x)`: OpenAI CLIP's `quick_gelu`.
    QuickGelu = 9,
}

/// The distribution of a counter-based random draw (Philox4x32-10, the layout of
/// [`crate::rng::philox`]; kernels `philox_uniform_f32` / `philox_normal_f32` of `kernels/rng.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RandomDist {
    /// In [0, 1), the top 24 bits of each lane ([`crate::rng::philox::fill_uniform`]).
    Uniform,
    /// Standard normal, Box–Muller on lane pairs ([`crate::rng::philox::fill_normal`]).
    Normal,
}

/// One Adam update's scalars (PyTorch's semantics; see `optim`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// `lr / (1 − β1^t)`
    pub step_size: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `√(1 − β2^t)`
    pub bc2_sqrt: f32,
    pub weight_decay: f32,
}

/// One pass of the optimiser over flat arenas ([`BackendStorage::adam_arena`]): the gradient
/// scaled by `grad_scale` (clipping's coefficient, 1 when it does not clip), Adam's update
/// `adam`, then, with an EMA arena, `ema ← ema·ema_decay + p·(1 − ema_decay)` toward the new
/// parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArenaStep {
    pub adam: AdamStep,
    pub grad_scale: f32,
    pub ema_decay: f32,
}

/// A backend's storage and its ops. Inputs are contiguous with the shapes given; every op
/// returns a new storage (the `_in_place` ops write into `self`). Two operands of one op are on
/// the same device (checked by the caller, `crate::tensor::Storage`).
pub trait BackendStorage: Sized + Clone {
    fn dtype(&self) -> DType;
    /// Number of elements.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn device(&self) -> Device;
    /// The values in host memory (a copy from a GPU, waiting for queued work).
    fn to_cpu_storage(&self) -> Result<cpu::CpuStorage>;
    /// The same values in `dtype` (round to nearest even when narrowing; f32 → i32 truncates).
    fn to_dtype(&self, dtype: DType) -> Result<Self>;
    /// `n` copies of `v` in `dtype` on the same device as `self`.
    fn full_like(&self, n: usize, v: f32, dtype: DType) -> Result<Self>;

    // ------------------------------------------------------------ counter-based random draws
    /// The `n` values of the Philox draw `(seed, offset)` of `dist` (element `i` from lane `i % 4`
    /// of block `offset + i / 4`, see [`crate::rng::philox`]), made on the same device as `self`
    /// (nothing crosses the bus), computed in f32 and rounded once to `dtype`. Uniforms are
    /// bit-identical on every device; normals agree to the device's `logf`/`sincosf` (a few ulp).
    fn philox_like(&self, n: usize, dist: RandomDist, seed: u64, offset: u64, dtype: DType) -> Result<Self>;
    /// Inverted dropout with the mask of the Philox draw `(seed, offset)`: `self · m` with
    /// `m = 1/(1−p)` where the draw's uniform is ≥ p, else 0 ([`crate::rng::philox::dropout`]),
    /// in f32, rounded once to `self`'s dtype. The mask is a function of `(seed, offset, p)` and
    /// the element index only, so the same call on the output gradient is dropout's backward.
    fn dropout(&self, p: f32, seed: u64, offset: u64) -> Result<Self>;

    // ------------------------------------------------------------ element-wise
    /// `self (shape a) op rhs (shape b)` broadcast to `out` (NumPy rules).
    fn binary(&self, a: &[usize], rhs: &Self, b: &[usize], out: &[usize], op: BinaryOp) -> Result<Self>;
    fn unary(&self, op: UnaryOp, scalar: f32) -> Result<Self>;
    /// The input gradient of `y = unary(x, op)` from the output gradient `self`.
    fn unary_backward(&self, op: UnaryOp, x: &Self, y: &Self) -> Result<Self>;
    /// Sum a `from`-shaped tensor down to `to` (the reverse of broadcasting).
    fn sum_to_shape(&self, from: &[usize], to: &[usize]) -> Result<Self>;
    /// Broadcast a `from`-shaped tensor up to `to`.
    fn broadcast_to(&self, from: &[usize], to: &[usize]) -> Result<Self>;
    /// A contiguous copy of the strided view `(shape, strides)` of `self` (permutes).
    fn gather_strided(&self, shape: &[usize], strides: &[usize]) -> Result<Self>;
    /// Softmax over rows of `n`.
    fn softmax_rows(&self, n: usize) -> Result<Self>;
    /// `dx` of softmax from its output `self` and `dy`.
    fn softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self>;
    fn log_softmax_rows(&self, n: usize) -> Result<Self>;
    /// `dx` of log-softmax from its output `self` and `dy`.
    fn log_softmax_rows_backward(&self, dy: &Self, n: usize) -> Result<Self>;

    // ------------------------------------------------------------ layout
    fn concat(parts: &[(&Self, &[usize])], axis: usize) -> Result<Self>;
    fn narrow(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self>;
    /// The gradient of `narrow` scattered back into zeros of `shape`.
    fn narrow_backward(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Self>;
    /// Nearest 2× upsampling of `[nc, h, w]`.
    fn upsample_nearest2x(&self, nc: usize, h: usize, w: usize) -> Result<Self>;
    /// Its gradient, `[nc, 2h, 2w] → [nc, h, w]`.
    fn upsample_nearest2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self>;
    /// 2×2 average pooling, stride 2, of `[nc, h, w]`.
    fn avg_pool2x(&self, nc: usize, h: usize, w: usize) -> Result<Self>;
    /// Its gradient back to `[nc, h, w]`.
    fn avg_pool2x_backward(&self, nc: usize, h: usize, w: usize) -> Result<Self>;
    /// Rows of the `[num, dim]` table `self` picked by the I32 `ids`.
    fn embedding(&self, ids: &Self, num: usize, dim: usize) -> Result<Self>;
    /// The table's gradient from the rows' gradient `self`.
    fn embedding_backward(&self, ids: &Self, num: usize, dim: usize) -> Result<Self>;
    /// torchcfm's sinusoidal embedding `[b] → [b, dim]`, `[cos | sin]`.
    fn timestep_embedding(&self, dim: usize, max_period: f32) -> Result<Self>;
    /// `dt` from the embedding `self` (its output) and its gradient.
    fn timestep_embedding_backward(&self, gy: &Self, dim: usize, max_period: f32) -> Result<Self>;

    // ------------------------------------------------------------ GEMM, conv, norm, attention
    /// `alpha · op(self) · op(b)` with `op(self)` `[m, k]` and `op(b)` `[k, n]` (`t*`: stored transposed).
    #[allow(clippy::too_many_arguments)]
    fn matmul(&self, ta: bool, b: &Self, tb: bool, m: usize, n: usize, k: usize, alpha: f32) -> Result<Self>;
    /// `self [n, i] · wᵀ + bias` with `w [o, i]`.
    fn linear(&self, w: &Self, bias: Option<&Self>, n: usize, i: usize, o: usize) -> Result<Self>;
    fn conv2d(&self, w: &Self, bias: Option<&Self>, g: &ConvGeom) -> Result<Self>;
    /// `(dx if need_dx, dw, db)` from the input `self`, the weight and `dy`.
    fn conv2d_backward(&self, w: &Self, dy: &Self, g: &ConvGeom, need_dx: bool) -> Result<(Option<Self>, Self, Self)>;
    /// `(y, mean, rstd)`; mean and rstd are f32 `[n·groups]`.
    fn group_norm(&self, gamma: &Self, beta: &Self, g: &NormGeom) -> Result<(Self, Self, Self)>;
    /// `(dx, dgamma, dbeta)` from the input `self`.
    fn group_norm_backward(&self, dy: &Self, gamma: &Self, mean: &Self, rstd: &Self, g: &NormGeom) -> Result<(Self, Self, Self)>;
    /// `(out, probs)`: probabilities `[b·heads, t, t]` in f32 for the backward.
    fn qkv_attention(&self, g: &AttnGeom) -> Result<(Self, Self)>;
    fn qkv_attention_backward(&self, probs: &Self, dout: &Self, g: &AttnGeom) -> Result<Self>;

    // ------------------------------------------------------------ in place, optimiser
    /// `self ← a·x + b·self`.
    fn axpby_in_place(&mut self, a: f32, x: &Self, b: f32) -> Result<()>;
    /// One Adam update of the parameter `self` with gradient `grad` and moments `m`, `v` (f32).
    fn adam_in_place(&mut self, grad: &Self, m: &mut Self, v: &mut Self, h: &AdamStep) -> Result<()>;
    /// The optimiser's one pass over flat f32 arenas, in place (all of one length): per element,
    /// `g ← grad·grad_scale`, Adam as [`BackendStorage::adam_in_place`] on `self` (the parameters)
    /// and the moments `m`, `v`, then `ema ← ema·decay + p·(1 − decay)` with the new `p` — the
    /// same f32 operations, in the same order, as clipping (`mul_scalar`), `adam_in_place` and
    /// `axpby_in_place` one after the other, so the results are bit-identical. One kernel launch
    /// on a GPU; a write to a shared arena copies it first (copy on write).
    fn adam_arena(&mut self, grad: &Self, m: &mut Self, v: &mut Self, ema: Option<&mut Self>, h: &ArenaStep) -> Result<()>;
    /// `Σ x²` over every element of every tensor, in f64, read back to the host.
    fn sum_squares(ts: &[&Self]) -> Result<f64>;
    /// [`BackendStorage::sum_squares`] left on the device (no host read, `ts` non-empty): an F32
    /// pair `[hi, lo]` with `hi` the f64 sum rounded to f32 and `lo` the f32 rounding of
    /// `sum − hi`, so `hi as f64 + lo as f64` is the f64 sum to about 2⁻⁴⁸ relative (a sum past
    /// f32's range gives `hi = ∞`, as does a non-finite element).
    fn sum_squares_on_device(ts: &[&Self]) -> Result<Self>;
}
