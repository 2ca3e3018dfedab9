//! `orwcfm-fast bench kernels`: each fused node, timed through its public op at the U-Net's
//! shapes, next to the two ceilings measured in the same run on the same device:
//!
//! * **copy bandwidth**: a device-to-device copy of a large buffer (`--copy-mb`; the driver's
//!   copy on a GPU, a multi-threaded `memcpy` on the CPU), bytes read + bytes written over time;
//! * **GEMM rate**: `Tensor::matmul` of two random `n × n` matrices (`--gemm-n`), `2n³` FLOP,
//!   in f32 and in each half dtype asked for (whatever path the backend takes for that dtype —
//!   cuBLAS' half GEMMs when it has them; a dtype it cannot multiply is reported as an error).
//!
//! Then, for each dtype of `--dtypes`, at the shapes of `--unet-config` (default torchcfm's
//! CIFAR-10 U-Net) and `--batch` (default 128): GroupNorm+SiLU forward and backward at the
//! largest activation and at the attention level, flash attention forward and backward in both
//! channel orders, the ORW loss with its gradient, the Euler and RK4 step combinations; once,
//! the flat-arena Adam + clip + EMA step over the model's parameter count; and the casts of that
//! arena to and from each half dtype. Each has a model of the fewest bytes it must move (every
//! input read once, every output written once: the formulas are beside each entry below) and,
//! for attention, of its FLOP; its **ceiling** is the roofline time `max(bytes / copy
//! bandwidth, FLOP / GEMM rate of its dtype)`, and `fraction_of_ceiling` is that time over the
//! measured one (1 = at the roofline).
//!
//! Timing: a warm-up, then `--repeats` times (synchronise, `--iters` calls, synchronise); the
//! median per call. Inputs are random (never zeros). Small operands (the loss and the ODE
//! combinations at CIFAR-10 batch 128, 1.5 MB) fit in an H200's 60 MB L2, so their GB/s can
//! exceed the copy bandwidth; they are launch-bound anyway.

use anyhow::{Result, anyhow, bail};
use rayon::prelude::*;
use serde_json::{Value, json};

use super::bench::{common_json, median, time_ms};
use crate::autograd::fused::{Act, Attention, GroupNormAct, OrwLossOp, ode_combine_tensors};
use crate::backend::{AdamStep, ArenaStep, QkvOrder, UnaryOp};
use crate::nn::{Init, UNetConfig, UNetModel};
use crate::rng::philox::Philox;
use crate::tensor::{DType, Device, Tensor};

/// `bench kernels` arguments.
#[derive(clap::Args, Debug)]
pub struct KernelArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The U-Net whose shapes are used: a config JSON file or mnist, mnist-small, cifar10.
    #[arg(long, default_value = "cifar10")]
    pub unet_config: String,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Dtypes of the fused ops' operands (f32, bf16, f16), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<String>,
    /// MiB of the copied buffer (default: 1024 on a GPU, 256 on the CPU).
    #[arg(long)]
    pub copy_mb: Option<usize>,
    /// Size n of the n × n GEMMs (default: 8192 on a GPU, 1024 on the CPU).
    #[arg(long)]
    pub gemm_n: Option<usize>,
    /// Timed repeats (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Calls per timed repeat (default: 20 on a GPU, 1 on the CPU).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Untimed warm-up calls.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Only the entries whose names start with one of these (e.g. `copy,gemm,adam`).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print one JSON object last.
    #[arg(long)]
    pub json: bool,
}

/// One measured entry.
struct Entry {
    name: String,
    dtype: DType,
    shape: String,
    /// the fewest bytes the op must move (model)
    bytes: f64,
    /// FLOP (0: none counted, a memory-bound op)
    flop: f64,
    ms: Vec<f64>,
}

/// The two ceilings measured in this run.
struct Ceilings {
    copy_gb_s: Option<f64>,
    gemm_tflop_s: Vec<(DType, f64)>,
}

impl Ceilings {
    /// The GEMM rate for operands of `dt` (its own, else f32's).
    fn gemm(&self, dt: DType) -> Option<f64> {
        self.gemm_tflop_s.iter().find(|(d, _)| *d == dt).or_else(|| self.gemm_tflop_s.iter().find(|(d, _)| *d == DType::F32)).map(|p| p.1)
    }
}

