//! Behaviour of the model API beyond parity: scalar t, cheap parameter copies, dropout, no-tape
//! inference, saving and re-loading.

mod common;

use common::UnetFixture;
use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::nn::{Forward, Init, UNetConfig, UNetModel, load_model, save_model};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::{DType, Tensor};

#[test]
fn scalar_t_is_repeated_over_the_batch() {
    let f = UnetFixture::load("scaleshift");
    let x = f.t("input.x");
    let b = x.shape()[0];
    let per_sample = f.model.predict(&Tensor::full(&[b], 0.37), &x, None).unwrap();
    let scalar = f.model.predict(&Tensor::scalar(0.37), &x, None).unwrap();
    assert_eq!(per_sample.data(), scalar.data());
    // torchcfm keeps t[:, 0] while t has more than one dimension
    let t2 = Tensor::from_vec((0..b * 3).map(|i| if i % 3 == 0 { 0.37 } else { 0.9 }).collect(), &[b, 3]);
    assert_eq!(f.model.predict(&t2, &x, None).unwrap().data(), per_sample.data());
}

#[test]
fn parameter_copies_are_cheap_and_independent() {
    let m = UNetModel::new(&UNetConfig::mnist(), Init::Torch(3)).unwrap();
    let copy = m.clone();
    for ((_, a), (_, b)) in m.params().iter().zip(copy.params().iter()) {
        assert!(a.value().shares_storage(&b.value()), "a copy must share storage until written");
        assert_ne!(a.id(), b.id(), "a copy must have its own leaves");
    }
    // updating the copy leaves the original alone
    let (_, v) = copy.params().iter().next().unwrap();
    let mut t = v.value();
    t.data_mut()[0] += 1.0;
    v.set_value(t);
    let (_, orig) = m.params().iter().next().unwrap();
    assert_ne!(orig.value().data()[0], v.value().data()[0]);
    assert!(!orig.value().shares_storage(&v.value()));
}

#[test]
fn dropout_is_seeded_and_only_in_training() {
    let mut cfg = UNetConfig::new([1, 8, 8], 32, 1);
    cfg.channel_mult = Some(vec![1.0]);
    cfg.dropout = 0.3;
    let m = UNetModel::new(&cfg, Init::Torch(1)).unwrap();
    // make the zero-initialised output convs non-zero so dropout shows in the output
    for (_, v) in m.params().iter() {
        let mut r = Rng::new(v.id() as u64);
        let t = v.value();
        let d: Vec<f32> = t.data().iter().map(|&x| x + 0.05 * r.normal()).collect();
        v.set_value(Tensor::from_vec(d, t.shape()));
    }
    let x = Tensor::randn(&[2, 1, 8, 8], &mut Rng::new(5));
    let t = Tensor::from_vec(vec![0.2, 0.8], &[2]);
    let run = |seed: Option<u64>| {
        let mut rng = seed.map(orwcfm_fast::rng::philox::Philox::new);
        m.forward(&Var::constant(t.clone()), &Var::constant(x.clone()), None, &mut Forward { dropout_rng: rng.as_mut() }).unwrap().value()
    };
    let eval = m.predict(&t, &x, None).unwrap();
    // without masks the training forward is the inference one (flash attention on the tape,
    // the probability-forming kernel in inference: equal to rounding)
    assert!(run(None).rel_err(&eval) < 1e-6, "{}", run(None).rel_err(&eval));
    assert_eq!(run(Some(7)).data(), run(Some(7)).data(), "same seed, same masks");
    assert!(run(Some(7)).rel_err(&eval) > 1e-3, "dropout must change the training output");
    assert!(run(Some(7)).rel_err(&run(Some(8))) > 1e-3, "different seeds, different masks");
}

#[test]
fn inference_records_no_tape_and_training_does() {
    let f = UnetFixture::load("tiny");
    let (t, x) = (f.t("input.t"), f.t("input.x"));
    let v = orwcfm_fast::autograd::no_grad(|| f.model.forward(&Var::constant(t.clone()), &Var::constant(x.clone()), None, &mut Forward { dropout_rng: None }).unwrap());
    assert!(!v.requires_grad() && v.is_leaf());
    let v = f.model.forward(&Var::constant(t), &Var::constant(x), None, &mut Forward { dropout_rng: None }).unwrap();
    assert!(v.requires_grad());
    let g = ops::mean_all(&ops::square(&v).unwrap()).unwrap().backward().unwrap();
    let n_nonzero = f.model.params().vars().iter().filter(|p| g.get(p).is_some()).count();
    assert_eq!(n_nonzero, f.model.params().len());
}

#[test]
fn save_and_reload_in_every_dtype() {
    let f = UnetFixture::load("mnist");
    let dir = std::env::temp_dir().join(format!("orwcfm-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let y = f.labels();
    let want = f.model.predict(&f.t("input.t"), &f.t("input.x"), y.as_deref()).unwrap();
    for (dtype, tol) in [(DType::F32, 0.0), (DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        let p = dir.join(format!("m_{dtype:?}.safetensors"));
        save_model(&f.model, &p, dtype).unwrap();
        let lm = load_model(&p, None, None).unwrap();
        assert_eq!(lm.model.config(), &f.config, "config travels in the metadata");
        let got = lm.model.predict(&f.t("input.t"), &f.t("input.x"), y.as_deref()).unwrap();
        let e = got.rel_err(&want);
        assert!(e <= tol, "{dtype:?}: {e:e}");
    }
    // a failed write leaves no file behind and names the path
    let e = save_model(&f.model, &dir.join("no/such/dir/m.safetensors"), DType::F32).unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"));
}

#[test]
fn strict_loading_names_every_problem_in_one_error() {
    let f = UnetFixture::load("tiny");
    let mut tensors = f.model.params().tensors();
    let removed = tensors.remove(3).0;
    tensors.push(("extra.weight".to_string(), Tensor::zeros(&[2])));
    let bad = tensors[0].0.clone();
    tensors[0].1 = Tensor::zeros(&[1, 2, 3]);
    let mut m = UNetModel::new(&f.config, Init::Zeros).unwrap();
    let e = format!("{:#}", m.params_mut().load_strict(tensors).unwrap_err());
    assert!(e.contains(&format!("missing keys (1): {removed}")), "{e}");
    assert!(e.contains("unexpected keys (1): extra.weight"), "{e}");
    assert!(e.contains(&format!("shape mismatches (1): {bad}: file has [1, 2, 3]")), "{e}");
}

/// An empty batch (64-channel 3×3 convolutions take the Winograd path) is an empty output, and
/// its backward pass runs, rather than a panic.
#[test]
fn an_empty_batch_does_not_panic() {
    let mut cfg = UNetConfig::new([1, 8, 8], 64, 1);
    cfg.channel_mult = Some(vec![1.0]);
    let m = UNetModel::new(&cfg, Init::Torch(1)).unwrap();
    let (x, t) = (Tensor::zeros(&[0, 1, 8, 8]), Tensor::zeros(&[0]));
    let v = m.predict(&t, &x, None).unwrap();
    assert_eq!(v.shape(), &[0, 1, 8, 8]);
    let v = m.forward(&Var::constant(t), &Var::constant(x), None, &mut Forward { dropout_rng: None }).unwrap();
    let g = ops::sum_all(&v).unwrap().backward().unwrap();
    assert!(m.params().vars().iter().all(|p| g.get(p).is_none_or(|d| d.data().iter().all(|&e| e == 0.0))));
}
