//! The quality and diversity metrics of `eval` and `train`: the Fréchet distance and the Vendi
//! score against NumPy/SciPy (scripts/export_metric_fixture.py), and the real-image figures on
//! real digits (real digits score near the floor, the wrong digits far above it).

mod common;

use common::{bits_f64, fixture_path};
use orwcfm_fast::data::{Split, bundled_mnist};
use orwcfm_fast::eval::quality::{frechet_distance, vendi_score};
use orwcfm_fast::eval::{RealSet, sample_stats};
use orwcfm_fast::io::safetensors::load;

#[test]
fn frechet_distance_matches_scipy() {
    let f = load(&fixture_path("quality_scipy.safetensors")).expect("fixture (scripts/export_metric_fixture.py)");
    for name in ["full", "silu128"] {
        let (a, b) = (f.get(&format!("fd_{name}_a")).unwrap(), f.get(&format!("fd_{name}_b")).unwrap());
        let want = bits_f64(f.get_int(&format!("fd_{name}")).unwrap().1);
        let got = frechet_distance(a.data(), a.dim(0), b.data(), b.dim(0), a.dim(1));
        let rel = (got - want).abs() / want;
        assert!(rel < 1e-7, "{name}: ours {got}, scipy {want} (rel {rel:e})");
        // symmetric in its arguments
        let back = frechet_distance(b.data(), b.dim(0), a.data(), a.dim(0), a.dim(1));
        assert!((back - got).abs() / got < 1e-9, "{name}: {back} vs {got}");
    }
}

#[test]
fn vendi_score_matches_numpy() {
    let f = load(&fixture_path("quality_scipy.safetensors")).expect("fixture (scripts/export_metric_fixture.py)");
    for name in ["clusters", "wide"] {
        let x = f.get(&format!("vendi_{name}_x")).unwrap();
        let want = bits_f64(f.get_int(&format!("vendi_{name}")).unwrap().1);
        let got = vendi_score(x.data(), x.dim(0), x.dim(1));
        assert!((got - want).abs() / want < 1e-9, "{name}: ours {got}, numpy {want}");
    }
}

/// Real even digits measured as if they were samples: their distance to the held-out even digits
/// is near the floor, the odd digits' is several times larger, and the class figures follow.
#[test]
fn real_digits_score_near_the_floor_and_wrong_digits_far_from_it() {
    let cls = orwcfm_fast::commands::classifier::bundled().unwrap();
    let (train, held) = (bundled_mnist(Split::Train).unwrap(), bundled_mnist(Split::HeldOut).unwrap());
    let even = [0usize, 2, 4, 6, 8];
    let real = RealSet::new(&cls, &held, Some(&train), &even).unwrap();
    let labels = train.labels.clone().unwrap();
    // 250 training digits of each kind (the floor set is the training split too, so use the
    // second half of it: the floor draws from all of it, these are a different draw)
    let pick = |want_even: bool| -> Vec<usize> { (0..train.len()).rev().filter(|&i| even.contains(&labels[i]) == want_even).take(250).collect() };
    let (ev, od) = (train.batch(&pick(true)).0, train.batch(&pick(false)).0);
    let r = vec![0.0f32; 250];
    let se = sample_stats(&ev, &r, Some((&cls, &even)), None, Some(&real)).unwrap();
    let so = sample_stats(&od, &r, Some((&cls, &even)), None, Some(&real)).unwrap();
    let (fe, fo, floor) = (se.fd_real_target.unwrap(), so.fd_real_target.unwrap(), se.fd_floor_target.unwrap());
    assert!(fe < 1.5 * floor, "even digits: FD {fe} vs floor {floor}");
    assert!(fo > 4.0 * fe, "odd digits: FD {fo} vs even {fe}");
    assert!(se.target_fraction.unwrap() > 0.95 && so.target_fraction.unwrap() < 0.05);
    let shares = se.class_shares.clone().unwrap();
    assert_eq!(se.min_target_share, even.iter().map(|&c| shares[c]).min_by(f32::total_cmp));
    assert!(se.min_target_share.unwrap() > 0.1, "{shares:?}");
    assert!(se.confidence.unwrap() > 0.9, "{:?}", se.confidence);
    // five digits' worth of variety against one copied 250 times
    let one = train.batch(&vec![pick(true)[0]; 250]).0;
    let s1 = sample_stats(&one, &r, Some((&cls, &even)), None, Some(&real)).unwrap();
    assert!(s1.vendi.unwrap() < 1.01 && se.vendi.unwrap() > 4.0, "vendi {:?} vs {:?}", s1.vendi, se.vendi);
    assert!((se.vendi.unwrap() / se.vendi_real_target.unwrap() - 1.0).abs() < 0.25, "vendi {:?} vs real {:?}", se.vendi, se.vendi_real_target);
}
