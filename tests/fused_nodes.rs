//! The fused tape nodes (`autograd::custom`, `autograd::fused`): each node's gradients through
//! the tape against central differences on random data of awkward sizes; each node against the
//! chain of unfused autograd ops it replaces (values ≤ 1e-5, gradients ≤ 1e-4 relative) and
//! against its own composition (`Composed`, the CUDA default) on the CPU; f16/bf16 inputs; and
//! that the U-Net, the ORW loss and the ODE solvers really run the fused nodes.

mod common;

use orwcfm_fast::autograd::custom::{Composed, apply_custom};
use orwcfm_fast::autograd::fused::{self, Act, Attention, GroupNormAct, OdeCombine, OrwLossOp};
use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::backend::QkvOrder;
use orwcfm_fast::backend::cpu::fused::ode_combine as ode_combine_kernel;
use orwcfm_fast::flow::ode::{OdeSolver, odeint};
use orwcfm_fast::nn::{Forward, Init, UNetConfig, UNetModel};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::{DType, Tensor};

const FWD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

fn r(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, &mut Rng::new(seed))
}

/// The tape's gradient of `L = Σ f(x) ⊙ g` (fixed random `g`) with respect to the inputs listed in
/// `diff` against central differences on up to 64 sampled elements of each; returns the worst
/// relative error (‖analytic − numeric‖ / ‖numeric‖ over the samples).
fn fd_check(name: &str, inputs: &[Tensor], diff: &[usize], eps: f32, f: impl Fn(&[Var]) -> Var) -> f64 {
    let mut worst = 0.0f64;
    for (k, err, num) in common::finite_difference_errors(inputs, diff, eps, 0x5EED, f) {
        assert!(num > 0.0, "{name}: input {k} has an all-zero numeric gradient; the check would be empty");
        let rel = err / num;
        eprintln!("{name}: input {k}: finite-difference rel err {rel:.2e}");
        assert!(rel < 3e-3, "{name}: input {k}: gradient rel err {rel:.3e} (‖numeric‖ {num:.3e})");
        worst = worst.max(rel);
    }
    worst
}

/// Values and gradients (of `Σ out ⊙ g` with respect to the inputs in `diff`) of two functions of
/// the same inputs: `(value rel err, worst gradient rel err)`.
fn compare(inputs: &[Tensor], diff: &[usize], a: impl Fn(&[Var]) -> Var, b: impl Fn(&[Var]) -> Var) -> (f64, f64) {
    let run = |f: &dyn Fn(&[Var]) -> Var| {
        let vars: Vec<Var> = inputs.iter().enumerate().map(|(i, t)| if diff.contains(&i) { Var::param(t.clone()) } else { Var::constant(t.clone()) }).collect();
        let out = f(&vars);
        let g = r(&out.shape(), 77);
        let grads = ops::sum_all(&ops::mul(&out, &Var::constant(g)).unwrap()).unwrap().backward().unwrap();
        let gs: Vec<Tensor> = diff.iter().map(|&k| grads.get(&vars[k]).expect("gradient").clone()).collect();
        (out.value(), gs)
    };
    let ((va, ga), (vb, gb)) = (run(&a), run(&b));
    let gerr = ga.iter().zip(&gb).map(|(x, y)| x.rel_err(y)).fold(0.0, f64::max);
    (va.rel_err(&vb), gerr)
}

#[track_caller]
fn assert_parity(what: &str, (v, g): (f64, f64), vtol: f64, gtol: f64) {
    eprintln!("{what}: value rel err {v:.2e}, gradient rel err {g:.2e}");
    assert!(v <= vtol, "{what}: value rel err {v:.3e} > {vtol:e}");
    assert!(g <= gtol, "{what}: gradient rel err {g:.3e} > {gtol:e}");
}

// ------------------------------------------------------------------------ GroupNorm + SiLU

/// (n, c, groups, spatial, scale-shift, act): groups of one channel, one group, a 1-D and an odd 2-D spatial size.
const GN_CASES: [(usize, usize, usize, &[usize], bool, Act); 5] =
    [(2, 6, 3, &[5, 7], true, Act::Silu), (3, 4, 4, &[3, 3], false, Act::Silu), (1, 8, 1, &[11], true, Act::None), (2, 64, 32, &[3, 5], true, Act::Silu), (2, 6, 2, &[1, 1], false, Act::Silu)];

