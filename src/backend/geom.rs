//! Geometry of the structured ops, shared by every backend (and by the kernels' host side).

/// A 2-D convolution: input `[n, cin, h, w]`, weight `[cout, cin, kh, kw]`, stride, zero padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// The reduction length of one output value, `cin·kh·kw`.
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    /// A 1×1 convolution with stride 1 and no padding (a plain GEMM).
    pub fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    pub fn in_shape(&self) -> [usize; 4] {
        [self.n, self.cin, self.h, self.w]
    }
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.cout, self.cin, self.kh, self.kw]
    }
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.cout, self.ho(), self.wo()]
    }
}

/// Channel layout of torchcfm's qkv tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QkvOrder {
    /// `QKVAttentionLegacy`: heads first, `[h0: q k v | h1: q k v | …]`.
    Legacy,
    /// `QKVAttention` (use_new_attention_order): `[q (all heads) | k | v]`.
    New,
}

/// QKV self-attention: `qkv [b, 3·heads·ch, t] → out [b, heads·ch, t]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttnGeom {
    pub b: usize,
    pub heads: usize,
    /// channels per head
    pub ch: usize,
    pub t: usize,
    pub order: QkvOrder,
}

impl AttnGeom {
    /// Offsets (in elements) of q, k, v for batch `bi`, head `h` within qkv.
    pub fn offsets(&self, bi: usize, h: usize) -> (usize, usize, usize) {
        let c = self.heads * self.ch;
        let base = bi * 3 * c * self.t;
        match self.order {
            QkvOrder::Legacy => {
                let o = base + h * 3 * self.ch * self.t;
                (o, o + self.ch * self.t, o + 2 * self.ch * self.t)
            }
            QkvOrder::New => {
                let o = base + h * self.ch * self.t;
                (o, o + c * self.t, o + 2 * c * self.t)
            }
        }
    }
    pub fn qkv_shape(&self) -> [usize; 3] {
        [self.b, 3 * self.heads * self.ch, self.t]
    }
    pub fn out_shape(&self) -> [usize; 3] {
        [self.b, self.heads * self.ch, self.t]
    }
}

/// GroupNorm over `[n, c, s]` (s = the product of the spatial sizes) in `groups` groups.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormGeom {
    pub n: usize,
    pub c: usize,
    pub s: usize,
    pub groups: usize,
    pub eps: f32,
}

/// Row-major strides of a contiguous `shape`.
fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides for reading a contiguous tensor of `shape` as if broadcast to `out` (NumPy rules:
/// 0 on broadcast axes and on the leading axes `shape` lacks).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let st = row_major_strides(shape);
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { 0 } else { st[i - off] }).collect()
}
