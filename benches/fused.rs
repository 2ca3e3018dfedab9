//! The fused tape nodes against the unfused compositions they replace, forward and backward, at
//! the U-Net's shapes (torchcfm's MNIST and CIFAR-10 configs at batch 4): each op runs through
//! the same dispatch as on the tape (`Tensor::apply_custom`, `Tensor::custom_backward`), once as
//! the fused CPU node and once as its composition of today's tensor ops (`Composed`).
//!
//! `cargo bench --bench fused [-- FILTER]`; prints the best and the median of the repeats, in ms
//! of CPU time summed over the process's threads (`CLOCK_PROCESS_CPUTIME_ID`; wall time elsewhere), which
//! a machine shared with other work disturbs much less than wall time. Run it with
//! `RAYON_NUM_THREADS=1` for per-kernel cost without rayon's idle spinning.

use std::time::Instant;

use orwcfm_fast::autograd::custom::{Composed, CustomOp};
use orwcfm_fast::autograd::fused::{Act, Attention, GroupNormAct, OdeCombine, OrwLossOp};
use orwcfm_fast::backend::QkvOrder;
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

const REPEATS: usize = 15;

/// Nanoseconds on a CPU, summed over this process's threads (`CLOCK_PROCESS_CPUTIME_ID`).
fn cpu_ns() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid clock id and a valid out-pointer
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
        }
    }
    None
}

/// (best, median) milliseconds of `f` after one warm-up call.
fn time(f: &mut dyn FnMut()) -> (f64, f64) {
    f();
    let mut ms: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_ns());
            f();
            match (c, cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 * 1e-6,
                _ => t.elapsed().as_secs_f64() * 1e3,
            }
        })
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (ms[0], ms[REPEATS / 2])
}

/// Forward and backward of `op` on `xs` (every input needing a gradient, as `need` says).
fn fwd_bwd<O: CustomOp>(op: &O, xs: &[Tensor], need: &[bool], g: &Tensor) -> ((f64, f64), (f64, f64)) {
    let refs: Vec<&Tensor> = xs.iter().collect();
    let fwd = time(&mut || drop(Tensor::apply_custom(op, &refs, need).unwrap()));
    let saved = Tensor::apply_custom(op, &refs, need).unwrap().saved;
    let bwd = time(&mut || drop(Tensor::custom_backward(op, xs, &saved, g, need).unwrap()));
    (fwd, bwd)
}

fn compare<O: CustomOp + Clone>(filter: &str, what: &str, op: O, xs: Vec<Tensor>, need: &[bool]) {
    if !what.contains(filter) {
        return;
    }
    let refs: Vec<&Tensor> = xs.iter().collect();
    let out = Tensor::apply_custom(&op, &refs, need).unwrap().out;
    let g = Tensor::randn(out.shape(), &mut Rng::new(99));
    let (ff, fb) = fwd_bwd(&op, &xs, need, &g);
    let (uf, ub) = fwd_bwd(&Composed(op), &xs, need, &g);
    println!(
        "{what:<44} fused fwd {:>7.2} ({:>7.2}) bwd {:>7.2} ({:>7.2}) | unfused fwd {:>7.2} ({:>7.2}) bwd {:>7.2} ({:>7.2}) | fused/unfused fwd+bwd {:.2}",
        ff.0,
        ff.1,
        fb.0,
        fb.1,
        uf.0,
        uf.1,
        ub.0,
        ub.1,
        (ff.0 + fb.0) / (uf.0 + ub.0)
    );
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_default();
    let mut r = Rng::new(1);
    let mut rn = |s: &[usize]| Tensor::randn(s, &mut r);
    println!("best (median) of {REPEATS}, ms of {}, {} threads", if cpu_ns().is_some() { "CPU time" } else { "wall time" }, rayon::current_num_threads());

    // GroupNorm + SiLU: MNIST 28x28 with 64 channels, CIFAR-10 32x32 x 128 and 16x16 x 256; with scale-shift
    for &(n, c, h) in &[(4usize, 64usize, 28usize), (4, 128, 32), (4, 256, 16)] {
        let op = GroupNormAct { groups: 32, eps: 1e-5, act: Act::Silu };
        compare(&filter, &format!("group_norm_act silu [{n},{c},{h},{h}]"), op, vec![rn(&[n, c, h, h]), rn(&[c]), rn(&[c])], &[true; 3]);
    }
    let op = GroupNormAct { groups: 32, eps: 1e-5, act: Act::Silu };
    compare(&filter, "group_norm_act scale-shift silu [4,128,32,32]", op, vec![rn(&[4, 128, 32, 32]), rn(&[128]), rn(&[128]), rn(&[4, 128]), rn(&[4, 128])], &[true; 5]);

    // attention: MNIST at 28x28 (1 head of 32, T 784) and 7x7 (64 channels, T 49); CIFAR-10 at 16x16 (4 heads of 64, T 256)
    for &(b, heads, ch, t) in &[(4usize, 1usize, 32usize, 784usize), (4, 1, 64, 49), (4, 4, 64, 256), (8, 4, 32, 256)] {
        for order in [QkvOrder::Legacy, QkvOrder::New] {
            let x = rn(&[b, 3 * heads * ch, t]).mul_scalar(2.0).unwrap();
            compare(&filter, &format!("flash_attention b{b} h{heads} ch{ch} t{t} {order:?}"), Attention { heads, order }, vec![x], &[true]);
        }
    }

    // the ORW loss at CIFAR-10 batch 64 (3x32x32) and MNIST batch 128, with the W2 term
    for &(b, c, h) in &[(64usize, 3usize, 32usize), (128, 1, 28)] {
        let s = [b, c, h, h];
        let w = Tensor::rand_uniform(&[b], 0.2, 2.0, &mut Rng::new(5));
        compare(&filter, &format!("orw_loss [{b},{c},{h},{h}]"), OrwLossOp { alpha: 0.3 }, vec![rn(&s), rn(&s), w, rn(&s)], &[true, false, false, false]);
    }

    // RK4's last combination (4 slopes) and Euler's (1) on a CIFAR-10 batch of 64
    let s = [64, 3, 32, 32];
    compare(&filter, "ode_combine rk4 [64,3,32,32]", OdeCombine { coeffs: vec![0.01, 0.03, 0.03, 0.01] }, vec![rn(&s), rn(&s), rn(&s), rn(&s), rn(&s)], &[true; 5]);
    compare(&filter, "ode_combine euler [64,3,32,32]", OdeCombine { coeffs: vec![0.01] }, vec![rn(&s), rn(&s)], &[true; 2]);
}
