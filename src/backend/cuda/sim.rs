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
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use libloading::Library;

use super::gemm::{CublasCall, GemmTypes};
use super::gpu::Launch;
use super::nvrtc::{KERNEL_DECL, KERNEL_SOURCES, fp16_kernels, kernel_names, kernel_params};
use crate::tensor::DType;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Make `cuda::gpu(N)` open simulated devices (for the rest of the process).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// The variable that makes a process (the CLI, in tests) open simulated GPUs: `1`.
pub const SIMULATE_VAR: &str = "ORWCFM_SIMULATED_GPU";

/// Whether `cuda::gpu(N)` opens simulated devices: after [`enable`], or with
/// `ORWCFM_SIMULATED_GPU=1` in the environment (CLI tests of `--device cuda` without a GPU).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst) || std::env::var(SIMULATE_VAR).is_ok_and(|v| v.trim() == "1")
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

/// runner.cpp's `shim_launch3*(dims, shared_bytes, body, ctx)`, dims = grid x, y, z, block x, y, z.
type LaunchFn = unsafe extern "C" fn(*const u32, u32, extern "C" fn(*mut c_void), *mut c_void);
type WrapFn = unsafe extern "C" fn(*mut *mut c_void);

/// One `extern __shared__ T name[];` declaration: its byte range, type and name, and whether it
/// is at file scope.
struct DynShared {
    start: usize,
    end: usize,
    ty: String,
    name: String,
    file_scope: bool,
}

fn dynamic_shared(src: &str) -> Vec<DynShared> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = src[from..].find("extern") {
        let start = from + k;
        from = start + 6;
        let Some(semi) = src[start..].find(';') else { break };
        let decl = &src[start..start + semi];
        let mut words = decl.split_whitespace();
        if words.next() != Some("extern") || words.next() != Some("__shared__") {
            continue;
        }
        // the rest: [__align__(N) | alignas(N)] type name[]
        let rest: Vec<&str> = words.filter(|w| !w.starts_with("__align__(") && !w.starts_with("alignas(")).collect();
        let rest = rest.join(" ");
        let Some(open) = rest.rfind('[') else { continue };
        let head = rest[..open].trim_end();
        let split = head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
        let (ty, name) = (head[..split].trim().to_string(), head[split..].to_string());
        if ty.is_empty() || name.is_empty() {
            continue;
        }
        let depth = src[..start].matches('{').count() as i64 - src[..start].matches('}').count() as i64;
        out.push(DynShared { start, end: start + semi + 1, ty, name, file_scope: depth <= 0 });
        from = start + semi + 1;
    }
    out
}

/// A kernel source made ready for the shim: each dynamic shared memory declaration
/// (`extern __shared__ T name[];`, which the shim's `__shared__`-is-`static` cannot express)
/// becomes a reference to the launch's buffer, `shim_dynamic_shared`: a pointer at function
/// scope, a macro at file scope (a global initialised when the library loads would miss the
/// launch's buffer). Sources without one are returned unchanged.
pub fn shim_source(src: &str) -> String {
    let src = &super::nvrtc::expand_headers(src);
    let decls = dynamic_shared(src);
    let mut out = String::with_capacity(src.len());
    let mut at = 0;
    for d in decls {
        out.push_str(&src[at..d.start]);
        if d.file_scope {
            out.push_str(&format!("\n#undef {n}\n#define {n} (reinterpret_cast<{t}*>(shim_dynamic_shared))\n", n = d.name, t = d.ty));
        } else {
            out.push_str(&format!("{t}* const {n} = reinterpret_cast<{t}*>(shim_dynamic_shared);", n = d.name, t = d.ty));
        }
        at = d.end;
    }
    out.push_str(&src[at..]);
    out
}

