//! The optimiser over flat arenas (`Adam::step_flat`: the gradients gathered into one arena,
//! then clip scale + Adam + EMA as one pass) against the per-tensor path (`clip_grads_with_norm`,
//! `Adam::step`, `ema_update`) bit for bit on the CPU, and the arenas' views: the parameters are
//! zero-copy views of one storage that a step writes in place.

use orwcfm_fast::nn::ParamStore;
use orwcfm_fast::optim::{Adam, clip_coef, clip_grads_with_norm, ema_update, grad_norm};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

/// Shapes with a scalar, odd sizes, and one past the CPU's parallel threshold (several chunks).
const SHAPES: &[&[usize]] = &[&[3, 5], &[257], &[7, 3, 3, 3], &[1], &[70_001], &[]];

fn store(rng: &mut Rng) -> ParamStore {
    let mut s = ParamStore::new();
    for (i, sh) in SHAPES.iter().enumerate() {
        s.add(format!("p{i}"), Tensor::randn(sh, rng));
    }
    s
}

fn values(s: &ParamStore) -> Vec<Tensor> {
    s.vars().iter().map(|v| Tensor::from_vec(v.value().to_vec(), v.value().shape())).collect()
}

fn same_bits(what: &str, a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.shape(), y.shape(), "{what} {i}: shapes");
        let d = x.to_vec().iter().zip(y.to_vec()).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        assert_eq!(d, 0, "{what} {i}: {d} of {} values differ in their bits", x.numel());
    }
}

fn base(t: &Tensor) -> usize {
    t.data().as_ptr() as usize
}

#[test]
fn arena_pass_equals_per_tensor_adam_clip_ema_bit_for_bit() {
    for wd in [0.0f32, 0.01] {
        for max_norm in [None, Some(20.0f32)] {
            let mut r = Rng::new(11 + wd.to_bits() as u64 + max_norm.is_some() as u64);
            let net = store(&mut r);
            let ema = store(&mut r);
            let (mut p_old, mut e_old) = (values(&net), values(&ema));
            let (mut a_old, mut a_new) = (Adam::new(1e-2), Adam::new(1e-2));
            a_old.weight_decay = wd;
            a_new.weight_decay = wd;
            let (decay, mut clipped) = (0.95f32, 0);
            for step in 0..5 {
                // gradients of varying size: the norm crosses max_norm both ways
                let amp = [0.2f32, 1.0, 0.05, 0.7, 0.1][step];
                let grads: Vec<Tensor> = SHAPES.iter().map(|sh| Tensor::randn(sh, &mut r).mul_scalar(amp).unwrap()).collect();
                let lr = [0.0f32, 1e-2, 5e-3, 1e-2, 2e-2][step];
                let norm = grad_norm(&grads).unwrap();
                // the per-tensor path (the reference)
                let mut g_old = grads.clone();
                if let Some(m) = max_norm {
                    clip_grads_with_norm(&mut g_old, norm, m).unwrap();
                }
                a_old.step(&mut p_old, &g_old, lr).unwrap();
                ema_update(&mut e_old, &p_old, decay).unwrap();
                // the one pass
                let scale = max_norm.map_or(1.0, |m| clip_coef(norm, m));
                clipped += (scale < 1.0) as usize;
                a_new.step_flat(&net, &grads, lr, scale, Some((&ema, decay))).unwrap();
                let case = format!("wd {wd}, max norm {max_norm:?}, step {step}");
                same_bits(&format!("parameter ({case})"), &values(&net), &p_old);
                same_bits(&format!("EMA ({case})"), &values(&ema), &e_old);
                same_bits(&format!("exp_avg ({case})"), &a_new.exp_avg, &a_old.exp_avg);
                same_bits(&format!("exp_avg_sq ({case})"), &a_new.exp_avg_sq, &a_old.exp_avg_sq);
                assert_eq!(a_new.step, a_old.step);
            }
            if max_norm.is_some() {
                assert!((1..5).contains(&clipped), "clipping must be active in some steps and not in others ({clipped} of 5)");
            }
            eprintln!("wd {wd}, max norm {max_norm:?}: 5 steps bit-identical ({clipped} clipped)");
        }
    }
}

