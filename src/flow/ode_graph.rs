//! The fixed-grid sampler as a CUDA graph: the whole solve (Euler, midpoint or RK4 with a fixed
//! number of steps) captured once per velocity field and replayed for every later solve.
//!
//! Protocol, per cache slot (GPU, state shape and dtype, solver, steps, time interval, and the
//! identity of the weights the field reads):
//! 1. first solve: eager (the warm-up: kernels loaded, convolution plans made, the pool's cache
//!    filled with the solve's blocks);
//! 2. second solve: eager from the slot's static input buffer, its result read back, and then,
//!    at once (the cache holds exactly what the solve needs), the same solve from the same
//!    input captured without its per-step finiteness reads: the graph (`backend::cuda::graph`);
//! 3. later solves: `x0` copied into the static input (device to device), the graph replayed,
//!    the static output copied out and checked once for non-finite values (on a non-finite state
//!    the solve is run again eagerly, which names the time it went wrong).
//!
//! Every time and stage coefficient of a fixed grid is a function of the slot's key, so they are
//! captured as kernel arguments (no upload); what changes between solves (`x0`) is copied into
//! the static input. A replay reads the weights' current buffers: in-place updates of the same
//! buffers are seen. Replaced weights (new buffers: a refreshed policy, a cast, a load) change
//! the weights' identity (buffer ids, unique for the process even when addresses are reused) and
//! the slot's graph is dropped before anything could replay it on the old addresses: each slot
//! keeps one graph, for the last weights it saw.
//!
//! A capture that is refused (an upload inside the field, say a class-conditional model's
//! labels, or a block the cache lacks) is abandoned: the solve's result is the eager one, the
//! slot is marked so that it samples eagerly from then on, and one line says why.
//!
//! Off with `ORWCFM_CUDA_GRAPHS=0`.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};

use super::ode::{OdeSolver, OdeStats, fixed_grid};
use crate::tensor::graph::{DeviceGraph, GraphCounters, GraphStats, capture, records};
use crate::tensor::{DType, Device, Tensor};

/// The variable that turns the sampler's CUDA graphs off: `0`.
pub const GRAPHS_VAR: &str = "ORWCFM_CUDA_GRAPHS";

/// 0: as the environment says; 1: on; 2: off.
static OVERRIDE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether sampling on CUDA uses graphs: [`set_graphs_enabled`], else on unless
/// `ORWCFM_CUDA_GRAPHS=0`.
pub fn graphs_enabled() -> bool {
    match OVERRIDE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => std::env::var(GRAPHS_VAR).map_or(true, |v| v.trim() != "0"),
    }
}

/// Turn the sampler's graphs on or off for the process (`None`: back to the environment).
pub fn set_graphs_enabled(on: Option<bool>) {
    OVERRIDE.store(
        match on {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        },
        Ordering::Relaxed,
    );
}

/// Counters of the sampler's graphs (process-wide): `eager` counts the warm-up solves and the
/// solves before a capture; a refused capture makes its slot sample eagerly.
pub type SamplerGraphStats = GraphStats;

static COUNTERS: GraphCounters = GraphCounters::new();

pub fn sampler_graph_stats() -> SamplerGraphStats {
    COUNTERS.stats()
}

#[derive(Clone, Debug, PartialEq)]
struct SlotKey {
    device: Device,
    shape: Vec<usize>,
    dtype: DType,
    solver: &'static str,
    steps: usize,
    t0: u32,
    t1: u32,
    /// the lengths of the weights (the architecture, as far as the graph cares)
    arch: Vec<usize>,
}

enum State {
    /// no solve yet
    New,
    /// one eager solve done (the warm-up)
    Warm,
    Graph {
        graph: DeviceGraph,
        /// the static input the graph reads, and the output it writes
        input: Tensor,
        output: Tensor,
    },
    /// capture refused: eager from now on
    Eager,
}

struct Slot {
    key: SlotKey,
    weights: Vec<(u64, usize, usize)>,
    state: State,
}

/// At most this many slots; the least recently used goes first.
const MAX_SLOTS: usize = 4;

static SLOTS: Mutex<Vec<Slot>> = Mutex::new(Vec::new());

