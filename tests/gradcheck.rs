//! Finite-difference gradient checks for every differentiable op.
//!
//! For an op `f` and random inputs, the loss is `L = Σ f(x) ⊙ g` with a fixed random `g`; the
//! tape's gradient is compared with central differences of `L` on sampled elements of every input.

mod common;

use orwcfm_fast::autograd::ops::*;
use orwcfm_fast::autograd::{Var, no_grad};
use orwcfm_fast::backend::cpu::attention::QkvOrder;
use orwcfm_fast::rng::Rng;
use orwcfm_fast::rng::philox::Philox;
use orwcfm_fast::tensor::Tensor;

/// Check `f`'s gradients with respect to every input (all elements up to 64, else 64 sampled).
fn check(name: &str, inputs: Vec<Tensor>, f: impl Fn(&[Var]) -> Var) {
    let all: Vec<usize> = (0..inputs.len()).collect();
    for (k, err, num) in common::finite_difference_errors(&inputs, &all, 3e-3, 0xC0FFEE, f) {
        let rel = err / num.max(1e-6);
        assert!(num > 0.0 || err == 0.0, "{name}: input {k} has an all-zero numeric gradient; the check would be empty");
        assert!(rel < 3e-3, "{name}: input {k}: gradient rel err {rel:.3e} (‖numeric‖ {num:.3e})");
    }
}

fn r(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, &mut Rng::new(seed))
}

#[test]
fn elementwise_broadcasting() {
    check("add", vec![r(&[2, 3, 4], 1), r(&[3, 1], 2)], |v| add(&v[0], &v[1]).unwrap());
    check("sub", vec![r(&[2, 3, 4], 3), r(&[2, 1, 4], 4)], |v| sub(&v[0], &v[1]).unwrap());
    check("mul", vec![r(&[2, 3, 4, 5], 5), r(&[2, 3, 1, 1], 6)], |v| mul(&v[0], &v[1]).unwrap());
    let pos = Tensor::from_vec(r(&[4, 3], 8).data().iter().map(|v| v.abs() + 0.5).collect(), &[4, 3]);
    check("div", vec![r(&[4, 3], 7), pos], |v| div(&v[0], &v[1]).unwrap());
    check("add_scalar", vec![r(&[5], 9)], |v| add_scalar(&v[0], 2.5).unwrap());
    check("mul_scalar", vec![r(&[5], 10)], |v| mul_scalar(&v[0], -1.5).unwrap());
}

#[test]
fn activations() {
    check("silu", vec![r(&[3, 7], 11)], |v| silu(&v[0]).unwrap());
    check("sigmoid", vec![r(&[3, 7], 12)], |v| sigmoid(&v[0]).unwrap());
    check("gelu", vec![r(&[3, 7], 13)], |v| gelu(&v[0]).unwrap());
    check("quick_gelu", vec![r(&[3, 7], 14)], |v| quick_gelu(&v[0]).unwrap());
    check("exp", vec![r(&[3, 7], 13)], |v| exp(&v[0]).unwrap());
    // keep values away from the kink at 0
    let x = Tensor::from_vec(r(&[3, 7], 14).data().iter().map(|&v| if v.abs() < 0.1 { v + 0.3 } else { v }).collect(), &[3, 7]);
    check("relu", vec![x], |v| relu(&v[0]).unwrap());
    check("square", vec![r(&[3, 7], 15)], |v| square(&v[0]).unwrap());
    check("softmax", vec![r(&[4, 9], 16)], |v| softmax(&v[0]).unwrap());
    check("log_softmax", vec![r(&[4, 9], 17)], |v| log_softmax(&v[0]).unwrap());
    check("cross_entropy", vec![r(&[5, 7], 18)], |v| cross_entropy(&v[0], &[0, 6, 3, 3, 1]).unwrap());
}

/// Cross-entropy against the formula −mean(log softmax(z).unwrap()[y]) in f64.
#[test]
fn cross_entropy_value() {
    let z = r(&[3, 4], 19);
    let y = [2usize, 0, 3];
    let got = cross_entropy(&Var::constant(z.clone()), &y).unwrap().value().item() as f64;
    let mut want = 0.0f64;
    for (i, &c) in y.iter().enumerate() {
        let row: Vec<f64> = z.data()[i * 4..i * 4 + 4].iter().map(|&v| v as f64).collect();
        let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
        want += (lse - row[c]) / 3.0;
    }
    assert!((got - want).abs() < 1e-6 * want.abs(), "{got} vs {want}");
}

