//! Exact OT pairing (src/flow/ot.rs): the assignment solver against brute force, SciPy and POT,
//! the batch pairing, plan sampling, and timing at n = 1024.

mod common;

use std::time::Instant;

use common::{bits_f64, fixture_path};
use orwcfm_fast::flow::ot::*;
use orwcfm_fast::io::safetensors::load;
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

fn total(cost: &[f64], n: usize, perm: &[usize]) -> f64 {
    perm.iter().enumerate().map(|(i, &j)| cost[i * n + j]).sum()
}

fn assert_permutation(perm: &[usize], n: usize) {
    assert_eq!(perm.len(), n);
    let mut seen = vec![false; n];
    for &j in perm {
        assert!(j < n, "column {j} out of range");
        assert!(!seen[j], "column {j} used twice");
        seen[j] = true;
    }
}

/// Minimum total over all n! permutations (Heap's algorithm).
fn brute_force_min(cost: &[f64], n: usize) -> f64 {
    let mut p: Vec<usize> = (0..n).collect();
    let mut best = total(cost, n, &p);
    let mut c = vec![0usize; n];
    let mut i = 0;
    while i < n {
        if c[i] < i {
            if i % 2 == 0 {
                p.swap(0, i)
            } else {
                p.swap(c[i], i)
            }
            best = best.min(total(cost, n, &p));
            c[i] += 1;
            i = 0;
        } else {
            c[i] = 0;
            i += 1;
        }
    }
    best
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn linear_assignment_matches_brute_force() {
    let mut rng = Rng::new(7);
    let mut checked = 0;
    for n in 1..=7usize {
        let seeds = if n <= 5 { 200 } else { 40 };
        for s in 0..seeds {
            // Four kinds of matrices: continuous with negatives, small integers (many ties),
            // a few distinct values (massive ties), and a constant matrix.
            let cost: Vec<f64> = match s % 4 {
                0 => (0..n * n).map(|_| rng.uniform_f64() * 20.0 - 10.0).collect(),
                1 => (0..n * n).map(|_| rng.below(7) as f64 - 3.0).collect(),
                2 => (0..n * n).map(|_| if rng.below(2) == 0 { -1.0 } else { 2.0 }).collect(),
                _ => vec![-(s as f64); n * n],
            };
            let perm = linear_assignment(&cost, n);
            assert_permutation(&perm, n);
            let got = total(&cost, n, &perm);
            let want = brute_force_min(&cost, n);
            assert!(close(got, want, 1e-12), "n={n} seed={s}: total {got} vs brute force {want}; cost {cost:?}");
            assert_eq!(assignment_cost(&cost, n, &perm), got);
            checked += 1;
        }
    }
    assert_eq!(linear_assignment(&[], 0), Vec::<usize>::new());
    println!("brute force: {checked} matrices checked");
}

#[test]
fn linear_assignment_finds_anti_diagonal_deterministically() {
    // A matrix whose optimum is the anti-diagonal.
    let n = 6;
    let cost: Vec<f64> = (0..n * n).map(|k| if k / n + k % n == n - 1 { 0.0 } else { 1.0 }).collect();
    let perm = linear_assignment(&cost, n);
    assert_eq!(perm, (0..n).rev().collect::<Vec<_>>());
    assert_eq!(linear_assignment(&cost, n), perm);
}

#[test]
#[should_panic]
fn linear_assignment_rejects_nan() {
    linear_assignment(&[0.0, f64::NAN, 1.0, 2.0], 2);
}

#[test]
fn sq_euclidean_cost_is_exact_on_small_inputs() {
    let a = [0.0f32, 0.0, 1.0, 2.0, -1.0, 0.5];
    let b = [1.0f32, 1.0, 3.0, -2.0];
    let c = sq_euclidean_cost(&a, &b, 3, 2, 2);
    assert_eq!(c, vec![2.0, 13.0, 1.0, 20.0, 4.25, 22.25]);
    // Long rows (exercise the chunked loop and its remainder) against a plain f64 sum.
    let mut rng = Rng::new(3);
    let (n, m, d) = (5, 4, 37);
    let a = rng.normal_vec(n * d);
    let b = rng.normal_vec(m * d);
    let c = sq_euclidean_cost(&a, &b, n, m, d);
    for i in 0..n {
        for j in 0..m {
            let want: f64 = (0..d).map(|k| ((a[i * d + k] as f64) - (b[j * d + k] as f64)).powi(2)).sum();
            assert!(close(c[i * m + j], want, 1e-14));
        }
    }
}

#[test]
fn linear_assignment_matches_scipy_and_pot() {
    let f = load(&fixture_path("ot_scipy.safetensors")).expect("fixture (scripts/export_ot_fixture.py)");
    for name in ["n16", "n64", "n256"] {
        let x0 = f.get(&format!("{name}_x0")).unwrap();
        let x1 = f.get(&format!("{name}_x1")).unwrap();
        let (n, d) = (x0.dim(0), x0.dim(1));
        let cost = sq_euclidean_cost(x0.data(), x1.data(), n, n, d);
        let perm = linear_assignment(&cost, n);
        assert_permutation(&perm, n);
        let ours = total(&cost, n, &perm);
        let scipy = bits_f64(f.get_int(&format!("{name}_total")).unwrap().1);
        let (_, sp) = f.get_int(&format!("{name}_perm")).unwrap();
        let sp: Vec<usize> = sp.iter().map(|&j| j as usize).collect();
        let scipy_rust = total(&cost, n, &sp);
        println!("{name}: ours {ours:.17} scipy {scipy:.17} (scipy perm in Rust cost {scipy_rust:.17}); same perm: {}", perm == sp);
        assert!(close(ours, scipy, 1e-9), "{name}: {ours} vs scipy {scipy}");
        assert!(ours <= scipy_rust * (1.0 + 1e-12), "{name}: scipy's assignment is cheaper");
        // The pairing of the tensors directly gives the same optimum.
        let p2 = exact_ot_pairing(x0, x1).unwrap();
        assert_eq!(p2, perm);
        if name == "n64"
            && let Some((_, pot)) = f.get_int("pot_total")
        {
            let pot = bits_f64(pot);
            println!("n64: POT ot.emd total*n {pot:.17}");
            assert!(close(ours, pot, 1e-9), "n64: {ours} vs POT {pot}");
        }
    }
    // Integer costs with many ties: exact.
    let (shape, c) = f.get_int("int64_cost").unwrap();
    let n = shape[0];
    let cost: Vec<f64> = c.iter().map(|&v| v as f64).collect();
    let perm = linear_assignment(&cost, n);
    assert_permutation(&perm, n);
    let want = f.get_int("int64_total").unwrap().1[0] as f64;
    assert_eq!(total(&cost, n, &perm), want);
}

#[test]
fn exact_ot_pairing_reduces_transport_cost() {
    let mut rng = Rng::new(11);
    for &(n, shape) in &[(32usize, [1usize, 4, 4]), (100, [3, 2, 5])] {
        let x0 = Tensor::randn(&[n, shape[0], shape[1], shape[2]], &mut rng);
        let x1 = Tensor::rand_uniform(&[n, shape[0], shape[1], shape[2]], -2.0, 3.0, &mut rng);
        let perm = exact_ot_pairing(&x0, &x1).unwrap();
        assert_permutation(&perm, n);
        let d = shape.iter().product();
        let cost = sq_euclidean_cost(x0.data(), x1.data(), n, n, d);
        let id: Vec<usize> = (0..n).collect();
        let (ot, ident) = (total(&cost, n, &perm), total(&cost, n, &id));
        println!("n={n}: OT cost {ot:.3} vs identity {ident:.3}");
        assert!(ot < ident);
        // No pairwise swap improves it (a necessary optimality condition).
        for i in 0..n {
            for k in i + 1..n {
                let swapped = cost[i * n + perm[k]] + cost[k * n + perm[i]];
                assert!(swapped >= cost[i * n + perm[i]] + cost[k * n + perm[k]] - 1e-9);
            }
        }
    }
    // Identical batches pair with themselves.
    let x = Tensor::randn(&[20, 7], &mut rng);
    assert_eq!(exact_ot_pairing(&x, &x).unwrap(), (0..20).collect::<Vec<_>>());
    // A shuffled copy is un-shuffled.
    let mut shuffle: Vec<usize> = (0..20).collect();
    for i in (1..20).rev() {
        shuffle.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let xs: Vec<f32> = shuffle.iter().flat_map(|&j| x.data()[j * 7..(j + 1) * 7].to_vec()).collect();
    let xs = Tensor::from_vec(xs, &[20, 7]);
    let perm = exact_ot_pairing(&xs, &x).unwrap();
    assert_eq!(perm, shuffle);
    // Shape mismatches are errors.
    let a = Tensor::zeros(&[4, 3]);
    assert!(exact_ot_pairing(&a, &Tensor::zeros(&[5, 3])).is_err());
    assert!(exact_ot_pairing(&a, &Tensor::zeros(&[4, 2])).is_err());
    assert!(exact_ot_pairing(&a, &Tensor::zeros(&[4, 3, 2])).is_err());
    assert!(exact_ot_pairing(&Tensor::scalar(1.0), &Tensor::scalar(1.0)).is_err());
    // Same batch size and element count but different sample shape: flattened, allowed.
    assert!(exact_ot_pairing(&Tensor::zeros(&[4, 6]), &Tensor::zeros(&[4, 2, 3])).is_ok());
    assert_eq!(exact_ot_pairing(&Tensor::zeros(&[0, 3]), &Tensor::zeros(&[0, 3])).unwrap(), Vec::<usize>::new());
}

#[test]
fn sample_plan_with_replacement_draws_plan_entries_uniformly() {
    let n = 16;
    let mut rng = Rng::new(5);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let pairs = sample_plan_with_replacement(&perm, n, &mut Rng::new(42));
    assert_eq!(pairs.len(), n);
    for &(i, j) in &pairs {
        assert!(i < n);
        assert_eq!(j, perm[i]);
    }
    assert_eq!(pairs, sample_plan_with_replacement(&perm, n, &mut Rng::new(42)));
    assert_ne!(pairs, sample_plan_with_replacement(&perm, n, &mut Rng::new(43)));
    // With replacement: some index repeats in a batch of 16 (almost surely).
    let mut r = Rng::new(9);
    let mut any_repeat = false;
    let mut counts = vec![0usize; n];
    let draws = 20_000;
    for _ in 0..draws {
        let pairs = sample_plan_with_replacement(&perm, n, &mut r);
        let mut seen = vec![false; n];
        for &(i, j) in &pairs {
            assert_eq!(j, perm[i]);
            counts[i] += 1;
            any_repeat |= std::mem::replace(&mut seen[i], true);
        }
    }
    assert!(any_repeat);
    let total_draws = (draws * n) as f64;
    let expect = total_draws / n as f64; // 20 000 per index
    for (i, &c) in counts.iter().enumerate() {
        // Binomial sd ≈ sqrt(320000 · 1/16 · 15/16) ≈ 137; allow 5 sd.
        assert!((c as f64 - expect).abs() < 5.0 * (expect * (1.0 - 1.0 / n as f64)).sqrt(), "index {i}: {c} vs {expect}");
    }
    assert!(sample_plan_with_replacement(&perm, 0, &mut r).is_empty());
    // Drawing more pairs than the plan has rows is allowed.
    assert_eq!(sample_plan_with_replacement(&perm, 40, &mut r).len(), 40);
}

fn time_case(n: usize, d: usize, seed: u64) -> (f64, f64, f64) {
    let mut rng = Rng::new(seed);
    let x0 = Tensor::randn(&[n, d], &mut rng);
    let x1 = Tensor::rand_uniform(&[n, d], 0.0, 1.0, &mut rng);
    let t0 = Instant::now();
    let cost = sq_euclidean_cost(x0.data(), x1.data(), n, n, d);
    let t_cost = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let perm = linear_assignment(&cost, n);
    let t_lap = t1.elapsed().as_secs_f64();
    assert_permutation(&perm, n);
    let t2 = Instant::now();
    let p2 = exact_ot_pairing(&x0, &x1).unwrap();
    let t_all = t2.elapsed().as_secs_f64();
    assert_eq!(p2, perm);
    // Random uniform costs (no geometry) are the harder case for the solver.
    let rc: Vec<f64> = (0..n * n).map(|_| rng.uniform_f64()).collect();
    let t3 = Instant::now();
    let rp = linear_assignment(&rc, n);
    let t_rand = t3.elapsed().as_secs_f64();
    assert_permutation(&rp, n);
    println!("n={n} d={d}: cost {:.3} ms, assignment {:.3} ms, exact_ot_pairing {:.3} ms; random uniform {n}x{n} cost matrix: assignment {:.3} ms", t_cost * 1e3, t_lap * 1e3, t_all * 1e3, t_rand * 1e3);
    (t_cost, t_lap, t_all.max(t_rand))
}

#[test]
fn timing_n256_and_n1024() {
    time_case(256, 784, 1);
    let (_, _, worst) = time_case(1024, 784, 2);
    assert!(worst < 20.0, "n=1024 took {worst} s");
}
