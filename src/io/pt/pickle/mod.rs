//! A small, defensive unpickler for the opcode subset `torch.save` emits. It builds the object
//! graph of `super::value`; the torch-specific callables (tensor rebuilding, persistent
//! storage ids) are in `torch`. Malformed input yields an error, never a panic.

mod op;
mod torch;

use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};

use self::op::describe_opcode;
use super::value::{Dict, Obj, Value};

/// The unpickler state: input, stack with marks, memo, and the object arena.
pub(super) struct Unpickler<'a> {
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
    pub(super) fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), objs: Vec::new(), unknown_opcode: false }
    }

    // ---- raw input ----

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let avail = (self.data.len() - self.pos) as u64;
        if n > avail {
            bail!("pickle data truncated: need {n} bytes at offset {}, only {avail} left", self.pos);
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
            bail!("pickle data truncated: unterminated text argument at offset {}", self.pos);
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

    /// Run to STOP; returns the root value and the object arena it indexes into.
    pub(super) fn load(mut self) -> Result<(Value, Vec<Obj>)> {
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
                return Err(e.context(format!("in pickle opcode {} at offset {at}", describe_opcode(code))));
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
                line.trim().parse::<f64>().map_err(|_| anyhow!("bad FLOAT literal {line:?}"))?;
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
                let t = t.strip_prefix(['\'', '"']).and_then(|t| t.strip_suffix(['\'', '"'])).unwrap_or(t);
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
                let i = line.trim().parse::<u64>().map_err(|_| anyhow!("bad PUT index"))?;
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
                let i = line.trim().parse::<u64>().map_err(|_| anyhow!("bad GET index"))?;
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
                    (Value::Str(m), Value::Str(n)) => self.push(Value::Global(Rc::new((m.to_string(), n.to_string())))),
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
                bail!("unsupported pickle opcode {} at offset {at} of data.pkl", describe_opcode(code))
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let p = [0x80, 0x02, b'}', b'q', 0, b'(', 0x8c, 1, b'a', b'K', 1, b'u', b'h', 0, 0x86, b'.'];
        let (v, objs) = Unpickler::new(&p).load().unwrap();
        let Value::Obj(t) = v else { panic!() };
        let Obj::Tuple(items) = &objs[t] else { panic!() };
        for it in items {
            let Value::Obj(d) = it else { panic!() };
            let Obj::Dict(d) = &objs[*d] else { panic!() };
            assert_eq!(d.entries.len(), 1);
        }
    }

    #[test]
    fn pop_cannot_cross_mark() {
        // MARK POP with an empty frame pops the mark; NONE MARK POP POP underflows the frame.
        assert!(Unpickler::new(&[0x80, 2, b'N', b'(', b'0', b'.']).load().is_ok());
        assert!(Unpickler::new(&[0x80, 2, b'N', b'(', b'N', b'0', b'0', b't', b'.']).load().is_err());
    }
}
