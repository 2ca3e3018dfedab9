//! Tensor ops: shapes are checked and computed here, values by the operands' backend.
//! Each op has the name it has in autograd, in both backends and in the kernels.

use anyhow::{Result, bail};

use super::custom::{CustomFwd, CustomOp};
use super::{DType, Storage, Tensor, contiguous_strides};
use crate::backend::cpu::elementwise::broadcast_shape;
use crate::backend::{AdamStep, AttnGeom, BinaryOp, ConvGeom, NormGeom, QkvOrder, UnaryOp};

/// The dtype two float operands meet in: equal dtypes stay, anything with f32 (or f16 with bf16) is f32.
fn promote(a: DType, b: DType) -> DType {
    if a == b { a } else { DType::F32 }
}

impl Tensor {
    /// `self op rhs` with NumPy broadcasting; differing float dtypes meet in f32.
    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let out = broadcast_shape(&self.shape, &rhs.shape).ok_or_else(|| anyhow::anyhow!("{op:?}: shapes {:?} and {:?} do not broadcast", self.shape, rhs.shape))?;
        let dt = promote(self.dtype(), rhs.dtype());
        let (a, b) = (self.to_dtype(dt)?, rhs.to_dtype(dt)?);
        Ok(Tensor::from_op(a.storage.binary(&a.shape, &b.storage, &b.shape, &out, op)?, &out))
    }
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }
    pub fn unary(&self, op: UnaryOp, scalar: f32) -> Result<Tensor> {
        Ok(Tensor::from_op(self.storage.unary(op, scalar)?, &self.shape))
    }
    /// The input gradient of `y = x.unary(op)` from the output gradient `self`.
    pub fn unary_backward(&self, op: UnaryOp, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_op(self.storage.unary_backward(op, &x.storage, &y.storage)?, &self.shape))
    }
    pub fn mul_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::MulScalar, s)
    }
    pub fn add_scalar(&self, s: f32) -> Result<Tensor> {
        self.unary(UnaryOp::AddScalar, s)
    }
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg, 0.0)
    }
    /// Sum down to `to` (the reverse of broadcasting); shared when nothing is summed.
    pub fn sum_to_shape(&self, to: &[usize]) -> Result<Tensor> {
        if self.shape == to {
            return Ok(self.clone());
        }
        if broadcast_shape(to, &self.shape).as_deref() != Some(&self.shape[..]) {
            bail!("sum_to_shape: {:?} does not broadcast to {:?}", to, self.shape);
        }
        Ok(Tensor::from_op(self.storage.sum_to_shape(&self.shape, to)?, to))
    }
    /// Broadcast up to `to`.
    pub fn broadcast_to(&self, to: &[usize]) -> Result<Tensor> {
        if self.shape == to {
            return Ok(self.clone());
        }
        if broadcast_shape(&self.shape, to).as_deref() != Some(to) {
            bail!("broadcast_to: {:?} does not broadcast to {to:?}", self.shape);
        }
        Ok(Tensor::from_op(self.storage.broadcast_to(&self.shape, to)?, to))
    }
    /// The sum of every element, as a `[]` tensor on the same device.
    pub fn sum_all(&self) -> Result<Tensor> {
        Ok(Tensor::from_op(self.storage.sum_to_shape(&self.shape, &[])?, &[]))
    }

    /// Same data, new shape (same number of elements).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            bail!("cannot reshape {:?} ({} values) to {shape:?} ({n} values)", self.shape, self.numel());
        }
        Ok(Tensor { shape: shape.to_vec(), strides: contiguous_strides(shape), storage: self.storage.clone() })
    }
    /// Materialised permutation of the axes (`out.shape[i] = self.shape[perm[i]]`).
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.ndim()];
        if perm.len() != self.ndim() || perm.iter().any(|&p| p >= self.ndim() || std::mem::replace(&mut seen[p], true)) {
            bail!("permute: {perm:?} is not a permutation of the {} axes of {:?}", self.ndim(), self.shape);
        }
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let strides: Vec<usize> = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(Tensor::from_op(self.storage.gather_strided(&shape, &strides)?, &shape))
    }
    fn last_dim(&self, op: &str) -> Result<usize> {
        match self.shape.last() {
            Some(&n) => Ok(n),
            None => bail!("{op} of a scalar"),
        }
    }
    /// Softmax over the last axis.
    pub fn softmax(&self) -> Result<Tensor> {
        let n = self.last_dim("softmax")?;
        Ok(Tensor::from_op(self.storage.softmax_rows(n)?, &self.shape))
    }
    /// `dx` of softmax from its output `self` and `dy`.
    pub fn softmax_backward(&self, dy: &Tensor) -> Result<Tensor> {
        let n = self.last_dim("softmax")?;
        Ok(Tensor::from_op(self.storage.softmax_rows_backward(&dy.storage, n)?, &self.shape))
    }
    pub fn log_softmax(&self) -> Result<Tensor> {
        let n = self.last_dim("log_softmax")?;
        Ok(Tensor::from_op(self.storage.log_softmax_rows(n)?, &self.shape))
    }
    pub fn log_softmax_backward(&self, dy: &Tensor) -> Result<Tensor> {
        let n = self.last_dim("log_softmax")?;
        Ok(Tensor::from_op(self.storage.log_softmax_rows_backward(&dy.storage, n)?, &self.shape))
    }

    /// Concatenate along `axis`.
    pub fn concat(parts: &[Tensor], axis: usize) -> Result<Tensor> {
        let Some(first) = parts.first() else { bail!("concat of no tensors") };
        if axis >= first.ndim() {
            bail!("concat: axis {axis} out of range for {:?}", first.shape);
        }
        let dt = first.dtype();
        for p in &parts[1..] {
            let (a, b) = (&first.shape, &p.shape);
            if a.len() != b.len() || a.iter().zip(b).enumerate().any(|(i, (x, y))| i != axis && x != y) {
                bail!("concat: shapes {a:?} and {b:?} differ off axis {axis}");
            }
            if p.dtype() != dt {
                bail!("concat: dtypes {dt} and {}", p.dtype());
            }
        }
        let mut shape = first.shape.clone();
        shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
        let refs: Vec<(&Storage, &[usize])> = parts.iter().map(|p| (&p.storage, p.shape.as_slice())).collect();
        Ok(Tensor::from_op(Storage::concat(&refs, axis)?, &shape))
    }
    /// The slice `[start, start+len)` along `axis`.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Tensor> {
        if axis >= self.ndim() || start + len > self.shape[axis] {
            bail!("narrow: [{start}, {}) on axis {axis} is out of range for {:?}", start + len, self.shape);
        }
        let mut out = self.shape.clone();
        out[axis] = len;
        Ok(Tensor::from_op(self.storage.narrow(&self.shape, axis, start, len)?, &out))
    }
    /// The gradient of `narrow` scattered into zeros of `shape`.
    pub fn narrow_backward(&self, shape: &[usize], axis: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(Tensor::from_op(self.storage.narrow_backward(shape, axis, start, len)?, shape))
    }
    fn nchw(&self, op: &str) -> Result<(usize, usize, usize)> {
        if self.ndim() != 4 {
            bail!("{op} expects [N, C, H, W], got {:?}", self.shape);
        }
        Ok((self.shape[0] * self.shape[1], self.shape[2], self.shape[3]))
    }
    /// Nearest-neighbour 2× upsampling of `[N, C, H, W]`.
    pub fn upsample_nearest2x(&self) -> Result<Tensor> {
        let (nc, h, w) = self.nchw("upsample_nearest2x")?;
        Ok(Tensor::from_op(self.storage.upsample_nearest2x(nc, h, w)?, &[self.shape[0], self.shape[1], 2 * h, 2 * w]))
    }
    /// Its gradient, back to `in_shape`.
    pub fn upsample_nearest2x_backward(&self, in_shape: &[usize]) -> Result<Tensor> {
        let (nc, h, w) = (in_shape[0] * in_shape[1], in_shape[2], in_shape[3]);
        Ok(Tensor::from_op(self.storage.upsample_nearest2x_backward(nc, h, w)?, in_shape))
    }
    /// 2×2 average pooling, stride 2.
    pub fn avg_pool2x(&self) -> Result<Tensor> {
        let (nc, h, w) = self.nchw("avg_pool2x")?;
        Ok(Tensor::from_op(self.storage.avg_pool2x(nc, h, w)?, &[self.shape[0], self.shape[1], h / 2, w / 2]))
    }
    pub fn avg_pool2x_backward(&self, in_shape: &[usize]) -> Result<Tensor> {
        let (nc, h, w) = (in_shape[0] * in_shape[1], in_shape[2], in_shape[3]);
        Ok(Tensor::from_op(self.storage.avg_pool2x_backward(nc, h, w)?, in_shape))
    }
    /// Rows of the table `self [num, dim]` picked by the i32 tensor `ids [n]`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if self.ndim() != 2 || ids.ndim() != 1 || ids.dtype() != DType::I32 {
            bail!("embedding: table {:?} and ids {:?} {} (expected [num, dim] and i32 [n])", self.shape, ids.shape, ids.dtype());
        }
        let (num, dim) = (self.shape[0], self.shape[1]);
        Ok(Tensor::from_op(self.storage.embedding(&ids.storage, num, dim)?, &[ids.numel(), dim]))
    }
    /// The rows `idx` of `self` along axis 0 (any rank; a gather on `self`'s device, the
    /// indices uploaded as i32).
    pub fn index_rows(&self, idx: &[usize]) -> Result<Tensor> {
        if self.ndim() == 0 {
            bail!("index_rows of a scalar");
        }
        let (num, per) = (self.shape[0], self.numel() / self.shape[0].max(1));
        if let Some(&bad) = idx.iter().find(|&&i| i >= num) {
            bail!("index_rows: row {bad} of a tensor with {num} rows");
        }
        let ids = Tensor::from_indices(idx)?.to_device(self.device())?;
        let mut shape = self.shape.clone();
        shape[0] = idx.len();
        self.reshape(&[num, per])?.embedding(&ids)?.reshape(&shape)
    }
    pub fn embedding_backward(&self, ids: &Tensor, num: usize) -> Result<Tensor> {
        let dim = self.shape[1];
        Ok(Tensor::from_op(self.storage.embedding_backward(&ids.storage, num, dim)?, &[num, dim]))
    }
    /// torchcfm's sinusoidal `timestep_embedding(t [B], dim) → [B, dim]`.
    pub fn timestep_embedding(&self, dim: usize) -> Result<Tensor> {
        if self.ndim() != 1 {
            bail!("timestep_embedding expects t of shape [B], got {:?}", self.shape);
        }
        Ok(Tensor::from_op(self.storage.timestep_embedding(dim, 10000.0)?, &[self.numel(), dim]))
    }
    /// `dt` from the embedding `self` and its gradient.
    pub fn timestep_embedding_backward(&self, gy: &Tensor) -> Result<Tensor> {
        let (b, dim) = (self.shape[0], self.shape[1]);
        Ok(Tensor::from_op(self.storage.timestep_embedding_backward(&gy.storage, dim, 10000.0)?, &[b]))
    }

    /// `alpha · op(self) · op(b)` of 2-D tensors, `op` transposing where `t*` is set.
    pub fn matmul_t(&self, ta: bool, b: &Tensor, tb: bool, alpha: f32) -> Result<Tensor> {
        if self.ndim() != 2 || b.ndim() != 2 {
            bail!("matmul of {:?} and {:?}: 2-D tensors expected", self.shape, b.shape);
        }
        let (m, k) = if ta { (self.shape[1], self.shape[0]) } else { (self.shape[0], self.shape[1]) };
        let (kb, n) = if tb { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
        if k != kb {
            bail!("matmul {:?}{} x {:?}{}: inner sizes {k} and {kb} differ", self.shape, if ta { "ᵀ" } else { "" }, b.shape, if tb { "ᵀ" } else { "" });
        }
        Ok(Tensor::from_op(self.storage.matmul(ta, &b.storage, tb, m, n, k, alpha)?, &[m, n]))
    }
    pub fn matmul(&self, b: &Tensor) -> Result<Tensor> {
        self.matmul_t(false, b, false, 1.0)
    }
    /// `self [n, in] · wᵀ + bias` with `w [out, in]` (`nn.Linear`).
    pub fn linear(&self, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if self.ndim() != 2 || w.ndim() != 2 || self.shape[1] != w.shape[1] {
            bail!("linear: input {:?}, weight {:?}", self.shape, w.shape);
        }
        let (n, i, o) = (self.shape[0], self.shape[1], w.shape[0]);
        if let Some(b) = bias
            && b.shape != [o]
        {
            bail!("linear: bias {:?} for {o} outputs", b.shape);
        }
        Ok(Tensor::from_op(self.storage.linear(&w.storage, bias.map(|b| &b.storage), n, i, o)?, &[n, o]))
    }
    /// The geometry of `conv2d(self, w)`, checked.
    pub fn conv_geom(&self, w: &Tensor, stride: usize, pad: usize) -> Result<ConvGeom> {
        let (xs, ws) = (&self.shape, &w.shape);
        if xs.len() != 4 || ws.len() != 4 || xs[1] != ws[1] {
            bail!("conv2d: input {xs:?}, weight {ws:?}");
        }
        let g = ConvGeom { n: xs[0], cin: xs[1], h: xs[2], w: xs[3], cout: ws[0], kh: ws[2], kw: ws[3], stride, pad };
        if stride == 0 || g.h + 2 * pad < g.kh || g.w + 2 * pad < g.kw {
            bail!("conv2d: input {xs:?} smaller than kernel {ws:?} (or stride 0)");
        }
        Ok(g)
    }
    /// 2-D convolution, optional bias `[cout]`, stride, zero padding.
    pub fn conv2d(&self, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
        let g = self.conv_geom(w, stride, pad)?;
        if let Some(b) = bias
            && b.shape != [g.cout]
        {
            bail!("conv2d: bias {:?} for {} output channels", b.shape, g.cout);
        }
        Ok(Tensor::from_op(self.storage.conv2d(&w.storage, bias.map(|b| &b.storage), &g)?, &g.out_shape()))
    }
    /// `conv2d(self, w, bias) + a` with `a` of the output's shape `[N, Cout, Ho, Wo]` (a residual
    /// branch) or `[N, Cout, 1, 1]` (a per-sample, per-channel shift): on the CPU in f32 the sum
    /// is taken as the convolution writes its output (no second pass, no second tensor);
    /// elsewhere it is `conv2d` then `add`.
    pub fn conv2d_add(&self, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
        let g = self.conv_geom(w, stride, pad)?;
        let out = g.out_shape();
        let per_channel = a.shape == [g.n, g.cout, 1, 1];
        if a.shape != out && !per_channel {
            bail!("conv2d_add: {:?} cannot be added to the output {out:?}", a.shape);
        }
        let all_f32 = [Some(self), Some(w), bias, Some(a)].into_iter().flatten().all(|t| t.dtype() == DType::F32);
        // the bias on the CPU and of the right shape (Some(None): no bias); else the unfused path
        let cpu_bias = match bias {
            None => Some(None),
            Some(b) => match &b.storage {
                Storage::Cpu(c) if b.shape == [g.cout] => Some(Some(c)),
                _ => None,
            },
        };
        if let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(xa), Some(bs)) = (&self.storage, &w.storage, &a.storage, cpu_bias)
            && all_f32
        {
            let _p = crate::backend::cpu::profile::scope("conv2d_add");
            return Ok(Tensor::from_op(Storage::Cpu(xs.conv2d_add(ws, bs, xa, per_channel, &g)?), &out));
        }
        self.conv2d(w, bias, stride, pad)?.add(a)
    }
    /// `(dx if need_dx, dw, db)` of `conv2d(self, w)` given `dy`.
    pub fn conv2d_backward(&self, w: &Tensor, dy: &Tensor, g: &ConvGeom, need_dx: bool) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let (dx, dw, db) = self.storage.conv2d_backward(&w.storage, &dy.storage, g, need_dx)?;
        Ok((dx.map(|d| Tensor::from_op(d, &g.in_shape())), Tensor::from_op(dw, &g.weight_shape()), Tensor::from_op(db, &[g.cout])))
    }
    /// The geometry of a GroupNorm of `self [N, C, ...]`, checked against `gamma`/`beta`.
    pub fn norm_geom(&self, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f32) -> Result<NormGeom> {
        if self.ndim() < 2 {
            bail!("group_norm expects [N, C, ...], got {:?}", self.shape);
        }
        let (n, c) = (self.shape[0], self.shape[1]);
        if groups == 0 || !c.is_multiple_of(groups) {
            bail!("group_norm: {c} channels are not divisible into {groups} groups");
        }
        if gamma.shape != [c] || beta.shape != [c] {
            bail!("group_norm: affine shapes {:?} and {:?} for {c} channels", gamma.shape, beta.shape);
        }
        Ok(NormGeom { n, c, s: self.shape[2..].iter().product(), groups, eps })
    }
    /// `(y, mean, rstd)` of `GroupNorm(groups, C, eps)` with affine `gamma`, `beta`.
    pub fn group_norm(&self, gamma: &Tensor, beta: &Tensor, g: &NormGeom) -> Result<(Tensor, Tensor, Tensor)> {
        let (y, m, r) = self.storage.group_norm(&gamma.storage, &beta.storage, g)?;
        let st = [g.n * g.groups];
        Ok((Tensor::from_op(y, &self.shape), Tensor::from_op(m, &st), Tensor::from_op(r, &st)))
    }
    /// `(dx, dgamma, dbeta)` from the input `self` and `dy`.
    pub fn group_norm_backward(&self, dy: &Tensor, gamma: &Tensor, mean: &Tensor, rstd: &Tensor, g: &NormGeom) -> Result<(Tensor, Tensor, Tensor)> {
        let (dx, dw, db) = self.storage.group_norm_backward(&dy.storage, &gamma.storage, &mean.storage, &rstd.storage, g)?;
        Ok((Tensor::from_op(dx, &self.shape), Tensor::from_op(dw, &[g.c]), Tensor::from_op(db, &[g.c])))
    }
    /// The geometry of torchcfm's QKV attention on `self [B, 3·C, T]`.
    pub fn attn_geom(&self, heads: usize, order: QkvOrder) -> Result<AttnGeom> {
        let s = &self.shape;
        if s.len() != 3 || heads == 0 || !s[1].is_multiple_of(3 * heads) {
            bail!("qkv_attention: shape {s:?} with {heads} heads");
        }
        Ok(AttnGeom { b: s[0], heads, ch: s[1] / (3 * heads), t: s[2], order })
    }
    /// `(out [B, C, T], probs)` of QKV attention.
    pub fn qkv_attention(&self, g: &AttnGeom) -> Result<(Tensor, Tensor)> {
        let (o, p) = self.storage.qkv_attention(g)?;
        Ok((Tensor::from_op(o, &g.out_shape()), Tensor::from_op(p, &[g.b * g.heads, g.t, g.t])))
    }
    pub fn qkv_attention_backward(&self, probs: &Tensor, dout: &Tensor, g: &AttnGeom) -> Result<Tensor> {
        Ok(Tensor::from_op(self.storage.qkv_attention_backward(&probs.storage, &dout.storage, g)?, &g.qkv_shape()))
    }

    fn same_len(&self, o: &Tensor, op: &str) -> Result<()> {
        if self.shape != o.shape {
            bail!("{op}: shapes {:?} and {:?}", self.shape, o.shape);
        }
        Ok(())
    }
    /// `self ← a·x + b·self` in place (copy on write).
    pub fn axpby_in_place(&mut self, a: f32, x: &Tensor, b: f32) -> Result<()> {
        self.same_len(x, "axpby")?;
        self.storage.axpby_in_place(a, &x.storage, b)
    }
    /// One Adam update of this parameter (f32) with `grad` and the moments `m`, `v`.
    pub fn adam_in_place(&mut self, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, h: &AdamStep) -> Result<()> {
        self.same_len(grad, "adam")?;
        self.same_len(m, "adam")?;
        self.same_len(v, "adam")?;
        self.storage.adam_in_place(&grad.storage, &mut m.storage, &mut v.storage, h)
    }
    /// `Σ x²` over all the tensors, in f64 (one read-back).
    pub fn sum_squares(ts: &[&Tensor]) -> Result<f64> {
        let s: Vec<&Storage> = ts.iter().map(|t| &t.storage).collect();
        Storage::sum_squares(&s)
    }
    /// `Σ x²` over all the (non-empty list of) tensors, left on their device: an f32 `[2]`
    /// tensor `[hi, lo]` whose f64 sum `hi + lo` is the f64 sum of squares (see
    /// [`crate::backend::BackendStorage::sum_squares_on_device`]); read it with the other values
    /// a step reports, in one transfer.
    pub fn sum_squares_on_device(ts: &[&Tensor]) -> Result<Tensor> {
        let s: Vec<&Storage> = ts.iter().map(|t| &t.storage).collect();
        Ok(Tensor::from_op(Storage::sum_squares_on_device(&s)?, &[2]))
    }

    /// Apply the custom op `op` (no tape; `autograd::custom` records it): its output, aux outputs and saved
    /// state as tensors. `need[i]`: whether input `i` will need a gradient.
    pub fn apply_custom<O: CustomOp + ?Sized>(op: &O, xs: &[&Tensor], need: &[bool]) -> Result<CustomFwd<Tensor>> {
        if need.len() != xs.len() {
            bail!("{}: {} gradient flags for {} inputs", op.name(), need.len(), xs.len());
        }
        let args: Vec<(&Storage, &[usize])> = xs.iter().map(|t| (&t.storage, t.shape.as_slice())).collect();
        Storage::custom_fwd(op, &args, need)?.try_map(|(s, sh)| Tensor::from_storage(s, &sh).map_err(|e| e.context(format!("a result of {}", op.name()))))
    }
    /// The inputs' gradients of a custom op from its inputs, the state its forward saved and the
    /// output's gradient `g`; each is checked to have its input's shape and dtype.
    pub fn custom_backward<O: CustomOp + ?Sized>(op: &O, xs: &[Tensor], saved: &[Tensor], g: &Tensor, need: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let args: Vec<(&Storage, &[usize])> = xs.iter().map(|t| (&t.storage, t.shape.as_slice())).collect();
        let sv: Vec<(&Storage, &[usize])> = saved.iter().map(|t| (&t.storage, t.shape.as_slice())).collect();
        let gs = Storage::custom_bwd(op, &args, &sv, (&g.storage, g.shape.as_slice()), need)?;
        if gs.len() != xs.len() {
            bail!("{} backward: {} gradients for {} inputs", op.name(), gs.len(), xs.len());
        }
        gs.into_iter()
            .zip(xs)
            .enumerate()
            .map(|(i, (d, x))| {
                let Some(d) = d else { return Ok(None) };
                if d.dtype() != x.dtype() {
                    bail!("{} backward: the gradient of input {i} is {}, the input {}", op.name(), d.dtype(), x.dtype());
                }
                Tensor::from_storage(d, &x.shape).map(Some).map_err(|e| e.context(format!("{} backward: the gradient of input {i}", op.name())))
            })
            .collect()
    }
}
