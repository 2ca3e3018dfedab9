//! CPU time of the optimiser part of a training step (clip + Adam + EMA) for the default MNIST
//! U-Net (`UNetConfig::mnist_small`): the per-tensor path (`clip_grads_with_norm`, `Adam::step`,
//! `ema_update`, as the trainer ran before flat arenas) against the one pass over flat arenas
//! (`Adam::step_flat`, gradient gather included), interleaved in one process.
//! `cargo bench --bench optim`.

use std::time::Instant;

use orwcfm_fast::nn::{Init, UNetConfig, UNetModel};
use orwcfm_fast::optim::{Adam, clip_coef, clip_grads_with_norm, ema_update, grad_norm};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

fn deep(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(|t| Tensor::from_vec(t.to_vec(), t.shape())).collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let cfg = UNetConfig::mnist_small();
    let net = UNetModel::new(&cfg, Init::Torch(0)).unwrap();
    let ema = net.clone();
    let vals: Vec<Tensor> = net.params().tensors().into_iter().map(|t| t.1).collect();
    net.params().set_all(deep(&vals));
    ema.params().set_all(deep(&vals));
    let (mut p_old, mut e_old) = (deep(&vals), deep(&vals));
    let mut r = Rng::new(1);
    let grads: Vec<Tensor> = vals.iter().map(|t| Tensor::randn(t.shape(), &mut r)).collect();
    let norm = grad_norm(&grads).unwrap();
    let (max_norm, lr, decay) = (1.0f32, 1e-4f32, 0.9999f32);
    let (mut a_old, mut a_new) = (Adam::new(lr), Adam::new(lr));
    let n = net.params().count();
    println!("optimiser step of the MNIST U-Net (mnist_small): {} tensors, {n} parameters, {} rayon threads", vals.len(), rayon::current_num_threads());
    let old = |p: &mut Vec<Tensor>, e: &mut Vec<Tensor>, a: &mut Adam| {
        let mut g = grads.clone();
        clip_grads_with_norm(&mut g, norm, max_norm).unwrap();
        a.step(p, &g, lr).unwrap();
        ema_update(e, p, decay).unwrap();
    };
    let new = |a: &mut Adam| a.step_flat(net.params(), &grads, lr, clip_coef(norm, max_norm), Some((ema.params(), decay))).unwrap();
    // warm-up: moments allocated, arenas gathered
    for _ in 0..3 {
        old(&mut p_old, &mut e_old, &mut a_old);
        new(&mut a_new);
    }
    let (rounds, per) = (15, 10);
    let (mut t_old, mut t_new) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per {
            old(&mut p_old, &mut e_old, &mut a_old);
        }
        t_old.push(t.elapsed().as_secs_f64() * 1e3 / per as f64);
        let t = Instant::now();
        for _ in 0..per {
            new(&mut a_new);
        }
        t_new.push(t.elapsed().as_secs_f64() * 1e3 / per as f64);
    }
    let (mo, mn) = (median(&mut t_old), median(&mut t_new));
    let (lo_o, hi_o) = (t_old[0], t_old[rounds - 1]);
    let (lo_n, hi_n) = (t_new[0], t_new[rounds - 1]);
    println!("per-tensor clip + Adam + EMA: median {mo:.3} ms/step (range {lo_o:.3}–{hi_o:.3}, {rounds} rounds of {per})");
    println!("flat arenas, one pass:        median {mn:.3} ms/step (range {lo_n:.3}–{hi_n:.3}), gradient gather included");
    println!("speed-up {:.2}x", mo / mn);
    // same results, bit for bit (both ran the same steps on the same values)
    let same = net.params().vars().iter().zip(&p_old).all(|(a, b)| a.value().to_vec().iter().zip(b.to_vec()).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert!(same, "the two paths diverged");
    println!("both paths bit-identical after {} steps", a_new.step);
}
