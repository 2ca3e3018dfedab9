//! Reader for PyTorch `torch.save` checkpoints (the zip format, PyTorch >= 1.6), without Python.
//!
//! A `torch.save` file is a zip archive of STORED entries:
//!
//! * `<archive>/data.pkl` — the pickled object graph (pickle protocol 2 by default),
//! * `<archive>/data/<key>` — raw bytes of each storage, referenced from the pickle through
//!   persistent ids `('storage', torch.FloatStorage, key, location, numel)`,
//! * `<archive>/byteorder` (`little`/`big`; missing means little), `<archive>/version`, ...
//!
//! `<archive>` is usually `archive` but may be any name, so the single `*/data.pkl` is used.
//!
//! This module contains a small, defensive unpickler for the opcode subset torch emits. Tensors
//! (`torch._utils._rebuild_tensor_v2` and friends) are kept as lazy references to storages;
//! only the tensors of the selected state_dict are read from the archive and converted to f32
//! (gathered through `storage_offset`/`stride`, so non-contiguous views are handled). Anything
//! the unpickler does not know (optimizer state, LR-scheduler state, arbitrary classes) becomes
//! an opaque value that is never looked at. Malformed input yields an error, never a panic.
//!
//! Layout: `archive` (zip access), `pickle` (the unpickler, producing the object graph of
//! `value`), `tensor` (element types and f32 conversion); this file holds the public API,
//! the driver and the choice of the state_dict.

mod archive;
mod pickle;
mod tensor;
mod value;

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use self::archive::Archive;
use self::pickle::Unpickler;
use self::tensor::materialize;
use self::value::{Dict, Obj, Value};

/// One tensor read from a checkpoint, converted to f32 (f16/bf16/f64/int types converted; bool -> 0/1).
#[derive(Debug, Clone, PartialEq)]
pub struct PtTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The stored element type: "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8",
    /// "U16", "U32", "U64" or "BOOL".
    pub dtype: String,
}

/// The state_dict picked from a checkpoint.
#[derive(Debug, Clone)]
pub struct PtStateDict {
    /// which top-level key was used ("ema_model", "net_model", ...) or None if the file is itself a state_dict
    pub key: Option<String>,
    /// all top-level keys of the checkpoint dict (for messages), empty if the file is a bare state_dict
    pub top_level_keys: Vec<String>,
    /// tensors in file order
    pub tensors: Vec<(String, PtTensor)>,
}

