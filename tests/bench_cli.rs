//! The benchmarks' command lines at tiny sizes: `bench kernels`, `bench sample`, `bench round`
//! on the CPU and (`ORWCFM_SIMULATED_GPU=1`) on the simulated GPU print the JSON fields the GPU
//! check reads; `devices --json` lists the bound libraries; `scripts/gpu-check.sh` parses and its
//! bookkeeping turns failed and skipped steps into nulls with reasons.

mod common;
use common::last_json;

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orwcfm-fast"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn num(j: &Value, k: &str) -> f64 {
    j[k].as_f64().unwrap_or_else(|| panic!("no number {k} in {j}"))
}

/// The fields of every benchmark's JSON.
fn common(j: &Value, device: &str) {
    assert_eq!(j["device"], device, "{j}");
    assert!(j["on"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
    assert!(num(j, "peak_memory_mb") > 0.0, "{j}");
    assert!(j["libraries"].is_array(), "{j}");
}

const TINY_KERNELS: &[&str] = &["bench", "kernels", "--unet-config", "mnist-small", "--batch", "1", "--copy-mb", "2", "--gemm-n", "48", "--repeats", "2", "--iters", "1", "--warmup", "0", "--json"];

fn check_kernels(j: &Value, dtypes: &[&str]) {
    assert!(num(j, "copy_gb_s") > 0.0, "{j}");
    assert!(j["gemm_tflop_s"]["f32"].as_f64().unwrap() > 0.0, "{j}");
    assert_eq!(j["errors"].as_array().unwrap().len(), 0, "{j}");
    let ks = j["kernels"].as_array().unwrap();
    for dt in dtypes {
        for name in [
            "group_norm_act_fwd",
            "group_norm_act_bwd",
            "flash_attention_fwd_legacy",
            "flash_attention_bwd_legacy",
            "flash_attention_fwd_new",
            "flash_attention_bwd_new",
            "orw_loss_fwd_bwd",
            "ode_combine_euler",
            "ode_combine_rk4",
        ] {
            assert!(ks.iter().any(|k| k["name"] == name && k["dtype"] == *dt), "{name} {dt} missing: {j}");
        }
        if *dt != "f32" {
            assert!(ks.iter().any(|k| k["name"] == format!("cast_f32_to_{dt}")), "cast to {dt} missing");
        }
    }
    assert!(ks.iter().any(|k| k["name"] == "adam_arena"));
    for k in ks {
        assert!(num(k, "ms") > 0.0 && num(k, "gb_s") > 0.0, "{k}");
        let f = num(k, "fraction_of_ceiling");
        assert!(f.is_finite() && f > 0.0, "{k}");
        assert!(k["bound"] == "memory" || k["bound"] == "compute", "{k}");
        if k["name"].as_str().unwrap().starts_with("flash_attention") {
            assert!(num(k, "tflop_s") > 0.0, "{k}");
        }
    }
}

#[test]
fn bench_kernels_on_the_cpu() {
    let mut args = TINY_KERNELS.to_vec();
    args.extend(["--dtypes", "f32,bf16"]);
    let j = last_json(&run_env(&args, &[]));
    common(&j, "cpu");
    check_kernels(&j, &["f32", "bf16"]);
    assert!(j["gemm_tflop_s"]["bf16"].as_f64().unwrap() > 0.0, "{j}");
    // --only filters
    let mut args = TINY_KERNELS.to_vec();
    args.extend(["--only", "copy,ode_combine_euler"]);
    let j = last_json(&run_env(&args, &[]));
    let names: Vec<&str> = j["kernels"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert!(!names.is_empty() && names.iter().all(|n| *n == "ode_combine_euler"), "{names:?}");
    assert!(j["copy_gb_s"].as_f64().is_some() && j["gemm_tflop_s"].as_object().unwrap().is_empty());
}

#[test]
fn bench_sample_and_round_on_the_cpu() {
    let tiny = ["--unet-config", "mnist-small", "--batch", "2", "--steps", "2", "--iters", "1", "--warmup", "0", "--json"];
    let j = last_json(&run_env(&[&["bench", "sample"][..], &tiny].concat(), &[]));
    common(&j, "cpu");
    assert!(num(&j, "img_s") > 0.0 && num(&j, "ms") > 0.0, "{j}");
    assert_eq!(j["nfe"], 2);
    assert_eq!(j["batch"], 2);
    let j = last_json(&run_env(&[&["bench", "round"][..], &tiny, &["--precision", "bf16"]].concat(), &[]));
    common(&j, "cpu");
    assert!(num(&j, "round_ms") > 0.0, "{j}");
    assert_eq!(j["nfe"], 2);
    assert_eq!(j["precision"], "bf16");
    let j = last_json(&run_env(&["bench", "unet", "--unet-config", "mnist-small", "--batch", "1", "--iters", "1", "--warmup", "0", "--json"], &[]));
    common(&j, "cpu");
    // bad input is one clear error
    let o = run_env(&["bench", "round", "--unet-config", "mnist-small", "--batch", "2", "--steps", "0"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--steps"));
}

/// Whether the simulated GPU can be built here (it needs a C++ compiler).
fn have_sim() -> bool {
    let ok = orwcfm_fast::backend::cuda::sim::compiler().is_some();
    if !ok {
        eprintln!("SKIPPED: no C++ compiler for the simulated GPU");
    }
    ok
}

#[test]
fn bench_kernels_and_round_on_the_simulated_gpu() {
    if !have_sim() {
        return;
    }
    let sim = [("ORWCFM_SIMULATED_GPU", "1")];
    let mut args = TINY_KERNELS.to_vec();
    args.extend(["--device", "cuda", "--dtypes", "f32"]);
    let j = last_json(&run_env(&args, &sim));
    common(&j, "cuda:0");
    assert_eq!(j["device_info"]["simulated"], true, "{j}");
    check_kernels(&j, &["f32"]);
    let j = last_json(&run_env(&["bench", "round", "--device", "cuda", "--unet-config", "mnist-small", "--batch", "2", "--steps", "1", "--iters", "1", "--warmup", "0", "--json"], &sim));
    common(&j, "cuda:0");
    assert!(num(&j, "round_ms") > 0.0, "{j}");
}

#[test]
fn devices_lists_the_bound_libraries() {
    let j = last_json(&run_env(&["devices", "--json"], &[]));
    assert!(j["libraries"].is_array(), "{j}");
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn gpu_check_script_parses() {
    let o = Command::new("bash").arg("-n").arg(repo().join("scripts/gpu-check.sh")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn gpu_check_summary_reports_failures_as_nulls_with_reasons() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no python3");
        return;
    }
    let d = std::env::temp_dir().join(format!("orwcfm-gc-summary-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let steps = d.join("steps");
    std::fs::create_dir_all(&steps).unwrap();
    let script = repo().join("scripts/gpu_check_summary.py");
    let py = |args: &[&str]| {
        let o = Command::new("python3").arg(&script).args(args).env("GC_DEVICE", "Test GPU 9").env("GC_COMMIT", "abc").output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let s = steps.to_str().unwrap();
    // a test step with one failure, a bench that worked, one that failed, one skipped
    std::fs::write(steps.join("test_gpu_ops.out"), "running 2 tests\ntest a_op ... ok\ntest b_op ... FAILED\n").unwrap();
    std::fs::write(steps.join("test_gpu_ops.err"), "").unwrap();
    py(&["step", s, "test_gpu_ops", "101", "3.5", "150"]);
    std::fs::write(steps.join("ours_sample_bf16.out"), "sampling...\n{\"img_s\": 1234.5, \"peak_memory_mb\": 900.0, \"libraries\": [\"/x/libcublas.so.13\"]}\n").unwrap();
    std::fs::write(steps.join("ours_sample_bf16.err"), "").unwrap();
    py(&["step", s, "ours_sample_bf16", "0", "2.0", "60"]);
    std::fs::write(steps.join("ours_round_bf16.out"), "").unwrap();
    std::fs::write(steps.join("ours_round_bf16.err"), "error: device cuda:0 requested, but no NVIDIA driver library\n").unwrap();
    py(&["step", s, "ours_round_bf16", "1", "0.1", "90"]);
    py(&["skip", s, "torch_compile", "the", "budget", "was", "spent"]);
    // PyTorch's step writes its own result file (the last JSON line is not the whole result)
    let res = steps.join("torch_eager.result.json");
    std::fs::write(&res, r#"{"torch": "2.11.0", "params": 35746307, "libraries": ["/w/libcudnn.so.9", "/t/libcudnn.so.9"], "modes": {"amp_bf16": {"forward_ms": 9.0, "forward_backward_ms": 30.0, "sample_img_s": 100.0, "round_ms": 50.0, "peak_reserved_mb": {"round": 1000.0}}, "f32": {"error": "OutOfMemoryError: boom"}}}"#).unwrap();
    std::fs::write(steps.join("torch_eager.out"), "{\"not\": \"this\"}\n").unwrap();
    std::fs::write(steps.join("torch_eager.err"), "").unwrap();
    py(&["step", s, "torch_eager", "1", "20", "200", res.to_str().unwrap()]);
    let path = py(&["summary", s, d.to_str().unwrap()]);
    assert!(path.ends_with("-test-gpu-9.json"), "{path}");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(j["device"], "Test GPU 9");
    assert_eq!(j["commit"], "abc");
    assert_eq!(j["tests"]["gpu_ops::a_op"], "ok");
    assert_eq!(j["tests"]["gpu_ops::b_op"], "FAILED");
    assert_eq!(j["sampling_cifar_b128_euler100"]["ours_img_s"]["bf16"], 1234.5);
    assert_eq!(j["peak_memory_mb"]["ours"]["sampling"]["bf16"], 900.0);
    assert!(j["orw_round_cifar_b128"]["ours_ms"]["bf16"].is_null());
    let why = j["missing"]["orw_round_cifar_b128.ours_ms.bf16"].as_str().unwrap();
    assert!(why.contains("failed") && why.contains("no NVIDIA driver"), "{why}");
    assert!(j["sampling_cifar_b128_euler100"]["pytorch_img_s"]["compile_bf16"].is_null());
    assert!(j["missing"]["sampling_cifar_b128_euler100.pytorch_img_s.compile_bf16"].as_str().unwrap().contains("budget"), "{}", j["missing"]);
    assert_eq!(j["steps"]["torch_compile"]["status"], "skipped");
    assert_eq!(j["libraries"]["ours"][0], "/x/libcublas.so.13");
    // 1234.5 img/s against PyTorch's 100: the sampling target is met; the round is not measured
    assert_eq!(j["sampling_cifar_b128_euler100"]["pytorch_img_s"]["amp_bf16"], 100.0);
    assert_eq!(j["unet_cifar_b128"]["pytorch"]["amp_bf16"]["forward_ms"], 9.0);
    assert!((j["targets"]["sampling_vs_pytorch_amp_eager"]["value"].as_f64().unwrap() - 12.345).abs() < 1e-9);
    assert_eq!(j["targets"]["sampling_vs_pytorch_amp_eager"]["met"], true);
    assert!(j["targets"]["round_vs_pytorch_amp_eager"]["met"].is_null());
    assert!(j["missing"]["unet_cifar_b128.pytorch.f32"].as_str().unwrap().contains("OutOfMemoryError"), "{}", j["missing"]);
    assert_eq!(j["params"], 35746307);
    assert_eq!(j["libraries"]["duplicates"]["pytorch"]["libcudnn"].as_array().unwrap().len(), 2);
    let _ = std::fs::remove_dir_all(&d);
}

/// `bench unet --profile` accounts for the time of the ops it ran: per-class and per-op rows,
/// convolutions present, classes summing to the time inside ops, which is at most the wall time.
#[test]
fn unet_profile_accounts_for_the_ops() {
    let o = run_env(&["bench", "unet", "--unet-config", "mnist-small", "--batch", "2", "--iters", "2", "--warmup", "1", "--profile", "--json"], &[]);
    let j = last_json(&o);
    common(&j, "cpu");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("op class") && text.contains("conv2d"), "{text}");
    for pass in ["forward", "forward_backward"] {
        let p = &j["profile"][pass];
        let (wall, in_ops) = (num(p, "wall_ms"), num(p, "in_ops_ms"));
        assert!(in_ops > 0.0 && in_ops <= wall * 1.01, "{pass}: {p}");
        let classes = p["classes"].as_array().unwrap();
        let sum: f64 = classes.iter().map(|c| num(c, "ms")).sum();
        assert!((sum - in_ops).abs() < 1e-6 * in_ops.max(1.0) + 1e-9, "{pass}: classes {sum} vs {in_ops}");
        assert!(classes.iter().any(|c| c["class"] == "convolution forward" && num(c, "ms") > 0.0), "{pass}: {p}");
        let rows = p["rows"].as_array().unwrap();
        assert!(rows.iter().any(|r| r["name"] == "conv2d" && r["detail"] == false && num(r, "calls") >= 1.0), "{pass}");
    }
    let fb = j["profile"]["forward_backward"]["classes"].as_array().unwrap();
    assert!(fb.iter().any(|c| c["class"] == "convolution backward (dx + dw)"), "{fb:?}");
    // on a GPU the kernels are asynchronous: the flag is refused there
    let o = run_env(&["bench", "unet", "--unet-config", "mnist-small", "--batch", "1", "--iters", "1", "--profile", "--device", "cuda"], &[("ORWCFM_SIMULATED_GPU", "1")]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--profile"), "{}", String::from_utf8_lossy(&o.stderr));
}
