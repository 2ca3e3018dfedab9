//! CUDA graphs: a piece of work on the GPU's stream, captured once and replayed.
//!
//! [`Gpu::begin_capture`] puts the stream in capture mode (the driver's `cuStreamBeginCapture_v2`,
//! thread-local mode) and returns a [`Capture`]; the work queued from then on by the capturing
//! thread (kernels, cuBLAS and cuDNN calls, device-to-device copies) is recorded, not run;
//! [`Capture::end`] instantiates it as a [`Graph`] (`cuStreamEndCapture`,
//! `cuGraphInstantiateWithFlags`), and [`Graph::replay`] launches it (`cuGraphLaunch`). A graph
//! replays the very launches that were captured: the same kernels with the same argument values
//! (device addresses, sizes, scalars) on the same buffers. Whatever changes between replays must
//! therefore live in device memory that the graph reads (its static inputs), written before the
//! replay.
//!
//! Memory. While a capture runs, allocations never reach the driver: they are served from blocks
//! the capture freed, then from the pool's cache; a capture that would need a fresh block is
//! refused. Every block handed out (or freed) during the capture belongs to the graph: it is
//! kept, and not reused by eager work, until the graph is dropped (`pool.rs`), so the addresses
//! that the graph's nodes hold stay the graph's. Buffers that the graph reads but did not
//! allocate (parameters, its static inputs) are the caller's to keep alive and unchanged in
//! address: a graph over a model's weights is only valid while those weight buffers live.
//!
//! Refused during a capture, with an error naming the operation (the driver would invalidate the
//! capture, or the captured work would be wrong): a fresh driver allocation, a host-to-device or
//! device-to-host copy, a stream synchronisation, a replay of another graph, and (on a real GPU)
//! work from another thread. A refused capture ends with an error at [`Capture::end`]; dropping
//! a [`Capture`] without ending it abandons it; either way the GPU is usable afterwards and the
//! capture's memory returns to the cache.
//!
//! The cached graphs of the sampler (`flow::ode_graph`) and of the training step
//! (`orw::step_graph`) capture through [`Gpu::capture`] and count their slots' events (eager
//! warm-ups, captures, replays, refusals, invalidations) in a [`GraphCounters`].
//!
//! The simulated GPU emulates this: during a capture the capturing thread's kernel launches
//! (name, shape and a copy of every argument's value), GEMMs and device copies are recorded
//! instead of run, the same refusals apply, and a replay runs the list in order. Another thread's
//! work on the simulated GPU runs as usual (there is no shared stream to join), so that tests
//! running in parallel do not disturb each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use anyhow::{Context, Result, anyhow, bail};

use super::gemm::CublasCall;
use super::gpu::{Gpu, Launch};

/// One recorded operation of a simulated capture.
pub(crate) enum SimOp {
    /// a kernel launch: the argument values, each in 8-byte words (CUDA copies them at launch)
    Kernel {
        name: String,
        cfg: Launch,
        args: Vec<Vec<u64>>,
    },
    Gemm(CublasCall),
    /// a device-to-device copy of `bytes`
    Copy {
        dst: u64,
        src: u64,
        bytes: usize,
    },
}

/// The state of a running capture.
pub(crate) struct CaptureState {
    pub id: u64,
    pub thread: ThreadId,
    /// the first operation refused during the capture
    pub refused: Option<String>,
    /// the simulated GPU's recording
    pub ops: Vec<SimOp>,
}

static GRAPH_IDS: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_graph_id() -> u64 {
    GRAPH_IDS.fetch_add(1, Ordering::Relaxed)
}

/// A running capture on one GPU; end it with [`Capture::end`] (dropping it abandons it).
pub struct Capture {
    gpu: Arc<Gpu>,
    id: u64,
    done: bool,
}

impl Capture {
    pub(crate) fn new(gpu: Arc<Gpu>, id: u64) -> Capture {
        Capture { gpu, id, done: false }
    }

