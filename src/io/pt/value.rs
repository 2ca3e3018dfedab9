//! The object graph the unpickler produces: pickle values, the container arena, and lazy
//! references to storages and tensors (whose bytes stay in the archive until needed).

use std::collections::HashMap;
use std::rc::Rc;

use super::tensor::DType;

/// A pickle value. Containers live in an arena (`Vec<Obj>`) and are referenced by index, which
/// gives Python's shared-reference semantics for the memo (a dict memoized before SETITEMS
/// and fetched again later sees its items) without reference counting cycles.
#[derive(Clone, Debug)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64.
    BigInt,
    Float,
    Str(Rc<str>),
    /// Bytes / bytearray (contents are never needed).
    Bytes,
    /// `module.name` reference from GLOBAL / STACK_GLOBAL.
    Global(Rc<(String, String)>),
    Obj(usize),
}

#[derive(Hash, PartialEq, Eq)]
enum HKey {
    Str(Rc<str>),
    Int(i64),
    None,
}

#[derive(Default)]
pub(super) struct Dict {
    pub(super) entries: Vec<(Value, Value)>,
    index: HashMap<HKey, usize>,
}

impl Dict {
    pub(super) fn insert(&mut self, k: Value, v: Value) {
        let hk = match &k {
            Value::Str(s) => Some(HKey::Str(s.clone())),
            Value::Int(i) => Some(HKey::Int(*i)),
            Value::Bool(b) => Some(HKey::Int(*b as i64)),
            Value::None => Some(HKey::None),
            _ => None,
        };
        if let Some(hk) = hk {
            if let Some(&i) = self.index.get(&hk) {
                self.entries[i].1 = v;
                return;
            }
            self.index.insert(hk, self.entries.len());
        }
        self.entries.push((k, v));
    }

    pub(super) fn get_str(&self, key: &str) -> Option<&Value> {
        self.index.get(&HKey::Str(Rc::from(key))).map(|&i| &self.entries[i].1)
    }
}

pub(super) struct Storage {
    /// Element type of the storage, or the unsupported class name.
    pub(super) dtype: std::result::Result<DType, String>,
    pub(super) key: String,
    /// Number of elements of `dtype` (bytes for `UntypedStorage`).
    pub(super) numel: u64,
}

pub(super) struct TensorRef {
    /// Arena index of the `Obj::Storage`.
    pub(super) storage: usize,
    /// Element type of the tensor (normally the storage's; `_rebuild_tensor_v3` may override).
    pub(super) dtype: std::result::Result<DType, String>,
    pub(super) offset: u64,
    pub(super) size: Vec<u64>,
    pub(super) stride: Vec<u64>,
}

pub(super) enum Obj {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Dict),
    Set,
    Storage(Storage),
    Tensor(TensorRef),
    /// Result of calling / instantiating something unknown.
    Opaque {
        class: Option<Rc<(String, String)>>,
    },
}