/// key = Some("ema_model") picks that entry (error listing the available keys if missing or not a state_dict).
/// key = None: if the top level is a dict of name->tensor, it is the state_dict; else if it contains "ema_model" use it;
/// else if exactly one value is a dict of tensors, use it; else error listing the candidates.
pub fn read_pt_state_dict(path: &Path, key: Option<&str>) -> Result<PtStateDict> {
    read_impl(path, key).with_context(|| format!("cannot read PyTorch checkpoint {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

fn read_impl(path: &Path, key: Option<&str>) -> Result<PtStateDict> {
    let mut archive = Archive::open(path)?;
    let big_endian = archive.big_endian()?;

    let pickle = archive.pickle()?;
    let pkl_name = &archive.pkl_name;
    let (root, objs) = Unpickler::new(&pickle).load().with_context(|| format!("cannot unpickle {pkl_name}"))?;
    let torchscript = archive.is_torchscript();

    let view = View { objs: &objs };
    let (chosen_key, top_level_keys, sd) = view.select(&root, key, torchscript)?;

    // Load the tensors of the chosen state_dict.
    let mut tensors = Vec::with_capacity(sd.entries.len());
    for (k, v) in &sd.entries {
        let Value::Str(name) = k else { continue };
        let Value::Obj(ti) = v else { continue };
        let Obj::Tensor(t) = &objs[*ti] else { continue };
        let Obj::Storage(st) = &objs[t.storage] else {
            bail!("internal error: tensor without storage");
        };
        let bytes = archive.storage(&st.key)?.ok_or_else(|| anyhow!("missing storage entry '{}data/{}' (needed by tensor '{name}')", archive.prefix, st.key))?;
        let prefix = &archive.prefix;
        let pt = materialize(t, st, &bytes, big_endian).with_context(|| format!("tensor '{name}' (storage '{prefix}data/{}')", st.key))?;
        tensors.push((name.to_string(), pt));
    }

    Ok(PtStateDict { key: chosen_key, top_level_keys, tensors })
}

struct View<'a> {
    objs: &'a [Obj],
}

impl<'a> View<'a> {
    fn obj(&self, v: &Value) -> Option<&'a Obj> {
        match v {
            Value::Obj(i) => self.objs.get(*i),
            _ => None,
        }
    }

    fn dict(&self, v: &Value) -> Option<&'a Dict> {
        match self.obj(v)? {
            Obj::Dict(d) => Some(d),
            _ => None,
        }
    }

    fn is_tensor(&self, v: &Value) -> bool {
        matches!(self.obj(v), Some(Obj::Tensor(_)))
    }

    /// A dict with string keys whose values are all tensors (entries named `*_extra_state`
    /// may be anything), with at least one tensor.
    fn state_dict(&self, v: &Value) -> Option<&'a Dict> {
        let d = self.dict(v)?;
        let mut n = 0;
        for (k, v) in &d.entries {
            let Value::Str(k) = k else { return None };
            if self.is_tensor(v) {
                n += 1;
            } else if !k.ends_with("_extra_state") {
                return None;
            }
        }
        (n > 0).then_some(d)
    }

    fn key_string(&self, k: &Value) -> String {
        match k {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => format!("<{}>", self.describe(other)),
        }
    }

    fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt => "int".into(),
            Value::Float => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes => "bytes".into(),
            Value::Global(g) => format!("{}.{}", g.0, g.1),
            Value::Obj(_) => match self.obj(v) {
                Some(Obj::List(l)) => format!("list of {} items", l.len()),
                Some(Obj::Tuple(l)) => format!("tuple of {} items", l.len()),
                Some(Obj::Dict(d)) => format!("dict with {} entries", d.entries.len()),
                Some(Obj::Set) => "set".into(),
                Some(Obj::Storage(_)) => "storage".into(),
                Some(Obj::Tensor(_)) => "tensor".into(),
                Some(Obj::Opaque { class: Some(g) }) => format!("object of class {}.{}", g.0, g.1),
                Some(Obj::Opaque { class: None }) => "object".into(),
                None => "?".into(),
            },
        }
    }

    fn select(&self, root: &Value, key: Option<&str>, torchscript: bool) -> Result<(Option<String>, Vec<String>, &'a Dict)> {
        let Some(top) = self.dict(root) else {
            let mut msg = format!("the checkpoint's top-level object is {}, not a dict (a state_dict or a dict of state_dicts)", self.describe(root));
            if torchscript {
                msg.push_str("; this looks like a TorchScript archive (torch.jit.save), which is not supported");
            } else if matches!(self.obj(root), Some(Obj::Opaque { .. })) {
                msg.push_str("; if it is a pickled nn.Module, save module.state_dict() instead");
            }
            bail!(msg);
        };
        if self.state_dict(root).is_some() {
            if let Some(k) = key {
                let names: Vec<String> = top.entries.iter().take(5).map(|(k, _)| self.key_string(k)).collect();
                bail!("key '{k}' requested, but the file is a bare state_dict (no top-level keys; first parameters: {names:?})");
            }
            return Ok((None, Vec::new(), top));
        }
        let keys: Vec<String> = top.entries.iter().map(|(k, _)| self.key_string(k)).collect();
        let candidates: Vec<String> = top.entries.iter().filter(|(_, v)| self.state_dict(v).is_some()).map(|(k, _)| self.key_string(k)).collect();
        if let Some(k) = key {
            let Some(v) = top.get_str(k) else {
                bail!("key '{k}' not found in checkpoint; available top-level keys: {keys:?} (state_dict candidates: {candidates:?})");
            };
            let Some(sd) = self.state_dict(v) else {
                bail!("checkpoint entry '{k}' is not a state_dict (it is {}); available top-level keys: {keys:?} (state_dict candidates: {candidates:?})", self.describe(v));
            };
            return Ok((Some(k.to_string()), keys, sd));
        }
        if let Some(sd) = top.get_str("ema_model").and_then(|v| self.state_dict(v)) {
            return Ok((Some("ema_model".into()), keys, sd));
        }
        let found: Vec<(&Value, &Dict)> = top.entries.iter().filter_map(|(k, v)| self.state_dict(v).map(|sd| (k, sd))).collect();
        match found.as_slice() {
            [(k, sd)] => Ok((Some(self.key_string(k)), keys, sd)),
            [] => bail!("no state_dict found in checkpoint (no entry is a dict of tensors); top-level keys: {keys:?}"),
            _ => bail!("checkpoint holds several state_dicts and none is 'ema_model'; pick one of {candidates:?} (top-level keys: {keys:?})"),
        }
    }
}
