//! Reading weights files: safetensors or PyTorch `.pt` (zip) checkpoints, as tensors by name
//! with their metadata. Building a model from them is `nn::load`'s job.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::safetensors as st;
use crate::tensor::Tensor;

/// Raw weights and metadata read from a file.
pub struct RawWeights {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: HashMap<String, String>,
    pub checkpoint_key: Option<String>,
    pub dtypes: Vec<String>,
}

fn is_zip(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(n == 4 && &magic == b"PK\x03\x04")
}

/// Read weights from safetensors or a PyTorch `.pt` (zip) checkpoint; strips a `module.` prefix.
pub fn read_weights(path: &Path, pt_key: Option<&str>) -> Result<RawWeights> {
    if !path.exists() {
        bail!("model file {} does not exist", path.display());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut raw = if is_zip(path)? || matches!(ext.as_str(), "pt" | "pth" | "ckpt" | "bin") {
        let sd = super::pt::read_pt_state_dict(path, pt_key)?;
        let mut dtypes: Vec<String> = Vec::new();
        let tensors = sd
            .tensors
            .into_iter()
            .map(|(n, t)| {
                if !dtypes.contains(&t.dtype) {
                    dtypes.push(t.dtype.clone());
                }
                Tensor::try_from_vec(t.data, &t.shape).map(|x| (n, x))
            })
            .collect::<Result<Vec<_>>>()?;
        RawWeights { tensors, metadata: HashMap::new(), checkpoint_key: sd.key, dtypes }
    } else {
        if pt_key.is_some() {
            bail!("--key selects an entry of a PyTorch .pt checkpoint; {} is a safetensors file", path.display());
        }
        let f = st::load(path)?;
        RawWeights { tensors: f.tensors, metadata: f.metadata, checkpoint_key: None, dtypes: f.dtypes }
    };
    if !raw.tensors.is_empty() && raw.tensors.iter().all(|(n, _)| n.starts_with("module.")) {
        for (n, _) in raw.tensors.iter_mut() {
            *n = n["module.".len()..].to_string();
        }
    }
    Ok(raw)
}
