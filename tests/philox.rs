//! The Philox4x32-10 generator of `rng::philox`: Random123's known answers, the documented
//! element → (block, lane) layout, independence of chunking, thread count and call splitting,
//! the state round trip, and the statistics of uniforms, normals and dropout masks.
//! (Its CUDA kernels are checked against it in tests/kernels_on_cpu.rs.)

use orwcfm_fast::rng::philox::{self, Philox, block, blocks_for, counter, dropout, dropout_mask, fill_normal, fill_uniform, key, philox4x32_10};

/// Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key, result).
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    ([0; 4], [0; 2], [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]),
    ([0xffff_ffff; 4], [0xffff_ffff; 2], [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]),
    ([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0], [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]),
];

/// Element `i` of the draw `(seed, offset)` computed alone, from the module doc's layout.
fn element_u32(seed: u64, offset: u64, i: usize) -> u32 {
    let b = offset.wrapping_add((i / 4) as u64);
    let ctr = [b as u32, (b >> 32) as u32, 0, 0];
    let k = [seed as u32, (seed >> 32) as u32];
    philox4x32_10(ctr, k)[i % 4]
}

fn uniform(seed: u64, offset: u64, n: usize) -> Vec<f32> {
    let mut v = vec![f32::NAN; n];
    fill_uniform(seed, offset, &mut v);
    v
}
fn normal(seed: u64, offset: u64, n: usize) -> Vec<f32> {
    let mut v = vec![f32::NAN; n];
    fill_normal(seed, offset, &mut v);
    v
}
fn mask(seed: u64, offset: u64, p: f32, n: usize) -> Vec<f32> {
    let mut v = vec![f32::NAN; n];
    dropout_mask(seed, offset, p, &mut v);
    v
}
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn random123_known_answer_vectors() {
    for (c, k, want) in KAT {
        assert_eq!(philox4x32_10(c, k), want, "counter {c:08x?} key {k:08x?}");
    }
}

#[test]
fn key_and_counter_layout() {
    assert_eq!(key(0x299f_31d0_a409_3822), [0xa409_3822, 0x299f_31d0]);
    assert_eq!(counter(0x85a3_08d3_243f_6a88), [0x243f_6a88, 0x85a3_08d3, 0, 0]);
    let (seed, b) = (0x0123_4567_89ab_cdef_u64, 0xffff_ffff_ffff_fffe_u64);
    assert_eq!(block(seed, b), philox4x32_10([0xffff_fffe, 0xffff_ffff, 0, 0], [0x89ab_cdef, 0x0123_4567]));
    // the uniforms are the top 24 bits of the lanes, element i = lane i % 4 of block offset + i / 4
    let (seed, off, n) = (42u64, 7u64, 1001usize);
    let u = uniform(seed, off, n);
    for (i, &x) in u.iter().enumerate() {
        assert_eq!(x, (element_u32(seed, off, i) >> 8) as f32 / 16_777_216.0, "element {i}");
    }
    // the offset wraps around 2^64 like the counter
    let w = uniform(seed, u64::MAX, 8);
    assert_eq!(bits(&w[4..]), bits(&uniform(seed, 0, 4)));
}

#[test]
fn normals_are_box_muller_of_the_lane_pairs() {
    let (seed, off, n) = (0xdead_beef_u64, 3u64, 4003usize);
    let z = normal(seed, off, n);
    let mut worst = 0.0f64;
    for (i, &zi) in z.iter().enumerate() {
        let pair = i & !1;
        let (a, b) = (element_u32(seed, off, pair), element_u32(seed, off, pair + 1));
        let u1 = ((a >> 8) + 1) as f64 / 16_777_216.0;
        let u2 = (b >> 8) as f64 / 16_777_216.0;
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        let want = if i % 2 == 0 { r * th.cos() } else { r * th.sin() };
        worst = worst.max((zi as f64 - want).abs());
    }
    // f32 evaluation against f64: 2π u2 rounds (≤ 2⁻²² absolute in θ) times r ≤ 5.8
    assert!(worst < 5e-6, "worst |f32 − f64| {worst:e}");
    println!("Box–Muller f32 vs f64: worst absolute difference {worst:.2e} over {n}");
}

