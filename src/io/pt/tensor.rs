//! Tensor materialization: element types, and gathering a tensor's elements out of its
//! storage bytes (through `storage_offset`/`stride`, so non-contiguous views are handled),
//! converted to f32.

use anyhow::{Result, anyhow, bail};

use super::PtTensor;
use super::value::{Storage, TensorRef};

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

/// Element type of a storage or tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl DType {
    fn size(self) -> u64 {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::U16 => "U16",
            DType::U32 => "U32",
            DType::U64 => "U64",
            DType::Bool => "BOOL",
        }
    }

    /// Legacy typed-storage class name (`torch.FloatStorage`, ...) as named in persistent ids.
    pub(super) fn from_storage_class(name: &str) -> Option<DType> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" | "UntypedStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    /// `torch.<dtype>` attribute name, as used by `_rebuild_tensor_v3`.
    pub(super) fn from_torch_dtype(name: &str) -> Option<DType> {
        Some(match name {
            "float64" | "double" => DType::F64,
            "float32" | "float" => DType::F32,
            "float16" | "half" => DType::F16,
            "bfloat16" => DType::BF16,
            "int64" | "long" => DType::I64,
            "int32" | "int" => DType::I32,
            "int16" | "short" => DType::I16,
            "int8" => DType::I8,
            "uint8" => DType::U8,
            "uint16" => DType::U16,
            "uint32" => DType::U32,
            "uint64" => DType::U64,
            "bool" => DType::Bool,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor materialization
// ---------------------------------------------------------------------------------------------

/// Odometer over the storage element indices of a strided view (row-major order).
struct Strided {
    size: Vec<usize>,
    stride: Vec<usize>,
    idx: Vec<usize>,
    cur: usize,
    remaining: usize,
}

impl Iterator for Strided {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let r = self.cur;
        for d in (0..self.size.len()).rev() {
            self.idx[d] += 1;
            self.cur = self.cur.wrapping_add(self.stride[d]);
            if self.idx[d] < self.size[d] {
                break;
            }
            self.cur = self.cur.wrapping_sub(self.stride[d].wrapping_mul(self.size[d]));
            self.idx[d] = 0;
        }
        Some(r)
    }
}

fn to_usize(x: u64) -> Result<usize> {
    usize::try_from(x).map_err(|_| anyhow!("value {x} does not fit in usize"))
}

/// Read tensor `t` out of the raw bytes of its storage `st` as f32.
pub(super) fn materialize(t: &TensorRef, st: &Storage, bytes: &[u8], big_endian: bool) -> Result<PtTensor> {
    let sdt = st.dtype.clone().map_err(|c| anyhow!("unsupported storage type {c}"))?;
    let dt = t.dtype.clone().map_err(|c| anyhow!("unsupported dtype {c}"))?;
    let declared = st.numel.checked_mul(sdt.size()).ok_or_else(|| anyhow!("storage size overflows"))?;
    if (bytes.len() as u64) < declared {
        bail!("storage entry has {} bytes but the pickle declares {} elements of {} ({declared} bytes)", bytes.len(), st.numel, sdt.name());
    }
    let avail = declared / dt.size();

    let mut numel: u64 = 1;
    for &s in &t.size {
        numel = numel.checked_mul(s).ok_or_else(|| anyhow!("tensor size {:?} overflows", t.size))?;
    }
    let shape: Vec<usize> = t.size.iter().map(|&s| to_usize(s)).collect::<Result<_>>()?;
    if numel == 0 {
        return Ok(PtTensor { shape, data: Vec::new(), dtype: dt.name().into() });
    }
    let mut max_index = t.offset;
    for (&s, &st_) in t.size.iter().zip(&t.stride) {
        max_index = (s - 1).checked_mul(st_).and_then(|x| x.checked_add(max_index)).ok_or_else(|| anyhow!("tensor geometry overflows"))?;
    }
    if max_index >= avail {
        bail!("storage too small: tensor with size {:?}, stride {:?}, storage_offset {} needs {} elements of {}, storage has {avail}", t.size, t.stride, t.offset, max_index + 1, dt.name());
    }
    // Overlapping / expanded (stride 0) views can have more elements than the storage; cap
    // them so corrupt sizes cannot request absurd allocations.
    if numel > avail && numel > (1 << 26) {
        bail!("tensor has {numel} elements, far more than its storage ({avail}); refusing");
    }

    // Drop size-1 dims, then check for the contiguous fast path.
    let dims: Vec<(usize, usize)> = t.size.iter().zip(&t.stride).filter(|(s, _)| **s != 1).map(|(&s, &st_)| Ok((to_usize(s)?, to_usize(st_)?))).collect::<Result<_>>()?;
    let mut contiguous = true;
    let mut expect = 1usize;
    for &(s, st_) in dims.iter().rev() {
        if st_ != expect {
            contiguous = false;
            break;
        }
        expect = expect.saturating_mul(s);
    }
    let offset = to_usize(t.offset)?;
    let n = to_usize(numel)?;
    let data = if contiguous {
        let start = offset * dt.size() as usize;
        let end = start + n * dt.size() as usize;
        convert_contiguous(dt, &bytes[start..end], big_endian)
    } else {
        let idx = Strided { size: dims.iter().map(|d| d.0).collect(), stride: dims.iter().map(|d| d.1).collect(), idx: vec![0; dims.len()], cur: offset, remaining: n };
        convert_indexed(dt, bytes, big_endian, idx, n)
    };
    Ok(PtTensor { shape, data, dtype: dt.name().into() })
}

#[inline(always)]
fn elem<const N: usize>(bytes: &[u8], i: usize, big_endian: bool) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[i * N..i * N + N]);
    if big_endian {
        a.reverse();
    }
    a
}