#[test]
fn reductions_and_losses() {
    check("sum_all", vec![r(&[3, 4], 20)], |v| sum_all(&v[0]).unwrap());
    check("mean_all", vec![r(&[3, 4], 21)], |v| mean_all(&v[0]).unwrap());
    check("sum_axes keepdim", vec![r(&[2, 3, 4], 22)], |v| sum_axes(&v[0], &[0, 2], true).unwrap());
    check("sum_axes", vec![r(&[2, 3, 4], 23)], |v| sum_axes(&v[0], &[1], false).unwrap());
    check("mean_axes", vec![r(&[2, 3, 4], 24)], |v| mean_axes(&v[0], &[1, 2], false).unwrap());
    check("mse_loss", vec![r(&[2, 5], 25), r(&[2, 5], 26)], |v| mse_loss(&v[0], &v[1]).unwrap());
}

#[test]
fn shape_ops() {
    check("reshape", vec![r(&[2, 6], 30)], |v| reshape(&v[0], &[3, 4]).unwrap());
    check("permute", vec![r(&[2, 3, 4], 31)], |v| permute(&v[0], &[2, 0, 1]).unwrap());
    check("concat", vec![r(&[2, 3, 2], 32), r(&[2, 1, 2], 33)], |v| concat(&[v[0].clone(), v[1].clone()], 1).unwrap());
    check("narrow", vec![r(&[2, 6, 2], 34)], |v| narrow(&v[0], 1, 2, 3).unwrap());
    check("upsample_nearest2x", vec![r(&[2, 2, 3, 3], 35)], |v| upsample_nearest2x(&v[0]).unwrap());
    check("avg_pool2x", vec![r(&[2, 2, 4, 5], 36)], |v| avg_pool2x(&v[0]).unwrap());
}

#[test]
fn embeddings_and_dropout() {
    check("embedding", vec![r(&[5, 4], 40)], |v| embedding(&v[0], &[3, 0, 3, 4]).unwrap());
    check("timestep_embedding", vec![Tensor::from_vec(vec![0.1, 0.5, 0.93], &[3])], |v| timestep_embedding(&v[0], 9).unwrap());
    // the same seed gives the same mask in every evaluation, so the op is a fixed linear map
    check("dropout", vec![r(&[4, 16], 41)], |v| dropout(&v[0], 0.3, &mut Philox::new(99)).unwrap());
}

/// The dropout op's mask (drawn by the backend from a Philox stream): it keeps a fraction 1 − p
/// of the units within a binomial bound, with the value 1/(1 − p), and the gradient is the same
/// mask (regenerated from the draw's (seed, offset) in backward).
#[test]
fn dropout_mask_statistics_and_gradient() {
    let n = 1 << 16;
    let ones = Var::param(Tensor::full(&[n], 1.0));
    let mut s = Philox::new(2024);
    for p in [0.1f32, 0.3, 0.5] {
        let y = dropout(&ones, p, &mut s).unwrap();
        let yv = y.value();
        let scale = 1.0 / (1.0 - p);
        assert!(yv.data().iter().all(|&v| v == 0.0 || v == scale), "p {p}: values other than 0 and {scale}");
        let kept = yv.data().iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        let sd = (p as f64 * (1.0 - p as f64) / n as f64).sqrt();
        eprintln!("dropout op p {p}: kept {kept:.5}, want {:.2} ± {:.1e} (5 sd)", 1.0 - p, 5.0 * sd);
        assert!((kept - (1.0 - p as f64)).abs() < 5.0 * sd, "p {p}: kept {kept}");
        let g = y.backward_with(Tensor::full(&[n], 2.0)).unwrap();
        let gx = g.get(&ones).unwrap();
        assert!(gx.data().iter().zip(yv.data()).all(|(&d, &m)| d == 2.0 * m), "p {p}: the gradient is 2 · mask");
    }
}

#[test]
fn linear_algebra() {
    check("matmul", vec![r(&[3, 5], 50), r(&[5, 4], 51)], |v| matmul(&v[0], &v[1]).unwrap());
    check("linear", vec![r(&[3, 5], 52), r(&[4, 5], 53), r(&[4], 54)], |v| linear(&v[0], &v[1], Some(&v[2])).unwrap());
    check("linear no bias", vec![r(&[3, 5], 55), r(&[4, 5], 56)], |v| linear(&v[0], &v[1], None).unwrap());
}

