//! A simulated GPU on the CPU, for testing the CUDA backend's host side where no GPU exists.
//!
//! With [`enable`] (tests call it when no real GPU opens), `cuda::gpu(0)` is a device whose
//! "device memory" is host memory from the same caching allocator, whose kernels are the real
//! `kernels/*.cu` compiled by the system C++ compiler with the shim of `kernels/sim/` (one OS
//! thread per GPU thread, `__syncthreads` a barrier), launched with the very argument lists the
//! CUDA path hands to the driver, and whose GEMMs are the cuBLAS column-major calls that
//! `gemm::Gemm::cublas` produces, executed by the CPU backend's GEMM. There is no cuDNN:
//! convolutions take the im2col + GEMM path.
//!
//! What it checks: every wrapper's argument list against its kernel, the geometry, the
//! dispatch of every autograd op, the data movement of models, trainer, optimiser and ODE. What
//! it cannot: the driver, cuBLAS, cuDNN, GPU arithmetic and speed.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use libloading::Library;

use super::nvrtc::{fp16_kernels, kernel_names, kernel_params, KERNEL_DECL, KERNEL_SOURCES};
use super::gemm::CublasCall;
use super::gpu::Launch;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Make `cuda::gpu(N)` open simulated devices (for the rest of the process).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The C++ compiler (`$CXX`, else `c++`), if one runs.
pub fn compiler() -> Option<String> {
    let c = std::env::var("CXX").ok().filter(|c| !c.trim().is_empty()).unwrap_or_else(|| "c++".into());
    let ok = Command::new(&c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    ok.then_some(c)
}

const SHIM_H: &str = include_str!("../../../kernels/sim/shim.h");
const FP16_H: &str = include_str!("../../../kernels/sim/cuda_fp16.h");
const RUNNER: &str = include_str!("../../../kernels/sim/runner.cpp");

type LaunchFn = unsafe extern "C" fn(i32, i32, extern "C" fn(*mut c_void), *mut c_void);
type WrapFn = unsafe extern "C" fn(*mut *mut c_void);

/// Kernels of `src` that need their threads to run at once: they (or a `__device__` function they
/// call) use `__syncthreads` or `__shared__` memory. The others run serially per block.
pub fn barrier_kernels(src: &str) -> Vec<String> {
    let uses = |body: &str| body.contains("__syncthreads") || body.contains("__shared__");
    let mut helpers: Vec<String> = Vec::new();
    for (i, _) in src.match_indices("__device__") {
        let rest = &src[i..];
        let Some(open) = rest.find('(') else { continue };
        let name = rest[..open].split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).rfind(|w| !w.is_empty()).unwrap_or("").to_string();
        let end = rest.find("\n}\n").unwrap_or(rest.len());
        if uses(&rest[..end]) {
            helpers.push(name);
        }
    }
    let starts: Vec<usize> = src.match_indices(KERNEL_DECL).map(|(i, _)| i).collect();
    let mut out = Vec::new();
    for (n, &i) in starts.iter().enumerate() {
        let body = &src[i..starts.get(n + 1).copied().unwrap_or(src.len())];
        if uses(body) || helpers.iter().any(|h| body.contains(&format!("{h}("))) {
            out.extend(kernel_names(body).into_iter().take(1));
        }
    }
    out
}

/// The C++ source of one simulated kernel library: the kernel file, the launcher, and one
/// wrapper per kernel taking CUDA's `void** kernelParams`.
fn library_source(file: &str, src: &str) -> String {
    let mut s = format!("#include \"{file}\"\n{RUNNER}\n");
    let fp16 = fp16_kernels(src);
    for (name, params) in kernel_params(src) {
        let args: Vec<String> = params.iter().enumerate().map(|(i, t)| format!("*({t}*)a[{i}]")).collect();
        // a kernel left out by the source's #if (the cuda_fp16.h ones) has no wrapper either
        let guard = if fp16.contains(&name) { "#ifdef ORWCFM_HAVE_FP16\n" } else { "#if 1\n" };
        s.push_str(&format!("{guard}extern \"C\" void orwcfm_sim_{name}(void** a) {{ {name}({}); }}\n#endif\n", args.join(", ")));
    }
    s
}