#[test]
fn any_block_aligned_part_can_be_drawn_alone() {
    let (seed, off, n) = (9u64, 1u64 << 40, 2051usize);
    let full_u = uniform(seed, off, n);
    let full_z = normal(seed, off, n);
    let full_m = mask(seed, off, 0.3, n);
    for k in [0usize, 1, 2, 17, 250, 511, 512] {
        let s = 4 * k;
        assert_eq!(bits(&uniform(seed, off + k as u64, n - s)), bits(&full_u[s..]), "uniform from block {k}");
        assert_eq!(bits(&normal(seed, off + k as u64, n - s)), bits(&full_z[s..]), "normal from block {k}");
        assert_eq!(bits(&mask(seed, off + k as u64, 0.3, n - s)), bits(&full_m[s..]), "mask from block {k}");
        // and a prefix is the start of the longer draw
        assert_eq!(bits(&uniform(seed, off, s + 3)), bits(&full_u[..s + 3]), "uniform prefix {}", s + 3);
        assert_eq!(bits(&normal(seed, off, s + 1)), bits(&full_z[..s + 1]), "normal prefix {}", s + 1);
    }
}

#[test]
fn large_draws_do_not_depend_on_the_thread_count() {
    // long enough for the parallel path (several rayon chunks and a ragged end)
    let n = 300_001usize;
    let (seed, off) = (0x5eed_u64, 12_345u64);
    let reference_u: Vec<u32> = (0..n).map(|i| element_u32(seed, off, i) >> 8).collect();
    type Draws = (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>);
    let mut first: Option<Draws> = None;
    for threads in [1usize, 2, 3, 7] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let got = pool.install(|| {
            let x: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3 - 7.0).collect();
            let mut y = vec![f32::NAN; n];
            let mut m = vec![f32::NAN; n];
            dropout(seed, off, 0.25, &x, &mut y, Some(&mut m));
            let mut y2 = vec![f32::NAN; n];
            dropout(seed, off, 0.25, &x, &mut y2, None);
            assert_eq!(bits(&y), bits(&y2), "dropout with and without the mask, {threads} threads");
            (bits(&uniform(seed, off, n)), bits(&normal(seed, off, n)), bits(&mask(seed, off, 0.25, n)), bits(&y))
        });
        let top: Vec<u32> = got.0.iter().map(|&b| (f32::from_bits(b) * 16_777_216.0) as u32).collect();
        assert_eq!(top, reference_u, "uniforms with {threads} threads vs element by element");
        match &first {
            None => first = Some(got),
            Some(f) => assert!(*f == got, "{threads} threads draw other numbers than 1 thread"),
        }
    }
}

