//! The CPU kernels' instruction-set levels (`backend::cpu::isa`), end to end: `devices` and
//! `bench` say which level runs and how it was chosen, `ORWCFM_CPU_ISA` lowers it and is refused
//! (one line, non-zero exit) when it names no level or one above the CPU's, and a U-Net's
//! forward and backward at every level this CPU runs agree with the best level's — each level in
//! a child process (this test binary, re-run with `ORWCFM_CPU_ISA` set), since the level is
//! picked once per process.

mod common;
use common::last_json;

use std::path::PathBuf;
use std::process::{Command, Output};

use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::backend::cpu::isa::{self, Isa};
use orwcfm_fast::nn::{Forward, Init, UNetConfig, UNetModel};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;
use serde_json::Value;

fn cli(args: &[&str], level: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orwcfm-fast"));
    c.arg("--threads").arg("2").args(args).env_remove(isa::ENV);
    if let Some(l) = level {
        c.env(isa::ENV, l);
    }
    c.output().unwrap()
}

fn devices_cpu(level: Option<&str>) -> Value {
    let j = last_json(&cli(&["devices", "--json"], level));
    j["cpu"].clone()
}

/// An error that is one `error: ..` line on stderr, nothing on stdout, exit 1.
fn refused(o: &Output, says: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stdout: {}\nstderr: {err}", String::from_utf8_lossy(&o.stdout));
    assert!(o.stdout.is_empty(), "work was done: {}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ORWCFM_CPU_ISA="), "{err}");
    for s in says {
        assert!(err.contains(s), "{err} lacks {s}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn devices_names_the_detected_level() {
    let best = isa::detected().name();
    let c = devices_cpu(None);
    assert_eq!(c["isa_level"], best, "{c}");
    assert_eq!(c["isa_detected"], best, "{c}");
    assert_eq!(c["isa_chosen_by"], "detected", "{c}");
    let levels: Vec<&str> = c["isa_levels"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(levels.first(), Some(&"scalar"), "{c}");
    assert_eq!(levels.last(), Some(&best), "{c}");
    // the text names it too
    let o = cli(&["devices"], None);
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().find(|l| l.starts_with("cpu: ")).unwrap_or_else(|| panic!("no cpu line: {text}"));
    assert!(line.contains(&format!("kernels at {best}")) && line.contains("detected"), "{line}");
}

#[test]
fn scalar_is_forced_by_the_variable() {
    let c = devices_cpu(Some("scalar"));
    assert_eq!(c["isa_level"], "scalar", "{c}");
    assert_eq!(c["isa_detected"], isa::detected().name(), "{c}");
    if isa::detected() > Isa::Scalar {
        assert_eq!(c["isa_chosen_by"], isa::ENV, "{c}");
        let o = cli(&["devices"], Some("scalar"));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.lines().any(|l| l.starts_with("cpu: kernels at scalar") && l.contains("lowered by ORWCFM_CPU_ISA=scalar")), "{text}");
    }
}

#[test]
fn avx2_is_forced_where_the_cpu_has_it() {
    if !Isa::Avx2.supported() {
        eprintln!("skipped: this CPU has no AVX2+FMA");
        return;
    }
    let c = devices_cpu(Some("AVX2"));
    assert_eq!(c["isa_level"], "avx2", "{c}");
    assert_eq!(c["isa_chosen_by"], if isa::detected() > Isa::Avx2 { isa::ENV } else { "detected" }, "{c}");
}

#[test]
fn a_bogus_level_is_one_clear_error() {
    refused(&cli(&["devices", "--json"], Some("sse9")), &["not a level", "scalar, avx2 or avx512"]);
    // before any work: a benchmark is not started either
    refused(&cli(&["bench", "unet", "--unet-config", "mnist-small", "--batch", "1", "--iters", "1", "--warmup", "0"], Some("avx3")), &["not a level"]);
}

#[test]
fn a_level_above_the_cpu_is_one_clear_error() {
    let Some(above) = Isa::ALL.iter().copied().find(|l| *l > isa::detected()) else {
        eprintln!("skipped: this CPU runs every level (up to {})", isa::detected());
        return;
    };
    refused(&cli(&["devices"], Some(above.name())), &[&format!("at most {}", isa::detected())]);
}

#[test]
fn bench_reports_the_level() {
    for level in [None, Some("scalar")] {
        let j = last_json(&cli(&["bench", "unet", "--unet-config", "mnist-small", "--batch", "1", "--iters", "1", "--warmup", "0", "--json"], level));
        let want = level.unwrap_or(isa::detected().name());
        let d = &j["device_info"];
        assert_eq!(d["isa_level"], want, "{j}");
        assert_eq!(d["isa_detected"], isa::detected().name(), "{j}");
        assert!(d["isa"].is_array(), "{j}");
        if isa::detected() == Isa::Avx512 {
            let f: Vec<&str> = d["isa"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            for x in ["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"] {
                assert!(f.contains(&x), "{x} missing from {f:?}");
            }
        }
        let on = j["on"].as_str().unwrap();
        assert!(on.contains(&format!("{want} kernels")), "{on}");
    }
}

// ---- every level computes the same U-Net pass -------------------------------------------------

/// Where the child writes its results (set by the parent).
const CHILD_OUT: &str = "ORWCFM_TEST_ISA_CHILD_OUT";

/// A small U-Net (`mnist-small`: attention at 7x7).
fn config() -> UNetConfig {
    UNetConfig::mnist_small()
}

/// The forward output, then the input gradient and every parameter gradient, of an MSE loss to
/// a random target at batch 2 — all at the level this process runs.
fn pass() -> Vec<(String, Vec<f32>)> {
    let cfg = config();
    let model = UNetModel::new(&cfg, Init::Torch(3)).unwrap();
    let mut rng = Rng::new(11);
    // torchcfm zeroes the output layers (`zero_module`): give every parameter a random value,
    // so that every layer's gradient is non-zero
    for v in model.params().vars() {
        let shape = v.value().shape().to_vec();
        v.set_value(Tensor::randn(&shape, &mut rng).mul_scalar(0.1).unwrap());
    }
    let [c, h, w] = cfg.dim;
    let x = Tensor::randn(&[2, c, h, w], &mut rng);
    let t = Tensor::rand_uniform(&[2], 0.0, 1.0, &mut rng);
    let target = Tensor::randn(&[2, c, h, w], &mut rng);
    let xv = Var::param(x);
    let v = model.forward(&Var::constant(t), &xv, None, &mut Forward { dropout_rng: None }).unwrap();
    let loss = ops::mse_loss(&v, &Var::constant(target)).unwrap();
    let g = loss.backward().unwrap();
    let mut out = vec![("output".to_string(), v.value().to_cpu().unwrap().data().to_vec())];
    out.push(("grad x".into(), g.get(&xv).expect("x has a gradient").to_cpu().unwrap().data().to_vec()));
    let names = model.params().names().to_vec();
    for (n, t) in names.into_iter().zip(model.params().grads(&g).unwrap()) {
        out.push((format!("grad {n}"), t.to_cpu().unwrap().data().to_vec()));
    }
    out
}

fn write_results(path: &str, level: Isa, r: &[(String, Vec<f32>)]) {
    let mut j = serde_json::Map::new();
    j.insert("level".into(), level.name().into());
    j.insert("tensors".into(), r.iter().map(|(n, v)| serde_json::json!([n, v])).collect::<Vec<_>>().into());
    std::fs::write(path, Value::Object(j).to_string()).unwrap();
}

fn read_results(path: &PathBuf) -> (String, Vec<(String, Vec<f32>)>) {
    let j: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tensors = j["tensors"].as_array().unwrap().iter().map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())).collect();
    (j["level"].as_str().unwrap().to_string(), tensors)
}

