//! The CUDA kernels of `kernels/*.cu`, run on the CPU, against the Rust CPU backend.
//!
//! No GPU is needed: each `.cu` file is compiled at run time by the system C++ compiler (`$CXX`,
//! else `c++`) together with a small CUDA shim (`kernels/sim/`: `__global__`, `threadIdx`,
//! `__syncthreads()` as a barrier, `__shared__` as static storage, `__half`, the `_rn`
//! intrinsics) into a shared library, which is loaded with `libloading`. A launch of `grid`
//! blocks of `block` threads runs `block` OS threads, each walking the blocks in order (see
//! `kernels/sim/runner.cpp`), so block-level reductions, barriers and grid-stride loops
//! all execute as written, the threads truly concurrent. Blocks of 128 threads and more (the
//! host wrappers' own shape) run as fibers of one OS thread instead, switching at barriers, as
//! on the simulated GPU (256 OS threads meeting at every barrier took most of this test's
//! minutes). Device pointers are host pointers here.
//!
//! Every kernel is called with the arguments its host wrapper in `src/backend/cuda/ops.rs` /
//! `conv.rs` passes (argument order, op codes, the geometry structs `BinGeom`, `ReduceGeom` and
//! `Strided` built by the crate's own constructors, so the Rust and C layouts are checked too),
//! on fresh random inputs whose sizes are not multiples of the block size, under three launch
//! shapes: grid 3 × block 32, grid 1 × block 64, and the one the host wrapper would use (block
//! 256). Each result is compared with the Rust CPU twin named in the kernel's comments:
//! relative error (`util::rel_err`) ≤ 1e-6 where the kernel is meant to round like the CPU,
//! ≤ 1e-5 where it is not (libm `expf` vs the CPU's polynomial `exp_f32`, double vs f32 sums);
//! outputs start as NaN, so an element left unwritten fails. The random-number kernels of
//! `rng.cu` are compared with `rng::philox` bit for bit (uniforms, dropout), the normals within
//! 2 ulp (both sides use the host's `logf`/`sinf`/`cosf` here; on a GPU CUDA's `logf` and
//! `sincosf`, ≤ 1 and ≤ 2 ulp, may put a normal a few ulp from the CPU's).
//!
//! Every `__global__` kernel of every `.cu` file must be launched by the test of its file
//! ([`TESTED`], checked against the sources): a new kernel without a CPU check fails here.
//!
//! Without a C++ compiler the tests print `SKIPPED: no C++ compiler` and pass, unless
//! `ORWCFM_REQUIRE_SHIM=1`. `ORWCFM_KERNEL_DIR` points the tests at another copy of the kernels
//! (default: `kernels/` of this crate), e.g. a deliberately broken one to see them fail.
//!
//! What this cannot see: the GPU's own arithmetic (its `__expf`/`expf`/`cosf` approximations,
//! FMA contraction under `--fmad=true`), memory-model races beyond `__syncthreads()`, and
//! NVRTC-only compile errors.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use half::{bf16, f16};
use libloading::Library;
use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::backend::cpu::conv::{ConvGeom, conv2d_backward, conv2d_forward, conv2d_im2col_backward, conv2d_im2col_forward};
use orwcfm_fast::backend::cpu::{elementwise as ew, norm};
use orwcfm_fast::backend::cuda::kargs::{BinGeom, ReduceGeom, Strided};
use orwcfm_fast::optim::{Adam, clip_coef, clip_grads_with_norm, ema_update, grad_norm};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::{Tensor, contiguous_strides};
use orwcfm_fast::util::rel_err;

/// The kernels of each `.cu` file; each file's test below launches every one of them.
const TESTED: &[(&str, &[&str])] = &[
    ("elementwise.cu", &["adam_step_f32", "fill_f32", "axpby_f32", "unary_f32", "unary_backward_f32", "binary_f32", "binary_same_f32"]),
    ("reduce.cu", &["reduce_sum_f32", "sum_squares_partial_f32", "sum_partials_split_f64", "softmax_rows_f32", "softmax_rows_backward_f32", "log_softmax_rows_f32", "log_softmax_rows_backward_f32"]),
    (
        "shape.cu",
        &[
            "gather_strided_f32",
            "copy_slab_f32",
            "upsample_nearest2x_f32",
            "upsample_nearest2x_backward_f32",
            "avg_pool2x_f32",
            "avg_pool2x_backward_f32",
            "embedding_forward_f32",
            "embedding_backward_f32",
            "timestep_embedding_f32",
            "timestep_embedding_backward_f32",
            "add_channel_bias_f32",
        ],
    ),
    ("optim.cu", &["adam_clip_ema_f32"]),
    ("norm.cu", &["group_norm_forward_f32", "group_norm_backward_input_f32", "group_norm_backward_affine_f32"]),
    ("conv.cu", &["im2col_f32", "im2col_h16", "col2im_f32"]),
    ("cast.cu", &["cast_f32_to_f16", "cast_f16_to_f32", "cast_f32_to_bf16", "cast_bf16_to_f32", "cast_f32_to_i32", "cast_i32_to_f32", "fill_u32"]),
    ("rng.cu", &["philox_uniform_f32", "philox_normal_f32", "dropout_f32"]),
    ("half.cu", &["bias_round_h16", "add_bias_h16", "unary_h16", "unary_backward_h16", "binary_h16", "binary_same_h16"]),
    (
        "fused.cu",
        &[
            "group_norm_act_forward_f32",
            "group_norm_act_forward_h16",
            "group_norm_act_backward_f32",
            "group_norm_act_backward_affine_f32",
            "ode_combine_f32",
            "ode_combine_backward_f32",
            "orw_loss_partial_f32",
            "orw_loss_finish_f32",
            "orw_loss_scale_f32",
        ],
    ),
    (
        "attention.cu",
        &[
            "flash_attention_forward_d32_f32",
            "flash_attention_forward_d64_f32",
            "flash_attention_forward_d128_f32",
            "flash_attention_backward_dsum_f32",
            "flash_attention_backward_d32_f32",
            "flash_attention_backward_d64_f32",
            "flash_attention_backward_d128_f32",
            "flash_attention_backward_dq_f32",
        ],
    ),
];

/// Where the kernels should round like the CPU twin.
const EXACT: f64 = 1e-6;
/// Where they legitimately differ by rounding (other `exp`, other summation order/precision).
const APPROX: f64 = 1e-5;

type P = *const f32;
type M = *mut f32;
type I = i64;

// ---------------------------------------------------------------- the shim

fn kernel_dir() -> PathBuf {
    match std::env::var_os("ORWCFM_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels"),
    }
}

fn shim_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels").join("sim")
}

fn require_shim() -> bool {
    std::env::var("ORWCFM_REQUIRE_SHIM").is_ok_and(|v| v == "1")
}

type LaunchFn = unsafe extern "C" fn(i32, i32, extern "C" fn(*mut c_void), *mut c_void);

/// One `.cu` file compiled with the shim and loaded.
struct Lib {
    file: &'static str,
    lib: Library,
    launch_fn: LaunchFn,
    launch_fibers: LaunchFn,
    /// Kernels fetched so far; the lock also keeps launches of this library apart (the shim's
    /// `__shared__` memory and launch dimensions are per library).
    launched: Mutex<BTreeSet<String>>,
}

/// `Fn() + Sync` behind a thin pointer, for the C side.
extern "C" fn call_body(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `&&dyn Fn` that `Lib::launch` passes, alive for the whole launch
    let f = unsafe { &*(ctx as *const &(dyn Fn() + Sync)) };
    f();
}

impl Lib {
    /// Compile and load `file`, or `None` (after saying so) when there is no C++ compiler.
    fn load(file: &'static str) -> Option<Lib> {
        let Some(cc) = orwcfm_fast::backend::cuda::sim::compiler() else {
            assert!(!require_shim(), "ORWCFM_REQUIRE_SHIM=1 but no C++ compiler runs ($CXX or c++)");
            println!("SKIPPED: no C++ compiler");
            return None;
        };
        let src_path = kernel_dir().join(file);
        let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel_shim");
        std::fs::create_dir_all(&out_dir).expect("create the shim's output folder");
        let so = out_dir.join(format!("{}-{}.so", file.trim_end_matches(".cu"), std::process::id()));
        // dynamic shared memory declarations rewritten for the shim, as the simulated GPU does
        let text = std::fs::read_to_string(&src_path).unwrap_or_else(|e| panic!("{}: {e}", src_path.display()));
        let src = out_dir.join(format!("{}-{}.cu", file.trim_end_matches(".cu"), std::process::id()));
        std::fs::write(&src, orwcfm_fast::backend::cuda::sim::shim_source(&text)).expect("write the shim's source");
        let shim = shim_dir();
        let t0 = std::time::Instant::now();
        let out = Command::new(&cc)
            .args(["-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-w"])
            .arg("-I")
            .arg(&shim)
            .args(["-include", "shim.h", "-x", "c++"])
            .arg(&src)
            .arg(shim.join("runner.cpp"))
            .arg("-o")
            .arg(&so)
            .output()
            .unwrap_or_else(|e| panic!("running {cc}: {e}"));
        assert!(out.status.success(), "{cc} could not compile {} with the CUDA shim:\n{}", src.display(), String::from_utf8_lossy(&out.stderr));
        // SAFETY: a library we just built from the kernel sources and the shim (no constructors
        // beyond the C++ runtime's)
        let lib = unsafe { Library::new(&so) }.unwrap_or_else(|e| panic!("loading {}: {e}", so.display()));
        let _ = std::fs::remove_file(&so); // stays mapped
        let _ = std::fs::remove_file(&src);
        // SAFETY: runner.cpp defines shim_launch with exactly this signature
        let launch_fn: LaunchFn = unsafe { *lib.get::<LaunchFn>("shim_launch").expect("shim_launch in the library") };
        // SAFETY: as above (shim_launch_fibers)
        let launch_fibers: LaunchFn = unsafe { *lib.get::<LaunchFn>("shim_launch_fibers").expect("shim_launch_fibers in the library") };
        println!("compiled {} with {cc} in {:.1} s", src_path.display(), t0.elapsed().as_secs_f64());
        Some(Lib { file, lib, launch_fn, launch_fibers, launched: Mutex::new(BTreeSet::new()) })
    }

    /// The kernel `name`, typed `F` (an `unsafe extern "C" fn` with the kernel's exact signature).
    fn k<F: Copy>(&self, name: &str) -> F {
        assert_eq!(size_of::<F>(), size_of::<usize>(), "{name}: F must be a function pointer");
        self.launched.lock().unwrap().insert(name.to_string());
        // SAFETY: F is the kernel's C signature (written next to each use, from the .cu source)
        unsafe { *self.lib.get::<F>(name).unwrap_or_else(|e| panic!("{}: no kernel {name}: {e}", self.file)) }
    }

    /// Run `f` (which calls one kernel) as a launch of `grid` blocks of `block` threads.
    fn launch(&self, (grid, block): (u32, u32), f: &(dyn Fn() + Sync)) {
        let _serial = self.launched.lock().unwrap();
        let r: &(dyn Fn() + Sync) = f;
        // SAFETY: shim_launch calls `call_body(&r)` grid × block times and returns after all
        // threads joined; the kernel arguments captured by `f` are live buffers of the sizes passed
        let run = if block >= FIBER_BLOCK { self.launch_fibers } else { self.launch_fn };
        unsafe { run(grid as i32, block as i32, call_body, &r as *const &(dyn Fn() + Sync) as *mut c_void) };
    }
}

/// Blocks of at least this many threads run as fibers (runner.cpp's `shim_launch_fibers`); the
/// attention kernels (128 threads) run each case once on OS threads (grid y = batch × heads) and
/// once as fibers (grid y = 1).
const FIBER_BLOCK: u32 = 128;

type Launch3Fn = unsafe extern "C" fn(*const u32, u32, extern "C" fn(*mut c_void), *mut c_void);

impl Lib {
    /// Run `f` (which calls one kernel) as a launch of a 3-D `grid` of 3-D `block`s with
    /// `shared` bytes of dynamic shared memory (runner.cpp's shim_launch3).
    /// `fibers`: the block's threads as fibers of one OS thread (`shim_launch3_fibers`), else one
    /// OS thread each.
    fn launch3(&self, fibers: bool, grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32, f: &(dyn Fn() + Sync)) {
        let name: &[u8] = if fibers { b"shim_launch3_fibers" } else { b"shim_launch3" };
        // SAFETY: runner.cpp defines both launchers with exactly this signature
        let launch3: Launch3Fn = unsafe { *self.lib.get::<Launch3Fn>(name).expect("shim_launch3 and shim_launch3_fibers in the library") };
        let _serial = self.launched.lock().unwrap();
        let dims = [grid.0, grid.1, grid.2, block.0, block.1, block.2];
        let r: &(dyn Fn() + Sync) = f;
        // SAFETY: as in `launch`; `dims` outlives the call
        unsafe { launch3(dims.as_ptr(), shared, call_body, &r as *const &(dyn Fn() + Sync) as *mut c_void) };
    }
}

/// Launch shapes of an element-wise (grid-stride) kernel over `n` items: two small ones and the
/// one `Gpu::launch_n` uses.
fn shapes_n(n: usize) -> [(u32, u32); 3] {
    [(3, 32), (1, 64), (n.div_ceil(256).clamp(1, 65_535) as u32, 256)]
}

/// Launch shapes of a block-per-row kernel: two small ones and the one `Gpu::launch_rows` uses.
fn shapes_rows(rows: usize) -> [(u32, u32); 3] {
    [(3, 32), (1, 64), (rows.clamp(1, 65_535) as u32, 256)]
}

fn addr<T>(v: &[T]) -> usize {
    v.as_ptr() as usize
}
fn addr_mut<T>(v: &mut [T]) -> usize {
    v.as_mut_ptr() as usize
}
fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}
fn scaled(v: Vec<f32>, s: f32) -> Vec<f32> {
    v.into_iter().map(|x| x * s).collect()
}
fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape)
}
fn cst(v: &[f32], shape: &[usize]) -> Var {
    Var::constant(t(v, shape))
}
fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// The 16-bit formats as the kernels see them: name, the `bf` launch flag, rounding from f32 and
/// exact widening (the `half` crate's conversions, the CPU reference's).
const HALF_FORMATS: [(&str, u32, fn(f32) -> u16, fn(u16) -> f32); 2] = [("f16", 0, f16_bits, f16_value), ("bf16", 1, bf16_bits, bf16_value)];
fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}
fn f16_value(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}
fn bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}
fn bf16_value(h: u16) -> f32 {
    bf16::from_bits(h).to_f32()
}

