//! The CUDA backend's foundation: finding NVIDIA's libraries and the device.
//!
//! cudarc is built with `dynamic-loading` for CUDA 13.0 (`cuda-13000`): nothing of CUDA is needed
//! to build or test, and the libraries (`libcuda.so` from the driver; `libcublas`, `libcudnn`,
//! `libnvrtc` from the toolkit or from Python wheels) are opened when first used. cudarc *panics*
//! when a library is missing, so every entry point probes first ([`probe`]) and turns absence into
//! one clear error.
//!
//! Where the libraries live in a Python environment (`nvidia-cudnn-cu13` and friends install them
//! under `site-packages/nvidia/*/lib`), either put those folders on `LD_LIBRARY_PATH` before
//! starting the program, or name them (or any parent folder, such as `site-packages/nvidia`) in
//! `ORWCFM_CUDA_LIB_DIRS` (separated by `:`): the libraries found there are loaded by full path
//! first, so that cudarc's later loads by name find them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, bail};

/// The variable naming extra library folders.
pub const LIB_DIRS_VAR: &str = "ORWCFM_CUDA_LIB_DIRS";

/// Library name prefixes loaded from [`LIB_DIRS_VAR`] folders, in dependency order.
const PRELOAD: &[&str] = &["libcudart.so", "libnvJitLink.so", "libcublasLt.so", "libcublas.so", "libnvrtc.so", "libnvrtc-builtins.so", "libcudnn"];

/// Shared libraries under `dir` (and, one or two levels down, `*/lib` folders) whose names start
/// with `prefix`, sorted.
fn find_libs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let lib = sub.path().join("lib");
        if lib.is_dir() {
            dirs.push(lib);
        }
    }
    let mut out: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix) && n.contains(".so")))
        .collect();
    out.sort();
    out
}

/// Load the libraries in the [`LIB_DIRS_VAR`] folders by full path, once; returns what was loaded.
pub fn preload_lib_dirs() -> &'static [PathBuf] {
    static LOADED: OnceLock<Vec<PathBuf>> = OnceLock::new();
    LOADED.get_or_init(|| {
        let Some(var) = std::env::var_os(LIB_DIRS_VAR) else { return Vec::new() };
        let mut loaded: Vec<PathBuf> = Vec::new();
        // passes until nothing new loads: a library whose dependency (say one cuDNN 9 part on
        // another) came later in the order loads on the next pass
        loop {
            let before = loaded.len();
            for dir in std::env::split_paths(&var) {
                for prefix in PRELOAD {
                    for lib in find_libs(&dir, prefix) {
                        if loaded.contains(&lib) {
                            continue;
                        }
                        #[cfg(unix)]
                        {
                            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
                            // SAFETY: loading NVIDIA's libraries runs their initialisers, nothing else
                            if let Ok(l) = unsafe { Library::open(Some(&lib), RTLD_NOW | RTLD_GLOBAL) } {
                                std::mem::forget(l); // stay loaded for the life of the process
                                loaded.push(lib);
                            }
                        }
                    }
                }
            }
            if loaded.len() == before {
                break;
            }
        }
        loaded
    })
}

/// Which NVIDIA libraries can be loaded on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Libraries {
    pub driver: bool,
    pub cublas: bool,
    pub cudnn: bool,
    pub nvrtc: bool,
}

/// Probe the libraries (after [`preload_lib_dirs`]) without touching a device.
pub fn libraries() -> Libraries {
    preload_lib_dirs();
    // SAFETY: each probe only tries to dlopen candidate names
    unsafe { Libraries { driver: cudarc::driver::sys::is_culib_present(), cublas: cudarc::cublas::sys::is_culib_present(), cudnn: cudarc::cudnn::sys::is_culib_present(), nvrtc: cudarc::nvrtc::sys::is_culib_present() } }
}

/// A CUDA device as the driver describes it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem_bytes: usize,
    pub device_count: usize,
    pub libraries: Libraries,
}

/// Find device `index`: a clear error when the driver, a GPU or that index is missing.
pub fn probe(index: usize) -> Result<DeviceInfo> {
    let libs = libraries();
    if !libs.driver {
        bail!("device cuda:{index} requested, but no NVIDIA driver library (libcuda.so) can be loaded on this machine: it has no NVIDIA driver or GPU; use --device cpu");
    }
    let n = match cudarc::driver::CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => bail!("device cuda:{index} requested, but the NVIDIA driver reports no usable GPU ({e}); use --device cpu"),
    };
    if index >= n {
        bail!("device cuda:{index} requested, but this machine has {n} CUDA device(s)");
    }
    let ctx = cudarc::driver::CudaContext::new(index).map_err(|e| anyhow::anyhow!("cannot open cuda:{index}: {e}"))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown".into());
    let compute_capability = ctx.compute_capability().unwrap_or((0, 0));
    let total_mem_bytes = ctx.total_mem().unwrap_or(0);
    Ok(DeviceInfo { index, name, compute_capability, total_mem_bytes, device_count: n, libraries: libs })
}
pub mod attention;
pub mod cast;
pub mod conv;
pub mod f32ops;
pub mod fused;
pub mod gemm;
pub mod gpu;
pub mod graph;
pub mod kargs;
pub mod linalg;
pub mod nvrtc;
pub mod optim;
pub mod pool;
pub mod sim;
pub mod storage;
#[cfg(test)]
mod tests;
pub use storage::CudaStorage;

pub use gpu::{FAIL_ALLOC_VAR, Gpu, GpuBuf, Launch, allow_tf32, gpu, set_allow_tf32};
pub use graph::{Capture, Graph};
