//! The command line end to end: parity through `forward`/`convert`, and bad input handled with
//! one clear line and a non-zero exit (never a panic).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{UnetFixture, fixture_path};
use orwcfm_fast::io::safetensors::{self as st, Out};
use orwcfm_fast::tensor::{DType, Tensor};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orwcfm-fast"));
    c.arg("--threads").arg("2");
    c
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orwcfm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Run {
    let o = bin().args(args).output().unwrap();
    Run { ok: o.status.success(), code: o.status.code(), stdout: String::from_utf8_lossy(&o.stdout).into(), stderr: String::from_utf8_lossy(&o.stderr).into() }
}

/// A failing run: exit 1, an `error:` line, no panic; returns the error line.
fn fails(args: &[&str]) -> String {
    let r = run(args);
    assert!(!r.ok, "{args:?} should fail; stdout {}", r.stdout);
    assert_eq!(r.code, Some(1), "{args:?}: exit code {:?}, stderr {}", r.code, r.stderr);
    assert!(!r.stderr.contains("panicked") && !r.stderr.contains("internal error"), "{args:?} panicked: {}", r.stderr);
    let errs: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errs.len(), 1, "{args:?}: expected one error line, got {}", r.stderr);
    errs[0].to_string()
}

/// Write the weights of a fixture (with unet_config metadata) and its inputs.
fn write_fixture(f: &UnetFixture, dir: &Path, with_meta: bool) -> (PathBuf, PathBuf) {
    let params: Vec<(String, Tensor)> = f.model.params().tensors();
    let outs: Vec<(String, Out)> = params.iter().map(|(n, t)| (n.clone(), Out::F(t))).collect();
    let mut meta = HashMap::new();
    if with_meta {
        meta.insert("unet_config".to_string(), f.config.to_json().to_string());
    }
    let w = dir.join("weights.safetensors");
    st::save(&w, &outs, DType::F32, &meta).unwrap();
    let (x, t) = (f.t("input.x"), f.t("input.t"));
    let y: Option<Vec<i64>> = f.labels().map(|v| v.iter().map(|&l| l as i64).collect());
    let mut ins = vec![("x".to_string(), Out::F(&x)), ("t".to_string(), Out::F(&t))];
    let yshape = [y.as_ref().map_or(0, |v| v.len())];
    if let Some(y) = &y {
        ins.push(("y".to_string(), Out::I64(&yshape, y)));
    }
    let i = dir.join("in.safetensors");
    st::save(&i, &ins, DType::F32, &HashMap::new()).unwrap();
    (w, i)
}

fn read_v(p: &Path) -> Tensor {
    st::load(p).unwrap().get("v").unwrap().clone()
}

