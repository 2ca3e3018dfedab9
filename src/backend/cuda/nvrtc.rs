//! The CUDA kernels (`kernels/*.cu`, embedded in the binary) and their compilation by NVRTC, for
//! the machine's exact architecture on a GPU, or for any `sm_XX` on a machine without one (CI
//! compiles every kernel for sm_80 and sm_90 with NVRTC from PyPI wheels).

use std::ffi::{CString, c_char};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};

/// Every kernel source: `(file name, text)`.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("reduce.cu", include_str!("../../../kernels/reduce.cu")),
    ("shape.cu", include_str!("../../../kernels/shape.cu")),
    ("norm.cu", include_str!("../../../kernels/norm.cu")),
    ("conv.cu", include_str!("../../../kernels/conv.cu")),
    ("cast.cu", include_str!("../../../kernels/cast.cu")),
    ("rng.cu", include_str!("../../../kernels/rng.cu")),
    ("optim.cu", include_str!("../../../kernels/optim.cu")),
    ("half.cu", include_str!("../../../kernels/half.cu")),
    ("fused.cu", include_str!("../../../kernels/fused.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
];

/// Register use of one compiled kernel, from ptxas' report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelUsage {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// A compiled source file.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    pub kernels: Vec<KernelUsage>,
}

/// Folders holding `cuda_fp16.h` and friends: `ORWCFM_CUDA_INCLUDE`, `include` folders next to
/// the `ORWCFM_CUDA_LIB_DIRS` libraries (the `nvidia-cuda-runtime` wheel's layout), `CUDA_HOME`,
/// `/usr/local/cuda/include`.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(v) = std::env::var_os("ORWCFM_CUDA_INCLUDE") {
        out.extend(std::env::split_paths(&v));
    }
    if let Some(v) = std::env::var_os(super::LIB_DIRS_VAR) {
        for d in std::env::split_paths(&v) {
            out.push(d.join("include"));
            for sub in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                out.push(sub.path().join("include"));
            }
        }
    }
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        out.push(PathBuf::from(h).join("include"));
    }
    out.push(PathBuf::from("/usr/local/cuda/include"));
    out.retain(|d| d.join("cuda_fp16.h").is_file());
    out.dedup();
    out
}

fn c_text(v: Vec<c_char>) -> String {
    let bytes: Vec<u8> = v.into_iter().take_while(|&c| c != 0).map(|c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parse ptxas' `-v` report: per entry function, registers and spill bytes.
pub fn parse_usage(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    let mut current: Option<String> = None;
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    };
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            current = rest.split('\'').next().map(str::to_string);
            if let Some(n) = &current {
                out.push(KernelUsage { name: n.clone(), registers: 0, spill_stores: 0, spill_loads: 0 });
            }
        } else if let (Some(n), Some(k)) = (&current, out.last_mut()) {
            if &k.name != n {
                continue;
            }
            if let Some(r) = num_before(line, " registers") {
                k.registers = r;
            }
            if let Some(s) = num_before(line, " bytes spill stores") {
                k.spill_stores = s;
            }
            if let Some(s) = num_before(line, " bytes spill loads") {
                k.spill_loads = s;
            }
        }
    }
    out
}

/// Compile one source for `arch` (e.g. `sm_90`) to a CUBIN, with ptxas' register report.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Compiled> {
    compile_with(name, src, arch, &include_dirs())
}

/// [`compile`] with these include folders only.
pub fn compile_with(name: &str, src: &str, arch: &str, includes: &[PathBuf]) -> Result<Compiled> {
    if !super::libraries().nvrtc {
        bail!("NVRTC (libnvrtc.so) cannot be loaded: install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and name its folder in {}", super::LIB_DIRS_VAR);
    }
    use cudarc::nvrtc::{result, sys};
    let csrc = CString::new(expand_headers(src)).context("kernel source holds a NUL byte")?;
    let cname = CString::new(name).context("kernel name holds a NUL byte")?;
    let prog = result::create_program(&csrc, Some(&cname)).map_err(|e| anyhow!("NVRTC cannot create {name}: {e:?}"))?;
    let mut opts = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--ptxas-options=-v".into(), "--fmad=true".into()];
    for d in includes {
        opts.push(format!("--include-path={}", d.display()));
    }
    // SAFETY: `prog` is live until destroyed below; the buffers are sized by NVRTC
    let res = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }.map(c_text).unwrap_or_default();
    let out = match res {
        Err(e) => Err(anyhow!("NVRTC failed to compile {name} for {arch} ({e:?}):\n{log}")),
        Ok(()) => {
            let mut size = 0usize;
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| anyhow!("{e:?}"))?;
            let mut cubin = vec![0 as c_char; size];
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr()) }.result().map_err(|e| anyhow!("{e:?}"))?;
            let kernels = parse_usage(&log);
            Ok(Compiled { cubin: cubin.into_iter().map(|c| c as u8).collect(), log, kernels })
        }
    };
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// The headers the kernel files share (`#include "common.cuh"`), embedded like the sources.
pub const KERNEL_HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../../kernels/common.cuh")), ("half.cuh", include_str!("../../../kernels/half.cuh")), ("ops.cuh", include_str!("../../../kernels/ops.cuh"))];