#[test]
fn parameters_are_views_of_one_arena_written_in_place() {
    let mut r = Rng::new(3);
    let net = store(&mut r);
    let ema = store(&mut r);
    let mut adam = Adam::new(1e-3);
    let grads = |r: &mut Rng| SHAPES.iter().map(|sh| Tensor::randn(sh, r)).collect::<Vec<_>>();
    adam.step_flat(&net, &grads(&mut r), 1e-3, 1.0, Some((&ema, 0.9))).unwrap();
    assert!(net.arena_held() && ema.arena_held());
    let arena = net.arena().unwrap();
    assert_eq!(arena.flat().numel(), net.count());
    let start = base(arena.flat());
    // each parameter is the view at its offset: same memory, no copy
    for (v, (off, shape)) in net.vars().iter().zip(arena.layout().parts()) {
        assert_eq!(v.value().shape(), shape.as_slice());
        assert_eq!(base(&v.value()), start + 4 * off, "parameter at offset {off} is not a view of the arena");
    }
    drop(arena);
    let (m0, e0) = (base(&adam.exp_avg[0]), base(&ema.var(0).value()));
    for _ in 0..3 {
        adam.step_flat(&net, &grads(&mut r), 1e-3, 0.5, Some((&ema, 0.9))).unwrap();
        assert_eq!(base(&net.var(0).value()), start, "a step moved the parameter arena (a copy)");
        assert_eq!(base(&adam.exp_avg[0]), m0, "a step moved the moment arena");
        assert_eq!(base(&ema.var(0).value()), e0, "a step moved the EMA arena");
    }
    // a copy of the model (a policy snapshot) shares the arena; the next step copies it once
    // and leaves the copy's values alone (copy on write), then runs in place again
    let policy = net.clone();
    let before = values(&policy);
    adam.step_flat(&net, &grads(&mut r), 1e-3, 1.0, None).unwrap();
    same_bits("policy after a step of the model", &values(&policy), &before);
    let moved = base(&net.var(0).value());
    assert_ne!(moved, start, "the shared arena was written in place under the policy copy");
    drop(policy);
    adam.step_flat(&net, &grads(&mut r), 1e-3, 1.0, None).unwrap();
    assert_eq!(base(&net.var(0).value()), moved, "after the copy is gone the arena is written in place");
}

#[test]
fn replaced_values_are_gathered_back_into_the_arena() {
    let mut r = Rng::new(5);
    let net = store(&mut r);
    let mut adam = Adam::new(1e-3);
    let grads: Vec<Tensor> = SHAPES.iter().map(|sh| Tensor::randn(sh, &mut r)).collect();
    adam.step_params(&net, &grads, 1e-3).unwrap();
    assert!(net.arena_held());
    // a load replaces values; the store is out of its arena until the next step gathers it
    let mut named: Vec<(String, Tensor)> = net.tensors();
    named[1].1 = Tensor::randn(SHAPES[1], &mut r);
    let mut reference = values(&net);
    reference[1] = named[1].1.clone();
    let mut fresh = store(&mut r);
    fresh.load_strict(named).unwrap();
    let _ = &mut fresh;
    net.set_all(fresh.vars().iter().map(|v| v.value()).collect());
    assert!(!net.arena_held());
    // the moments too: as loaded from a checkpoint, per parameter
    adam.exp_avg = adam.exp_avg.iter().map(|m| Tensor::from_vec(m.to_vec(), m.shape())).collect();
    adam.exp_avg_sq = adam.exp_avg_sq.iter().map(|m| Tensor::from_vec(m.to_vec(), m.shape())).collect();
    let mut old = Adam::new(1e-3);
    old.step = adam.step;
    old.exp_avg = adam.exp_avg.iter().map(|m| Tensor::from_vec(m.to_vec(), m.shape())).collect();
    old.exp_avg_sq = adam.exp_avg_sq.iter().map(|m| Tensor::from_vec(m.to_vec(), m.shape())).collect();
    adam.step_params(&net, &grads, 1e-3).unwrap();
    old.step(&mut reference, &grads, 1e-3).unwrap();
    assert!(net.arena_held());
    same_bits("parameters after a reload", &values(&net), &reference);
    same_bits("exp_avg after a reload", &adam.exp_avg, &old.exp_avg);
}