#[test]
fn consecutive_draws_of_the_stream() {
    let seed = 77u64;
    // split on a block boundary: the same numbers as one draw
    for (n1, n2) in [(0usize, 10usize), (4, 9), (400, 1), (65_536, 70_001)] {
        let mut a = Philox::new(seed);
        let mut one = vec![0.0; n1 + n2];
        a.normal(&mut one);
        let mut b = Philox::new(seed);
        let mut two = b.normal_vec(n1);
        two.extend(b.normal_vec(n2));
        assert_eq!(bits(&one), bits(&two), "normal {n1} + {n2}");
        assert_eq!(a, b, "the same state after {n1} + {n2}");
        assert_eq!(b.offset(), blocks_for(n1) + blocks_for(n2));
    }
    // otherwise the second draw starts on the next block: no value is used twice
    for (n1, n2) in [(1usize, 5usize), (7, 8), (1001, 333)] {
        let mut p = Philox::new(seed);
        let first = p.uniform_vec(n1);
        let second = p.uniform_vec(n2);
        assert_eq!(bits(&first), bits(&uniform(seed, 0, n1)));
        assert_eq!(bits(&second), bits(&uniform(seed, n1.div_ceil(4) as u64, n2)));
        assert_eq!(p.offset(), (n1.div_ceil(4) + n2.div_ceil(4)) as u64);
        // the blocks of the two draws are disjoint
        let span = |o: u64, n: usize| o..o + blocks_for(n);
        let (r1, r2) = (span(0, n1), span(blocks_for(n1), n2));
        assert!(r1.end <= r2.start, "{r1:?} overlaps {r2:?}");
    }
    // dropout, mask and reserve advance the same way
    let mut p = Philox::new(seed);
    let mut m = vec![0.0; 10];
    p.dropout_mask(0.5, &mut m);
    assert_eq!(p.offset(), 3);
    let x = vec![1.0f32; 5];
    let mut y = vec![0.0; 5];
    p.dropout(0.5, &x, &mut y, None);
    assert_eq!(p.offset(), 5);
    assert_eq!(bits(&y), bits(&mask(seed, 3, 0.5, 5)));
    assert_eq!(p.reserve(1), 5);
    assert_eq!(p.offset(), 6);
}

#[test]
fn state_round_trip() {
    let mut a = Philox::new(0xfeed_f00d_1234_5678);
    a.normal_vec(13);
    let (s, o) = a.state();
    assert_eq!((s, o), (0xfeed_f00d_1234_5678, 4));
    let mut b = Philox::from_state(s, o);
    assert_eq!(bits(&a.normal_vec(100)), bits(&b.normal_vec(100)));
    // serde (u64 values kept exactly by serde_json)
    let a = Philox::from_state(u64::MAX, u64::MAX - 1);
    let j = serde_json::to_string(&a).unwrap();
    assert_eq!(j, format!("{{\"seed\":{},\"offset\":{}}}", u64::MAX, u64::MAX - 1));
    let back: Philox = serde_json::from_str(&j).unwrap();
    assert_eq!(back, a);
    assert_eq!((back.seed(), back.offset()), (u64::MAX, u64::MAX - 1));
}

#[test]
fn seeds_and_offsets_give_other_numbers() {
    let n = 1024;
    let base = bits(&uniform(1, 0, n));
    for (seed, off) in [(2u64, 0u64), (1 | (1 << 32), 0), (1, 1 << 32), (1, 256)] {
        let other = bits(&uniform(seed, off, n));
        let same = base.iter().zip(&other).filter(|(a, b)| a == b).count();
        assert!(same < 3, "seed {seed:#x} offset {off:#x}: {same} equal of {n}");
    }
}

fn moments(v: &[f32]) -> (f64, f64, f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let c = |k: i32| v.iter().map(|&x| (x as f64 - m).powi(k)).sum::<f64>() / n;
    let var = c(2);
    (m, var, c(3) / var.powf(1.5), c(4) / (var * var))
}

