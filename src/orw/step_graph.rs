//! The device pass of one ORW step — forward of the trained model and the reference, the fused
//! loss, backward, the f32 gradients and the step's one read `[fm, w2, total, Σg² hi, lo]`
//! gathered on the device — and that pass as a CUDA graph.
//!
//! What is captured: [`pass`] from static inputs (`t`, `x_t`, `u_t`, the weights `w`), its
//! outputs (the read and the gradients) being the graph's static outputs. What is not: the host
//! read of the loss and the gradient norm (a download: it follows the replay), the clipping
//! coefficient (computed on the host from that norm), Adam and the EMA (`Adam::step_flat`,
//! eager: its bias corrections, learning rate and clip scale are kernel arguments that change
//! every step; a captured update needs them in a device parameter block, which the Adam arena
//! kernel does not read yet). The pair drawing (`pair_batch`: OT plan, Philox draws of `x0`, `t`,
//! `ε`) is eager too; its results are copied into the static inputs.
//!
//! When it is used (else the step runs eagerly, as before): f32 training (no mixed-precision
//! `work` copy, loss scale 1), an unconditional model (labels would be uploaded inside), on a
//! GPU, graphs on (`ORWCFM_CUDA_GRAPHS`), and a forward that draws nothing from the dropout
//! stream: dropout masks are drawn at `(seed, offset)` kernel arguments that move every step, so
//! a model with dropout > 0 trains eagerly (checked on the first step of each slot: the stream
//! must not move).
//!
//! Protocol (as the sampler's, `flow::ode_graph`): a slot per (input shapes, α, identity of the
//! trained and reference weights); its first step eager (the warm-up, the dropout check); its
//! second step captured from the static inputs and replayed; later steps replayed. The trained
//! weights are updated in place by Adam, which a replay sees; the first update after a policy
//! refresh copies them (the policy shares them: copy on write), which changes their identity, so
//! the slot starts again and the graph over the old buffers is dropped. A capture refused for
//! want of a cached block (other graphs took some) is retried on a later step (at most
//! [`RETRIES`] times); any other refusal makes the slot eager.

use std::sync::atomic::Ordering;

use anyhow::Result;

use super::loss::orw_loss_on_device;
use crate::autograd::ops;
use crate::nn::{Forward, VelocityField};
use crate::rng::philox::Philox;
use crate::tensor::graph::{DeviceGraph, GraphCounters, GraphStats, capture, records};
use crate::tensor::{DType, Tensor};

/// Captures refused for want of a cached block retried before a slot gives up.
pub const RETRIES: u32 = 3;

/// The device pass of one step: `(read, grads)`, the read `[fm, w2, total, hi, lo]` (f32, the
/// loss terms and the f64 sum of the gradients' squares as an f32 pair) and the gradients in
/// parameter order, f32, unscaled by `scale` (the loss is multiplied by it before backward).
/// Nothing is read back: the caller downloads `read`.
#[allow(clippy::too_many_arguments)]
pub fn pass<M: VelocityField>(model: &M, reference: &M, t: &Tensor, xt: &Tensor, ut: &Tensor, y: Option<&[usize]>, w: &Tensor, alpha: f32, scale: f32, fw: &mut Forward) -> Result<(Tensor, Vec<Tensor>)> {
    let loss = orw_loss_on_device(model, reference, t, xt, ut, y, w, alpha, fw)?;
    let grads = {
        let seed = if scale == 1.0 { &loss.total } else { &ops::mul_scalar(&loss.total, scale)? };
        let g = seed.backward()?;
        let gs = model.params().grads(&g)?;
        // back to f32 (and unscaled) for the master weights
        gs.iter().map(|t| if scale == 1.0 { t.to_dtype(DType::F32) } else { t.to_dtype(DType::F32)?.mul_scalar(1.0 / scale) }).collect::<Result<Vec<_>>>()?
    };
    let sq = Tensor::sum_squares_on_device(&grads.iter().collect::<Vec<_>>())?;
    // the loss node's terms [fm, w2, total] (f32) and [hi, lo]
    let read = Tensor::concat(&[loss.terms.clone(), sq], 0)?;
    Ok((read, grads))
}

/// Counters of the training step's graphs (process-wide).
pub type StepGraphStats = GraphStats;

static COUNTERS: GraphCounters = GraphCounters::new();

pub fn step_graph_stats() -> StepGraphStats {
    COUNTERS.stats()
}

#[derive(Clone, Debug, PartialEq)]
struct Key {
    shapes: [Vec<usize>; 4],
    alpha: u32,
    net: Vec<(u64, usize, usize)>,
    reference: Vec<(u64, usize, usize)>,
}

