//! One ORW-CFM-W2 gradient step against PyTorch + torchcfm (scripts/export_trainer_fixture.py):
//! loss terms, every parameter's gradient and its value after clipping and an Adam step.

mod common;

use orwcfm_fast::flow::matchers::{FlowMatcher, MatcherKind};
use orwcfm_fast::io::safetensors::load;
use orwcfm_fast::nn::{Forward, load_model};
use orwcfm_fast::optim::{Adam, clip_grad_norm};
use orwcfm_fast::orw::loss::{WeightMode, orw_loss, reward_weights};
use orwcfm_fast::tensor::Tensor;

fn sample(t: &Tensor) -> (Vec<f32>, f64) {
    let stride = t.numel().div_ceil(256);
    (t.data().iter().step_by(stride).copied().collect(), t.norm())
}

#[test]
fn one_step_matches_pytorch() {
    let f = load(&common::fixture_path("orw_step.safetensors")).unwrap();
    let g = |k: &str| f.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    let m = |k: &str| f.metadata[k].parse::<f32>().unwrap();
    let (tau, alpha, clip, lr) = (m("tau"), m("alpha"), m("clip"), m("lr"));
    let ckpt = common::fixture_path("tiny_ckpt.pt");
    let cfg = std::env::temp_dir().join(format!("orw-step-cfg-{}.json", std::process::id()));
    std::fs::write(&cfg, &f.metadata["unet_config"]).unwrap();
    let net = load_model(&ckpt, Some(&cfg), Some("ema_model")).unwrap().model;
    let reference = load_model(&ckpt, Some(&cfg), Some("net_model")).unwrap().model;

    let (x0, x1, t) = (g("x0"), g("x1"), g("t"));
    let w = reward_weights(g("r").data(), tau, WeightMode::Exp).unwrap();
    assert!(orwcfm_fast::util::rel_err(&w, g("w").data()) < 1e-6);
    let matcher = FlowMatcher::new(MatcherKind::Independent, 0.0);
    let (xt, ut) = matcher.location_and_flow(&x0, &x1, t.data(), &Tensor::zeros(x0.shape())).unwrap();

    let loss = orw_loss(&net, &reference, &t, &xt, &ut, None, &w, alpha, &mut Forward { dropout_rng: None }).unwrap();
    let rel = |a: f32, b: f32| ((a - b) / b).abs();
    let lv = loss.values().unwrap();
    assert!(rel(lv.fm, g("fm").item()) < 1e-5, "fm {} vs {}", lv.fm, g("fm").item());
    assert!(rel(lv.w2, g("w2").item()) < 1e-5, "w2 {} vs {}", lv.w2, g("w2").item());
    assert!(rel(loss.total.value().item(), g("loss").item()) < 1e-5);
    assert_eq!(lv.total, loss.total.value().item(), "the terms' total is the differentiated total");

    let grads = loss.total.backward().unwrap();
    let mut gs = net.params().grads(&grads).unwrap();
    let norm = clip_grad_norm(&mut gs, clip).unwrap();
    assert!((norm - g("grad_norm").item() as f64).abs() / norm < 1e-5, "grad norm {norm}");
    assert!(norm > clip as f64, "the fixture must exercise clipping");
    // the fixture holds the gradients after clipping (what Adam sees); their total norm is `clip`
    // Gradients that are zero in theory (this config has one channel per GroupNorm group, which
    // normalises away the time embedding) are float noise on both sides: ours must be as small.
    let mut noise = std::collections::HashSet::new();
    for ((name, _), gc) in net.params().iter().zip(&gs) {
        let (s, n) = sample(gc);
        let want_n = g(&format!("grad.norm.{name}")).item() as f64;
        if want_n < 1e-5 * clip as f64 {
            assert!(n < 1e-5 * clip as f64, "gradient of {name} should be ~0, got norm {n}");
            noise.insert(name.to_string());
            continue;
        }
        let e = orwcfm_fast::util::rel_err(&s, g(&format!("grad.sample.{name}")).data());
        assert!(e <= 1e-4 && (n - want_n).abs() <= 1e-4 * want_n.max(1e-3), "grad of {name}: sample {e:e}, norm {n} vs {want_n}");
    }
    let mut params: Vec<Tensor> = net.params().vars().iter().map(|v| v.value()).collect();
    Adam::new(lr).step(&mut params, &gs, lr).unwrap();
    assert!(noise.len() < net.params().len() / 2, "most gradients must be compared");
    // Adam's first step moves each element by about lr·sign(g): elements whose gradient is float
    // noise (zero in theory, e.g. key biases under softmax) may move either way on either side.
    let mut strict = 0usize;
    for ((name, _), p) in net.params().iter().zip(&params) {
        let (s, n) = sample(p);
        let want = g(&format!("after.sample.{name}"));
        let gw = g(&format!("grad.sample.{name}"));
        for (k, (&a, &b)) in s.iter().zip(want.data()).enumerate() {
            if noise.contains(name) || gw.data()[k].abs() < 1e-6 {
                assert!((a - b).abs() <= 2.0 * lr, "{name}[{k}] after the step: {a} vs {b}");
            } else {
                strict += 1;
                assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{name}[{k}] after the step: {a} vs {b}");
            }
        }
        let want_n = g(&format!("after.norm.{name}")).item() as f64;
        assert!((n - want_n).abs() <= 1e-3 * want_n.max(1e-3), "{name}: norm after the step {n} vs {want_n}");
    }
    assert!(strict > 1000, "only {strict} elements compared strictly");
}

#[test]
fn weight_modes() {
    let r = [0.5f32, -1.0, 2.0, 0.0];
    let e = reward_weights(&r, 1.5, WeightMode::Exp).unwrap();
    for (w, r) in e.iter().zip(&r) {
        assert!((w - (1.5 * r).exp()).abs() < 1e-6);
    }
    let n = reward_weights(&r, 1.5, WeightMode::ExpNormalized).unwrap();
    assert!((n.iter().sum::<f32>() / 4.0 - 1.0).abs() < 1e-6);
    for (a, b) in n.iter().zip(&e) {
        assert!((a / b - n[0] / e[0]).abs() < 1e-5, "normalised weights are proportional to exp(τr)");
    }
    let z = reward_weights(&r, 1.0, WeightMode::ZScore).unwrap();
    let logz: f32 = z.iter().map(|w| w.ln()).sum();
    assert!(logz.abs() < 1e-4, "z-scores sum to zero, so log-weights do");
    // a reward scale that overflows exp is an error naming the cure, normalised weights survive it
    assert!(reward_weights(&[100.0, 0.0], 10.0, WeightMode::Exp).is_err());
    assert!(reward_weights(&[100.0, 0.0], 10.0, WeightMode::ExpNormalized).unwrap().iter().all(|w| w.is_finite()));
    assert!(reward_weights(&[f32::NAN], 1.0, WeightMode::Exp).is_err());
    assert!(WeightMode::parse("softmax").is_err());
}