fn gn_inputs(n: usize, c: usize, spatial: &[usize], ss: bool, seed: u64) -> Vec<Tensor> {
    let xs: Vec<usize> = [&[n, c][..], spatial].concat();
    // an offset mean, so that the normalisation has work to do; affine away from (1, 0)
    let x = r(&xs, seed).mul_scalar(1.7).unwrap().add_scalar(0.4).unwrap();
    let mut v = vec![x, r(&[c], seed + 1).mul_scalar(0.5).unwrap().add_scalar(1.0).unwrap(), r(&[c], seed + 2).mul_scalar(0.3).unwrap()];
    if ss {
        v.push(r(&[n, c], seed + 3).mul_scalar(0.4).unwrap());
        v.push(r(&[n, c], seed + 4).mul_scalar(0.4).unwrap());
    }
    v
}

fn gn_fused(v: &[Var], groups: usize, act: Act) -> Var {
    let ss = (v.len() == 5).then(|| (&v[3], &v[4]));
    fused::group_norm_act(&v[0], &v[1], &v[2], ss, groups, 1e-5, act).unwrap()
}

/// The U-Net's chain before the fused node: `group_norm`, `mul(1 + scale)`, `add(shift)`, `silu`.
fn gn_unfused(v: &[Var], groups: usize, act: Act) -> Var {
    let mut h = ops::group_norm(&v[0], &v[1], &v[2], groups, 1e-5).unwrap();
    if v.len() == 5 {
        let n = v[0].shape();
        let bc: Vec<usize> = n.iter().enumerate().map(|(i, &d)| if i < 2 { d } else { 1 }).collect();
        let scale = ops::reshape(&v[3], &bc).unwrap();
        let shift = ops::reshape(&v[4], &bc).unwrap();
        h = ops::add(&ops::mul(&h, &ops::add_scalar(&scale, 1.0).unwrap()).unwrap(), &shift).unwrap();
    }
    match act {
        Act::Silu => ops::silu(&h).unwrap(),
        Act::None => h,
    }
}

#[test]
fn group_norm_act_gradients_by_finite_differences() {
    for (i, &(n, c, groups, sp, ss, act)) in GN_CASES.iter().enumerate() {
        let inp = gn_inputs(n, c, sp, ss, 100 + 10 * i as u64);
        let diff: Vec<usize> = (0..inp.len()).collect();
        fd_check(&format!("group_norm_act n{n} c{c} g{groups} {sp:?} ss={ss} {act:?}"), &inp, &diff, 3e-3, |v| gn_fused(v, groups, act));
    }
}

#[test]
fn group_norm_act_node_matches_unfused_ops() {
    for (i, &(n, c, groups, sp, ss, act)) in GN_CASES.iter().enumerate() {
        let inp = gn_inputs(n, c, sp, ss, 200 + 10 * i as u64);
        let diff: Vec<usize> = (0..inp.len()).collect();
        let what = format!("group_norm_act n{n} c{c} g{groups} {sp:?} ss={ss} {act:?}");
        assert_parity(&format!("{what} vs unfused ops"), compare(&inp, &diff, |v| gn_fused(v, groups, act), |v| gn_unfused(v, groups, act)), FWD_TOL, GRAD_TOL);
        let composed = |v: &[Var]| apply_custom(Composed(GroupNormAct { groups, eps: 1e-5, act }), &v.iter().collect::<Vec<_>>()).unwrap().0;
        assert_parity(&format!("{what} vs its composition"), compare(&inp, &diff, |v| gn_fused(v, groups, act), composed), FWD_TOL, GRAD_TOL);
        // and it is one node
        let vars: Vec<Var> = inp.iter().map(|t| Var::param(t.clone())).collect();
        assert_eq!(gn_fused(&vars, groups, act).tape_names(), ["group_norm_act"]);
    }
}

// ------------------------------------------------------------------------ attention

/// (b, heads, ch, t): odd sizes, one position, a head size of one, and T past one key tile (1024).
const ATTN_CASES: [(usize, usize, usize, usize); 5] = [(2, 3, 5, 37), (1, 2, 4, 1), (3, 1, 1, 9), (2, 2, 8, 130), (1, 1, 4, 1100)];

