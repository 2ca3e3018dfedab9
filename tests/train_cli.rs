//! `orwcfm-fast train` end to end on tiny settings: outputs, config layering, bad input, a reward
//! that turns NaN (last good checkpoint kept), a dying reward program, Ctrl-C and `--resume`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orwcfm-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tiny settings: 2 steps per epoch of 4 samples, 2 Euler steps, 8 evaluation samples.
fn tiny(d: &Path, run: &str) -> Vec<String> {
    ["train", "--savedir", d.to_str().unwrap(), "--run-name", run, "--batch-size", "4", "--sample-batch", "8", "--steps-per-epoch", "2", "--ode-steps", "2", "--eval-samples", "8", "--grid-samples", "4", "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(args).output().unwrap()
}

fn with(mut a: Vec<String>, more: &[&str]) -> Vec<String> {
    a.extend(more.iter().map(|s| s.to_string()));
    a
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn steps(d: &Path) -> Vec<u64> {
    std::fs::read_to_string(d.join("metrics.jsonl")).unwrap_or_default().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

#[test]
fn a_run_writes_every_output() {
    let d = tmpdir("outputs");
    let cfg = d.join("c.toml");
    std::fs::write(&cfg, "learning_rate = 0.001\ntemperature = 2.0\nnum_epochs = 2\n").unwrap();
    let o = run(&with(tiny(&d, "r"), &["--config", cfg.to_str().unwrap(), "--temperature", "1.5", "--eval-every", "1"]));
    assert!(o.status.success(), "{}", err(&o));
    let r = d.join("r");
    for f in
        ["metrics.jsonl", "metrics.csv", "eval.jsonl", "config.toml", "summary.json", "reward.png", "losses.png", "samples_step00000000.png", "samples_step00000004.png", "checkpoints/latest", "reference.safetensors"]
    {
        assert!(r.join(f).is_file(), "{f} missing");
    }
    assert!(std::fs::read_dir(&r).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents.")));
    assert_eq!(steps(&r), vec![1, 2, 3, 4]);
    let csv = std::fs::read_to_string(r.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "header + 4 rows");
    assert!(csv.lines().next().unwrap().contains("reward_mean"));
    // flags win over the file, the file over the preset
    let text = std::fs::read_to_string(r.join("config.toml")).unwrap();
    let resolved: toml::Table = toml::from_str(&text).unwrap();
    // f32 keys are written with their shortest decimal
    assert!(text.lines().any(|l| l == "learning_rate = 0.001") && text.lines().any(|l| l == "w2_coefficient = 0.15"), "{text}");
    assert_eq!(resolved["learning_rate"].as_float().unwrap() as f32, 0.001);
    assert_eq!(resolved["temperature"].as_float().unwrap(), 1.5);
    assert_eq!(resolved["batch_size"].as_integer(), Some(4));
    assert_eq!(resolved["w2_coefficient"].as_float().unwrap() as f32, 0.15, "from the mnist-even preset");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(r.join("summary.json")).unwrap()).unwrap();
    for k in ["reward_mean_initial", "reward_mean_final", "diversity_initial", "diversity_final", "wall_time_s", "device", "target_fraction_final"] {
        assert!(!s[k].is_null(), "summary.json lacks {k}");
    }
    assert_eq!(s["steps"], 4);
    // the same run folder again needs --resume or --overwrite
    let o = run(&tiny(&d, "r"));
    assert!(!o.status.success() && err(&o).contains("--resume"), "{}", err(&o));
    // without --run-name, a second run of the preset gets the next free name
    let args: Vec<String> = tiny(&d, "x").into_iter().filter(|a| a != "--run-name" && a != "x").collect();
    let args = with(args, &["--num-epochs", "1", "--eval-every", "0", "--grid-every", "0"]);
    for name in ["mnist-even", "mnist-even-2"] {
        let o = run(&args);
        assert!(o.status.success(), "{}", err(&o));
        assert!(d.join(name).join("summary.json").is_file(), "{name}");
    }
}

#[test]
fn bad_input_is_one_clear_error() {
    let d = tmpdir("bad");
    let cfg = d.join("typo.toml");
    std::fs::write(&cfg, "temprature = 2.0\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(tiny(&d, "a"), &["--config", cfg.to_str().unwrap()]), "did you mean 'temperature'"),
        (with(tiny(&d, "b"), &["--ref-path", "/nonexistent/model.safetensors"]), "/nonexistent/model.safetensors"),
        (with(tiny(&d, "c"), &["--ref-path", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_ckpt.pt")]), "[1, 28, 28] but the model makes [1, 32, 32]"),
        (with(tiny(&d, "d"), &["--reward", "jpeg-compresibility"]), "did you mean 'jpeg-compressibility'"),
        (with(tiny(&d, "e"), &["--reward", "external", "--reward-command", "false"]), "exited"),
        (with(tiny(&d, "f"), &["--weight-mode", "softmax"]), "unknown weight mode 'softmax'"),
        (with(tiny(&d, "g"), &["--device", "cuda"]), "cuda"),
    ];
    for (args, want) in cases {
        let o = run(&args);
        let e = err(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        let last = e.lines().last().unwrap_or("");
        assert!(last.starts_with("error:") && last.contains(want), "{args:?}: expected '{want}' in the last line of: {e}");
    }
}

#[test]
fn a_nan_reward_stops_and_keeps_the_last_good_checkpoint() {
    let d = tmpdir("nan");
    // calls 1-2: initial evaluation and grid; call 3: epoch 1's samples; call 4: NaN
    let script = d.join("reward.py");
    std::fs::write(
        &script,
        r#"import sys, struct, json
calls = 0
while True:
    head = sys.stdin.buffer.read(8)
    if len(head) < 8: break
    n = struct.unpack('<Q', head)[0]
    body = sys.stdin.buffer.read(n)
    hl = struct.unpack('<Q', body[:8])[0]
    b = json.loads(body[8:8 + hl])['images']['shape'][0]
    calls += 1
    v = float('nan') if calls >= 4 else 0.5
    sys.stdout.buffer.write(struct.pack('<%df' % b, *([v] * b)))
    sys.stdout.buffer.flush()
"#,
    )
    .unwrap();
    let cmd = format!("python3 {}", script.display());
    let o = run(&with(tiny(&d, "r"), &["--reward", "external", "--reward-command", &cmd, "--num-epochs", "3", "--save-every-epochs", "1", "--eval-every", "0", "--grid-every", "0"]));
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("non-finite") && e.contains("last good checkpoint is step-00000002"), "{e}");
    let r = d.join("r");
    assert_eq!(std::fs::read_to_string(r.join("checkpoints/latest")).unwrap().trim(), "step-00000002");
    assert!(r.join("checkpoints/step-00000002/net.safetensors").is_file());
}

#[test]
fn ctrl_c_saves_and_resume_finishes_the_run() {
    let d = tmpdir("ctrlc");
    let args = with(tiny(&d, "r"), &["--num-epochs", "4", "--eval-every", "0", "--grid-every", "0"]);
    let child = Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let r = d.join("r");
    let t0 = Instant::now();
    while steps(&r).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    let e = err(&o);
    assert_eq!(o.status.code(), Some(130), "{e}");
    assert!(e.contains("interrupted at step") && e.contains("--resume"), "{e}");
    let done = steps(&r).len() as u64;
    assert!(done < 8, "interrupted before the end ({done} steps)");
    // flags other than --num-epochs/--quiet cannot change on resume
    let o = run(&["train".into(), "--resume".into(), r.display().to_string(), "--learning-rate".into(), "0.1".into()]);
    assert!(err(&o).contains("cannot change when resuming"), "{}", err(&o));
    let o = run(&["train".into(), "--resume".into(), r.display().to_string(), "--quiet".into()]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(steps(&r), (1..=8).collect::<Vec<u64>>(), "every step logged once across the interruption");
}

#[test]
fn the_example_external_reward_drives_a_run() {
    let d = tmpdir("external");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rewards/external_reward.py");
    let o = run(&with(tiny(&d, "r"), &["--reward", "external", "--reward-command", &format!("python3 {script}"), "--num-epochs", "1"]));
    assert!(o.status.success(), "{}", err(&o));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("r/summary.json")).unwrap()).unwrap();
    assert!(s["reward"].as_str().unwrap().starts_with("external:"));
    // mean brightness in [0, 1], as the script computes it
    let r = s["reward_mean_initial"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r) && r > 0.0, "{r}");
    assert!(s["diversity_feature_initial"].is_number(), "the bundled classifier still gives feature diversity");
}

#[test]
fn every_config_key_has_a_flag_of_the_same_name() {
    let mut flags: Vec<String> = orwcfm_fast::commands::train::TrainFlags::keys().iter().map(|s| s.to_string()).collect();
    let mut keys = orwcfm_fast::commands::runconfig::all_keys();
    flags.sort();
    keys.sort();
    assert_eq!(flags, keys);
}

/// A run's `config.toml` writes f32 values by their shortest decimal (`0.0004`, not the f64
/// `0.00039999998989515007`) and reads back to the same settings, bit for bit.
#[test]
fn config_toml_writes_short_floats_that_read_back_exactly() {
    use orwcfm_fast::commands::runconfig::{ProductConfig, preset, read_toml, resolve, to_toml};
    let d = tmpdir("toml");
    let mut orw = preset("mnist-even").unwrap();
    orw.sigma = 0.1;
    orw.ema_decay = 0.9999;
    orw.grad_clip = 1.0 / 3.0;
    orw.ode_atol = 1e-7;
    let prod = ProductConfig { reward_timeout: 0.1 + 0.2, ..ProductConfig::default() };
    let text = to_toml(&orw, &prod).unwrap();
    for want in ["learning_rate = 0.0004", "w2_coefficient = 0.15", "temperature = 6.0", "sigma = 0.1", "ema_decay = 0.9999", "grad_clip = 0.33333334", "ode_atol = 0.0000001", "reward_timeout = 0.30000000000000004"] {
        assert!(text.lines().any(|l| l == want), "config.toml lacks '{want}':\n{text}");
    }
    let p = d.join("config.toml");
    std::fs::write(&p, &text).unwrap();
    let (o, q) = resolve(Some(read_toml(&p).unwrap()), serde_json::Map::new()).unwrap();
    assert_eq!((&o, &q), (&orw, &prod));
    for (a, b) in [(o.learning_rate, orw.learning_rate), (o.w2_coefficient, orw.w2_coefficient), (o.temperature, orw.temperature), (o.grad_clip, orw.grad_clip), (o.sigma, orw.sigma), (o.ema_decay, orw.ema_decay)] {
        assert_eq!(a.to_bits(), b.to_bits());
    }
}

/// The classifier reward reads the probability mass unless a file or a flag says otherwise; the
/// `reward_log` boolean of older run folders reads as it did; a bad mode is refused before any work.
#[test]
fn the_classifier_mode_comes_from_the_preset_a_file_or_a_legacy_key() {
    use orwcfm_fast::commands::runconfig::resolve;
    use serde_json::{Map, Value, json};
    let obj = |v: Value| -> Map<String, Value> { v.as_object().unwrap().clone() };
    let mode = |file: Option<Value>, flags: Value| resolve(file.map(obj), obj(flags)).map(|(_, p)| p.classifier_mode);
    assert_eq!(mode(None, json!({})).unwrap(), "prob");
    assert_eq!(mode(None, json!({"classifier_mode": "top"})).unwrap(), "top");
    assert_eq!(mode(Some(json!({"classifier_mode": "log"})), json!({})).unwrap(), "log");
    assert_eq!(mode(Some(json!({"classifier_mode": "log"})), json!({"classifier_mode": "prob"})).unwrap(), "prob");
    assert_eq!(mode(Some(json!({"reward_log": true})), json!({})).unwrap(), "log");
    assert_eq!(mode(Some(json!({"reward_log": false})), json!({})).unwrap(), "prob");
    assert_eq!(mode(Some(json!({"reward_log": true})), json!({"classifier_mode": "top"})).unwrap(), "top");
    let e = mode(None, json!({"classifier_mode": "argmax"})).unwrap_err().to_string();
    assert!(e.contains("unknown classifier_mode 'argmax'"), "{e}");
}

/// A GPU failure mid-run (an out-of-memory injected on the simulated GPU, the CI's stand-in for a
/// real one) ends `train` with one `error:` line that names the failure and the last good
/// checkpoint; `--resume` from it (without the failure) finishes the run.
#[test]
fn a_gpu_out_of_memory_mid_run_keeps_the_last_good_checkpoint() {
    if orwcfm_fast::backend::cuda::sim::compiler().is_none() {
        eprintln!("skipped: no C++ compiler for the simulated GPU");
        return;
    }
    let d = tmpdir("oom");
    let args = with(tiny(&d, "r"), &["--device", "cuda", "--num-epochs", "4", "--save-every-epochs", "1", "--eval-every", "0", "--grid-every", "0"]);
    // A 4-step tiny run makes about 4300 pool requests by the end of step 2 and 5800 by the end
    // of step 3: request 5000 falls after the first checkpoint (step 2) and well before the end.
    let o = Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(&args).env("ORWCFM_SIMULATED_GPU", "1").env("ORWCFM_CUDA_FAIL_ALLOC_AFTER", "5000").output().unwrap();
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{e}");
    let line = lines[0];
    assert!(line.contains("out of memory on cuda:0") && line.contains("failure injected"), "{line}");
    let r = d.join("r");
    let latest = std::fs::read_to_string(r.join("checkpoints/latest")).unwrap().trim().to_string();
    assert!(latest.starts_with("step-") && latest != "step-00000008", "{latest}");
    assert!(line.contains(&format!("the last good checkpoint is {latest} (continue with --resume {})", r.display())), "{line}");
    assert!(r.join("checkpoints").join(&latest).join("net.safetensors").is_file());
    let done = steps(&r);
    assert!(!done.is_empty() && *done.last().unwrap() < 8, "{done:?}");
    // resume as the message says: the run finishes, each step logged once
    let o = Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(["train", "--resume", r.to_str().unwrap(), "--quiet"]).env("ORWCFM_SIMULATED_GPU", "1").env_remove("ORWCFM_CUDA_FAIL_ALLOC_AFTER").output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(std::fs::read_to_string(r.join("checkpoints/latest")).unwrap().trim(), "step-00000008");
    assert_eq!(steps(&r), (1..=8).collect::<Vec<u64>>(), "every step logged once across the failure");
}

/// The default experiment's direction in the time a test can take: the mnist-even preset's first
/// 2 epochs (64 of its 96 steps, one policy refresh), evaluated on 256 samples. The share of even digits rises, the
/// Fréchet distance to the real even digits falls below the base model's, the samples stay
/// confident digits of every even class.
#[test]
fn the_default_experiment_raises_even_digits_and_keeps_them_real() {
    let d = tmpdir("default");
    let o = run(&with(Vec::new(), &["train", "--savedir", d.to_str().unwrap(), "--run-name", "r", "--num-epochs", "2", "--eval-samples", "256", "--eval-every", "2", "--grid-every", "0", "--quiet"]));
    assert!(o.status.success(), "{}", err(&o));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("r").join("summary.json")).unwrap()).unwrap();
    let g = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {s}"));
    let (f0, f1) = (g("target_fraction_initial"), g("target_fraction_final"));
    assert!(f0 < 0.6 && f1 > f0 + 0.2, "even share {f0} -> {f1}");
    let (d0, d1) = (g("fd_real_target_initial"), g("fd_real_target_final"));
    assert!(d1 < 0.8 * d0, "FD to real even digits {d0} -> {d1}");
    assert!(g("min_target_share_final") >= 0.05, "{}", s["class_shares_final"]);
    assert!(g("confidence_final") > 0.8, "confidence {}", g("confidence_final"));
}
