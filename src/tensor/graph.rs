//! Device work recorded once and replayed (CUDA graphs), at the tensor layer: the code above the
//! backends (the sampler's `flow::ode_graph`, the training step's `orw::step_graph`) captures,
//! replays and moves values into a graph's static buffers without naming a backend. The capture
//! itself, its memory and what it refuses are `backend::cuda::graph`'s.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};

use super::{Device, Storage, Tensor};
use crate::backend::cuda;

/// Recorded device work: [`DeviceGraph::replay`] runs it again on the buffers it was recorded
/// with.
pub struct DeviceGraph(cuda::Graph);

impl DeviceGraph {
    /// Run the recorded work again (on the device's stream).
    pub fn replay(&self) -> Result<()> {
        self.0.replay()
    }
    /// How many operations were recorded (the simulated GPU's count; `None` on a real one).
    pub fn recorded_ops(&self) -> Option<usize> {
        self.0.recorded_ops()
    }
}

impl std::fmt::Debug for DeviceGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether work on `device` can be recorded as a graph (CUDA devices).
pub fn records(device: Device) -> bool {
    matches!(device, Device::Cuda(_))
}

/// Record the device work that `f` does on `device` instead of running it, and return the graph
/// with `f`'s result (tensors whose memory the graph writes on every replay). An error from `f`,
/// or an operation the capture refuses (an upload, a download, a sync, a fresh driver
/// allocation), abandons the capture and is returned; the device stays usable. Only CUDA
/// devices record.
pub fn capture<R>(device: Device, f: impl FnOnce() -> Result<R>) -> Result<(DeviceGraph, R)> {
    let Device::Cuda(ordinal) = device else { bail!("graph capture needs a CUDA device, not {device}") };
    let (graph, r) = cuda::gpu(ordinal)?.capture(f)?;
    Ok((DeviceGraph(graph), r))
}

impl Tensor {
    /// The identity of the device memory holding this tensor (its buffer's unique id, the
    /// offset and the length), which a graph recorded on it depends on; `None` on the host.
    pub fn device_identity(&self) -> Option<(u64, usize, usize)> {
        match self.storage() {
            Storage::Cuda(c) => Some(c.identity()),
            Storage::Cpu(_) => None,
        }
    }

    /// Copy `src`'s values into this tensor's own device memory, in place, on the device's
    /// stream (a graph's static input: same dtype, length and device, memory that no other
    /// tensor shares).
    pub fn copy_values_from(&self, src: &Tensor) -> Result<()> {
        match (self.storage(), src.storage()) {
            (Storage::Cuda(d), Storage::Cuda(s)) if d.storage_dtype() == s.storage_dtype() && d.elements() == s.elements() && std::sync::Arc::ptr_eq(d.gpu(), s.gpu()) => {
                d.gpu().copy_into(d.ptr(), s.ptr(), cuda::storage::words(s.elements(), s.storage_dtype()))
            }
            _ => bail!("cannot copy {:?} {} on {} into the device buffer {:?} {} on {}", src.shape(), src.dtype(), src.device(), self.shape(), self.dtype(), self.device()),
        }
    }

    /// The values in fresh device memory (a graph's output is overwritten by the next replay).
    pub fn duplicate_on_device(&self) -> Result<Tensor> {
        let Storage::Cuda(c) = self.storage() else { bail!("duplicate_on_device: {:?} is on {}, not a GPU", self.shape(), self.device()) };
        let buf = c.gpu().copy_words(c.ptr(), cuda::storage::words(c.elements(), c.storage_dtype()))?;
        Ok(Tensor::from_op(Storage::Cuda(cuda::CudaStorage::new(buf, c.elements(), c.storage_dtype())?), self.shape()))
    }
}

/// Counters of one family of cached graphs (the sampler's, the training step's): the events of
/// their slots' protocol (eager warm-up, capture, replay, refusal, invalidation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// steps or solves run eagerly by the graphed path (warm-ups and the runs before a capture)
    pub eager: u64,
    /// graphs captured
    pub captures: u64,
    /// runs done by replaying a graph
    pub replays: u64,
    /// captures refused
    pub refused: u64,
    /// graphs dropped because their weights changed
    pub invalidated: u64,
}

/// The process-wide counters behind a [`GraphStats`] (one `static` per family).
pub struct GraphCounters {
    pub eager: AtomicU64,
    pub captures: AtomicU64,
    pub replays: AtomicU64,
    pub refused: AtomicU64,
    pub invalidated: AtomicU64,
}

impl GraphCounters {
    pub const fn new() -> GraphCounters {
        GraphCounters { eager: AtomicU64::new(0), captures: AtomicU64::new(0), replays: AtomicU64::new(0), refused: AtomicU64::new(0), invalidated: AtomicU64::new(0) }
    }

    pub fn stats(&self) -> GraphStats {
        GraphStats {
            eager: self.eager.load(Ordering::Relaxed),
            captures: self.captures.load(Ordering::Relaxed),
            replays: self.replays.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            invalidated: self.invalidated.load(Ordering::Relaxed),
        }
    }
}

impl Default for GraphCounters {
    fn default() -> GraphCounters {
        GraphCounters::new()
    }
}