    /// The graph's id (its memory is accounted under it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// End the capture and instantiate the graph; an error when an operation was refused during
    /// the capture (its message names it) or the driver could not build the graph.
    pub fn end(mut self) -> Result<Graph> {
        self.done = true;
        let gpu = self.gpu.clone();
        let id = self.id;
        match gpu.finish_capture(id) {
            Ok(exec) => Ok(Graph { gpu, id, exec: Mutex::new(exec) }),
            Err(e) => {
                gpu.release_graph_memory(id);
                Err(e)
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if !self.done {
            // abandoned (an error inside the captured work): end the driver's capture, discard
            // what was recorded, give the memory back
            let _ = self.gpu.finish_capture(self.id);
            self.gpu.release_graph_memory(self.id);
        }
    }
}

/// An instantiated graph.
pub(crate) enum GraphExec {
    Cuda(CudaGraphHandle),
    Sim(Vec<SimOp>),
}

/// cudarc's graph, which is not `Send`: every use of it goes through the [`Graph`]'s lock.
pub(crate) struct CudaGraphHandle(pub cudarc::driver::CudaGraph);
// SAFETY: the graph and its instantiation are only touched under `Graph::exec`'s mutex (launch)
// or on drop, never from two threads at once, as the CUDA docs require
unsafe impl Send for CudaGraphHandle {}

/// A captured graph, replayable on its GPU's stream. Dropping it frees the instantiation and
/// returns the graph's memory to the pool's cache.
pub struct Graph {
    gpu: Arc<Gpu>,
    id: u64,
    exec: Mutex<GraphExec>,
}

impl Graph {
    /// Queue the captured work once more on the stream (asynchronous on a real GPU, like any op).
    pub fn replay(&self) -> Result<()> {
        if self.gpu.capturing_here().is_some() {
            bail!("replaying a CUDA graph during another capture on cuda:{} is not supported", self.gpu.ordinal);
        }
        let exec = self.exec.lock().unwrap_or_else(|e| e.into_inner());
        match &*exec {
            GraphExec::Cuda(g) => {
                self.gpu.bind()?;
                g.0.launch().map_err(|e| anyhow!("cuGraphLaunch on cuda:{}: {e}", self.gpu.ordinal))?;
                if std::env::var_os("ORWCFM_CUDA_SYNC").is_some() {
                    self.gpu.sync().context("after a graph replay")?;
                }
                Ok(())
            }
            GraphExec::Sim(ops) => {
                for op in ops {
                    self.gpu.run_sim_op(op)?;
                }
                Ok(())
            }
        }
    }

    /// Operations recorded (the simulated GPU; a real GPU's graph reports `None`).
    pub fn recorded_ops(&self) -> Option<usize> {
        match &*self.exec.lock().unwrap_or_else(|e| e.into_inner()) {
            GraphExec::Cuda(_) => None,
            GraphExec::Sim(ops) => Some(ops.len()),
        }
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // the instantiation first (a real GPU: after the replays queued on the stream, which
        // cuGraphExecDestroy waits for), then the memory
        let exec = std::mem::replace(self.exec.get_mut().unwrap_or_else(|e| e.into_inner()), GraphExec::Sim(Vec::new()));
        if let GraphExec::Cuda(_) = &exec {
            // the blocks go back to the cache, where eager work may take them at once: the
            // replays already queued must have finished reading and writing them
            let _ = self.gpu.sync();
        }
        drop(exec);
        self.gpu.release_graph_memory(self.id);
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph(cuda:{}, #{})", self.gpu.ordinal, self.id)
    }
}

impl Gpu {
    /// `work` captured as a graph ([`Gpu::begin_capture`], `work`, [`Capture::end`]), with what
    /// `work` returned (the graph's static outputs); an error from `work` drops the capture,
    /// which abandons it.
    pub fn capture<T>(self: &Arc<Self>, work: impl FnOnce() -> Result<T>) -> Result<(Graph, T)> {
        let cap = self.begin_capture()?;
        let out = work()?;
        Ok((cap.end()?, out))
    }
}

/// An argument's value as 8-byte words (a copy: the recording outlives the caller's values).
pub(crate) fn arg_words(p: *const std::ffi::c_void, bytes: usize) -> Vec<u64> {
    let mut w = vec![0u64; bytes.div_ceil(8).max(1)];
    // SAFETY: `p` points at a live value of `bytes` bytes (a kernel parameter), `w` holds them
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, w.as_mut_ptr() as *mut u8, bytes) };
    w
}
