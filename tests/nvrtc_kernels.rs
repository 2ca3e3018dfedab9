//! Every kernel in kernels/*.cu compiles with NVRTC for sm_80 and sm_90, with its register use and
//! spills reported. Needs NVRTC (a GPU is not needed): `.ci/run` installs it from PyPI and sets
//! `ORWCFM_CUDA_LIB_DIRS` and `ORWCFM_REQUIRE_NVRTC=1`; elsewhere the test says it skipped.

use orwcfm_fast::backend::cuda::nvrtc::{KERNEL_SOURCES, compile, parse_usage};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !orwcfm_fast::backend::cuda::libraries().nvrtc {
        assert!(std::env::var_os("ORWCFM_REQUIRE_NVRTC").is_none(), "ORWCFM_REQUIRE_NVRTC is set but NVRTC cannot be loaded (ORWCFM_CUDA_LIB_DIRS={:?})", std::env::var_os("ORWCFM_CUDA_LIB_DIRS"));
        eprintln!("SKIPPED: NVRTC not found (set ORWCFM_CUDA_LIB_DIRS to a folder with libnvrtc, e.g. the nvidia-cuda-nvrtc wheel's)");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for (name, src) in KERNEL_SOURCES {
            let c = compile(name, src, arch).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(c.cubin.len() > 100, "{name} {arch}: empty CUBIN");
            let declared = src.matches("extern \"C\" __global__ void ").count();
            assert_eq!(c.kernels.len(), declared, "{name} {arch}: ptxas reported {:?}\n{}", c.kernels, c.log);
            for k in &c.kernels {
                eprintln!("{arch} {name} {:<22} {:>3} registers, {} B spill stores, {} B spill loads", k.name, k.registers, k.spill_stores, k.spill_loads);
                assert!(k.registers > 0, "{}: no register count in the report", k.name);
            }
        }
    }
}

#[test]
fn a_compile_error_is_reported_with_the_log() {
    if !orwcfm_fast::backend::cuda::libraries().nvrtc {
        eprintln!("SKIPPED: NVRTC not found");
        return;
    }
    let e = compile("bad.cu", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", "sm_90").unwrap_err();
    assert!(format!("{e:#}").contains("undefined_name"), "{e:#}");
}

#[test]
fn ptxas_report_parsing() {
    let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'adam_step_f32' for 'sm_90'\nptxas info    : Function properties for adam_step_f32\n    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\nptxas info    : Used 18 registers, used 0 barriers, 412 bytes cmem[0]\nptxas info    : Compiling entry function 'axpy_f32' for 'sm_90'\nptxas info    : Used 10 registers\n";
    let u = parse_usage(log);
    assert_eq!(u.len(), 2);
    assert_eq!((u[0].name.as_str(), u[0].registers, u[0].spill_stores, u[0].spill_loads), ("adam_step_f32", 18, 4, 12));
    assert_eq!((u[1].name.as_str(), u[1].registers), ("axpy_f32", 10));
}

#[test]
fn compiled_kernels_are_cached_on_disk_by_source_and_architecture() {
    use orwcfm_fast::backend::cuda::nvrtc::{cache_path, compile_cached_in, kernel_names};
    if !orwcfm_fast::backend::cuda::libraries().nvrtc {
        eprintln!("SKIPPED: NVRTC not found");
        return;
    }
    let dir = std::env::temp_dir().join(format!("orwcfm-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (name, src) = KERNEL_SOURCES[0];
    let (first, cached) = compile_cached_in(Some(&dir), name, src, "sm_90").unwrap();
    assert!(!cached, "an empty cache served a kernel");
    assert!(cache_path(&dir, name, src, "sm_90").is_file(), "nothing was written to the cache");
    let (second, cached) = compile_cached_in(Some(&dir), name, src, "sm_90").unwrap();
    assert!(cached, "the second compile did not come from the cache");
    assert_eq!(first, second);
    // another architecture or an edited source is another entry
    assert_ne!(cache_path(&dir, name, src, "sm_90"), cache_path(&dir, name, src, "sm_80"));
    let edited = format!("{src}\n// edited\n");
    assert_ne!(cache_path(&dir, name, src, "sm_90"), cache_path(&dir, name, &edited, "sm_90"));
    let (_, cached) = compile_cached_in(Some(&dir), name, &edited, "sm_90").unwrap();
    assert!(!cached, "an edited source was served from the cache");
    assert!(kernel_names(src).contains(&"adam_step_f32".to_string()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_kernel_file_compiles_with_nvrtc_alone() {
    // a GPU machine may have NVRTC but no CUDA headers: the f16 kernels drop out, the rest compiles
    use orwcfm_fast::backend::cuda::nvrtc::compile_with;
    if !orwcfm_fast::backend::cuda::libraries().nvrtc {
        eprintln!("SKIPPED: NVRTC not found");
        return;
    }
    for (name, src) in KERNEL_SOURCES {
        let c = compile_with(name, src, "sm_90", &[]).unwrap_or_else(|e| panic!("{e:#}"));
        let f32_kernels = src.matches("extern \"C\" __global__ void ").count() - orwcfm_fast::backend::cuda::nvrtc::fp16_kernels(src).len();
        assert_eq!(c.kernels.len(), f32_kernels, "{name} without headers: {:?}", c.kernels);
    }
}

/// Shared kernel code lives once, in the headers: every header is used, the expansion leaves no
/// `#include` of ours behind, and no kernel file defines a helper the header defines.
#[test]
fn shared_kernel_code_is_in_one_header() {
    use orwcfm_fast::backend::cuda::nvrtc::{KERNEL_HEADERS, expand_headers};
    for (h, text) in KERNEL_HEADERS {
        let users: Vec<&str> = KERNEL_SOURCES.iter().filter(|(_, s)| s.contains(&format!("#include \"{h}\""))).map(|(n, _)| *n).collect();
        assert!(!users.is_empty(), "{h} is included by no kernel file");
        // the header's macros and device functions (`__device__ __forceinline__ TYPE NAME(`)
        let defined: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#define ").or_else(|| l.strip_prefix("__device__ __forceinline__ ").and_then(|r| r.split_once(' ').map(|(_, name)| name))))
            .map(|r| r.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap().to_string())
            .filter(|d| !d.is_empty())
            .collect();
        assert!(!defined.is_empty(), "{h} defines nothing");
        if *h == "common.cuh" {
            assert!(defined.contains(&"block_sum".to_string()) && defined.contains(&"GRID_STRIDE".to_string()), "{defined:?}");
        }
        for (name, src) in KERNEL_SOURCES {
            for d in &defined {
                let own_fn = src.lines().any(|l| l.starts_with("__device__") && l.contains(&format!(" {d}(")));
                assert!(!src.contains(&format!("#define {d}(")) && !own_fn, "kernels/{name} defines its own {d} (use {h})");
            }
            let e = expand_headers(src);
            assert!(!e.lines().any(|l| l.trim() == format!("#include \"{h}\"")), "{name}: {h} not pasted");
            if users.contains(name) {
                assert!(e.contains(text.trim()), "{name}: the expansion lacks {h}");
            }
        }
    }
}