#[test]
fn uniform_statistics() {
    let n = 1_000_000;
    let u = uniform(2024, 0, n);
    assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)), "a uniform outside [0, 1)");
    assert!(u.iter().all(|&x| (x * 16_777_216.0).fract() == 0.0), "a uniform that is not a multiple of 2^-24");
    let (m, var, _, _) = moments(&u);
    let (lo, hi) = u.iter().fold((1.0f32, 0.0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    // sd of the mean √(1/12n) = 2.9e-4, of the variance ≈ √(1/180n) = 7.5e-5: 5 sd bounds
    assert!((m - 0.5).abs() < 1.5e-3, "mean {m}");
    assert!((var - 1.0 / 12.0).abs() < 4e-4, "var {var}");
    assert!(lo < 1e-5 && hi > 1.0 - 1e-5, "range [{lo}, {hi}]");
    // ten equal bins, a χ² with 9 degrees of freedom (p = 1e-6 at 50)
    let mut bins = [0usize; 10];
    u.iter().for_each(|&x| bins[(x * 10.0) as usize] += 1);
    let e = n as f64 / 10.0;
    let chi2: f64 = bins.iter().map(|&b| (b as f64 - e).powi(2) / e).sum();
    assert!(chi2 < 50.0, "χ² {chi2} of {bins:?}");
    println!("uniform, 1e6 draws: mean {m:.6}, var {var:.6} (1/12 = {:.6}), min {lo:e}, max {hi}, χ²(9) {chi2:.2}", 1.0 / 12.0);
}

#[test]
fn normal_statistics() {
    let n = 1_000_000;
    let z = normal(31_337, 1 << 20, n);
    assert!(z.iter().all(|x| x.is_finite() && x.abs() <= 5.8), "a normal that is not finite or beyond the 24-bit tail");
    let (m, var, skew, kurt) = moments(&z);
    // sd: mean 1e-3, variance √(2/n) = 1.4e-3, skewness √(6/n) = 2.4e-3, kurtosis √(24/n) = 4.9e-3
    assert!(m.abs() < 5e-3, "mean {m}");
    assert!((var - 1.0).abs() < 7e-3, "var {var}");
    assert!(skew.abs() < 1.2e-2, "skewness {skew}");
    assert!((kurt - 3.0).abs() < 2.5e-2, "kurtosis {kurt}");
    let within1 = z.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
    assert!((within1 - 0.682_689).abs() < 2.5e-3, "P(|z| < 1) = {within1}");
    // the two members of a pair are uncorrelated
    let corr = z.chunks(2).map(|p| p[0] as f64 * p[1] as f64).sum::<f64>() / (n / 2) as f64;
    assert!(corr.abs() < 7e-3, "pair correlation {corr}");
    println!("normal, 1e6 draws: mean {m:.5}, var {var:.5}, skewness {skew:.5}, kurtosis {kurt:.4}, P(|z|<1) {within1:.5}, pair corr {corr:.5}");
}

#[test]
fn dropout_keep_fraction_and_values() {
    let n = 1_000_000;
    for p in [0.1f32, 0.5, 0.9] {
        let m = mask(5, 0, p, n);
        let scale = 1.0 / (1.0 - p);
        assert!(m.iter().all(|&v| v == 0.0 || v == scale), "p {p}: a mask value other than 0 and {scale}");
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        let sd = ((1.0 - p as f64) * p as f64 / n as f64).sqrt();
        assert!((kept - (1.0 - p as f64)).abs() < 5.0 * sd, "p {p}: kept {kept}");
        // E[mask] = 1: dropout keeps the expectation
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 5.0 * sd * scale as f64, "p {p}: mean mask {mean}");
        println!("dropout p = {p}: kept {kept:.5} (want {:.1}, 5 sd = {:.1e}), mean mask {mean:.5}", 1.0 - p, 5.0 * sd);
    }
    assert!(mask(5, 0, 0.0, 1000).iter().all(|&v| v == 1.0), "p = 0 must keep everything with scale 1");
    assert!(mask(5, 0, 1.0, 1000).iter().all(|&v| v == 0.0), "p = 1 must drop everything");
    // applied dropout is x · mask
    let x: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
    let mut y = vec![f32::NAN; 1000];
    dropout(5, 9, 0.3, &x, &mut y, None);
    let m = mask(5, 9, 0.3, 1000);
    let want: Vec<f32> = x.iter().zip(&m).map(|(a, b)| a * b).collect();
    assert_eq!(bits(&y), bits(&want));
    let _ = philox::dropout_scale(0.3);
}

