//! Reverse-mode automatic differentiation over [`Tensor`]s: a dynamic tape.
//!
//! Every op on [`Var`]s computes its value eagerly and, when gradients are enabled and some input
//! requires them, records a node holding its inputs and a backward closure. [`Var::backward`]
//! walks the recorded graph in reverse topological order. Inside [`no_grad`] nothing is recorded,
//! which is how sampling and the frozen reference model run.

pub mod custom;
pub mod fused;
pub mod ops;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};

use crate::tensor::Tensor;

type BackFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    id: usize,
    value: RefCell<Tensor>,
    requires_grad: bool,
    parents: Vec<Var>,
    backward: Option<BackFn>,
    name: &'static str,
}

/// A tensor in the autograd graph.
#[derive(Clone)]
pub struct Var(Rc<Node>);

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static NO_GRAD_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Whether ops record the tape on this thread.
pub fn grad_enabled() -> bool {
    NO_GRAD_DEPTH.with(|d| d.get() == 0)
}

/// Run `f` without recording anything (inference mode).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            NO_GRAD_DEPTH.with(|d| d.set(d.get() - 1));
        }
    }
    NO_GRAD_DEPTH.with(|d| d.set(d.get() + 1));
    let _g = Guard;
    f()
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var#{}({}, grad={}) {:?}", self.0.id, self.0.name, self.0.requires_grad, self.0.value.borrow())
    }
}

impl Var {
    fn new_node(value: Tensor, requires_grad: bool, parents: Vec<Var>, backward: Option<BackFn>, name: &'static str) -> Var {
        Var(Rc::new(Node { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), value: RefCell::new(value), requires_grad, parents, backward, name }))
    }

    /// A leaf that does not require gradients (data, inputs).
    pub fn constant(value: Tensor) -> Var {
        Var::new_node(value, false, Vec::new(), None, "const")
    }

    /// A leaf that requires gradients (a parameter, or an input we differentiate with respect to).
    pub fn param(value: Tensor) -> Var {
        Var::new_node(value, true, Vec::new(), None, "param")
    }

    /// The result of an op. Records the node only if gradients are enabled and an input needs them.
    pub fn from_op(value: Tensor, parents: Vec<Var>, name: &'static str, backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static) -> Var {
        if grad_enabled() && parents.iter().any(|p| p.requires_grad()) { Var::new_node(value, true, parents, Some(Box::new(backward)), name) } else { Var::new_node(value, false, Vec::new(), None, name) }
    }

    pub fn id(&self) -> usize {
        self.0.id
    }
    /// The op that made this value (`param`, `const` for leaves).
    pub fn name(&self) -> &'static str {
        self.0.name
    }
    /// The names of the recorded nodes this value depends on (itself included), each node once,
    /// in no particular order: what a backward from here will run.
    pub fn tape_names(&self) -> Vec<&'static str> {
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![self.clone()];
        let mut names = Vec::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.id()) {
                continue;
            }
            if v.0.backward.is_some() {
                names.push(v.0.name);
            }
            stack.extend(v.0.parents.iter().cloned());
        }
        names
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }
    /// The value (a cheap shared copy).
    pub fn value(&self) -> Tensor {
        self.0.value.borrow().clone()
    }
    pub fn shape(&self) -> Vec<usize> {
        self.0.value.borrow().shape().to_vec()
    }
    pub fn is_leaf(&self) -> bool {
        self.0.backward.is_none()
    }
    /// Replace the value of a leaf (what an optimiser step does). Panics on a non-leaf or a shape change.
    pub fn set_value(&self, t: Tensor) {
        assert!(self.is_leaf(), "set_value on a non-leaf Var");
        assert_eq!(self.0.value.borrow().shape(), t.shape(), "set_value changes the shape");
        *self.0.value.borrow_mut() = t;
    }
    /// Take a leaf's value out, leaving an empty placeholder (see `ParamStore::take_values`).
    pub(crate) fn take_value(&self) -> Tensor {
        assert!(self.is_leaf(), "take_value on a non-leaf Var");
        std::mem::replace(&mut *self.0.value.borrow_mut(), Tensor::zeros(&[0]))
    }
    /// Put back a value taken by `take_value`.
    pub(crate) fn put_value(&self, t: Tensor) {
        *self.0.value.borrow_mut() = t;
    }
    /// A new leaf with the same value, cut from this graph.
    pub fn detach(&self) -> Var {
        Var::constant(self.value())
    }

    /// Gradients of this scalar with respect to every leaf that requires them.
    pub fn backward(&self) -> Result<Grads> {
        let v = self.value();
        if v.numel() != 1 {
            bail!("backward() needs a scalar; use backward_with for a {:?} tensor", v.shape());
        }
        self.backward_with(v.full_like(1.0)?)
    }

    /// Vector-Jacobian product: gradients given the gradient `seed` of this Var.
    pub fn backward_with(&self, seed: Tensor) -> Result<Grads> {
        if seed.shape() != self.shape().as_slice() {
            bail!("backward seed of shape {:?} for a value of shape {:?}", seed.shape(), self.shape());
        }
        let mut grads: HashMap<usize, Tensor> = HashMap::new();
        if !self.requires_grad() {
            return Ok(Grads { map: grads });
        }
        // Iterative post-order DFS for a topological order.
        let mut order: Vec<Var> = Vec::new();
        let mut visited: std::collections::HashSet<usize> = std::collections::HashSet::new();
        let mut stack: Vec<(Var, usize)> = vec![(self.clone(), 0)];
        visited.insert(self.id());
        while let Some((node, i)) = stack.pop() {
            if i < node.0.parents.len() {
                let p = node.0.parents[i].clone();
                stack.push((node, i + 1));
                if p.requires_grad() && visited.insert(p.id()) {
                    stack.push((p, 0));
                }
            } else {
                order.push(node);
            }
        }
        grads.insert(self.id(), seed);
        for node in order.iter().rev() {
            let Some(bw) = &node.0.backward else { continue };
            let Some(g) = grads.remove(&node.id()) else { continue };
            let pgs = bw(&g).map_err(|e| e.context(format!("backward of {}", node.0.name)))?;
            debug_assert_eq!(pgs.len(), node.0.parents.len(), "backward of {} returned the wrong count", node.0.name);
            for (p, pg) in node.0.parents.iter().zip(pgs) {
                if !p.requires_grad() {
                    continue;
                }
                let Some(pg) = pg else { continue };
                debug_assert_eq!(pg.shape(), p.shape().as_slice(), "gradient shape from {}", node.0.name);
                match grads.get_mut(&p.id()) {
                    Some(acc) => acc.axpby_in_place(1.0, &pg, 1.0)?,
                    None => {
                        grads.insert(p.id(), pg);
                    }
                }
            }
        }
        Ok(Grads { map: grads })
    }
}

/// Gradients of a scalar with respect to leaves, looked up by [`Var`].
pub struct Grads {
    map: HashMap<usize, Tensor>,
}

impl Grads {
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        self.map.get(&v.id())
    }
    pub fn take(&mut self, v: &Var) -> Option<Tensor> {
        self.map.remove(&v.id())
    }
    /// The gradient, or zeros of the right shape (dtype and device) when the leaf did not
    /// influence the output.
    pub fn get_or_zeros(&self, v: &Var) -> Result<Tensor> {
        match self.get(v) {
            Some(g) => Ok(g.clone()),
            None => v.value().zeros_like(),
        }
    }
}
