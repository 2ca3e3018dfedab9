//! One open GPU: its context, the one stream every op runs on, the caching allocator, the
//! kernels (compiled by NVRTC for this GPU's architecture, cached on disk), a cuBLAS handle with
//! TF32 off unless asked for, and a cuDNN handle when libcudnn is present.
//!
//! GPUs are opened once per process ([`gpu`]) and live until it exits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::nvrtc;
use super::pool::{Pool, PoolStats, RawAlloc};

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

/// The driver as the pool's source of memory.
pub struct DriverAlloc {
    ctx: Arc<CudaContext>,
}

impl RawAlloc for DriverAlloc {
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        // SAFETY: a plain allocation; the pool owns the pointer until it frees it
        unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(|e| anyhow!("cuMemAlloc of {bytes} bytes failed: {e}"))
    }
    fn free(&mut self, ptr: u64, _bytes: usize) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from malloc_sync and no buffer refers to it any more
            let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
        }
    }
}

/// A kernel argument.
#[derive(Clone, Copy)]
pub enum Arg<'a> {
    Ptr(u64),
    I64(i64),
    F32(f32),
    Struct(&'a dyn PushStruct),
}

/// A `#[repr(C)]` struct passed to a kernel by value.
pub trait PushStruct {
    fn push<'b>(&'b self, b: &mut cudarc::driver::LaunchArgs<'b>);
}

impl<T: DeviceRepr> PushStruct for T {
    fn push<'b>(&'b self, b: &mut cudarc::driver::LaunchArgs<'b>) {
        b.arg(self);
    }
}

struct Handle<T>(T);
// SAFETY: the cuBLAS/cuDNN handles are used under the one stream, from one thread at a time (ops
// take the `exec` lock)
unsafe impl<T> Send for Handle<T> {}
unsafe impl<T> Sync for Handle<T> {}

/// An open GPU.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// `sm_XY`, what the kernels were compiled for
    pub arch: String,
    pub tf32: bool,
    /// whether every kernel file came from the disk cache
    pub kernels_cached: bool,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: Mutex<Pool<DriverAlloc>>,
    funcs: HashMap<String, CudaFunction>,
    blas: Handle<cudarc::cublas::sys::cublasHandle_t>,
    cudnn: Option<Handle<cudarc::cudnn::sys::cudnnHandle_t>>,
    /// serialises the library calls that share handles and workspaces
    pub(crate) exec: Mutex<()>,
    pub(crate) conv_cache: Mutex<HashMap<crate::backend::cpu::conv::ConvGeom, Option<super::conv::ConvPlan>>>,
    /// fill every new buffer with NaN (tests: an output element a kernel forgets stays NaN)
    poison: AtomicBool,
}

static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();

