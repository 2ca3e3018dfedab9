//! Every op of the engine on the GPU against its CPU twin on fresh random inputs (sizes that are
//! not multiples of any block size), forward ≤ 1e-5 and gradients ≤ 1e-4 relative; the U-Net
//! forward and backward; Adam, clipping and EMA; an ODE solve and two ORW-CFM-W2 steps; and that
//! every output element is written (each new GPU buffer starts as NaN here).
//!
//! Without a GPU the tests run on the simulated GPU of `backend::cuda::sim` (the real kernels on
//! the CPU through a C++ shim, with the same launches, host memory, GEMMs by the CPU backend, no
//! cuDNN): that checks the host side (argument lists, geometry, dispatch, data movement), not
//! the driver, cuBLAS, cuDNN or GPU arithmetic. With `ORWCFM_REQUIRE_GPU=1` (set by
//! `scripts/gpu-check.sh`) a missing GPU fails instead.

#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use common::gpu;
use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::backend::cpu::attention::QkvOrder;
use orwcfm_fast::backend::cuda;
use orwcfm_fast::flow::ode::OdeSolver;
use orwcfm_fast::nn::ParamStore;
use orwcfm_fast::nn::{Forward, Init, UNetConfig, UNetModel, VelocityField};
use orwcfm_fast::optim::{Adam, clip_coef, clip_grad_norm, ema_update, grad_norm};
use orwcfm_fast::orw::{OrwConfig, Trainer, sample_model};
use orwcfm_fast::reward::FnReward;
use orwcfm_fast::rng::Rng;
use orwcfm_fast::rng::philox::Philox;
use orwcfm_fast::tensor::{Device, Storage, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const DEV: Device = Device::Cuda(0);

fn rnd(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, rng)
}

fn gpu_t(t: &Tensor) -> Tensor {
    t.to_device(DEV).unwrap()
}

/// Run `f` on CPU leaves and on GPU copies of them; compare the value and, through a random
/// output gradient, the gradient of every input.
fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Var]) -> Var) {
    check_tol(name, inputs, FWD_TOL, GRAD_TOL, f)
}

fn check_tol(name: &str, inputs: &[Tensor], fwd_tol: f64, grad_tol: f64, f: impl Fn(&[Var]) -> Var) {
    let mut rng = Rng::new(0xC0FFEE ^ name.len() as u64);
    let cv: Vec<Var> = inputs.iter().map(|t| Var::param(t.clone())).collect();
    let gv: Vec<Var> = inputs.iter().map(|t| Var::param(gpu_t(t))).collect();
    let yc = f(&cv);
    let yg = f(&gv);
    let (vc, vg) = (yc.value(), yg.value());
    assert!(vg.device().is_cuda(), "{name}: the GPU run's output is not on the GPU");
    assert_eq!(vc.shape(), vg.shape(), "{name}: shapes");
    assert!(vg.all_finite(), "{name}: the GPU output has non-finite values (an element left unwritten?)");
    let e = vg.rel_err(&vc);
    assert!(e <= fwd_tol, "{name}: forward rel err {e:e} > {fwd_tol:e}");
    let seed = rnd(vc.shape(), &mut rng);
    let gc = yc.backward_with(seed.clone()).unwrap();
    let gg = yg.backward_with(gpu_t(&seed)).unwrap();
    for (i, (t, g)) in inputs.iter().zip(&gv).enumerate() {
        assert_eq!(g.value().to_vec(), t.data(), "{name}: input {i} was modified on the GPU");
    }
    let mut worst_grad = 0.0f64;
    for (i, (c, g)) in cv.iter().zip(&gv).enumerate() {
        match (gc.get(c), gg.get(g)) {
            (Some(a), Some(b)) => {
                assert!(b.all_finite(), "{name}: gradient {i} on the GPU has non-finite values");
                let e = b.rel_err(a);
                assert!(e <= grad_tol, "{name}: gradient {i} rel err {e:e} > {grad_tol:e}");
                worst_grad = worst_grad.max(e);
            }
            (None, None) => {}
            (a, b) => panic!("{name}: gradient {i} exists on one device only (cpu {}, gpu {})", a.is_some(), b.is_some()),
        }
    }
    eprintln!("{name:<28} forward {e:.1e}, gradients {worst_grad:.1e}");
}

#[test]
fn elementwise_and_broadcasting() {
    let Some((_g, _one)) = gpu("elementwise_and_broadcasting") else { return };
    let mut r = Rng::new(1);
    let a = rnd(&[3, 5, 67], &mut r);
    let b = rnd(&[5, 1], &mut r);
    let c = rnd(&[3, 5, 67], &mut r);
    let pos = Tensor::from_vec(rnd(&[5, 1], &mut r).data().iter().map(|v| v.abs() + 0.5).collect(), &[5, 1]);
    check("add (broadcast)", &[a.clone(), b.clone()], |v| ops::add(&v[0], &v[1]).unwrap());
    check("sub (broadcast)", &[a.clone(), b.clone()], |v| ops::sub(&v[0], &v[1]).unwrap());
    check("mul (same shape)", &[a.clone(), c.clone()], |v| ops::mul(&v[0], &v[1]).unwrap());
    check("mul (broadcast)", &[b.clone(), a.clone()], |v| ops::mul(&v[0], &v[1]).unwrap());
    check("div (broadcast)", &[a.clone(), pos.clone()], |v| ops::div(&v[0], &v[1]).unwrap());
    check("add_scalar", &[a.clone()], |v| ops::add_scalar(&v[0], 0.37).unwrap());
    check("mul_scalar", &[a.clone()], |v| ops::mul_scalar(&v[0], -1.7).unwrap());
    check("exp", &[a.clone()], |v| ops::exp(&v[0]).unwrap());
    check("relu", &[a.clone()], |v| ops::relu(&v[0]).unwrap());
    check("square", &[a.clone()], |v| ops::square(&v[0]).unwrap());
    check("silu", &[a.clone()], |v| ops::silu(&v[0]).unwrap());
    check("sigmoid", &[a.clone()], |v| ops::sigmoid(&v[0]).unwrap());
    // a large input: many blocks of the grid-stride loops
    let big = rnd(&[1_000_003], &mut r);
    check("silu (1e6+3)", &[big.clone()], |v| ops::silu(&v[0]).unwrap());
    check("sum_all (1e6+3)", &[big], |v| ops::sum_all(&v[0]).unwrap());
}