enum State {
    New,
    Warm,
    Graph {
        graph: DeviceGraph,
        /// t, x_t, u_t, w
        inputs: [Tensor; 4],
        read: Tensor,
        grads: Vec<Tensor>,
    },
    Eager,
}

/// The trainer's one step-graph slot.
#[derive(Default)]
pub struct StepGraph {
    slot: Option<(Key, State, u32)>,
}

impl StepGraph {
    /// Drop the graph (its memory returns to the pool's cache).
    pub fn clear(&mut self) {
        self.slot = None;
    }

    /// [`pass`] for an f32, unconditional step on a GPU (see the module docs for when the
    /// trainer calls it), through the slot's graph when there is one. `dropout` is the stream
    /// an eager forward would draw masks from (`None`: dropout off).
    #[allow(clippy::too_many_arguments)]
    pub fn run<M: VelocityField>(&mut self, net: &M, reference: &M, t: &Tensor, xt: &Tensor, ut: &Tensor, w: &[f32], alpha: f32, mut dropout: Option<&mut Philox>) -> Result<(Tensor, Vec<Tensor>)> {
        let dev = net.device();
        let w = Tensor::from_vec(w.to_vec(), &[w.len()]).to_device(dev)?;
        let (t, xt, ut) = (t.to_device(dev)?, xt.to_device(dev)?, ut.to_device(dev)?);
        let eager = |dropout: Option<&mut Philox>| pass(net, reference, &t, &xt, &ut, None, &w, alpha, 1.0, &mut Forward { dropout_rng: dropout });
        let (true, Some(n_id), Some(r_id)) = (records(dev), net.params().device_identity(), reference.params().device_identity()) else { return eager(dropout) };
        let key = Key { shapes: [t.shape().to_vec(), xt.shape().to_vec(), ut.shape().to_vec(), w.shape().to_vec()], alpha: alpha.to_bits(), net: n_id, reference: r_id };
        let (_, state, retries) = match &mut self.slot {
            Some(s) if s.0 == key => s,
            slot => {
                if matches!(slot, Some((_, State::Graph { .. }, _))) {
                    COUNTERS.invalidated.fetch_add(1, Ordering::Relaxed);
                }
                // the old graph (over buffers that are no longer the weights) dropped first
                *slot = None;
                slot.insert((key, State::New, 0))
            }
        };
        match state {
            State::Eager => eager(dropout),
            State::New => {
                COUNTERS.eager.fetch_add(1, Ordering::Relaxed);
                let before = dropout.as_deref().copied();
                let r = eager(dropout.as_deref_mut())?;
                *state = if dropout.as_deref().copied() != before {
                    // masks at per-step Philox offsets, passed as kernel arguments: not capturable
                    State::Eager
                } else {
                    State::Warm
                };
                Ok(r)
            }
            State::Warm => {
                let inputs = [&t, &xt, &ut, &w].map(|x| Tensor::full_on(x.shape(), 0.0, x.dtype(), x.device()));
                let [a, b, c, d] = inputs;
                let inputs = [a?, b?, c?, d?];
                for (s, x) in inputs.iter().zip([&t, &xt, &ut, &w]) {
                    s.copy_values_from(x)?;
                }
                // (no dropout stream: the warm-up showed the forward draws nothing from it)
                let captured = capture(dev, || pass(net, reference, &inputs[0], &inputs[1], &inputs[2], None, &inputs[3], alpha, 1.0, &mut Forward { dropout_rng: None }));
                match captured {
                    Ok((graph, (read, grads))) => {
                        COUNTERS.captures.fetch_add(1, Ordering::Relaxed);
                        graph.replay()?;
                        COUNTERS.replays.fetch_add(1, Ordering::Relaxed);
                        let out = (read.clone(), grads.clone());
                        *state = State::Graph { graph, inputs, read, grads };
                        Ok(out)
                    }
                    Err(e) => {
                        COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
                        let msg = format!("{e:#}");
                        if msg.contains("fresh driver allocation") && *retries < RETRIES {
                            *retries += 1;
                            *state = State::New;
                        } else {
                            eprintln!("note: training steps of {:?} on {dev} run without a CUDA graph: {msg}", xt.shape());
                            *state = State::Eager;
                        }
                        eager(dropout)
                    }
                }
            }
            State::Graph { graph, inputs, read, grads } => {
                for (s, x) in inputs.iter().zip([&t, &xt, &ut, &w]) {
                    s.copy_values_from(x)?;
                }
                graph.replay()?;
                COUNTERS.replays.fetch_add(1, Ordering::Relaxed);
                Ok((read.clone(), grads.clone()))
            }
        }
    }
}
