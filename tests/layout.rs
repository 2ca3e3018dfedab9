//! Module hygiene: which modules may depend on which.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (path relative to the crate, text) of every `.rs` file under `src/<sub>`.
fn sources(sub: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src").join(sub), &mut files);
    files.sort();
    files.into_iter().map(|p| (p.strip_prefix(root).unwrap().display().to_string(), std::fs::read_to_string(&p).unwrap())).collect()
}

/// The command line is the top: nothing below it imports it.
#[test]
fn only_the_front_end_uses_cli() {
    for (path, text) in sources("") {
        if path == "src/cli.rs" || path == "src/main.rs" {
            continue;
        }
        for (i, l) in text.lines().enumerate() {
            assert!(!l.contains("crate::cli"), "{path}:{}: {l}", i + 1);
        }
    }
}

/// `io` reads and writes formats only: building, saving or inferring the config of a model is
/// `nn::load`'s (which `nn` may import `io` for, not the other way round).
#[test]
fn io_knows_no_models() {
    for (path, text) in sources("io") {
        for (i, l) in text.lines().enumerate() {
            assert!(!l.contains("crate::nn") && !l.contains("UNetModel") && !l.contains("UNetConfig"), "{path}:{}: {l}", i + 1);
        }
    }
}

/// The backends and the tensor layer know nothing of autograd, models or training: a fused op's
/// interface (`tensor::custom`) is the tensor layer's, the tape node wrapping it autograd's.
#[test]
fn backends_and_tensors_know_no_autograd_or_models() {
    for sub in ["backend", "tensor"] {
        for (path, text) in sources(sub) {
            for (i, l) in text.lines().enumerate() {
                let code = l.split("//").next().unwrap();
                for m in ["crate::autograd", "crate::nn", "crate::orw", "crate::optim", "crate::flow", "crate::commands"] {
                    assert!(!code.contains(m), "{path}:{}: {l}", i + 1);
                }
            }
        }
    }
}

/// No device branch above the backends: code there calls tensor ops and never asks where a
/// tensor lives (the dispatch is `tensor/storage.rs`'s). One place names a backend's types by
/// design: a fused node (`autograd/fused/`) implements `tensor::custom::CustomOp`, whose
/// `cpu_fwd`/`cuda_fwd` methods take that backend's storages and call its kernels (the CPU side
/// `backend::cpu`, the CUDA side `backend::cuda`); `Storage::Cuda`/`Storage::Cpu` and device
/// tests stay forbidden there too.
#[test]
fn no_device_branches_above_the_backends() {
    for sub in ["autograd", "optim", "flow", "orw", "nn"] {
        for (path, text) in sources(sub) {
            let custom_op = path.contains("autograd/fused/");
            for (i, l) in text.lines().enumerate() {
                let code = l.split("//").next().unwrap();
                for m in ["is_cuda", "on_gpu", "Storage::Cuda", "Storage::Cpu", "backend::cuda"] {
                    if custom_op && m == "backend::cuda" {
                        continue;
                    }
                    assert!(!code.contains(m), "{path}:{}: {l}", i + 1);
                }
            }
        }
    }
}