#[test]
fn dropout_in_parallel_parts_is_the_masks_product() {
    // longer than one task (16384 values), not a whole number of 64-value groups, at an offset
    // near wrap-around: every part starts on its own block of the same draw
    let n = 3 * 16384 + 16384 / 2 + 37;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).cos() - 0.2).collect();
    for (seed, off, p) in [(3u64, 0u64, 0.1f32), (8, u64::MAX - 5, 0.5), (1, 17, 1.0)] {
        let m = mask(seed, off, p, n);
        let want: Vec<f32> = x.iter().zip(&m).map(|(a, b)| a * b).collect();
        let mut y = vec![f32::NAN; n];
        dropout(seed, off, p, &x, &mut y, None);
        assert_eq!(bits(&y), bits(&want), "philox::dropout ({seed}, {off}, {p})");
        let t = Tensor::from_vec(x.clone(), &[n]);
        let yt = t.dropout_philox(p, seed, off).unwrap();
        assert_eq!(bits(yt.data()), bits(&want), "Tensor::dropout_philox ({seed}, {off}, {p})");
    }
}

#[test]
#[should_panic(expected = "not in [0, 1]")]
fn dropout_rejects_a_probability_outside_0_1() {
    let mut m = vec![0.0; 4];
    dropout_mask(1, 0, 1.5, &mut m);
}

// ------------------------------------------------ the Tensor-level draws (through the backend)

use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::backend::RandomDist;
use orwcfm_fast::tensor::{DType, Device, Tensor};

#[test]
fn tensor_draws_are_the_philox_bits() {
    let shape = [3, 5, 7]; // 105 values: the last block is partly used
    let n = 105;
    for (seed, off) in [(0u64, 0u64), (42, 7), (u64::MAX, u64::MAX - 3)] {
        let u = Tensor::philox_at(&shape, RandomDist::Uniform, seed, off, Device::Cpu, DType::F32).unwrap();
        assert_eq!(u.shape(), &shape);
        assert_eq!(bits(u.data()), bits(&uniform(seed, off, n)), "uniform ({seed}, {off})");
        let z = Tensor::philox_at(&shape, RandomDist::Normal, seed, off, Device::Cpu, DType::F32).unwrap();
        assert_eq!(bits(z.data()), bits(&normal(seed, off, n)), "normal ({seed}, {off})");
        // narrower dtypes: the f32 draw rounded once
        let h = Tensor::philox_at(&shape, RandomDist::Normal, seed, off, Device::Cpu, DType::BF16).unwrap();
        assert_eq!(h.dtype(), DType::BF16);
        assert_eq!(h.to_bf16().unwrap(), normal(seed, off, n).iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>());
    }
    assert!(Tensor::philox_at(&[4], RandomDist::Uniform, 1, 0, Device::Cpu, DType::I32).is_err(), "an integer draw is an error");
}

#[test]
fn tensor_streams_advance_and_differ_per_seed_and_offset() {
    let mut s = Philox::new(9);
    let a = Tensor::philox_normal(&[10], Device::Cpu, DType::F32, &mut s).unwrap();
    assert_eq!(s.offset(), 3, "10 values use 3 blocks");
    let b = Tensor::philox_normal(&[10], Device::Cpu, DType::F32, &mut s).unwrap();
    assert_eq!(bits(a.data()), bits(&normal(9, 0, 10)));
    assert_eq!(bits(b.data()), bits(&normal(9, 3, 10)), "the second draw starts on the next block");
    assert_ne!(a.data(), b.data(), "consecutive draws differ");
    let c = Tensor::philox_normal(&[10], Device::Cpu, DType::F32, &mut Philox::new(10)).unwrap();
    assert_ne!(a.data(), c.data(), "another seed, other numbers");
    let mut s2 = Philox::from_state(9, 0);
    let u = Tensor::philox_uniform(&[10], Device::Cpu, DType::F32, &mut s2).unwrap();
    assert_eq!(bits(u.data()), bits(&uniform(9, 0, 10)));
    assert_eq!(s2, Philox::from_state(9, 3));
}