struct SimLib {
    _lib: Library,
    launch: LaunchFn,
    launch_serial: LaunchFn,
    /// the shim's launch dimensions and `__shared__` memory are per library: one launch at a time
    lock: Mutex<()>,
}

/// The compiled kernels of a simulated device.
pub struct Sim {
    libs: Vec<SimLib>,
    /// library, wrapper, whether the kernel needs its threads at once
    kernels: HashMap<String, (usize, WrapFn, bool)>,
}

// SAFETY: the libraries' functions are called under each library's lock
unsafe impl Send for Sim {}
unsafe impl Sync for Sim {}

struct Call<'a> {
    f: WrapFn,
    params: &'a [*mut c_void],
}

extern "C" fn body(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `Call` that `Sim::launch` passes, alive for the whole launch
    let c = unsafe { &*(ctx as *const Call) };
    // SAFETY: the wrapper reads each parameter as the kernel's declared type
    unsafe { (c.f)(c.params.as_ptr() as *mut *mut c_void) };
}

impl Sim {
    /// Compile every kernel file with the shim (a few seconds each) and load them.
    pub fn build() -> Result<Sim> {
        let cc = compiler().ok_or_else(|| anyhow!("the simulated GPU needs a C++ compiler ($CXX or c++)"))?;
        // a fresh folder per build: the dynamic linker would hand a second simulated GPU the
        // first one's libraries (and their launch state) if the paths were the same
        static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let build = BUILDS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("orwcfm-sim-{}-{build}-{}", std::process::id(), std::thread::current().name().unwrap_or("main").replace(|c: char| !c.is_ascii_alphanumeric(), "_")));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("shim.h"), SHIM_H)?;
        std::fs::write(dir.join("cuda_fp16.h"), FP16_H)?;
        let mut libs = Vec::new();
        let mut kernels = HashMap::new();
        for (file, src) in KERNEL_SOURCES {
            std::fs::write(dir.join(file), src)?;
            let stem = file.trim_end_matches(".cu");
            let unit = dir.join(format!("{stem}_sim.cpp"));
            std::fs::write(&unit, library_source(file, src))?;
            let so: PathBuf = dir.join(format!("{stem}.so"));
            let out = Command::new(&cc)
                .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-w"])
                .arg("-I")
                .arg(&dir)
                .args(["-include", "shim.h"])
                .arg(&unit)
                .arg("-o")
                .arg(&so)
                .output()
                .with_context(|| format!("running {cc}"))?;
            if !out.status.success() {
                bail!("{cc} could not compile kernels/{file} for the simulated GPU:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            // SAFETY: a library just built from the kernel sources and the shim
            let lib = unsafe { Library::new(&so) }.map_err(|e| anyhow!("loading {}: {e}", so.display()))?;
            // SAFETY: runner.cpp defines shim_launch with this signature
            let launch: LaunchFn = unsafe { *lib.get::<LaunchFn>(b"shim_launch").map_err(|e| anyhow!("{e}"))? };
            // SAFETY: as above
            let launch_serial: LaunchFn = unsafe { *lib.get::<LaunchFn>(b"shim_launch_serial").map_err(|e| anyhow!("{e}"))? };
            let barriers = barrier_kernels(src);
            for name in kernel_names(src) {
                // SAFETY: library_source defines each wrapper as `void(void**)`
                if let Ok(f) = unsafe { lib.get::<WrapFn>(format!("orwcfm_sim_{name}").as_bytes()) } {
                    let b = barriers.contains(&name);
                    kernels.insert(name, (libs.len(), *f, b));
                }
            }
            libs.push(SimLib { _lib: lib, launch, launch_serial, lock: Mutex::new(()) });
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Sim { libs, kernels })
    }

    /// Run kernel `name` over `grid × block` threads with CUDA-style parameters (pointers to each
    /// argument's value).
    pub fn launch(&self, name: &str, cfg: Launch, params: &[*mut c_void]) -> Result<()> {
        if cfg.grid.1 != 1 || cfg.grid.2 != 1 || cfg.block.1 != 1 || cfg.block.2 != 1 || cfg.shared_bytes != 0 {
            bail!("the simulated GPU runs 1-D launches without dynamic shared memory only ({cfg:?})");
        }
        // every `any_block` kernel is correct for any block size (a power of two for the row
        // kernels): 8 keeps the OS threads few on a 2-core machine; the grid stays (partial sums use it)
        let (grid, block) = (cfg.grid.0, if cfg.any_block { cfg.block.0.min(8) } else { cfg.block.0 });
        let &(li, f, barriers) = self.kernels.get(name).ok_or_else(|| anyhow!("kernel {name} is not in kernels/*.cu"))?;
        let lib = &self.libs[li];
        let _one = lib.lock.lock().unwrap_or_else(|e| e.into_inner());
        let call = Call { f, params };
        // SAFETY: shim_launch calls `body(&call)` grid × block times and returns after joining;
        // the parameters point at live values and the buffers they name at live host memory
        let run = if barriers { lib.launch } else { lib.launch_serial };
        unsafe { run(grid as i32, block as i32, body, &call as *const Call as *mut c_void) };
        Ok(())
    }
}