impl Entry {
    fn json(&self, c: &Ceilings) -> Value {
        let ms = median(self.ms.clone());
        let s = ms / 1e3;
        let t_mem = c.copy_gb_s.map(|bw| self.bytes / (bw * 1e9));
        let t_cmp = if self.flop > 0.0 { c.gemm(self.dtype).map(|r| self.flop / (r * 1e12)) } else { None };
        let (bound, t_min) = match (t_mem, t_cmp) {
            (Some(m), Some(f)) if f > m => ("compute", Some(f)),
            (Some(m), _) => ("memory", Some(m)),
            (None, Some(f)) => ("compute", Some(f)),
            (None, None) => ("unknown", None),
        };
        let mut o = json!({
            "name": self.name, "dtype": self.dtype.name(), "shape": self.shape, "ms": ms, "ms_all": self.ms,
            "bytes": self.bytes, "gb_s": self.bytes / s / 1e9, "bound": bound,
            "ceiling": if bound == "compute" { format!("gemm_{}", self.dtype.name()) } else { "copy".to_string() },
            "fraction_of_ceiling": t_min.map(|t| t / s),
        });
        if self.flop > 0.0 {
            o["flop"] = json!(self.flop);
            o["tflop_s"] = json!(self.flop / s / 1e12);
        }
        o
    }
}

/// The shapes of `cfg`'s U-Net: the largest activation `[C, H, W]`, the attention level's
/// `(channels, resolution, heads)` (if it has attention), the image and the parameter count.
struct UnetShapes {
    top: [usize; 3],
    attn: Option<(usize, usize, usize)>,
    image: [usize; 3],
    params: usize,
}

fn unet_shapes(cfg: &UNetConfig) -> Result<UnetShapes> {
    let mult = cfg.channel_mult_resolved()?;
    let res = cfg.image_size();
    let top = [cfg.num_channels, res, res];
    let attn = match cfg.attention_ds()?.into_iter().find(|&ds| ds.is_power_of_two() && ds.trailing_zeros() as usize <= mult.len().saturating_sub(1)) {
        Some(ds) => {
            let level = ds.trailing_zeros() as usize;
            let ch = (cfg.num_channels as f64 * mult[level]) as usize;
            Some((ch, res / ds, cfg.heads_for(ch, false)?))
        }
        None => None,
    };
    let params = UNetModel::new(cfg, Init::Zeros)?.params().count();
    Ok(UnetShapes { top, attn, image: cfg.dim, params })
}

fn rand(shape: &[usize], dev: Device, dt: DType, noise: &mut Philox) -> Result<Tensor> {
    Tensor::philox_normal(shape, dev, DType::F32, noise)?.to_dtype(dt)
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), median of `repeats`.
fn copy_bandwidth(dev: Device, mb: usize, warmup: usize, repeats: usize, iters: usize) -> Result<(f64, Vec<f64>)> {
    let n = (mb << 20) / 4;
    if n == 0 {
        bail!("--copy-mb must be at least 1");
    }
    // random contents (a cheap hash of the index): never time on zeros
    let host: Vec<f32> = (0..n as u64).into_par_iter().map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32) * 1e-7 - 0.8).collect();
    let ms = match dev {
        Device::Cpu => {
            let mut dst = vec![0.0f32; n];
            time_ms(dev, warmup, repeats, iters, || {
                dst.par_chunks_mut(1 << 16).zip(host.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
                std::hint::black_box(&dst);
                Ok(())
            })?
        }
        Device::Cuda(i) => {
            let g = crate::backend::cuda::gpu(i)?;
            let src = g.upload(&host)?;
            drop(host);
            time_ms(dev, warmup, repeats, iters, || {
                std::hint::black_box(g.duplicate(&src)?);
                Ok(())
            })?
        }
    };
    let bytes = 2.0 * (n * 4) as f64;
    let med = median(ms.clone());
    Ok((bytes / (med / 1e3) / 1e9, ms))
}