#[test]
fn reductions_and_softmax() {
    let Some((_g, _one)) = gpu("reductions_and_softmax") else { return };
    let mut r = Rng::new(2);
    let a = rnd(&[4, 7, 33], &mut r);
    check("sum_all", &[a.clone()], |v| ops::sum_all(&v[0]).unwrap());
    check("mean_all", &[a.clone()], |v| ops::mean_all(&v[0]).unwrap());
    check("sum_axes [1]", &[a.clone()], |v| ops::sum_axes(&v[0], &[1], false).unwrap());
    check("sum_axes [0,2] keepdim", &[a.clone()], |v| ops::sum_axes(&v[0], &[0, 2], true).unwrap());
    check("mean_axes [1,2]", &[a.clone()], |v| ops::mean_axes(&v[0], &[1, 2], false).unwrap());
    check("softmax", &[a.clone()], |v| ops::softmax(&v[0]).unwrap());
    check("log_softmax", &[a.clone()], |v| ops::log_softmax(&v[0]).unwrap());
    let logits = rnd(&[9, 10], &mut r);
    let labels = [3usize, 0, 9, 2, 2, 7, 1, 5, 4];
    check("cross_entropy", &[logits], |v| ops::cross_entropy(&v[0], &labels).unwrap());
    let wide = rnd(&[3, 3001], &mut r);
    check("softmax (rows of 3001)", &[wide], |v| ops::softmax(&v[0]).unwrap());
}

#[test]
fn layout_ops() {
    let Some((_g, _one)) = gpu("layout_ops") else { return };
    let mut r = Rng::new(3);
    let a = rnd(&[2, 3, 5, 7], &mut r);
    let b = rnd(&[2, 4, 5, 7], &mut r);
    check("permute", &[a.clone()], |v| ops::permute(&v[0], &[2, 0, 3, 1]).unwrap());
    check("reshape+permute", &[a.clone()], |v| ops::permute(&ops::reshape(&v[0], &[6, 35]).unwrap(), &[1, 0]).unwrap());
    check("concat axis 1", &[a.clone(), b.clone()], |v| ops::concat(&[v[0].clone(), v[1].clone()], 1).unwrap());
    check("narrow axis 1", &[b.clone()], |v| ops::narrow(&v[0], 1, 1, 2).unwrap());
    check("narrow axis 3", &[a.clone()], |v| ops::narrow(&v[0], 3, 2, 4).unwrap());
    check("upsample 2x", &[a.clone()], |v| ops::upsample_nearest2x(&v[0]).unwrap());
    check("avg_pool 2x (odd sizes)", &[a.clone()], |v| ops::avg_pool2x(&v[0]).unwrap());
    let w = rnd(&[11, 19], &mut r);
    let ids = [3usize, 10, 0, 3, 7];
    check("embedding", &[w], |v| ops::embedding(&v[0], &ids).unwrap());
    let t = Tensor::rand_uniform(&[13], 0.0, 1.0, &mut r);
    check("timestep_embedding (odd dim)", &[t.clone()], |v| ops::timestep_embedding(&v[0], 65).unwrap());
    check("timestep_embedding", &[t], |v| ops::timestep_embedding(&v[0], 128).unwrap());
    // dropout draws its mask on the host: both devices drop the same units
    check("dropout", &[a.clone()], |v| ops::dropout(&v[0], 0.3, &mut Philox::new(9)).unwrap());
}

#[test]
fn gemm_ops() {
    let Some((_g, _one)) = gpu("gemm_ops") else { return };
    let mut r = Rng::new(4);
    check("matmul 33x47x29", &[rnd(&[33, 47], &mut r), rnd(&[47, 29], &mut r)], |v| ops::matmul(&v[0], &v[1]).unwrap());
    let (x, w, b) = (rnd(&[17, 130], &mut r), rnd(&[65, 130], &mut r), rnd(&[65], &mut r));
    check("linear with bias", &[x.clone(), w.clone(), b], |v| ops::linear(&v[0], &v[1], Some(&v[2])).unwrap());
    check("linear without bias", &[x.clone(), w.clone()], |v| ops::linear(&v[0], &v[1], None).unwrap());
    // one row: the broadcast bias must be a copy, not the parameter itself
    let (x1, b1) = (rnd(&[1, 130], &mut r), rnd(&[65], &mut r));
    check("linear with bias, 1 row", &[x1, w, b1], |v| ops::linear(&v[0], &v[1], Some(&v[2])).unwrap());
}

#[test]
fn convolutions() {
    let Some((g, _one)) = gpu("convolutions") else { return };
    eprintln!("convolution method: {}", cuda::conv::method(&g));
    let mut r = Rng::new(5);
    for (n, cin, h, w, cout, k, stride, pad) in [(3, 5, 9, 11, 7, 3, 1, 1), (2, 8, 16, 16, 12, 3, 2, 1), (2, 6, 7, 5, 4, 1, 1, 0), (1, 3, 28, 28, 32, 3, 1, 1)] {
        let x = rnd(&[n, cin, h, w], &mut r);
        let wt = Tensor::from_vec(rnd(&[cout, cin, k, k], &mut r).data().iter().map(|v| v * 0.2).collect(), &[cout, cin, k, k]);
        let b = rnd(&[cout], &mut r);
        let name = format!("conv {n}x{cin}x{h}x{w} k{k} s{stride} p{pad}");
        check(&name, &[x, wt, b], |v| ops::conv2d(&v[0], &v[1], Some(&v[2]), stride, pad).unwrap());
    }
    for line in cuda::conv::plan_report(&g) {
        eprintln!("conv plan {line}");
    }
}