/// 16-bit outputs against the expected bit patterns: the number that differ (the error a check
/// records against a tolerance of 0) and the first of them as the problem.
fn bits16_mismatches(got: &[u16], want: &[u16]) -> (f64, Option<String>) {
    let b: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
    (b.len() as f64, b.first().map(|&i| format!("{} of {} differ; first at {i}: {:#06x}, want {:#06x}", b.len(), want.len(), got[i], want[i])))
}

// ---------------------------------------------------------------- comparisons

/// The comparisons of one file's test: every failure is collected, the worst error per kernel
/// reported, and the file's kernels all required to have been launched.
struct Checks {
    file: &'static str,
    worst: BTreeMap<String, (f64, f64, usize)>,
    failures: Vec<String>,
}

impl Checks {
    fn new(file: &'static str) -> Checks {
        Checks { file, worst: BTreeMap::new(), failures: Vec::new() }
    }

    fn record(&mut self, kernel: &str, case: &str, err: f64, tol: f64, problem: Option<String>) {
        let e = if err.is_nan() { f64::INFINITY } else { err };
        let w = self.worst.entry(kernel.to_string()).or_insert((0.0, tol, 0));
        w.0 = w.0.max(e);
        w.1 = w.1.max(tol);
        w.2 += 1;
        if let Some(p) = problem {
            let msg = format!("{kernel} [{case}]: {p}");
            eprintln!("FAIL {msg}");
            self.failures.push(msg);
        }
    }

    /// `got` against `want`: same length, no element left NaN where `want` is a number, and
    /// `rel_err ≤ tol`.
    fn f32s(&mut self, kernel: &str, case: &str, got: &[f32], want: &[f32], tol: f64) {
        if got.len() != want.len() {
            self.record(kernel, case, f64::INFINITY, tol, Some(format!("{} values, want {}", got.len(), want.len())));
            return;
        }
        let unwritten: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_nan() && !want[i].is_nan()).collect();
        let e = rel_err(got, want);
        let problem = if !unwritten.is_empty() {
            Some(format!("{} of {} elements not written (NaN), first at {}", unwritten.len(), got.len(), unwritten[0]))
        } else if e.is_nan() || e > tol {
            let (i, _) = (0..got.len()).map(|i| (i, (got[i] as f64 - want[i] as f64).abs())).fold((0, -1.0), |a, b| if b.1 > a.1 { b } else { a });
            Some(format!("rel err {e:.3e} > {tol:.0e}; largest difference at {i}: got {} want {} (n = {})", got[i], want[i], got.len()))
        } else {
            None
        };
        self.record(kernel, case, e, tol, problem);
    }

    /// One f64 value against another, relatively.
    fn f64s(&mut self, kernel: &str, case: &str, got: f64, want: f64, tol: f64) {
        let e = (got - want).abs() / want.abs().max(1e-300);
        let problem = (e.is_nan() || e > tol).then(|| format!("got {got:e} want {want:e}, rel err {e:.3e} > {tol:.0e}"));
        self.record(kernel, case, e, tol, problem);
    }

    /// Prints the table; fails on any failure or on a kernel of the file that was not launched.
    fn finish(mut self, lib: &Lib) {
        let have = parse_kernels(&std::fs::read_to_string(kernel_dir().join(self.file)).expect("read the kernel file"));
        let launched = lib.launched.lock().unwrap().clone();
        for k in have.difference(&launched) {
            self.failures.push(format!("kernel {k} of {} has no CPU-shim check (add it to tests/kernels_on_cpu.rs)", self.file));
        }
        println!("{}: kernel, worst rel err, tolerance, checks", self.file);
        for (k, (e, tol, n)) in &self.worst {
            println!("  {k:34} {e:10.3e}  {tol:.0e}  {n}");
        }
        assert!(self.failures.is_empty(), "{}: {} failed check(s):\n  {}", self.file, self.failures.len(), self.failures.join("\n  "));
    }
}

/// Names of the `__global__` functions of a CUDA source (comments ignored).
fn parse_kernels(src: &str) -> BTreeSet<String> {
    let code: String = src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut out = BTreeSet::new();
    for piece in code.split("__global__").skip(1) {
        let rest = piece.trim_start();
        let rest = rest.strip_prefix("void").unwrap_or_else(|| panic!("a __global__ function that does not return void: {}", &rest[..rest.len().min(60)]));
        let name: String = rest.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        assert!(!name.is_empty(), "unparsable __global__ declaration");
        out.insert(name);
    }
    out
}

#[test]
fn every_kernel_has_a_cpu_shim_check() {
    let dir = kernel_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| n.ends_with(".cu")).collect();
    files.sort();
    let listed: BTreeMap<&str, BTreeSet<String>> = TESTED.iter().map(|(f, ks)| (*f, ks.iter().map(|k| k.to_string()).collect())).collect();
    let mut problems = Vec::new();
    for f in &files {
        let have = parse_kernels(&std::fs::read_to_string(dir.join(f)).unwrap());
        match listed.get(f.as_str()) {
            None => problems.push(format!("{f} ({} kernels) has no test in tests/kernels_on_cpu.rs", have.len())),
            Some(want) => {
                for k in have.difference(want) {
                    problems.push(format!("{f}: kernel {k} has no CPU-shim check"));
                }
                for k in want.difference(&have) {
                    problems.push(format!("{f}: kernel {k} is listed but not in the source"));
                }
            }
        }
    }
    for f in listed.keys() {
        if !files.iter().any(|x| x == f) {
            problems.push(format!("{f} is listed but is not in {}", dir.display()));
        }
    }
    let total: usize = listed.values().map(|s| s.len()).sum();
    assert!(problems.is_empty(), "kernels without CPU-shim checks:\n  {}", problems.join("\n  "));
    println!("{} kernels in {} files, all covered", total, files.len());
}

// ---------------------------------------------------------------- optim.cu

