//! `orwcfm-fast bench unet | sample | round` and what every benchmark shares: timing on a device
//! (synchronise, run, synchronise; the median of repeats after a warm-up), peak memory, the
//! NVIDIA libraries the process really bound, and where it ran.
//!
//! * `bench unet`: U-Net forward (inference) and forward+backward (MSE loss) in ms;
//! * `bench sample`: the policy sampling of a training round — `orw::sample_model`, the code
//!   `Trainer` draws its batches with — in images per second;
//! * `bench round`: one ORW-CFM-W2 round through [`Trainer::train_step`] (sample the batch,
//!   weights, pairing, loss, backward, clip, Adam) in ms;
//! * `bench kernels`: `bench_kernels.rs`.
//!
//! Each prints a short text report and, with `--json`, one JSON object as its last line, with
//! `peak_memory_mb` (a GPU: the caching pool's peak reserved bytes, the most ever taken from the
//! driver at once; the CPU: the process's peak resident set) and `libraries` (see
//! [`loaded_libraries`]). One precision per process, so that the peak is that precision's own.

use std::time::Instant;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::autograd::{Var, ops};
use crate::backend::cpu::isa as cpu_isa;
use crate::flow::ode::OdeSolver;
use crate::nn::{Forward, Init, UNetConfig, UNetModel, VelocityField};
use crate::orw::{OrwConfig, Trainer, sample_model};
use crate::reward::FnReward;
use crate::rng::Rng;
use crate::tensor::{DType, Device, Tensor};

/// Median of a non-empty sample.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// Wait for the work queued on `device` (GPU work is asynchronous: read no clock before it).
pub fn sync(device: Device) -> Result<()> {
    device.synchronize()
}

/// Milliseconds per call of `f` on `device`: `warmup` untimed calls, then `repeats` times
/// (synchronise, `iters` calls, synchronise) — each repeat's time over `iters`. Sorted.
pub fn time_ms(device: Device, warmup: usize, repeats: usize, iters: usize, f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    time_ms_within(device, warmup, repeats, iters, None, f)
}

/// [`time_ms`] that starts no further repeat once `max_s` seconds (warm-up included) have
/// passed; at least one repeat is timed.
pub fn time_ms_within(device: Device, warmup: usize, repeats: usize, iters: usize, max_s: Option<f64>, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let start = Instant::now();
    if repeats == 0 || iters == 0 {
        bail!("timing needs at least one repeat of one iteration");
    }
    for _ in 0..warmup {
        f()?;
    }
    sync(device)?;
    let mut out = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        if !out.is_empty() && max_s.is_some_and(|m| start.elapsed().as_secs_f64() >= m) {
            break;
        }
        let t0 = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        sync(device)?;
        out.push(t0.elapsed().as_secs_f64() * 1e3 / iters as f64);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

/// Peak memory of this run in MiB and what it counts: on a GPU, the caching pool's peak
/// reserved bytes (comparable to `torch.cuda.max_memory_reserved`); on the CPU, the process's
/// peak resident set (`VmHWM`).
pub fn peak_memory(device: Device) -> (Option<f64>, &'static str) {
    match device {
        Device::Cuda(i) => match crate::backend::cuda::gpu(i) {
            Ok(g) => (Some(g.pool_stats().peak_reserved as f64 / (1 << 20) as f64), "GPU pool: peak bytes reserved from the driver"),
            Err(_) => (None, "GPU not open"),
        },
        Device::Cpu => (peak_rss_mb(), "process peak resident set (VmHWM)"),
    }
}

/// The process's peak resident set in MiB (Linux).
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// File-name prefixes of the NVIDIA libraries reported by [`loaded_libraries`].
const NVIDIA_LIBS: &[&str] = &["libcuda.so", "libcudart", "libcublasLt", "libcublas.so", "libcudnn", "libnvrtc", "libnvJitLink", "libcurand"];

/// The distinct NVIDIA shared libraries (driver, runtime, cuBLAS, cuBLASLt, cuDNN, NVRTC,
/// nvJitLink, cuRAND) mapped into this process, as `/proc/self/maps` names them (the files
/// really bound: cudarc tries unversioned names such as `libcublas.so` before `libcublas.so.13`,
/// so a toolkit copy and a Python wheel's copy can both end up loaded). Empty off Linux.
pub fn loaded_libraries() -> Vec<String> {
    libraries_in_maps(&std::fs::read_to_string("/proc/self/maps").unwrap_or_default())
}

/// [`loaded_libraries`] of a `/proc/<pid>/maps` text.
pub fn libraries_in_maps(maps: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else { continue };
        let name = path.rsplit('/').next().unwrap_or(path);
        if NVIDIA_LIBS.iter().any(|p| name.starts_with(p)) && !out.iter().any(|o| o == path) {
            out.push(path.to_string());
        }
    }
    out.sort();
    out
}