#[test]
fn group_norm_and_attention() {
    let Some((_g, _one)) = gpu("group_norm_and_attention") else { return };
    let mut r = Rng::new(6);
    let x = rnd(&[3, 64, 7, 9], &mut r);
    let (w, b) = (rnd(&[64], &mut r), rnd(&[64], &mut r));
    check("group_norm 32 groups", &[x, w, b], |v| ops::group_norm(&v[0], &v[1], &v[2], 32, 1e-5).unwrap());
    for order in [QkvOrder::Legacy, QkvOrder::New] {
        let qkv = rnd(&[3, 3 * 2 * 16, 49], &mut r);
        check(&format!("attention {order:?} 2 heads t=49"), &[qkv], |v| ops::qkv_attention(&v[0], 2, order).unwrap());
    }
}

/// The fused `flash_attention` node (the flash kernels of `kernels/attention.cu` on the GPU)
/// against the CPU node: every head-dimension variant (32/64/128 padded), one and several key
/// tiles, both head orders; a head wider than the kernels take (the composition); what it saves
/// (no `T × T`); f16 and bf16 (widened around the f32 kernels) against the f32 CPU node.
#[test]
fn flash_attention_node_matches_the_cpu() {
    use orwcfm_fast::autograd::fused::{self, Attention};
    use orwcfm_fast::tensor::DType;
    let Some((_g, _one)) = gpu("flash_attention_node_matches_the_cpu") else { return };
    let mut r = Rng::new(11);
    // (b, heads, ch, t)
    for (b, heads, ch, t) in [(2usize, 2usize, 16usize, 49usize), (1, 1, 40, 70), (1, 2, 96, 37), (1, 1, 130, 9)] {
        for order in [QkvOrder::Legacy, QkvOrder::New] {
            let qkv = rnd(&[b, 3 * heads * ch, t], &mut r).mul_scalar(1.5).unwrap();
            check(&format!("flash {order:?} h{heads} ch{ch} t{t}"), &[qkv.clone()], |v| fused::attention(&v[0], heads, order).unwrap());
            let saved = Tensor::apply_custom(&Attention { heads, order }, &[&gpu_t(&qkv)], &[true]).unwrap().saved;
            let shapes: Vec<Vec<usize>> = saved.iter().map(|s| s.shape().to_vec()).collect();
            if ch <= orwcfm_fast::backend::cuda::attention::MAX_HEAD_DIM {
                assert_eq!(shapes, [vec![b, heads * ch, t], vec![b * heads, t]], "ch {ch}: the flash node saves out and lse only");
            } else {
                assert_eq!(shapes, [vec![b * heads, t, t]], "ch {ch}: the composition saves the probabilities");
            }
        }
    }
    // half precision: the dtype kept, within the precision's tolerance of the f32 CPU node
    let (b, heads, ch, t) = (2, 2, 24, 70);
    let qkv = rnd(&[b, 3 * heads * ch, t], &mut r).mul_scalar(1.5).unwrap();
    let seed = rnd(&[b, heads * ch, t], &mut r);
    let run = |x: Tensor, s: Tensor| {
        let v = Var::param(x);
        let y = fused::attention(&v, 2, QkvOrder::New).unwrap();
        let gr = y.backward_with(s).unwrap();
        (y.value(), gr.get(&v).unwrap().clone())
    };
    let (want, wgrad) = run(qkv.clone(), seed.clone());
    for (dt, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        let (y, gr) = run(gpu_t(&qkv.to_dtype(dt).unwrap()), gpu_t(&seed.to_dtype(dt).unwrap()));
        assert_eq!((y.dtype(), gr.dtype()), (dt, dt), "{dt}: output and gradient dtypes");
        assert!(y.device().is_cuda() && gr.device().is_cuda());
        let (y, gr) = (y.to_dtype(DType::F32).unwrap().to_device(Device::Cpu).unwrap(), gr.to_dtype(DType::F32).unwrap().to_device(Device::Cpu).unwrap());
        let (e, ge) = (y.rel_err(&want), gr.rel_err(&wgrad));
        eprintln!("flash {dt}: forward {e:.1e}, gradient {ge:.1e} (tolerance {tol:e})");
        assert!(e <= tol && ge <= tol, "flash {dt}: forward {e:e}, gradient {ge:e} > {tol:e}");
    }
}

/// A smaller U-Net for the simulated GPU (every GPU thread is an OS thread there): 16×16, with
/// attention at 8×8, two levels, dropout off.
fn sim_unet() -> UNetConfig {
    let mut c = UNetConfig::new([1, 16, 16], 32, 1);
    c.channel_mult = Some(vec![1.0, 2.0]);
    c.attention_resolutions = "8".into();
    c
}

fn perturbed_unet(cfg: &UNetConfig, seed: u64) -> UNetModel {
    let m = UNetModel::new(cfg, Init::Torch(seed)).unwrap();
    // zero-initialised layers (torchcfm's zero_module) are perturbed so that every path carries signal
    let mut r = Rng::new(seed + 1);
    let vals: Vec<Tensor> = m
        .params()
        .vars()
        .iter()
        .map(|v| {
            let t = v.value();
            let n = rnd(t.shape(), &mut r);
            Tensor::from_vec(t.data().iter().zip(n.data()).map(|(a, b)| a + 0.02 * b).collect(), t.shape())
        })
        .collect();
    m.params().set_all(vals);
    m
}