fn qkv(b: usize, heads: usize, ch: usize, t: usize, seed: u64) -> Tensor {
    // a spread of 1.5 so that the softmax is far from uniform
    r(&[b, 3 * heads * ch, t], seed).mul_scalar(1.5).unwrap()
}

#[test]
fn attention_gradients_by_finite_differences() {
    for (i, &(b, heads, ch, t)) in ATTN_CASES[..4].iter().enumerate() {
        for (j, order) in [QkvOrder::Legacy, QkvOrder::New].into_iter().enumerate() {
            let x = qkv(b, heads, ch, t, 300 + 10 * i as u64 + j as u64);
            fd_check(&format!("flash_attention b{b} h{heads} ch{ch} t{t} {order:?}"), &[x], &[0], 3e-3, |v| fused::attention(&v[0], heads, order).unwrap());
        }
    }
}

#[test]
fn attention_node_matches_unfused_ops() {
    for (i, &(b, heads, ch, t)) in ATTN_CASES.iter().enumerate() {
        for (j, order) in [QkvOrder::Legacy, QkvOrder::New].into_iter().enumerate() {
            let x = qkv(b, heads, ch, t, 400 + 10 * i as u64 + j as u64);
            let what = format!("flash_attention b{b} h{heads} ch{ch} t{t} {order:?}");
            let fused_node = |v: &[Var]| fused::attention(&v[0], heads, order).unwrap();
            assert_parity(&format!("{what} vs qkv_attention"), compare(std::slice::from_ref(&x), &[0], fused_node, |v| ops::qkv_attention(&v[0], heads, order).unwrap()), FWD_TOL, GRAD_TOL);
            let composed = |v: &[Var]| apply_custom(Composed(Attention { heads, order }), &[&v[0]]).unwrap().0;
            assert_parity(&format!("{what} vs its composition"), compare(std::slice::from_ref(&x), &[0], fused_node, composed), FWD_TOL, GRAD_TOL);
            assert_eq!(fused_node(&[Var::param(x)]).tape_names(), ["flash_attention"]);
        }
    }
}

#[test]
fn attention_saves_no_probabilities() {
    let (b, heads, ch, t) = (2, 2, 4, 50);
    let x = qkv(b, heads, ch, t, 450);
    let out = Tensor::apply_custom(&Attention { heads, order: QkvOrder::New }, &[&x], &[true]).unwrap();
    let saved: Vec<Vec<usize>> = out.saved.iter().map(|s| s.shape().to_vec()).collect();
    // the output (f32) and the log-sum-exp per query row; nothing T×T
    assert_eq!(saved, [vec![b, heads * ch, t], vec![b * heads, t]]);
    // and nothing at all when no gradient is wanted
    assert!(Tensor::apply_custom(&Attention { heads, order: QkvOrder::New }, &[&x], &[false]).unwrap().saved.is_empty());
}

// ------------------------------------------------------------------------ the ORW loss

struct LossCase {
    v: Tensor,
    u: Tensor,
    w: Tensor,
    vref: Tensor,
}

fn loss_case(shape: &[usize], seed: u64) -> LossCase {
    let b = shape[0];
    let v = r(shape, seed);
    let vref = v.add(&r(shape, seed + 1).mul_scalar(0.3).unwrap()).unwrap();
    let w = Tensor::from_vec(r(&[b], seed + 2).to_vec().iter().map(|x| (0.7 * x).exp()).collect(), &[b]);
    LossCase { v, u: r(shape, seed + 3), w, vref }
}

/// `orw::loss` as it was before the fused node: `mean_i w_i mean_pix (v − u)² + α mean (v − v_ref)²`.
fn loss_unfused(v: &Var, k: &LossCase, alpha: f32) -> (Var, Var, Var) {
    let pix: Vec<usize> = (1..k.v.ndim()).collect();
    let per_fm = ops::mean_axes(&ops::square(&ops::sub(v, &Var::constant(k.u.clone())).unwrap()).unwrap(), &pix, false).unwrap();
    let fm = ops::mean_all(&ops::mul(&per_fm, &Var::constant(k.w.clone())).unwrap()).unwrap();
    let w2 = ops::mean_all(&ops::square(&ops::sub(v, &Var::constant(k.vref.clone())).unwrap()).unwrap()).unwrap();
    let total = if alpha != 0.0 { ops::add(&fm, &ops::mul_scalar(&w2, alpha).unwrap()).unwrap() } else { fm.clone() };
    (total, fm, w2)
}

