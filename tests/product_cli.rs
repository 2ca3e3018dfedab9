//! The other product commands: the bundled classifier's accuracy, `sample`, `eval`, `pretrain`
//! (and its shape check against the data).

use std::path::PathBuf;
use std::process::{Command, Output};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orwcfm-product-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orwcfm-fast")).args(args).output().unwrap()
}

fn last_json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn bundled_classifier_reaches_95_percent_on_held_out_digits() {
    let o = run(&["classifier", "eval", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = last_json(&o);
    assert_eq!(j["images"], 500);
    let acc = j["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "held-out accuracy {acc}");
}

#[test]
fn sample_and_eval_the_bundled_model() {
    let d = tmpdir("sample");
    let (g, s) = (d.join("g.png"), d.join("s.safetensors"));
    let o = run(&["sample", "-n", "4", "--steps", "2", "--grid", g.to_str().unwrap(), "--out", s.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(&std::fs::read(&g).unwrap()[..4], b"\x89PNG");
    let f = orwcfm_fast::io::safetensors::load(&s).unwrap();
    assert_eq!(f.get("x").unwrap().shape(), &[4, 1, 28, 28]);
    let o = run(&["eval", "-n", "8", "--steps", "2", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = last_json(&o);
    for k in [
        "reward_mean",
        "diversity_pixel",
        "diversity_feature",
        "class_entropy_bits",
        "target_fraction",
        "class_histogram",
        "vendi",
        "confidence",
        "class_shares",
        "min_target_share",
        "fd_real",
        "fd_real_target",
        "fd_floor",
        "fd_floor_target",
        "vendi_real",
    ] {
        assert!(!j[k].is_null(), "eval lacks {k}: {j}");
    }
    assert_eq!(j["class_histogram"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum::<u64>(), 8);
}

#[test]
fn pretrain_a_tiny_unet_and_reject_mismatched_data() {
    let d = tmpdir("pretrain");
    let cfg = d.join("tiny.json");
    std::fs::write(&cfg, r#"{"dim":[1,28,28],"num_channels":32,"num_res_blocks":1,"channel_mult":[1,2],"attention_resolutions":"7"}"#).unwrap();
    let out = d.join("m.safetensors");
    let o = run(&["pretrain", "--data", "mnist5k:heldout", "--unet-config", cfg.to_str().unwrap(), "--steps", "3", "--batch", "4", "--warmup", "1", "--out", out.to_str().unwrap(), "--log-every", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().filter(|l| l.starts_with("step ")).count(), 3, "{text}");
    assert!(out.is_file() && d.join("m.net.safetensors").is_file());
    // the EMA differs from the raw weights after training (decay 0.9999)
    let (a, b) = (orwcfm_fast::io::safetensors::load(&out).unwrap(), orwcfm_fast::io::safetensors::load(&d.join("m.net.safetensors")).unwrap());
    assert!(a.tensors.iter().zip(&b.tensors).any(|((_, x), (_, y))| x.data() != y.data()));

    let cfg32 = d.join("c32.json");
    std::fs::write(&cfg32, r#"{"dim":[3,32,32],"num_channels":32,"num_res_blocks":1,"channel_mult":[1,2]}"#).unwrap();
    let o = run(&["pretrain", "--data", "mnist5k:heldout", "--unet-config", cfg32.to_str().unwrap(), "--steps", "1", "--out", d.join("x.safetensors").to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("[3, 32, 32]") && e.contains("[1, 28, 28]"), "{e}");
}

/// `pretrain --resume` continues a run bit for bit: 8 steps straight equal 4 steps, a
/// checkpoint, and 4 more from it (dropout on, and a pass over the 500 digits ends in between,
/// so that the data order, the noise and the dropout streams all cross the checkpoint).
#[test]
fn pretrain_resume_continues_bit_for_bit() {
    let d = tmpdir("pretrain-resume");
    let cfg = d.join("tiny.json");
    std::fs::write(&cfg, r#"{"dim":[1,28,28],"num_channels":32,"num_res_blocks":1,"channel_mult":[1,2],"attention_resolutions":"7","dropout":0.1}"#).unwrap();
    let c = cfg.to_str().unwrap();
    let (full, part) = (d.join("full.safetensors"), d.join("part.safetensors"));
    let args = |out: &PathBuf, steps: &str| -> Vec<String> {
        [
            "--threads",
            "2",
            "pretrain",
            "--data",
            "mnist5k:heldout",
            "--unet-config",
            c,
            "--batch",
            "96",
            "--warmup",
            "2",
            "--lr",
            "1e-3",
            "--ema-decay",
            "0.9",
            "--save-every",
            "4",
            "--log-every",
            "1",
            "--steps",
            steps,
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let go = |v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        let o = run(&v);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let straight = go(args(&full, "8"));
    go(args(&part, "4"));
    assert!(d.join("part.pretrain").join("state.json").is_file(), "no checkpoint beside --out");
    let mut resumed_args = args(&part, "8");
    resumed_args.push("--resume".into());
    let resumed = go(resumed_args);
    assert!(resumed.contains("resuming at step 4"), "{resumed}");
    // the same losses after the checkpoint, and the same weights at the end
    let loss_at = |text: &str, step: &str| text.lines().find(|l| l.starts_with(&format!("step {step:>7}/"))).map(|l| l.split_whitespace().nth(3).unwrap().to_string());
    for step in ["5", "6", "7", "8"] {
        assert_eq!(loss_at(&straight, step), loss_at(&resumed, step), "loss at step {step}:\n{straight}\n{resumed}");
    }
    for (a, b) in [(full.clone(), part.clone()), (d.join("full.net.safetensors"), d.join("part.net.safetensors"))] {
        let (fa, fb) = (orwcfm_fast::io::safetensors::load(&a).unwrap(), orwcfm_fast::io::safetensors::load(&b).unwrap());
        assert_eq!(fa.tensors.len(), fb.tensors.len());
        for ((na, ta), (nb, tb)) in fa.tensors.iter().zip(&fb.tensors) {
            assert_eq!(na, nb);
            assert!(ta.data().iter().zip(tb.data()).all(|(x, y)| x.to_bits() == y.to_bits()), "{na} differs after resuming");
        }
    }
    // a changed setting is refused, naming it
    let mut bad = args(&part, "12");
    bad.push("--resume".into());
    let i = bad.iter().position(|s| s == "--lr").unwrap();
    bad[i + 1] = "2e-3".into();
    let v: Vec<&str> = bad.iter().map(|s| s.as_str()).collect();
    let o = run(&v);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--lr"), "{e}");
    // and so is a resume without a checkpoint
    let o = run(&["pretrain", "--data", "mnist5k:heldout", "--unet-config", c, "--resume", "--out", d.join("none.safetensors").to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no checkpoint"), "{e}");
}

/// `sweep`: one run per α, the table, JSON, CSV and figure, a finished run kept on a second
/// call, and the keys the sweep sets refused as flags.
#[test]
fn sweep_runs_one_experiment_per_alpha_and_tabulates_them() {
    let d = tmpdir("sweep");
    let out = d.join("sw");
    let args = [
        "sweep",
        "--alphas",
        "0,3",
        "--num-epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--warmup-steps",
        "0",
        "--learning-rate",
        "1e-3",
        "--eval-samples",
        "16",
        "--grid-samples",
        "4",
        "--ode-steps",
        "2",
        "--sample-batch",
        "32",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    let runs = j["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0]["alpha"].as_f64(), runs[1]["alpha"].as_f64()), (Some(0.0), Some(3.0)));
    for r in runs {
        for k in ["reward", "fd_real_target", "vendi", "class_entropy_bits", "min_target_share", "w2_to_reference"] {
            assert!(r[k].is_number(), "{k} missing in {r}");
        }
        assert!(std::path::Path::new(r["run_dir"].as_str().unwrap()).join("summary.json").is_file());
    }
    // each run trained with its own α, and α changed the outcome
    for (r, a) in runs.iter().zip(["0", "3"]) {
        let toml = std::fs::read_to_string(std::path::Path::new(r["run_dir"].as_str().unwrap()).join("config.toml")).unwrap();
        assert!(toml.lines().any(|l| l.replace(' ', "") == format!("w2_coefficient={a}.0") || l.replace(' ', "") == format!("w2_coefficient={a}")), "{toml}");
    }
    assert_ne!(runs[0]["reward"], runs[1]["reward"]);
    assert!(j["base"]["fd_floor_target"].is_number());
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert_eq!(md.lines().count(), 5, "{md}"); // header, rule, base, two runs
    assert_eq!(std::fs::read_to_string(out.join("sweep.csv")).unwrap().lines().count(), 3);
    assert_eq!(&std::fs::read(out.join("sweep.png")).unwrap()[..4], b"\x89PNG");
    // a second call keeps the finished runs
    let o = run(&args);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).matches("finished before, kept").count() == 2, "{}", String::from_utf8_lossy(&o.stdout));
    let o = run(&["sweep", "--w2-coefficient", "1", "--out", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--w2-coefficient") && e.contains("--alphas"), "{e}");
}