/// `n × n × n` GEMM rate in TFLOP/s for operands of `dt`.
fn gemm_rate(dev: Device, n: usize, dt: DType, warmup: usize, repeats: usize, iters: usize, noise: &mut Philox) -> Result<(f64, Vec<f64>)> {
    let a = rand(&[n, n], dev, dt, noise)?;
    let b = rand(&[n, n], dev, dt, noise)?;
    let ms = time_ms(dev, warmup, repeats, iters, || {
        std::hint::black_box(a.matmul(&b)?);
        Ok(())
    })?;
    let flop = 2.0 * (n as f64).powi(3);
    Ok((flop / (median(ms.clone()) / 1e3) / 1e12, ms))
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

/// `bench kernels`.
pub fn run(a: &KernelArgs) -> Result<()> {
    let dev = Device::parse(&a.device)?;
    dev.ensure_available()?;
    if a.batch == 0 || a.repeats == 0 || a.iters == Some(0) {
        bail!("--batch, --repeats and --iters must be at least 1");
    }
    let dtypes: Vec<DType> = a.dtypes.iter().map(|d| DType::parse_precision(d)).collect::<Result<_>>()?;
    let gpu = dev.is_cuda();
    let iters = a.iters.unwrap_or(if gpu { 20 } else { 1 });
    let (warmup, repeats) = (a.warmup, a.repeats);
    let copy_mb = a.copy_mb.unwrap_or(if gpu { 1024 } else { 256 });
    let gemm_n = a.gemm_n.unwrap_or(if gpu { 8192 } else { 1024 });
    let want = |name: &str| a.only.is_empty() || a.only.iter().any(|p| name.starts_with(p.as_str()));
    let cfg = crate::nn::config::resolve_config(&a.unet_config)?;
    let us = unet_shapes(&cfg)?;
    let b = a.batch;
    let mut noise = Philox::new(7);
    let mut errors: Vec<Value> = Vec::new();

    // the ceilings
    let mut ceil = Ceilings { copy_gb_s: None, gemm_tflop_s: Vec::new() };
    let mut copy_ms = Vec::new();
    if want("copy") {
        match copy_bandwidth(dev, copy_mb, warmup, repeats, iters) {
            Ok((bw, ms)) => {
                ceil.copy_gb_s = Some(bw);
                copy_ms = ms;
            }
            Err(e) => errors.push(json!({"name": "copy", "error": format!("{e:#}")})),
        }
    }
    let mut gemm_ms = serde_json::Map::new();
    if want("gemm") {
        let mut gd = vec![DType::F32];
        gd.extend(dtypes.iter().copied().filter(|&d| d != DType::F32));
        for dt in gd {
            match gemm_rate(dev, gemm_n, dt, warmup, repeats, iters.min(5), &mut noise) {
                Ok((r, ms)) => {
                    ceil.gemm_tflop_s.push((dt, r));
                    gemm_ms.insert(dt.name().into(), json!(ms));
                }
                Err(e) => errors.push(json!({"name": format!("gemm_{}", dt.name()), "error": format!("{e:#}")})),
            }
        }
    }

    // the fused nodes, each through its public op
    let mut entries: Vec<Entry> = Vec::new();
    let mut measure = |name: String, dt: DType, shape: String, bytes: f64, flop: f64, f: &mut dyn FnMut() -> Result<()>| {
        if !want(&name) {
            return;
        }
        match time_ms(dev, warmup, repeats, iters, f) {
            Ok(ms) => entries.push(Entry { name, dtype: dt, shape, bytes, flop, ms }),
            Err(e) => errors.push(json!({"name": name, "dtype": dt.name(), "error": format!("{e:#}")})),
        }
    };
    let try_measure = |r: Result<()>, name: &str, dt: DType, errors: &mut Vec<Value>| {
        if let Err(e) = r {
            errors.push(json!({"name": name, "dtype": dt.name(), "error": format!("{e:#}")}));
        }
    };
    let mut errs2: Vec<Value> = Vec::new();
    for &dt in &dtypes {
        let sz = dt.size() as f64;
        // GroupNorm + SiLU at the largest activation and at the attention level
        let mut gn_shapes = vec![[b, us.top[0], us.top[1], us.top[2]]];
        if let Some((c, r, _)) = us.attn
            && [b, c, r, r] != gn_shapes[0]
        {
            gn_shapes.push([b, c, r, r]);
        }
        for sh in gn_shapes {
            let r = (|| -> Result<()> {
                let x = rand(&sh, dev, dt, &mut noise)?;
                let gamma = rand(&[sh[1]], dev, dt, &mut noise)?;
                let beta = rand(&[sh[1]], dev, dt, &mut noise)?;
                let op = GroupNormAct { groups: 32.min(sh[1]), eps: 1e-5, act: Act::Silu };
                let n: f64 = sh.iter().product::<usize>() as f64;
                let need = [true; 3];
                // forward: read x, write y (the statistics are N·groups values: not counted)
                measure("group_norm_act_fwd".to_string(), dt, shape_str(&sh), 2.0 * n * sz, 0.0, &mut || {
                    std::hint::black_box(Tensor::apply_custom(&op, &[&x, &gamma, &beta], &need)?);
                    Ok(())
                });
                let fwd = Tensor::apply_custom(&op, &[&x, &gamma, &beta], &need)?;
                let dy = rand(&sh, dev, dt, &mut noise)?;
                let xs = [x.clone(), gamma.clone(), beta.clone()];
                // backward: read x and dy, write dx (dgamma, dbeta: C values each)
                measure("group_norm_act_bwd".to_string(), dt, shape_str(&sh), 3.0 * n * sz, 0.0, &mut || {
                    std::hint::black_box(Tensor::custom_backward(&op, &xs, &fwd.saved, &dy, &need)?);
                    Ok(())
                });
                Ok(())
            })();
            try_measure(r, "group_norm_act", dt, &mut errs2);
        }
        // flash attention at the attention level, both channel orders
        if let Some((c, r, heads)) = us.attn {
            let t = r * r;
            for (order, oname) in [(QkvOrder::Legacy, "legacy"), (QkvOrder::New, "new")] {
                let res = (|| -> Result<()> {
                    let sh = [b, 3 * c, t];
                    let qkv = rand(&sh, dev, dt, &mut noise)?;
                    let op = Attention { heads, order };
                    let bct = (b * c * t) as f64;
                    let tt = t as f64;
                    // forward: S = QKᵀ and O = PV, 2·T²·ch each per (sample, head): 4·B·C·T²;
                    // read qkv, write out (the log-sum-exp, B·heads·T values: not counted)
                    measure(format!("flash_attention_fwd_{oname}"), dt, shape_str(&sh), 4.0 * bct * sz, 4.0 * bct * tt, &mut || {
                        std::hint::black_box(Tensor::apply_custom(&op, &[&qkv], &[true])?);
                        Ok(())
                    });
                    let fwd = Tensor::apply_custom(&op, &[&qkv], &[true])?;
                    let dout = rand(&[b, c, t], dev, dt, &mut noise)?;
                    let xs = [qkv.clone()];
                    // backward: dV = PᵀdO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q: 8·B·C·T² (a
                    // recomputation of S, +2·B·C·T², is the kernel's choice and not counted);
                    // read qkv and dout, write dqkv
                    measure(format!("flash_attention_bwd_{oname}"), dt, shape_str(&sh), 7.0 * bct * sz, 8.0 * bct * tt, &mut || {
                        std::hint::black_box(Tensor::custom_backward(&op, &xs, &fwd.saved, &dout, &[true])?);
                        Ok(())
                    });
                    Ok(())
                })();
                try_measure(res, "flash_attention", dt, &mut errs2);
            }
        }
        // the ORW loss with dL/dv in the same pass, at the image shape
        let img = [b, us.image[0], us.image[1], us.image[2]];
        let n_img: f64 = img.iter().product::<usize>() as f64;
        let res = (|| -> Result<()> {
            let v = rand(&img, dev, dt, &mut noise)?;
            let u = rand(&img, dev, dt, &mut noise)?;
            let vref = rand(&img, dev, dt, &mut noise)?;
            let w = Tensor::philox_uniform(&[b], dev, DType::F32, &mut noise)?.to_dtype(dt)?;
            let op = OrwLossOp { alpha: 1.0 };
            let need = [true, false, false, false];
            // read v, u, v_ref; write dL/dv (the weights and the 3 terms: not counted)
            measure("orw_loss_fwd_bwd".into(), dt, shape_str(&img), 4.0 * n_img * sz, 0.0, &mut || {
                std::hint::black_box(Tensor::apply_custom(&op, &[&v, &u, &w, &vref], &need)?);
                Ok(())
            });
            // x + c·k (Euler): read 2, write 1; x + Σ c_i k_i (RK4): read 5, write 1
            let x = rand(&img, dev, dt, &mut noise)?;
            let ks: Vec<Tensor> = (0..4).map(|_| rand(&img, dev, dt, &mut noise)).collect::<Result<_>>()?;
            measure("ode_combine_euler".into(), dt, shape_str(&img), 3.0 * n_img * sz, 0.0, &mut || {
                std::hint::black_box(ode_combine_tensors(&x, &[(0.01, &ks[0])])?);
                Ok(())
            });
            let c = [1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0];
            measure("ode_combine_rk4".into(), dt, shape_str(&img), 6.0 * n_img * sz, 0.0, &mut || {
                std::hint::black_box(ode_combine_tensors(&x, &[(c[0], &ks[0]), (c[1], &ks[1]), (c[2], &ks[2]), (c[3], &ks[3])])?);
                Ok(())
            });
            Ok(())
        })();
        try_measure(res, "orw_loss/ode_combine", dt, &mut errs2);
        // casts of the parameter arena (the mixed-precision work copy, every step)
        if dt != DType::F32 {
            let n = us.params;
            let res = (|| -> Result<()> {
                let p32 = rand(&[n], dev, DType::F32, &mut noise)?;
                let ph = p32.to_dtype(dt)?;
                // read f32, write the half dtype; and back
                measure(format!("cast_f32_to_{}", dt.name()), dt, shape_str(&[n]), (4.0 + sz) * n as f64, 0.0, &mut || {
                    std::hint::black_box(p32.to_dtype(dt)?);
                    Ok(())
                });
                measure(format!("cast_{}_to_f32", dt.name()), dt, shape_str(&[n]), (4.0 + sz) * n as f64, 0.0, &mut || {
                    std::hint::black_box(ph.to_dtype(DType::F32)?);
                    Ok(())
                });
                Ok(())
            })();
            try_measure(res, "cast", dt, &mut errs2);
        }
    }
    // Adam + clip + EMA over one flat f32 arena of the model's parameter count: read p, g, m,
    // v, ema; write p, m, v, ema: 36 bytes per parameter
    if want("adam_arena") {
        let n = us.params;
        let res = (|| -> Result<()> {
            let mut p = rand(&[n], dev, DType::F32, &mut noise)?;
            let g = rand(&[n], dev, DType::F32, &mut noise)?.mul_scalar(1e-2)?;
            let mut m = rand(&[n], dev, DType::F32, &mut noise)?.mul_scalar(1e-3)?;
            let mut v = rand(&[n], dev, DType::F32, &mut noise)?.unary(UnaryOp::Square, 0.0)?.mul_scalar(1e-6)?;
            let mut ema = rand(&[n], dev, DType::F32, &mut noise)?;
            let h = ArenaStep { adam: AdamStep { step_size: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, bc2_sqrt: 0.03, weight_decay: 0.0 }, grad_scale: 0.5, ema_decay: 0.9999 };
            measure("adam_arena".into(), DType::F32, shape_str(&[n]), 36.0 * n as f64, 0.0, &mut || p.adam_arena_in_place(&g, &mut m, &mut v, Some(&mut ema), &h));
            Ok(())
        })();
        try_measure(res, "adam_arena", DType::F32, &mut errs2);
    }
    errors.extend(errs2);

    // the report
    let mut m = common_json(dev)?;
    let on = m["on"].as_str().unwrap_or("").to_string();
    println!("kernels on {on}; shapes of U-Net {:?} num_channels {} at batch {b} ({} parameters); median of {repeats} × {iters} calls", cfg.dim, cfg.num_channels, us.params);
    match ceil.copy_gb_s {
        Some(bw) => println!("  copy bandwidth     {bw:>9.1} GB/s ({copy_mb} MiB buffer, read + write)"),
        None => println!("  copy bandwidth     not measured"),
    }
    for (d, r) in &ceil.gemm_tflop_s {
        println!("  GEMM {:<5}         {r:>9.2} TFLOP/s ({gemm_n}³)", d.name());
    }
    println!("{:<28} {:<5} {:<18} {:>10} {:>9} {:>9} {:>8} {:>9}", "kernel", "dtype", "shape", "ms", "GB/s", "TFLOP/s", "bound", "fraction");
    let rows: Vec<Value> = entries.iter().map(|e| e.json(&ceil)).collect();
    for r in &rows {
        let f = |k: &str| r[k].as_f64().map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:<5} {:<18} {:>10} {:>9} {:>9} {:>8} {:>9}",
            r["name"].as_str().unwrap_or(""),
            r["dtype"].as_str().unwrap_or(""),
            r["shape"].as_str().unwrap_or(""),
            f("ms"),
            r["gb_s"].as_f64().map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
            r["tflop_s"].as_f64().map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
            r["bound"].as_str().unwrap_or(""),
            r["fraction_of_ceiling"].as_f64().map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_else(|| "-".into()),
        );
    }
    for e in &errors {
        eprintln!("warning: {} ({}) failed: {}", e["name"].as_str().unwrap_or(""), e["dtype"].as_str().unwrap_or("-"), e["error"].as_str().unwrap_or(""));
    }
    if a.json {
        let gemm: serde_json::Map<String, Value> = ceil.gemm_tflop_s.iter().map(|(d, r)| (d.name().to_string(), json!(r))).collect();
        for (k, v) in [
            ("copy_gb_s", json!(ceil.copy_gb_s)),
            ("copy_bytes", json!(2 * ((copy_mb << 20) / 4) * 4)),
            ("copy_ms_all", json!(copy_ms)),
            ("gemm_tflop_s", Value::Object(gemm)),
            ("gemm_n", json!(gemm_n)),
            ("gemm_ms_all", Value::Object(gemm_ms)),
            ("kernels", json!(rows)),
            ("errors", json!(errors)),
            ("unet_config", cfg.to_json()),
            ("batch", json!(b)),
            ("params", json!(us.params)),
            ("repeats", json!(repeats)),
            ("iters", json!(iters)),
            ("warmup", json!(warmup)),
        ] {
            m.insert(k.into(), v);
        }
        println!("{}", Value::Object(m));
    }
    if entries.is_empty() && ceil.copy_gb_s.is_none() && ceil.gemm_tflop_s.is_empty() {
        return Err(anyhow!("nothing was measured (--only {:?} matched nothing, or every entry failed)", a.only));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cifar_shapes() {
        let s = unet_shapes(&UNetConfig::cifar10()).unwrap();
        assert_eq!(s.top, [128, 32, 32]);
        // attention at 16×16 with 256 channels in 4 heads of 64
        assert_eq!(s.attn, Some((256, 16, 4)));
        assert_eq!(s.image, [3, 32, 32]);
        // torchcfm's CIFAR-10 U-Net: 35.7 M parameters
        assert!((35_700_000..35_800_000).contains(&s.params), "{}", s.params);
    }

    #[test]
    fn roofline_fraction() {
        let c = Ceilings { copy_gb_s: Some(100.0), gemm_tflop_s: vec![(DType::F32, 1.0)] };
        // 1 GB at 100 GB/s: 10 ms at the roofline; measured 20 ms: half
        let e = Entry { name: "x".into(), dtype: DType::F32, shape: String::new(), bytes: 1e9, flop: 0.0, ms: vec![20.0] };
        let j = e.json(&c);
        assert_eq!(j["bound"], "memory");
        assert!((j["fraction_of_ceiling"].as_f64().unwrap() - 0.5).abs() < 1e-12);
        assert!((j["gb_s"].as_f64().unwrap() - 50.0).abs() < 1e-9);
        // 1e11 FLOP at 1 TFLOP/s: 100 ms, more than the 10 ms of bytes: compute-bound
        let e = Entry { flop: 1e11, ms: vec![200.0], ..e };
        let j = e.json(&c);
        assert_eq!(j["bound"], "compute");
        assert!((j["fraction_of_ceiling"].as_f64().unwrap() - 0.5).abs() < 1e-12);
        assert!((j["tflop_s"].as_f64().unwrap() - 0.5).abs() < 1e-12);
        // a bf16 op without a bf16 GEMM rate falls back to f32's
        assert_eq!(c.gemm(DType::BF16), Some(1.0));
    }
}
