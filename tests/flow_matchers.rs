//! torchcfm's matchers (scripts/export_matcher_fixture.py), and the ORW requirement that OT
//! re-pairing keeps per-sample data with its sample.

mod common;

use orwcfm_fast::flow::matchers::{FlowMatcher, MatcherKind};
use orwcfm_fast::io::safetensors::load;
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

#[test]
fn formulas_match_torchcfm() {
    let f = load(&common::fixture_path("flow_matchers.safetensors")).unwrap();
    let g = |k: &str| f.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    let (x0, x1, eps, t) = (g("x0"), g("x1"), g("eps"), g("t"));
    for name in MatcherKind::NAMES {
        let m = FlowMatcher::new(MatcherKind::parse(name).unwrap(), g(&format!("{name}.sigma")).item());
        let (xt, ut) = m.location_and_flow(&x0, &x1, t.data(), &eps).unwrap();
        let (ex, eu) = (xt.rel_err(&g(&format!("{name}.xt"))), ut.rel_err(&g(&format!("{name}.ut"))));
        assert!(ex <= 1e-6 && eu <= 1e-5, "{name}: xt {ex:e}, ut {eu:e}");
    }
}

#[test]
fn exact_ot_pairing_reaches_pots_cost_and_keeps_x1_in_place() {
    let f = load(&common::fixture_path("flow_matchers.safetensors")).unwrap();
    let (x0, x1) = (f.get("x0").unwrap().clone(), f.get("x1").unwrap().clone());
    let m = FlowMatcher::new(MatcherKind::ExactOt, 0.0);
    let s = m.sample(&x0, &x1, None, &mut Rng::new(1)).unwrap();
    assert_eq!(s.x1_idx, (0..5).collect::<Vec<_>>(), "without replacement x1 keeps its order");
    let per = x0.numel() / 5;
    let cost: f64 = (0..5).map(|k| (0..per).map(|e| (x0.data()[s.x0_idx[k] * per + e] as f64 - x1.data()[k * per + e] as f64).powi(2)).sum::<f64>()).sum();
    let want = f.get("ot.cost").unwrap().item() as f64;
    assert!((cost - want).abs() / want < 1e-5, "OT cost {cost} vs POT {want}");
}

/// ORW weights belong to x1's samples: after any OT re-pairing (with or without replacement),
/// the row that carries x1[j] must carry j's weight. The published code loses this alignment.
#[test]
fn weights_stay_with_their_samples_through_ot() {
    let mut rng = Rng::new(3);
    let n = 16;
    // x1 rows are constant images whose value is their index, so a row's identity is readable
    let x1 = Tensor::from_vec((0..n).flat_map(|j| std::iter::repeat_n(j as f32, 8)).collect(), &[n, 2, 2, 2]);
    let x0 = Tensor::randn(&[n, 2, 2, 2], &mut rng);
    let weights: Vec<f32> = (0..n).map(|j| 1.0 + j as f32).collect();
    for replace in [false, true] {
        let m = FlowMatcher { ot_replace: replace, ..FlowMatcher::new(MatcherKind::ExactOt, 0.0) };
        let s = m.sample(&x0, &x1, None, &mut rng).unwrap();
        // u_t = x1 − x0 at σ = 0, so x1 = u_t + x0[x0_idx]
        for k in 0..n {
            let x1_val = s.ut.data()[k * 8] + x0.data()[s.x0_idx[k] * 8];
            let j = s.x1_idx[k];
            assert!((x1_val - j as f32).abs() < 1e-5, "row {k}: carries x1[{x1_val}] but x1_idx says {j}");
            assert_eq!(weights[j], 1.0 + x1_val.round(), "the weight gathered by x1_idx is the sample's own");
        }
        if replace {
            let distinct: std::collections::HashSet<_> = s.x1_idx.iter().collect();
            assert!(distinct.len() < n, "drawing with replacement should repeat some pairs");
        }
    }
}

#[test]
fn t_and_noise_are_drawn_and_seeded() {
    let mut r = Rng::new(9);
    let x0 = Tensor::randn(&[6, 3], &mut r);
    let x1 = Tensor::randn(&[6, 3], &mut r);
    let m = FlowMatcher::new(MatcherKind::Independent, 0.0);
    let a = m.sample(&x0, &x1, None, &mut Rng::new(4)).unwrap();
    let b = m.sample(&x0, &x1, None, &mut Rng::new(4)).unwrap();
    assert_eq!(a.t.data(), b.t.data());
    assert_eq!(a.xt.data(), b.xt.data());
    assert!(a.t.data().iter().all(|&t| (0.0..1.0).contains(&t)));
    assert!(MatcherKind::parse("otcfmm").is_err());
}
