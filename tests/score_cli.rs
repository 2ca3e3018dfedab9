//! `orwcfm-fast score` on files of samples, and `train --reward clip` end to end on a torchcfm
//! checkpoint with the small random CLIP of `tests/fixtures/clip` (see `clip_parity.rs`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixture_path, last_json};
use orwcfm_fast::io::safetensors::{Out, load, save};
use orwcfm_fast::tensor::{DType, Tensor};
use orwcfm_fast::util::rel_err;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orwcfm-score-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(args).output().unwrap()
}

fn write_x(path: &Path, name: &str, x: &Tensor) {
    save(path, &[(name.to_string(), Out::F(x))], DType::F32, &HashMap::new()).unwrap();
}

fn rewards(o: &Output) -> Vec<f32> {
    last_json(o)["rewards"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[test]
fn score_clip_equals_transformers_reference_in_every_mode() {
    let d = tmpdir("clip");
    let f = load(&fixture_path("clip/parity.safetensors")).unwrap();
    let x = f.get("a_x").unwrap().clone();
    let input = d.join("x.safetensors");
    write_x(&input, "x", &x);
    let dir = fixture_path("clip/tiny_a");
    for (mode, key) in [("prob-diff", "a_prob_diff"), ("cosine", "a_cosine"), ("logit", "a_logit")] {
        let o = run(&["score", "--reward", "clip", "--clip-model", dir.to_str().unwrap(), "--clip-mode", mode, "--text-prompts", "An image of dog,Not an image of dog", "--input", input.to_str().unwrap(), "--json"]);
        let r = rewards(&o);
        let want = f.get(key).unwrap();
        let e = rel_err(&r, want.data());
        assert!(e < 1e-4, "{mode}: rel err {e:.2e}: {r:?} vs {:?}", want.data());
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains(&format!("clip-{mode}[An image of dog | Not an image of dog]")), "{text}");
    }
    // the default prompts are the reference's
    let o = run(&["score", "--reward", "clip", "--clip-model", dir.to_str().unwrap(), "--input", input.to_str().unwrap(), "--json"]);
    let e = rel_err(&rewards(&o), f.get("a_prob_diff").unwrap().data());
    assert!(e < 1e-4, "default prompts: rel err {e:.2e}");
}

#[test]
fn score_classifier_on_real_digits_separates_even_from_odd() {
    let d = tmpdir("cls");
    let ds = orwcfm_fast::data::open("mnist5k:heldout").unwrap();
    let idx: Vec<usize> = (0..200).collect();
    let (x, y) = ds.batch(&idx);
    let y = y.unwrap();
    let input = d.join("digits.safetensors");
    write_x(&input, "x", &x);
    let o = run(&["score", "--reward", "classifier", "--target-classes", "0,2,4,6,8", "--input", input.to_str().unwrap(), "--json"]);
    let r = rewards(&o);
    assert_eq!(r.len(), 200);
    // `top` is 1 exactly where the classifier's top class is even, which the probabilities of
    // every class, scored one class at a time, say independently
    let top = rewards(&run(&["score", "--classifier-mode", "top", "--input", input.to_str().unwrap(), "--json"]));
    let per_class: Vec<Vec<f32>> = (0..10).map(|c| rewards(&run(&["score", "--target-classes", &c.to_string(), "--input", input.to_str().unwrap(), "--json"]))).collect();
    for (i, t) in top.iter().enumerate() {
        let best = (0..10).fold(0, |b, c| if per_class[c][i] > per_class[b][i] { c } else { b });
        assert_eq!(*t, if best % 2 == 0 { 1.0 } else { 0.0 }, "sample {i}");
    }
    let agree = top.iter().zip(&y).filter(|(t, c)| (**t == 1.0) == (**c % 2 == 0)).count();
    assert!(agree >= 190, "top-class reward agrees with the labels on {agree}/200");
    let logr = rewards(&run(&["score", "--classifier-mode", "log", "--input", input.to_str().unwrap(), "--json"]));
    for (l, p) in logr.iter().zip(&r) {
        assert!((l - p.max(1e-6).ln()).abs() < 1e-5, "log {l} prob {p}");
    }
    let mean = |even: bool| {
        let v: Vec<f32> = r.iter().zip(&y).filter(|(_, c)| (**c % 2 == 0) == even).map(|(v, _)| *v).collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    assert!(mean(true) > 0.9 && mean(false) < 0.1, "even {} odd {}", mean(true), mean(false));
    // without --json: one line per sample and a summary
    let o = run(&["score", "--input", input.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(text.lines().count() >= 201 && text.contains("200 samples"), "{text}");
    // the JPEG reward runs on the same file
    let o = run(&["score", "--reward", "jpeg-compressibility", "--input", input.to_str().unwrap(), "--json"]);
    assert!(rewards(&o).iter().all(|v| v.is_finite() && *v < 0.0));
}

#[test]
fn score_names_what_is_missing() {
    let d = tmpdir("errors");
    let t = Tensor::zeros(&[2, 3, 8, 8]);
    let input = d.join("s.safetensors");
    write_x(&input, "samples", &t);
    let o = run(&["score", "--reward", "jpeg-compressibility", "--input", input.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no float tensor 'x'") && e.contains("samples"), "{e}");
    let o = run(&["score", "--reward", "clip", "--key", "samples", "--input", input.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("clip_model"), "{e}");
    let o = run(&["score", "--reward", "clip", "--clip-model", "/nonexistent/clip", "--key", "samples", "--input", input.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("/nonexistent/clip") && e.contains("config.json") && e.contains("model.safetensors"), "{e}");
    let o = run(&["score", "--reward", "clip", "--clip-model", fixture_path("clip/tiny_a").to_str().unwrap(), "--clip-mode", "probdiff", "--key", "samples", "--input", input.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("prob-diff"), "{e}");
}

/// A tiny `train --reward clip` run (one epoch of 2 steps) of `model`; its summary.
fn clip_run(d: &Path, run_name: &str, model: &Path, extra: &[&str]) -> serde_json::Value {
    let clip = fixture_path("clip/tiny_a");
    let mut args = vec!["train", "--ref-path", model.to_str().unwrap(), "--reward", "clip", "--clip-model", clip.to_str().unwrap(), "--savedir", d.to_str().unwrap(), "--run-name", run_name];
    args.extend(["--num-epochs", "1", "--batch-size", "4", "--sample-batch", "8", "--steps-per-epoch", "2", "--ode-steps", "2", "--eval-samples", "8", "--grid-samples", "4", "--quiet"]);
    args.extend(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(run_name).join("summary.json")).unwrap()).unwrap();
    for k in ["reward_mean_initial", "reward_mean_final"] {
        let v = s[k].as_f64().unwrap();
        assert!(v.is_finite() && v.abs() <= 1.0, "{k} = {v}");
    }
    assert_eq!(s["steps"].as_u64(), Some(2));
    s
}

#[test]
fn train_with_the_clip_reward_on_a_torchcfm_checkpoint() {
    let d = tmpdir("train");
    // torchcfm's train_cifar10.py checkpoint format (a 1×32×32 model: grey samples go to RGB)
    let s = clip_run(&d, "dog", &fixture_path("tiny_ckpt.pt"), &["--text-prompts", "An image of dog,Not an image of dog"]);
    assert!(s["reward"].as_str().unwrap().starts_with("clip-prob-diff[An image of dog | Not an image of dog]"), "{s}");
    // an RGB U-Net of CIFAR-10's shape (a small torchcfm config, random weights)
    let cfg = orwcfm_fast::nn::UNetConfig::from_json_str(r#"{"dim":[3,32,32],"num_channels":32,"num_res_blocks":1,"channel_mult":[1,2],"attention_resolutions":"16"}"#).unwrap();
    let m = orwcfm_fast::nn::UNetModel::new(&cfg, orwcfm_fast::nn::Init::Torch(3)).unwrap();
    let rgb = d.join("rgb.safetensors");
    orwcfm_fast::nn::save_model(&m, &rgb, DType::F32).unwrap();
    let s = clip_run(&d, "rgb", &rgb, &["--clip-mode", "cosine"]);
    assert!(s["reward"].as_str().unwrap().starts_with("clip-cosine"), "{s}");
}
