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

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use zip::{CompressionMethod, ZipArchive};

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
    read_impl(path, key)
        .with_context(|| format!("cannot read PyTorch checkpoint {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
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
    fn from_storage_class(name: &str) -> Option<DType> {
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
    fn from_torch_dtype(name: &str) -> Option<DType> {
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
// Pickle values
// ---------------------------------------------------------------------------------------------

/// A pickle value. Containers live in an arena (`Vec<Obj>`) and are referenced by index, which
/// gives Python's shared-reference semantics for the memo (a dict memoized before SETITEMS
/// and fetched again later sees its items) without reference counting cycles.
#[derive(Clone, Debug)]
enum Value {
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
struct Dict {
    entries: Vec<(Value, Value)>,
    index: HashMap<HKey, usize>,
}

impl Dict {
    fn insert(&mut self, k: Value, v: Value) {
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

    fn get_str(&self, key: &str) -> Option<&Value> {
        self.index
            .get(&HKey::Str(Rc::from(key)))
            .map(|&i| &self.entries[i].1)
    }
}

struct Storage {
    /// Element type of the storage, or the unsupported class name.
    dtype: std::result::Result<DType, String>,
    key: String,
    /// Number of elements of `dtype` (bytes for `UntypedStorage`).
    numel: u64,
}

struct TensorRef {
    /// Arena index of the `Obj::Storage`.
    storage: usize,
    /// Element type of the tensor (normally the storage's; `_rebuild_tensor_v3` may override).
    dtype: std::result::Result<DType, String>,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

enum Obj {
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

// ---------------------------------------------------------------------------------------------
// Unpickler
// ---------------------------------------------------------------------------------------------

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    // protocol 2
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    // protocol 3
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    // protocol 4
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    // protocol 5
    pub const BYTEARRAY8: u8 = 0x96;
}

/// Limit on nested `_rebuild_from_type_v2` calls (guards against stack exhaustion).
const MAX_CALL_DEPTH: u32 = 16;

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    objs: Vec<Obj>,
    /// Set when `step` fails on an opcode it does not know (its error says it all).
    unknown_opcode: bool,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            unknown_opcode: false,
        }
    }

    // ---- raw input ----

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let avail = (self.data.len() - self.pos) as u64;
        if n > avail {
            bail!(
                "pickle data truncated: need {n} bytes at offset {}, only {avail} left",
                self.pos
            );
        }
        let n = n as usize;
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }

    fn readline(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            bail!(
                "pickle data truncated: unterminated text argument at offset {}",
                self.pos
            );
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn readline_str(&mut self) -> Result<String> {
        let line = self.readline()?;
        Ok(String::from_utf8_lossy(line).into_owned())
    }

    // ---- stack ----

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            bail!("pickle stack underflow");
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&self) -> Result<&Value> {
        if self.stack.len() <= self.floor() {
            bail!("pickle stack underflow");
        }
        Ok(self.stack.last().expect("checked non-empty"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(k) = self.marks.pop() else {
            bail!("pickle MARK missing");
        };
        if k > self.stack.len() {
            bail!("pickle MARK beyond stack");
        }
        Ok(self.stack.split_off(k))
    }

    fn new_obj(&mut self, o: Obj) -> Value {
        self.objs.push(o);
        Value::Obj(self.objs.len() - 1)
    }

    fn memo_put(&mut self, idx: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<()> {
        let Some(v) = self.memo.get(&idx) else {
            bail!("pickle memo key {idx} not found");
        };
        let v = v.clone();
        self.push(v);
        Ok(())
    }

    fn items_of(&self, v: &Value) -> Option<Vec<Value>> {
        match v {
            Value::Obj(i) => match self.objs.get(*i)? {
                Obj::Tuple(t) | Obj::List(t) => Some(t.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    // ---- container mutation ----

    fn append_to_top(&mut self, items: Vec<Value>) -> Result<()> {
        let target = self.top()?.clone();
        match target {
            Value::Obj(i) => match &mut self.objs[i] {
                Obj::List(l) => {
                    l.extend(items);
                    Ok(())
                }
                // list subclasses / objects with `extend` / sets: contents are not needed
                Obj::Opaque { .. } | Obj::Set => Ok(()),
                _ => bail!("APPEND(S) on an object that is not a list"),
            },
            _ => bail!("APPEND(S) on a value that is not a list"),
        }
    }

    fn setitems_on_top(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("SETITEMS with an odd number of items");
        }
        let target = self.top()?.clone();
        match target {
            Value::Obj(i) => match &mut self.objs[i] {
                Obj::Dict(d) => {
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.insert(k, v);
                    }
                    Ok(())
                }
                Obj::Opaque { .. } => Ok(()),
                _ => bail!("SETITEM(S) on an object that is not a dict"),
            },
            _ => bail!("SETITEM(S) on a value that is not a dict"),
        }
    }

    // ---- main loop ----

    fn load(mut self) -> Result<(Value, Vec<Obj>)> {
        loop {
            let at = self.pos;
            let code = self.u8().context("pickle data ended without STOP")?;
            if code == op::STOP {
                let v = self.pop().with_context(|| format!("STOP at offset {at}"))?;
                return Ok((v, self.objs));
            }
            if let Err(e) = self.step(code, at) {
                if self.unknown_opcode {
                    return Err(e);
                }
                return Err(e.context(format!(
                    "in pickle opcode {} at offset {at}",
                    describe_opcode(code)
                )));
            }
        }
    }

    fn step(&mut self, code: u8, at: usize) -> Result<()> {
        match code {
            op::PROTO => {
                let p = self.u8()?;
                if p > 5 {
                    bail!("unsupported pickle protocol {p}");
                }
            }
            op::FRAME => {
                self.take(8)?;
            }
            op::MARK => self.marks.push(self.stack.len()),
            op::POP => {
                if !self.marks.is_empty() && self.stack.len() == self.floor() {
                    self.marks.pop();
                } else {
                    self.pop()?;
                }
            }
            op::POP_MARK => {
                self.pop_mark()?;
            }
            op::DUP => {
                let v = self.top()?.clone();
                self.push(v);
            }

            // ---- constants ----
            op::NONE => self.push(Value::None),
            op::NEWTRUE => self.push(Value::Bool(true)),
            op::NEWFALSE => self.push(Value::Bool(false)),
            op::BININT => {
                let v = i32::from_le_bytes(self.arr()?);
                self.push(Value::Int(v as i64));
            }
            op::BININT1 => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64));
            }
            op::BININT2 => {
                let v = u16::from_le_bytes(self.arr()?);
                self.push(Value::Int(v as i64));
            }
            op::LONG1 => {
                let n = self.u8()? as u64;
                let bytes = self.take(n)?;
                self.push(decode_long(bytes));
            }
            op::LONG4 => {
                let n = i32::from_le_bytes(self.arr()?);
                if n < 0 {
                    bail!("negative LONG4 length");
                }
                let bytes = self.take(n as u64)?;
                self.push(decode_long(bytes));
            }
            op::INT => {
                let line = self.readline_str()?;
                let v = match line.trim() {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => match s.parse::<i64>() {
                        Ok(i) => Value::Int(i),
                        Err(_) => Value::BigInt,
                    },
                };
                self.push(v);
            }
            op::LONG => {
                let line = self.readline_str()?;
                let s = line.trim().trim_end_matches('L');
                let v = s.parse::<i64>().map(Value::Int).unwrap_or(Value::BigInt);
                self.push(v);
            }
            op::BINFLOAT => {
                self.take(8)?; // big-endian f64; the value is never needed
                self.push(Value::Float);
            }
            op::FLOAT => {
                let line = self.readline_str()?;
                line.trim()
                    .parse::<f64>()
                    .map_err(|_| anyhow!("bad FLOAT literal {line:?}"))?;
                self.push(Value::Float);
            }

            // ---- strings / bytes ----
            op::BINUNICODE => {
                let n = u32::from_le_bytes(self.arr()?) as u64;
                let s = self.take(n)?;
                self.push(Value::Str(Rc::from(String::from_utf8_lossy(s).as_ref())));
            }
            op::SHORT_BINUNICODE => {
                let n = self.u8()? as u64;
                let s = self.take(n)?;
                self.push(Value::Str(Rc::from(String::from_utf8_lossy(s).as_ref())));
            }
            op::BINUNICODE8 => {
                let n = u64::from_le_bytes(self.arr()?);
                let s = self.take(n)?;
                self.push(Value::Str(Rc::from(String::from_utf8_lossy(s).as_ref())));
            }
            op::UNICODE => {
                let s = self.readline_str()?;
                self.push(Value::Str(Rc::from(s.as_str())));
            }
            op::SHORT_BINSTRING => {
                let n = self.u8()? as u64;
                let s = self.take(n)?;
                self.push(Value::Str(Rc::from(String::from_utf8_lossy(s).as_ref())));
            }
            op::BINSTRING => {
                let n = i32::from_le_bytes(self.arr()?);
                if n < 0 {
                    bail!("negative BINSTRING length");
                }
                let s = self.take(n as u64)?;
                self.push(Value::Str(Rc::from(String::from_utf8_lossy(s).as_ref())));
            }
            op::STRING => {
                let s = self.readline_str()?;
                let t = s.trim();
                let t = t
                    .strip_prefix(['\'', '"'])
                    .and_then(|t| t.strip_suffix(['\'', '"']))
                    .unwrap_or(t);
                self.push(Value::Str(Rc::from(t)));
            }
            op::SHORT_BINBYTES => {
                let n = self.u8()? as u64;
                self.take(n)?;
                self.push(Value::Bytes);
            }
            op::BINBYTES => {
                let n = u32::from_le_bytes(self.arr()?) as u64;
                self.take(n)?;
                self.push(Value::Bytes);
            }
            op::BINBYTES8 | op::BYTEARRAY8 => {
                let n = u64::from_le_bytes(self.arr()?);
                self.take(n)?;
                self.push(Value::Bytes);
            }

            // ---- containers ----
            op::EMPTY_DICT => {
                let v = self.new_obj(Obj::Dict(Dict::default()));
                self.push(v);
            }
            op::EMPTY_LIST => {
                let v = self.new_obj(Obj::List(Vec::new()));
                self.push(v);
            }
            op::EMPTY_TUPLE => {
                let v = self.new_obj(Obj::Tuple(Vec::new()));
                self.push(v);
            }
            op::EMPTY_SET => {
                let v = self.new_obj(Obj::Set);
                self.push(v);
            }
            op::TUPLE => {
                let items = self.pop_mark()?;
                let v = self.new_obj(Obj::Tuple(items));
                self.push(v);
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (code - op::TUPLE1 + 1) as usize;
                if self.stack.len() < self.floor() + n {
                    bail!("pickle stack underflow");
                }
                let items = self.stack.split_off(self.stack.len() - n);
                let v = self.new_obj(Obj::Tuple(items));
                self.push(v);
            }
            op::LIST => {
                let items = self.pop_mark()?;
                let v = self.new_obj(Obj::List(items));
                self.push(v);
            }
            op::FROZENSET => {
                self.pop_mark()?;
                let v = self.new_obj(Obj::Set);
                self.push(v);
            }
            op::DICT => {
                let items = self.pop_mark()?;
                if !items.len().is_multiple_of(2) {
                    bail!("DICT with an odd number of items");
                }
                let mut d = Dict::default();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.insert(k, v);
                }
                let v = self.new_obj(Obj::Dict(d));
                self.push(v);
            }
            op::APPEND => {
                let v = self.pop()?;
                self.append_to_top(vec![v])?;
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.append_to_top(items)?;
            }
            op::ADDITEMS => {
                self.pop_mark()?;
                match self.top()? {
                    Value::Obj(i) if matches!(self.objs[*i], Obj::Set | Obj::Opaque { .. }) => {}
                    _ => bail!("ADDITEMS on a value that is not a set"),
                }
            }
            op::SETITEM => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.setitems_on_top(vec![k, v])?;
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                self.setitems_on_top(items)?;
            }

            // ---- memo ----
            op::BINPUT => {
                let i = self.u8()? as u64;
                self.memo_put(i)?;
            }
            op::LONG_BINPUT => {
                let i = u32::from_le_bytes(self.arr()?) as u64;
                self.memo_put(i)?;
            }
            op::MEMOIZE => {
                let i = self.memo.len() as u64;
                self.memo_put(i)?;
            }
            op::PUT => {
                let line = self.readline_str()?;
                let i = line
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| anyhow!("bad PUT index"))?;
                self.memo_put(i)?;
            }
            op::BINGET => {
                let i = self.u8()? as u64;
                self.memo_get(i)?;
            }
            op::LONG_BINGET => {
                let i = u32::from_le_bytes(self.arr()?) as u64;
                self.memo_get(i)?;
            }
            op::GET => {
                let line = self.readline_str()?;
                let i = line
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| anyhow!("bad GET index"))?;
                self.memo_get(i)?;
            }

            // ---- objects ----
            op::GLOBAL => {
                let module = self.readline_str()?;
                let name = self.readline_str()?;
                self.push(Value::Global(Rc::new((module, name))));
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => {
                        self.push(Value::Global(Rc::new((m.to_string(), n.to_string()))))
                    }
                    _ => bail!("STACK_GLOBAL arguments are not strings"),
                }
            }
            op::REDUCE => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.call(&callable, &args, 0)?;
                self.push(v);
            }
            op::NEWOBJ => {
                let _args = self.pop()?;
                let cls = self.pop()?;
                let v = self.instantiate(&cls);
                self.push(v);
            }
            op::NEWOBJ_EX => {
                let _kwargs = self.pop()?;
                let _args = self.pop()?;
                let cls = self.pop()?;
                let v = self.instantiate(&cls);
                self.push(v);
            }
            op::BUILD => {
                // State of dicts (e.g. the `_metadata` attribute of a state_dict), tensors and
                // unknown objects is not needed.
                let _state = self.pop()?;
                self.top()?;
            }
            op::BINPERSID => {
                let pid = self.pop()?;
                let v = self.persistent_load(&pid)?;
                self.push(v);
            }
            op::PERSID => {
                self.readline()?;
                let v = self.new_obj(Obj::Opaque { class: None });
                self.push(v);
            }
            _ => {
                self.unknown_opcode = true;
                bail!(
                    "unsupported pickle opcode {} at offset {at} of data.pkl",
                    describe_opcode(code)
                )
            }
        }
        Ok(())
    }

    fn instantiate(&mut self, cls: &Value) -> Value {
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
    fn call(&mut self, callable: &Value, args: &Value, depth: u32) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Ok(self.new_obj(Obj::Opaque { class: None }));
        };
        let (module, name) = (g.0.as_str(), g.1.as_str());
        match (module, name) {
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
                self.rebuild_tensor(args, false)
            }
            ("torch._utils", "_rebuild_tensor_v3") => self.rebuild_tensor(args, true),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let items = self
                    .items_of(args)
                    .ok_or_else(|| anyhow!("{module}.{name}: arguments are not a tuple"))?;
                items
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow!("{module}.{name}: missing data argument"))
            }
            ("torch._tensor", "_rebuild_from_type" | "_rebuild_from_type_v2") => {
                // (func, new_type, args, state): a tensor subclass; rebuild the plain tensor.
                if depth >= MAX_CALL_DEPTH {
                    bail!("{module}.{name} nested too deeply");
                }
                let items = self
                    .items_of(args)
                    .ok_or_else(|| anyhow!("{module}.{name}: arguments are not a tuple"))?;
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
            _ => Ok(self.new_obj(Obj::Opaque {
                class: Some(g.clone()),
            })),
        }
    }

    /// `_rebuild_tensor(storage, storage_offset, size, stride)`,
    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`,
    /// `_rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])`.
    fn rebuild_tensor(&mut self, args: &Value, v3: bool) -> Result<Value> {
        let items = self
            .items_of(args)
            .ok_or_else(|| anyhow!("_rebuild_tensor: arguments are not a tuple"))?;
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
        let size = self
            .int_tuple(&items[2])
            .context("_rebuild_tensor: bad size")?;
        let stride = self
            .int_tuple(&items[3])
            .context("_rebuild_tensor: bad stride")?;
        if size.len() != stride.len() {
            bail!("_rebuild_tensor: size {size:?} and stride {stride:?} have different lengths");
        }
        let dtype = if v3 {
            match &items[6] {
                Value::Global(g) if g.0 == "torch" => {
                    DType::from_torch_dtype(&g.1).ok_or_else(|| format!("torch.{}", g.1))
                }
                _ => bail!("_rebuild_tensor_v3: dtype argument is not a torch dtype"),
            }
        } else {
            match &self.objs[storage] {
                Obj::Storage(s) => s.dtype.clone(),
                _ => unreachable!("checked above"),
            }
        };
        Ok(self.new_obj(Obj::Tensor(TensorRef {
            storage,
            dtype,
            offset,
            size,
            stride,
        })))
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
    fn persistent_load(&mut self, pid: &Value) -> Result<Value> {
        let items = self
            .items_of(pid)
            .ok_or_else(|| anyhow!("unsupported persistent id (not a tuple)"))?;
        match items.first() {
            Some(Value::Str(s)) if &**s == "storage" => {}
            _ => bail!("unsupported persistent id (expected ('storage', ...))"),
        }
        if items.len() < 5 {
            bail!(
                "persistent storage id has {} fields, expected 5",
                items.len()
            );
        }
        let dtype = match &items[1] {
            Value::Global(g) => DType::from_storage_class(&g.1)
                .filter(|_| g.0 == "torch" || g.0 == "torch.storage")
                .ok_or_else(|| format!("{}.{}", g.0, g.1)),
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

/// `0x52 ('R')` / `0xff`.
fn describe_opcode(code: u8) -> String {
    if code.is_ascii_graphic() {
        format!("0x{code:02x} ('{}')", code as char)
    } else {
        format!("0x{code:02x}")
    }
}

fn is_dict_class(g: &(String, String)) -> bool {
    matches!(
        (g.0.as_str(), g.1.as_str()),
        ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict")
    )
}

/// Little-endian two's complement integer (LONG1 / LONG4 payload).
fn decode_long(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        return Value::BigInt;
    }
    let neg = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

// ---------------------------------------------------------------------------------------------
// Zip access
// ---------------------------------------------------------------------------------------------

const NOT_ZIP: &str = "not a zip archive (is this a PyTorch >= 1.6 checkpoint? legacy non-zip .pt files are not supported)";

fn crc32_table() -> &'static [[u32; 256]; 8] {
    static TABLE: OnceLock<[[u32; 256]; 8]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[0u32; 256]; 8];
        for i in 0..256u32 {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            t[0][i as usize] = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                let prev = t[k - 1][i];
                t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            }
        }
        t
    })
}

fn crc32(data: &[u8]) -> u32 {
    let t = crc32_table();
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = c ^ u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]);
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Read a whole STORED entry, checking its size and CRC. `Ok(None)` if the entry is absent.
fn read_entry<R: Read + Seek>(
    zip: &mut ZipArchive<R>,
    name: &str,
    file_len: u64,
) -> Result<Option<Vec<u8>>> {
    let Some(idx) = zip.index_for_name(name) else {
        return Ok(None);
    };
    let mut f = zip
        .by_index_raw(idx)
        .map_err(|e| anyhow!("corrupt zip entry '{name}': {e}"))?;
    if f.compression() != CompressionMethod::Stored {
        bail!(
            "zip entry '{name}' is compressed (zip compression method {:?}); only uncompressed (STORED) entries, as written by torch.save, are supported",
            f.compression()
        );
    }
    if f.encrypted() {
        bail!("zip entry '{name}' is encrypted");
    }
    let size = f.size();
    if f.compressed_size() != size {
        bail!(
            "corrupt zip entry '{name}': stored entry has compressed size {} != size {size}",
            f.compressed_size()
        );
    }
    if size > file_len {
        bail!(
            "zip entry '{name}' claims {size} bytes but the file has only {file_len} (truncated or corrupt file)"
        );
    }
    let expected_crc = f.crc32();
    let mut buf = Vec::with_capacity(size as usize);
    f.read_to_end(&mut buf)
        .map_err(|e| anyhow!("cannot read zip entry '{name}' (truncated or corrupt file): {e}"))?;
    if buf.len() as u64 != size {
        bail!(
            "zip entry '{name}' is truncated: got {} of {size} bytes",
            buf.len()
        );
    }
    // torch can be told not to compute CRCs (they are then written as 0).
    if expected_crc != 0 {
        let got = crc32(&buf);
        if got != expected_crc {
            bail!(
                "CRC mismatch in zip entry '{name}' (expected {expected_crc:08x}, got {got:08x}); the file is corrupt"
            );
        }
    }
    Ok(Some(buf))
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

fn read_impl(path: &Path, key: Option<&str>) -> Result<PtStateDict> {
    let mut file = File::open(path).context("cannot open file")?;
    let file_len = file.metadata().context("cannot stat file")?.len();
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = file.read(&mut magic[got..]).context("cannot read file")?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < 4 || &magic != b"PK\x03\x04" {
        bail!("{NOT_ZIP}");
    }
    file.seek(SeekFrom::Start(0)).context("cannot seek file")?;
    let mut zip = ZipArchive::new(BufReader::new(file))
        .map_err(|e| anyhow!("corrupt or truncated zip archive: {e}"))?;

    // Locate `<archive>/data.pkl`.
    let names: Vec<String> = zip
        .file_names_raw()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    let pkl: Vec<&String> = names
        .iter()
        .filter(|n| n.as_str() == "data.pkl" || n.ends_with("/data.pkl"))
        .filter(|n| n.matches('/').count() <= 1)
        .collect();
    let pkl_name = match pkl.as_slice() {
        [one] => (*one).clone(),
        [] => {
            let shown: Vec<&str> = names.iter().take(10).map(|s| s.as_str()).collect();
            bail!(
                "zip archive has no '<archive>/data.pkl' entry, so it is not a torch.save checkpoint (entries: {shown:?}{})",
                if names.len() > 10 { ", ..." } else { "" }
            );
        }
        many => bail!("zip archive has several data.pkl entries: {many:?}"),
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];

    let big_endian = match read_entry(&mut zip, &format!("{prefix}byteorder"), file_len)? {
        None => false,
        Some(b) => match String::from_utf8_lossy(&b).trim() {
            "little" => false,
            "big" => true,
            other => bail!("unknown byteorder {other:?} in {prefix}byteorder"),
        },
    };

    let pickle =
        read_entry(&mut zip, &pkl_name, file_len)?.ok_or_else(|| anyhow!("missing {pkl_name}"))?;
    let (root, objs) = Unpickler::new(&pickle)
        .load()
        .with_context(|| format!("cannot unpickle {pkl_name}"))?;
    let torchscript = names.iter().any(|n| n == &format!("{prefix}constants.pkl"));

    let view = View { objs: &objs };
    let (chosen_key, top_level_keys, sd) = view.select(&root, key, torchscript)?;

    // Load the tensors of the chosen state_dict.
    let mut cache: HashMap<String, Rc<Vec<u8>>> = HashMap::new();
    let mut tensors = Vec::with_capacity(sd.entries.len());
    for (k, v) in &sd.entries {
        let Value::Str(name) = k else { continue };
        let Value::Obj(ti) = v else { continue };
        let Obj::Tensor(t) = &objs[*ti] else { continue };
        let Obj::Storage(st) = &objs[t.storage] else {
            bail!("internal error: tensor without storage");
        };
        let bytes = match cache.get(&st.key) {
            Some(b) => b.clone(),
            None => {
                let entry = format!("{prefix}data/{}", st.key);
                let b = read_entry(&mut zip, &entry, file_len)?.ok_or_else(|| {
                    anyhow!("missing storage entry '{entry}' (needed by tensor '{name}')")
                })?;
                let b = Rc::new(b);
                cache.insert(st.key.clone(), b.clone());
                b
            }
        };
        let pt = materialize(t, st, &bytes, big_endian)
            .with_context(|| format!("tensor '{name}' (storage '{prefix}data/{}')", st.key))?;
        tensors.push((name.to_string(), pt));
    }

    Ok(PtStateDict {
        key: chosen_key,
        top_level_keys,
        tensors,
    })
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

    fn select(
        &self,
        root: &Value,
        key: Option<&str>,
        torchscript: bool,
    ) -> Result<(Option<String>, Vec<String>, &'a Dict)> {
        let Some(top) = self.dict(root) else {
            let mut msg = format!(
                "the checkpoint's top-level object is {}, not a dict (a state_dict or a dict of state_dicts)",
                self.describe(root)
            );
            if torchscript {
                msg.push_str("; this looks like a TorchScript archive (torch.jit.save), which is not supported");
            } else if matches!(self.obj(root), Some(Obj::Opaque { .. })) {
                msg.push_str("; if it is a pickled nn.Module, save module.state_dict() instead");
            }
            bail!(msg);
        };
        if self.state_dict(root).is_some() {
            if let Some(k) = key {
                let names: Vec<String> = top
                    .entries
                    .iter()
                    .take(5)
                    .map(|(k, _)| self.key_string(k))
                    .collect();
                bail!(
                    "key '{k}' requested, but the file is a bare state_dict (no top-level keys; first parameters: {names:?})"
                );
            }
            return Ok((None, Vec::new(), top));
        }
        let keys: Vec<String> = top
            .entries
            .iter()
            .map(|(k, _)| self.key_string(k))
            .collect();
        let candidates: Vec<String> = top
            .entries
            .iter()
            .filter(|(_, v)| self.state_dict(v).is_some())
            .map(|(k, _)| self.key_string(k))
            .collect();
        if let Some(k) = key {
            let Some(v) = top.get_str(k) else {
                bail!(
                    "key '{k}' not found in checkpoint; available top-level keys: {keys:?} (state_dict candidates: {candidates:?})"
                );
            };
            let Some(sd) = self.state_dict(v) else {
                bail!(
                    "checkpoint entry '{k}' is not a state_dict (it is {}); available top-level keys: {keys:?} (state_dict candidates: {candidates:?})",
                    self.describe(v)
                );
            };
            return Ok((Some(k.to_string()), keys, sd));
        }
        if let Some(sd) = top.get_str("ema_model").and_then(|v| self.state_dict(v)) {
            return Ok((Some("ema_model".into()), keys, sd));
        }
        let found: Vec<(&Value, &Dict)> = top
            .entries
            .iter()
            .filter_map(|(k, v)| self.state_dict(v).map(|sd| (k, sd)))
            .collect();
        match found.as_slice() {
            [(k, sd)] => Ok((Some(self.key_string(k)), keys, sd)),
            [] => bail!(
                "no state_dict found in checkpoint (no entry is a dict of tensors); top-level keys: {keys:?}"
            ),
            _ => bail!(
                "checkpoint holds several state_dicts and none is 'ema_model'; pick one of {candidates:?} (top-level keys: {keys:?})"
            ),
        }
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
            self.cur = self
                .cur
                .wrapping_sub(self.stride[d].wrapping_mul(self.size[d]));
            self.idx[d] = 0;
        }
        Some(r)
    }
}

fn to_usize(x: u64) -> Result<usize> {
    usize::try_from(x).map_err(|_| anyhow!("value {x} does not fit in usize"))
}

fn materialize(t: &TensorRef, st: &Storage, bytes: &[u8], big_endian: bool) -> Result<PtTensor> {
    let sdt = st
        .dtype
        .clone()
        .map_err(|c| anyhow!("unsupported storage type {c}"))?;
    let dt = t
        .dtype
        .clone()
        .map_err(|c| anyhow!("unsupported dtype {c}"))?;
    let declared = st
        .numel
        .checked_mul(sdt.size())
        .ok_or_else(|| anyhow!("storage size overflows"))?;
    if (bytes.len() as u64) < declared {
        bail!(
            "storage entry has {} bytes but the pickle declares {} elements of {} ({declared} bytes)",
            bytes.len(),
            st.numel,
            sdt.name()
        );
    }
    let avail = declared / dt.size();

    let mut numel: u64 = 1;
    for &s in &t.size {
        numel = numel
            .checked_mul(s)
            .ok_or_else(|| anyhow!("tensor size {:?} overflows", t.size))?;
    }
    let shape: Vec<usize> = t.size.iter().map(|&s| to_usize(s)).collect::<Result<_>>()?;
    if numel == 0 {
        return Ok(PtTensor {
            shape,
            data: Vec::new(),
            dtype: dt.name().into(),
        });
    }
    let mut max_index = t.offset;
    for (&s, &st_) in t.size.iter().zip(&t.stride) {
        max_index = (s - 1)
            .checked_mul(st_)
            .and_then(|x| x.checked_add(max_index))
            .ok_or_else(|| anyhow!("tensor geometry overflows"))?;
    }
    if max_index >= avail {
        bail!(
            "storage too small: tensor with size {:?}, stride {:?}, storage_offset {} needs {} elements of {}, storage has {avail}",
            t.size,
            t.stride,
            t.offset,
            max_index + 1,
            dt.name()
        );
    }
    // Overlapping / expanded (stride 0) views can have more elements than the storage; cap
    // them so corrupt sizes cannot request absurd allocations.
    if numel > avail && numel > (1 << 26) {
        bail!("tensor has {numel} elements, far more than its storage ({avail}); refusing");
    }

    // Drop size-1 dims, then check for the contiguous fast path.
    let dims: Vec<(usize, usize)> = t
        .size
        .iter()
        .zip(&t.stride)
        .filter(|(s, _)| **s != 1)
        .map(|(&s, &st_)| Ok((to_usize(s)?, to_usize(st_)?)))
        .collect::<Result<_>>()?;
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
        let idx = Strided {
            size: dims.iter().map(|d| d.0).collect(),
            stride: dims.iter().map(|d| d.1).collect(),
            idx: vec![0; dims.len()],
            cur: offset,
            remaining: n,
        };
        convert_indexed(dt, bytes, big_endian, idx, n)
    };
    Ok(PtTensor {
        shape,
        data,
        dtype: dt.name().into(),
    })
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

fn decode_fn<const N: usize>(
    bytes: &[u8],
    big_endian: bool,
    idx: impl Iterator<Item = usize>,
    n: usize,
    f: impl Fn([u8; N]) -> f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    out.extend(idx.map(|i| f(elem::<N>(bytes, i, big_endian))));
    out
}

fn convert_indexed(
    dt: DType,
    bytes: &[u8],
    be: bool,
    idx: impl Iterator<Item = usize>,
    n: usize,
) -> Vec<f32> {
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
        return bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
    }
    convert_indexed(dt, bytes, be, 0..n, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        // byte-at-a-time reference
        let mut c = !0u32;
        for &b in &long {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        assert_eq!(crc32(&long), !c);
    }

    #[test]
    fn long1_decoding() {
        assert!(matches!(decode_long(&[]), Value::Int(0)));
        assert!(matches!(decode_long(&[0xff]), Value::Int(-1)));
        assert!(matches!(decode_long(&[0x00, 0x01]), Value::Int(256)));
        assert!(matches!(decode_long(&[0x80]), Value::Int(-128)));
        assert!(matches!(decode_long(&[0; 9]), Value::BigInt));
    }

    #[test]
    fn unknown_opcode_is_reported() {
        let err = Unpickler::new(&[0x80, 0x02, 0xff]).load().err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("0xff") && msg.contains("offset 2"), "{msg}");
    }

    #[test]
    fn memo_shares_containers() {
        // {} BINPUT 0; MARK 'a' 1 SETITEMS; BINGET 0; TUPLE2 STOP  -> ({'a': 1}, {'a': 1})
        let p = [
            0x80, 0x02, b'}', b'q', 0, b'(', 0x8c, 1, b'a', b'K', 1, b'u', b'h', 0, 0x86, b'.',
        ];
        let (v, objs) = Unpickler::new(&p).load().unwrap();
        let Value::Obj(t) = v else { panic!() };
        let Obj::Tuple(items) = &objs[t] else {
            panic!()
        };
        for it in items {
            let Value::Obj(d) = it else { panic!() };
            let Obj::Dict(d) = &objs[*d] else { panic!() };
            assert_eq!(d.entries.len(), 1);
        }
    }

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

    #[test]
    fn pop_cannot_cross_mark() {
        // MARK POP with an empty frame pops the mark; NONE MARK POP POP underflows the frame.
        assert!(
            Unpickler::new(&[0x80, 2, b'N', b'(', b'0', b'.'])
                .load()
                .is_ok()
        );
        assert!(
            Unpickler::new(&[0x80, 2, b'N', b'(', b'N', b'0', b'0', b't', b'.'])
                .load()
                .is_err()
        );
    }

    #[test]
    fn strided_iteration() {
        // 2x3 view of a 3x2 row-major storage, transposed: stride (1, 2)
        let it = Strided {
            size: vec![2, 3],
            stride: vec![1, 2],
            idx: vec![0, 0],
            cur: 0,
            remaining: 6,
        };
        assert_eq!(it.collect::<Vec<_>>(), vec![0, 2, 4, 1, 3, 5]);
    }
}