#[test]
fn unet_forward_and_backward_match_the_cpu() {
    let Some((g, _one)) = gpu("unet_forward_and_backward_match_the_cpu") else { return };
    let mut cfg = if g.is_sim() { sim_unet() } else { UNetConfig::mnist_small() };
    cfg.class_cond = true;
    let cpu = perturbed_unet(&cfg, 21);
    let mut dev = cpu.clone();
    dev.to_device(DEV).unwrap();
    let mut r = Rng::new(7);
    let b = 3;
    let [c, h, w] = cfg.dim;
    let x = rnd(&[b, c, h, w], &mut r);
    let t = Tensor::rand_uniform(&[b], 0.0, 1.0, &mut r);
    let y = [1usize, 7, 4];
    let seed = rnd(&[b, c, h, w], &mut r);
    let run = |m: &UNetModel, on: Device| {
        let xv = Var::param(x.to_device(on).unwrap());
        let v = m.forward(&Var::constant(t.to_device(on).unwrap()), &xv, Some(&y), &mut Forward { dropout_rng: None }).unwrap();
        let gr = v.backward_with(seed.to_device(on).unwrap()).unwrap();
        let mut grads: Vec<Tensor> = m.params().grads(&gr).unwrap();
        grads.push(gr.get(&xv).unwrap().clone());
        (v.value(), grads)
    };
    let (vc, gc) = run(&cpu, Device::Cpu);
    let before = g.pool_stats();
    let (vg, gg) = run(&dev, DEV);
    let e = vg.rel_err(&vc);
    eprintln!("U-Net forward rel err {e:.2e}");
    assert!(e <= FWD_TOL, "U-Net forward rel err {e:e}");
    let names: Vec<String> = cpu.params().names().to_vec();
    // per tensor, except gradients that are structurally ~0 (a bias right before a GroupNorm of
    // one channel per group: both devices give rounding noise there); all of them together too
    let scale = gc.iter().map(|a| a.norm()).fold(0.0f64, f64::max);
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    let mut worst = (0.0f64, String::new());
    for (i, (a, b)) in gc.iter().zip(&gg).enumerate() {
        assert!(b.all_finite(), "gradient {i} has non-finite values on the GPU");
        let d = a.to_vec().iter().zip(b.to_vec()).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
        diff2 += d;
        ref2 += a.norm().powi(2);
        let name = names.get(i).cloned().unwrap_or_else(|| "input x".into());
        if a.norm() < 1e-3 * scale {
            eprintln!("  (gradient of {name} is ~0: norm {:.2e} of {scale:.2e}; compared in the total only)", a.norm());
            continue;
        }
        let e = b.rel_err(a);
        if e > worst.0 {
            worst = (e, name);
        }
    }
    let total = (diff2 / ref2).sqrt();
    eprintln!("U-Net backward: all gradients rel err {total:.2e}, worst tensor {:.2e} ({})", worst.0, worst.1);
    assert!(total <= GRAD_TOL, "U-Net gradients: total rel err {total:e}");
    assert!(worst.0 <= GRAD_TOL, "U-Net gradient {} rel err {:e}", worst.1, worst.0);
    // the caching allocator: a second step asks nothing of the driver
    let _ = run(&dev, DEV);
    let mid = g.pool_stats();
    let _ = run(&dev, DEV);
    let after = g.pool_stats();
    eprintln!("pool: {} driver allocations before, {} after the first GPU step, {} after the third", before.raw_allocs, mid.raw_allocs, after.raw_allocs);
    assert_eq!(mid.raw_allocs, after.raw_allocs, "steady-state steps allocated from the driver");
}

/// Mixed precision on the GPU (issue 11): the U-Net's forward and backward with f16/bf16 weights
/// and activations — 16-bit GEMMs and convolutions on the tensor cores (cuBLAS GemmEx, cuDNN) with
/// f32 accumulation — against the CPU in f32 on random inputs: relative L2 ≤ 5e-3 (f16) and
/// ≤ 3e-2 (bf16), and no further from the f32 result than the CPU reference of the same precision
/// is by more than a factor of 2 (forward, and all parameter gradients together). It must also
/// really run in 16 bits (an error floor).
#[test]
fn unet_mixed_precision_matches_the_cpu_reference() {
    use orwcfm_fast::tensor::DType;
    let Some((g, _one)) = gpu("unet_mixed_precision_matches_the_cpu_reference") else { return };
    let cfg = if g.is_sim() { sim_unet() } else { UNetConfig::mnist_small() };
    let base = perturbed_unet(&cfg, 31);
    let mut r = Rng::new(17);
    let b = 2;
    let [c, h, w] = cfg.dim;
    let x = rnd(&[b, c, h, w], &mut r);
    let t = Tensor::rand_uniform(&[b], 0.0, 1.0, &mut r);
    let seed = rnd(&[b, c, h, w], &mut r);
    // (velocity, parameter gradients in f32, all on the host)
    let run = |m: &UNetModel, on: Device| {
        let xv = Var::constant(x.to_device(on).unwrap());
        let v = m.forward(&Var::constant(t.to_device(on).unwrap()), &xv, None, &mut Forward { dropout_rng: None }).unwrap();
        let gr = v.backward_with(seed.to_device(on).unwrap()).unwrap();
        let grads: Vec<Tensor> = m.params().grads(&gr).unwrap().iter().map(|t| t.to_dtype(DType::F32).unwrap().to_device(Device::Cpu).unwrap()).collect();
        (v.value().to_dtype(DType::F32).unwrap().to_device(Device::Cpu).unwrap(), grads)
    };
    let total_err = |a: &[Tensor], b: &[Tensor]| {
        let (mut d2, mut r2) = (0.0f64, 0.0f64);
        for (x, y) in a.iter().zip(b) {
            d2 += x.to_vec().iter().zip(y.to_vec()).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>();
            r2 += y.norm().powi(2);
        }
        (d2 / r2).sqrt()
    };
    let (v32, g32) = run(&base, Device::Cpu);
    for (dtype, tol, floor) in [(DType::F16, 5e-3, 1e-4), (DType::BF16, 3e-2, 1e-3)] {
        let mut cpu = base.clone();
        cpu.to_precision(dtype).unwrap();
        let mut dev = cpu.clone();
        dev.to_device(DEV).unwrap();
        assert_eq!(dev.params().vars()[0].value().dtype(), dtype);
        let (vc, gc) = run(&cpu, Device::Cpu);
        let (vg, gg) = run(&dev, DEV);
        assert!(vg.all_finite() && gg.iter().all(|t| t.all_finite()), "{dtype}: non-finite values on the GPU");
        let (fc, fg) = (vc.rel_err(&v32), vg.rel_err(&v32));
        let (bc, bg) = (total_err(&gc, &g32), total_err(&gg, &g32));
        eprintln!("{dtype}: forward rel L2 vs CPU f32: GPU {fg:.2e}, CPU {dtype} reference {fc:.2e}; gradients: GPU {bg:.2e}, CPU reference {bc:.2e}");
        assert!(fg <= tol, "{dtype}: GPU forward rel err {fg:e} > {tol:e}");
        assert!(fg <= 2.0 * fc.max(floor), "{dtype}: GPU forward {fg:e} is more than twice the CPU reference's {fc:e}");
        assert!(fg >= floor, "{dtype}: GPU forward rel err {fg:e} too small for {dtype} arithmetic");
        assert!(bg <= 2.0 * bc.max(floor), "{dtype}: GPU gradients {bg:e} more than twice the CPU reference's {bc:e}");
    }
}

