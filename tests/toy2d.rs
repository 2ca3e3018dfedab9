//! The method's theory on a 2-D mixture of Gaussians (seeded, seconds on 2 cores): the reward
//! rises, α = 0 collapses the samples, the final diversity grows with α, and a larger τ raises the
//! reward faster. Plus the `toy2d` command's output.

use std::process::Command;

use orwcfm_fast::toy2d::{Toy2dOptions, Toy2dResult, default_base, finetune};

fn run(alpha: f32, tau: f32, epochs: u64) -> Toy2dResult {
    let base = default_base(0).unwrap();
    finetune(&base, &Toy2dOptions { alpha, tau, epochs, ..Toy2dOptions::default() }, &mut |_| {}).unwrap()
}

#[test]
fn reward_rises_alpha_zero_collapses_diversity_grows_with_alpha() {
    let alphas = [0.0, 0.1, 1.0, 10.0];
    let res: Vec<Toy2dResult> = alphas.iter().map(|&a| run(a, 1.0, 20)).collect();
    for r in &res {
        eprintln!("alpha {}: reward {:.3} -> {:.3}, diversity {:.3} -> {:.3}", r.alpha, r.reward_mean_initial, r.reward_mean, r.diversity_initial, r.diversity);
    }
    let (r0, d0) = (res[0].reward_mean_initial, res[0].diversity_initial);
    assert!(d0 > 2.0 && r0 < -2.0, "the base model covers all eight modes (diversity {d0}, reward {r0})");
    // α = 0: the online reweighting concentrates everything at the reward's peak
    assert!(res[0].reward_mean > r0 + 1.5, "alpha 0: reward {r0} -> {}", res[0].reward_mean);
    assert!(res[0].diversity < d0 / 4.0, "alpha 0 must collapse: diversity {d0} -> {}", res[0].diversity);
    // the published default α = 1 still raises the reward, and keeps most of the diversity
    assert!(res[2].reward_mean > r0 + 0.15, "alpha 1: reward {r0} -> {}", res[2].reward_mean);
    assert!(res[2].diversity > 0.9 * d0);
    // the trade-off: more W2 regularisation, more diversity and less reward, with margins
    for k in 0..alphas.len() - 1 {
        let (a, b) = (&res[k], &res[k + 1]);
        assert!(b.diversity > a.diversity + 0.02, "diversity must grow from alpha {} ({}) to {} ({})", a.alpha, a.diversity, b.alpha, b.diversity);
        assert!(b.reward_mean < a.reward_mean - 0.01, "reward must fall from alpha {} ({}) to {} ({})", a.alpha, a.reward_mean, b.alpha, b.reward_mean);
    }
}

#[test]
fn larger_tau_raises_reward_faster() {
    let slow = run(0.1, 0.5, 5);
    let fast = run(0.1, 2.0, 5);
    for (k, (s, f)) in slow.history.iter().zip(&fast.history).enumerate().skip(1) {
        assert!(f.reward_mean > s.reward_mean + 0.1, "epoch {k}: tau 2 reward {} vs tau 0.5 {}", f.reward_mean, s.reward_mean);
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn toy2d_command_json_plot_and_sweep() {
    let d = std::env::temp_dir().join(format!("orwcfm-toy2d-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let png = d.join("samples.png");
    let (ok, out, err) = cli(&["toy2d", "--alpha", "0", "--epochs", "2", "--eval-samples", "200", "--json", "--plot", png.to_str().unwrap()]);
    assert!(ok, "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let keys: Vec<&str> = last.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["reward_mean_initial", "reward_mean", "diversity_initial", "diversity"]);
    assert!(last["reward_mean"].as_f64().unwrap() > last["reward_mean_initial"].as_f64().unwrap());
    assert!(out.contains("epoch   2:"), "{out}");
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");

    let sweep = d.join("frontier.png");
    let (ok, out, err) = cli(&["toy2d", "--sweep", sweep.to_str().unwrap(), "--alphas", "0,10", "--epochs", "1", "--eval-samples", "100", "--json"]);
    assert!(ok, "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["sweep"].as_array().unwrap().len(), 2);
    assert!(std::fs::metadata(&sweep).unwrap().len() > 10_000);

    let (ok, _, err) = cli(&["toy2d", "--epochs", "1", "--plot", d.join("x.jpg").to_str().unwrap()]);
    assert!(!ok && err.starts_with("error:") && err.contains(".png"), "{err}");
}
