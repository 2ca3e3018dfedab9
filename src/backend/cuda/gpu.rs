//! One open GPU: its context, the one stream every op runs on, the caching allocator, the
//! kernels (compiled by NVRTC for this GPU's architecture, cached on disk), a cuBLAS handle with
//! TF32 off unless asked for, and a cuDNN handle when libcudnn is present.
//!
//! GPUs are opened once per process ([`gpu`]) and live until it exits.
//!
//! CUDA graphs: [`Gpu::begin_capture`] (see `graph.rs`). The cuBLAS handle gets a fixed
//! workspace when the GPU opens (`cublasSetWorkspace_v2`), which is what makes its calls
//! capturable.
//!
//! Testing hook: [`Gpu::fail_alloc_after`] (or `ORWCFM_CUDA_FAIL_ALLOC_AFTER=N` in the
//! environment when a GPU opens) makes the N-th following allocation fail as out of memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result, anyhow, bail};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::gemm::CublasCall;
use super::graph::{Capture, CaptureState, CudaGraphHandle, GraphExec, SimOp, arg_words, next_graph_id};
use super::nvrtc;
use super::pool::{Pool, PoolStats, RawAlloc};

/// The cuBLAS workspace set on the handle (as PyTorch does for Hopper: 32 MiB): with it cuBLAS
/// never allocates, so its calls can be captured in a CUDA graph.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

static ALLOW_TF32: AtomicBool = AtomicBool::new(false);

/// Allow TF32 tensor cores in f32 GEMMs and convolutions (10-bit mantissa products: faster, and
/// no longer within 1e-5 of the CPU). Takes effect for GPUs opened afterwards. Off by default.
pub fn set_allow_tf32(on: bool) {
    ALLOW_TF32.store(on, Ordering::SeqCst);
}

/// Whether TF32 is allowed: [`set_allow_tf32`], or `ORWCFM_ALLOW_TF32=1` in the environment.
pub fn allow_tf32() -> bool {
    ALLOW_TF32.load(Ordering::SeqCst) || std::env::var("ORWCFM_ALLOW_TF32").is_ok_and(|v| v == "1")
}

/// The pool's source of memory: the driver, or host memory for the simulated GPU.
pub enum DriverAlloc {
    Driver(Arc<CudaContext>),
    Host,
}

const HOST_ALIGN: usize = 256;

impl RawAlloc for DriverAlloc {
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        match self {
            DriverAlloc::Driver(ctx) => {
                ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
                // SAFETY: a plain allocation; the pool owns the pointer until it frees it
                unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(|e| anyhow!("cuMemAlloc of {bytes} bytes failed: {e}"))
            }
            DriverAlloc::Host => {
                let layout = std::alloc::Layout::from_size_align(bytes.max(1), HOST_ALIGN)?;
                // SAFETY: a non-zero size
                let p = unsafe { std::alloc::alloc(layout) };
                if p.is_null() {
                    bail!("out of host memory for {bytes} bytes");
                }
                Ok(p as u64)
            }
        }
    }
    fn free(&mut self, ptr: u64, bytes: usize) {
        match self {
            DriverAlloc::Driver(ctx) => {
                if ctx.bind_to_thread().is_ok() {
                    // SAFETY: `ptr` came from malloc_sync and no buffer refers to it any more
                    let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
                }
            }
            DriverAlloc::Host => {
                // SAFETY: allocated above with this size class and alignment
                unsafe { std::alloc::dealloc(ptr as *mut u8, std::alloc::Layout::from_size_align_unchecked(bytes.max(1), HOST_ALIGN)) }
            }
        }
    }
}

/// A kernel argument.
#[derive(Clone, Copy)]
pub enum Arg<'a> {
    Ptr(u64),
    I64(i64),
    F32(f32),
    U32(u32),
    Struct(&'a dyn PushStruct),
}

/// The variable that arms [`Gpu::fail_alloc_after`] when a GPU opens.
pub const FAIL_ALLOC_VAR: &str = "ORWCFM_CUDA_FAIL_ALLOC_AFTER";

/// A launch's shape: a 3-D grid of 3-D blocks and the dynamic shared memory of each block (the
/// size of the kernel's `extern __shared__` array, in bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
    /// The kernel is correct for any power-of-two block size (the grid-stride and block-per-row
    /// kernels): the simulated GPU then runs blocks of at most 8 threads, which keeps its OS
    /// threads few. Otherwise it runs the block as asked.
    pub any_block: bool,
}