#[test]
fn orw_loss_gradients_by_finite_differences() {
    for (i, (shape, alpha)) in [(vec![3usize, 2, 5, 7], 0.37f32), (vec![4, 1, 3, 3], 0.0), (vec![1, 17], 1.5)].into_iter().enumerate() {
        let k = loss_case(&shape, 500 + 10 * i as u64);
        let inputs = [k.v.clone(), k.u.clone(), k.w.clone(), k.vref.clone()];
        fd_check(&format!("orw_loss {shape:?} α={alpha}"), &inputs, &[0], 3e-3, |v| {
            let r = (alpha != 0.0).then(|| v[3].value());
            fused::orw_loss(&v[0], &v[1].value(), &v[2].value(), r.as_ref(), alpha).unwrap().0
        });
    }
}

#[test]
fn orw_loss_node_matches_unfused_ops() {
    for (i, (shape, alpha)) in [(vec![5usize, 3, 4, 6], 0.37f32), (vec![3, 40_003], 0.8), (vec![7, 1, 2, 2], 0.0)].into_iter().enumerate() {
        let k = loss_case(&shape, 600 + 10 * i as u64);
        let what = format!("orw_loss {shape:?} α={alpha}");
        let vref = (alpha != 0.0).then_some(&k.vref);
        // values, and the terms against the unfused terms
        let v = Var::param(k.v.clone());
        let (total, terms) = fused::orw_loss(&v, &k.u, &k.w, vref, alpha).unwrap();
        let (ut, ufm, uw2) = loss_unfused(&v, &k, alpha);
        let t = terms.to_vec();
        assert_eq!(terms.shape(), [3]);
        assert_eq!(terms.dtype(), DType::F32);
        assert_eq!(t[2], total.value().item(), "{what}: the terms' total is the node's output");
        let rel = |a: f32, b: f32| ((a - b) / b).abs() as f64;
        assert!(rel(t[0], ufm.value().item()) <= FWD_TOL, "{what}: fm {} vs {}", t[0], ufm.value().item());
        if alpha != 0.0 {
            assert!(rel(t[1], uw2.value().item()) <= FWD_TOL, "{what}: w2 {} vs {}", t[1], uw2.value().item());
        } else {
            assert_eq!(t[1], 0.0, "{what}: no W2 term without v_ref");
        }
        assert!(rel(t[2], ut.value().item()) <= FWD_TOL, "{what}: total");
        // gradients, for upstream gradients 1 (the one saved in the forward) and 2.5 (recomputed)
        for scale in [1.0f32, 2.5] {
            let gf = ops::mul_scalar(&total, scale).unwrap().backward().unwrap();
            let gu = ops::mul_scalar(&ut, scale).unwrap().backward().unwrap();
            let e = gf.get(&v).unwrap().rel_err(gu.get(&v).unwrap());
            eprintln!("{what}: dL/dv (upstream {scale}) rel err {e:.2e}");
            assert!(e <= GRAD_TOL, "{what}: dL/dv (upstream {scale}) rel err {e:.3e}");
            // and the composition (the CUDA default) agrees
            let mut inputs = vec![&v];
            let data: Vec<Var> = [&k.u, &k.w].into_iter().chain(vref).map(|t| Var::constant(t.clone())).collect();
            inputs.extend(data.iter());
            let (ct, caux) = apply_custom(Composed(OrwLossOp { alpha }), &inputs).unwrap();
            assert!(caux[0].rel_err(&terms) <= FWD_TOL, "{what}: composed terms {:?} vs {t:?}", caux[0].to_vec());
            let gc = ops::mul_scalar(&ct, scale).unwrap().backward().unwrap();
            assert!(gc.get(&v).unwrap().rel_err(gf.get(&v).unwrap()) <= GRAD_TOL, "{what}: composed dL/dv");
        }
        assert_eq!(total.tape_names(), ["orw_loss"]);
    }
}