#[test]
fn adam_clipping_and_ema_match_the_cpu() {
    let Some((_g, _one)) = gpu("adam_clipping_and_ema_match_the_cpu") else { return };
    let mut r = Rng::new(8);
    let shapes: [&[usize]; 3] = [&[257], &[33, 65], &[7]];
    let mut pc: Vec<Tensor> = shapes.iter().map(|s| rnd(s, &mut r)).collect();
    let mut pg: Vec<Tensor> = pc.iter().map(gpu_t).collect();
    let (mut ac, mut ag) = (Adam::new(1e-2), Adam::new(1e-2));
    ac.weight_decay = 0.01;
    ag.weight_decay = 0.01;
    for step in 0..4 {
        let mut gc: Vec<Tensor> = shapes.iter().map(|s| rnd(s, &mut r)).collect();
        let mut gg: Vec<Tensor> = gc.iter().map(gpu_t).collect();
        let (nc, ng) = (grad_norm(&gc).unwrap(), grad_norm(&gg).unwrap());
        assert!((nc - ng).abs() <= 1e-6 * nc, "grad norm {nc} vs {ng}");
        clip_grad_norm(&mut gc, 5.0).unwrap();
        clip_grad_norm(&mut gg, 5.0).unwrap();
        ac.step(&mut pc, &gc, 1e-2).unwrap();
        ag.step(&mut pg, &gg, 1e-2).unwrap();
        for (i, (a, b)) in pc.iter().zip(&pg).enumerate() {
            assert!(b.device().is_cuda());
            let e = b.rel_err(a);
            assert!(e <= 1e-6, "Adam step {step}, parameter {i}: rel err {e:e}");
        }
    }
    let src: Vec<Tensor> = shapes.iter().map(|s| rnd(s, &mut r)).collect();
    let src_g: Vec<Tensor> = src.iter().map(gpu_t).collect();
    ema_update(&mut pc, &src, 0.99).unwrap();
    ema_update(&mut pg, &src_g, 0.99).unwrap();
    for (a, b) in pc.iter().zip(&pg) {
        assert!(b.rel_err(a) <= 1e-6, "EMA rel err {:e}", b.rel_err(a));
    }
}

/// The device address of a GPU tensor's first element.
fn dev_ptr(t: &Tensor) -> u64 {
    match t.storage() {
        Storage::Cuda(s) => s.ptr(),
        Storage::Cpu(_) => panic!("a CPU tensor where a GPU one was expected"),
    }
}

#[test]
fn arena_adam_clipping_and_ema_match_the_cpu_in_one_pass() {
    let Some((g, _one)) = gpu("arena_adam_clipping_and_ema_match_the_cpu_in_one_pass") else { return };
    let mut r = Rng::new(9);
    let shapes: [&[usize]; 4] = [&[257], &[33, 65], &[7], &[]];
    let mk = |r: &mut Rng| {
        let mut s = ParamStore::new();
        for (i, sh) in shapes.iter().enumerate() {
            s.add(format!("p{i}"), rnd(sh, r));
        }
        s
    };
    let (nc, ec) = (mk(&mut r), mk(&mut r));
    let (ng, eg) = (nc.clone(), ec.clone());
    ng.to_device(DEV).unwrap();
    eg.to_device(DEV).unwrap();
    // the per-tensor path on the GPU, the reference of the one pass there
    let (mut pt, mut et): (Vec<Tensor>, Vec<Tensor>) = (ng.tensors().into_iter().map(|t| t.1).collect(), eg.tensors().into_iter().map(|t| t.1).collect());
    let (mut ac, mut ag, mut at) = (Adam::new(1e-2), Adam::new(1e-2), Adam::new(1e-2));
    for a in [&mut ac, &mut ag, &mut at] {
        a.weight_decay = 0.01;
    }
    let bits = |a: &Tensor, b: &Tensor| a.to_vec().iter().zip(b.to_vec()).all(|(x, y)| x.to_bits() == y.to_bits());
    let mut clipped = 0;
    let mut raw = Vec::new();
    for step in 0..6 {
        let amp = [3.0f32, 0.01, 2.0, 0.02, 1.0, 1.0][step];
        let gc: Vec<Tensor> = shapes.iter().map(|s| rnd(s, &mut r).mul_scalar(amp).unwrap()).collect();
        let gg: Vec<Tensor> = gc.iter().map(gpu_t).collect();
        let norm = grad_norm(&gc).unwrap();
        let scale = clip_coef(norm, 5.0);
        clipped += (scale < 1.0) as usize;
        ac.step_flat(&nc, &gc, 1e-2, scale, Some((&ec, 0.9))).unwrap();
        ag.step_flat(&ng, &gg, 1e-2, scale, Some((&eg, 0.9))).unwrap();
        let mut gt = gg.clone();
        clip_grad_norm(&mut gt, 5.0).unwrap();
        at.step(&mut pt, &gt, 1e-2).unwrap();
        ema_update(&mut et, &pt, 0.9).unwrap();
        for (i, ((a, b), t)) in nc.vars().iter().zip(ng.vars()).zip(&pt).enumerate() {
            let (a, b) = (a.value(), b.value());
            assert!(b.device().is_cuda());
            let e = b.rel_err(&a);
            assert!(e <= 1e-6, "arena Adam step {step}, parameter {i}: rel err {e:e} against the CPU");
            assert!(bits(&b, t), "arena Adam step {step}, parameter {i}: the one pass differs from the per-tensor kernels on the GPU");
            if g.is_sim() {
                assert!(bits(&b, &a), "arena Adam step {step}, parameter {i}: not bit-identical to the CPU on the simulated GPU");
            }
        }
        for (i, ((a, b), t)) in ec.vars().iter().zip(eg.vars()).zip(&et).enumerate() {
            let (a, b) = (a.value(), b.value());
            assert!(b.rel_err(&a) <= 1e-6, "EMA step {step}, tensor {i}: rel err {:e}", b.rel_err(&a));
            assert!(bits(&b, t), "EMA step {step}, tensor {i}: the one pass differs from axpby on the GPU");
        }
        // from the third step on (arenas, moments and the gradient gather cached), a step asks
        // nothing new of the driver and writes the arenas where they are
        raw.push((g.pool_stats().raw_allocs, dev_ptr(&ng.var(0).value()), dev_ptr(&ag.exp_avg[0]), dev_ptr(&eg.var(0).value())));
    }
    assert!((1..6).contains(&clipped), "clipping active in some steps only ({clipped} of 6)");
    assert!(raw[2..].windows(2).all(|w| w[0] == w[1]), "steady steps allocated or moved an arena: {raw:?}");
    // the views are views: each parameter at its offset in the one device buffer
    let arena = ng.arena().unwrap();
    for (v, (off, _)) in ng.vars().iter().zip(arena.layout().parts()) {
        assert_eq!(dev_ptr(&v.value()), dev_ptr(arena.flat()) + 4 * *off as u64, "parameter at {off} is not a view of the arena");
    }
    eprintln!("arena pass on {}: 6 steps ({clipped} clipped) match the CPU; steady steps allocate nothing ({raw:?})", if g.is_sim() { "the simulated GPU" } else { "the GPU" });
}