/// The open GPU `ordinal`, opening it on first use (probe, kernels, handles).
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    let map = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = m.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Arc::new(Gpu::open(ordinal)?);
    m.insert(ordinal, g.clone());
    Ok(g)
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
            bail!("cuda:{ordinal} ({}) needs NVRTC (libnvrtc.so.13) to compile its kernels: install the CUDA 13 toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` and name its folder in {}", info.name, super::LIB_DIRS_VAR);
        }
        if !libs.cublas {
            bail!("cuda:{ordinal} ({}) needs cuBLAS (libcublas.so.13): install the CUDA 13 toolkit or `pip install nvidia-cublas` and name its folder in {}", info.name, super::LIB_DIRS_VAR);
        }
        // TF32: cuBLAS' default math never uses it for SGEMM, and the cuDNN descriptors get
        // FMA math unless it is allowed
        let tf32 = allow_tf32();
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cannot open cuda:{ordinal}: {e}"))?;
        // one stream: no cross-stream events are needed
        // SAFETY: every buffer is used on `stream` only
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
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
        let pool = Mutex::new(Pool::new(DriverAlloc { ctx: ctx.clone() }));
        Ok(Gpu {
            ordinal,
            name: info.name,
            compute_capability: info.compute_capability,
            arch,
            tf32,
            kernels_cached: all_cached,
            ctx,
            stream,
            pool,
            funcs,
            blas: Handle(blas),
            cudnn,
            exec: Mutex::new(()),
            conv_cache: Mutex::new(HashMap::new()),
            poison: AtomicBool::new(std::env::var_os("ORWCFM_CUDA_POISON").is_some()),
        })
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| anyhow!("cuda:{}: {e}", self.ordinal))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn cu_stream(&self) -> cudarc::driver::sys::CUstream {
        self.stream.cu_stream()
    }

    pub fn blas(&self) -> cudarc::cublas::sys::cublasHandle_t {
        self.blas.0
    }

    pub fn cudnn(&self) -> Option<cudarc::cudnn::sys::cudnnHandle_t> {
        self.cudnn.as_ref().map(|h| h.0)
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
        self.stream.synchronize().map_err(|e| anyhow!("cuda:{}: {e}", self.ordinal))
    }

    /// Uninitialised room for `n` f32 values (at least one word).
    pub fn alloc(self: &Arc<Self>, n: usize) -> Result<GpuBuf> {
        let (ptr, class) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).alloc(n.max(1) * 4)?;
        let b = GpuBuf { gpu: self.clone(), ptr, len: n, class };
        if self.poison.load(Ordering::Relaxed) && n > 0 {
            self.launch_n("fill_f32", n, &[Arg::Ptr(ptr), Arg::F32(f32::NAN), Arg::I64(n as i64)])?;
        }
        Ok(b)
    }

    /// Fill every buffer allocated from now on with NaN (also `ORWCFM_CUDA_POISON=1`): a test
    /// then sees any output element that an op leaves unwritten.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Host values to a new device buffer.
    pub fn upload(self: &Arc<Self>, data: &[f32]) -> Result<GpuBuf> {
        let b = self.alloc(data.len())?;
        if !data.is_empty() {
            self.bind()?;
            // SAFETY: `b` holds at least data.len() words; pageable memory is staged before return
            unsafe { cudarc::driver::result::memcpy_htod_async(b.ptr, data, self.cu_stream()) }.map_err(|e| anyhow!("copy to cuda:{}: {e}", self.ordinal))?;
        }
        Ok(b)
    }

    /// 32-bit integers (indices) to a device buffer.
    pub fn upload_i32(self: &Arc<Self>, data: &[i32]) -> Result<GpuBuf> {
        self.upload(bytemuck::cast_slice(data))
    }

    /// A device buffer's values to the host (waits for queued work).
    pub fn download(&self, b: &GpuBuf) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; b.len];
        if b.len > 0 {
            self.bind()?;
            // SAFETY: `b` holds `len` words written by earlier work on this stream
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, b.ptr, self.cu_stream()) }.map_err(|e| anyhow!("copy from cuda:{}: {e}", self.ordinal))?;
        }
        self.sync()?;
        Ok(out)
    }

    /// A device copy of a buffer.
    pub fn duplicate(self: &Arc<Self>, b: &GpuBuf) -> Result<GpuBuf> {
        let out = self.alloc(b.len)?;
        if b.len > 0 {
            self.bind()?;
            // SAFETY: both hold `len` words
            unsafe { cudarc::driver::result::memcpy_dtod_async(out.ptr, b.ptr, b.len * 4, self.cu_stream()) }.map_err(|e| anyhow!("device copy on cuda:{}: {e}", self.ordinal))?;
        }
        Ok(out)
    }

    /// Launch kernel `name` on the stream.
    pub fn launch(&self, name: &str, grid: u32, block: u32, args: &[Arg]) -> Result<()> {
        let f = self.funcs.get(name).ok_or_else(|| anyhow!("kernel {name} is not in kernels/*.cu"))?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::Struct(s) => {
                    s.push(&mut b);
                    &mut b
                }
            };
        }
        let cfg = LaunchConfig { grid_dim: (grid.max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list follows the kernel's signature (each wrapper in ops.rs mirrors
        // its kernel's declaration) and every pointer is a live buffer of the sizes passed
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launching {name} on cuda:{}: {e}", self.ordinal))?;
        if std::env::var_os("ORWCFM_CUDA_SYNC").is_some() {
            self.sync().with_context(|| format!("after kernel {name}"))?;
        }
        Ok(())
    }

    /// Launch an element-wise kernel over `n` items (grid-stride, so the grid is capped).
    pub fn launch_n(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        let block = 256u32;
        let grid = n.div_ceil(block as usize).clamp(1, 65_535) as u32;
        self.launch(name, grid, block, args)
    }

    /// Launch a block-per-row kernel over `rows` rows.
    pub fn launch_rows(&self, name: &str, rows: usize, args: &[Arg]) -> Result<()> {
        self.launch(name, rows.clamp(1, 65_535) as u32, 256, args)
    }
}

/// `n` f32 values in device memory from the pool; returned to the pool when dropped.
pub struct GpuBuf {
    gpu: Arc<Gpu>,
    ptr: u64,
    len: usize,
    class: usize,
}

impl GpuBuf {
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
        self.gpu.pool.lock().unwrap_or_else(|e| e.into_inner()).release(self.ptr, self.class);
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf(cuda:{}, {} values)", self.gpu.ordinal, self.len)
    }
}