/// A cuBLAS column-major (strided-batched) SGEMM on host memory, by the CPU backend's GEMM:
/// `Cᵀ = op(B)ᵀ·op(A)ᵀ` row-major. β must be 0 or 1 (all the engine uses).
pub fn gemm(c: &CublasCall) -> Result<()> {
    use crate::backend::cpu::gemm::{sgemm, Mat};
    if c.beta != 0.0 && c.beta != 1.0 {
        bail!("the simulated cuBLAS supports β = 0 or 1, not {}", c.beta);
    }
    let (m, n, k) = (c.m, c.n, c.k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    // op(B)ᵀ is n×k, op(A)ᵀ is k×m (row, column strides)
    let (b_rs, b_cs) = if c.trans_b { (1, c.ldb) } else { (c.ldb, 1) };
    let (a_rs, a_cs) = if c.trans_a { (1, c.lda) } else { (c.lda, 1) };
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    for bi in 0..c.batch {
        let at = |base: u64, stride: i64| (base as i64 + 4 * bi as i64 * stride) as usize as *mut f32;
        let (bp, ap, cp) = (at(c.b, c.stride_b), at(c.a, c.stride_a), at(c.c, c.stride_c));
        // SAFETY: the call describes live host buffers of these extents (as a GPU call would
        // describe device buffers)
        unsafe {
            let lhs = std::slice::from_raw_parts(bp as *const f32, extent(n, k, b_rs, b_cs));
            let rhs = std::slice::from_raw_parts(ap as *const f32, extent(k, m, a_rs, a_cs));
            let out = std::slice::from_raw_parts_mut(cp, extent(n, m, c.ldc, 1));
            let threads = crate::backend::cpu::gemm::threads_for(n, m, k);
            sgemm(n, m, k, Mat { data: lhs, rs: b_rs as isize, cs: b_cs as isize }, Mat { data: rhs, rs: a_rs as isize, cs: a_cs as isize }, out, c.ldc, c.beta == 1.0, c.alpha, threads);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_parameter_types_are_parsed() {
        let src = "extern \"C\" __global__ void k(const float* __restrict__ x, float* y, long long n, BinGeom g) {}\nextern \"C\" __global__ void e() {}";
        let p = kernel_params(src);
        assert_eq!(p[0].0, "k");
        assert_eq!(p[0].1, ["const float*", "float*", "long long", "BinGeom"]);
        assert_eq!(p[1], ("e".to_string(), vec![]));
    }

    #[test]
    fn kernels_with_barriers_are_found() {
        let b = barrier_kernels(super::super::nvrtc::KERNEL_SOURCES.iter().find(|(n, _)| *n == "reduce.cu").unwrap().1);
        assert!(b.contains(&"reduce_sum_f32".to_string()) && b.contains(&"softmax_rows_f32".to_string()), "{b:?}");
        let e = barrier_kernels(super::super::nvrtc::KERNEL_SOURCES[0].1);
        assert_eq!(e, ["orw_loss_rows_f32"], "elementwise.cu");
        let s = barrier_kernels(super::super::nvrtc::KERNEL_SOURCES.iter().find(|(n, _)| *n == "shape.cu").unwrap().1);
        assert!(s.is_empty() || !s.contains(&"copy_slab_f32".to_string()), "{s:?}");
    }
}