impl Launch {
    /// A 1-D grid of 1-D blocks, no dynamic shared memory.
    pub fn linear(grid: u32, block: u32) -> Launch {
        Launch { grid: (grid, 1, 1), block: (block, 1, 1), shared_bytes: 0, any_block: false }
    }
    /// A 3-D grid of 3-D blocks, no dynamic shared memory.
    pub fn dims(grid: (u32, u32, u32), block: (u32, u32, u32)) -> Launch {
        Launch { grid, block, shared_bytes: 0, any_block: false }
    }
    /// The same with `bytes` of dynamic shared memory per block.
    pub fn with_shared(self, bytes: u32) -> Launch {
        Launch { shared_bytes: bytes, ..self }
    }
    /// Marks the kernel as correct for any power-of-two block size (see [`Launch::any_block`]).
    pub fn any_block(self) -> Launch {
        Launch { any_block: true, ..self }
    }
    pub fn threads_per_block(&self) -> u64 {
        self.block.0 as u64 * self.block.1 as u64 * self.block.2 as u64
    }
    fn check(&self, name: &str) -> Result<()> {
        let (g, b) = (self.grid, self.block);
        if [g.0, g.1, g.2, b.0, b.1, b.2].contains(&0) {
            bail!("launching {name}: an empty grid or block ({self:?})");
        }
        if self.threads_per_block() > 1024 || g.1 > 65_535 || g.2 > 65_535 || b.2 > 64 {
            bail!("launching {name}: {self:?} exceeds CUDA's limits (1024 threads a block, grid y/z ≤ 65535, block z ≤ 64)");
        }
        Ok(())
    }
}

/// A `#[repr(C)]` struct passed to a kernel by value.
pub trait PushStruct {
    fn push<'b>(&'b self, b: &mut cudarc::driver::LaunchArgs<'b>);
    /// Its address (a kernel parameter in CUDA's `void**` form).
    fn raw(&self) -> *const std::ffi::c_void;
    /// Its size in bytes (what a graph capture copies).
    fn size(&self) -> usize;
}

impl<T: DeviceRepr> PushStruct for T {
    fn push<'b>(&'b self, b: &mut cudarc::driver::LaunchArgs<'b>) {
        b.arg(self);
    }
    fn raw(&self) -> *const std::ffi::c_void {
        self as *const T as *const std::ffi::c_void
    }
    fn size(&self) -> usize {
        std::mem::size_of::<T>()
    }
}

struct Handle<T>(T);
// SAFETY: the cuBLAS/cuDNN handles are used under the one stream, from one thread at a time (ops
// take the `exec` lock)
unsafe impl<T> Send for Handle<T> {}
unsafe impl<T> Sync for Handle<T> {}

/// The driver-side parts of a real GPU.
struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    /// per kernel, the dynamic shared memory past 48 KiB it has been allowed (set once, not per launch)
    shared_opt_in: Mutex<HashMap<String, u32>>,
    blas: Handle<cudarc::cublas::sys::cublasHandle_t>,
    cudnn: Option<Handle<cudarc::cudnn::sys::cudnnHandle_t>>,
}

enum Engine {
    Cuda(Cuda),
    /// the CPU stand-in of `sim.rs`
    Sim(super::sim::Sim),
}

/// An open GPU (or, in tests without one, the simulated GPU of `sim.rs`).
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// `sm_XY`, what the kernels were compiled for
    pub arch: String,
    pub tf32: bool,
    /// whether every kernel file came from the disk cache
    pub kernels_cached: bool,
    engine: Engine,
    pool: Mutex<Pool<DriverAlloc>>,
    /// serialises the library calls that share handles and workspaces
    pub(crate) exec: Mutex<()>,
    pub(crate) conv_cache: Mutex<HashMap<(crate::backend::geom::ConvGeom, crate::tensor::DType), Option<super::conv::ConvPlan>>>,
    /// fill every new buffer with NaN (tests: an output element a kernel forgets stays NaN)
    poison: AtomicBool,
    /// the running graph capture, if any (`graph.rs`)
    capture: Mutex<Option<CaptureState>>,
    capturing: AtomicBool,
}