fn slots() -> MutexGuard<'static, Vec<Slot>> {
    SLOTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drop every cached sampler graph (their memory returns to the pool's cache).
pub fn clear_sampler_graphs() {
    slots().clear();
}

/// Cached sampler graphs (tests).
pub fn cached_sampler_graphs() -> usize {
    slots().iter().filter(|s| matches!(s.state, State::Graph { .. })).count()
}

fn nfe(solver: &OdeSolver, steps: usize) -> usize {
    steps
        * match solver {
            OdeSolver::Euler => 1,
            OdeSolver::Midpoint => 2,
            _ => 4,
        }
}

/// [`super::ode::odeint`] for a fixed-grid solver on a GPU, through a CUDA graph where possible
/// (see the module docs). `weights` is the identity of every device buffer that `f` reads
/// besides its input (`ParamStore::device_identity` of the model's parameters); `f` must depend on
/// nothing else that changes between solves (no per-solve uploads: those refuse the capture).
/// The result is bitwise the eager solve's.
pub fn odeint_graphed(f: &mut dyn FnMut(f32, &Tensor) -> Result<Tensor>, x0: &Tensor, t0: f32, t1: f32, steps: usize, solver: &OdeSolver, weights: Vec<(u64, usize, usize)>) -> Result<(Tensor, OdeStats)> {
    let device = x0.device();
    if !records(device) {
        return super::ode::odeint(f, x0, t0, t1, steps, solver);
    }
    if matches!(solver, OdeSolver::Dopri5 { .. }) || steps == 0 || !t0.is_finite() || !t1.is_finite() {
        return super::ode::odeint(f, x0, t0, t1, steps, solver);
    }
    let key = SlotKey { device, shape: x0.shape().to_vec(), dtype: x0.dtype(), solver: solver.name(), steps, t0: t0.to_bits(), t1: t1.to_bits(), arch: weights.iter().map(|w| w.2).collect() };
    let mut all = slots();
    let mut slot = match all.iter().position(|s| s.key == key) {
        Some(i) => all.remove(i),
        None => {
            if all.len() >= MAX_SLOTS {
                all.remove(0);
            }
            Slot { key, weights: weights.clone(), state: State::New }
        }
    };
    if slot.weights != weights {
        // new weights: the old graph reads buffers that are no longer the model's; it is
        // dropped here, before anything runs
        if matches!(slot.state, State::Graph { .. }) {
            COUNTERS.invalidated.fetch_add(1, Ordering::Relaxed);
        }
        slot = Slot { key: slot.key, weights, state: State::New };
    }
    let out = solve(&mut slot, f, x0, t0, t1, steps, solver);
    all.push(slot);
    out
}

#[allow(clippy::too_many_arguments)]
fn solve(slot: &mut Slot, f: &mut dyn FnMut(f32, &Tensor) -> Result<Tensor>, x0: &Tensor, t0: f32, t1: f32, steps: usize, solver: &OdeSolver) -> Result<(Tensor, OdeStats)> {
    match &slot.state {
        State::New | State::Eager => {
            if matches!(slot.state, State::New) {
                COUNTERS.eager.fetch_add(1, Ordering::Relaxed);
            }
            let r = fixed_grid(f, x0, t0, t1, steps, solver, true)?;
            if matches!(slot.state, State::New) {
                slot.state = State::Warm;
            }
            Ok(r)
        }
        State::Warm => {
            // eager from the static input, the result read back and dropped: the cache then
            // holds every block the solve needs, and the capture follows at once
            COUNTERS.eager.fetch_add(1, Ordering::Relaxed);
            let input = Tensor::full_on(x0.shape(), 0.0, x0.dtype(), x0.device())?;
            input.copy_values_from(x0)?;
            let (y, stats) = fixed_grid(f, &input, t0, t1, steps, solver, true)?;
            let host = y.to_device(Device::Cpu)?;
            drop(y);
            // an error inside abandons the capture
            let captured = capture(x0.device(), || Ok(fixed_grid(f, &input, t0, t1, steps, solver, false)?.0));
            slot.state = match captured {
                Ok((graph, output)) => {
                    COUNTERS.captures.fetch_add(1, Ordering::Relaxed);
                    State::Graph { graph, input, output }
                }
                Err(e) => {
                    COUNTERS.refused.fetch_add(1, Ordering::Relaxed);
                    eprintln!("note: sampling {:?} with {} × {steps} on {} without a CUDA graph: {e:#}", slot.key.shape, slot.key.device, solver.name());
                    State::Eager
                }
            };
            Ok((host.to_device(x0.device())?, stats))
        }
        State::Graph { graph, input, output } => {
            // the static input belongs to its slot alone (no other storage shares it)
            input.copy_values_from(x0)?;
            graph.replay().context("replaying the sampler's CUDA graph")?;
            // a copy: the next replay overwrites the static output
            let y = output.duplicate_on_device()?;
            if !Tensor::sum_squares(&[&y])?.is_finite() {
                // the eager solve names the time the state went non-finite
                return fixed_grid(f, x0, t0, t1, steps, solver, true);
            }
            COUNTERS.replays.fetch_add(1, Ordering::Relaxed);
            Ok((y, OdeStats { nfe: nfe(solver, steps), steps, rejected: 0 }))
        }
    }
}
