//! Flat arenas: tensors laid out back to back in one contiguous storage, each a zero-copy view
//! of it (a model's parameters, Adam's moments), so that a multi-tensor op runs as one pass
//! over the whole arena.

use anyhow::{Result, bail};

use super::{DType, Device, Tensor};
use crate::backend::ArenaStep;

impl Tensor {
    /// The `shape`d view from element `off` of this (contiguous) tensor's values, sharing its
    /// storage: no copy, and a write to it copies just the view (copy on write).
    pub fn view(&self, off: usize, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Ok(Tensor::from_op(self.storage.view(off, n)?, shape))
    }
    /// Whether this tensor is the `n`-element view at element `off` of `arena`'s storage.
    pub fn is_view_of(&self, arena: &Tensor, off: usize) -> bool {
        self.storage.is_view_of(&arena.storage, off, self.numel())
    }
    /// The optimiser's one pass over flat f32 arenas, in place: this tensor the parameters,
    /// `grad` the gradients, `m`, `v` Adam's moments, `ema` the moving average (see
    /// [`crate::backend::BackendStorage::adam_arena`]).
    pub fn adam_arena_in_place(&mut self, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, ema: Option<&mut Tensor>, h: &ArenaStep) -> Result<()> {
        for (t, what) in [(grad, "gradient"), (&*m, "first moment"), (&*v, "second moment")] {
            if t.numel() != self.numel() {
                bail!("adam_arena: a {what} arena of {} values for {} parameters", t.numel(), self.numel());
            }
        }
        if let Some(e) = &ema
            && e.numel() != self.numel()
        {
            bail!("adam_arena: an EMA arena of {} values for {} parameters", e.numel(), self.numel());
        }
        self.storage.adam_arena(&grad.storage, &mut m.storage, &mut v.storage, ema.map(|e| &mut e.storage), h)
    }
}

/// The layout of tensors in a flat arena: `(offset, shape)` of each, back to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    parts: Vec<(usize, Vec<usize>)>,
    len: usize,
}

impl Layout {
    /// Shapes laid out back to back, in order.
    pub fn of_shapes<'a>(shapes: impl IntoIterator<Item = &'a [usize]>) -> Layout {
        let mut parts = Vec::new();
        let mut len = 0;
        for s in shapes {
            parts.push((len, s.to_vec()));
            len += s.iter().product::<usize>();
        }
        Layout { parts, len }
    }
    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Number of tensors.
    pub fn count(&self) -> usize {
        self.parts.len()
    }
    pub fn parts(&self) -> &[(usize, Vec<usize>)] {
        &self.parts
    }
}

/// A flat f32 storage on one device and the layout of the tensors that view it.
#[derive(Clone, Debug)]
pub struct Arena {
    flat: Tensor,
    layout: Layout,
}

impl Arena {
    /// The tensors (f32, one device) copied into one new arena, in order: one gather.
    pub fn gather(ts: &[Tensor]) -> Result<Arena> {
        let layout = Layout::of_shapes(ts.iter().map(|t| t.shape()));
        let Some(first) = ts.first() else { return Ok(Arena { flat: Tensor::zeros(&[0]), layout }) };
        if let Some(t) = ts.iter().find(|t| t.dtype() != DType::F32) {
            bail!("a flat arena holds f32 values, not {} (a {:?} tensor)", t.dtype(), t.shape());
        }
        let dev = first.device();
        if let Some(t) = ts.iter().find(|t| t.device() != dev) {
            bail!("a flat arena lives on one device: tensors on {dev} and {}", t.device());
        }
        let flat_parts = ts.iter().map(|t| t.reshape(&[t.numel()])).collect::<Result<Vec<_>>>()?;
        let flat = Tensor::concat(&flat_parts, 0)?;
        Ok(Arena { flat, layout })
    }
    /// An arena of zeros with `layout`, on `device`.
    pub fn zeros(layout: &Layout, device: Device) -> Result<Arena> {
        Ok(Arena { flat: Tensor::full_on(&[layout.len()], 0.0, DType::F32, device)?, layout: layout.clone() })
    }
    /// The arena's values as a flat tensor `[len]` (shared).
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }
    /// The flat tensor for an in-place pass: written in place when nothing else holds it
    /// (take the views out of their holders first), else copied first.
    pub fn flat_mut(&mut self) -> &mut Tensor {
        &mut self.flat
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn device(&self) -> Device {
        self.flat.device()
    }
    /// The tensors, as zero-copy views of the arena.
    pub fn views(&self) -> Vec<Tensor> {
        self.layout.parts.iter().map(|(off, shape)| self.flat.view(*off, shape).expect("the layout fits the arena")).collect()
    }
    /// Whether `ts` are exactly this arena's views, in order (nothing was replaced or copied).
    pub fn holds<'a>(&self, ts: impl ExactSizeIterator<Item = &'a Tensor>) -> bool {
        ts.len() == self.layout.parts.len() && ts.zip(&self.layout.parts).all(|(t, (off, shape))| t.shape() == shape.as_slice() && t.is_view_of(&self.flat, *off))
    }
    /// The arena on `device` (one copy of the flat storage; shared when already there).
    pub fn to_device(&self, device: Device) -> Result<Arena> {
        Ok(Arena { flat: self.flat.to_device(device)?, layout: self.layout.clone() })
    }
    /// Whether the flat storage is the same memory as `o`'s.
    pub fn same_memory(&self, o: &Arena) -> bool {
        self.flat.shares_storage(&o.flat)
    }
}
