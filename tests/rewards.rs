//! Rewards: JPEG (in)compressibility, target image, external program.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;
use orwcfm_fast::reward::external::ExternalReward;
use orwcfm_fast::reward::jpeg::JpegReward;
use orwcfm_fast::reward::target::TargetImageReward;
use orwcfm_fast::reward::{Reward, score_checked};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

fn noise(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(Rng::new(seed).uniform_vec(n, -1.0, 1.0), shape)
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orwcfm-rewards-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn script() -> String {
    format!("{}/examples/rewards/external_reward.py", env!("CARGO_MANIFEST_DIR"))
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------- JPEG

#[test]
fn jpeg_flat_grey_beats_noise_and_incompressibility_is_negation() {
    let (h, w) = (32, 32);
    let mut data = vec![0.1f32; h * w];
    data.extend(Rng::new(7).uniform_vec(h * w, -1.0, 1.0));
    let x = Tensor::from_vec(data, &[2, 1, h, w]);
    let mut comp = JpegReward::compressibility();
    let mut incomp = JpegReward::incompressibility();
    assert_eq!(comp.name(), "jpeg-compressibility");
    assert_eq!(incomp.name(), "jpeg-incompressibility");
    assert_eq!(comp.quality, 95);
    let c = score_checked(&mut comp, &x, None).unwrap();
    let i = score_checked(&mut incomp, &x, None).unwrap();
    assert!(c[0] > c[1], "flat grey {} should score above noise {}", c[0], c[1]);
    assert!(c[0] < 0.0 && c[1] < 0.0);
    for k in 0..2 {
        assert_eq!(i[k], -c[k]);
    }
}

/// Independent path: uint8 by hand, image crate's `ImageEncoder::write_image` at quality 95.
fn reference_kb(img: &Tensor, idx: usize) -> f32 {
    let s = img.shape();
    let (c, h, w) = (s[1], s[2], s[3]);
    let plane = h * w;
    let base = idx * c * plane;
    let mut px = Vec::with_capacity(c * plane);
    for p in 0..plane {
        for ch in 0..c {
            let v = img.data()[base + ch * plane + p];
            let v01 = (v + 1.0) / 2.0;
            px.push((v01 * 255.0).round().clamp(0.0, 255.0) as u8);
        }
    }
    let color = if c == 1 { ExtendedColorType::L8 } else { ExtendedColorType::Rgb8 };
    let mut buf = Vec::new();
    image::ImageEncoder::write_image(JpegEncoder::new_with_quality(&mut buf, 95), &px, w as u32, h as u32, color).unwrap();
    buf.len() as f32 / 1000.0
}

#[test]
fn jpeg_size_matches_independent_encoding_grey_and_rgb() {
    for (c, h, w) in [(1, 16, 24), (3, 32, 32)] {
        let x = noise(&[3, c, h, w], 11 + c as u64);
        let got = JpegReward::incompressibility().score(&x, None).unwrap();
        assert_eq!(got.len(), 3);
        for (k, g) in got.iter().enumerate() {
            let want = reference_kb(&x, k);
            assert_eq!(*g, want, "C={c} sample {k}");
            assert!(*g > 0.1, "a noise image is more than 100 bytes");
        }
        // B = 1 takes the serial path
        let one = Tensor::from_vec(x.data()[..c * h * w].to_vec(), &[1, c, h, w]);
        assert_eq!(JpegReward::compressibility().score(&one, None).unwrap(), vec![-got[0]]);
    }
}

#[test]
fn jpeg_rejects_two_channels_and_non_images() {
    let e = JpegReward::compressibility().score(&noise(&[2, 2, 8, 8], 1), None).unwrap_err().to_string();
    assert!(e.contains("2 channels"), "{e}");
    assert!(JpegReward::compressibility().score(&noise(&[2, 8], 1), None).is_err());
}

// ---------------------------------------------------------------- target image

#[test]
fn target_reward_is_minus_mse() {
    let t = noise(&[3, 4, 5], 3);
    let other = noise(&[3, 4, 5], 4);
    let mut data = t.data().to_vec();
    data.extend_from_slice(other.data());
    let x = Tensor::from_vec(data, &[2, 3, 4, 5]);
    let mut r = TargetImageReward::new(t.clone());
    let got = score_checked(&mut r, &x, None).unwrap();
    assert_eq!(got[0], 0.0);
    let mut se = 0.0f64;
    for k in 0..60 {
        se += ((other.data()[k] - t.data()[k]) as f64).powi(2);
    }
    let want = -(se / 60.0) as f32;
    assert!((got[1] - want).abs() <= 1e-6 * want.abs().max(1.0), "{} vs {}", got[1], want);
    assert!(got[1] < -0.1);
}

#[test]
fn target_shape_mismatch_names_both_shapes() {
    let mut r = TargetImageReward::new(noise(&[3, 4, 4], 1));
    let e = r.score(&noise(&[2, 1, 4, 4], 2), None).unwrap_err().to_string();
    assert!(e.contains("[2, 1, 4, 4]") && e.contains("[3, 4, 4]"), "{e}");
}

#[test]
fn target_from_png_files() {
    let dir = tmp_dir("target");
    // RGB: pixel (x, y) = (x*60, y*80, 255)
    let rgb = image::RgbImage::from_fn(4, 3, |x, y| image::Rgb([(x * 60) as u8, (y * 80) as u8, 255]));
    let p = dir.join("t_rgb.png");
    rgb.save(&p).unwrap();
    let mut r = TargetImageReward::from_file(&p).unwrap();
    let t = r.target().clone();
    assert_eq!(t.shape(), &[3, 3, 4]);
    let at = |c: usize, y: usize, x: usize| t.data()[c * 12 + y * 4 + x];
    assert_eq!(at(0, 0, 0), -1.0);
    assert_eq!(at(0, 1, 3), 180.0 / 127.5 - 1.0);
    assert_eq!(at(1, 2, 1), 160.0 / 127.5 - 1.0);
    assert_eq!(at(2, 1, 1), 1.0);
    // the target scores 0 against itself
    let x = Tensor::from_vec(t.data().to_vec(), &[1, 3, 3, 4]);
    assert_eq!(r.score(&x, None).unwrap(), vec![0.0]);
    // grey → one channel
    let grey = image::GrayImage::from_fn(2, 2, |x, y| image::Luma([(x + 2 * y) as u8 * 85]));
    let p = dir.join("t_grey.png");
    grey.save(&p).unwrap();
    let r = TargetImageReward::from_file(&p).unwrap();
    assert_eq!(r.target().shape(), &[1, 2, 2]);
    assert_eq!(r.target().data(), &[-1.0, 85.0 / 127.5 - 1.0, 170.0 / 127.5 - 1.0, 1.0]);
    // missing file → error naming it
    let e = TargetImageReward::from_file(dir.join("missing.png")).err().unwrap().to_string();
    assert!(e.contains("missing.png"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- external program

/// Three known images: all -1 (brightness 0), all +1 (1), half 0.5 / half -0.5 (0.5).
fn known_batch() -> Tensor {
    let n = 2 * 4 * 4;
    let mut d = vec![-1.0f32; n];
    d.extend(vec![1.0f32; n]);
    d.extend((0..n).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }));
    Tensor::from_vec(d, &[3, 2, 4, 4])
}

#[test]
fn external_example_script_one_process_two_batches() {
    let mut r = ExternalReward::new(cmd(&["python3", &script()]), vec![]).unwrap();
    assert_eq!(r.name(), "external:python3");
    let pid = r.pid().unwrap();
    let x = known_batch();
    let first = score_checked(&mut r, &x, None).unwrap();
    assert_eq!(first, vec![0.0, 1.0, 0.5]);
    // second batch, reversed order, with labels (a class-conditional model)
    let n = 2 * 4 * 4;
    let mut d = x.data()[2 * n..].to_vec();
    d.extend_from_slice(&x.data()[n..2 * n]);
    d.extend_from_slice(&x.data()[..n]);
    let x2 = Tensor::from_vec(d, &[3, 2, 4, 4]);
    let second = score_checked(&mut r, &x2, Some(&[3, 1, 7])).unwrap();
    assert_eq!(second, vec![0.5, 1.0, 0.0]);
    // the same process answered both batches, and it was started once
    assert_eq!(r.pid(), Some(pid));
    assert_eq!(r.starts(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        let ready: Vec<String> = r.stderr_tail().into_iter().filter(|l| l.contains("ready (pid")).collect();
        if !ready.is_empty() || Instant::now() > deadline {
            break ready;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready, vec![format!("external_reward.py[{pid}]: ready (pid {pid})")]);
    // wrong label count is an error before anything is sent
    assert!(r.score(&x, Some(&[1])).is_err());
}

#[test]
fn external_program_that_exits_immediately() {
    let mut r = ExternalReward::new(cmd(&["sh", "-c", "echo 'bad model file' >&2; exit 3"]), vec![]).unwrap();
    let e = r.score(&known_batch(), None).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(e.contains("external reward program 'sh -c"), "{e}");
    assert!(e.contains("exited"), "{e}");
    assert!(e.contains("exit status: 3"), "{e}");
    assert!(e.contains("bad model file"), "{e}");
}

#[test]
fn external_program_that_never_answers_times_out() {
    let mut r = ExternalReward::new(cmd(&["sleep", "30"]), vec![]).unwrap().with_timeout(Duration::from_secs(1));
    let t0 = Instant::now();
    let e = r.score(&known_batch(), None).unwrap_err().to_string();
    eprintln!("{e}");
    let took = t0.elapsed();
    assert!(e.contains("timed out after 1 s"), "{e}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(r.pid().is_none(), "the program was killed");
}

#[test]
fn external_program_answering_too_few_bytes() {
    // Reads the request properly, answers 4 bytes for a batch of 3, exits.
    let prog = "import sys,struct\n\
                n=struct.unpack('<Q',sys.stdin.buffer.read(8))[0]\n\
                sys.stdin.buffer.read(n)\n\
                sys.stdout.buffer.write(struct.pack('<f',1.0)); sys.stdout.buffer.flush()\n";
    let mut r = ExternalReward::new(cmd(&["python3", "-c", prog]), vec![]).unwrap();
    let e = r.score(&known_batch(), None).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(e.contains("4 of 12 bytes"), "{e}");
    assert!(e.contains("exited"), "{e}");
}

#[test]
fn external_environment_is_passed_and_restart_after_failure() {
    // Answers one batch with the reward taken from the environment, then exits.
    let prog = "import os,sys,struct\n\
                n=struct.unpack('<Q',sys.stdin.buffer.read(8))[0]\n\
                sys.stdin.buffer.read(n)\n\
                v=float(os.environ['MY_REWARD'])\n\
                sys.stdout.buffer.write(struct.pack('<3f',v,v,v)); sys.stdout.buffer.flush()\n";
    let env = vec![("MY_REWARD".to_string(), "2.5".to_string())];
    let mut r = ExternalReward::new(cmd(&["python3", "-c", prog]), env).unwrap();
    assert_eq!(r.score(&known_batch(), None).unwrap(), vec![2.5; 3]);
    assert!(r.score(&known_batch(), None).unwrap_err().to_string().contains("exited"));
    assert_eq!(r.score(&known_batch(), None).unwrap(), vec![2.5; 3]);
    assert_eq!(r.starts(), 2);
}

#[test]
fn external_program_that_does_not_exist() {
    let e = ExternalReward::new(cmd(&["/nonexistent/reward-program", "--x"]), vec![]).err().unwrap().to_string();
    assert!(e.contains("cannot start") && e.contains("/nonexistent/reward-program"), "{e}");
    assert!(ExternalReward::new(vec![], vec![]).is_err());
}
