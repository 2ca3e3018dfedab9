//! The `orwcfm-fast` subcommands of the engine core: forward, info, convert, bench.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};

use crate::io::safetensors::{self as st, Out};
use crate::nn::{LoadedModel, VelocityField, load_model, save_model};
use crate::tensor::{DType, Device};
// they live with the U-Net config and the utilities; the names stay here for library callers
pub use crate::nn::config::resolve_config;
pub use crate::util::check_writable;
// the benchmarks live in commands::bench; the names stay here for library callers
pub use crate::commands::bench::{UnetTimings, bench_unet};

#[derive(Parser, Debug)]
#[command(name = "orwcfm-fast", version, about = "ORW-CFM-W2 reward fine-tuning of Torch-CFM flow-matching U-Nets, in Rust")]
pub struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the U-Net once on inputs from a safetensors file (x, t, and y for class-conditional models)
    /// and write `v`; inference mode (dropout off). Use it to prove parity on your own checkpoint.
    Forward {
        #[command(flatten)]
        m: ModelArgs,
        /// Inputs: `x` [B,C,H,W] f32, `t` [B] or scalar f32, `y` [B] int64 when class-conditional.
        #[arg(long)]
        input: PathBuf,
        /// Output safetensors file holding `v` [B,C_out,H,W].
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Precision of weights and activations: f32, f16 or bf16 (GEMMs and convolutions
        /// accumulate in f32; GroupNorm statistics and softmax are f32).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Print a model's config (given or inferred), parameter count and shapes per level.
    Info {
        #[command(flatten)]
        m: ModelArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert a PyTorch checkpoint (torch.save zip, e.g. torchcfm's train_cifar10.py output) to safetensors.
    Convert {
        /// The `.pt` checkpoint.
        ckpt: PathBuf,
        /// Output safetensors file (written with `unet_config` metadata).
        out: PathBuf,
        /// Entry to convert: ema_model (default if present), net_model, ...
        #[arg(long)]
        key: Option<String>,
        /// U-Net config for the weights (default: inferred from them).
        #[arg(long)]
        unet_config: Option<PathBuf>,
        /// Element type of the output: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// ORW-CFM-W2 on a 2-D mixture of Gaussians: pre-train a small MLP by CFM, fine-tune it toward a
    /// reward that prefers one mode, report reward and diversity before and after (seconds on a CPU).
    Toy2d(crate::toy2d::Toy2dArgs),
    /// ORW-CFM-W2 fine-tuning toward a reward. With no arguments: the bundled MNIST U-Net toward
    /// even digits (bundled classifier), about 10 minutes on 2 CPU cores.
    Train(crate::commands::train::TrainArgs),
    /// One `train` run per α (and τ): a table and a figure of reward, FD to real images, Vendi
    /// score and class entropy against α (the reward–diversity frontier).
    Sweep(crate::commands::sweep::SweepArgs),
    /// Draw samples of a model by its ODE to a PNG grid and/or safetensors.
    Sample {
        #[command(flatten)]
        s: crate::commands::sample::SamplerArgs,
        /// PNG grid of the samples.
        #[arg(long)]
        grid: Option<PathBuf>,
        /// safetensors file with `x` [N,C,H,W] in [-1,1] (and `y` for class-conditional models).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Reward and diversity of a model's samples (pixel and classifier-feature diversity, class
    /// histogram and entropy, W2 distance to a reference model's samples).
    Eval {
        #[command(flatten)]
        s: crate::commands::sample::SamplerArgs,
        /// classifier, jpeg-compressibility, jpeg-incompressibility, target-image or external.
        #[arg(long, default_value = "classifier")]
        reward: String,
        #[arg(long, value_delimiter = ',', default_value = "0,2,4,6,8")]
        target_classes: Vec<usize>,
        /// A reference model: also report the W2 distance between the two sample sets.
        #[arg(long)]
        reference: Option<String>,
        /// Classifier of the reward and the feature metrics (default: the bundled MNIST digits).
        #[arg(long)]
        classifier: Option<String>,
        /// Real images for the Fréchet distances (a --data spec; default: the bundled held-out
        /// digits for 1×28×28 models; none: off).
        #[arg(long)]
        real_data: Option<String>,
        /// Real images giving those distances' floor (default: the bundled training digits).
        #[arg(long)]
        real_floor_data: Option<String>,
        /// Print a JSON line last.
        #[arg(long)]
        json: bool,
    },
    /// Score a file of samples (x [N,C,H,W] in [-1, 1]) with any reward: classifier, clip, JPEG,
    /// target image or an external program. Check a reward on your own images before a long run.
    Score(crate::commands::score::ScoreArgs),
    /// Train a base U-Net by flow matching on a dataset (torchcfm's recipe: Adam, warm-up, clip, EMA).
    Pretrain(crate::commands::pretrain::PretrainArgs),
    /// Train or evaluate the CNN classifier behind the `classifier` reward.
    Classifier {
        #[command(subcommand)]
        cmd: crate::commands::classifier::ClassifierCmd,
    },
    /// The CPU kernels' instruction-set level (ORWCFM_CPU_ISA=avx2|scalar lowers it), the NVIDIA
    /// libraries this machine can load and its CUDA devices (ORWCFM_CUDA_LIB_DIRS adds library
    /// folders, e.g. a Python environment's site-packages/nvidia).
    Devices {
        /// Print a JSON line last.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

/// Where a model comes from.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Weights: safetensors, or a torchcfm `.pt` checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// U-Net config (UNetModelWrapper keyword arguments as JSON). Default: the file's
    /// `unet_config` metadata, else inferred from the weights.
    #[arg(long)]
    pub unet_config: Option<PathBuf>,
    /// Entry of a `.pt` checkpoint to use (e.g. ema_model, net_model). Default: ema_model, else the only state_dict.
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Median milliseconds of a U-Net forward (inference) and forward+backward (mean-square loss).
    Unet {
        /// U-Net config JSON file, or a built-in: `mnist` (torchcfm's MNIST example) or `cifar10`.
        #[arg(long)]
        unet_config: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Precision of weights and activations: f32, f16 or bf16 (GEMMs and convolutions
        /// accumulate in f32; GroupNorm statistics and softmax are f32).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Timed iterations (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Untimed warm-up iterations.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Print a JSON line last: {"forward_ms": .., "forward_backward_ms": .., "peak_memory_mb": .., "libraries": [..], ..}.
        #[arg(long)]
        json: bool,
        /// After the timed runs, run `--iters` more of each pass with the CPU profiler on and
        /// print where the time went per op class and op (ms per iteration, calls, page faults;
        /// CPU only). With --json the table is in the JSON too.
        #[arg(long)]
        profile: bool,
    },
    /// Sampling throughput: images per second of `--batch` samples by `--steps` Euler steps
    /// from a U-Net (the policy sampling of a training round, `orw::sample_model`).
    Sample {
        #[command(flatten)]
        run: crate::commands::bench::BenchRunArgs,
        /// Print a JSON line last: {"img_s": .., "ms": .., "peak_memory_mb": .., "libraries": [..], ..}.
        #[arg(long)]
        json: bool,
    },
    /// One ORW-CFM-W2 round in ms, through the trainer `train` runs: sample `--batch` by
    /// `--steps` Euler steps from the policy, reward (the mean pixel), weights, pairing, the
    /// weighted FM + W2 loss, backward, clipping and Adam.
    Round {
        #[command(flatten)]
        run: crate::commands::bench::BenchRunArgs,
        /// Coupling of noise and samples: independent, or exact-ot (the trainer's default;
        /// solved on the host).
        #[arg(long, default_value = "independent")]
        coupling: String,
        /// Print a JSON line last: {"round_ms": .., "peak_memory_mb": .., "libraries": [..], ..}.
        #[arg(long)]
        json: bool,
    },
    /// The CLIP reward's cost: median ms to score `--batch` images of `--image` pixels
    /// (processor + image tower + similarities), as in a training round.
    Clip {
        /// A Hugging Face CLIP folder; default: random weights of `--arch`.
        #[arg(long)]
        clip_model: Option<String>,
        /// vit-b-32, vit-b-16, vit-l-14 or vit-l-14-336 (random weights) when no folder is given.
        #[arg(long, default_value = "vit-b-32")]
        arch: String,
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Side of the square input images (CIFAR-10: 32).
        #[arg(long, default_value_t = 32)]
        image: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, f16 or bf16: the towers' matrix products (autocast-style).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Images per pass through the image tower (default: the reward's; 0: the whole batch).
        #[arg(long)]
        chunk: Option<usize>,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Print a JSON line last: {"ms": .., "ms_per_image": .., "peak_memory_mb": .., ..}.
        #[arg(long)]
        json: bool,
        /// After the timed runs, one more under the CPU profiler: time per op class and op.
        #[arg(long)]
        profile: bool,
    },
    /// Each fused kernel's time at the U-Net's shapes, with its GB/s or TFLOP/s next to the
    /// copy bandwidth and GEMM rate measured in the same run.
    Kernels(crate::commands::bench_kernels::KernelArgs),
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    crate::backend::cpu::tune_allocator();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| anyhow!("cannot start {n} threads: {e}"))?;
    }
    match cli.cmd {
        Cmd::Forward { m, input, out, device, precision } => cmd_forward(&m, &input, &out, &device, &precision),
        Cmd::Info { m, json } => cmd_info(&m, json),
        Cmd::Convert { ckpt, out, key, unet_config, dtype } => cmd_convert(&ckpt, &out, key.as_deref(), unet_config.as_deref(), &dtype),
        Cmd::Toy2d(a) => crate::toy2d::run_cli(&a),
        Cmd::Devices { json } => cmd_devices(json),
        Cmd::Train(a) => crate::commands::train::run(&a),
        Cmd::Sweep(a) => crate::commands::sweep::run(&a),
        Cmd::Sample { s, grid, out } => crate::commands::sample::run_sample(&s, grid.as_ref(), out.as_ref()),
        Cmd::Eval { s, reward, target_classes, reference, classifier, real_data, real_floor_data, json } => {
            let metrics = crate::commands::sample::EvalMetrics { classifier, real_data, real_floor_data };
            crate::commands::sample::run_eval(&s, &reward, &target_classes, reference.as_ref(), &metrics, json)
        }
        Cmd::Score(a) => crate::commands::score::run(&a),
        Cmd::Pretrain(a) => crate::commands::pretrain::run(&a),
        Cmd::Classifier { cmd } => crate::commands::classifier::run(&cmd),
        Cmd::Bench { what } => match what {
            BenchCmd::Unet { unet_config, batch, device, precision, iters, warmup, json, profile } => crate::commands::bench::run_unet(&unet_config, batch, &device, &precision, iters, warmup, json, profile),
            BenchCmd::Sample { run, json } => crate::commands::bench::run_sample(&run, json),
            BenchCmd::Round { run, coupling, json } => crate::commands::bench::run_round(&run, &coupling, json),
            BenchCmd::Kernels(a) => crate::commands::bench_kernels::run(&a),
            BenchCmd::Clip { clip_model, arch, batch, image, device, precision, chunk, iters, warmup, json, profile } => {
                crate::commands::bench::run_clip(clip_model.as_deref(), &arch, batch, image, &device, &precision, chunk, iters, warmup, json, profile)
            }
        },
    }
}

fn load(m: &ModelArgs) -> Result<LoadedModel> {
    let lm = load_model(&m.model, m.unet_config.as_deref(), m.key.as_deref())?;
    for w in &lm.warnings {
        eprintln!("warning: {w}");
    }
    Ok(lm)
}

fn cmd_forward(m: &ModelArgs, input: &Path, out: &Path, device: &str, precision: &str) -> Result<()> {
    let dev = Device::parse(device)?;
    let precision = DType::parse_precision(precision)?;
    dev.ensure_available()?;
    check_writable(out)?;
    let inp = st::load(input).with_context(|| "reading the forward inputs".to_string())?;
    let x = inp.get("x").ok_or_else(|| anyhow!("{} has no tensor 'x' (found: {})", input.display(), inp.names().join(", ")))?.clone();
    if x.shape().first() == Some(&0) {
        bail!("'x' in {} has shape {:?}: the batch is empty (B = 0); give at least one input", input.display(), x.shape());
    }
    let t = match inp.get("t") {
        Some(t) => t.clone(),
        None => bail!("{} has no tensor 't' (found: {})", input.display(), inp.names().join(", ")),
    };
    let y: Option<Vec<usize>> = match inp.get_int("y") {
        Some((_, v)) => Some(v.iter().map(|&l| usize::try_from(l).map_err(|_| anyhow!("label {l} in 'y' is negative"))).collect::<Result<_>>()?),
        None if inp.get("y").is_some() => bail!("'y' in {} must be an integer tensor (int64), not float", input.display()),
        None => None,
    };
    let mut lm = load(m)?;
    lm.model.to_device(dev)?;
    lm.model.to_precision(precision)?;
    let v = lm.model.predict(&t, &x, y.as_deref()).context("forward")?.to_device(Device::Cpu)?;
    st::save(out, &[("v".to_string(), Out::F(&v))], DType::F32, &HashMap::new())?;
    eprintln!("wrote v {:?} to {}", v.shape(), out.display());
    Ok(())
}

fn cmd_info(ma: &ModelArgs, json: bool) -> Result<()> {
    let lm = load(ma)?;
    let m = &lm.model;
    let c = m.config();
    if json {
        let blocks: Vec<serde_json::Value> =
            m.blocks().iter().map(|b| serde_json::json!({"name": b.name, "kind": b.kind, "channels": b.channels, "ds": b.ds, "resolution": c.image_size() / b.ds, "params": b.params})).collect();
        let v = serde_json::json!({
            "config": c.to_json(), "config_source": lm.config_source.to_string(), "warnings": lm.warnings,
            "checkpoint_key": lm.checkpoint_key, "dtypes": lm.dtypes,
            "num_params": m.params().count(), "num_tensors": m.params().len(), "blocks": blocks,
        });
        println!("{v}");
        return Ok(());
    }
    println!("model: {}", ma.model.display());
    if let Some(k) = &lm.checkpoint_key {
        println!("checkpoint entry: {k}");
    }
    println!("stored dtypes: {}", lm.dtypes.join(", "));
    println!("config ({}):", lm.config_source);
    if let serde_json::Value::Object(o) = c.to_json() {
        for (k, v) in o {
            println!("  {k:<24} {v}");
        }
    }
    println!("channel_mult (resolved): {:?}", c.channel_mult_resolved()?);
    println!("attention at downsample factors: {:?}", c.attention_ds()?);
    println!("parameters: {} in {} tensors", m.params().count(), m.params().len());
    println!("{:<18} {:<16} {:>8} {:>10} {:>12}", "block", "kind", "channels", "resolution", "params");
    for b in m.blocks() {
        let r = c.image_size() / b.ds;
        println!("{:<18} {:<16} {:>8} {:>10} {:>12}", b.name, b.kind, b.channels, format!("{r}x{r}"), b.params);
    }
    Ok(())
}

fn cmd_convert(ckpt: &Path, out: &Path, key: Option<&str>, cfg: Option<&Path>, dtype: &str) -> Result<()> {
    let dtype = DType::parse(dtype)?;
    check_writable(out)?;
    let lm = load(&ModelArgs { model: ckpt.to_path_buf(), unet_config: cfg.map(Path::to_path_buf), key: key.map(str::to_string) })?;
    save_model(&lm.model, out, dtype)?;
    eprintln!("converted {}{} ({} parameters, config {}) to {}", ckpt.display(), lm.checkpoint_key.map(|k| format!(" [{k}]")).unwrap_or_default(), lm.model.params().count(), lm.config_source, out.display());
    Ok(())
}

fn cmd_devices(json: bool) -> Result<()> {
    use crate::backend::cuda;
    let cpu = crate::commands::bench::cpu_isa_json();
    println!("cpu: {}", crate::commands::bench::cpu_isa_line());
    let libs = cuda::libraries();
    for p in cuda::preload_lib_dirs() {
        println!("loaded {}", p.display());
    }
    println!("libraries: driver {}, cublas {}, cudnn {}, nvrtc {}", libs.driver, libs.cublas, libs.cudnn, libs.nvrtc);
    let mut devs = Vec::new();
    if libs.driver {
        match cuda::probe(0) {
            Ok(d) => {
                for i in 0..d.device_count {
                    let d = cuda::probe(i)?;
                    println!("cuda:{i}: {} (sm_{}{}), {:.1} GiB", d.name, d.compute_capability.0, d.compute_capability.1, d.total_mem_bytes as f64 / (1u64 << 30) as f64);
                    // opening it compiles (or loads from the cache) the kernels and makes the handles
                    let opened = match cuda::gpu(i) {
                        Ok(g) => {
                            let conv = cuda::conv::method(&g);
                            println!("  ready: kernels for {} ({}), convolutions by {conv}, TF32 {}", g.arch, if g.kernels_cached { "from the cache" } else { "compiled now" }, if g.tf32 { "allowed" } else { "off" });
                            serde_json::json!({"ok": true, "arch": g.arch, "kernels_cached": g.kernels_cached, "conv": conv, "tf32": g.tf32})
                        }
                        Err(e) => {
                            println!("  cannot be used: {e:#}");
                            serde_json::json!({"ok": false, "error": format!("{e:#}")})
                        }
                    };
                    devs.push(serde_json::json!({"index": i, "name": d.name, "sm": format!("{}{}", d.compute_capability.0, d.compute_capability.1), "total_mem_bytes": d.total_mem_bytes, "open": opened}));
                }
            }
            Err(e) => println!("no CUDA device: {e:#}"),
        }
    } else {
        println!("no NVIDIA driver library: no CUDA device");
    }
    // the files really bound, now that the devices were opened (two copies of one library: a warning)
    let bound = crate::commands::bench::libraries_report();
    for l in &bound {
        println!("bound {l}");
    }
    if json {
        println!("{}", serde_json::json!({"cpu": cpu, "driver": libs.driver, "cublas": libs.cublas, "cudnn": libs.cudnn, "nvrtc": libs.nvrtc, "devices": devs, "libraries": bound}));
    }
    Ok(())
}