static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();

/// The open GPU `ordinal`, opening it on first use (probe, kernels, handles).
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    let map = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = m.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Arc::new(if super::sim::enabled() { Gpu::open_sim(ordinal)? } else { Gpu::open(ordinal)? });
    m.insert(ordinal, g.clone());
    Ok(g)
}

fn env_fail_alloc() -> Option<usize> {
    std::env::var(FAIL_ALLOC_VAR).ok().and_then(|v| v.trim().parse().ok())
}

fn cublas_ok(s: cudarc::cublas::sys::cublasStatus_t, what: &str) -> Result<()> {
    if s != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("cuBLAS {what} failed: {s:?}");
    }
    Ok(())
}

pub(crate) fn cudnn_ok(s: cudarc::cudnn::sys::cudnnStatus_t, what: &str) -> Result<()> {
    if s != cudarc::cudnn::sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        bail!("cuDNN {what} failed: {s:?}");
    }
    Ok(())
}

impl Gpu {
    fn open(ordinal: usize) -> Result<Gpu> {
        let info = super::probe(ordinal)?;
        let libs = &info.libraries;
        if !libs.nvrtc {
            bail!(
                "cuda:{ordinal} ({}) needs NVRTC (libnvrtc.so.13) to compile its kernels: install the CUDA 13 toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` and name its folder in {}",
                info.name,
                super::LIB_DIRS_VAR
            );
        }
        if !libs.cublas {
            bail!("cuda:{ordinal} ({}) needs cuBLAS (libcublas.so.13): install the CUDA 13 toolkit or `pip install nvidia-cublas` and name its folder in {}", info.name, super::LIB_DIRS_VAR);
        }
        // TF32: cuBLAS' default math never uses it for SGEMM, and the cuDNN descriptors get
        // FMA math unless it is allowed
        let tf32 = allow_tf32();
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open cuda:{ordinal}: {e}"))?;
        // one stream, this GPU's own (not the legacy default stream, which synchronises with
        // every other blocking stream of the context): no cross-stream events are needed
        // SAFETY: every buffer is used on `stream` only
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| anyhow!("cannot create a stream on cuda:{ordinal}: {e}"))?;
        let (maj, min) = info.compute_capability;
        let arch = format!("sm_{maj}{min}");
        let mut funcs = HashMap::new();
        let mut all_cached = true;
        for (file, src) in nvrtc::KERNEL_SOURCES {
            let (cubin, cached) = nvrtc::compile_cached(file, src, &arch).with_context(|| format!("compiling kernels/{file} for {arch}"))?;
            all_cached &= cached;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(|e| anyhow!("loading kernels/{file} on cuda:{ordinal}: {e}"))?;
            // a kernel left out by its source's #if (the f16 ones without cuda_fp16.h) is simply
            // absent: launching it says so
            for k in nvrtc::kernel_names(src) {
                if let Ok(f) = module.load_function(&k) {
                    funcs.insert(k, f);
                }
            }
        }
        ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        let blas = cudarc::cublas::result::create_handle().map_err(|e| anyhow!("cuBLAS handle: {e:?}"))?;
        use cudarc::cublas::sys as cb;
        // SAFETY: a fresh handle and the context's live stream
        unsafe {
            cublas_ok(cb::cublasSetStream_v2(blas, stream.cu_stream() as _), "set stream")?;
            let mode = if tf32 { cb::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { cb::cublasMath_t::CUBLAS_DEFAULT_MATH };
            cublas_ok(cb::cublasSetMathMode(blas, mode), "set math mode")?;
            // a fixed workspace (held for the life of the process, as the GPU is): cuBLAS then
            // allocates nothing per call, which graph capture needs
            let ws = cudarc::driver::result::malloc_sync(CUBLAS_WORKSPACE_BYTES).map_err(|e| anyhow!("cuBLAS workspace of {CUBLAS_WORKSPACE_BYTES} bytes on cuda:{ordinal}: {e}"))?;
            cublas_ok(cb::cublasSetWorkspace_v2(blas, ws as *mut std::ffi::c_void, CUBLAS_WORKSPACE_BYTES), "set workspace")?;
        }
        let conv_mode = std::env::var("ORWCFM_CONV").unwrap_or_default();
        let cudnn = if libs.cudnn && conv_mode != "gemm" {
            use cudarc::cudnn::sys as cd;
            let mut h: cd::cudnnHandle_t = std::ptr::null_mut();
            // SAFETY: out-pointer to a handle, then the context's stream
            unsafe {
                cudnn_ok(cd::cudnnCreate(&mut h), "create")?;
                cudnn_ok(cd::cudnnSetStream(h, stream.cu_stream() as _), "set stream")?;
            }
            Some(Handle(h))
        } else {
            if conv_mode == "cudnn" {
                bail!("ORWCFM_CONV=cudnn, but cuDNN (libcudnn.so.9) cannot be loaded: `pip install nvidia-cudnn-cu13` and name its folder in {}", super::LIB_DIRS_VAR);
            }
            None
        };
        let mut pool = Pool::new(DriverAlloc::Driver(ctx.clone()));
        pool.fail_alloc_after(env_fail_alloc());
        let pool = Mutex::new(pool);
        Ok(Gpu {
            ordinal,
            name: info.name,
            compute_capability: info.compute_capability,
            arch,
            tf32,
            kernels_cached: all_cached,
            engine: Engine::Cuda(Cuda { ctx, stream, funcs, shared_opt_in: Mutex::new(HashMap::new()), blas: Handle(blas), cudnn }),
            pool,
            exec: Mutex::new(()),
            conv_cache: Mutex::new(HashMap::new()),
            poison: AtomicBool::new(std::env::var_os("ORWCFM_CUDA_POISON").is_some()),
            capture: Mutex::new(None),
            capturing: AtomicBool::new(false),
        })
    }

