//! The `#[repr(C)]` geometry structs passed by value to the kernels (`BinGeom`, `ReduceGeom`,
//! `Strided` of `kernels/*.cu`), built from shapes. At most 8 axes on the GPU: more is an error.

use anyhow::{Result, bail};
use cudarc::driver::DeviceRepr;

use crate::backend::geom::broadcast_strides;

/// The kernels' fixed axis count.
pub const MAX_AXES: usize = 8;

fn i64s(v: &[usize], what: &str) -> Result<[i64; MAX_AXES]> {
    if v.len() > MAX_AXES {
        bail!("{what}: {} axes (at most {MAX_AXES} on the GPU)", v.len());
    }
    let mut a = [0i64; MAX_AXES];
    for (x, &y) in a.iter_mut().zip(v) {
        *x = y as i64;
    }
    Ok(a)
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `binary_f32`'s geometry (the kernel's `BinGeom`): the output shape and each operand's strides
/// in the output's index space.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BinGeom {
    pub ndim: i64,
    pub shape: [i64; 8],
    pub sa: [i64; 8],
    pub sb: [i64; 8],
}

impl BinGeom {
    /// The geometry of `a op b` broadcast to `out`; an error past 8 axes or for shapes that do
    /// not broadcast to `out`.
    pub fn try_new(a: &[usize], b: &[usize], out: &[usize]) -> Result<BinGeom> {
        for s in [a, b] {
            let ok = s.len() <= out.len() && s.iter().rev().zip(out.iter().rev()).all(|(&d, &o)| d == o || d == 1);
            if !ok {
                bail!("binary: shape {s:?} does not broadcast to {out:?}");
            }
        }
        Ok(BinGeom { ndim: out.len() as i64, shape: i64s(out, "binary")?, sa: i64s(&broadcast_strides(a, out), "binary")?, sb: i64s(&broadcast_strides(b, out), "binary")? })
    }
    /// [`BinGeom::try_new`], panicking on an error (the Tensor-level ops and the kernel tests).
    pub fn new(a: &[usize], b: &[usize], out: &[usize]) -> BinGeom {
        BinGeom::try_new(a, b, out).unwrap_or_else(|e| panic!("{e:#}"))
    }
}
// SAFETY: plain integers, laid out as the kernel's struct
unsafe impl DeviceRepr for BinGeom {}

/// `reduce_sum_f32`'s geometry: kept axes (they index the output) and reduced axes, with their
/// strides in the input.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReduceGeom {
    pub nk: i64,
    pub nr: i64,
    pub kshape: [i64; 8],
    pub kstride: [i64; 8],
    pub rshape: [i64; 8],
    pub rstride: [i64; 8],
}

impl ReduceGeom {
    /// The geometry of summing a contiguous `from` down to `to` (NumPy broadcasting rules), with
    /// the output and reduction sizes; an error when `to` does not broadcast to `from`.
    pub fn try_new(from: &[usize], to: &[usize]) -> Result<(ReduceGeom, usize, usize)> {
        if to.len() > from.len() {
            bail!("sum_to_shape {from:?} -> {to:?}: the target has more axes");
        }
        let pad = from.len() - to.len();
        let to_p: Vec<usize> = std::iter::repeat_n(1, pad).chain(to.iter().copied()).collect();
        let st = contiguous(from);
        let (mut ks, mut kst, mut rs, mut rst) = (vec![], vec![], vec![], vec![]);
        for i in 0..from.len() {
            if to_p[i] == from[i] {
                if from[i] != 1 {
                    ks.push(from[i]);
                    kst.push(st[i]);
                }
            } else {
                if to_p[i] != 1 {
                    bail!("sum_to_shape {from:?} -> {to:?}: axis {i} is neither kept nor 1");
                }
                rs.push(from[i]);
                rst.push(st[i]);
            }
        }
        let geom = ReduceGeom { nk: ks.len() as i64, nr: rs.len() as i64, kshape: i64s(&ks, "sum")?, kstride: i64s(&kst, "sum")?, rshape: i64s(&rs, "sum")?, rstride: i64s(&rst, "sum")? };
        Ok((geom, to.iter().product(), rs.iter().product()))
    }
    /// [`ReduceGeom::try_new`], panicking on an error (the Tensor-level ops and the kernel tests).
    pub fn new(from: &[usize], to: &[usize]) -> (ReduceGeom, usize, usize) {
        ReduceGeom::try_new(from, to).unwrap_or_else(|e| panic!("{e:#}"))
    }
}
// SAFETY: plain integers, laid out as the kernel's struct
unsafe impl DeviceRepr for ReduceGeom {}

/// `gather_strided_f32`'s view: a shape and the source strides of its axes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub ndim: i64,
    pub shape: [i64; 8],
    pub strides: [i64; 8],
}

impl Strided {
    pub fn try_new(shape: &[usize], strides: &[usize]) -> Result<Strided> {
        if shape.len() != strides.len() {
            bail!("gather: {} axes but {} strides", shape.len(), strides.len());
        }
        Ok(Strided { ndim: shape.len() as i64, shape: i64s(shape, "gather")?, strides: i64s(strides, "gather")? })
    }
    /// [`Strided::try_new`], panicking on an error (the Tensor-level ops and the kernel tests).
    pub fn new(shape: &[usize], strides: &[usize]) -> Strided {
        Strided::try_new(shape, strides).unwrap_or_else(|e| panic!("{e:#}"))
    }
    /// The number of source elements the view reaches (1 + the largest offset; 0 when empty).
    pub fn extent(shape: &[usize], strides: &[usize]) -> usize {
        if shape.contains(&0) {
            return 0;
        }
        1 + shape.iter().zip(strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>()
    }
}
// SAFETY: plain integers, laid out as the kernel's struct
unsafe impl DeviceRepr for Strided {}