/// The pass at `level`, computed in a child process.
fn pass_at(level: Isa) -> Vec<(String, Vec<f32>)> {
    let out = std::env::temp_dir().join(format!("orwcfm-isa-{}-{}.json", std::process::id(), level.name()));
    let o =
        Command::new(std::env::current_exe().unwrap()).args(["every_level_computes_the_same_unet_pass", "--exact", "--nocapture", "--test-threads=1"]).env(isa::ENV, level.name()).env(CHILD_OUT, &out).output().unwrap();
    assert!(o.status.success(), "child at {level} failed\nstdout: {}\nstderr: {}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let (ran, r) = read_results(&out);
    let _ = std::fs::remove_file(&out);
    assert_eq!(ran, level.name(), "the child ran at {ran}, not {level}");
    r
}

#[test]
fn every_level_computes_the_same_unet_pass() {
    if let Ok(path) = std::env::var(CHILD_OUT) {
        // the child: one level, chosen by ORWCFM_CPU_ISA
        write_results(&path, isa::level(), &pass());
        return;
    }
    let best = isa::detected();
    let want = pass_at(best);
    assert!(want.len() > 10, "{} tensors", want.len());
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
    // a gradient that is zero but for rounding (a per-channel constant ahead of a per-channel
    // GroupNorm, e.g. a ResBlock's first conv bias) is measured against its share of the whole
    // gradient's norm, ‖g‖·√(n/N), not against its own rounding noise
    let (all_norm, all_n) = want.iter().skip(1).fold((0.0f64, 0usize), |(s, n), (_, v)| (s + norm(v).powi(2), n + v.len()));
    let floor = |n: usize| all_norm.sqrt() * (n as f64 / all_n as f64).sqrt();
    assert!(all_norm > 0.0);
    for level in Isa::ALL.into_iter().filter(|l| *l < best) {
        let got = pass_at(level);
        assert_eq!(got.len(), want.len());
        let mut worst = (0.0f64, String::new());
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            assert_eq!(a.len(), b.len(), "{name}");
            assert!(a.iter().all(|x| x.is_finite()), "{level} {name}: not finite");
            let nb = norm(b);
            assert!(nb > 0.0, "{name} is all zeros at {best}");
            let rel = diff(a, b) / if name == "output" { nb } else { nb.max(floor(b.len())) };
            // per tensor 3e-5: F(4×4) Winograd's transforms (coefficients up to 8 and 1/24) round
            // a few times more than F(2×2)'s, and the levels contract their sums into FMAs
            // differently (measured worst tensor: 1.0e-5 at avx2, 8.1e-6 at scalar, against
            // avx512; all gradients together, checked below at 1e-5, 1.8e-6)
            assert!(rel <= 3e-5, "{level} vs {best}, {name}: relative L2 error {rel:.2e} (norm {nb:.2e})");
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
        }
        // all the gradients together
        let cat = |r: &[(String, Vec<f32>)]| r.iter().skip(1).flat_map(|(_, v)| v.iter().copied()).collect::<Vec<f32>>();
        let (ga, gb) = (cat(&got), cat(&want));
        let rel = diff(&ga, &gb) / norm(&gb);
        assert!(rel <= 1e-5, "{level} vs {best}: all gradients, relative L2 error {rel:.2e}");
        eprintln!("{level} agrees with {best}: all gradients {rel:.1e}, worst tensor {} {:.1e}", worst.1, worst.0);
    }
}