/// Libraries bound from more than one file: `(name, paths)`, the name being the file name up
/// to `.so` (`libcublas`, `libcudnn_ops`, …).
pub fn duplicate_libraries(paths: &[String]) -> Vec<(String, Vec<String>)> {
    let mut by: Vec<(String, Vec<String>)> = Vec::new();
    for p in paths {
        let name = p.rsplit('/').next().unwrap_or(p);
        let stem = name.split(".so").next().unwrap_or(name).to_string();
        match by.iter_mut().find(|(s, _)| *s == stem) {
            Some((_, v)) => v.push(p.clone()),
            None => by.push((stem, vec![p.clone()])),
        }
    }
    by.retain(|(_, v)| v.len() > 1);
    by
}

/// The libraries bound now, with a warning on stderr for each library mapped from two files.
pub fn libraries_report() -> Vec<String> {
    let libs = loaded_libraries();
    for (name, paths) in duplicate_libraries(&libs) {
        eprintln!("warning: {} copies of {name} are mapped into this process: {} (set ORWCFM_CUDA_LIB_DIRS or LD_LIBRARY_PATH to one of them)", paths.len(), paths.join(", "));
    }
    libs
}

/// What ran the benchmark, in words and as JSON: the CPU's model, threads and instruction-set
/// extensions, or the GPU's name, architecture, TF32 setting and convolution method.
pub fn describe_device(device: Device) -> Result<(String, Value)> {
    let threads = rayon::current_num_threads();
    Ok(match device {
        Device::Cpu => {
            let model = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
                .unwrap_or_else(|| std::env::consts::ARCH.to_string());
            let isa = cpu_features();
            let level = cpu_isa::level();
            let mut info = json!({"kind": "cpu", "model": model, "threads": threads, "isa": isa});
            if let (Value::Object(m), Value::Object(l)) = (&mut info, cpu_isa_json()) {
                m.extend(l);
            }
            (format!("cpu {model} ({threads} threads; {} kernels, {}; {})", level.name(), isa_chosen_by(), isa.join(" ")), info)
        }
        Device::Cuda(i) => {
            let g = crate::backend::cuda::gpu(i)?;
            let conv = crate::backend::cuda::conv::method(&g);
            (
                format!("cuda:{i} {} ({}, conv: {conv}, tf32 {})", g.name, g.arch, if g.tf32 { "on" } else { "off" }),
                json!({"kind": "cuda", "index": i, "name": g.name, "arch": g.arch, "simulated": g.is_sim(), "tf32": g.tf32, "conv": conv.to_string(), "host_threads": threads}),
            )
        }
    })
}

/// How the CPU kernels' level was chosen: `detected` (the best this CPU runs), or
/// `lowered by ORWCFM_CPU_ISA=..`.
pub fn isa_chosen_by() -> String {
    let (level, best) = (cpu_isa::level(), cpu_isa::detected());
    if level < best { format!("lowered by {}={} from {best}", cpu_isa::ENV, std::env::var(cpu_isa::ENV).unwrap_or_default().trim()) } else { "detected".to_string() }
}

/// The CPU kernels' instruction-set level as JSON fields: `isa_level` (in use), `isa_detected`
/// (the best this CPU runs), `isa_chosen_by` (`detected` or `ORWCFM_CPU_ISA`), `isa_levels`
/// (every level this CPU can run, plainest first).
pub fn cpu_isa_json() -> Value {
    let (level, best) = (cpu_isa::level(), cpu_isa::detected());
    json!({
        "isa_level": level.name(),
        "isa_detected": best.name(),
        "isa_chosen_by": if level < best { cpu_isa::ENV } else { "detected" },
        "isa_levels": cpu_isa::Isa::runnable().map(|l| l.name()).collect::<Vec<_>>(),
    })
}

