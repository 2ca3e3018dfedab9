//! Shared helpers for the integration tests: reading the PyTorch fixtures, finite differences,
//! the GPU (or the simulated one) for the GPU tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex, MutexGuard};

use orwcfm_fast::backend::cuda::{self, Gpu};
use orwcfm_fast::io::safetensors::{StFile, load};
use orwcfm_fast::nn::{Init, UNetConfig, UNetModel};
use orwcfm_fast::tensor::Tensor;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A float64 a fixture script stored as the bit pattern of one int64.
pub fn bits_f64(v: &[i64]) -> f64 {
    assert_eq!(v.len(), 1);
    f64::from_bits(v[0] as u64)
}

/// A U-Net fixture made by scripts/export_fixtures.py.
pub struct UnetFixture {
    pub file: StFile,
    pub config: UNetConfig,
    pub model: UNetModel,
}

impl UnetFixture {
    pub fn load(name: &str) -> UnetFixture {
        let file = load(&fixture_path(&format!("unet_{name}.safetensors"))).expect("fixture");
        let config = UNetConfig::from_json_str(&file.metadata["unet_config"]).expect("config");
        let mut model = UNetModel::new(&config, Init::Zeros).expect("model");
        let params: Vec<(String, Tensor)> = file.tensors.iter().filter_map(|(n, t)| n.strip_prefix("param.").map(|k| (k.to_string(), t.clone()))).collect();
        model.params_mut().load_strict(params).expect("load params");
        UnetFixture { file, config, model }
    }
    pub fn t(&self, name: &str) -> Tensor {
        self.file.get(name).unwrap_or_else(|| panic!("fixture tensor {name}")).clone()
    }
    pub fn labels(&self) -> Option<Vec<usize>> {
        self.file.get_int("input.y").map(|(_, v)| v.iter().map(|&x| x as usize).collect())
    }
}

/// `Σ out ⊙ g` in f64.
pub fn loss_f64(out: &Tensor, g: &Tensor) -> f64 {
    out.to_vec().iter().zip(g.to_vec()).map(|(&a, b)| a as f64 * b as f64).sum()
}

/// The tape's gradient of `L = Σ f(x) ⊙ g` (a random `g` drawn from `seed`) with respect to each
/// input listed in `diff`, against central differences of step `eps` on all its elements (up to
/// 64, else 64 sampled): per input `(k, ‖analytic − numeric‖, ‖numeric‖)` over those elements.
pub fn finite_difference_errors(inputs: &[Tensor], diff: &[usize], eps: f32, seed: u64, f: impl Fn(&[orwcfm_fast::autograd::Var]) -> orwcfm_fast::autograd::Var) -> Vec<(usize, f64, f64)> {
    use orwcfm_fast::autograd::{Var, no_grad, ops};
    use orwcfm_fast::rng::Rng;
    let mut rng = Rng::new(seed);
    let vars: Vec<Var> = inputs.iter().enumerate().map(|(i, t)| if diff.contains(&i) { Var::param(t.clone()) } else { Var::constant(t.clone()) }).collect();
    let out = f(&vars);
    let g = Tensor::randn(&out.shape(), &mut rng);
    let grads = ops::sum_all(&ops::mul(&out, &Var::constant(g.clone())).unwrap()).unwrap().backward().unwrap();
    let mut res = Vec::new();
    for &k in diff {
        let analytic = grads.get_or_zeros(&vars[k]).unwrap();
        let n = inputs[k].numel();
        let idx: Vec<usize> = if n <= 64 { (0..n).collect() } else { (0..64).map(|_| rng.below(n as u64) as usize).collect() };
        let (mut num2, mut err2) = (0.0f64, 0.0f64);
        for &i in &idx {
            let eval = |delta: f32| -> f64 {
                let mut t = inputs[k].clone();
                t.data_mut()[i] += delta;
                let vs: Vec<Var> = inputs.iter().enumerate().map(|(j, x)| Var::constant(if j == k { t.clone() } else { x.clone() })).collect();
                no_grad(|| loss_f64(&f(&vs).value(), &g))
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
            let a = analytic.data()[i] as f64;
            num2 += numeric * numeric;
            err2 += (a - numeric).powi(2);
        }
        res.push((k, err2.sqrt(), num2.sqrt()));
    }
    res
}

/// The GPU, poisoned (new buffers start as NaN), one test at a time (per test binary: the
/// allocator counts are per device, the graph counters process-wide, and the simulated GPU's
/// threads would otherwise crowd each other out). Without one, the simulated GPU of
/// `backend::cuda::sim` (the kernels on the CPU through the C++ shim, host memory, the same
/// launches); without a C++ compiler either, None after saying why the test skips.
/// `ORWCFM_REQUIRE_GPU` makes a missing GPU fail, `ORWCFM_REQUIRE_SHIM` a missing compiler.
pub fn gpu(test: &str) -> Option<(Arc<Gpu>, MutexGuard<'static, ()>)> {
    static ONE: Mutex<()> = Mutex::new(());
    let lock = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let g = match cuda::gpu(0) {
        Ok(g) => g,
        Err(e) => {
            assert!(std::env::var_os("ORWCFM_REQUIRE_GPU").is_none(), "ORWCFM_REQUIRE_GPU is set but cuda:0 cannot be opened: {e:#}");
            if cuda::sim::compiler().is_none() {
                assert!(std::env::var("ORWCFM_REQUIRE_SHIM").is_err(), "ORWCFM_REQUIRE_SHIM is set but no C++ compiler runs");
                eprintln!("SKIPPED {test}: no usable GPU ({e:#}) and no C++ compiler for the simulated one");
                return None;
            }
            cuda::sim::enable();
            cuda::gpu(0).unwrap_or_else(|e| panic!("the simulated GPU: {e:#}"))
        }
    };
    if g.is_sim() {
        eprintln!("{test}: on the simulated GPU (no GPU here)");
    }
    g.set_poison(true);
    Some((g, lock))
}

/// The JSON line a successful command printed last (the command's failure is the assertion).
pub fn last_json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "exit {:?}\nstdout: {out}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}
