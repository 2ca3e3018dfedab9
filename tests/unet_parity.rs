//! The U-Net against PyTorch/torchcfm fixtures (scripts/export_fixtures.py): forward output,
//! gradients of `sum(v * g)` with respect to every parameter and to x.

mod common;

use common::UnetFixture;
use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::nn::Forward;

const CONFIGS: &[&str] = &["mnist", "scaleshift", "neworder", "tiny"];

#[test]
fn forward_matches_pytorch() {
    for name in CONFIGS {
        let f = UnetFixture::load(name);
        let y = f.labels();
        let v = f.model.predict(&f.t("input.t"), &f.t("input.x"), y.as_deref()).unwrap();
        let want = f.t("output.v");
        let err = v.rel_err(&want);
        println!("{name}: forward rel err {err:.3e} (|v|max {:.3})", want.max_abs());
        assert!(err <= 1e-5, "{name}: forward rel err {err:.3e}");
    }
}

#[test]
fn gradients_match_pytorch() {
    for name in CONFIGS {
        let f = UnetFixture::load(name);
        let y = f.labels();
        let x = Var::param(f.t("input.x"));
        let t = Var::constant(f.t("input.t"));
        let v = f.model.forward(&t, &x, y.as_deref(), &mut Forward { dropout_rng: None }).unwrap();
        let loss = ops::sum_all(&ops::mul(&v, &Var::constant(f.t("input.g"))).unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads.get(&x).unwrap();
        let ex = gx.rel_err(&f.t("grad.x"));
        assert!(ex <= 1e-4, "{name}: grad x rel err {ex:.3e}");
        let mut worst = (0.0f64, String::new());
        let (mut full, mut sampled, mut zero_in_theory) = (0, 0, 0);
        for (pname, var) in f.model.params().iter() {
            let got = grads.get_or_zeros(var).unwrap();
            let e = if let Some(want) = f.file.get(&format!("grad.param.{pname}")) {
                full += 1;
                // Some gradients are zero in theory (a bias right before a GroupNorm with one channel
                // per group) and come out as float noise on both sides: for those, ours must be
                // just as negligible next to the scale of the input gradient.
                let scale = f.t("grad.x").norm();
                if want.norm() < 1e-5 * scale {
                    zero_in_theory += 1;
                    got.norm() / scale * 10.0
                } else {
                    got.rel_err(want)
                }
            } else {
                let want = f.file.get(&format!("grad.sample.{pname}")).unwrap_or_else(|| panic!("{name}: no gradient stored for {pname}"));
                let norm = f.file.get(&format!("grad.norm.{pname}")).unwrap().item() as f64;
                sampled += 1;
                let scale = f.t("grad.x").norm();
                if norm < 1e-5 * scale {
                    zero_in_theory += 1;
                    let e = got.norm() / scale * 10.0;
                    assert!(e <= 1e-4, "{name}: gradient of {pname} should be ~0, got norm {:.3e}", got.norm());
                    continue;
                }
                let n = got.numel();
                let stride = n.div_ceil(512);
                let g: Vec<f32> = got.data().iter().step_by(stride).copied().collect();
                assert_eq!(g.len(), want.numel(), "{name}: sample size of {pname}");
                let en = (got.norm() - norm).abs() / norm;
                orwcfm_fast::util::rel_err(&g, want.data()).max(en)
            };
            assert!(e <= 1e-4, "{name}: grad of {pname} rel err {e:.3e}");
            if e > worst.0 {
                worst = (e, pname.to_string());
            }
        }
        println!("{name}: {full} parameter gradients compared whole ({zero_in_theory} zero in theory), {sampled} by strided sample + norm");
        println!("{name}: grad x {ex:.3e}, worst param grad {:.3e} ({})", worst.0, worst.1);
    }
}

#[test]
fn parameter_names_and_counts_match_torchcfm() {
    for name in CONFIGS {
        let f = UnetFixture::load(name);
        let want: usize = f.file.metadata["num_params"].parse().unwrap();
        assert_eq!(f.model.params().count(), want, "{name}");
        let mut file_keys: Vec<&str> = f.file.tensors.iter().filter_map(|(n, _)| n.strip_prefix("param.")).collect();
        let mut ours: Vec<&str> = f.model.params().names().iter().map(|s| s.as_str()).collect();
        file_keys.sort();
        ours.sort();
        assert_eq!(ours, file_keys, "{name}: state_dict keys");
    }
}

/// Keys, shapes and order of torchcfm's own MNIST and CIFAR-10 models (listed from PyTorch).
#[test]
fn state_dict_order_matches_torchcfm_listing() {
    use orwcfm_fast::nn::{Init, UNetConfig, UNetModel};
    for (file, cfg, total) in [("torchcfm_mnist_state_dict.txt", UNetConfig::mnist(), 1_075_361usize), ("torchcfm_cifar10_state_dict.txt", UNetConfig::cifar10(), 35_746_307)] {
        let text = std::fs::read_to_string(common::fixture_path(file)).unwrap();
        let want: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(|l| l.trim().to_string()).collect();
        let m = UNetModel::new(&cfg, Init::Zeros).unwrap();
        let ours: Vec<String> = m
            .params()
            .iter()
            .map(|(n, v)| {
                let s = v.shape();
                let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
                format!("{n} ({}{})", dims.join(", "), if s.len() == 1 { "," } else { "" })
            })
            .collect();
        assert_eq!(ours, want, "{file}");
        assert_eq!(m.params().count(), total, "{file}");
    }
}

/// Mixed precision (`--precision f16|bf16`): weights and activations rounded to the dtype after
/// every op, GEMMs/convolutions accumulating in f32, GroupNorm statistics and softmax in f32;
/// against PyTorch's f32 output. Targets: ≤ 5e-3 (f16), ≤ 3e-2 (bf16) relative L2; PyTorch's
/// own CPU autocast gives 0.8–1.7e-3 and 0.7–1.3e-2 on such U-Nets.
#[test]
fn forward_in_half_precision_matches_pytorch_f32() {
    use orwcfm_fast::nn::VelocityField;
    use orwcfm_fast::tensor::DType;
    for (dtype, tol, floor) in [(DType::F16, 5e-3, 1e-4), (DType::BF16, 3e-2, 1e-3)] {
        for name in CONFIGS {
            let mut f = UnetFixture::load(name);
            f.model.to_precision(dtype).unwrap();
            assert_eq!(f.model.precision(), dtype);
            assert_eq!(f.model.params().vars()[0].value().dtype(), dtype, "weights stored in {dtype}");
            let y = f.labels();
            let v = f.model.predict(&f.t("input.t"), &f.t("input.x"), y.as_deref()).unwrap();
            assert_eq!(v.dtype(), DType::F32, "the velocity comes back in f32");
            let err = v.rel_err(&f.t("output.v"));
            println!("{name} {dtype}: forward rel err vs PyTorch f32 {err:.3e}");
            assert!(err <= tol, "{name} {dtype}: forward rel err {err:.3e} > {tol:e}");
            // it really ran in reduced precision: not equal to the f32 result
            assert!(err >= floor, "{name} {dtype}: rel err {err:.3e} is too small for {dtype} arithmetic");
        }
    }
}