/// adam_clip_ema_f32: three steps of the per-tensor path (clip_grads_with_norm, Adam::step,
/// ema_update — the CPU twin of the one pass, bit for bit), with clipping active and not,
/// weight decay on and off, with and without the EMA (a null pointer).
#[test]
fn optim_kernels_match_the_cpu_backend() {
    let Some(lib) = Lib::load("optim.cu") else { return };
    let mut c = Checks::new("optim.cu");
    let mut r = Rng::new(0x5eed_0007);
    let n = 1000usize;
    type K = unsafe extern "C" fn(M, P, M, M, M, I, f32, f32, f32, f32, f32, f32, f32, f32, f32);
    let k: K = lib.k("adam_clip_ema_f32");
    for (wd, max_norm, with_ema) in [(0.0f32, 1.0f32, true), (0.01, 1e9, true), (0.01, 1.0, false)] {
        let (p0, e0) = (r.normal_vec(n), r.normal_vec(n));
        let grads: Vec<Vec<f32>> = (0..3).map(|_| r.normal_vec(n)).collect();
        let (lrs, decay) = ([1e-3f32, 2e-3, 5e-4], 0.99f32);
        let mut adam = Adam::new(1e-3);
        adam.weight_decay = wd;
        let (mut params, mut ema) = (vec![t(&p0, &[n])], vec![t(&e0, &[n])]);
        let mut coefs = Vec::new();
        for (g, &lr) in grads.iter().zip(&lrs) {
            let mut gs = vec![t(g, &[n])];
            let norm = grad_norm(&gs).unwrap();
            coefs.push(clip_coef(norm, max_norm));
            clip_grads_with_norm(&mut gs, norm, max_norm).unwrap();
            adam.step(&mut params, &gs, lr).unwrap();
            if with_ema {
                ema_update(&mut ema, &params, decay).unwrap();
            }
        }
        assert_eq!(coefs.iter().any(|&s| s < 1.0), max_norm < 10.0, "clipping active exactly when meant");
        let (wp, wm, wv, we) = (params[0].to_vec(), adam.exp_avg[0].to_vec(), adam.exp_avg_sq[0].to_vec(), ema[0].to_vec());
        for sh in shapes_n(n) {
            let (mut p, mut m, mut v, mut e) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n], e0.clone());
            for (step, ((g, &lr), &scale)) in grads.iter().zip(&lrs).zip(&coefs).enumerate() {
                let step = step as i32 + 1;
                let (b1, b2, eps) = (adam.beta1, adam.beta2, adam.eps);
                let bc1 = 1.0 - (b1 as f64).powi(step);
                let bc2_sqrt = (1.0 - (b2 as f64).powi(step)).sqrt() as f32;
                let step_size = (lr as f64 / bc1) as f32;
                let (pp, gp, mp, vp) = (addr_mut(&mut p), addr(g), addr_mut(&mut m), addr_mut(&mut v));
                let ep = if with_ema { addr_mut(&mut e) } else { 0 };
                lib.launch(sh, &|| unsafe { k(pp as M, gp as P, mp as M, vp as M, ep as M, n as I, scale, step_size, b1, b2, eps, bc2_sqrt, wd, 1.0 - decay, decay) });
            }
            let case = format!("wd {wd}, max norm {max_norm}, ema {with_ema}, {sh:?}");
            c.f32s("adam_clip_ema_f32", &format!("p, {case}"), &p, &wp, EXACT);
            c.f32s("adam_clip_ema_f32", &format!("m, {case}"), &m, &wm, EXACT);
            c.f32s("adam_clip_ema_f32", &format!("v, {case}"), &v, &wv, EXACT);
            c.f32s("adam_clip_ema_f32", &format!("ema, {case}"), &e, &we, EXACT);
            let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(bits(&p, &wp) && bits(&m, &wm) && bits(&v, &wv) && bits(&e, &we), "adam_clip_ema_f32 [{case}]: not bit-identical to the per-tensor path");
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- elementwise.cu

#[test]
fn elementwise_kernels_match_the_cpu_backend() {
    let Some(lib) = Lib::load("elementwise.cu") else { return };
    let mut c = Checks::new("elementwise.cu");
    let mut r = Rng::new(0x5eed_0001);
    let n = 1000usize;

    // adam_step_f32: three steps of optim::Adam (with and without weight decay), the scalars
    // computed as Adam::step computes them for the GPU
    {
        let k: unsafe extern "C" fn(M, P, M, M, I, f32, f32, f32, f32, f32, f32) = lib.k("adam_step_f32");
        for wd in [0.0f32, 0.01] {
            let p0 = r.normal_vec(n);
            let grads: Vec<Vec<f32>> = (0..3).map(|_| r.normal_vec(n)).collect();
            let lrs = [1e-3f32, 2e-3, 5e-4];
            let mut adam = Adam::new(1e-3);
            adam.weight_decay = wd;
            let mut params = vec![t(&p0, &[n])];
            for (g, &lr) in grads.iter().zip(&lrs) {
                adam.step(&mut params, &[t(g, &[n])], lr).unwrap();
            }
            let (wp, wm, wv) = (params[0].to_vec(), adam.exp_avg[0].to_vec(), adam.exp_avg_sq[0].to_vec());
            for sh in shapes_n(n) {
                let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
                for (step, (g, &lr)) in grads.iter().zip(&lrs).enumerate() {
                    let step = step as i32 + 1;
                    let (b1, b2, eps) = (adam.beta1, adam.beta2, adam.eps);
                    let bc1 = 1.0 - (b1 as f64).powi(step);
                    let bc2_sqrt = (1.0 - (b2 as f64).powi(step)).sqrt() as f32;
                    let step_size = (lr as f64 / bc1) as f32;
                    let (pp, gp, mp, vp) = (addr_mut(&mut p), addr(g), addr_mut(&mut m), addr_mut(&mut v));
                    lib.launch(sh, &|| unsafe { k(pp as M, gp as P, mp as M, vp as M, n as I, step_size, b1, b2, eps, bc2_sqrt, wd) });
                }
                let case = format!("wd {wd}, {sh:?}");
                c.f32s("adam_step_f32", &format!("p, {case}"), &p, &wp, EXACT);
                c.f32s("adam_step_f32", &format!("m, {case}"), &m, &wm, EXACT);
                c.f32s("adam_step_f32", &format!("v, {case}"), &v, &wv, EXACT);
            }
        }
    }
    // fill_f32 (Tensor::full; ops::full and narrow_backward's zeros)
    {
        let k: unsafe extern "C" fn(M, f32, I) = lib.k("fill_f32");
        for v in [0.0f32, -2.5] {
            let want = Tensor::full(&[n], v).to_vec();
            for sh in shapes_n(n) {
                let mut y = nan(n);
                let yp = addr_mut(&mut y);
                lib.launch(sh, &|| unsafe { k(yp as M, v, n as I) });
                c.f32s("fill_f32", &format!("{v}, {sh:?}"), &y, &want, EXACT);
            }
        }
    }
    // axpby_f32: optim::ema_update (a = 1 − decay, b = decay) and the gradient accumulation of
    // Var::backward_with (a = b = 1; CPU: elementwise::add_assign)
    {
        let k: unsafe extern "C" fn(f32, P, f32, M, I) = lib.k("axpby_f32");
        let (src, y0) = (r.normal_vec(n), r.normal_vec(n));
        let decay = 0.9999f32;
        let mut target = vec![t(&y0, &[n])];
        ema_update(&mut target, &[t(&src, &[n])], decay).unwrap();
        let want_ema = target[0].to_vec();
        let mut want_acc = y0.clone();
        ew::add_assign(&mut want_acc, &src);
        for sh in shapes_n(n) {
            for (case, a, b, want) in [("ema", 1.0 - decay, decay, &want_ema), ("accumulate", 1.0, 1.0, &want_acc)] {
                let mut y = y0.clone();
                let (xp, yp) = (addr(&src), addr_mut(&mut y));
                lib.launch(sh, &|| unsafe { k(a, xp as P, b, yp as M, n as I) });
                c.f32s("axpby_f32", &format!("{case}, {sh:?}"), &y, want, EXACT);
            }
        }
    }
    // unary_f32 / unary_backward_f32, op codes as backend::cuda::ops::Un, against the autograd
    // ops on the CPU (forward values, and gradients through Var::backward_with)
    {
        let kf: unsafe extern "C" fn(I, f32, P, M, I) = lib.k("unary_f32");
        let kb: unsafe extern "C" fn(I, P, P, P, M, I) = lib.k("unary_backward_f32");
        let x = scaled(r.normal_vec(n), 3.0);
        let g = r.normal_vec(n);
        let s = 0.7f32;
        for op in 0..10i64 {
            let xv = Var::param(t(&x, &[n]));
            let y = match op {
                0 => ops::add_scalar(&xv, s).unwrap(),
                1 => ops::mul_scalar(&xv, s).unwrap(),
                2 => ops::exp(&xv).unwrap(),
                3 => ops::relu(&xv).unwrap(),
                4 => ops::square(&xv).unwrap(),
                5 => ops::silu(&xv).unwrap(),
                6 => ops::sigmoid(&xv).unwrap(),
                8 => ops::gelu(&xv).unwrap(),
                9 => ops::quick_gelu(&xv).unwrap(),
                // Neg is launched for sub's gradient of b: −g
                _ => ops::sub(&cst(&vec![0.0; n], &[n]), &xv).unwrap(),
            };
            let want = if op == 7 { y.backward_with(t(&x, &[n])).unwrap().get(&xv).unwrap().to_vec() } else { y.value().to_vec() };
            let sc = if op <= 1 { s } else { 0.0 };
            let tol = if op == 5 || op == 6 || op == 8 || op == 9 { APPROX } else { EXACT };
            for sh in shapes_n(n) {
                let mut out = nan(n);
                let (xp, op_) = (addr(&x), addr_mut(&mut out));
                lib.launch(sh, &|| unsafe { kf(op, sc, xp as P, op_ as M, n as I) });
                c.f32s("unary_f32", &format!("op {op}, {sh:?}"), &out, &want, tol);
            }
            // the host launches unary_backward for AddScalar's grad (identity), Exp, Relu,
            // Square (through ops::unary), Silu and Sigmoid; Neg (7) is checked too
            if [0, 2, 3, 4, 5, 6, 7, 8, 9].contains(&op) {
                let want_g = y.backward_with(t(&g, &[n])).unwrap().get(&xv).unwrap().to_vec();
                let yv = y.value().to_vec();
                let tol = if op == 5 || op == 8 || op == 9 { APPROX } else { EXACT };
                for sh in shapes_n(n) {
                    let mut dx = nan(n);
                    let (gp, xp, yp, dp) = (addr(&g), addr(&x), addr(&yv), addr_mut(&mut dx));
                    lib.launch(sh, &|| unsafe { kb(op, gp as P, xp as P, yp as P, dp as M, n as I) });
                    c.f32s("unary_backward_f32", &format!("op {op}, {sh:?}"), &dx, &want_g, tol);
                }
            }
        }
    }
    // binary_f32 (broadcasting, BinGeom::new) and binary_same_f32, op codes as ops::Bin, against
    // ops::{add, sub, mul, div} (elementwise::binary)
    {
        let kb: unsafe extern "C" fn(I, P, P, M, I, BinGeom) = lib.k("binary_f32");
        let ks: unsafe extern "C" fn(I, P, P, M, I) = lib.k("binary_same_f32");
        let cases: [(&[usize], &[usize]); 6] = [(&[4, 1, 5, 7], &[3, 1, 7]), (&[2, 3, 41], &[41]), (&[1], &[5, 67]), (&[6, 1], &[1, 59]), (&[], &[3, 45]), (&[10, 101], &[10, 101])];
        for (sa, sb) in cases {
            let out = ew::broadcast_shape(sa, sb).unwrap();
            let on = numel(&out);
            let a = r.normal_vec(numel(sa));
            // divisors away from zero
            let b: Vec<f32> = (0..numel(sb)).map(|_| r.uniform_range(0.5, 2.0) * if r.uniform() < 0.5 { -1.0 } else { 1.0 }).collect();
            for op in 0..4i64 {
                let (av, bv) = (cst(&a, sa), cst(&b, sb));
                let want = match op {
                    0 => ops::add(&av, &bv).unwrap(),
                    1 => ops::sub(&av, &bv).unwrap(),
                    2 => ops::mul(&av, &bv).unwrap(),
                    _ => ops::div(&av, &bv).unwrap(),
                }
                .value()
                .to_vec();
                let same = sa == out.as_slice() && sb == out.as_slice();
                let geom = BinGeom::new(sa, sb, &out);
                for sh in shapes_n(on) {
                    let mut y = nan(on);
                    let (ap, bp, yp) = (addr(&a), addr(&b), addr_mut(&mut y));
                    let case = format!("op {op}, {sa:?} with {sb:?}, {sh:?}");
                    if same {
                        lib.launch(sh, &|| unsafe { ks(op, ap as P, bp as P, yp as M, on as I) });
                        c.f32s("binary_same_f32", &case, &y, &want, EXACT);
                    } else {
                        lib.launch(sh, &|| unsafe { kb(op, ap as P, bp as P, yp as M, on as I, geom) });
                        c.f32s("binary_f32", &case, &y, &want, EXACT);
                    }
                }
            }
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- reduce.cu

#[test]
fn reduce_kernels_match_the_cpu_backend() {
    let Some(lib) = Lib::load("reduce.cu") else { return };
    let mut c = Checks::new("reduce.cu");
    let mut r = Rng::new(0x5eed_0002);

    // reduce_sum_f32: ops::sum_to_shape's geometry (ReduceGeom::new), block per output value;
    // CPU: elementwise::sum_to_shape
    {
        let k: unsafe extern "C" fn(P, M, I, I, ReduceGeom) = lib.k("reduce_sum_f32");
        let cases: [(&[usize], &[usize]); 7] = [
            (&[2, 3, 4, 5], &[1, 3, 1, 5]),
            (&[2, 3, 4, 5], &[4, 1]),
            (&[6, 7, 9], &[9]),
            (&[37, 11], &[1, 11]),
            (&[5, 300], &[5, 1]),
            (&[3, 5, 7, 6], &[]),
            (&[2, 7, 5, 3], &[7, 1, 1]), // a convolution's bias gradient
        ];
        for (from, to) in cases {
            let x = r.normal_vec(numel(from));
            let want = ew::sum_to_shape(&x, from, to);
            let (geom, out_n, red_n) = ReduceGeom::new(from, to);
            assert!(red_n > 1, "the host does not launch for red_n = 1");
            for sh in shapes_rows(out_n) {
                let mut y = nan(out_n);
                let (xp, yp) = (addr(&x), addr_mut(&mut y));
                lib.launch(sh, &|| unsafe { k(xp as P, yp as M, out_n as I, red_n as I, geom) });
                c.f32s("reduce_sum_f32", &format!("{from:?} -> {to:?}, {sh:?}"), &y, &want, EXACT);
            }
        }
    }
    // sum_squares_partial_f32: ops::sum_squares (partials per tensor, summed on the host, sqrt)
    // against optim::grad_norm
    {
        let k: unsafe extern "C" fn(P, I, *mut f64) = lib.k("sum_squares_partial_f32");
        let ts: Vec<Vec<f32>> = [1000usize, 37, 5000].iter().map(|&n| r.normal_vec(n)).collect();
        let want = grad_norm(&ts.iter().map(|v| t(v, &[v.len()])).collect::<Vec<_>>()).unwrap();
        for sh in [(3, 32), (1, 64), (64, 256)] {
            let mut total = 0.0f64;
            let mut unwritten = 0;
            for x in &ts {
                let mut partial = vec![f64::NAN; sh.0 as usize];
                let (xp, pp, n) = (addr(x), addr_mut(&mut partial), x.len());
                lib.launch(sh, &|| unsafe { k(xp as P, n as I, pp as *mut f64) });
                unwritten += partial.iter().filter(|v| v.is_nan()).count();
                total += partial.iter().sum::<f64>();
            }
            let case = format!("{sh:?}");
            if unwritten > 0 {
                c.record("sum_squares_partial_f32", &case, f64::INFINITY, EXACT, Some(format!("{unwritten} partials not written")));
            }
            c.f64s("sum_squares_partial_f32", &case, total.sqrt(), want, EXACT);
        }
    }
    // sum_partials_split_f64: one block adds the partials and splits the f64 sum into the f32 pair
    // [hi, lo] of CpuStorage::sum_squares_on_device (split_f64); also a sum past f32's range
    {
        let k: unsafe extern "C" fn(*const f64, I, M) = lib.k("sum_partials_split_f64");
        let cases: Vec<Vec<f64>> = vec![r.normal_vec(192).iter().map(|&v| (v as f64).abs() * 1e3 + 1.0 / 3.0).collect(), vec![1.0 / 3.0], vec![3e38, 3e38]];
        for sh in [(1, 32), (1, 64), (1, 256)] {
            for p in &cases {
                let want = orwcfm_fast::backend::cpu::storage::split_f64(p.iter().sum::<f64>());
                let mut out = [f32::NAN; 2];
                let (pp, op) = (p.as_ptr() as usize, addr_mut(&mut out));
                lib.launch(sh, &|| unsafe { k(pp as *const f64, p.len() as I, op as M) });
                let case = format!("{} partials, {sh:?}", p.len());
                // hi exactly; the pair's sum to 1e-12 (the block adds in another order than the host)
                let (g, w) = (out[0] as f64 + out[1] as f64, want[0] as f64 + want[1] as f64);
                let ok = out[0].to_bits() == want[0].to_bits() && (out[0].is_infinite() && out[1] == 0.0 || (g - w).abs() <= 1e-12 * w.abs());
                let why = (!ok).then(|| format!("got [{}, {}], want [{}, {}]", out[0], out[1], want[0], want[1]));
                c.record("sum_partials_split_f64", &case, if ok { 0.0 } else { f64::INFINITY }, 0.0, why);
            }
        }
    }
    // softmax_rows_f32 / softmax_rows_backward_f32 (elementwise::softmax_rows[_backward]), also in
    // place as attention launches them (y = x; dx = dy)
    {
        let kf: unsafe extern "C" fn(P, M, I, I) = lib.k("softmax_rows_f32");
        let kb: unsafe extern "C" fn(P, P, M, I, I) = lib.k("softmax_rows_backward_f32");
        let rows = 13usize;
        for n in [37usize, 300] {
            let x = scaled(r.normal_vec(rows * n), 3.0);
            let want = ew::softmax_rows(&x, n);
            let dy = r.normal_vec(rows * n);
            let want_b = ew::softmax_rows_backward(&want, &dy, n);
            for sh in shapes_rows(rows) {
                let mut y = nan(rows * n);
                let (xp, yp) = (addr(&x), addr_mut(&mut y));
                lib.launch(sh, &|| unsafe { kf(xp as P, yp as M, rows as I, n as I) });
                c.f32s("softmax_rows_f32", &format!("n {n}, {sh:?}"), &y, &want, APPROX);
                let mut dx = nan(rows * n);
                let (yp, gp, dp) = (addr(&want), addr(&dy), addr_mut(&mut dx));
                lib.launch(sh, &|| unsafe { kb(yp as P, gp as P, dp as M, rows as I, n as I) });
                c.f32s("softmax_rows_backward_f32", &format!("n {n}, {sh:?}"), &dx, &want_b, APPROX);
            }
            let sh = shapes_rows(rows)[2];
            let mut inplace = x.clone();
            let p = addr_mut(&mut inplace);
            lib.launch(sh, &|| unsafe { kf(p as P, p as M, rows as I, n as I) });
            c.f32s("softmax_rows_f32", &format!("in place, n {n}"), &inplace, &want, APPROX);
            let mut inplace = dy.clone();
            let (yp, p) = (addr(&want), addr_mut(&mut inplace));
            lib.launch(sh, &|| unsafe { kb(yp as P, p as P, p as M, rows as I, n as I) });
            c.f32s("softmax_rows_backward_f32", &format!("in place, n {n}"), &inplace, &want_b, APPROX);
        }
    }
    // log_softmax_rows_f32 / _backward_f32: ops::log_softmax forward and its backward closure
    {
        let kf: unsafe extern "C" fn(P, M, I, I) = lib.k("log_softmax_rows_f32");
        let kb: unsafe extern "C" fn(P, P, M, I, I) = lib.k("log_softmax_rows_backward_f32");
        let rows = 11usize;
        for n in [10usize, 300] {
            let x = scaled(r.normal_vec(rows * n), 3.0);
            let g = r.normal_vec(rows * n);
            let xv = Var::param(t(&x, &[rows, n]));
            let y = ops::log_softmax(&xv).unwrap();
            let want = y.value().to_vec();
            let want_b = y.backward_with(t(&g, &[rows, n])).unwrap().get(&xv).unwrap().to_vec();
            for sh in shapes_rows(rows) {
                let mut out = nan(rows * n);
                let (xp, op) = (addr(&x), addr_mut(&mut out));
                lib.launch(sh, &|| unsafe { kf(xp as P, op as M, rows as I, n as I) });
                c.f32s("log_softmax_rows_f32", &format!("n {n}, {sh:?}"), &out, &want, EXACT);
                let mut dx = nan(rows * n);
                let (yp, gp, dp) = (addr(&want), addr(&g), addr_mut(&mut dx));
                lib.launch(sh, &|| unsafe { kb(yp as P, gp as P, dp as M, rows as I, n as I) });
                c.f32s("log_softmax_rows_backward_f32", &format!("n {n}, {sh:?}"), &dx, &want_b, APPROX);
            }
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- shape.cu

#[test]
fn shape_kernels_match_the_cpu_backend() {
    let Some(lib) = Lib::load("shape.cu") else { return };
    let mut c = Checks::new("shape.cu");
    let mut r = Rng::new(0x5eed_0003);

    // gather_strided_f32 (Strided::new): permutations (Tensor::permute) and broadcasts
    // (ops::broadcast_to), against elementwise::gather_strided / broadcast_to
    {
        let k: unsafe extern "C" fn(P, M, I, Strided) = lib.k("gather_strided_f32");
        let xs = [2usize, 3, 4, 5];
        let x = r.normal_vec(numel(&xs));
        let st = contiguous_strides(&xs);
        for perm in [[0usize, 2, 3, 1], [3, 1, 0, 2], [0, 1, 2, 3]] {
            let shape: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
            let strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            let want = ew::gather_strided(&x, &shape, &strides);
            let s = Strided::new(&shape, &strides);
            let nn = numel(&shape);
            for sh in shapes_n(nn) {
                let mut y = nan(nn);
                let (xp, yp) = (addr(&x), addr_mut(&mut y));
                lib.launch(sh, &|| unsafe { k(xp as P, yp as M, nn as I, s) });
                c.f32s("gather_strided_f32", &format!("permute {perm:?}, {sh:?}"), &y, &want, EXACT);
            }
        }
        let cases: [(&[usize], &[usize]); 3] = [(&[3, 1, 5], &[2, 3, 4, 5]), (&[], &[7, 13]), (&[1, 17], &[9, 17])];
        for (from, to) in cases {
            let x = r.normal_vec(numel(from));
            let want = ew::broadcast_to(&x, from, to);
            let s = Strided::new(to, &ew::broadcast_strides(from, to));
            let nn = numel(to);
            for sh in shapes_n(nn) {
                let mut y = nan(nn);
                let (xp, yp) = (addr(&x), addr_mut(&mut y));
                lib.launch(sh, &|| unsafe { k(xp as P, yp as M, nn as I, s) });
                c.f32s("gather_strided_f32", &format!("broadcast {from:?} -> {to:?}, {sh:?}"), &y, &want, EXACT);
            }
        }
    }
    // copy_slab_f32, driven as ops::concat / narrow / narrow_backward drive it, against
    // elementwise::concat / narrow / narrow_backward
    {
        type CopySlab = unsafe extern "C" fn(P, M, I, I, I, I, I, I);
        let k: CopySlab = lib.k("copy_slab_f32");
        #[allow(clippy::too_many_arguments)]
        fn slab(lib: &Lib, k: CopySlab, sh: (u32, u32), src: usize, dst: usize, outer: usize, len: usize, ss: usize, so: usize, ds: usize, d_o: usize) {
            lib.launch(sh, &|| unsafe { k(src as P, dst as M, outer as I, len as I, ss as I, so as I, ds as I, d_o as I) });
        }
        let outer_inner = |s: &[usize], axis: usize| -> (usize, usize) { (numel(&s[..axis]), numel(&s[axis + 1..])) };
        for axis in [0usize, 1, 3] {
            let parts_shapes: Vec<Vec<usize>> = [3usize, 1, 2]
                .iter()
                .map(|&d| {
                    let mut s = vec![2usize, 3, 4, 5];
                    s[axis] = d;
                    s
                })
                .collect();
            let parts: Vec<Vec<f32>> = parts_shapes.iter().map(|s| r.normal_vec(numel(s))).collect();
            let refs: Vec<(&[f32], &[usize])> = parts.iter().zip(&parts_shapes).map(|(p, s)| (p.as_slice(), s.as_slice())).collect();
            let (want, shape) = ew::concat(&refs, axis);
            let (outer, inner) = outer_inner(&shape, axis);
            for sh in shapes_n(want.len()) {
                let mut y = nan(want.len());
                let yp = addr_mut(&mut y);
                let mut start = 0;
                for (p, ps) in parts.iter().zip(&parts_shapes) {
                    let len = ps[axis] * inner;
                    slab(&lib, k, sh, addr(p), yp, outer, len, len, 0, shape[axis] * inner, start * inner);
                    start += ps[axis];
                }
                c.f32s("copy_slab_f32", &format!("concat axis {axis}, {sh:?}"), &y, &want, EXACT);
            }
        }
        let xs = [3usize, 7, 5, 2];
        let x = r.normal_vec(numel(&xs));
        for (axis, start, len) in [(1usize, 2usize, 3usize), (0, 1, 2), (2, 1, 4), (3, 1, 1)] {
            let (outer, inner) = outer_inner(&xs, axis);
            let want = ew::narrow(&x, &xs, axis, start, len);
            let g = r.normal_vec(want.len());
            let want_b = ew::narrow_backward(&g, &xs, axis, start, len);
            for sh in shapes_n(want.len()) {
                let mut y = nan(want.len());
                slab(&lib, k, sh, addr(&x), addr_mut(&mut y), outer, len * inner, xs[axis] * inner, start * inner, len * inner, 0);
                c.f32s("copy_slab_f32", &format!("narrow axis {axis} [{start}, +{len}), {sh:?}"), &y, &want, EXACT);
                // narrow_backward: zeros (fill_f32, checked in elementwise.cu's test), then the slab
                let mut gx = vec![0.0f32; x.len()];
                slab(&lib, k, sh, addr(&g), addr_mut(&mut gx), outer, len * inner, len * inner, 0, xs[axis] * inner, start * inner);
                c.f32s("copy_slab_f32", &format!("narrow_backward axis {axis} [{start}, +{len}), {sh:?}"), &gx, &want_b, EXACT);
            }
        }
    }
    // upsample_nearest2x / avg_pool2x and their backwards: image_op(nc, h, w of the small/input image)
    {
        type Img = unsafe extern "C" fn(P, M, I, I, I);
        let kup: Img = lib.k("upsample_nearest2x_f32");
        let kupb: Img = lib.k("upsample_nearest2x_backward_f32");
        let kap: Img = lib.k("avg_pool2x_f32");
        let kapb: Img = lib.k("avg_pool2x_backward_f32");
        let run = |k: Img, sh: (u32, u32), x: &[f32], out_n: usize, nc: usize, h: usize, w: usize| -> Vec<f32> {
            let mut y = nan(out_n);
            let (xp, yp) = (addr(x), addr_mut(&mut y));
            lib.launch(sh, &|| unsafe { k(xp as P, yp as M, nc as I, h as I, w as I) });
            y
        };
        let (nc, h, w) = (6usize, 5usize, 7usize);
        let x = r.normal_vec(nc * h * w);
        let g = r.normal_vec(nc * 4 * h * w);
        let want = ew::upsample_nearest2x(&x, nc, h, w);
        let want_b = ew::upsample_nearest2x_backward(&g, nc, h, w);
        for sh in shapes_n(want.len()) {
            c.f32s("upsample_nearest2x_f32", &format!("{sh:?}"), &run(kup, sh, &x, want.len(), nc, h, w), &want, EXACT);
            c.f32s("upsample_nearest2x_backward_f32", &format!("{sh:?}"), &run(kupb, sh, &g, want_b.len(), nc, h, w), &want_b, EXACT);
        }
        for (h, w) in [(7usize, 9usize), (6, 8)] {
            let x = r.normal_vec(nc * h * w);
            let want = ew::avg_pool2x(&x, nc, h, w);
            let g = r.normal_vec(want.len());
            let want_b = ew::avg_pool2x_backward(&g, nc, h, w);
            for sh in shapes_n(x.len()) {
                c.f32s("avg_pool2x_f32", &format!("{h}x{w}, {sh:?}"), &run(kap, sh, &x, want.len(), nc, h, w), &want, EXACT);
                c.f32s("avg_pool2x_backward_f32", &format!("{h}x{w}, {sh:?}"), &run(kapb, sh, &g, x.len(), nc, h, w), &want_b, EXACT);
            }
        }
    }
    // embedding_forward_f32 / embedding_backward_f32 (ids as i32), against ops::embedding and its
    // backward closure; classes 4 and 5 never occur (their gradient rows must be written as 0)
    {
        let kf: unsafe extern "C" fn(P, *const i32, M, I, I) = lib.k("embedding_forward_f32");
        let kb: unsafe extern "C" fn(P, *const i32, M, I, I, I) = lib.k("embedding_backward_f32");
        let (num, dim) = (7usize, 10usize);
        let ids = [3usize, 0, 3, 6, 1, 3, 0, 2, 6, 6, 1];
        let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let w = r.normal_vec(num * dim);
        let g = r.normal_vec(ids.len() * dim);
        let wv = Var::param(t(&w, &[num, dim]));
        let y = ops::embedding(&wv, &ids).unwrap();
        let want = y.value().to_vec();
        let want_b = y.backward_with(t(&g, &[ids.len(), dim])).unwrap().get(&wv).unwrap().to_vec();
        let nids = ids.len();
        for sh in shapes_n(nids * dim) {
            let mut out = nan(nids * dim);
            let (wp, ip, op) = (addr(&w), addr(&ids32), addr_mut(&mut out));
            lib.launch(sh, &|| unsafe { kf(wp as P, ip as *const i32, op as M, nids as I, dim as I) });
            c.f32s("embedding_forward_f32", &format!("{sh:?}"), &out, &want, EXACT);
        }
        for sh in shapes_n(num * dim) {
            let mut gw = nan(num * dim);
            let (gp, ip, op) = (addr(&g), addr(&ids32), addr_mut(&mut gw));
            lib.launch(sh, &|| unsafe { kb(gp as P, ip as *const i32, op as M, nids as I, num as I, dim as I) });
            c.f32s("embedding_backward_f32", &format!("{sh:?}"), &gw, &want_b, EXACT);
        }
    }
    // timestep_embedding_f32 / _backward_f32 with log_max_period = (max_period as f64).ln() as f32,
    // against elementwise::timestep_embedding and ops::timestep_embedding's backward (max_period
    // 10000); even and odd dims
    {
        let kf: unsafe extern "C" fn(P, M, I, I, f32) = lib.k("timestep_embedding_f32");
        let kb: unsafe extern "C" fn(P, P, M, I, I, f32) = lib.k("timestep_embedding_backward_f32");
        let max_period = 10000.0f32;
        let lmp = (max_period as f64).ln() as f32;
        let mut tt = r.uniform_vec(9, 0.0, 1.0);
        tt[..3].copy_from_slice(&[0.0, 1.0, 0.5]);
        let b = tt.len();
        for dim in [32usize, 33, 7] {
            let want = ew::timestep_embedding(&tt, dim, max_period);
            let tv = Var::param(t(&tt, &[b]));
            let e = ops::timestep_embedding(&tv, dim).unwrap();
            let g = r.normal_vec(b * dim);
            let want_b = e.backward_with(t(&g, &[b, dim])).unwrap().get(&tv).unwrap().to_vec();
            let emb = e.value().to_vec();
            for sh in shapes_n(b * dim) {
                let mut out = nan(b * dim);
                let (tp, op) = (addr(&tt), addr_mut(&mut out));
                lib.launch(sh, &|| unsafe { kf(tp as P, op as M, b as I, dim as I, lmp) });
                c.f32s("timestep_embedding_f32", &format!("dim {dim}, {sh:?}"), &out, &want, EXACT);
                let mut gt = nan(b);
                let (ep, gp, op) = (addr(&emb), addr(&g), addr_mut(&mut gt));
                lib.launch(sh, &|| unsafe { kb(ep as P, gp as P, op as M, b as I, dim as I, lmp) });
                c.f32s("timestep_embedding_backward_f32", &format!("dim {dim}, {sh:?}"), &gt, &want_b, EXACT);
            }
        }
    }
    // add_channel_bias_f32: in place on a convolution's output; exactly y + b broadcast
    // (elementwise::binary), and close to conv2d_im2col_forward with the bias (which lays the
    // bias down first and accumulates the product onto it)
    {
        let k: unsafe extern "C" fn(M, P, I, I, I) = lib.k("add_channel_bias_f32");
        let g = ConvGeom { n: 2, cin: 3, h: 6, w: 7, cout: 5, kh: 3, kw: 3, stride: 1, pad: 1 };
        let x = r.normal_vec(g.n * g.cin * g.h * g.w);
        let w = r.normal_vec(g.cout * g.cin * g.kh * g.kw);
        let bias = r.normal_vec(g.cout);
        let y0 = conv2d_im2col_forward(&x, &w, None, &g);
        let ys = [g.n, g.cout, g.ho(), g.wo()];
        let want = ew::binary(&y0, &ys, &bias, &[1, g.cout, 1, 1], &ys, |a, b| a + b);
        let want_conv = conv2d_im2col_forward(&x, &w, Some(&bias), &g);
        let sp = g.ho() * g.wo();
        for sh in shapes_n(y0.len()) {
            let mut y = y0.clone();
            let (yp, bp) = (addr_mut(&mut y), addr(&bias));
            lib.launch(sh, &|| unsafe { k(yp as M, bp as P, g.n as I, g.cout as I, sp as I) });
            c.f32s("add_channel_bias_f32", &format!("y + b, {sh:?}"), &y, &want, EXACT);
            c.f32s("add_channel_bias_f32", &format!("conv2d with bias, {sh:?}"), &y, &want_conv, APPROX);
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- norm.cu

#[test]
fn norm_kernels_match_the_cpu_backend() {
    let Some(lib) = Lib::load("norm.cu") else { return };
    let mut c = Checks::new("norm.cu");
    let mut r = Rng::new(0x5eed_0004);
    let kf: unsafe extern "C" fn(P, P, P, M, M, M, I, I, I, I, f32) = lib.k("group_norm_forward_f32");
    let ki: unsafe extern "C" fn(P, P, P, P, P, M, I, I, I, I) = lib.k("group_norm_backward_input_f32");
    let ka: unsafe extern "C" fn(P, P, P, P, M, M, I, I, I, I) = lib.k("group_norm_backward_affine_f32");
    let eps = 1e-5f32;
    // (n, c, s, groups): several groups, one channel per group, one group with blk > 256
    for (n, ch, s, groups) in [(2usize, 6usize, 35usize, 3usize), (3, 8, 17, 8), (1, 4, 300, 1)] {
        let len = n * ch * s;
        let x: Vec<f32> = r.normal_vec(len).into_iter().map(|v| 1.5 * v + 0.7).collect();
        let gamma: Vec<f32> = r.normal_vec(ch).into_iter().map(|v| 1.0 + 0.3 * v).collect();
        let beta = r.normal_vec(ch);
        let dy = r.normal_vec(len);
        let (wy, wmean, wrstd) = norm::group_norm_forward(&x, n, ch, s, groups, eps, &gamma, &beta);
        let (wdx, wdg, wdb) = norm::group_norm_backward(&x, &dy, n, ch, s, groups, &gamma, &wmean, &wrstd);
        let ng = n * groups;
        let case = |sh: (u32, u32)| format!("n {n} c {ch} s {s} groups {groups}, {sh:?}");
        for sh in shapes_rows(ng) {
            let (mut y, mut mean, mut rstd) = (nan(len), nan(ng), nan(ng));
            let (xp, gp, bp, yp, mp, rp) = (addr(&x), addr(&gamma), addr(&beta), addr_mut(&mut y), addr_mut(&mut mean), addr_mut(&mut rstd));
            lib.launch(sh, &|| unsafe { kf(xp as P, gp as P, bp as P, yp as M, mp as M, rp as M, n as I, ch as I, s as I, groups as I, eps) });
            c.f32s("group_norm_forward_f32", &format!("y, {}", case(sh)), &y, &wy, EXACT);
            c.f32s("group_norm_forward_f32", &format!("mean, {}", case(sh)), &mean, &wmean, EXACT);
            c.f32s("group_norm_forward_f32", &format!("rstd, {}", case(sh)), &rstd, &wrstd, EXACT);
            let mut dx = nan(len);
            let (dyp, mp, rp, dp) = (addr(&dy), addr(&wmean), addr(&wrstd), addr_mut(&mut dx));
            lib.launch(sh, &|| unsafe { ki(xp as P, dyp as P, gp as P, mp as P, rp as P, dp as M, n as I, ch as I, s as I, groups as I) });
            c.f32s("group_norm_backward_input_f32", &case(sh), &dx, &wdx, EXACT);
        }
        for sh in shapes_rows(ch) {
            let (mut dg, mut db) = (nan(ch), nan(ch));
            let (xp, dyp, mp, rp, gp, bp) = (addr(&x), addr(&dy), addr(&wmean), addr(&wrstd), addr_mut(&mut dg), addr_mut(&mut db));
            lib.launch(sh, &|| unsafe { ka(xp as P, dyp as P, mp as P, rp as P, gp as M, bp as M, n as I, ch as I, s as I, groups as I) });
            c.f32s("group_norm_backward_affine_f32", &format!("dgamma, {}", case(sh)), &dg, &wdg, EXACT);
            c.f32s("group_norm_backward_affine_f32", &format!("dbeta, {}", case(sh)), &db, &wdb, EXACT);
        }
        // y may alias x
        let sh = shapes_rows(ng)[2];
        let (mut y, mut mean, mut rstd) = (x.clone(), nan(ng), nan(ng));
        let (yp, gp, bp, mp, rp) = (addr_mut(&mut y), addr(&gamma), addr(&beta), addr_mut(&mut mean), addr_mut(&mut rstd));
        lib.launch(sh, &|| unsafe { kf(yp as P, gp as P, bp as P, yp as M, mp as M, rp as M, n as I, ch as I, s as I, groups as I, eps) });
        c.f32s("group_norm_forward_f32", &format!("in place, {}", case(sh)), &y, &wy, EXACT);
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- conv.cu

/// `a [m, k] · b [k, n]` row-major, accumulated in f64.
fn gemm_f64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                s += av as f64 * b[p * n + j] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

#[test]
fn conv_kernels_match_the_cpu_backend() {
    let Some(lib) = Lib::load("conv.cu") else { return };
    let mut c = Checks::new("conv.cu");
    let mut r = Rng::new(0x5eed_0005);
    type Fold = unsafe extern "C" fn(P, M, I, I, I, I, I, I, I, I, I, I);
    let k_im2col: Fold = lib.k("im2col_f32");
    let k_col2im: Fold = lib.k("col2im_f32");
    // conv.rs: [x|col, col|x, n, cin, h, w, kh, kw, stride, pad, ho, wo]
    let run = |k: Fold, sh: (u32, u32), src: &[f32], out_n: usize, g: &ConvGeom| -> Vec<f32> {
        let mut y = nan(out_n);
        let (sp, yp) = (addr(src), addr_mut(&mut y));
        let a = [g.n, g.cin, g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.ho(), g.wo()].map(|v| v as I);
        lib.launch(sh, &|| unsafe { k(sp as P, yp as M, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]) });
        y
    };
    let geoms = [
        ConvGeom { n: 2, cin: 3, h: 7, w: 6, cout: 4, kh: 3, kw: 3, stride: 1, pad: 1 },
        ConvGeom { n: 2, cin: 2, h: 9, w: 8, cout: 3, kh: 3, kw: 3, stride: 2, pad: 1 },
        ConvGeom { n: 1, cin: 3, h: 5, w: 7, cout: 2, kh: 2, kw: 3, stride: 2, pad: 0 },
        ConvGeom { n: 3, cin: 2, h: 8, w: 8, cout: 3, kh: 4, kw: 4, stride: 2, pad: 1 },
        ConvGeom { n: 2, cin: 4, h: 5, w: 5, cout: 3, kh: 1, kw: 1, stride: 1, pad: 0 },
    ];
    for g in geoms {
        let (kk, pp) = (g.cin * g.kh * g.kw, g.ho() * g.wo());
        let xn = g.n * g.cin * g.h * g.w;
        let x = r.normal_vec(xn);
        let w = r.normal_vec(g.cout * kk);
        let dy = r.normal_vec(g.n * g.cout * pp);
        let col_n = g.n * kk * pp;
        // The CPU's own im2col/col2im (private) seen through an identity weight: with W = I_K
        // (cout = K), conv2d_im2col_forward's W·col is col exactly, and conv2d_im2col_backward's
        // dx is col2im(Iᵀ·dy) = col2im(dy) exactly.
        let gi = ConvGeom { cout: kk, ..g };
        let mut eye = vec![0.0f32; kk * kk];
        (0..kk).for_each(|i| eye[i * kk + i] = 1.0);
        let want_col = conv2d_im2col_forward(&x, &eye, None, &gi);
        let dcol = r.normal_vec(col_n);
        let want_fold = conv2d_im2col_backward(&x, &eye, &dcol, &gi, true).0.unwrap();
        // and the convolution itself: conv2d_forward = W·im2col(x), conv2d_backward's dx = col2im(Wᵀ·dy)
        let want_y = conv2d_forward(&x, &w, None, &g);
        let want_dx = conv2d_backward(&x, &w, &dy, &g, true).0.unwrap();
        let wdcol: Vec<f32> = (0..g.n).flat_map(|i| gemm_f64(&w, &dy[i * g.cout * pp..(i + 1) * g.cout * pp], kk, g.cout, pp, true)).collect();
        let case = |sh: (u32, u32)| format!("n {} cin {} {}x{} k {}x{} stride {} pad {}, {sh:?}", g.n, g.cin, g.h, g.w, g.kh, g.kw, g.stride, g.pad);
        for sh in shapes_n(col_n) {
            let col = run(k_im2col, sh, &x, col_n, &g);
            c.f32s("im2col_f32", &format!("col, {}", case(sh)), &col, &want_col, EXACT);
            let y: Vec<f32> = (0..g.n).flat_map(|i| gemm_f64(&w, &col[i * kk * pp..(i + 1) * kk * pp], g.cout, kk, pp, false)).collect();
            c.f32s("im2col_f32", &format!("W·col vs conv2d_forward, {}", case(sh)), &y, &want_y, APPROX);
        }
        for sh in shapes_n(xn) {
            let folded = run(k_col2im, sh, &dcol, xn, &g);
            c.f32s("col2im_f32", &format!("col2im, {}", case(sh)), &folded, &want_fold, EXACT);
            let dx = run(k_col2im, sh, &wdcol, xn, &g);
            c.f32s("col2im_f32", &format!("col2im(Wᵀ·dy) vs conv2d_backward dx, {}", case(sh)), &dx, &want_dx, APPROX);
        }
    }
    // im2col_h16: the same unfolding of 16-bit values, bit for bit the CPU's f32 im2col of the
    // widened values (both formats: a copy of their bits)
    {
        type Fold16 = unsafe extern "C" fn(*const u16, *mut u16, I, I, I, I, I, I, I, I, I, I);
        let k_im2col: Fold16 = lib.k("im2col_h16");
        for g in [ConvGeom { n: 2, cin: 3, h: 7, w: 6, cout: 4, kh: 3, kw: 3, stride: 1, pad: 1 }, ConvGeom { n: 1, cin: 2, h: 9, w: 8, cout: 3, kh: 3, kw: 3, stride: 2, pad: 1 }] {
            let kk = g.cin * g.kh * g.kw;
            let gi = ConvGeom { cout: kk, ..g };
            let mut eye = vec![0.0f32; kk * kk];
            (0..kk).for_each(|i| eye[i * kk + i] = 1.0);
            for (fmt, _, narrow, widen) in HALF_FORMATS {
                let xh: Vec<u16> = r.normal_vec(g.n * g.cin * g.h * g.w).into_iter().map(narrow).collect();
                let xw: Vec<f32> = xh.iter().map(|&h| widen(h)).collect();
                let want: Vec<u16> = conv2d_im2col_forward(&xw, &eye, None, &gi).into_iter().map(narrow).collect();
                for sh in shapes_n(want.len()) {
                    let mut col = vec![0xffffu16; want.len()];
                    let (xp, cp) = (addr(&xh), addr_mut(&mut col));
                    let a = [g.n, g.cin, g.h, g.w, g.kh, g.kw, g.stride, g.pad, g.ho(), g.wo()].map(|v| v as I);
                    lib.launch(sh, &|| unsafe { k_im2col(xp as *const u16, cp as *mut u16, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]) });
                    let (e, p) = bits16_mismatches(&col, &want);
                    c.record("im2col_h16", &format!("{fmt} {g:?} {sh:?}"), e, 0.0, p);
                }
            }
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- half.cu

/// The 16-bit kernels of the mixed-precision path, bit for bit against the CPU reference's
/// definition (the `half` crate's rounding of the f32 result): the f32 epilogues (bias, one rounding) in both
/// formats, with and without a bias, in the linear (s = 1) and the convolution (s = P) layout.
#[test]
fn half_kernels_match_the_cpu_reference_bit_for_bit() {
    let Some(lib) = Lib::load("half.cu") else { return };
    let mut c = Checks::new("half.cu");
    let mut r = Rng::new(0x5eed_0016);
    // bias_round_h16: [y f32, bias f32 | null, out, n, c, s, bf]; add_bias_h16: [y, bias, n, c, s, bf]
    type Round = unsafe extern "C" fn(*const f32, *const f32, *mut u16, I, I, I, u32);
    type AddBias = unsafe extern "C" fn(*mut u16, *const f32, I, I, I, u32);
    let k_round: Round = lib.k("bias_round_h16");
    let k_add: AddBias = lib.k("add_bias_h16");
    for (rows, ch, s) in [(7usize, 13usize, 1usize), (3, 5, 37), (2, 4, 64)] {
        let n = rows * ch * s;
        // values around the formats' rounding points: products of normals, scaled
        let y: Vec<f32> = r.normal_vec(n).into_iter().map(|v| v * 3.7).collect();
        let bias: Vec<f32> = r.normal_vec(ch);
        for (fmt, bf, narrow, widen) in HALF_FORMATS {
            for with_bias in [true, false] {
                let want: Vec<u16> = (0..n).map(|i| narrow(if with_bias { y[i] + bias[(i / s) % ch] } else { y[i] })).collect();
                for sh in shapes_n(n) {
                    let mut out = vec![0xffffu16; n];
                    let (yp, bp, op) = (addr(&y), if with_bias { addr(&bias) } else { 0 }, addr_mut(&mut out));
                    lib.launch(sh, &|| unsafe { k_round(yp as P, bp as P, op as *mut u16, n as I, ch as I, s as I, bf) });
                    let (e, p) = bits16_mismatches(&out, &want);
                    c.record("bias_round_h16", &format!("{fmt} bias {with_bias} [{rows}, {ch}, {s}] {sh:?}"), e, 0.0, p);
                }
            }
            let yh: Vec<u16> = y.iter().map(|&v| narrow(v)).collect();
            let want: Vec<u16> = (0..n).map(|i| narrow(widen(yh[i]) + bias[(i / s) % ch])).collect();
            for sh in shapes_n(n) {
                let mut io = yh.clone();
                let (yp, bp) = (addr_mut(&mut io), addr(&bias));
                lib.launch(sh, &|| unsafe { k_add(yp as *mut u16, bp as P, n as I, ch as I, s as I, bf) });
                let (e, p) = bits16_mismatches(&io, &want);
                c.record("add_bias_h16", &format!("{fmt} [{rows}, {ch}, {s}] {sh:?}"), e, 0.0, p);
            }
        }
    }
    // the element-wise ops on 16-bit storages against CpuStorage's f16/bf16 ops (widen, f32 op,
    // round once): bit for bit, except within 1 ulp where exp is involved (libm's expf here, the
    // CPU backend's own polynomial there)
    {
        use orwcfm_fast::backend::cpu::CpuStorage;
        use orwcfm_fast::backend::{BackendStorage, BinaryOp, UnaryOp};
        type Un = unsafe extern "C" fn(I, f32, *const u16, *mut u16, I, u32);
        type UnB = unsafe extern "C" fn(I, *const u16, *const u16, *const u16, *mut u16, I, u32);
        type Bin = unsafe extern "C" fn(I, *const u16, *const u16, *mut u16, I, BinGeom, u32);
        type BinSame = unsafe extern "C" fn(I, *const u16, *const u16, *mut u16, I, u32);
        let (k_un, k_unb, k_bin, k_same): (Un, UnB, Bin, BinSame) = (lib.k("unary_h16"), lib.k("unary_backward_h16"), lib.k("binary_h16"), lib.k("binary_same_h16"));
        let bits = |s: &CpuStorage| -> Vec<u16> {
            match s {
                CpuStorage::F16(v) => v.iter().map(|h| h.to_bits()).collect(),
                CpuStorage::BF16(v) => v.iter().map(|h| h.to_bits()).collect(),
                _ => panic!("not a 16-bit storage"),
            }
        };
        let ulps = |a: u16, b: u16| -> u32 {
            let key = |v: u16| if v & 0x8000 != 0 { 0x8000 - (v & 0x7fff) as i32 } else { 0x8000 + v as i32 };
            (key(a) - key(b)).unsigned_abs()
        };
        let cmp = |c: &mut Checks, kernel: &str, case: &str, got: &[u16], want: &[u16], max_ulp: u32| {
            let worst = got.iter().zip(want).map(|(&a, &b)| ulps(a, b)).max().unwrap_or(0);
            let bad = got.iter().zip(want).position(|(&a, &b)| ulps(a, b) > max_ulp);
            c.record(kernel, case, worst as f64, max_ulp as f64, bad.map(|i| format!("{} ulp at {i}: {:#06x}, want {:#06x}", ulps(got[i], want[i]), got[i], want[i])));
        };
        let n = 777usize;
        for (fmt, bf, narrow, _) in HALF_FORMATS {
            let store = |v: &[f32]| -> CpuStorage {
                let h: Vec<u16> = v.iter().map(|&x| narrow(x)).collect();
                if bf == 1 { CpuStorage::BF16(h.into_iter().map(bf16::from_bits).collect::<Vec<_>>().into()) } else { CpuStorage::F16(h.into_iter().map(f16::from_bits).collect::<Vec<_>>().into()) }
            };
            let xs = store(&scaled(r.normal_vec(n), 3.0));
            let gs = store(&r.normal_vec(n));
            let (xb, gb) = (bits(&xs), bits(&gs));
            for op in [UnaryOp::AddScalar, UnaryOp::MulScalar, UnaryOp::Exp, UnaryOp::Relu, UnaryOp::Square, UnaryOp::Silu, UnaryOp::Sigmoid, UnaryOp::Neg, UnaryOp::Gelu, UnaryOp::QuickGelu] {
                let sc = 0.37f32;
                let max_ulp = if matches!(op, UnaryOp::Exp | UnaryOp::Silu | UnaryOp::Sigmoid | UnaryOp::Gelu | UnaryOp::QuickGelu) { 1 } else { 0 };
                let ys = xs.unary(op, sc).unwrap();
                let want_y = bits(&ys);
                let yb = want_y.clone();
                for sh in shapes_n(n) {
                    let mut y = vec![0xffffu16; n];
                    let (xp, yp) = (addr(&xb), addr_mut(&mut y));
                    lib.launch(sh, &|| unsafe { k_un(op as I, sc, xp as *const u16, yp as *mut u16, n as I, bf) });
                    cmp(&mut c, "unary_h16", &format!("{fmt} {op:?} {sh:?}"), &y, &want_y, max_ulp);
                    if !matches!(op, UnaryOp::AddScalar | UnaryOp::MulScalar) {
                        let want_dx = bits(&gs.unary_backward(op, &xs, &ys).unwrap());
                        let mut dx = vec![0xffffu16; n];
                        let (gp, xp, yp, dp) = (addr(&gb), addr(&xb), addr(&yb), addr_mut(&mut dx));
                        lib.launch(sh, &|| unsafe { k_unb(op as I, gp as *const u16, xp as *const u16, yp as *const u16, dp as *mut u16, n as I, bf) });
                        cmp(&mut c, "unary_backward_h16", &format!("{fmt} {op:?} {sh:?}"), &dx, &want_dx, max_ulp);
                    }
                }
            }
            // broadcasting [3, 1, 37] op [1, 7, 37] -> [3, 7, 37], and same-shape operands
            let (sa, sb, so) = ([3usize, 1, 37], [1usize, 7, 37], [3usize, 7, 37]);
            let a = store(&r.normal_vec(numel(&sa)));
            let b = store(&r.normal_vec(numel(&sb)).into_iter().map(|v| v + 3.0 * v.signum()).collect::<Vec<_>>());
            let a2 = store(&r.normal_vec(numel(&so)));
            let b2 = store(&r.normal_vec(numel(&so)).into_iter().map(|v| v + 3.0 * v.signum()).collect::<Vec<_>>());
            let (ab, bb, a2b, b2b) = (bits(&a), bits(&b), bits(&a2), bits(&b2));
            let geom = BinGeom::try_new(&sa, &sb, &so).unwrap();
            let no = numel(&so);
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
                let want = bits(&a.binary(&sa, &b, &sb, &so, op).unwrap());
                let want_same = bits(&a2.binary(&so, &b2, &so, &so, op).unwrap());
                for sh in shapes_n(no) {
                    let mut y = vec![0xffffu16; no];
                    let (ap, bp, yp) = (addr(&ab), addr(&bb), addr_mut(&mut y));
                    lib.launch(sh, &|| unsafe { k_bin(op as I, ap as *const u16, bp as *const u16, yp as *mut u16, no as I, geom, bf) });
                    cmp(&mut c, "binary_h16", &format!("{fmt} {op:?} broadcast {sh:?}"), &y, &want, 0);
                    let mut y = vec![0xffffu16; no];
                    let (ap, bp, yp) = (addr(&a2b), addr(&b2b), addr_mut(&mut y));
                    lib.launch(sh, &|| unsafe { k_same(op as I, ap as *const u16, bp as *const u16, yp as *mut u16, no as I, bf) });
                    cmp(&mut c, "binary_same_h16", &format!("{fmt} {op:?} {sh:?}"), &y, &want_same, 0);
                }
            }
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- cast.cu

/// f32 bit patterns for the narrowing conversions: specials (±0, ±inf, quiet and signalling NaNs
/// with payloads, f32 subnormals, the extremes), for every 16-bit value of the format (`to_f32`)
/// the value, its rounding ties with both neighbours and one f32 ulp either side of each tie,
/// and every 4099th 32-bit pattern.
fn narrowing_cases(to_f32: impl Fn(u16) -> f32) -> Vec<u32> {
    let mut v: Vec<u32> = vec![0, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0xffc0_0000, 0x7f80_0001, 0xff80_0001, 0x7fa0_0000, 0x7fbf_ffff, 0x7fff_ffff, 0xffff_ffff, 0x7fc0_1234, 0x7f80_2000];
    v.extend([1u32, 2, 0x0000_1000, 0x007f_ffff, 0x8000_0001, 0x807f_ffff, 0x0080_0000, 0x7f7f_ffff, 0xff7f_ffff, 0x3380_0000, 0x3300_0000, 0x3300_0001, 0x337f_ffff]);
    for h in 0..=u16::MAX {
        let x = to_f32(h);
        if !x.is_finite() {
            continue;
        }
        let b = x.to_bits();
        v.push(b);
        // the next 16-bit value up in magnitude (for the largest finite one: its overflow tie)
        let next = to_f32(h.wrapping_add(1));
        let up = if next.is_finite() && next.abs() > x.abs() {
            next
        } else if next.is_infinite() {
            x + (x - to_f32(h.wrapping_sub(1)))
        } else {
            continue;
        };
        let tie = ((x as f64 + up as f64) / 2.0) as f32;
        let t = tie.to_bits();
        v.extend([t, t.wrapping_add(1), t.wrapping_sub(1), b.wrapping_add(1), b.wrapping_sub(1)]);
    }
    v.extend((0..=u32::MAX).step_by(4099));
    v
}

#[test]
fn cast_kernels_match_the_half_crate_bit_for_bit() {
    let Some(lib) = Lib::load("cast.cu") else { return };
    let mut c = Checks::new("cast.cu");
    // every mismatch is reported as an error count against a tolerance of 0
    fn mismatches<T: PartialEq + Copy + std::fmt::Debug>(got: &[T], want: &[T], input: impl Fn(usize) -> String) -> (f64, Option<String>) {
        let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
        let problem = bad.first().map(|&i| format!("{} of {} differ; first: {} gives {:?}, want {:?}", bad.len(), want.len(), input(i), got[i], want[i]));
        (bad.len() as f64, problem)
    }
    type KF = unsafe extern "C" fn(*const f32, *mut u16, I);
    type KH = unsafe extern "C" fn(*const u16, *mut f32, I);
    // f32 -> f16 / bf16: against f16::from_f32 / bf16::from_f32
    for (name, to_f32, from_f32) in [("cast_f32_to_f16", f16_value as fn(u16) -> f32, f16_bits as fn(f32) -> u16), ("cast_f32_to_bf16", bf16_value, bf16_bits)] {
        let k: KF = lib.k(name);
        let bits = narrowing_cases(to_f32);
        let x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let want: Vec<u16> = x.iter().map(|&v| from_f32(v)).collect();
        let n = x.len();
        for sh in shapes_n(n) {
            let mut y = vec![0xdeadu16; n];
            let (xp, yp) = (addr(&x), addr_mut(&mut y));
            lib.launch(sh, &|| unsafe { k(xp as *const f32, yp as *mut u16, n as I) });
            let (e, p) = mismatches(&y, &want, |i| format!("{:#010x}", bits[i]));
            c.record(name, &format!("{n} values, {sh:?}"), e, 0.0, p);
        }
    }
    // f16 / bf16 -> f32: every 16-bit pattern, against to_f32 (bits compared: NaN payloads too)
    for (name, to_f32) in [("cast_f16_to_f32", f16_value as fn(u16) -> f32), ("cast_bf16_to_f32", bf16_value)] {
        let k: KH = lib.k(name);
        // an odd count: the last value is the low half of a word
        let x: Vec<u16> = (0..=u16::MAX).chain([0x3c00]).collect();
        let want: Vec<u32> = x.iter().map(|&h| to_f32(h).to_bits()).collect();
        let n = x.len();
        for sh in shapes_n(n) {
            let mut y = nan(n);
            let (xp, yp) = (addr(&x), addr_mut(&mut y));
            lib.launch(sh, &|| unsafe { k(xp as *const u16, yp as *mut f32, n as I) });
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            let (e, p) = mismatches(&got, &want, |i| format!("{:#06x}", x[i]));
            c.record(name, &format!("all {n} patterns, {sh:?}"), e, 0.0, p);
        }
    }
    // f32 -> i32: Rust's `as` (toward zero, saturating, NaN to 0)
    {
        let k: unsafe extern "C" fn(P, *mut i32, I) = lib.k("cast_f32_to_i32");
        let mut x: Vec<f32> = vec![0.0, -0.0, 0.5, -0.5, 0.99999994, -0.99999994, 1.5, -1.5, 2.5, -2.5, f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, 1e-40];
        x.extend([2147483648.0f32, -2147483648.0, 2147483520.0, -2147483520.0, -2147483904.0, 16777217.0, 1e10, -1e10]);
        x.extend(narrowing_cases(|h| f16::from_bits(h).to_f32()).into_iter().step_by(7).map(f32::from_bits));
        let want: Vec<i32> = x.iter().map(|&v| v as i32).collect();
        let n = x.len();
        for sh in shapes_n(n) {
            let mut y = vec![0x5555_5555i32; n];
            let (xp, yp) = (addr(&x), addr_mut(&mut y));
            lib.launch(sh, &|| unsafe { k(xp as P, yp as *mut i32, n as I) });
            let (e, p) = mismatches(&y, &want, |i| format!("{:e}", x[i]));
            c.record("cast_f32_to_i32", &format!("{n} values, {sh:?}"), e, 0.0, p);
        }
    }
    // i32 -> f32: Rust's `as` (round to nearest even)
    {
        let k: unsafe extern "C" fn(*const i32, M, I) = lib.k("cast_i32_to_f32");
        let mut x: Vec<i32> = vec![0, 1, -1, i32::MAX, i32::MIN, i32::MIN + 1, 16_777_216, 16_777_217, 16_777_219, -16_777_217, -16_777_219, 33_554_435, 2_147_483_520, 2_147_483_584];
        x.extend((0..=u32::MAX).step_by(65_537).map(|b| b as i32));
        let want: Vec<u32> = x.iter().map(|&v| (v as f32).to_bits()).collect();
        let n = x.len();
        for sh in shapes_n(n) {
            let mut y = nan(n);
            let (xp, yp) = (addr(&x), addr_mut(&mut y));
            lib.launch(sh, &|| unsafe { k(xp as *const i32, yp as M, n as I) });
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            let (e, p) = mismatches(&got, &want, |i| format!("{}", x[i]));
            c.record("cast_i32_to_f32", &format!("{n} values, {sh:?}"), e, 0.0, p);
        }
    }
    // fill_u32: any bit pattern, NaN-like ones included
    {
        let k: unsafe extern "C" fn(*mut u32, u32, I) = lib.k("fill_u32");
        let n = 1001;
        for (v, sh) in [0x7fc0_0001u32, 0xffff_ffff, 0x3c00_3c00].into_iter().zip(shapes_n(n)) {
            let mut y = vec![0u32; n];
            let yp = addr_mut(&mut y);
            lib.launch(sh, &|| unsafe { k(yp as *mut u32, v, n as I) });
            let (e, p) = mismatches(&y, &vec![v; n], |i| format!("element {i}"));
            c.record("fill_u32", &format!("{v:#010x}, {sh:?}"), e, 0.0, p);
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- rng.cu

/// Distance in ulps between two f32 (equal bits: 0; a NaN or a sign change of non-zeros: huge).
fn ulps(a: f32, b: f32) -> u64 {
    if a.to_bits() == b.to_bits() {
        return 0;
    }
    if a.is_nan() || b.is_nan() {
        return u64::MAX;
    }
    let key = |v: f32| {
        let b = v.to_bits() as i64;
        if b & 0x8000_0000 != 0 { -(b & 0x7fff_ffff) } else { b }
    };
    (key(a) - key(b)).unsigned_abs()
}

#[test]
fn rng_kernels_match_the_cpu_twin() {
    use orwcfm_fast::rng::philox;
    let Some(lib) = Lib::load("rng.cu") else { return };
    let mut c = Checks::new("rng.cu");
    type Fill = unsafe extern "C" fn(M, I, u64, u64);
    type Apply = unsafe extern "C" fn(P, M, M, I, f32, u64, u64);
    let k_uniform: Fill = lib.k("philox_uniform_f32");
    let k_normal: Fill = lib.k("philox_normal_f32");
    let k_apply: Apply = lib.k("dropout_f32");
    let mut r = Rng::new(0x5eed_0006);
    // bit-identical, or the problem: how many elements differ, the first of them
    let exact = |c: &mut Checks, kernel: &str, case: &str, got: &[f32], want: &[f32]| {
        let diff: Vec<usize> = (0..want.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
        let problem = (!diff.is_empty()).then(|| format!("{} of {} elements differ, first at {}: got {} want {}", diff.len(), want.len(), diff[0], got[diff[0]], want[diff[0]]));
        c.record(kernel, case, rel_err(got, want), EXACT, problem);
    };
    let mut worst_normal_ulps = 0u64;
    let mut normal_differing = 0usize;
    // sizes around the 4-element block, one past the CPU's parallel threshold; seeds with high
    // words, offsets across the 2^32 and 2^64 boundaries
    let draws: [(usize, u64, u64); 7] = [(1, 0, 0), (3, 1, 5), (4, 0xdead_beef_0000_0001, 0xffff_ffff), (1001, 42, u64::MAX - 100), (4099, u64::MAX, 1 << 40), (70_001, 0x0123_4567_89ab_cdef, 3), (262, 7, u64::MAX)];
    for (n, seed, offset) in draws {
        let mut want_u = vec![0.0; n];
        philox::fill_uniform(seed, offset, &mut want_u);
        let mut want_z = vec![0.0; n];
        philox::fill_normal(seed, offset, &mut want_z);
        for sh in shapes_n(n) {
            let case = format!("n {n} seed {seed:#x} offset {offset:#x}, {sh:?}");
            let mut y = nan(n);
            let yp = addr_mut(&mut y);
            lib.launch(sh, &|| unsafe { k_uniform(yp as M, n as I, seed, offset) });
            exact(&mut c, "philox_uniform_f32", &case, &y, &want_u);
            let mut z = nan(n);
            let zp = addr_mut(&mut z);
            lib.launch(sh, &|| unsafe { k_normal(zp as M, n as I, seed, offset) });
            let worst = z.iter().zip(&want_z).map(|(&a, &b)| ulps(a, b)).max().unwrap();
            worst_normal_ulps = worst_normal_ulps.max(worst);
            normal_differing += z.iter().zip(&want_z).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            let problem = (worst > 2).then(|| format!("a normal {worst} ulp from the CPU's (rel err {:.3e})", rel_err(&z, &want_z)));
            // (the table's tolerance: 2 ulp relative, 2·2⁻²³; the check itself counts ulps)
            c.record("philox_normal_f32", &case, rel_err(&z, &want_z), 2.0 * f32::EPSILON as f64, problem);
        }
        for p in [0.0f32, 0.1, 0.5, 0.9, 1.0] {
            let mut want_m = vec![0.0; n];
            philox::dropout_mask(seed, offset, p, &mut want_m);
            let x = scaled(r.normal_vec(n), 3.0);
            let mut want_y = vec![0.0; n];
            philox::dropout(seed, offset, p, &x, &mut want_y, None);
            for sh in shapes_n(n) {
                let case = format!("n {n} p {p} seed {seed:#x} offset {offset:#x}, {sh:?}");
                // with the mask written
                let (mut y, mut m) = (nan(n), nan(n));
                let (xp, yp, mp) = (addr(&x), addr_mut(&mut y), addr_mut(&mut m));
                lib.launch(sh, &|| unsafe { k_apply(xp as P, yp as M, mp as M, n as I, p, seed, offset) });
                exact(&mut c, "dropout_f32", &format!("y, {case}"), &y, &want_y);
                exact(&mut c, "dropout_f32", &format!("mask, {case}"), &m, &want_m);
                // in place, no mask
                let mut y = x.clone();
                let yp = addr_mut(&mut y);
                lib.launch(sh, &|| unsafe { k_apply(yp as P, yp as M, std::ptr::null_mut(), n as I, p, seed, offset) });
                exact(&mut c, "dropout_f32", &format!("in place, no mask, {case}"), &y, &want_y);
            }
        }
    }
    println!("philox_normal_f32: worst {worst_normal_ulps} ulp from rng::philox::fill_normal, {normal_differing} elements not bit-identical");
    c.finish(&lib);
}

// ---------------------------------------------------------------- fused.cu

/// `data` in a buffer whose start is 16-byte aligned plus `shift` floats (1: misaligned on
/// purpose, so that the kernels take their scalar path), with NaN around it.
struct Buf {
    v: Vec<f32>,
    off: usize,
    n: usize,
}

impl Buf {
    fn new(data: &[f32], shift: usize) -> Buf {
        let mut v = vec![f32::NAN; data.len() + 8];
        let pad = (16 - v.as_ptr() as usize % 16) % 16 / 4 + shift;
        v[pad..pad + data.len()].copy_from_slice(data);
        Buf { v, off: pad, n: data.len() }
    }
    fn nan(n: usize, shift: usize) -> Buf {
        Buf::new(&nan(n), shift)
    }
    fn p(&self) -> usize {
        addr(&self.v[self.off..])
    }
    fn m(&mut self) -> usize {
        addr_mut(&mut self.v[self.off..])
    }
    fn get(&self) -> &[f32] {
        &self.v[self.off..self.off + self.n]
    }
}

/// Bit-identical, or the problem (how many elements differ, the first of them).
fn bitwise(c: &mut Checks, kernel: &str, case: &str, got: &[f32], want: &[f32]) {
    let diff: Vec<usize> = (0..want.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    let problem = (!diff.is_empty()).then(|| format!("{} of {} elements differ, first at {}: got {} want {}", diff.len(), want.len(), diff[0], got[diff[0]], want[diff[0]]));
    c.record(kernel, case, rel_err(got, want), EXACT, problem);
}

/// The fused nodes' kernels against `backend::cpu::fused`: GroupNorm + scale-shift + act forward
/// and backward (scalar rows, float4 rows, one-element channels, several channel rounds per
/// block), the ODE combination of 0–8 terms and its backward (bit for bit: the same f64 sums), the
/// ORW loss's partial sums, terms, dL/dv (bit for bit) and backward scaling; each with aligned and
/// misaligned buffers.
#[test]
fn fused_kernels_match_the_cpu_backend() {
    use orwcfm_fast::backend::cpu::fused::{Act, GnGeom, group_norm_act_backward, group_norm_act_forward, ode_combine, ode_combine_backward, orw_loss_backward, orw_loss_forward_backward};
    use orwcfm_fast::backend::cuda::fused::{OdeTerms, loss_chunking};
    let Some(lib) = Lib::load("fused.cu") else { return };
    let mut c = Checks::new("fused.cu");
    let mut r = Rng::new(0x5eed_000f);
    type D = *mut f64;
    type GnF = unsafe extern "C" fn(P, P, P, P, P, M, M, M, I, I, I, I, f32, I);
    type GnB = unsafe extern "C" fn(P, P, P, P, P, P, P, P, M, M, M, D, I, I, I, I, I);
    type GnA = unsafe extern "C" fn(*const f64, M, M, I, I);
    let kf: GnF = lib.k("group_norm_act_forward_f32");
    let kb: GnB = lib.k("group_norm_act_backward_f32");
    let ka: GnA = lib.k("group_norm_act_backward_affine_f32");
    type GnH = unsafe extern "C" fn(*const u16, P, P, P, P, *mut u16, M, M, I, I, I, I, f32, I, u32);
    let kh: GnH = lib.k("group_norm_act_forward_h16");
    let eps = 1e-5f32;
    // (n, c, s, groups, scale-shift, act): scalar rows; float4 rows; one group with blk > 256;
    // 32 groups of 2 channels; one-element channels; 6 channels of 17 quads (several rounds)
    let cases = [
        (2usize, 6usize, 35usize, 3usize, true, Act::Silu),
        (3, 8, 16, 4, true, Act::Silu),
        (1, 4, 300, 1, false, Act::None),
        (2, 64, 12, 32, true, Act::Silu),
        (2, 6, 1, 2, false, Act::Silu),
        (1, 12, 68, 2, true, Act::None),
    ];
    for (n, ch, s, groups, ss, act) in cases {
        let len = n * ch * s;
        let x: Vec<f32> = r.normal_vec(len).into_iter().map(|v| 1.5 * v + 0.7).collect();
        let gamma: Vec<f32> = r.normal_vec(ch).into_iter().map(|v| 1.0 + 0.3 * v).collect();
        let beta = r.normal_vec(ch);
        let (scale, shift) = (scaled(r.normal_vec(n * ch), 0.4), scaled(r.normal_vec(n * ch), 0.4));
        let dy = r.normal_vec(len);
        let g = GnGeom { n, c: ch, s, groups, eps };
        let (sc, shv) = if ss { (Some(&scale[..]), Some(&shift[..])) } else { (None, None) };
        let (wy, wm, wr) = group_norm_act_forward(&x, &g, &gamma, &beta, sc, shv, act);
        let wg = group_norm_act_backward(&x, &dy, &g, &gamma, &beta, sc, shv, act, &wm, &wr);
        let silu = (act == Act::Silu) as I;
        // expf against the CPU's exp_f32 where SiLU runs; the same roundings otherwise
        let tol = if act == Act::Silu { APPROX } else { EXACT };
        let ng = n * groups;
        for al in [0usize, 1] {
            let (xb, dyb) = (Buf::new(&x, al), Buf::new(&dy, al));
            let (scp, shp) = if ss { (addr(&scale), addr(&shift)) } else { (0, 0) };
            for sh in shapes_rows(ng) {
                let case = format!("n {n} c {ch} s {s} groups {groups} ss {ss} {act:?} shift {al}, {sh:?}");
                let (mut y, mut mean, mut rstd) = (Buf::nan(len, al), nan(ng), nan(ng));
                let (xp, gp, bp, yp, mp, rp) = (xb.p(), addr(&gamma), addr(&beta), y.m(), addr_mut(&mut mean), addr_mut(&mut rstd));
                lib.launch(sh, &|| unsafe { kf(xp as P, gp as P, bp as P, scp as P, shp as P, yp as M, mp as M, rp as M, n as I, ch as I, s as I, groups as I, eps, silu) });
                c.f32s("group_norm_act_forward_f32", &format!("y, {case}"), y.get(), &wy, tol);
                c.f32s("group_norm_act_forward_f32", &format!("mean, {case}"), &mean, &wm, EXACT);
                c.f32s("group_norm_act_forward_f32", &format!("rstd, {case}"), &rstd, &wr, EXACT);
                let mut dx = Buf::nan(len, al);
                let (mut dsc, mut dsh) = (nan(n * ch), nan(n * ch));
                let mut part = vec![f64::NAN; 2 * n * ch];
                let (dyp, wmp, wrp, dxp, partp) = (dyb.p(), addr(&wm), addr(&wr), dx.m(), addr_mut(&mut part));
                let (dscp, dshp) = if ss { (addr_mut(&mut dsc), addr_mut(&mut dsh)) } else { (0, 0) };
                lib.launch(sh, &|| unsafe { kb(xp as P, dyp as P, gp as P, bp as P, scp as P, shp as P, wmp as P, wrp as P, dxp as M, dscp as M, dshp as M, partp as D, n as I, ch as I, s as I, groups as I, silu) });
                c.f32s("group_norm_act_backward_f32", &format!("dx, {case}"), dx.get(), &wg.dx, tol);
                if ss {
                    c.f32s("group_norm_act_backward_f32", &format!("dscale, {case}"), &dsc, wg.dscale.as_ref().unwrap(), tol);
                    c.f32s("group_norm_act_backward_f32", &format!("dshift, {case}"), &dsh, wg.dshift.as_ref().unwrap(), tol);
                }
                for sh2 in shapes_n(ch) {
                    let (mut dg, mut db) = (nan(ch), nan(ch));
                    let (dgp, dbp) = (addr_mut(&mut dg), addr_mut(&mut db));
                    lib.launch(sh2, &|| unsafe { ka(partp as *const f64, dgp as M, dbp as M, n as I, ch as I) });
                    c.f32s("group_norm_act_backward_affine_f32", &format!("dgamma, {case}, {sh2:?}"), &dg, &wg.dgamma, tol);
                    c.f32s("group_norm_act_backward_affine_f32", &format!("dbeta, {case}, {sh2:?}"), &db, &wg.dbeta, tol);
                }
            }
        }
        // group_norm_act_forward_h16: 16-bit x and y, bit for bit the f32 kernel between a
        // widening and a rounding cast (what the node did before), both formats
        for (fmt, bf, narrow, widen) in HALF_FORMATS {
            let xh: Vec<u16> = x.iter().map(|&v| narrow(v)).collect();
            let xw: Vec<f32> = xh.iter().map(|&h| widen(h)).collect();
            let (scp, shp) = if ss { (addr(&scale), addr(&shift)) } else { (0, 0) };
            for sh in shapes_rows(ng) {
                let case = format!("{fmt} n {n} c {ch} s {s} groups {groups} ss {ss} {act:?}, {sh:?}");
                let (mut y32, mut m32, mut r32) = (nan(len), nan(ng), nan(ng));
                let (xp, gp, bp, yp, mp, rp) = (addr(&xw), addr(&gamma), addr(&beta), addr_mut(&mut y32), addr_mut(&mut m32), addr_mut(&mut r32));
                lib.launch(sh, &|| unsafe { kf(xp as P, gp as P, bp as P, scp as P, shp as P, yp as M, mp as M, rp as M, n as I, ch as I, s as I, groups as I, eps, silu) });
                let want: Vec<u16> = y32.iter().map(|&v| narrow(v)).collect();
                let (mut yh, mut mh, mut rh) = (vec![0xffffu16; len], nan(ng), nan(ng));
                let (xhp, yhp, mhp, rhp) = (addr(&xh), addr_mut(&mut yh), addr_mut(&mut mh), addr_mut(&mut rh));
                lib.launch(sh, &|| unsafe { kh(xhp as *const u16, gp as P, bp as P, scp as P, shp as P, yhp as *mut u16, mhp as M, rhp as M, n as I, ch as I, s as I, groups as I, eps, silu, bf) });
                let (e, p) = bits16_mismatches(&yh, &want);
                c.record("group_norm_act_forward_h16", &format!("y (against the rounded f32 kernel), {case}"), e, 0.0, p);
                bitwise(&mut c, "group_norm_act_forward_h16", &format!("mean, {case}"), &mh, &m32);
                bitwise(&mut c, "group_norm_act_forward_h16", &format!("rstd, {case}"), &rh, &r32);
            }
        }
    }

    // ode_combine: 0 to 8 terms over 1003 values (a scalar tail after the float4s); all aligned,
    // all shifted by one float, or only the last slope (or the output) shifted
    type Ode = unsafe extern "C" fn(P, M, I, OdeTerms);
    type OdeB = unsafe extern "C" fn(P, I, OdeTerms);
    let ko: Ode = lib.k("ode_combine_f32");
    let kob: OdeB = lib.k("ode_combine_backward_f32");
    let n = 1003usize;
    for nt in [0usize, 1, 2, 3, 4, 5, 8] {
        let x = r.normal_vec(n);
        let ks: Vec<Vec<f32>> = (0..nt).map(|_| r.normal_vec(n)).collect();
        let cs: Vec<f32> = (0..nt).map(|i| 0.1 + 0.3 * i as f32 * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let want = ode_combine(&x, &cs.iter().zip(&ks).map(|(&c, k)| (c as f64, &k[..])).collect::<Vec<_>>());
        let gr = r.normal_vec(n);
        let (_, want_dk) = ode_combine_backward(&gr, &cs.iter().map(|&c| c as f64).collect::<Vec<_>>());
        for al in [0usize, 1, 2] {
            let shift = |i: usize| if al == 1 || (al == 2 && i + 1 == nt.max(1)) { 1 } else { 0 };
            let xb = Buf::new(&x, if al == 1 { 1 } else { 0 });
            let kb: Vec<Buf> = ks.iter().enumerate().map(|(i, k)| Buf::new(k, shift(i))).collect();
            let t = OdeTerms::new(&cs.iter().zip(&kb).map(|(&c, k)| (c, k.p() as u64)).collect::<Vec<_>>()).unwrap();
            for sh in shapes_n(n.div_ceil(4)) {
                let case = format!("{nt} terms, shift {al}, {sh:?}");
                let mut out = Buf::nan(
                    n,
                    if nt == 0 {
                        shift(0)
                    } else if al == 1 {
                        1
                    } else {
                        0
                    },
                );
                let (xp, op) = (xb.p(), out.m());
                lib.launch(sh, &|| unsafe { ko(xp as P, op as M, n as I, t) });
                bitwise(&mut c, "ode_combine_f32", &case, out.get(), &want);
                if nt == 0 {
                    continue;
                }
                let gb = Buf::new(&gr, if al == 1 { 1 } else { 0 });
                let mut outs: Vec<Buf> = (0..nt).map(|i| Buf::nan(n, shift(i))).collect();
                let d = OdeTerms::new(&cs.iter().zip(outs.iter_mut()).map(|(&c, o)| (c, o.m() as u64)).collect::<Vec<_>>()).unwrap();
                let gp = gb.p();
                lib.launch(sh, &|| unsafe { kob(gp as P, n as I, d) });
                for (i, (o, w)) in outs.iter().zip(&want_dk).enumerate() {
                    bitwise(&mut c, "ode_combine_backward_f32", &format!("dk{i}, {case}"), o.get(), w);
                }
            }
        }
    }

    // the ORW loss: scalar (odd p, one value per sample) and float4 rows, one or several chunks
    // per sample (8 values, and the host's choice), with and without v_ref and dL/dv
    type LossP = unsafe extern "C" fn(P, P, P, P, M, D, I, I, I, I, f32);
    type LossF = unsafe extern "C" fn(*const f64, P, I, I, I, f32, M);
    type LossS = unsafe extern "C" fn(P, P, M, I);
    let kp: LossP = lib.k("orw_loss_partial_f32");
    let kfin: LossF = lib.k("orw_loss_finish_f32");
    let ks: LossS = lib.k("orw_loss_scale_f32");
    for (b, p) in [(3usize, 37usize), (4, 100), (2, 2500), (5, 1)] {
        let len = b * p;
        let v = r.normal_vec(len);
        let u = r.normal_vec(len);
        let vref: Vec<f32> = v.iter().zip(r.normal_vec(len)).map(|(a, e)| a + 0.3 * e).collect();
        let w: Vec<f32> = r.normal_vec(b).into_iter().map(|x| (0.7 * x).exp()).collect();
        for (with_ref, alpha, want_dv) in [(true, 0.37f32, true), (false, 0.0, true), (true, 0.8, false)] {
            let vr = with_ref.then_some(&vref[..]);
            let (val, wdv) = orw_loss_forward_backward(&v, &u, vr, &w, alpha, 1.0);
            let wterms = [val.fm as f32, val.w2 as f32, val.total as f32];
            // (small chunks only where that stays a few hundred blocks: the shim's barriers are slow)
            for chunk in [if p > 200 { 1000 } else { 8 }, loss_chunking(b, p).0] {
                let nchunks = p.div_ceil(chunk);
                for al in [0usize, 1] {
                    let (vb, ub, rb) = (Buf::new(&v, al), Buf::new(&u, al), Buf::new(&vref, al));
                    for (si, sh) in shapes_rows(b * nchunks).into_iter().enumerate() {
                        let case = format!("b {b} p {p} v_ref {with_ref} α {alpha} dv {want_dv} chunk {chunk} shift {al}, {sh:?}");
                        let mut partial = vec![f64::NAN; 2 * b * nchunks];
                        let mut dv = Buf::nan(len, al);
                        let (vp, up, wp, pp) = (vb.p(), ub.p(), addr(&w), addr_mut(&mut partial));
                        let rp = if with_ref { rb.p() } else { 0 };
                        let dp = if want_dv { dv.m() } else { 0 };
                        lib.launch(sh, &|| unsafe { kp(vp as P, up as P, rp as P, wp as P, dp as M, pp as D, b as I, p as I, chunk as I, nchunks as I, alpha) });
                        let mut terms = nan(3);
                        let tp = addr_mut(&mut terms);
                        lib.launch(sh, &|| unsafe { kfin(pp as *const f64, wp as P, b as I, p as I, nchunks as I, alpha, tp as M) });
                        c.f32s("orw_loss_finish_f32", &format!("terms, {case}"), &terms, &wterms, EXACT);
                        c.f32s("orw_loss_partial_f32", &format!("total, {case}"), &terms[2..], &wterms[2..], EXACT);
                        if !want_dv {
                            assert!(dv.get().iter().all(|x| x.is_nan()), "orw_loss_partial_f32 [{case}]: dv written without being asked for");
                            continue;
                        }
                        bitwise(&mut c, "orw_loss_partial_f32", &format!("dv, {case}"), dv.get(), &wdv);
                        // the backward: dv times an upstream gradient of 2.5 (read from memory)
                        let gv = [2.5f32];
                        let want_g = orw_loss_backward(&v, &u, vr, &w, alpha, 2.5);
                        let mut out = Buf::nan(len, al);
                        let (gp, op) = (addr(&gv), out.m());
                        // (grid-stride: the matching one of the element-wise launch shapes)
                        let sh2 = shapes_n(len.div_ceil(4))[si];
                        lib.launch(sh2, &|| unsafe { ks(dp as P, gp as P, op as M, len as I) });
                        c.f32s("orw_loss_scale_f32", &format!("{case}, {sh2:?}"), out.get(), &want_g, APPROX);
                    }
                }
            }
        }
    }
    c.finish(&lib);
}

// ---------------------------------------------------------------- attention.cu

/// The flash attention kernels against the CPU's fused flash attention, both head orders, every
/// head-dimension variant, T not a multiple of any tile (one and several key tiles), the grid's
/// y extent both B·heads and 1 (the kernels loop over batch·heads): the forward's `out` and
/// `lse`; D = rowsum(dO ∘ O); the backward's `dqkv` (dK, dV from the tiled kernel, dQ from it
/// directly with one key tile, else from the partials summed by the dq kernel). Launched as
/// `cuda::attention` launches them (its tile and shared memory sizes).
#[test]
fn attention_kernels_match_the_cpu_flash_attention() {
    use orwcfm_fast::backend::cpu::fused::{flash_attention_backward, flash_attention_forward};
    use orwcfm_fast::backend::cuda::attention::{FWD_TILE, THREADS, backward_smem_bytes, forward_smem_bytes, variant};
    use orwcfm_fast::backend::{AttnGeom, QkvOrder};
    let Some(lib) = Lib::load("attention.cu") else { return };
    let mut c = Checks::new("attention.cu");
    let mut r = Rng::new(0x5eed_0009);
    type Fwd = unsafe extern "C" fn(P, M, M, I, I, I, I, I, f32);
    type Bwd = unsafe extern "C" fn(P, P, P, P, M, M, I, I, I, I, I, f32);
    let kdsum: unsafe extern "C" fn(P, P, M, I, I, I) = lib.k("flash_attention_backward_dsum_f32");
    let kdq: unsafe extern "C" fn(P, M, I, I, I, I, I, I) = lib.k("flash_attention_backward_dq_f32");
    // (b, heads, ch, t): per variant one case with a single key tile and one with several; the
    // CIFAR-10 recipe's heads (64 channels at 16×16)
    let cases = [(2usize, 3usize, 5usize, 37usize), (1, 2, 32, 130), (2, 1, 40, 49), (1, 2, 64, 70), (1, 2, 64, 256), (1, 1, 96, 20), (1, 2, 128, 45)];
    for (b, heads, ch, t) in cases {
        for order in [QkvOrder::Legacy, QkvOrder::New] {
            let g = AttnGeom { b, heads, ch, t, order };
            let (dp, bc) = variant(ch).unwrap();
            let nbh = b * heads;
            let n = nbh * ch * t;
            let ord = if order == QkvOrder::Legacy { 0 } else { 1 };
            // a spread of 1.5 so that the softmax is far from uniform
            let qkv = scaled(r.normal_vec(3 * n), 1.5);
            let dout = r.normal_vec(n);
            let (wout, wlse) = flash_attention_forward(&qkv, &g);
            let wdqkv = flash_attention_backward(&qkv, &wout, &wlse, &dout, &g);
            let scale = 1.0 / (ch as f32).sqrt();
            let (a, hh, cc, tt) = (nbh as I, heads as I, ch as I, t as I);
            let kf: Fwd = lib.k(&format!("flash_attention_forward_d{dp}_f32"));
            let kb: Bwd = lib.k(&format!("flash_attention_backward_d{dp}_f32"));
            for gy in [nbh as u32, 1] {
                let case = format!("b {b} heads {heads} ch {ch} t {t} {order:?}, grid y {gy}");
                let (mut out, mut lse) = (nan(n), nan(nbh * t));
                let (qp, op, lp) = (addr(&qkv), addr_mut(&mut out), addr_mut(&mut lse));
                let grid = (t.div_ceil(FWD_TILE) as u32, gy, 1);
                lib.launch3(gy == 1, grid, (THREADS, 1, 1), forward_smem_bytes(dp), &|| unsafe { kf(qp as P, op as M, lp as M, a, hh, cc, tt, ord, scale) });
                c.f32s(&format!("flash_attention_forward_d{dp}_f32"), &format!("out, {case}"), &out, &wout, APPROX);
                c.f32s(&format!("flash_attention_forward_d{dp}_f32"), &format!("lse, {case}"), &lse, &wlse, APPROX);
                // D = rowsum(dO ∘ O), in f64 like the CPU backward
                let wd: Vec<f32> = (0..nbh * t).map(|e| (0..ch).map(|k| wout[(e / t * ch + k) * t + e % t] as f64 * dout[(e / t * ch + k) * t + e % t] as f64).sum::<f64>() as f32).collect();
                let (wop, gp) = (addr(&wout), addr(&dout));
                for sh in shapes_n(nbh * t) {
                    let mut d = nan(nbh * t);
                    let dp_ = addr_mut(&mut d);
                    lib.launch(sh, &|| unsafe { kdsum(wop as P, gp as P, dp_ as M, a, cc, tt) });
                    c.f32s("flash_attention_backward_dsum_f32", &format!("{case}, {sh:?}"), &d, &wd, EXACT);
                }
                // the backward from the CPU's out and lse (so that it is checked on its own)
                let nkt = t.div_ceil(bc);
                let mut dqkv = nan(3 * n);
                let mut dqp = nan(nkt * n);
                let (wlp, dsp, dqkvp, dqpp) = (addr(&wlse), addr(&wd), addr_mut(&mut dqkv), addr_mut(&mut dqp));
                lib.launch3(gy == 1, (nkt as u32, gy, 1), (THREADS, 1, 1), backward_smem_bytes(dp, bc), &|| unsafe { kb(qp as P, gp as P, wlp as P, dsp as P, dqkvp as M, dqpp as M, a, hh, cc, tt, ord, scale) });
                let mut is_q = vec![false; 3 * n];
                for bh in 0..nbh {
                    let o = g.offsets(bh / heads, bh % heads).0;
                    is_q[o..o + ch * t].iter_mut().for_each(|v| *v = true);
                }
                if nkt == 1 {
                    assert!(dqp.iter().all(|v| v.is_nan()), "{case}: one key tile, yet the partials were written");
                    c.f32s(&format!("flash_attention_backward_d{dp}_f32"), &format!("dqkv (one key tile), {case}"), &dqkv, &wdqkv, APPROX);
                    continue;
                }
                // several key tiles: dK and dV written, dQ left to the dq kernel
                assert!((0..3 * n).all(|i| !is_q[i] || dqkv[i].is_nan()), "{case}: the backward kernel wrote dQ slots with {nkt} key tiles");
                let kv_got: Vec<f32> = (0..3 * n).filter(|&i| !is_q[i]).map(|i| dqkv[i]).collect();
                let kv_want: Vec<f32> = (0..3 * n).filter(|&i| !is_q[i]).map(|i| wdqkv[i]).collect();
                c.f32s(&format!("flash_attention_backward_d{dp}_f32"), &format!("dK, dV ({nkt} key tiles), {case}"), &kv_got, &kv_want, APPROX);
                for sh in shapes_n(n) {
                    let mut x = dqkv.clone();
                    let xp = addr_mut(&mut x);
                    lib.launch(sh, &|| unsafe { kdq(dqpp as P, xp as M, nkt as I, a, hh, cc, tt, ord) });
                    c.f32s("flash_attention_backward_dq_f32", &format!("dqkv ({nkt} key tiles), {case}, {sh:?}"), &x, &wdqkv, APPROX);
                }
            }
        }
    }
    c.finish(&lib);
}