    /// The simulated GPU of `sim.rs`: host memory, kernels through the C++ shim.
    fn open_sim(ordinal: usize) -> Result<Gpu> {
        let sim = super::sim::Sim::build()?;
        let mut pool = Pool::new(DriverAlloc::Host);
        pool.fail_alloc_after(env_fail_alloc());
        Ok(Gpu {
            ordinal,
            name: "simulated GPU (the kernels on the CPU)".into(),
            compute_capability: (0, 0),
            arch: "sim".into(),
            tf32: false,
            kernels_cached: false,
            engine: Engine::Sim(sim),
            pool: Mutex::new(pool),
            exec: Mutex::new(()),
            conv_cache: Mutex::new(HashMap::new()),
            poison: AtomicBool::new(std::env::var_os("ORWCFM_CUDA_POISON").is_some()),
            capture: Mutex::new(None),
            capturing: AtomicBool::new(false),
        })
    }

    /// Whether this is the simulated GPU.
    pub fn is_sim(&self) -> bool {
        matches!(self.engine, Engine::Sim(_))
    }

    fn cuda(&self) -> Option<&Cuda> {
        match &self.engine {
            Engine::Cuda(c) => Some(c),
            Engine::Sim(_) => None,
        }
    }

    pub fn bind(&self) -> Result<()> {
        match self.cuda() {
            Some(c) => c.ctx.bind_to_thread().map_err(|e| anyhow!("cuda:{}: {e}", self.ordinal)),
            None => Ok(()),
        }
    }

    fn cu_stream(&self) -> cudarc::driver::sys::CUstream {
        self.cuda().expect("a real GPU").stream.cu_stream()
    }

    /// The cuBLAS handle (a real GPU only: the simulated one runs GEMMs in `sim::gemm`).
    pub fn blas(&self) -> cudarc::cublas::sys::cublasHandle_t {
        self.cuda().expect("cuBLAS on a real GPU").blas.0
    }