#[test]
fn ode_solves_match_the_cpu() {
    let Some((g, _one)) = gpu("ode_solves_match_the_cpu") else { return };
    let cpu = perturbed_unet(&if g.is_sim() { sim_unet() } else { UNetConfig::mnist_small() }, 31);
    let mut dev = cpu.clone();
    dev.to_device(DEV).unwrap();
    for solver in [OdeSolver::Euler, OdeSolver::Midpoint, OdeSolver::Rk4, OdeSolver::Dopri5 { atol: 1e-4, rtol: 1e-4 }] {
        let (xc, _, sc) = sample_model(&cpu, 4, &solver, 5, &mut Rng::new(3)).unwrap();
        let (xg, _, sg) = sample_model(&dev, 4, &solver, 5, &mut Rng::new(3)).unwrap();
        assert!(!xg.device().is_cuda(), "samples come back to the host");
        let e = xg.rel_err(&xc);
        eprintln!("ODE {:<9} nfe cpu {} gpu {}, rel err {e:.2e}", solver.name(), sc.nfe, sg.nfe);
        let tol = if matches!(solver, OdeSolver::Dopri5 { .. }) { 1e-4 } else { FWD_TOL };
        assert!(e <= tol, "{}: samples differ by {e:e}", solver.name());
    }
}

/// Bits of f32 values as an ordered integer line (so that ulp distances are differences).
fn ordered(x: f32) -> i64 {
    let b = x.to_bits() as i32 as i64;
    if b < 0 { i64::from(i32::MIN) - b } else { b }
}

/// The device's Philox draws are the CPU's: uniforms, dropout masks, casts and gathers bit for
/// bit; normals within 2 ulp (a GPU's `logf`/`sincosf`; bit for bit where the device's draw is
/// made by the CPU reference, as on the simulated GPU until the kernels are wired in).
#[test]
fn philox_draws_match_the_cpu_bit_for_bit() {
    let Some((_g, _one)) = gpu("philox_draws_match_the_cpu_bit_for_bit") else { return };
    use orwcfm_fast::backend::RandomDist;
    use orwcfm_fast::tensor::DType;
    let bits = |t: &Tensor| t.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let shape = [5, 3, 37, 11]; // 6105 values: not a multiple of 4 or of any block size
    for (seed, off) in [(0u64, 0u64), (0xDEAD_BEEF_0123_4567, 1 << 40)] {
        let at = |dist, dev, dtype| Tensor::philox_at(&shape, dist, seed, off, dev, dtype).unwrap();
        let (uc, ug) = (at(RandomDist::Uniform, Device::Cpu, DType::F32), at(RandomDist::Uniform, DEV, DType::F32));
        assert!(ug.device().is_cuda(), "the draw is made on the GPU");
        assert_eq!(bits(&ug), bits(&uc), "uniform ({seed}, {off})");
        let (zc, zg) = (at(RandomDist::Normal, Device::Cpu, DType::F32), at(RandomDist::Normal, DEV, DType::F32));
        let ulp = zc.to_vec().iter().zip(zg.to_vec()).map(|(&a, b)| (ordered(a) - ordered(b)).abs()).max().unwrap();
        eprintln!("normal ({seed}, {off}): max {ulp} ulp from the CPU");
        assert!(ulp <= 2, "normal ({seed}, {off}): {ulp} ulp from the CPU");
        let (hc, hg) = (at(RandomDist::Uniform, Device::Cpu, DType::F16), at(RandomDist::Uniform, DEV, DType::F16));
        assert_eq!(hg.to_f16().unwrap(), hc.to_f16().unwrap(), "f16 uniform");
        // dropout, forward and (the same call on the gradient) backward
        let x = rnd(&shape, &mut Rng::new(seed ^ 1));
        for p in [0.1f32, 0.5] {
            let (yc, yg) = (x.dropout_philox(p, seed, off).unwrap(), gpu_t(&x).dropout_philox(p, seed, off).unwrap());
            assert!(yg.device().is_cuda());
            assert_eq!(bits(&yg), bits(&yc), "dropout p {p} ({seed}, {off})");
        }
        let mut sc = Philox::from_state(seed, off);
        let mut sg = sc;
        let (xc, xg) = (Var::param(x.clone()), Var::param(gpu_t(&x)));
        let (yc, yg) = (ops::dropout(&xc, 0.2, &mut sc).unwrap(), ops::dropout(&xg, 0.2, &mut sg).unwrap());
        assert_eq!(sc, sg, "both streams advance alike");
        let gc = yc.backward_with(x.clone()).unwrap();
        let gg = yg.backward_with(gpu_t(&x)).unwrap();
        assert_eq!(bits(gg.get(&xg).unwrap()), bits(gc.get(&xc).unwrap()), "dropout backward");
    }
    // the step's device-side sum of squares and the row gather of OT pairings
    let ts: Vec<Tensor> = [&[257usize][..], &[33, 65]].iter().map(|s| rnd(s, &mut Rng::new(4))).collect();
    let tg: Vec<Tensor> = ts.iter().map(gpu_t).collect();
    let (pc, pg) = (Tensor::sum_squares_on_device(&ts.iter().collect::<Vec<_>>()).unwrap(), Tensor::sum_squares_on_device(&tg.iter().collect::<Vec<_>>()).unwrap());
    assert!(pg.device().is_cuda(), "the sum stays on the GPU");
    let (c, g) = (pc.to_vec(), pg.to_vec());
    let (sc, sg) = (c[0] as f64 + c[1] as f64, g[0] as f64 + g[1] as f64);
    assert!(((sc - sg) / sc).abs() < 1e-12, "sum of squares {sc} vs {sg}");
    let x = rnd(&[6, 2, 3], &mut Rng::new(5));
    let idx = [5, 0, 0, 3, 2, 1];
    assert_eq!(bits(&gpu_t(&x).index_rows(&idx).unwrap()), bits(&x.index_rows(&idx).unwrap()));
}