#[test]
fn dropout_op_uses_the_streams_mask_and_recomputes_it_in_backward() {
    let x = Tensor::from_vec((0..999).map(|i| (i as f32 * 0.37).sin() + 0.1).collect(), &[27, 37]);
    let mut s = Philox::from_state(77, 5);
    let xv = Var::param(x.clone());
    let y = ops::dropout(&xv, 0.3, &mut s).unwrap();
    assert_eq!(s.offset(), 5 + 250, "999 values use 250 blocks");
    let m = mask(77, 5, 0.3, 999);
    let want: Vec<f32> = x.data().iter().zip(&m).map(|(a, b)| a * b).collect();
    assert_eq!(bits(y.value().data()), bits(&want), "y = x · mask of (seed, offset)");
    // backward: dL/dx = g · mask, the mask regenerated from (seed, offset)
    let g = Tensor::from_vec((0..999).map(|i| (i as f32 * 0.11).cos()).collect(), &[27, 37]);
    let grads = y.backward_with(g.clone()).unwrap();
    let want: Vec<f32> = g.data().iter().zip(&m).map(|(a, b)| a * b).collect();
    assert_eq!(bits(grads.get(&xv).unwrap().data()), bits(&want));
    // the next dropout of the stream draws another mask; p = 0 draws nothing
    let y2 = ops::dropout(&xv, 0.3, &mut s).unwrap();
    assert_ne!(y.value().data(), y2.value().data());
    let before = s;
    let y0 = ops::dropout(&xv, 0.0, &mut s).unwrap();
    assert_eq!((y0.value().data(), s), (x.data(), before));
    // f16: the f32 product rounded once
    let xh = x.to_dtype(DType::F16).unwrap();
    let yh = xh.dropout_philox(0.3, 77, 5).unwrap();
    let want: Vec<half::f16> = xh.to_f16().unwrap().iter().zip(&m).map(|(a, b)| half::f16::from_f32(a.to_f32() * b)).collect();
    assert_eq!(yh.to_f16().unwrap(), want);
    assert!(x.dropout_philox(1.5, 1, 0).is_err(), "p outside [0, 1] is an error, not a panic");
}

#[test]
fn sum_squares_on_device_is_the_f64_sum_as_an_f32_pair() {
    let a = Tensor::from_vec((0..1000).map(|i| (i as f32 * 0.013).sin() * 3.0).collect(), &[1000]);
    let b = Tensor::from_vec((0..77).map(|i| i as f32 * 1e-3 + 0.5).collect(), &[7, 11]);
    let want = Tensor::sum_squares(&[&a, &b]).unwrap();
    let pair = Tensor::sum_squares_on_device(&[&a, &b]).unwrap();
    assert_eq!(pair.shape(), &[2]);
    let (hi, lo) = (pair.data()[0], pair.data()[1]);
    assert_eq!(hi, want as f32);
    assert!(lo != 0.0, "the remainder is kept");
    let got = hi as f64 + lo as f64;
    assert!(((got - want) / want).abs() < 1e-13, "hi + lo = {got}, f64 sum {want}");
    let inf = Tensor::from_vec(vec![1.0, f32::INFINITY], &[2]);
    assert!(!Tensor::sum_squares_on_device(&[&inf]).unwrap().data()[0].is_finite());
    assert!(Tensor::sum_squares_on_device(&[]).is_err());
}

#[test]
fn index_rows_gathers_along_axis_0() {
    let x = Tensor::from_vec((0..24).map(|i| i as f32).collect(), &[4, 3, 2]);
    let r = x.index_rows(&[2, 0, 2]).unwrap();
    assert_eq!(r.shape(), &[3, 3, 2]);
    let want: Vec<f32> = [2, 0, 2].iter().flat_map(|&i| (0..6).map(move |k| (i * 6 + k) as f32)).collect();
    assert_eq!(r.data(), &want[..]);
    assert!(x.index_rows(&[4]).is_err());
}