fn decode_fn<const N: usize>(bytes: &[u8], big_endian: bool, idx: impl Iterator<Item = usize>, n: usize, f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    out.extend(idx.map(|i| f(elem::<N>(bytes, i, big_endian))));
    out
}

fn convert_indexed(dt: DType, bytes: &[u8], be: bool, idx: impl Iterator<Item = usize>, n: usize) -> Vec<f32> {
    match dt {
        DType::F64 => decode_fn(bytes, be, idx, n, |a| f64::from_le_bytes(a) as f32),
        DType::F32 => decode_fn(bytes, be, idx, n, f32::from_le_bytes),
        DType::F16 => decode_fn(bytes, be, idx, n, |a| half::f16::from_le_bytes(a).to_f32()),
        DType::BF16 => decode_fn(bytes, be, idx, n, |a| half::bf16::from_le_bytes(a).to_f32()),
        DType::I64 => decode_fn(bytes, be, idx, n, |a| i64::from_le_bytes(a) as f32),
        DType::I32 => decode_fn(bytes, be, idx, n, |a| i32::from_le_bytes(a) as f32),
        DType::I16 => decode_fn(bytes, be, idx, n, |a| i16::from_le_bytes(a) as f32),
        DType::I8 => decode_fn(bytes, be, idx, n, |a: [u8; 1]| a[0] as i8 as f32),
        DType::U8 => decode_fn(bytes, be, idx, n, |a: [u8; 1]| a[0] as f32),
        DType::U16 => decode_fn(bytes, be, idx, n, |a| u16::from_le_bytes(a) as f32),
        DType::U32 => decode_fn(bytes, be, idx, n, |a| u32::from_le_bytes(a) as f32),
        DType::U64 => decode_fn(bytes, be, idx, n, |a| u64::from_le_bytes(a) as f32),
        DType::Bool => decode_fn(bytes, be, idx, n, |a: [u8; 1]| (a[0] != 0) as u8 as f32),
    }
}

fn convert_contiguous(dt: DType, bytes: &[u8], be: bool) -> Vec<f32> {
    let n = bytes.len() / dt.size() as usize;
    if dt == DType::F32 && !be {
        return bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    }
    convert_indexed(dt, bytes, be, 0..n, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_iteration() {
        // 2x3 view of a 3x2 row-major storage, transposed: stride (1, 2)
        let it = Strided { size: vec![2, 3], stride: vec![1, 2], idx: vec![0, 0], cur: 0, remaining: 6 };
        assert_eq!(it.collect::<Vec<_>>(), vec![0, 2, 4, 1, 3, 5]);
    }
}
