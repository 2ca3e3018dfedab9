//! Named parameters of a model, in registration (state_dict) order.

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::{Context, Result, bail};

use crate::autograd::{Grads, Var};
use crate::tensor::Tensor;
use crate::tensor::arena::Arena;

/// The parameters of a model: names as in the PyTorch `state_dict`, values as autograd leaves.
///
/// Flat arena: after [`flatten`](Self::flatten) (which the optimiser calls), the f32 values live
/// in one contiguous storage and each leaf's value is a zero-copy view of it, so that the
/// optimiser updates the whole model in one pass ([`update_arena`](Self::update_arena)). Anything
/// that replaces a value (loading, `set_all`, moving one tensor) simply leaves that tensor outside
/// the arena; the next `flatten` gathers them all again.
pub struct ParamStore {
    names: Vec<String>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    arena: RefCell<Option<Arena>>,
}

impl Clone for ParamStore {
    /// A cheap copy: new leaves that share the tensors' storage (copy on write), so an update of
    /// one copy never shows in another.
    fn clone(&self) -> Self {
        ParamStore { names: self.names.clone(), vars: self.vars.iter().map(|v| Var::param(v.value())).collect(), index: self.index.clone(), arena: RefCell::new(self.arena.borrow().clone()) }
    }
}

impl ParamStore {
    pub fn new() -> Self {
        ParamStore { names: Vec::new(), vars: Vec::new(), index: HashMap::new(), arena: RefCell::new(None) }
    }

    /// Register a parameter; returns its index.
    pub fn add(&mut self, name: String, value: Tensor) -> usize {
        assert!(!self.index.contains_key(&name), "duplicate parameter {name}");
        let i = self.vars.len();
        self.index.insert(name.clone(), i);
        self.names.push(name);
        self.vars.push(Var::param(value));
        i
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
    pub fn var(&self, i: usize) -> &Var {
        &self.vars[i]
    }
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.vars[i])
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(|s| s.as_str()).zip(self.vars.iter())
    }
    /// Total number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars.iter().map(|v| v.value().numel()).sum()
    }
    /// `(name, value)` pairs in order.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.iter().map(|(n, v)| (n.to_string(), v.value())).collect()
    }
    /// Gradients in parameter order (zeros where a parameter did not affect the loss).
    pub fn grads(&self, g: &Grads) -> Result<Vec<Tensor>> {
        self.vars.iter().map(|v| g.get_or_zeros(v)).collect()
    }

    /// Replace every value from `tensors`, strictly: every missing, unexpected or mis-shaped key
    /// is reported, all in one error. Values are cast to the dtype and moved to the device of
    /// the parameter they replace (a half-precision file loads into an f32 model and back).
    pub fn load_strict(&mut self, tensors: Vec<(String, Tensor)>) -> Result<()> {
        // a key is "seen" when the file has it, with the right shape or not
        let mut seen = vec![false; self.vars.len()];
        let (mut unexpected, mut mismatched) = (Vec::new(), Vec::new());
        let mut staged: Vec<(usize, Tensor)> = Vec::new();
        for (name, t) in tensors {
            match self.index.get(&name) {
                None => unexpected.push(name),
                Some(&i) => {
                    seen[i] = true;
                    let want = self.vars[i].shape();
                    if t.shape() != want.as_slice() {
                        mismatched.push(format!("{name}: file has {:?}, model needs {:?}", t.shape(), want));
                    } else {
                        staged.push((i, t));
                    }
                }
            }
        }
        let missing: Vec<&str> = self.names.iter().zip(&seen).filter(|(_, s)| !**s).map(|(n, _)| n.as_str()).collect();
        if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!("missing keys ({}): {}", missing.len(), missing.join(", ")));
            }
            if !unexpected.is_empty() {
                parts.push(format!("unexpected keys ({}): {}", unexpected.len(), unexpected.join(", ")));
            }
            if !mismatched.is_empty() {
                parts.push(format!("shape mismatches ({}): {}", mismatched.len(), mismatched.join("; ")));
            }
            bail!("weights do not match the model: {}", parts.join(" | "));
        }
        for (i, t) in staged {
            let cur = self.vars[i].value();
            let t = t.to_dtype(cur.dtype())?.to_device(cur.device()).with_context(|| format!("loading {}", self.names[i]))?;
            self.vars[i].set_value(t);
        }
        Ok(())
    }

    /// Write every parameter under its name to a safetensors file (atomically), with `metadata`.
    pub fn save_safetensors(&self, path: &std::path::Path, dtype: crate::tensor::DType, metadata: &HashMap<String, String>) -> Result<()> {
        use crate::io::safetensors::{Out, save};
        let tensors = self.tensors();
        let outs: Vec<(String, Out)> = tensors.iter().map(|(n, t)| (n.clone(), Out::F(t))).collect();
        save(path, &outs, dtype, metadata)
    }

    /// Move every parameter to `device` (no copy for those already there; a flat arena moves as
    /// one copy and stays one).
    pub fn to_device(&self, device: crate::tensor::Device) -> Result<()> {
        if self.arena_held() {
            let moved = self.arena.borrow().as_ref().expect("held").to_device(device).with_context(|| format!("moving the parameter arena to {device}"))?;
            for (v, t) in self.vars.iter().zip(moved.views()) {
                v.set_value(t);
            }
            *self.arena.borrow_mut() = Some(moved);
            return Ok(());
        }
        for (n, v) in self.iter() {
            let t = v.value().to_device(device).with_context(|| format!("moving parameter {n} to {device}"))?;
            v.set_value(t);
        }
        Ok(())
    }

    /// Cast every parameter to `dtype` (no copy for those already in it).
    pub fn to_dtype(&self, dtype: crate::tensor::DType) -> Result<()> {
        for (n, v) in self.iter() {
            let t = v.value().to_dtype(dtype).with_context(|| format!("casting parameter {n} to {dtype}"))?;
            v.set_value(t);
        }
        Ok(())
    }

    /// The dtype of the parameters (the first one's; f32 for an empty store).
    pub fn dtype(&self) -> crate::tensor::DType {
        self.vars.first().map(|v| v.value().dtype()).unwrap_or(crate::tensor::DType::F32)
    }

    /// The identity of the device memory holding each parameter (`Tensor::device_identity`),
    /// which a CUDA graph recorded on the weights depends on; `None` when one is on the host.
    pub fn device_identity(&self) -> Option<Vec<(u64, usize, usize)>> {
        self.vars.iter().map(|v| v.value().device_identity()).collect()
    }

    /// The device of the parameters (the first one's; the CPU for an empty store).
    pub fn device(&self) -> crate::tensor::Device {
        self.vars.first().map(|v| v.value().device()).unwrap_or(crate::tensor::Device::Cpu)
    }

    /// Take the values out of the leaves (they hold empty placeholders until
    /// [`put_values`](Self::put_values)), so that an in-place update of an unshared value needs no copy.
    pub fn take_values(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.take_value()).collect()
    }
    /// Put back values taken by [`take_values`](Self::take_values), in order.
    pub fn put_values(&self, values: Vec<Tensor>) {
        assert_eq!(values.len(), self.vars.len());
        for (v, t) in self.vars.iter().zip(values) {
            v.put_value(t);
        }
    }

    /// Set values in order (e.g. after an optimiser step).
    pub fn set_all(&self, values: Vec<Tensor>) {
        assert_eq!(values.len(), self.vars.len());
        for (v, t) in self.vars.iter().zip(values) {
            v.set_value(t);
        }
    }
}