/// `src` with each `#include "NAME"` of a [`KERNEL_HEADERS`] entry replaced by that header's
/// text (the binary carries no kernel folder for NVRTC to search). What NVRTC compiles, what
/// the cache is keyed by, and what the simulated GPU and the CPU shim build.
pub fn expand_headers(src: &str) -> String {
    let mut out = String::with_capacity(src.len() + 2048);
    for line in src.split_inclusive('\n') {
        let name = line.trim().strip_prefix("#include \"").and_then(|r| r.strip_suffix('"'));
        match name.and_then(|n| KERNEL_HEADERS.iter().find(|(h, _)| *h == n)) {
            Some((h, text)) => {
                out.push_str(&format!("// ---- {h} (pasted by nvrtc::expand_headers)\n"));
                out.push_str(text);
                out.push_str(&format!("\n// ---- end of {h}\n"));
            }
            None => out.push_str(line),
        }
    }
    out
}

/// How every kernel is declared (one line each: the tests count these).
pub const KERNEL_DECL: &str = "extern \"C\" __global__ void ";

/// Names of the `extern "C" __global__` kernels a source declares.
pub fn kernel_names(src: &str) -> Vec<String> {
    kernel_params(src).into_iter().map(|(name, _)| name).collect()
}

/// The kernels of a source that need `cuda_fp16.h`: those declared inside an
/// `#ifdef ORWCFM_HAVE_FP16` … `#endif` block (left out where the header is missing).
pub fn fp16_kernels(src: &str) -> Vec<String> {
    const OPEN: &str = "#ifdef ORWCFM_HAVE_FP16";
    let mut out = Vec::new();
    for (i, _) in src.match_indices(OPEN) {
        let block = &src[i + OPEN.len()..];
        let end = block.find("#endif").unwrap_or(block.len());
        out.extend(kernel_names(&block[..end]));
    }
    out
}

/// The parameter types of every `extern "C" __global__` kernel of a source, in order.
pub fn kernel_params(src: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (i, _) in src.match_indices(KERNEL_DECL) {
        let rest = &src[i + KERNEL_DECL.len()..];
        let Some(open) = rest.find('(') else { continue };
        let Some(close) = rest[open..].find(')') else { continue };
        let name = rest[..open].trim().to_string();
        let params = rest[open + 1..open + close]
            .split(',')
            .map(|p| {
                let p = p.replace("__restrict__", "");
                let p = p.trim();
                let ty = p.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_');
                ty.trim().to_string()
            })
            .filter(|t| !t.is_empty())
            .collect();
        out.push((name, params));
    }
    out
}

/// Where compiled kernels are kept: `ORWCFM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/orwcfm-fast/kernels`,
/// else `~/.cache/orwcfm-fast/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("ORWCFM_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("orwcfm-fast").join("kernels"))
}

/// The cache file of one source for one architecture: keyed by a hash of the source, the
/// architecture and this crate's version, so an edited kernel is never served stale.
pub fn cache_path(dir: &std::path::Path, name: &str, src: &str, arch: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    // the source as compiled (with the shared headers pasted in), so editing a header is a new entry
    for b in expand_headers(src).bytes().chain(arch.bytes()).chain(env!("CARGO_PKG_VERSION").bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let stem = name.trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{h:016x}.cubin"))
}

/// A CUBIN for `arch`, from the disk cache or compiled (and then cached). Returns whether it
/// came from the cache. A cache that cannot be written is not an error.
pub fn compile_cached(name: &str, src: &str, arch: &str) -> Result<(Vec<u8>, bool)> {
    compile_cached_in(cache_dir().as_deref(), name, src, arch)
}

/// [`compile_cached`] with the cache in `dir` (none: compile every time).
pub fn compile_cached_in(dir: Option<&std::path::Path>, name: &str, src: &str, arch: &str) -> Result<(Vec<u8>, bool)> {
    let path = dir.map(|d| cache_path(d, name, src, arch));
    if let Some(p) = &path
        && let Ok(bytes) = std::fs::read(p)
        && bytes.len() > 4
        && bytes[..4] == [0x7f, b'E', b'L', b'F']
    {
        return Ok((bytes, true));
    }
    let c = compile(name, src, arch)?;
    if let Some(p) = &path
        && let Some(dir) = p.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &c.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok((c.cubin, false))
}