#[test]
fn orw_loss_differentiates_v_only() {
    let k = loss_case(&[2, 3], 700);
    let e = apply_custom(OrwLossOp { alpha: 0.0 }, &[&Var::param(k.v.clone()), &Var::param(k.u.clone()), &Var::constant(k.w.clone())]).unwrap_err();
    assert!(format!("{e:#}").contains("only v is differentiated"), "{e:#}");
    let e = fused::orw_loss(&Var::param(k.v.clone()), &k.u, &k.w, None, 0.5).unwrap_err();
    assert!(format!("{e:#}").contains("reference velocity"), "{e:#}");
}

// ------------------------------------------------------------------------ ODE combination

#[test]
fn ode_combine_gradients_and_unfused_chain() {
    for (i, cs) in [vec![0.37f32], vec![0.1, -0.7], vec![0.125, 0.375, 0.375, 0.125], vec![0.2, 0.0, -1.3, 0.5, 2.0]].into_iter().enumerate() {
        let shape = [3, 5, 7];
        let inputs: Vec<Tensor> = (0..=cs.len()).map(|j| r(&shape, 800 + 10 * i as u64 + j as u64)).collect();
        // x and every slope with a non-zero coefficient (a zero one has a zero gradient)
        let diff: Vec<usize> = (0..inputs.len()).filter(|&j| j == 0 || cs[j - 1] != 0.0).collect();
        let node = |v: &[Var]| fused::ode_combine(&v[0], &cs.iter().zip(&v[1..]).map(|(&c, k)| (c, k)).collect::<Vec<_>>()).unwrap();
        let what = format!("ode_combine {} terms", cs.len());
        fd_check(&what, &inputs, &diff, 1e-2, node);
        // x + c1 k1 + … as separate ops, in f32
        let chain = |v: &[Var]| cs.iter().zip(&v[1..]).fold(v[0].clone(), |acc, (&c, k)| ops::add(&acc, &ops::mul_scalar(k, c).unwrap()).unwrap());
        assert_parity(&format!("{what} vs add/mul_scalar"), compare(&inputs, &diff, node, chain), 1e-6, 1e-6);
        let composed = |v: &[Var]| apply_custom(Composed(OdeCombine { coeffs: cs.clone() }), &v.iter().collect::<Vec<_>>()).unwrap().0;
        assert_parity(&format!("{what} vs its composition"), compare(&inputs, &diff, node, composed), 1e-6, 1e-6);
    }
}

/// The fixed-grid solvers combine their stages with the fused node: `odeint`'s result is bitwise
/// the CPU kernel's `x + Σ c_i k_i` (one rounding of an f64 sum), which one f32 axpby per term
/// is not.
#[test]
fn odeint_fixed_grid_runs_the_fused_combination() {
    let shape = [4, 999];
    let x = r(&shape, 900);
    let ks: Vec<Tensor> = (0..4).map(|i| r(&shape, 901 + i)).collect();
    let (t0, t1) = (0.1f32, 0.45f32);
    let dt = t1 - t0;
    let e = dt * 0.125;
    let cases: [(OdeSolver, usize, Vec<(f32, usize)>); 3] = [(OdeSolver::Euler, 1, vec![(dt, 0)]), (OdeSolver::Midpoint, 2, vec![(dt, 1)]), (OdeSolver::Rk4, 4, vec![(e, 0), (3.0 * e, 1), (3.0 * e, 2), (e, 3)])];
    for (solver, nfe, terms) in cases {
        let mut calls = 0usize;
        let mut f = |_t: f32, _x: &Tensor| -> anyhow::Result<Tensor> {
            calls += 1;
            Ok(ks[calls - 1].clone())
        };
        let (y, stats) = odeint(&mut f, &x, t0, t1, 1, &solver).unwrap();
        assert_eq!(stats.nfe, nfe);
        let kt: Vec<(f64, &[f32])> = terms.iter().map(|&(c, i)| (c as f64, ks[i].data())).collect();
        let want = ode_combine_kernel(x.data(), &kt);
        assert_eq!(y.data(), &want[..], "{solver:?}: odeint's last combination is not the fused kernel's");
        let mut axpby = x.clone();
        for &(c, i) in &terms {
            axpby.axpby_in_place(c, &ks[i], 1.0).unwrap();
        }
        assert_ne!(axpby.data(), &want[..], "{solver:?}: the f32 chain rounds differently somewhere (else this test checks nothing)");
    }
}