impl ParamStore {
    /// Whether every value is, in order, a view of this store's flat arena.
    pub fn arena_held(&self) -> bool {
        self.arena.borrow().as_ref().is_some_and(|a| {
            let vals: Vec<Tensor> = self.vars.iter().map(|v| v.value()).collect();
            a.holds(vals.iter())
        })
    }

    /// Put the values (f32, one device) into one flat arena, each leaf's value a view of it; a
    /// no-op when they already are (one gather otherwise: after a load, `set_all`, a cast).
    pub fn flatten(&self) -> Result<()> {
        if self.arena_held() {
            return Ok(());
        }
        let vals: Vec<Tensor> = self.vars.iter().map(|v| v.value()).collect();
        let arena = Arena::gather(&vals).context("gathering the parameters into a flat arena")?;
        drop(vals);
        for (v, t) in self.vars.iter().zip(arena.views()) {
            v.put_value(t);
        }
        *self.arena.borrow_mut() = Some(arena);
        Ok(())
    }

    /// The flat arena (after [`flatten`](Self::flatten)), shared.
    pub fn arena(&self) -> Option<Arena> {
        self.arena.borrow().clone()
    }

    /// Run `f` on the flat arena for an in-place update, then give the leaves views of the
    /// result. The views are taken out of the leaves first, so an arena that no other store
    /// shares is written in place (no copy); a shared one is copied once (copy on write).
    pub fn update_arena<R>(&self, f: impl FnOnce(&mut Arena) -> Result<R>) -> Result<R> {
        self.flatten()?;
        let mut arena = self.arena.borrow_mut().take().expect("flattened");
        drop(self.take_values());
        let r = f(&mut arena);
        for (v, t) in self.vars.iter().zip(arena.views()) {
            v.put_value(t);
        }
        *self.arena.borrow_mut() = Some(arena);
        r
    }
}

impl Default for ParamStore {
    fn default() -> Self {
        Self::new()
    }
}
