//! safetensors files: f32, f16 and bf16 tensors (kept in the file's dtype), f64 (read as f32)
//! and integer tensors.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use crate::tensor::{DType, Tensor};

/// The contents of a safetensors file, converted for the engine.
pub struct StFile {
    /// Float tensors in file order: f32, f16 and bf16 in their own dtype, f64 as f32.
    pub tensors: Vec<(String, Tensor)>,
    /// Integer tensors (labels), as i64.
    pub ints: Vec<(String, Vec<usize>, Vec<i64>)>,
    /// The `__metadata__` strings.
    pub metadata: HashMap<String, String>,
    /// The float dtype found (the widest), for messages.
    pub dtypes: Vec<String>,
}

impl StFile {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
    pub fn get_int(&self, name: &str) -> Option<(&[usize], &[i64])> {
        self.ints.iter().find(|(n, _, _)| n == name).map(|(_, s, v)| (s.as_slice(), v.as_slice()))
    }
    pub fn names(&self) -> Vec<&str> {
        self.tensors.iter().map(|(n, _)| n.as_str()).chain(self.ints.iter().map(|(n, _, _)| n.as_str())).collect()
    }
}

fn float_view(name: &str, v: &TensorView) -> Result<Option<Tensor>> {
    let shape = v.shape().to_vec();
    let d = v.data();
    let t = match v.dtype() {
        Dtype::F32 => Tensor::from_vec(d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(), &shape),
        // half precision is kept as it is in the file until a cast is asked for
        Dtype::F16 => Tensor::from_f16(d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect(), &shape)?,
        Dtype::BF16 => Tensor::from_bf16(d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect(), &shape)?,
        Dtype::F64 => Tensor::from_vec(d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(), &shape),
        Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 | Dtype::BOOL => return Ok(None),
        other => bail!("tensor '{name}' has dtype {other:?}, which is not supported"),
    };
    Ok(Some(t))
}

fn int_view(v: &TensorView) -> Vec<i64> {
    let d = v.data();
    match v.dtype() {
        Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::U64 => d.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::I32 => d.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::U32 => d.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::I16 => d.chunks_exact(2).map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::U16 => d.chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::I8 => d.iter().map(|&b| b as i8 as i64).collect(),
        _ => d.iter().map(|&b| b as i64).collect(),
    }
}

/// Parse safetensors bytes; `what` names the source in errors.
pub fn parse(bytes: &[u8], what: &str) -> Result<StFile> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{what} is not a valid safetensors file ({e})"))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{what}: bad safetensors header ({e})"))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut tensors = Vec::new();
    let mut ints = Vec::new();
    let mut dtypes = Vec::new();
    // keep file order (the header's offsets order)
    let mut entries: Vec<(String, TensorView)> = st.tensors();
    entries.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    for (name, v) in entries {
        let ds = format!("{:?}", v.dtype());
        if !dtypes.contains(&ds) {
            dtypes.push(ds);
        }
        match float_view(&name, &v).with_context(|| what.to_string())? {
            Some(t) => tensors.push((name, t)),
            None => ints.push((name.clone(), v.shape().to_vec(), int_view(&v))),
        }
    }
    Ok(StFile { tensors, ints, metadata, dtypes })
}

/// Read a safetensors file.
pub fn load(path: &Path) -> Result<StFile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes, &path.display().to_string())
}

/// A tensor to write.
pub enum Out<'a> {
    F(&'a Tensor),
    I64(&'a [usize], &'a [i64]),
}

/// Serialise tensors (floats in `dtype`) with metadata.
pub fn serialize(tensors: &[(String, Out)], dtype: DType, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        match t {
            Out::F(t) => {
                let dt = match dtype {
                    DType::F32 => Dtype::F32,
                    DType::F16 => Dtype::F16,
                    DType::BF16 => Dtype::BF16,
                    DType::I32 => bail!("tensor '{name}': i32 is not a float dtype to save floats as"),
                };
                let host = t.to_dtype(dtype)?.to_cpu()?;
                let bytes = host.storage().to_cpu_storage()?.bytes().to_vec();
                bufs.push((name.clone(), dt, t.shape().to_vec(), bytes));
            }
            Out::I64(shape, v) => bufs.push((name.clone(), Dtype::I64, shape.to_vec(), bytemuck::cast_slice(v).to_vec())),
        }
    }
    let views: Vec<(String, TensorView)> = bufs.iter().map(|(n, dt, s, b)| Ok((n.clone(), TensorView::new(*dt, s.clone(), b).map_err(|e| anyhow!("tensor '{n}': {e}"))?))).collect::<Result<_>>()?;
    let meta = if metadata.is_empty() { None } else { Some(metadata.clone()) };
    safetensors::tensor::serialize(views, meta).map_err(|e| anyhow!("cannot serialise safetensors: {e}"))
}

/// Write a safetensors file atomically (temporary file in the same folder, then rename).
pub fn save(path: &Path, tensors: &[(String, Out)], dtype: DType, metadata: &HashMap<String, String>) -> Result<()> {
    let bytes = serialize(tensors, dtype, metadata)?;
    write_atomic(path, &bytes)
}

/// Write bytes to `path` through a temporary file and a rename, so that a crash never leaves a
/// half-written file under `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("cannot write {}: folder {} does not exist", path.display(), dir.display());
    }
    let name = path.file_name().ok_or_else(|| anyhow!("cannot write {}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display());
    }
    Ok(())
}