#[test]
fn forward_matches_pytorch_through_the_cli() {
    for name in ["mnist", "scaleshift", "neworder"] {
        let f = UnetFixture::load(name);
        let d = tmpdir(&format!("fwd-{name}"));
        let (w, i) = write_fixture(&f, &d, true);
        let out = d.join("out.safetensors");
        let r = run(&["forward", "--model", w.to_str().unwrap(), "--input", i.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(r.ok, "{name}: {}", r.stderr);
        let e = read_v(&out).rel_err(&f.t("output.v"));
        assert!(e <= 1e-5, "{name}: {e:.3e}");
    }
}

#[test]
fn forward_with_config_file_and_inferred_config() {
    let f = UnetFixture::load("mnist");
    let d = tmpdir("cfg");
    let (w, i) = write_fixture(&f, &d, false);
    // inferred: MNIST's config is fully inferable except heads/order, which default correctly
    let out = d.join("out.safetensors");
    let r = run(&["forward", "--model", w.to_str().unwrap(), "--input", i.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("warning: attention head layout"), "{}", r.stderr);
    assert!(read_v(&out).rel_err(&f.t("output.v")) <= 1e-5);
    // explicit config file
    let cfg = d.join("cfg.json");
    std::fs::write(&cfg, f.config.to_json().to_string()).unwrap();
    let out2 = d.join("out2.safetensors");
    let r = run(&["forward", "--model", w.to_str().unwrap(), "--unet-config", cfg.to_str().unwrap(), "--input", i.to_str().unwrap(), "--out", out2.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(read_v(&out2).rel_err(&f.t("output.v")) <= 1e-5);
}

/// The inferred config of every fixture equals the real one in everything the weights determine.
#[test]
fn inferred_configs_match() {
    for name in ["mnist", "scaleshift", "neworder", "tiny"] {
        let f = UnetFixture::load(name);
        let (c, _) = orwcfm_fast::nn::infer_config(&f.model.params().tensors()).unwrap();
        let real = &f.config;
        assert_eq!(c.num_channels, real.num_channels, "{name}");
        assert_eq!(c.num_res_blocks, real.num_res_blocks, "{name}");
        assert_eq!(c.channel_mult_resolved().unwrap(), real.channel_mult_resolved().unwrap(), "{name}");
        assert_eq!(c.learn_sigma, real.learn_sigma, "{name}");
        assert_eq!(c.class_cond, real.class_cond, "{name}");
        assert_eq!(c.use_scale_shift_norm, real.use_scale_shift_norm, "{name}");
        assert_eq!(c.resblock_updown, real.resblock_updown, "{name}");
        // attention placement as downsample factors
        let mut a = c.attention_ds().unwrap();
        let mut b: Vec<usize> = real.attention_ds().unwrap().into_iter().filter(|&d| d <= 1 << (c.channel_mult_resolved().unwrap().len() - 1)).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn pt_checkpoint_forward_and_convert() {
    let f = UnetFixture::load("tiny");
    let d = tmpdir("pt");
    let (_, i) = write_fixture(&f, &d, false);
    let cfg = d.join("cfg.json");
    std::fs::write(&cfg, f.config.to_json().to_string()).unwrap();
    let ckpt = fixture_path("tiny_ckpt.pt");
    let c = ckpt.to_str().unwrap();
    let (ii, cc) = (i.to_str().unwrap(), cfg.to_str().unwrap());
    // default entry: ema_model
    let out = d.join("ema.safetensors");
    let r = run(&["forward", "--model", c, "--unet-config", cc, "--input", ii, "--out", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(read_v(&out).rel_err(&f.t("ema.output.v")) <= 1e-5);
    // --key net_model
    let out = d.join("net.safetensors");
    let r = run(&["forward", "--model", c, "--key", "net_model", "--unet-config", cc, "--input", ii, "--out", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(read_v(&out).rel_err(&f.t("net.output.v")) <= 1e-5);
    // DataParallel "module." prefix
    let out = d.join("dp.safetensors");
    let dp = fixture_path("tiny_ckpt_dp.pt");
    let r = run(&["forward", "--model", dp.to_str().unwrap(), "--unet-config", cc, "--input", ii, "--out", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(read_v(&out).rel_err(&f.t("ema.output.v")) <= 1e-5);
    // convert, then forward from the safetensors (config travels in the metadata)
    let conv = d.join("conv.safetensors");
    let r = run(&["convert", c, conv.to_str().unwrap(), "--unet-config", cc]);
    assert!(r.ok, "{}", r.stderr);
    let out = d.join("conv_out.safetensors");
    let r = run(&["forward", "--model", conv.to_str().unwrap(), "--input", ii, "--out", out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "config should come from metadata: {}", r.stderr);
    assert!(read_v(&out).rel_err(&f.t("ema.output.v")) <= 1e-5);
    // info on the .pt
    let r = run(&["info", "--model", c, "--unet-config", cc]);
    assert!(r.ok && r.stdout.contains("parameters: 175041"), "{}{}", r.stdout, r.stderr);
}

#[test]
fn half_precision_files_load() {
    let f = UnetFixture::load("tiny");
    let d = tmpdir("half");
    let (_, i) = write_fixture(&f, &d, false);
    for (file, want) in [("tiny_half.safetensors", "ema_f16.output.v"), ("tiny_bf16.safetensors", "ema_bf16.output.v")] {
        let out = d.join(format!("{file}.out"));
        let w = fixture_path(file);
        let r = run(&["forward", "--model", w.to_str().unwrap(), "--input", i.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(r.ok, "{file}: {}", r.stderr);
        let e = read_v(&out).rel_err(&f.t(want));
        assert!(e <= 1e-5, "{file}: {e:.3e}");
    }
}

#[test]
fn bench_unet_json() {
    let r = run(&["bench", "unet", "--unet-config", "mnist", "--batch", "1", "--iters", "1", "--warmup", "0", "--json"]);
    assert!(r.ok, "{}", r.stderr);
    let last = r.stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert!(v["forward_ms"].as_f64().unwrap() > 0.0 && v["forward_backward_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_is_one_clear_line() {
    let f = UnetFixture::load("mnist");
    let d = tmpdir("bad");
    let (w, i) = write_fixture(&f, &d, true);
    let (w, i) = (w.to_str().unwrap().to_string(), i.to_str().unwrap().to_string());
    let out = d.join("o.safetensors");
    let o = out.to_str().unwrap();

    // missing model
    let e = fails(&["forward", "--model", "/nonexistent/m.safetensors", "--input", &i, "--out", o]);
    assert!(e.contains("does not exist"), "{e}");
    // truncated safetensors
    let bytes = std::fs::read(&w).unwrap();
    let trunc = d.join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["forward", "--model", trunc.to_str().unwrap(), "--input", &i, "--out", o]);
    assert!(e.contains("not a valid safetensors"), "{e}");
    // foreign file
    let foreign = d.join("notes.txt");
    std::fs::write(&foreign, "just some text, not weights").unwrap();
    let e = fails(&["forward", "--model", foreign.to_str().unwrap(), "--input", &i, "--out", o]);
    assert!(e.contains("not a valid safetensors"), "{e}");
    let e = fails(&["info", "--model", foreign.to_str().unwrap()]);
    assert!(e.contains("not a valid safetensors"), "{e}");
    // misspelled config key
    let cfg = d.join("typo.json");
    std::fs::write(&cfg, r#"{"dim":[1,28,28],"num_channels":32,"num_res_blocks":1,"class_cond":true,"num_clases":10}"#).unwrap();
    let e = fails(&["forward", "--model", &w, "--unet-config", cfg.to_str().unwrap(), "--input", &i, "--out", o]);
    assert!(e.contains("did you mean 'num_classes'"), "{e}");
    // config that does not fit the weights: names the keys
    let cfg2 = d.join("wrong.json");
    std::fs::write(&cfg2, r#"{"dim":[1,28,28],"num_channels":64,"num_res_blocks":1,"class_cond":true,"num_classes":10}"#).unwrap();
    let e = fails(&["forward", "--model", &w, "--unet-config", cfg2.to_str().unwrap(), "--input", &i, "--out", o]);
    assert!(e.contains("shape mismatches") && e.contains("time_embed.0.weight"), "{e}");
    // not JSON
    let cfg3 = d.join("bad.json");
    std::fs::write(&cfg3, "{dim: oops").unwrap();
    let e = fails(&["forward", "--model", &w, "--unet-config", cfg3.to_str().unwrap(), "--input", &i, "--out", o]);
    assert!(e.contains("not valid JSON"), "{e}");
    // input of the wrong shape
    let xbad = Tensor::zeros(&[2, 3, 28, 28]);
    let tt = f.t("input.t");
    let bad_in = d.join("badin.safetensors");
    let y = [1i64, 2];
    st::save(&bad_in, &[("x".into(), Out::F(&xbad)), ("t".into(), Out::F(&tt)), ("y".into(), Out::I64(&[2], &y))], DType::F32, &HashMap::new()).unwrap();
    let e = fails(&["forward", "--model", &w, "--input", bad_in.to_str().unwrap(), "--out", o]);
    assert!(e.contains("3 channels") && e.contains("[2, 3, 28, 28]"), "{e}");
    // missing labels for a class-conditional model
    let x = f.t("input.x");
    let noy = d.join("noy.safetensors");
    st::save(&noy, &[("x".into(), Out::F(&x)), ("t".into(), Out::F(&tt))], DType::F32, &HashMap::new()).unwrap();
    let e = fails(&["forward", "--model", &w, "--input", noy.to_str().unwrap(), "--out", o]);
    assert!(e.contains("labels y are required"), "{e}");
    // t of the wrong length
    let t3 = Tensor::zeros(&[3]);
    let badt = d.join("badt.safetensors");
    st::save(&badt, &[("x".into(), Out::F(&x)), ("t".into(), Out::F(&t3)), ("y".into(), Out::I64(&[2], &y))], DType::F32, &HashMap::new()).unwrap();
    let e = fails(&["forward", "--model", &w, "--input", badt.to_str().unwrap(), "--out", o]);
    assert!(e.contains("t must be a scalar or have shape [2]"), "{e}");
    // missing x
    let e = fails(&["forward", "--model", &w, "--input", noy.to_str().unwrap().replace("noy", "nothere").as_str(), "--out", o]);
    assert!(e.contains("cannot read"), "{e}");
    // unwritable output
    let e = fails(&["forward", "--model", &w, "--input", &i, "--out", "/nonexistent-dir/v.safetensors"]);
    assert!(e.contains("does not exist"), "{e}");
    // unknown device, unavailable device
    let e = fails(&["forward", "--model", &w, "--input", &i, "--out", o, "--device", "tpu"]);
    assert!(e.contains("unknown device"), "{e}");
    let e = fails(&["bench", "unet", "--unet-config", "mnist", "--device", "cuda"]);
    assert!(e.contains("cuda"), "{e}");
    // .pt with a missing entry lists what is there
    let ckpt = fixture_path("tiny_ckpt.pt");
    let e = fails(&["convert", ckpt.to_str().unwrap(), o, "--key", "emma_model"]);
    assert!(e.contains("ema_model") && e.contains("net_model"), "{e}");
    // a truncated .pt
    let pbytes = std::fs::read(&ckpt).unwrap();
    let tpt = d.join("trunc.pt");
    std::fs::write(&tpt, &pbytes[..pbytes.len() / 3]).unwrap();
    fails(&["convert", tpt.to_str().unwrap(), o]);
    // an unknown built-in bench config
    let e = fails(&["bench", "unet", "--unet-config", "imagenet"]);
    assert!(e.contains("does not exist"), "{e}");
}

/// No samples and an empty batch are rejected up front with one line naming the flag or the
/// shape (they used to reach a kernel and panic).
#[test]
fn empty_requests_are_one_clear_line() {
    let d = tmpdir("empty");
    let g = d.join("g.png");
    let e = fails(&["sample", "-n", "0", "--steps", "2", "--grid", g.to_str().unwrap()]);
    assert!(e.contains("-n/--num must be at least 1"), "{e}");
    assert!(!g.exists());
    let e = fails(&["eval", "-n", "0", "--steps", "2"]);
    assert!(e.contains("-n/--num must be at least 1"), "{e}");
    let x = Tensor::zeros(&[0, 1, 28, 28]);
    let t = Tensor::zeros(&[0]);
    let i = d.join("empty.safetensors");
    st::save(&i, &[("x".into(), Out::F(&x)), ("t".into(), Out::F(&t))], DType::F32, &HashMap::new()).unwrap();
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/models/mnist_unet.safetensors");
    let out = d.join("v.safetensors");
    let e = fails(&["forward", "--model", model, "--input", i.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(e.contains("[0, 1, 28, 28]") && e.contains("batch is empty"), "{e}");
    assert!(!out.exists());
}

/// Every subcommand with `--device` says in its help which devices there are.
#[test]
fn device_help_names_cpu_and_cuda() {
    for cmd in [&["train"][..], &["forward"], &["sample"], &["eval"], &["bench", "unet"]] {
        let r = run(&[cmd, &["--help"]].concat());
        assert!(r.ok, "{cmd:?}: {}", r.stderr);
        // the description: the rest of the flag's line and the lines up to the next flag
        let mut lines = r.stdout.lines().skip_while(|l| !l.contains("--device <DEVICE>"));
        let first = lines.next().unwrap_or_else(|| panic!("{cmd:?} --help has no --device: {}", r.stdout));
        let mut desc = first[first.find("--device <DEVICE>").unwrap() + "--device <DEVICE>".len()..].to_string();
        for l in lines.take_while(|l| !l.trim().is_empty() && !l.trim_start().starts_with('-')) {
            desc = desc + " " + l;
        }
        let desc = desc.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(desc.starts_with("cpu, cuda or cuda:N"), "{cmd:?}: --device is described as {desc:?}");
    }
}