/// Kernels of `src` that need their threads to run at once: they (or a `__device__` function they
/// call, templates included) use `__syncthreads`, warp shuffles or `__syncwarp`, or `__shared__`
/// memory (static, or dynamic declared at file scope). The others run serially per block.
pub fn barrier_kernels(src: &str) -> Vec<String> {
    let src = &super::nvrtc::expand_headers(src);
    let file_shared: Vec<String> = dynamic_shared(src).into_iter().filter(|d| d.file_scope).map(|d| d.name).collect();
    let uses = |body: &str| body.contains("__syncthreads") || body.contains("__shfl") || body.contains("__syncwarp") || body.contains("__shared__") || file_shared.iter().any(|n| body.contains(n.as_str()));
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
        if uses(body) || helpers.iter().any(|h| body.contains(&format!("{h}(")) || body.contains(&format!("{h}<"))) {
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
        Sim::build_from(KERNEL_SOURCES)
    }

    /// [`Sim::build`] for these `(file name, source)` kernel files.
    pub fn build_from(sources: &[(&str, &str)]) -> Result<Sim> {
        let cc = compiler().ok_or_else(|| anyhow!("the simulated GPU needs a C++ compiler ($CXX or c++)"))?;
        // a fresh folder per build: the dynamic linker would hand a second simulated GPU the
        // first one's libraries (and their launch state) if the paths were the same
        static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let build = BUILDS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("orwcfm-sim-{}-{build}-{}", std::process::id(), std::thread::current().name().unwrap_or("main").replace(|c: char| !c.is_ascii_alphanumeric(), "_")));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("shim.h"), SHIM_H)?;
        std::fs::write(dir.join("cuda_fp16.h"), FP16_H)?;
        // every file's compiler runs at once (the build took ~12 s one after another on 2 cores)
        let mut units = Vec::new();
        for &(file, raw) in sources {
            // the shared headers pasted in, as NVRTC compiles it (barrier helpers live there)
            let expanded = super::nvrtc::expand_headers(raw);
            std::fs::write(dir.join(file), shim_source(&expanded))?;
            let stem = file.trim_end_matches(".cu");
            let unit = dir.join(format!("{stem}_sim.cpp"));
            std::fs::write(&unit, library_source(file, &expanded))?;
            let so: PathBuf = dir.join(format!("{stem}.so"));
            let child = Command::new(&cc)
                .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-w"])
                .arg("-I")
                .arg(&dir)
                .args(["-include", "shim.h"])
                .arg(&unit)
                .arg("-o")
                .arg(&so)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("running {cc}"))?;
            units.push((file, expanded, so, child));
        }
        let mut libs = Vec::new();
        let mut kernels = HashMap::new();
        for (file, expanded, so, child) in units {
            let src = expanded.as_str();
            let out = child.wait_with_output().with_context(|| format!("running {cc}"))?;
            if !out.status.success() {
                bail!("{cc} could not compile kernels/{file} for the simulated GPU:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            // SAFETY: a library just built from the kernel sources and the shim
            let lib = unsafe { Library::new(&so) }.map_err(|e| anyhow!("loading {}: {e}", so.display()))?;
            // SAFETY: runner.cpp defines shim_launch3_fibers with this signature (the fiber
            // launcher: a block's threads switch in user space at barriers; with one OS thread per
            // GPU thread, the futex wake-ups of the barriers took most of the time)
            let launch: LaunchFn = unsafe { *lib.get::<LaunchFn>(b"shim_launch3_fibers").map_err(|e| anyhow!("{e}"))? };
            // SAFETY: as above
            let launch_serial: LaunchFn = unsafe { *lib.get::<LaunchFn>(b"shim_launch3_serial").map_err(|e| anyhow!("{e}"))? };
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

    /// Run kernel `name` over the grid and blocks of `cfg` (3-D, with `cfg.shared_bytes` of
    /// dynamic shared memory) with CUDA-style parameters (pointers to each argument's value).
    pub fn launch(&self, name: &str, cfg: Launch, params: &[*mut c_void]) -> Result<()> {
        let mut block = cfg.block;
        if cfg.any_block && block.1 == 1 && block.2 == 1 {
            // every `any_block` kernel is correct for any block size (a power of two for the row
            // kernels): 8 keeps the OS threads few on a 2-core machine; the grid stays (partial
            // sums use it)
            block.0 = block.0.min(8);
        }
        let dims = [cfg.grid.0, cfg.grid.1, cfg.grid.2, block.0, block.1, block.2];
        let &(li, f, barriers) = self.kernels.get(name).ok_or_else(|| anyhow!("kernel {name} is not in kernels/*.cu"))?;
        let lib = &self.libs[li];
        let _one = lib.lock.lock().unwrap_or_else(|e| e.into_inner());
        let call = Call { f, params };
        // SAFETY: shim_launch3_fibers and shim_launch3_serial call `body(&call)` once per thread
        // of every block and return when all are done; the parameters point at live values and
        // the buffers they name at live host memory
        let run = if barriers { lib.launch } else { lib.launch_serial };
        unsafe { run(dims.as_ptr(), cfg.shared_bytes, body, &call as *const Call as *mut c_void) };
        Ok(())
    }
}

/// A cuBLAS column-major (strided-batched) SGEMM on host memory, by the CPU backend's GEMM:
/// `Cᵀ = op(B)ᵀ·op(A)ᵀ` row-major. β must be 0 or 1 (all the engine uses).
pub fn gemm(c: &CublasCall) -> Result<()> {
    use crate::backend::cpu::gemm::{Mat, sgemm};
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
    let threads = crate::backend::cpu::gemm::threads_for(n, m, k);
    if c.types == GemmTypes::F32 {
        for bi in 0..c.batch {
            let at = |base: u64, stride: i64| (base as i64 + 4 * bi as i64 * stride) as usize as *mut f32;
            let (bp, ap, cp) = (at(c.b, c.stride_b), at(c.a, c.stride_a), at(c.c, c.stride_c));
            // SAFETY: the call describes live host buffers of these extents (as a GPU call would
            // describe device buffers)
            unsafe {
                let lhs = std::slice::from_raw_parts(bp as *const f32, extent(n, k, b_rs, b_cs));
                let rhs = std::slice::from_raw_parts(ap as *const f32, extent(k, m, a_rs, a_cs));
                let out = std::slice::from_raw_parts_mut(cp, extent(n, m, c.ldc, 1));
                sgemm(n, m, k, Mat { data: lhs, rs: b_rs as isize, cs: b_cs as isize }, Mat { data: rhs, rs: a_rs as isize, cs: a_cs as isize }, out, c.ldc, c.beta == 1.0, c.alpha, threads);
            }
        }
        return Ok(());
    }
    // cublasGemmEx with 16-bit operands and f32 accumulation: the operands widened exactly, the
    // f32 GEMM, the output rounded once to its type (or kept f32)
    let widen = |bits: u16, d: DType| match d {
        DType::F16 => half::f16::from_bits(bits).to_f32(),
        _ => half::bf16::from_bits(bits).to_f32(),
    };
    let (ab, ct) = (c.types.ab, c.types.c);
    for bi in 0..c.batch {
        let at = |base: u64, stride: i64, size: usize| (base as i64 + size as i64 * bi as i64 * stride) as usize;
        // SAFETY: as above; the operands hold 16-bit values, the output f32 or 16-bit ones
        unsafe {
            let load = |addr: usize, len: usize| -> Vec<f32> { std::slice::from_raw_parts(addr as *const u16, len).iter().map(|&v| widen(v, ab)).collect() };
            let lhs = load(at(c.b, c.stride_b, 2), extent(n, k, b_rs, b_cs));
            let rhs = load(at(c.a, c.stride_a, 2), extent(k, m, a_rs, a_cs));
            let len = extent(n, m, c.ldc, 1);
            let ca = at(c.c, c.stride_c, ct.size());
            let mut out: Vec<f32> = match ct {
                DType::F32 => std::slice::from_raw_parts(ca as *const f32, len).to_vec(),
                _ => std::slice::from_raw_parts(ca as *const u16, len).iter().map(|&v| widen(v, ct)).collect(),
            };
            sgemm(n, m, k, Mat { data: &lhs, rs: b_rs as isize, cs: b_cs as isize }, Mat { data: &rhs, rs: a_rs as isize, cs: a_cs as isize }, &mut out, c.ldc, c.beta == 1.0, c.alpha, threads);
            // only the m columns of each of the n rows are the output (ldc may be larger)
            for r in 0..n {
                for j in 0..m {
                    let i = r * c.ldc + j;
                    match ct {
                        DType::F32 => *(ca as *mut f32).add(i) = out[i],
                        DType::F16 => *(ca as *mut u16).add(i) = half::f16::from_f32(out[i]).to_bits(),
                        _ => *(ca as *mut u16).add(i) = half::bf16::from_f32(out[i]).to_bits(),
                    }
                }
            }
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

    const PROBE: &str = r#"
extern __shared__ __align__(16) float file_scope_smem[];

// every thread of a 3-D block writes its value into dynamic shared memory; after the barrier
// each reads its mirror's
extern "C" __global__ void grid3_probe(int* out) {
    extern __shared__ int tile[];
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    const unsigned long long b = blockIdx.x + gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
    tile[t] = (int)(b * 1000 + t);
    __syncthreads();
    out[b * nt + t] = tile[nt - 1 - t];
}

// each thread round-trips through its own slot of the file-scope array: no barrier needed, but
// the blocks must not run at once (found by the array's name: no __shared__ in the body)
extern "C" __global__ void smem_own_slot(float* y) {
    const unsigned t = threadIdx.x;
    file_scope_smem[t] = (float)(blockIdx.x * 100 + t);
    y[blockIdx.x * blockDim.x + t] = file_scope_smem[t];
}

// block sums through the file-scope array
extern "C" __global__ void smem_block_sum(const float* x, float* y) {
    const unsigned t = threadIdx.x;
    file_scope_smem[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    if (t == 0) {
        float s = 0.0f;
        for (unsigned i = 0; i < blockDim.x; ++i) s += file_scope_smem[i];
        y[blockIdx.x] = s;
    }
}
"#;

    #[test]
    fn dynamic_shared_declarations_are_rewritten() {
        let out = shim_source(PROBE);
        assert!(out.contains("int* const tile = reinterpret_cast<int*>(shim_dynamic_shared);"), "{out}");
        assert!(out.contains("#define file_scope_smem (reinterpret_cast<float*>(shim_dynamic_shared))"), "{out}");
        assert!(!out.contains("extern __shared__"));
        let b = barrier_kernels(PROBE);
        assert_eq!(b, ["grid3_probe", "smem_own_slot", "smem_block_sum"]);
        // sources without them are unchanged, but for the shared headers pasted in
        for (_, src) in KERNEL_SOURCES.iter().filter(|(_, s)| !s.contains("extern __shared__")) {
            assert_eq!(shim_source(src), super::super::nvrtc::expand_headers(src));
        }
    }

    #[test]
    fn three_dimensional_launches_with_dynamic_shared_memory_run() {
        if compiler().is_none() {
            eprintln!("SKIPPED: no C++ compiler");
            return;
        }
        let sim = Sim::build_from(&[("probe.cu", PROBE)]).unwrap();
        let (grid, block) = ((2u32, 3u32, 2u32), (4u32, 2u32, 3u32));
        let nt = 24usize;
        let nb = 12usize;
        let mut out = vec![-1i32; nb * nt];
        let p = out.as_mut_ptr() as u64;
        let params = [&p as *const u64 as *mut c_void];
        sim.launch("grid3_probe", Launch::dims(grid, block).with_shared((nt * 4) as u32), &params).unwrap();
        let want: Vec<i32> = (0..nb).flat_map(|b| (0..nt).map(move |t| (b * 1000 + nt - 1 - t) as i32)).collect();
        assert_eq!(out, want);
        let x: Vec<f32> = (0..5 * 16).map(|i| i as f32).collect();
        let mut y = vec![f32::NAN; 5];
        let (xp, yp) = (x.as_ptr() as u64, y.as_mut_ptr() as u64);
        let params = [&xp as *const u64 as *mut c_void, &yp as *const u64 as *mut c_void];
        sim.launch("smem_block_sum", Launch::linear(5, 16).with_shared(64), &params).unwrap();
        let want: Vec<f32> = (0..5).map(|b| (0..16).map(|t| (b * 16 + t) as f32).sum()).collect();
        assert_eq!(y, want);
        let mut z = vec![f32::NAN; 7 * 8];
        let zp = z.as_mut_ptr() as u64;
        sim.launch("smem_own_slot", Launch::linear(7, 8).with_shared(32), &[&zp as *const u64 as *mut c_void]).unwrap();
        let want: Vec<f32> = (0..7).flat_map(|b| (0..8).map(move |t| (b * 100 + t) as f32)).collect();
        assert_eq!(z, want);
    }

    const WARP_PROBE: &str = r#"
// warp primitives on a 2-D block of 16 x 4 threads (two warps, lanes by the linear index)
extern "C" __global__ void warp_probe(const float* x, float* y, int* z) {
    const unsigned t = threadIdx.x + blockDim.x * threadIdx.y;
    const unsigned long long g = blockIdx.x * (unsigned long long)(blockDim.x * blockDim.y) + t;
    float v = x[g];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    y[g * 4] = v;
    float w = x[g];
    for (unsigned o = 16; o > 0; o >>= 1) w += __shfl_down_sync(0xffffffffu, w, o);
    y[g * 4 + 1] = w;
    y[g * 4 + 2] = __shfl_sync(0xffffffffu, x[g], 5);
    __syncwarp();
    y[g * 4 + 3] = (float)__shfl_xor_sync(0xffffffffu, (double)x[g], 3, 8);
    z[g * 2] = __shfl_sync(0xffffffffu, (int)t * 7, 3, 8);
    z[g * 2 + 1] = __shfl_up_sync(0xffffffffu, (int)t, 1);
}
"#;

    #[test]
    fn warp_shuffles_exchange_values() {
        if compiler().is_none() {
            eprintln!("SKIPPED: no C++ compiler");
            return;
        }
        assert_eq!(barrier_kernels(WARP_PROBE), ["warp_probe"], "a shuffle kernel must run with all its threads at once");
        let sim = Sim::build_from(&[("warp_probe.cu", WARP_PROBE)]).unwrap();
        let (blocks, nt) = (3usize, 64usize);
        // small integers: every sum is exact in any order
        let x: Vec<f32> = (0..blocks * nt).map(|i| ((i * 37 + 11) % 23) as f32 - 9.0).collect();
        let mut y = vec![f32::NAN; blocks * nt * 4];
        let mut z = vec![-1i32; blocks * nt * 2];
        let (xp, yp, zp) = (x.as_ptr() as u64, y.as_mut_ptr() as u64, z.as_mut_ptr() as u64);
        let params = [&xp as *const u64 as *mut c_void, &yp as *const u64 as *mut c_void, &zp as *const u64 as *mut c_void];
        sim.launch("warp_probe", Launch::dims((blocks as u32, 1, 1), (16, 4, 1)), &params).unwrap();
        for g in 0..blocks * nt {
            let (t, lane) = (g % nt, g % 32);
            let warp = g - lane;
            let sum: f32 = x[warp..warp + 32].iter().sum();
            assert_eq!(y[g * 4], sum, "xor butterfly sum at thread {g}");
            // shfl_down's tree: lane l ends with the sum of lanes l, l + 1, ... that its steps reach;
            // lane 0 has the warp's sum
            if lane == 0 {
                assert_eq!(y[g * 4 + 1], sum, "down-shuffle tree sum at thread {g}");
            }
            assert_eq!(y[g * 4 + 2], x[warp + 5], "broadcast of lane 5 at thread {g}");
            assert_eq!(y[g * 4 + 3], x[warp + (lane ^ 3)], "xor 3 within groups of 8 at thread {g}");
            assert_eq!(z[g * 2], ((t - lane % 8 + 3) * 7) as i32, "lane 3 of each group of 8 at thread {g}");
            assert_eq!(z[g * 2 + 1], if lane == 0 { t as i32 } else { t as i32 - 1 }, "up-shuffle at thread {g}");
        }
    }

    #[test]
    fn kernels_with_barriers_are_found() {
        // the flash attention's tiled kernels call templates that use barriers and shuffles
        let a = barrier_kernels(super::super::nvrtc::KERNEL_SOURCES.iter().find(|(n, _)| *n == "attention.cu").unwrap().1);
        for k in ["flash_attention_forward_d32_f32", "flash_attention_forward_d128_f32", "flash_attention_backward_d64_f32"] {
            assert!(a.contains(&k.to_string()), "{k}: {a:?}");
        }
        assert!(!a.contains(&"flash_attention_backward_dq_f32".to_string()), "{a:?}");
        let b = barrier_kernels(super::super::nvrtc::KERNEL_SOURCES.iter().find(|(n, _)| *n == "reduce.cu").unwrap().1);
        assert!(b.contains(&"reduce_sum_f32".to_string()) && b.contains(&"softmax_rows_f32".to_string()), "{b:?}");
        // elementwise.cu's kernels are all grid-stride over elements, without barriers
        let e = barrier_kernels(super::super::nvrtc::KERNEL_SOURCES[0].1);
        assert!(e.is_empty(), "elementwise.cu: {e:?}");
        let s = barrier_kernels(super::super::nvrtc::KERNEL_SOURCES.iter().find(|(n, _)| *n == "shape.cu").unwrap().1);
        assert!(s.is_empty() || !s.contains(&"copy_slab_f32".to_string()), "{s:?}");
    }
}