// ------------------------------------------------------------------------ half precision

/// Each node on f16 and bf16 inputs keeps the dtype (output and gradients) and agrees with the f32
/// node within the precision's tolerance (f16 ≤ 5e-3, bf16 ≤ 3e-2).
#[test]
fn fused_nodes_in_half_precision() {
    type Node = Box<dyn Fn(&[Var]) -> Var>;
    let gn: Node = Box::new(|v| gn_fused(v, 4, Act::Silu));
    let attn: Node = Box::new(|v| fused::attention(&v[0], 2, QkvOrder::Legacy).unwrap());
    let ode: Node = Box::new(|v| fused::ode_combine(&v[0], &[(0.3, &v[1]), (-0.6, &v[2])]).unwrap());
    let lk = loss_case(&[3, 2, 4, 4], 1000);
    let (lu, lw, lr) = (lk.u.clone(), lk.w.clone(), lk.vref.clone());
    let loss: Node = Box::new(move |v| fused::orw_loss(&v[0], &lu, &lw, Some(&lr), 0.4).unwrap().0);
    let cases: Vec<(&str, Vec<Tensor>, Node)> = vec![
        ("group_norm_act", gn_inputs(2, 8, &[5, 3], true, 1100), gn),
        ("flash_attention", vec![qkv(2, 2, 4, 19, 1200)], attn),
        ("ode_combine", (0..3).map(|i| r(&[2, 9, 5], 1300 + i)).collect(), ode),
        ("orw_loss", vec![lk.v.clone()], loss),
    ];
    for (name, inputs, f) in &cases {
        let run = |dt: DType| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::param(t.to_dtype(dt).unwrap())).collect();
            let out = f(&vars);
            let g = ops::sum_all(&ops::mul(&ops::to_dtype(&out, DType::F32).unwrap(), &Var::constant(r(&out.shape(), 5))).unwrap()).unwrap().backward().unwrap();
            let grads: Vec<Tensor> = vars.iter().map(|v| g.get(v).expect("gradient").clone()).collect();
            (out.value(), grads)
        };
        let (want, wgrads) = run(DType::F32);
        for (dt, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
            let (got, grads) = run(dt);
            let out_dt = if *name == "orw_loss" { DType::F32 } else { dt };
            assert_eq!(got.dtype(), out_dt, "{name} {dt}: output dtype");
            let e = got.rel_err(&want);
            let ge = grads.iter().zip(&wgrads).map(|(a, b)| a.rel_err(b)).fold(0.0, f64::max);
            eprintln!("{name} {dt}: value rel err {e:.2e}, gradient rel err {ge:.2e}");
            assert!(e <= tol && ge <= tol, "{name} {dt}: value {e:.3e}, gradients {ge:.3e} (tolerance {tol:e})");
            assert!(grads.iter().all(|g| g.dtype() == dt), "{name} {dt}: gradient dtypes");
        }
    }
}

// ------------------------------------------------------------------------ the U-Net's tape

fn count(names: &[&str], n: &str) -> usize {
    names.iter().filter(|&&x| x == n).count()
}

/// A two-level U-Net with scale-shift norms and attention at the second level: 8 ResBlocks
/// (input 2, middle 2, output 4) and 4 attention blocks (input 1, middle 1, output 2).
#[test]
fn unet_tape_runs_the_fused_nodes() {
    for new_order in [false, true] {
        for scale_shift in [false, true] {
            let cfg = UNetConfig {
                channel_mult: Some(vec![1.0, 2.0]),
                attention_resolutions: "4".into(),
                num_heads: 2,
                use_scale_shift_norm: scale_shift,
                use_new_attention_order: new_order,
                ..UNetConfig::new([1, 8, 8], 32, 1)
            };
            let model = UNetModel::new(&cfg, Init::Torch(3)).unwrap();
            let x = r(&[2, 1, 8, 8], 1400);
            let t = Tensor::from_vec(vec![0.3, 0.8], &[2]);
            let v = model.forward(&Var::constant(t), &Var::constant(x), None, &mut Forward { dropout_rng: None }).unwrap();
            let names = v.tape_names();
            let what = format!("new_order={new_order} scale_shift={scale_shift}");
            // in_layers and out_layers of each ResBlock, and the output head
            assert_eq!(count(&names, "group_norm_act"), 2 * 8 + 1, "{what}: {names:?}");
            assert_eq!(count(&names, "flash_attention"), 4, "{what}");
            // the attention blocks' own norm (no activation follows it) stays a plain GroupNorm
            assert_eq!(count(&names, "group_norm"), 4, "{what}");
            assert_eq!(count(&names, "qkv_attention"), 0, "{what}");
            // SiLU only in the time embedding (its MLP and the shared `emb_layers` input)
            assert_eq!(count(&names, "silu"), 2, "{what}");
            // and the backward reaches every parameter
            let g = ops::mean_all(&ops::square(&v).unwrap()).unwrap().backward().unwrap();
            assert!(model.params().vars().iter().all(|p| g.get(p).is_some()), "{what}: a parameter without gradient");
        }
    }
}