/// The level in words, for `devices`: `avx512 (AVX-512 ..), detected; this CPU runs scalar, avx2, avx512`.
pub fn cpu_isa_line() -> String {
    let level = cpu_isa::level();
    let all: Vec<&str> = cpu_isa::Isa::runnable().map(|l| l.name()).collect();
    format!("kernels at {level} ({}), {}; best detected {}; this CPU runs {} ({} lowers it)", level.describe(), isa_chosen_by(), cpu_isa::detected(), all.join(", "), cpu_isa::ENV)
}

/// The SIMD extensions this CPU has that the CPU backend can use.
fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
            ("avx", std::arch::is_x86_feature_detected!("avx")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            ("avx512dq", std::arch::is_x86_feature_detected!("avx512dq")),
            ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
        ] {
            if on {
                f.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    f.push("neon");
    f
}

/// The fields every benchmark's JSON carries: device, peak memory, libraries.
pub fn common_json(device: Device) -> Result<serde_json::Map<String, Value>> {
    let (on, dev) = describe_device(device)?;
    let (peak, what) = peak_memory(device);
    let mut m = serde_json::Map::new();
    m.insert("device".into(), json!(device.to_string()));
    m.insert("on".into(), json!(on));
    m.insert("device_info".into(), dev);
    m.insert("peak_memory_mb".into(), json!(peak));
    m.insert("peak_memory_counts".into(), json!(what));
    m.insert("libraries".into(), json!(libraries_report()));
    Ok(m)
}

/// Open the device and parse the precision; the common checks of `--iters` and `--batch`.
fn setup(device: &str, precision: &str, batch: usize, iters: usize) -> Result<(Device, DType)> {
    let dev = Device::parse(device)?;
    let precision = DType::parse_precision(precision)?;
    dev.ensure_available()?;
    if batch == 0 || iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    Ok((dev, precision))
}

/// Timings of one U-Net configuration.
pub struct UnetTimings {
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
}

/// Time forward (inference) and forward+backward (MSE to a random target, training mode).
pub fn bench_unet(cfg: &UNetConfig, batch: usize, iters: usize, warmup: usize, device: Device, precision: DType) -> Result<UnetTimings> {
    let (t, _) = bench_unet_profiled(cfg, batch, iters, warmup, device, precision, false)?;
    Ok(t)
}

/// Per-iteration profile of one pass: (wall ms per iteration, the profiler's rows).
pub type PassProfile = (f64, Vec<crate::backend::cpu::profile::Row>);

/// [`bench_unet`], and with `profile` (CPU) `iters` more iterations of each pass under the
/// profiler: the forward's and the forward+backward's tables.
pub fn bench_unet_profiled(cfg: &UNetConfig, batch: usize, iters: usize, warmup: usize, device: Device, precision: DType, profile: bool) -> Result<(UnetTimings, Option<[PassProfile; 2]>)> {
    use crate::backend::cpu::profile as prof;
    let mut model = UNetModel::new(cfg, Init::Torch(0))?;
    model.to_device(device)?;
    model.to_precision(precision)?;
    let mut rng = Rng::new(1);
    let [c, h, w] = cfg.dim;
    let x = Tensor::randn(&[batch, c, h, w], &mut rng).to_device(device)?;
    let t = Tensor::rand_uniform(&[batch], 0.0, 1.0, &mut rng).to_device(device)?;
    let target = Tensor::randn(&[batch, cfg.out_channels(), h, w], &mut rng).to_device(device)?;
    let y: Option<Vec<usize>> = cfg.class_cond.then(|| (0..batch).map(|i| i % cfg.num_classes).collect());
    let mut fwd_once = || -> Result<()> {
        std::hint::black_box(model.predict(&t, &x, y.as_deref())?);
        Ok(())
    };
    let fwd = time_ms(device, warmup, iters, 1, &mut fwd_once)?;
    let profiled = |f: &mut dyn FnMut() -> Result<()>| -> Result<PassProfile> {
        prof::reset();
        prof::enable(true);
        let t0 = std::time::Instant::now();
        let r = (0..iters).try_for_each(|_| f());
        let wall = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
        prof::enable(false);
        r?;
        Ok((wall, prof::take()))
    };
    let fwd_prof = if profile && device == Device::Cpu { Some(profiled(&mut fwd_once)?) } else { None };
    let mut drop = crate::rng::philox::Philox::new(1);
    let mut fb_once = || -> Result<()> {
        // a training step meets new weights every time (the optimiser has written them): write
        // them here too, so that nothing derived from their values (the CPU's cached Winograd
        // kernels) is reused from the previous iteration
        if device == Device::Cpu {
            model.params().update_arena(|a| {
                a.flat_mut().data_mut();
                Ok(())
            })?;
        }
        let v = model.forward(&Var::constant(t.clone()), &Var::constant(x.clone()), y.as_deref(), &mut Forward { dropout_rng: Some(&mut drop) })?;
        let loss = ops::mse_loss(&v, &Var::constant(target.clone()))?;
        let g = loss.backward()?;
        std::hint::black_box(model.params().grads(&g)?);
        Ok(())
    };
    let fb = time_ms(device, warmup, iters, 1, &mut fb_once)?;
    let fb_prof = if profile && device == Device::Cpu { Some(profiled(&mut fb_once)?) } else { None };
    let timings = UnetTimings { forward_ms: median(fwd), forward_backward_ms: median(fb) };
    Ok((timings, fwd_prof.zip(fb_prof).map(|(a, b)| [a, b])))
}

/// Print one pass's profile: per op class, then per op and detail; returns it as JSON.
fn print_profile(label: &str, (wall, rows): &PassProfile, iters: usize) -> Value {
    use crate::backend::cpu::profile::class_of;
    let per = |ns: u64| ns as f64 / 1e6 / iters as f64;
    let ops: Vec<_> = rows.iter().filter(|r| !r.detail).collect();
    let in_ops: f64 = ops.iter().map(|r| per(r.stat.ns)).sum();
    let mut classes: Vec<(&str, f64, f64)> = Vec::new();
    for r in &ops {
        let c = class_of(&r.name);
        match classes.iter_mut().find(|x| x.0 == c) {
            Some(x) => {
                x.1 += per(r.stat.ns);
                x.2 += r.stat.faults as f64 / iters as f64;
            }
            None => classes.push((c, per(r.stat.ns), r.stat.faults as f64 / iters as f64)),
        }
    }
    classes.sort_by(|a, b| b.1.total_cmp(&a.1));
    let outside = (wall - in_ops).max(0.0);
    println!("\n{label}: {wall:.1} ms per iteration (profiled run), {in_ops:.1} ms inside ops");
    println!("  {:<52} {:>9} {:>6} {:>12}", "op class", "ms/iter", "%", "faults/iter");
    for (c, ms, f) in &classes {
        println!("  {c:<52} {ms:>9.1} {:>6.1} {f:>12.0}", 100.0 * ms / wall);
    }
    println!("  {:<52} {outside:>9.1} {:>6.1}", "outside ops (tape, autograd bookkeeping, frees)", 100.0 * outside / wall);
    println!("  {:<52} {:>9} {:>6} {:>12}", "op / detail", "ms/iter", "calls", "faults/iter");
    for r in rows {
        let name = if r.detail { format!("  · {}", r.name) } else { r.name.clone() };
        println!("  {name:<52} {:>9.2} {:>6} {:>12.0}", per(r.stat.ns), r.stat.calls / iters as u64, r.stat.faults as f64 / iters as f64);
    }
    json!({
        "wall_ms": wall,
        "in_ops_ms": in_ops,
        "classes": classes.iter().map(|(c, ms, f)| json!({"class": c, "ms": ms, "faults": f})).collect::<Vec<_>>(),
        "rows": rows.iter().map(|r| json!({"name": r.name, "detail": r.detail, "ms": per(r.stat.ns), "calls": r.stat.calls as f64 / iters as f64, "faults": r.stat.faults as f64 / iters as f64})).collect::<Vec<_>>(),
    })
}

/// `bench unet`.
pub fn run_unet(cfg: &str, batch: usize, device: &str, precision: &str, iters: usize, warmup: usize, json: bool, profile: bool) -> Result<()> {
    let (dev, precision) = setup(device, precision, batch, iters)?;
    if profile && dev != Device::Cpu {
        bail!("--profile times CPU ops; on {dev} the kernels run asynchronously (use bench kernels)");
    }
    let cfg = crate::nn::config::resolve_config(cfg)?;
    let (r, prof) = bench_unet_profiled(&cfg, batch, iters, warmup, dev, precision, profile)?;
    let mut m = common_json(dev)?;
    println!("U-Net {:?} num_channels {} batch {batch} {precision} on {}, median of {iters}:", cfg.dim, cfg.num_channels, m["on"].as_str().unwrap_or(""));
    println!("  forward           {:>10.1} ms", r.forward_ms);
    println!("  forward+backward  {:>10.1} ms", r.forward_backward_ms);
    print_peak(&m);
    let prof_json = prof.map(|[f, fb]| json!({"forward": print_profile("forward", &f, iters), "forward_backward": print_profile("forward+backward", &fb, iters)}));
    if json {
        for (k, v) in
            [("forward_ms", json!(r.forward_ms)), ("forward_backward_ms", json!(r.forward_backward_ms)), ("batch", json!(batch)), ("precision", json!(precision.name())), ("threads", json!(rayon::current_num_threads()))]
        {
            m.insert(k.into(), v);
        }
        if let Some(p) = prof_json {
            m.insert("profile".into(), p);
        }
        println!("{}", Value::Object(m));
    }
    Ok(())
}

fn print_peak(m: &serde_json::Map<String, Value>) {
    if let Some(p) = m["peak_memory_mb"].as_f64() {
        println!("  peak memory       {p:>10.1} MiB ({})", m["peak_memory_counts"].as_str().unwrap_or(""));
    }
}

/// `bench clip`: the CLIP reward on `batch` random images `[3, image, image]` in [-1, 1].
pub fn run_clip(dir: Option<&str>, arch: &str, batch: usize, image: usize, device: &str, precision: &str, chunk: Option<usize>, iters: usize, warmup: usize, json: bool, profile: bool) -> Result<()> {
    use crate::nn::clip::{ClipConfig, ClipModel};
    use crate::reward::Reward;
    use crate::reward::clip::{ClipMode, ClipReward};
    let dev = Device::parse(device)?;
    dev.ensure_available()?;
    if batch == 0 || image == 0 {
        bail!("bench clip needs --batch and --image of at least 1");
    }
    let mut model = match dir {
        Some(d) => ClipModel::from_dir(std::path::Path::new(d), dev)?,
        None => ClipModel::random(ClipConfig::builtin(arch)?, 0, dev)?,
    };
    let precision = DType::parse_precision(precision)?;
    model.to_precision(precision)?;
    let what = dir.map(|d| d.to_string()).unwrap_or_else(|| format!("{arch} (random weights)"));
    let c = model.config.clone();
    let t0 = Instant::now();
    let mut r = ClipReward::new(model, vec!["An image of dog".into(), "Not an image of dog".into()], ClipMode::ProbDiff)?;
    let text_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(c) = chunk {
        r.chunk = if c == 0 { batch } else { c };
    }
    let mut rng = crate::rng::Rng::new(1);
    let x = Tensor::rand_uniform(&[batch, 3, image, image], -1.0, 1.0, &mut rng);
    let ms = time_ms_within(dev, warmup, iters, 1, None, || {
        r.score(&x, None)?;
        Ok(())
    })?;
    let med = median(ms.clone());
    let mut m = common_json(dev)?;
    println!(
        "CLIP reward {what}: {:?} {}×{} patches of {}, vision width {} × {} layers; {batch} images {image}×{image} → {}×{}, {precision} on {}, median of {iters}:",
        c.vision.act,
        c.image_size / c.patch_size,
        c.image_size / c.patch_size,
        c.patch_size,
        c.vision.hidden,
        c.vision.layers,
        c.image_size,
        c.image_size,
        m["on"].as_str().unwrap_or("")
    );
    println!("  {med:>10.1} ms per batch ({:.2} ms per image, {} images per pass); the prompts' embeddings once: {text_ms:.1} ms", med / batch as f64, r.chunk);
    print_peak(&m);
    if profile && dev == Device::Cpu {
        use crate::backend::cpu::profile as prof;
        prof::reset();
        prof::enable(true);
        let t0 = Instant::now();
        let res = r.score(&x, None);
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        prof::enable(false);
        res?;
        m.insert("profile".into(), print_profile("CLIP reward", &(wall, prof::take()), 1));
    }
    if json {
        for (k, v) in [
            ("what", json!(what)),
            ("precision", json!(precision.name())),
            ("batch", json!(batch)),
            ("image", json!(image)),
            ("ms", json!(med)),
            ("ms_all", json!(ms)),
            ("ms_per_image", json!(med / batch as f64)),
            ("chunk", json!(r.chunk)),
            ("text_ms", json!(text_ms)),
        ] {
            m.insert(k.into(), v);
        }
        println!("{}", Value::Object(m));
    }
    Ok(())
}

/// The U-Net of `cfg` (PyTorch's default init, seed 0) on `device` in `precision`.
fn model_on(cfg: &UNetConfig, device: Device, precision: DType) -> Result<UNetModel> {
    let mut model = UNetModel::new(cfg, Init::Torch(0))?;
    model.to_device(device)?;
    model.to_precision(precision)?;
    Ok(model)
}

/// What `bench sample` and `bench round` share: the model, the batch and its sampling, the
/// device and precision, and the timing.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchRunArgs {
    /// U-Net config JSON file, or a built-in: `mnist`, `mnist-small` or `cifar10`.
    #[arg(long, default_value = "cifar10")]
    pub unet_config: String,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Euler steps of the sampling.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16 (one per run, so that the peak memory is that precision's; `bench
    /// round` trains in mixed precision as `train --precision`).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Start no further timed run after this many seconds (at least one is timed).
    #[arg(long)]
    pub max_seconds: Option<f64>,
}

impl BenchRunArgs {
    /// [`setup`], and the check of `--steps`.
    fn setup(&self) -> Result<(Device, DType)> {
        let r = setup(&self.device, &self.precision, self.batch, self.iters)?;
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        Ok(r)
    }
}

/// `bench sample`: images per second of the policy sampling (`steps` Euler steps of `batch`
/// samples from N(0, I), the samples brought back to the host, as a training round draws them).
pub fn run_sample(a: &BenchRunArgs, json: bool) -> Result<()> {
    let (dev, precision) = a.setup()?;
    let &BenchRunArgs { unet_config: ref cfg, batch, steps, iters, warmup, max_seconds, .. } = a;
    let cfg = crate::nn::config::resolve_config(cfg)?;
    let model = model_on(&cfg, dev, precision)?;
    let solver = OdeSolver::Euler;
    let mut rng = Rng::new(0);
    let mut nfe = 0;
    let ms = time_ms_within(dev, warmup, iters, 1, max_seconds, || {
        let (x, _, st) = sample_model(&model, batch, &solver, steps, &mut rng)?;
        nfe = st.nfe;
        std::hint::black_box(x);
        Ok(())
    })?;
    let med = median(ms.clone());
    let img_s = batch as f64 / (med / 1e3);
    let mut m = common_json(dev)?;
    println!("sampling: U-Net {:?} num_channels {} batch {batch}, {steps} Euler steps ({nfe} evaluations), {precision} on {}, median of {iters}:", cfg.dim, cfg.num_channels, m["on"].as_str().unwrap_or(""));
    println!("  {med:>10.1} ms per batch, {img_s:.1} images/s, {:.2} ms per step ({} timed)", med / steps as f64, ms.len());
    print_peak(&m);
    if json {
        for (k, v) in [
            ("img_s", json!(img_s)),
            ("ms", json!(med)),
            ("ms_all", json!(ms)),
            ("ms_per_step", json!(med / steps as f64)),
            ("batch", json!(batch)),
            ("steps", json!(steps)),
            ("nfe", json!(nfe)),
            ("solver", json!("euler")),
            ("precision", json!(precision.name())),
            ("params", json!(model.params().count())),
        ] {
            m.insert(k.into(), v);
        }
        println!("{}", Value::Object(m));
    }
    Ok(())
}

/// The trainer config of one benchmark round: `batch` samples by `steps` Euler steps, the
/// given coupling, dropout on (as `train`), no EMA, and an epoch long enough that no round
/// refreshes the policy.
pub fn round_config(batch: usize, steps: usize, coupling: &str) -> Result<OrwConfig> {
    let cfg = OrwConfig { batch_size: batch, ode_steps: steps, ode_solver: "euler".into(), coupling: coupling.into(), num_epochs: 1, steps_per_epoch: 1 << 30, ..OrwConfig::default() };
    cfg.validate()?;
    Ok(cfg)
}

/// The reward of the benchmark rounds: the mean pixel value of each sample (cheap, on the host,
/// the same in `scripts/bench_torch_gpu.py`).
pub fn mean_pixel(x: &Tensor) -> Vec<f32> {
    let b = x.shape()[0];
    let per = x.numel() / b.max(1);
    x.data().chunks(per.max(1)).map(|c| (c.iter().map(|&v| v as f64).sum::<f64>() / per as f64) as f32).collect()
}

/// `bench round`: one ORW-CFM-W2 round — `Trainer::train_step` with a fresh batch every step
/// (sampling `batch` by `steps` Euler steps from the policy, the reward, weights, pairing, the
/// weighted FM + W2 loss, backward, clip and Adam) — in ms.
pub fn run_round(a: &BenchRunArgs, coupling: &str, json: bool) -> Result<()> {
    let (dev, precision) = a.setup()?;
    let &BenchRunArgs { unet_config: ref cfg, batch, steps, iters, warmup, max_seconds, .. } = a;
    let ucfg = crate::nn::config::resolve_config(cfg)?;
    let model = UNetModel::new(&ucfg, Init::Torch(0))?;
    let params = model.params().count();
    let tcfg = round_config(batch, steps, coupling)?;
    let mut trainer = Trainer::new(tcfg, model)?;
    trainer.to_device(dev)?;
    trainer.set_precision(precision)?;
    let mut reward = FnReward::new("mean pixel", mean_pixel);
    let mut nfe = 0;
    let ms = time_ms_within(dev, warmup, iters, 1, max_seconds, || {
        let m = trainer.train_step(&mut reward)?;
        nfe = m.nfe;
        Ok(())
    })?;
    let med = median(ms.clone());
    let mut m = common_json(dev)?;
    println!(
        "ORW-CFM-W2 round: U-Net {:?} num_channels {} batch {batch}, sampling by {steps} Euler steps ({nfe} evaluations) + one gradient step ({coupling} coupling), {precision} on {}, median of {iters}:",
        ucfg.dim,
        ucfg.num_channels,
        m["on"].as_str().unwrap_or("")
    );
    println!("  {med:>10.1} ms per round ({} timed)", ms.len());
    print_peak(&m);
    if json {
        for (k, v) in [
            ("round_ms", json!(med)),
            ("ms_all", json!(ms)),
            ("batch", json!(batch)),
            ("steps", json!(steps)),
            ("nfe", json!(nfe)),
            ("coupling", json!(coupling)),
            ("precision", json!(precision.name())),
            ("params", json!(params)),
        ] {
            m.insert(k.into(), v);
        }
        println!("{}", Value::Object(m));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parsing_finds_libraries_and_duplicates() {
        let maps = "\
7f00 r-xp 0 08:01 1 /usr/local/cuda/lib64/libcublas.so.13.0.1
7f01 r--p 0 08:01 1 /usr/local/cuda/lib64/libcublas.so.13.0.1
7f02 r-xp 0 08:01 2 /venv/site-packages/nvidia/cublas/lib/libcublas.so.13
7f03 r-xp 0 08:01 3 /venv/site-packages/nvidia/cublas/lib/libcublasLt.so.13
7f04 r-xp 0 08:01 4 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1
7f05 r-xp 0 08:01 5 /usr/lib/x86_64-linux-gnu/libc.so.6
7f06 rw-p 0 00:00 0 [heap]
7f07 rw-p 0 00:00 0
7f08 r-xp 0 08:01 6 /venv/nvidia/cudnn/lib/libcudnn_ops.so.9
7f09 r-xp 0 08:01 7 /venv/nvidia/cudnn/lib/libcudnn.so.9
";
        let libs = libraries_in_maps(maps);
        assert_eq!(libs.len(), 6, "{libs:?}");
        assert!(!libs.iter().any(|l| l.contains("libc.so")));
        let d = duplicate_libraries(&libs);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].0, "libcublas");
        assert_eq!(d[0].1.len(), 2);
    }

    #[test]
    fn median_and_timing() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let mut n = 0;
        let t = time_ms(Device::Cpu, 2, 3, 4, || {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2 + 3 * 4);
        assert_eq!(t.len(), 3);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        // out of time after the warm-up: one repeat is still timed, and no more
        let mut n = 0;
        let t = time_ms_within(Device::Cpu, 1, 10, 1, Some(0.0), || {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((n, t.len()), (2, 1));
    }

    #[test]
    fn mean_pixel_reward() {
        let x = Tensor::from_vec(vec![1.0, 3.0, -1.0, -3.0, 0.5, 0.5], &[3, 2]);
        assert_eq!(mean_pixel(&x), vec![2.0, -2.0, 0.5]);
    }
}