#[test]
fn convolutions() {
    for (stride, pad, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 3)] {
        check(&format!("conv2d s{stride} p{pad} k{k}"), vec![r(&[2, 3, 7, 6], 60), mul_t(r(&[4, 3, k, k], 61), 0.5), r(&[4], 62)], |v| conv2d(&v[0], &v[1], Some(&v[2]), stride, pad).unwrap());
    }
    // 64 channels in and out: the Winograd path (forward, input and weight gradients)
    check("conv2d winograd", vec![r(&[2, 64, 5, 4], 65), mul_t(r(&[64, 64, 3, 3], 66), 0.05), r(&[64], 67)], |v| conv2d(&v[0], &v[1], Some(&v[2]), 1, 1).unwrap());
    check("conv2d no bias, batch 1", vec![r(&[1, 2, 5, 5], 63), r(&[3, 2, 3, 3], 64)], |v| conv2d(&v[0], &v[1], None, 1, 1).unwrap());
}

fn mul_t(t: Tensor, s: f32) -> Tensor {
    Tensor::from_vec(t.data().iter().map(|v| v * s).collect(), t.shape())
}

#[test]
fn group_norm_grads() {
    let mut w = r(&[8], 71);
    for v in w.data_mut() {
        *v += 1.0;
    }
    check("group_norm", vec![r(&[2, 8, 3, 3], 70), w, r(&[8], 72)], |v| group_norm(&v[0], &v[1], &v[2], 4, 1e-5).unwrap());
    check("group_norm 1 ch/group", vec![r(&[2, 4, 5], 73), r(&[4], 74), r(&[4], 75)], |v| group_norm(&v[0], &v[1], &v[2], 4, 1e-5).unwrap());
}

#[test]
fn attention_grads() {
    for order in [QkvOrder::Legacy, QkvOrder::New] {
        check(&format!("qkv_attention {order:?} 1 head"), vec![r(&[2, 12, 5], 80)], |v| qkv_attention(&v[0], 1, order).unwrap());
        check(&format!("qkv_attention {order:?} 2 heads"), vec![r(&[2, 12, 7], 81)], |v| qkv_attention(&v[0], 2, order).unwrap());
    }
}

/// The two attention orders differ (loading weights into the wrong one must not go unnoticed).
#[test]
fn attention_orders_differ() {
    let q = Var::constant(r(&[1, 12, 6], 90));
    let a = qkv_attention(&q, 2, QkvOrder::Legacy).unwrap().value();
    let b = qkv_attention(&q, 2, QkvOrder::New).unwrap().value();
    assert!(a.rel_err(&b) > 0.1);
}

/// Attention against a direct evaluation of the formula (softmax(qᵀk/√ch).unwrap() applied to v).
#[test]
fn attention_matches_formula() {
    let (b, heads, ch, t) = (2, 2, 3, 5);
    let qkv = r(&[b, 3 * heads * ch, t], 91);
    let out = qkv_attention(&Var::constant(qkv.clone()), heads, QkvOrder::Legacy).unwrap().value();
    let d = qkv.data();
    for bi in 0..b {
        for h in 0..heads {
            let base = bi * 3 * heads * ch * t + h * 3 * ch * t;
            let at = |part: usize, c: usize, s: usize| d[base + (part * ch + c) * t + s] as f64;
            for ti in 0..t {
                let logits: Vec<f64> = (0..t).map(|s| (0..ch).map(|c| at(0, c, ti) * at(1, c, s)).sum::<f64>() / (ch as f64).sqrt()).collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..ch {
                    let want: f64 = (0..t).map(|s| e[s] / z * at(2, c, s)).sum();
                    let got = out.data()[bi * heads * ch * t + (h * ch + c) * t + ti] as f64;
                    assert!((got - want).abs() < 1e-5, "b{bi} h{h} c{c} t{ti}: {got} vs {want}");
                }
            }
        }
    }
}

/// no_grad records nothing: results are not differentiable and hold no graph.
#[test]
fn no_grad_records_nothing() {
    let p = Var::param(r(&[3], 100));
    let y = no_grad(|| silu(&mul_scalar(&p, 2.0).unwrap()).unwrap());
    assert!(!y.requires_grad());
    assert!(y.is_leaf());
    let z = silu(&mul_scalar(&p, 2.0).unwrap()).unwrap();
    assert!(z.requires_grad());
}