// ------------------------------------------------------------------------ convolution + add

/// `conv2d_add` (the ResBlock's `in_conv(h) + emb` and `skip + out_conv(h)`) against `conv2d`
/// then `add` on every CPU convolution path, for both addends: the values bit for bit (the sum
/// is the same one floating-point add, taken as the output is written), the gradients of all
/// four inputs equal; and the gradients by central differences on a small case.
#[test]
fn conv_add_node_matches_conv_then_add_on_every_path() {
    // (n, cin, cout, h, stride, k): F(4×4) Winograd, F(2×2) small image, batched im2col (4×4),
    // a 1×1 convolution, a stride-2 im2col, an F(2×2) 14×14
    let cases = [(2usize, 64usize, 64usize, 16usize, 1usize, 3usize), (4, 64, 64, 8, 1, 3), (4, 16, 24, 4, 1, 3), (2, 8, 12, 6, 1, 1), (2, 5, 7, 9, 2, 3), (2, 64, 64, 14, 1, 3)];
    for (i, &(n, cin, cout, h, stride, k)) in cases.iter().enumerate() {
        let pad = k / 2;
        let ho = (h + 2 * pad - k) / stride + 1;
        for per_channel in [false, true] {
            let a_shape = if per_channel { vec![n, cout, 1, 1] } else { vec![n, cout, ho, ho] };
            let seed = 100 + 10 * i as u64 + per_channel as u64;
            let inputs = vec![r(&[n, cin, h, h], seed), r(&[cout, cin, k, k], seed + 1), r(&[cout], seed + 2), r(&a_shape, seed + 3)];
            let fused = |v: &[Var]| ops::conv2d_add(&v[0], &v[1], Some(&v[2]), &v[3], stride, pad).unwrap();
            let unfused = |v: &[Var]| ops::add(&ops::conv2d(&v[0], &v[1], Some(&v[2]), stride, pad).unwrap(), &v[3]).unwrap();
            let what = format!("conv_add n{n} {cin}->{cout} {h}x{h} s{stride} k{k} per-channel {per_channel}");
            let (yf, yu) = (Tensor::conv2d_add(&inputs[0], &inputs[1], Some(&inputs[2]), &inputs[3], stride, pad).unwrap(), inputs[0].conv2d(&inputs[1], Some(&inputs[2]), stride, pad).unwrap().add(&inputs[3]).unwrap());
            assert_eq!(yf.shape(), yu.shape(), "{what}");
            assert!(yf.to_vec().iter().zip(yu.to_vec()).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: values differ");
            assert_parity(&what, compare(&inputs, &[0, 1, 2, 3], fused, unfused), 0.0, 1e-6);
        }
    }
    let inputs = vec![r(&[2, 3, 5, 5], 1), r(&[4, 3, 3, 3], 2), r(&[4], 3), r(&[2, 4, 1, 1], 4)];
    fd_check("conv_add per-channel", &inputs, &[0, 1, 2, 3], 1e-2, |v| ops::conv2d_add(&v[0], &v[1], Some(&v[2]), &v[3], 1, 1).unwrap());
    // a shape that is neither the output's nor [N, Cout, 1, 1] is refused
    assert!(Tensor::conv2d_add(&inputs[0], &inputs[1], None, &r(&[2, 4, 5, 1], 5), 1, 1).is_err());
}