#[test]
fn orw_steps_match_the_cpu() {
    let Some((g, _one)) = gpu("orw_steps_match_the_cpu") else { return };
    let cfg = OrwConfig { learning_rate: 1e-3, warmup_steps: 0, batch_size: 4, steps_per_epoch: 2, num_epochs: 1, ode_steps: 3, temperature: 2.0, w2_coefficient: 0.3, seed: 5, ..OrwConfig::default() };
    // 64 channels: two per GroupNorm group, so that no parameter has a structurally zero gradient
    // (Adam turns the sign of rounding noise in such a gradient into a full ±lr step)
    let mut ucfg = if g.is_sim() { sim_unet() } else { UNetConfig::mnist_small() };
    ucfg.num_channels = 64;
    let per: usize = ucfg.dim.iter().product();
    let model = perturbed_unet(&ucfg, 41);
    let mean = move |x: &Tensor| -> Vec<f32> { x.data().chunks(per).map(|r| r.iter().sum::<f32>() / per as f32).collect() };
    let mut cpu = Trainer::new(cfg.clone(), model.clone()).unwrap();
    let mut dev = Trainer::new(cfg, model).unwrap();
    dev.to_device(DEV).unwrap();
    for step in 0..2 {
        let mc = cpu.train_step(&mut FnReward::new("mean", mean)).unwrap();
        let mg = dev.train_step(&mut FnReward::new("mean", mean)).unwrap();
        eprintln!("step {step}: loss cpu {} gpu {}", mc.total_loss, mg.total_loss);
        assert!(((mc.total_loss - mg.total_loss) as f64).abs() <= 1e-4 * (mc.total_loss as f64).abs(), "step {step}: loss {} vs {}", mc.total_loss, mg.total_loss);
    }
    let mut worst = (0.0f64, String::new());
    for ((name, a), b) in cpu.net().params().iter().zip(dev.net().params().vars()) {
        assert!(b.value().device().is_cuda(), "the trained model left the GPU");
        let e = b.value().rel_err(&a.value());
        if e > worst.0 {
            worst = (e, name.to_string());
        }
    }
    eprintln!("ORW: parameters after 2 steps, worst rel err {:.2e} ({})", worst.0, worst.1);
    let worst = worst.0;
    // the first step's loss is bit for bit and the second's within 1e-4, which checks the first
    // update; the parameters after the second get 1e-3: Adam divides each gradient by its own
    // running magnitude, so the summation-order rounding of a near-zero gradient becomes a step of
    // up to lr, and how much of that shows depends on the CPU's kernels (measured: below 1e-4 at
    // avx512 on an Intel Xeon, 1.6e-4 at avx2 and 2.7e-4 at scalar on an AMD EPYC)
    assert!(worst <= 10.0 * GRAD_TOL, "parameters after 2 ORW steps differ by {worst:e}");
}

/// `f` on f16 and bf16 copies of `inputs`, on the CPU and on the GPU: the outputs (as f32) and
/// the gradients (of `Σ f32(out) ⊙ g`, random `g`) agree within the precision's tolerance (f16
/// ≤ 5e-3, bf16 ≤ 3e-2), and keep the dtype.
fn check_half(name: &str, inputs: &[Tensor], out_f32: bool, f: impl Fn(&[Var]) -> Var) {
    use orwcfm_fast::tensor::DType;
    for (dt, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        let run = |on: Device| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::param(t.to_dtype(dt).unwrap().to_device(on).unwrap())).collect();
            let out = f(&vars);
            let seed = rnd(&out.shape(), &mut Rng::new(0xF16)).to_device(on).unwrap();
            let g = ops::sum_all(&ops::mul(&ops::to_dtype(&out, DType::F32).unwrap(), &Var::constant(seed)).unwrap()).unwrap().backward().unwrap();
            let grads: Vec<Tensor> = vars.iter().map(|v| g.get(v).expect("gradient").clone()).collect();
            (out.value(), grads)
        };
        let ((vc, gc), (vg, gg)) = (run(Device::Cpu), run(DEV));
        assert!(vg.device().is_cuda(), "{name} {dt}: the GPU run's output is not on the GPU");
        assert_eq!(vg.dtype(), if out_f32 { DType::F32 } else { dt }, "{name} {dt}: output dtype");
        let e = vg.to_dtype(DType::F32).unwrap().rel_err(&vc.to_dtype(DType::F32).unwrap());
        let ge = gc.iter().zip(&gg).map(|(a, b)| b.to_dtype(DType::F32).unwrap().rel_err(&a.to_dtype(DType::F32).unwrap())).fold(0.0, f64::max);
        eprintln!("{name:<28} {dt}: forward {e:.1e}, gradients {ge:.1e}");
        assert!(gg.iter().all(|g| g.dtype() == dt && g.device().is_cuda()), "{name} {dt}: gradient dtypes or devices");
        assert!(e <= tol && ge <= tol, "{name} {dt}: forward {e:e}, gradients {ge:e} (tolerance {tol:e})");
    }
}

