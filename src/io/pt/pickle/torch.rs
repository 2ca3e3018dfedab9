//! The torch-specific part of the unpickler: what REDUCE / NEWOBJ / BINPERSID produce for
//! `torch._utils._rebuild_tensor*`, `_rebuild_parameter*`, `torch._tensor._rebuild_from_type*`,
//! dict classes and `('storage', ...)` persistent ids. Anything else becomes an opaque object.

use anyhow::{Context, Result, anyhow, bail};

use super::super::tensor::DType;
use super::super::value::{Dict, Obj, Storage, TensorRef, Value};
use super::Unpickler;

/// Limit on nested `_rebuild_from_type_v2` calls (guards against stack exhaustion).
const MAX_CALL_DEPTH: u32 = 16;

impl Unpickler<'_> {
    /// NEWOBJ / NEWOBJ_EX: `cls.__new__(cls, ...)`.
    pub(super) fn instantiate(&mut self, cls: &Value) -> Value {
        if let Value::Global(g) = cls {
            if is_dict_class(g) {
                return self.new_obj(Obj::Dict(Dict::default()));
            }
            let class = Some(g.clone());
            return self.new_obj(Obj::Opaque { class });
        }
        self.new_obj(Obj::Opaque { class: None })
    }

    /// REDUCE: `callable(*args)`.
    pub(super) fn call(&mut self, callable: &Value, args: &Value, depth: u32) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Ok(self.new_obj(Obj::Opaque { class: None }));
        };
        let (module, name) = (g.0.as_str(), g.1.as_str());
        match (module, name) {
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => self.rebuild_tensor(args, false),
            ("torch._utils", "_rebuild_tensor_v3") => self.rebuild_tensor(args, true),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let items = self.items_of(args).ok_or_else(|| anyhow!("{module}.{name}: arguments are not a tuple"))?;
                items.into_iter().next().ok_or_else(|| anyhow!("{module}.{name}: missing data argument"))
            }
            ("torch._tensor", "_rebuild_from_type" | "_rebuild_from_type_v2") => {
                // (func, new_type, args, state): a tensor subclass; rebuild the plain tensor.
                if depth >= MAX_CALL_DEPTH {
                    bail!("{module}.{name} nested too deeply");
                }
                let items = self.items_of(args).ok_or_else(|| anyhow!("{module}.{name}: arguments are not a tuple"))?;
                if items.len() < 3 {
                    bail!("{module}.{name}: expected at least 3 arguments");
                }
                self.call(&items[0], &items[2], depth + 1)
            }
            _ if is_dict_class(g) => {
                let mut d = Dict::default();
                // dict(iterable_of_pairs) / OrderedDict([...]); protocol 2 normally uses
                // empty args followed by SETITEMS.
                let first = self.items_of(args).and_then(|a| a.into_iter().next());
                if let Some(pairs) = first.as_ref().and_then(|f| self.items_of(f)) {
                    for p in pairs {
                        if let Some(kv) = self.items_of(&p).filter(|kv| kv.len() == 2) {
                            d.insert(kv[0].clone(), kv[1].clone());
                        }
                    }
                } else if let Some(Obj::Dict(src)) = first.as_ref().and_then(|f| match f {
                    Value::Obj(i) => self.objs.get(*i),
                    _ => None,
                }) {
                    for (k, v) in &src.entries {
                        d.insert(k.clone(), v.clone());
                    }
                }
                Ok(self.new_obj(Obj::Dict(d)))
            }
            _ => Ok(self.new_obj(Obj::Opaque { class: Some(g.clone()) })),
        }
    }

    /// `_rebuild_tensor(storage, storage_offset, size, stride)`,
    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`,
    /// `_rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])`.
    fn rebuild_tensor(&mut self, args: &Value, v3: bool) -> Result<Value> {
        let items = self.items_of(args).ok_or_else(|| anyhow!("_rebuild_tensor: arguments are not a tuple"))?;
        if items.len() < if v3 { 7 } else { 4 } {
            bail!("_rebuild_tensor: too few arguments ({})", items.len());
        }
        let storage = match &items[0] {
            Value::Obj(i) if matches!(self.objs.get(*i), Some(Obj::Storage(_))) => *i,
            _ => bail!("_rebuild_tensor: first argument is not a storage"),
        };
        let offset = match items[1] {
            Value::Int(o) if o >= 0 => o as u64,
            _ => bail!("_rebuild_tensor: bad storage_offset"),
        };
        let size = self.int_tuple(&items[2]).context("_rebuild_tensor: bad size")?;
        let stride = self.int_tuple(&items[3]).context("_rebuild_tensor: bad stride")?;
        if size.len() != stride.len() {
            bail!("_rebuild_tensor: size {size:?} and stride {stride:?} have different lengths");
        }
        let dtype = if v3 {
            match &items[6] {
                Value::Global(g) if g.0 == "torch" => DType::from_torch_dtype(&g.1).ok_or_else(|| format!("torch.{}", g.1)),
                _ => bail!("_rebuild_tensor_v3: dtype argument is not a torch dtype"),
            }
        } else {
            match &self.objs[storage] {
                Obj::Storage(s) => s.dtype.clone(),
                _ => unreachable!("checked above"),
            }
        };
        Ok(self.new_obj(Obj::Tensor(TensorRef { storage, dtype, offset, size, stride })))
    }

    fn int_tuple(&self, v: &Value) -> Result<Vec<u64>> {
        let items = self.items_of(v).ok_or_else(|| anyhow!("not a tuple"))?;
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as u64),
                _ => bail!("element is not a non-negative integer"),
            })
            .collect()
    }

    /// BINPERSID with `('storage', storage_type, key, location, numel)`.
    pub(super) fn persistent_load(&mut self, pid: &Value) -> Result<Value> {
        let items = self.items_of(pid).ok_or_else(|| anyhow!("unsupported persistent id (not a tuple)"))?;
        match items.first() {
            Some(Value::Str(s)) if &**s == "storage" => {}
            _ => bail!("unsupported persistent id (expected ('storage', ...))"),
        }
        if items.len() < 5 {
            bail!("persistent storage id has {} fields, expected 5", items.len());
        }
        let dtype = match &items[1] {
            Value::Global(g) => DType::from_storage_class(&g.1).filter(|_| g.0 == "torch" || g.0 == "torch.storage").ok_or_else(|| format!("{}.{}", g.0, g.1)),
            _ => bail!("persistent storage id: storage type is not a class"),
        };
        let key = match &items[2] {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => bail!("persistent storage id: key is not a string"),
        };
        let numel = match items[4] {
            Value::Int(n) if n >= 0 => n as u64,
            _ => bail!("persistent storage id: bad element count"),
        };
        Ok(self.new_obj(Obj::Storage(Storage { dtype, key, numel })))
    }
}

fn is_dict_class(g: &(String, String)) -> bool {
    matches!((g.0.as_str(), g.1.as_str()), ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_dict_from_pairs() {
        // OrderedDict([('a', 1)])
        let mut p = vec![0x80, 0x02, b'c'];
        p.extend_from_slice(b"collections\nOrderedDict\n");
        p.extend_from_slice(&[b']', 0x8c, 1, b'a', b'K', 1, 0x86, b'a', 0x85, b'R', b'.']);
        let (v, objs) = Unpickler::new(&p).load().unwrap();
        let Value::Obj(i) = v else { panic!() };
        let Obj::Dict(d) = &objs[i] else { panic!() };
        assert!(matches!(d.get_str("a"), Some(Value::Int(1))));
    }
}