    pub fn cudnn(&self) -> Option<cudarc::cudnn::sys::cudnnHandle_t> {
        self.cuda().and_then(|c| c.cudnn.as_ref().map(|h| h.0))
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).stats()
    }

    /// Give cached blocks back to the driver.
    pub fn trim(&self) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).trim();
    }

    /// Wait for all queued work; surfaces asynchronous kernel errors.
    pub fn sync(&self) -> Result<()> {
        self.refuse_in_capture(|| "a stream synchronisation".into())?;
        match self.cuda() {
            Some(c) => c.stream.synchronize().map_err(|e| anyhow!("cuda:{}: {e}", self.ordinal)),
            None => Ok(()),
        }
    }

    /// Uninitialised room for `n` 32-bit words (f32 values; at least one word is reserved). Out
    /// of device memory (after the pool released its cache) is an error.
    pub fn alloc(self: &Arc<Self>, n: usize) -> Result<GpuBuf> {
        let (ptr, class) = match self.capturing_here() {
            Some(id) => {
                let got = self.pool.lock().unwrap_or_else(|e| e.into_inner()).alloc_captured(n.max(1) * 4, id);
                got.map_err(|e| self.refused(&format!("{e}")))?
            }
            None => self.pool.lock().unwrap_or_else(|e| e.into_inner()).alloc(n.max(1) * 4).with_context(|| format!("out of memory on cuda:{} ({} bytes requested)", self.ordinal, n.max(1) * 4))?,
        };
        let b = GpuBuf { gpu: self.clone(), ptr, len: n, class, id: BUF_IDS.fetch_add(1, Ordering::Relaxed) };
        if self.poison.load(Ordering::Relaxed) && n > 0 {
            self.launch_n("fill_f32", n, &[Arg::Ptr(ptr), Arg::F32(f32::NAN), Arg::I64(n as i64)])?;
        }
        Ok(b)
    }

    /// Testing hook: make the `n`-th following allocation on this GPU (`Some(1)`: the next one)
    /// fail with an out-of-memory error, once, as if the driver refused it (the pool releases
    /// its cache and retries, and the retry is refused too). `None` cancels it. Also armed by
    /// `ORWCFM_CUDA_FAIL_ALLOC_AFTER=N` when the GPU opens (for CLI tests).
    pub fn fail_alloc_after(&self, n: Option<usize>) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).fail_alloc_after(n);
    }

    /// Fill every buffer allocated from now on with NaN (also `ORWCFM_CUDA_POISON=1`): a test
    /// then sees any output element that an op leaves unwritten.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Host values to a new device buffer.
    pub fn upload(self: &Arc<Self>, data: &[f32]) -> Result<GpuBuf> {
        self.upload_slice(data)
    }

    /// Plain host values (f32, u16 words of f16/bf16, i32, …) to a new device buffer of
    /// `ceil(bytes / 4)` words.
    pub fn upload_slice<T: DeviceRepr + bytemuck::Pod>(self: &Arc<Self>, data: &[T]) -> Result<GpuBuf> {
        let bytes = std::mem::size_of_val(data);
        self.refuse_in_capture(|| format!("a host-to-device copy (upload of {bytes} bytes)"))?;
        let b = self.alloc(bytes.div_ceil(4))?;
        if self.is_sim() {
            // SAFETY: `b` holds at least `bytes` bytes of host memory
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, b.ptr as *mut u8, bytes) };
            return Ok(b);
        }
        if !data.is_empty() {
            self.bind()?;
            // SAFETY: `b` holds at least `bytes` bytes; pageable memory is staged before return
            unsafe { cudarc::driver::result::memcpy_htod_async(b.ptr, data, self.cu_stream()) }.map_err(|e| anyhow!("copy to cuda:{}: {e}", self.ordinal))?;
        }
        Ok(b)
    }

    /// 32-bit integers (indices) to a device buffer.
    pub fn upload_i32(self: &Arc<Self>, data: &[i32]) -> Result<GpuBuf> {
        self.upload_slice(data)
    }

    /// A device buffer's values to the host (waits for queued work).
    pub fn download(&self, b: &GpuBuf) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; b.len];
        self.download_into(b, &mut out)?;
        Ok(out)
    }

    /// The first `out.len()` values of a device buffer (read as `T`) into `out` (waits for
    /// queued work).
    pub fn download_into<T: DeviceRepr + bytemuck::Pod>(&self, b: &GpuBuf, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes > b.len * 4 {
            bail!("copy from cuda:{}: {bytes} bytes asked of a buffer of {} words", self.ordinal, b.len);
        }
        self.refuse_in_capture(|| format!("a device-to-host copy (download of {bytes} bytes)"))?;
        if self.is_sim() {
            // SAFETY: `b` holds at least `bytes` bytes of host memory
            unsafe { std::ptr::copy_nonoverlapping(b.ptr as *const u8, out.as_mut_ptr() as *mut u8, bytes) };
            return Ok(());
        }
        if bytes > 0 {
            self.bind()?;
            // SAFETY: `b` holds at least `bytes` bytes written by earlier work on this stream
            unsafe { cudarc::driver::result::memcpy_dtoh_async(out, b.ptr, self.cu_stream()) }.map_err(|e| anyhow!("copy from cuda:{}: {e}", self.ordinal))?;
        }
        self.sync()
    }

    /// `out.len()` values (read as `T`) from the device address `ptr`, which must lie in a live
    /// buffer holding them (a storage's view; waits for queued work).
    pub fn download_from<T: DeviceRepr + bytemuck::Pod>(&self, ptr: u64, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        self.refuse_in_capture(|| format!("a device-to-host copy (download of {bytes} bytes)"))?;
        if self.is_sim() {
            // SAFETY: the caller's view holds at least `bytes` bytes of host memory from `ptr`
            unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, out.as_mut_ptr() as *mut u8, bytes) };
            return Ok(());
        }
        if bytes > 0 {
            self.bind()?;
            // SAFETY: the caller's view holds at least `bytes` bytes written by earlier work on this stream
            unsafe { cudarc::driver::result::memcpy_dtoh_async(out, ptr, self.cu_stream()) }.map_err(|e| anyhow!("copy from cuda:{}: {e}", self.ordinal))?;
        }
        self.sync()
    }

    /// A new buffer holding a device copy of the `n` words at `ptr` (in a live buffer).
    pub fn copy_words(self: &Arc<Self>, ptr: u64, n: usize) -> Result<GpuBuf> {
        let out = self.alloc(n)?;
        self.copy_into(out.ptr, ptr, n)?;
        Ok(out)
    }

    /// A device copy of a buffer.
    pub fn duplicate(self: &Arc<Self>, b: &GpuBuf) -> Result<GpuBuf> {
        self.copy_words(b.ptr, b.len)
    }

    /// Copy `n` words from the device address `src` to `dst` (both in live buffers holding them,
    /// not overlapping), queued on the stream (recorded during a capture).
    pub fn copy_into(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if self.is_sim() {
            if self.record(|| SimOp::Copy { dst, src, bytes: n * 4 }) {
                return Ok(());
            }
            // SAFETY: the caller's views hold `n` words of host memory each
            unsafe { std::ptr::copy_nonoverlapping(src as *const f32, dst as *mut f32, n) };
            return Ok(());
        }
        self.check_capture_thread("a device copy")?;
        self.bind()?;
        // SAFETY: both hold `n` words
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, n * 4, self.cu_stream()) }.map_err(|e| anyhow!("device copy on cuda:{}: {e}", self.ordinal))
    }

    // ------------------------------------------------------------------------ graph capture

    /// Start capturing this thread's work on the stream into a CUDA graph (`graph.rs`): from
    /// now until [`Capture::end`], launches, GEMMs and device copies are recorded instead of
    /// run, and allocations are served from the pool's cache (owned by the graph).
    pub fn begin_capture(self: &Arc<Self>) -> Result<Capture> {
        let mut st = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        if st.is_some() {
            bail!("cuda:{} is already capturing a CUDA graph", self.ordinal);
        }
        let id = next_graph_id();
        if let Some(c) = self.cuda() {
            c.stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| anyhow!("cuStreamBeginCapture on cuda:{}: {e}", self.ordinal))?;
        }
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).begin_capture(id);
        *st = Some(CaptureState { id, thread: std::thread::current().id(), refused: None, ops: Vec::new() });
        self.capturing.store(true, Ordering::SeqCst);
        Ok(Capture::new(self.clone(), id))
    }

    /// Whether a graph capture is running (on any thread).
    pub fn is_capturing(&self) -> bool {
        self.capturing.load(Ordering::SeqCst)
    }

    /// The id of the capture that this thread is running, if any.
    pub(crate) fn capturing_here(&self) -> Option<u64> {
        if !self.capturing.load(Ordering::SeqCst) {
            return None;
        }
        let st = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        st.as_ref().filter(|c| c.thread == std::thread::current().id()).map(|c| c.id)
    }

    /// Mark the running capture as refused (the first reason is kept) and return the error.
    fn refused(&self, what: &str) -> anyhow::Error {
        let mut st = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = st.as_mut()
            && c.refused.is_none()
        {
            c.refused = Some(what.to_string());
        }
        anyhow!("{what} during CUDA graph capture on cuda:{}: refused (CUDA would invalidate the capture)", self.ordinal)
    }

    /// An error when this thread is capturing (or, on a real GPU, when any thread is: the one
    /// stream is capturing) and `what` is not capturable.
    fn refuse_in_capture(&self, what: impl FnOnce() -> String) -> Result<()> {
        if !self.capturing.load(Ordering::SeqCst) {
            return Ok(());
        }
        if self.is_sim() && self.capturing_here().is_none() {
            return Ok(());
        }
        Err(self.refused(&what()))
    }

    /// On a real GPU, work queued from another thread than the capturing one would join the
    /// capture: refused.
    fn check_capture_thread(&self, what: &str) -> Result<()> {
        if self.capturing.load(Ordering::SeqCst) && self.capturing_here().is_none() {
            bail!("{what} on cuda:{} from another thread while a CUDA graph is being captured: refused", self.ordinal);
        }
        Ok(())
    }

    /// Record a simulated operation when this thread is capturing (true), else leave it to run.
    fn record(&self, op: impl FnOnce() -> SimOp) -> bool {
        if !self.capturing.load(Ordering::SeqCst) {
            return false;
        }
        let mut st = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        match st.as_mut() {
            Some(c) if c.thread == std::thread::current().id() => {
                c.ops.push(op());
                true
            }
            _ => false,
        }
    }

    /// End the running capture `id`: the instantiated graph, or the reason it was refused.
    pub(crate) fn finish_capture(&self, id: u64) -> Result<GraphExec> {
        let st = {
            let mut st = self.capture.lock().unwrap_or_else(|e| e.into_inner());
            if st.as_ref().is_none_or(|c| c.id != id) {
                bail!("cuda:{}: capture {id} is not running", self.ordinal);
            }
            self.capturing.store(false, Ordering::SeqCst);
            st.take().expect("checked")
        };
        let exec = match self.cuda() {
            Some(c) => {
                let g = c.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
                match (g, &st.refused) {
                    (_, Some(why)) => bail!("the CUDA graph capture on cuda:{} was refused: {why}", self.ordinal),
                    (Err(e), None) => bail!("cuStreamEndCapture/cuGraphInstantiate on cuda:{}: {e}", self.ordinal),
                    (Ok(None), None) => bail!("cuStreamEndCapture on cuda:{} returned no graph", self.ordinal),
                    (Ok(Some(g)), None) => GraphExec::Cuda(CudaGraphHandle(g)),
                }
            }
            None => {
                if let Some(why) = &st.refused {
                    bail!("the CUDA graph capture on cuda:{} (simulated) was refused: {why}", self.ordinal);
                }
                GraphExec::Sim(st.ops)
            }
        };
        Ok(exec)
    }

    /// Graph `id` (or its abandoned capture) is gone: its memory returns to the cache.
    pub(crate) fn release_graph_memory(&self, id: u64) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).drop_graph(id);
    }

    /// Run one recorded operation of a simulated graph.
    pub(crate) fn run_sim_op(&self, op: &SimOp) -> Result<()> {
        let Engine::Sim(sim) = &self.engine else { bail!("a simulated graph on a real GPU") };
        match op {
            SimOp::Kernel { name, cfg, args } => {
                let params: Vec<*mut std::ffi::c_void> = args.iter().map(|a| a.as_ptr() as *mut std::ffi::c_void).collect();
                sim.launch(name, *cfg, &params).with_context(|| format!("replaying {name} on cuda:{} (simulated)", self.ordinal))
            }
            SimOp::Gemm(c) => super::sim::gemm(c),
            SimOp::Copy { dst, src, bytes } => {
                // SAFETY: recorded from a copy between live buffers, which the graph keeps
                unsafe { std::ptr::copy_nonoverlapping(*src as *const u8, *dst as *mut u8, *bytes) };
                Ok(())
            }
        }
    }

    /// A GEMM on the simulated GPU: run by `sim::gemm`, or recorded during a capture.
    pub(crate) fn sim_gemm(&self, c: &CublasCall) -> Result<()> {
        if self.record(|| SimOp::Gemm(*c)) {
            return Ok(());
        }
        super::sim::gemm(c)
    }

    /// Launch kernel `name` on the stream with the shape `cfg`.
    pub fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        cfg.check(name)?;
        let cuda = match &self.engine {
            Engine::Cuda(c) => c,
            Engine::Sim(sim) => {
                // CUDA's kernelParams: the address of each argument's value
                let params: Vec<*mut std::ffi::c_void> = args
                    .iter()
                    .map(|a| match a {
                        Arg::Ptr(p) => p as *const u64 as *mut std::ffi::c_void,
                        Arg::I64(v) => v as *const i64 as *mut std::ffi::c_void,
                        Arg::F32(v) => v as *const f32 as *mut std::ffi::c_void,
                        Arg::U32(v) => v as *const u32 as *mut std::ffi::c_void,
                        Arg::Struct(s) => s.raw() as *mut std::ffi::c_void,
                    })
                    .collect();
                let sizes = args.iter().map(|a| match a {
                    Arg::Ptr(_) | Arg::I64(_) => 8,
                    Arg::F32(_) | Arg::U32(_) => 4,
                    Arg::Struct(s) => s.size(),
                });
                if self.record(|| SimOp::Kernel { name: name.to_string(), cfg, args: params.iter().zip(sizes).map(|(&p, n)| arg_words(p, n)).collect() }) {
                    return Ok(());
                }
                return sim.launch(name, cfg, &params).with_context(|| format!("launching {name} on cuda:{} (simulated)", self.ordinal));
            }
        };
        self.check_capture_thread(&format!("kernel {name}"))?;
        let f = cuda.funcs.get(name).ok_or_else(|| anyhow!("kernel {name} is not in kernels/*.cu"))?;
        if cfg.shared_bytes > 48 << 10 {
            // past 48 KiB of dynamic shared memory a kernel must opt in (sm_80: up to 163 KiB,
            // sm_90: 227 KiB); once per kernel and size, not on every launch
            let mut allowed = cuda.shared_opt_in.lock().unwrap_or_else(|e| e.into_inner());
            if allowed.get(name).is_none_or(|&b| b < cfg.shared_bytes) {
                use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, cfg.shared_bytes as i32)
                    .map_err(|e| anyhow!("launching {name} on cuda:{}: {} bytes of shared memory refused: {e}", self.ordinal, cfg.shared_bytes))?;
                allowed.insert(name.to_string(), cfg.shared_bytes);
            }
        }
        let mut b = cuda.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::Struct(s) => {
                    s.push(&mut b);
                    &mut b
                }
            };
        }
        let cfg = LaunchConfig { grid_dim: cfg.grid, block_dim: cfg.block, shared_mem_bytes: cfg.shared_bytes };
        // SAFETY: the argument list follows the kernel's signature (each wrapper in ops.rs mirrors
        // its kernel's declaration) and every pointer is a live buffer of the sizes passed
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launching {name} on cuda:{}: {e}", self.ordinal))?;
        if std::env::var_os("ORWCFM_CUDA_SYNC").is_some() && !self.is_capturing() {
            self.sync().with_context(|| format!("after kernel {name}"))?;
        }
        Ok(())
    }

    /// Launch an element-wise kernel over `n` items (grid-stride, so the grid is capped).
    pub fn launch_n(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        let block = 256u32;
        let grid = n.div_ceil(block as usize).clamp(1, 65_535) as u32;
        self.launch(name, Launch::linear(grid, block).any_block(), args)
    }

    /// Launch a block-per-row kernel over `rows` rows.
    pub fn launch_rows(&self, name: &str, rows: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, Launch::linear(rows.clamp(1, 65_535) as u32, 256).any_block(), args)
    }
}

static BUF_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// `n` f32 values in device memory from the pool; returned to the pool when dropped.
pub struct GpuBuf {
    gpu: Arc<Gpu>,
    ptr: u64,
    len: usize,
    class: usize,
    /// unique for the life of the process (an address is reused by later buffers, this is not)
    id: u64,
}

impl GpuBuf {
    /// This buffer's identity: unique in the process, unlike its address once it is freed.
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        // stream order makes immediate reuse safe: later work on the one stream runs after
        // everything already queued that reads this block
        // (a block freed during a capture, or owned by a live graph, is parked in the graph)
        let capturing = self.gpu.capturing_here();
        self.gpu.pool.lock().unwrap_or_else(|e| e.into_inner()).release_in(self.ptr, self.class, capturing);
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf(cuda:{}, {} values)", self.gpu.ordinal, self.len)
    }
}