/// The fused nodes (`autograd::fused`) through the tape on the GPU, whose CUDA forward and
/// backward are the kernels of `kernels/fused.cu`, against the CPU's fused kernels: GroupNorm +
/// scale-shift + SiLU (float4 and scalar rows), the ODE combination (1, 2, 4 and 9 terms), the
/// ORW loss (one and several chunks per sample, with and without W2), in f32, f16 and bf16; and
/// that the GPU ran the fused kernels, not the compositions.
#[test]
fn fused_nodes_match_the_cpu() {
    use orwcfm_fast::autograd::fused::{self, Act, GroupNormAct, OrwLossOp, ode_combine_tensors};
    let Some((_g, _one)) = gpu("fused_nodes_match_the_cpu") else { return };
    let mut r = Rng::new(12);
    type GnCase = ([usize; 4], usize, bool, Act);
    let gn_cases: [GnCase; 3] = [([2, 8, 4, 5], 4, true, Act::Silu), ([3, 6, 7, 9], 3, false, Act::Silu), ([2, 4, 3, 3], 1, true, Act::None)];
    for (shape, groups, ss, act) in gn_cases {
        let (n, c) = (shape[0], shape[1]);
        let mut inputs = vec![rnd(&shape, &mut r).mul_scalar(1.5).unwrap().add_scalar(0.3).unwrap(), rnd(&[c], &mut r).mul_scalar(0.3).unwrap().add_scalar(1.0).unwrap(), rnd(&[c], &mut r)];
        if ss {
            inputs.push(rnd(&[n, c], &mut r).mul_scalar(0.4).unwrap());
            inputs.push(rnd(&[n, c], &mut r).mul_scalar(0.4).unwrap());
        }
        let node = move |v: &[Var]| {
            let sc = (v.len() == 5).then(|| (&v[3], &v[4]));
            fused::group_norm_act(&v[0], &v[1], &v[2], sc, groups, 1e-5, act).unwrap()
        };
        let name = format!("group_norm_act {shape:?} g{groups} ss={ss} {act:?}");
        check(&name, &inputs, node);
        check_half(&name, &inputs, false, node);
        // the fused CUDA forward saves mean and rstd only (the composition saves five tensors)
        let dev: Vec<Tensor> = inputs.iter().map(gpu_t).collect();
        let fw = Tensor::apply_custom(&GroupNormAct { groups, eps: 1e-5, act }, &dev.iter().collect::<Vec<_>>(), &vec![true; dev.len()]).unwrap();
        assert_eq!(fw.saved.iter().map(|s| s.shape().to_vec()).collect::<Vec<_>>(), [vec![n * groups], vec![n * groups]], "{name}: saved state");
    }

    for cs in [vec![0.37f32], vec![0.5, -0.25], vec![0.125, 0.375, 0.375, 0.125], vec![0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7, 0.8, -0.9]] {
        let inputs: Vec<Tensor> = (0..=cs.len()).map(|_| rnd(&[3, 5, 67], &mut r)).collect();
        let k = cs.len();
        let terms = cs.clone();
        let node = move |v: &[Var]| fused::ode_combine(&v[0], &terms.iter().zip(&v[1..]).map(|(&c, x)| (c, x)).collect::<Vec<_>>()).unwrap();
        let name = format!("ode_combine {k} terms");
        check(&name, &inputs, &node);
        check_half(&name, &inputs, false, &node);
        // up to 8 (non-zero) terms, one launch: bit for bit the CPU kernel's f64 sum rounded once
        // (the composition, one f32 axpby per term, is not)
        let combine = |ts: &[Tensor]| ode_combine_tensors(&ts[0], &cs.iter().zip(&ts[1..]).map(|(&c, x)| (c, x)).collect::<Vec<_>>()).unwrap();
        let (yc, yg) = (combine(&inputs), combine(&inputs.iter().map(gpu_t).collect::<Vec<_>>()));
        let bits = |t: &Tensor| t.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        if k <= 8 {
            assert_eq!(bits(&yg), bits(&yc), "{name}: not the CPU kernel's sum");
        } else {
            // two launches: the state is rounded to f32 once in between
            assert!(yg.rel_err(&yc) <= 1e-6, "{name}: rel err {:e}", yg.rel_err(&yc));
        }
    }

    for (shape, alpha) in [(vec![4usize, 3, 5, 7], 0.37f32), (vec![3, 40_003], 0.8), (vec![5, 2, 4, 4], 0.0)] {
        let b = shape[0];
        let v = rnd(&shape, &mut r);
        let u = rnd(&shape, &mut r);
        let vref = v.add(&rnd(&shape, &mut r).mul_scalar(0.3).unwrap()).unwrap();
        let w = Tensor::from_vec(rnd(&[b], &mut r).to_vec().iter().map(|x| (0.7 * x).exp()).collect(), &[b]);
        let loss = |vv: &Var| {
            let dev = vv.value().device();
            let (u, w, vr) = (u.to_device(dev).unwrap(), w.to_device(dev).unwrap(), vref.to_device(dev).unwrap());
            fused::orw_loss(vv, &u, &w, (alpha != 0.0).then_some(&vr), alpha).unwrap()
        };
        let name = format!("orw_loss {shape:?} α={alpha}");
        check(&name, std::slice::from_ref(&v), |vv| loss(&vv[0]).0);
        check_half(&name, std::slice::from_ref(&v), true, |vv| loss(&vv[0]).0);
        // the terms on the device, the output a view of their total (the fused forward: the
        // composition computes them as separate tensors)
        let (tc, (total, tg)) = (loss(&Var::param(v.clone())).1, loss(&Var::param(gpu_t(&v))));
        assert!(tg.device().is_cuda(), "{name}: the terms left the GPU");
        assert_eq!(dev_ptr(&total.value()), dev_ptr(&tg) + 8, "{name}: the output is not the fused kernel's total");
        let e = tg.rel_err(&tc);
        eprintln!("{name:<28} terms {e:.1e}");
        assert!(e <= 1e-6, "{name}: terms {:?} vs {:?}", tg.to_vec(), tc.to_vec());
        let saved = Tensor::apply_custom(&OrwLossOp { alpha }, &[&gpu_t(&v), &gpu_t(&u), &gpu_t(&w), &gpu_t(&vref)][..if alpha != 0.0 { 4 } else { 3 }], &[true, false, false, false][..if alpha != 0.0 { 4 } else { 3 }])
            .unwrap()
            .saved;
        assert_eq!(saved.len(), 1, "{name}: saved dL/dv");
    }
}
