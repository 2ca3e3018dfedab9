//! src/backend/cpu/fused: each fused op against the composition of the existing unfused CPU
//! kernels (forward ≤ 1e-5, backward ≤ 1e-4 relative L2) and against central finite differences
//! of `L = Σ out ⊙ G` (≤ 3e-3 relative L2 over the checked elements, 1e-4 for the linear and
//! quadratic ops), on awkward sizes.

use orwcfm_fast::backend::cpu::attention::{AttnGeom, QkvOrder, qkv_attention_backward, qkv_attention_forward};
use orwcfm_fast::backend::cpu::elementwise::{binary, map, sum_to_shape, zip_map};
use orwcfm_fast::backend::cpu::fused::*;
use orwcfm_fast::backend::cpu::norm::{group_norm_backward, group_norm_forward};
use orwcfm_fast::backend::cpu::simd::{silu, silu_backward};
use orwcfm_fast::flow::ode::{OdeSolver, odeint};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

// ---------------------------------------------------------------------------------------------
// helpers

fn randn(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n)
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut e, mut w) = (0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(want) {
        e += (a as f64 - b as f64).powi(2);
        w += (b as f64).powi(2);
    }
    e.sqrt() / w.sqrt().max(1e-30)
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let r = rel_l2(got, want);
    assert!(want.iter().any(|&v| v != 0.0), "{what}: the reference is all zeros; the check would be empty");
    assert!(r <= tol, "{what}: rel L2 {r:.3e} > {tol:e}");
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Central differences of `loss` with respect to `x` (all elements up to 48, else 48 sampled)
/// against `analytic`; returns the relative L2 error over the checked elements.
fn fd_rel(x: &[f32], analytic: &[f32], eps: f32, seed: u64, loss: impl Fn(&[f32]) -> f64) -> f64 {
    let n = x.len();
    let mut rng = Rng::new(seed);
    let idx: Vec<usize> = if n <= 48 { (0..n).collect() } else { (0..48).map(|_| rng.below(n as u64) as usize).collect() };
    let (mut num2, mut err2) = (0.0f64, 0.0f64);
    let mut xp = x.to_vec();
    for &i in &idx {
        xp[i] = x[i] + eps;
        let hi = loss(&xp);
        xp[i] = x[i] - eps;
        let lo = loss(&xp);
        xp[i] = x[i];
        // the step actually taken in f32
        let h = (x[i] + eps) as f64 - (x[i] - eps) as f64;
        let numeric = (hi - lo) / h;
        num2 += numeric * numeric;
        err2 += (analytic[i] as f64 - numeric).powi(2);
    }
    assert!(num2 > 0.0, "all-zero numeric gradient; the check would be empty");
    err2.sqrt() / num2.sqrt()
}

#[track_caller]
fn assert_fd(what: &str, x: &[f32], analytic: &[f32], eps: f32, tol: f64, loss: impl Fn(&[f32]) -> f64) {
    let r = fd_rel(x, analytic, eps, 0xFD ^ x.len() as u64, loss);
    eprintln!("{what}: finite-difference rel err {r:.2e}");
    assert!(r <= tol, "{what}: finite-difference rel err {r:.3e} > {tol:e}");
}

/// Run `f` on a rayon pool of `threads` threads.
fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

// ---------------------------------------------------------------------------------------------
// group_norm_act

struct GnCase {
    g: GnGeom,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    scale: Option<Vec<f32>>,
    shift: Option<Vec<f32>>,
}

fn gn_case(n: usize, c: usize, s: usize, groups: usize, scale: bool, shift: bool, seed: u64) -> GnCase {
    let g = GnGeom { n, c, s, groups, eps: 1e-5 };
    // a per-channel offset and spread so the statistics are not trivially those of N(0, 1)
    let x: Vec<f32> = randn(n * c * s, seed).iter().enumerate().map(|(i, &v)| v * (1.0 + (i / s % c) as f32 * 0.3) + ((i / s) % 5) as f32 - 2.0).collect();
    let gamma = randn(c, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = randn(c, seed + 2).iter().map(|v| 0.5 * v).collect();
    let scale = scale.then(|| randn(n * c, seed + 3).iter().map(|v| 0.5 * v).collect());
    let shift = shift.then(|| randn(n * c, seed + 4));
    GnCase { g, x, gamma, beta, scale, shift }
}

impl GnCase {
    fn fwd(&self, x: &[f32], gamma: &[f32], beta: &[f32], scale: Option<&[f32]>, shift: Option<&[f32]>, act: Act) -> Vec<f32> {
        group_norm_act_forward(x, &self.g, gamma, beta, scale, shift, act).0
    }
}

/// `(y, gn_out, pre_act, mean, rstd)`
type GnReference = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// The unfused forward: `group_norm_forward`, then broadcast `· (1 + scale)`, `+ shift`, `silu`.
fn gn_reference(k: &GnCase, act: Act) -> GnReference {
    let GnGeom { n, c, s, groups, eps } = k.g;
    let (full, per) = ([n, c, s], [n, c, 1]);
    let (y0, mean, rstd) = group_norm_forward(&k.x, n, c, s, groups, eps, &k.gamma, &k.beta);
    let mut h = y0.clone();
    if let Some(sc) = &k.scale {
        h = binary(&h, &full, &map(sc, |v| v + 1.0), &per, &full, |a, b| a * b);
    }
    if let Some(sh) = &k.shift {
        h = binary(&h, &full, sh, &per, &full, |a, b| a + b);
    }
    let y = match act {
        Act::Silu => {
            let mut y = vec![0.0; h.len()];
            silu(&h, &mut y);
            y
        }
        Act::None => h.clone(),
    };
    (y, y0, h, mean, rstd)
}

/// The unfused backward chain: `silu_backward`, the broadcast products' backward (`sum_to_shape`),
/// `group_norm_backward`.
fn gn_reference_backward(k: &GnCase, act: Act, dy: &[f32]) -> GnActGrads {
    let GnGeom { n, c, s, groups, .. } = k.g;
    let (full, per) = ([n, c, s], [n, c, 1]);
    let (_, y0, h, mean, rstd) = gn_reference(k, act);
    let dh = match act {
        Act::Silu => {
            let mut d = vec![0.0; h.len()];
            silu_backward(&h, dy, &mut d);
            d
        }
        Act::None => dy.to_vec(),
    };
    let dshift = k.shift.as_ref().map(|_| sum_to_shape(&dh, &full, &per));
    let dscale = k.scale.as_ref().map(|_| sum_to_shape(&zip_map(&dh, &y0, |a, b| a * b), &full, &per));
    let dy0 = match &k.scale {
        Some(sc) => binary(&dh, &full, &map(sc, |v| v + 1.0), &per, &full, |a, b| a * b),
        None => dh,
    };
    let (dx, dgamma, dbeta) = group_norm_backward(&k.x, &dy0, n, c, s, groups, &k.gamma, &mean, &rstd);
    GnActGrads { dx, dgamma, dbeta, dscale, dshift }
}

/// (n, c, s, groups): not powers of two, several groups, one channel per group, one group, S = 1.
const GN_SHAPES: [(usize, usize, usize, usize); 5] = [(3, 12, 35, 4), (2, 10, 9, 5), (2, 9, 13, 1), (2, 6, 11, 6), (3, 6, 1, 3)];

#[test]
fn group_norm_act_forward_matches_unfused() {
    let mut seed = 100;
    for &(n, c, s, groups) in &GN_SHAPES {
        for (sc, sh) in [(true, true), (false, false), (true, false), (false, true)] {
            for act in [Act::Silu, Act::None] {
                seed += 10;
                let k = gn_case(n, c, s, groups, sc, sh, seed);
                let (y, mean, rstd) = group_norm_act_forward(&k.x, &k.g, &k.gamma, &k.beta, k.scale.as_deref(), k.shift.as_deref(), act);
                let (want, _, _, wmean, wrstd) = gn_reference(&k, act);
                let what = format!("gn_act fwd {n}x{c}x{s}/{groups} scale={sc} shift={sh} {act:?}");
                assert_close(&what, &y, &want, 1e-5);
                assert_eq!((mean, rstd), (wmean, wrstd), "{what}: saved statistics");
            }
        }
    }
}

#[test]
fn group_norm_act_backward_matches_unfused() {
    let mut seed = 200;
    for &(n, c, s, groups) in &GN_SHAPES {
        for (sc, sh) in [(true, true), (false, false), (true, false), (false, true)] {
            for act in [Act::Silu, Act::None] {
                seed += 10;
                let k = gn_case(n, c, s, groups, sc, sh, seed);
                let dy = randn(k.x.len(), seed + 7);
                let (_, mean, rstd) = group_norm_act_forward(&k.x, &k.g, &k.gamma, &k.beta, k.scale.as_deref(), k.shift.as_deref(), act);
                let got = group_norm_act_backward(&k.x, &dy, &k.g, &k.gamma, &k.beta, k.scale.as_deref(), k.shift.as_deref(), act, &mean, &rstd);
                let want = gn_reference_backward(&k, act, &dy);
                let what = format!("gn_act bwd {n}x{c}x{s}/{groups} scale={sc} shift={sh} {act:?}");
                // a group of one or two elements normalises to constants (0 or ±1): dx is 0 up to
                // rounding there, nothing to compare
                if c / groups * s > 2 {
                    assert_close(&format!("{what} dx"), &got.dx, &want.dx, 1e-4);
                }
                assert_close(&format!("{what} dgamma"), &got.dgamma, &want.dgamma, 1e-4);
                assert_close(&format!("{what} dbeta"), &got.dbeta, &want.dbeta, 1e-4);
                assert_eq!(got.dscale.is_some(), sc, "{what}: dscale presence");
                assert_eq!(got.dshift.is_some(), sh, "{what}: dshift presence");
                if let (Some(a), Some(b)) = (&got.dscale, &want.dscale) {
                    assert_close(&format!("{what} dscale"), a, b, 1e-4);
                }
                if let (Some(a), Some(b)) = (&got.dshift, &want.dshift) {
                    assert_close(&format!("{what} dshift"), a, b, 1e-4);
                }
            }
        }
    }
}

#[test]
fn group_norm_act_finite_differences() {
    for (ci, &(n, c, s, groups, sc, sh, act)) in [(2, 6, 5, 3, true, true, Act::Silu), (2, 6, 7, 2, false, false, Act::Silu), (1, 4, 6, 2, true, false, Act::None), (3, 3, 4, 1, false, true, Act::Silu)].iter().enumerate()
    {
        let k = gn_case(n, c, s, groups, sc, sh, 300 + ci as u64 * 10);
        let gy = randn(k.x.len(), 999 + ci as u64);
        let (_, mean, rstd) = group_norm_act_forward(&k.x, &k.g, &k.gamma, &k.beta, k.scale.as_deref(), k.shift.as_deref(), act);
        let gr = group_norm_act_backward(&k.x, &gy, &k.g, &k.gamma, &k.beta, k.scale.as_deref(), k.shift.as_deref(), act, &mean, &rstd);
        let (scale, shift) = (k.scale.as_deref(), k.shift.as_deref());
        let what = format!("gn_act {n}x{c}x{s}/{groups} {act:?}");
        let eps = 1e-3;
        assert_fd(&format!("{what} dx"), &k.x, &gr.dx, eps, 3e-3, |x| dot(&k.fwd(x, &k.gamma, &k.beta, scale, shift, act), &gy));
        assert_fd(&format!("{what} dgamma"), &k.gamma, &gr.dgamma, eps, 3e-3, |p| dot(&k.fwd(&k.x, p, &k.beta, scale, shift, act), &gy));
        assert_fd(&format!("{what} dbeta"), &k.beta, &gr.dbeta, eps, 3e-3, |p| dot(&k.fwd(&k.x, &k.gamma, p, scale, shift, act), &gy));
        if let Some(scv) = scale {
            assert_fd(&format!("{what} dscale"), scv, gr.dscale.as_ref().unwrap(), eps, 3e-3, |p| dot(&k.fwd(&k.x, &k.gamma, &k.beta, Some(p), shift, act), &gy));
        }
        if let Some(shv) = shift {
            assert_fd(&format!("{what} dshift"), shv, gr.dshift.as_ref().unwrap(), eps, 3e-3, |p| dot(&k.fwd(&k.x, &k.gamma, &k.beta, scale, Some(p), act), &gy));
        }
    }
}

#[test]
fn group_norm_act_independent_of_thread_count() {
    let k = gn_case(3, 12, 35, 4, true, true, 400);
    let dy = randn(k.x.len(), 401);
    let run = || {
        let (y, m, r) = group_norm_act_forward(&k.x, &k.g, &k.gamma, &k.beta, k.scale.as_deref(), k.shift.as_deref(), Act::Silu);
        let gr = group_norm_act_backward(&k.x, &dy, &k.g, &k.gamma, &k.beta, k.scale.as_deref(), k.shift.as_deref(), Act::Silu, &m, &r);
        (y, gr.dx, gr.dgamma, gr.dbeta, gr.dscale, gr.dshift)
    };
    assert!(with_threads(1, run) == with_threads(3, run), "results differ between 1 and 3 threads");
}

// ---------------------------------------------------------------------------------------------
// flash attention

fn geom(b: usize, heads: usize, ch: usize, t: usize, order: QkvOrder) -> AttnGeom {
    AttnGeom { b, heads, ch, t, order }
}

fn qkv_data(g: &AttnGeom, seed: u64) -> Vec<f32> {
    // a spread of 2 so that the softmax is far from uniform
    randn(g.b * 3 * g.heads * g.ch * g.t, seed).iter().map(|v| 2.0 * v).collect()
}

/// `lse[bh, i] = log Σ_j exp(q_i·k_j / √ch)` in f64 from qkv directly (the existing code saves
/// probabilities, not the log-sum-exp).
fn lse_reference(qkv: &[f32], g: &AttnGeom) -> Vec<f32> {
    let (t, ch, c) = (g.t, g.ch, g.heads * g.ch);
    let mut out = Vec::with_capacity(g.b * g.heads * t);
    for bi in 0..g.b {
        for h in 0..g.heads {
            let base = bi * 3 * c * t;
            let (oq, ok) = match g.order {
                QkvOrder::Legacy => (base + h * 3 * ch * t, base + h * 3 * ch * t + ch * t),
                QkvOrder::New => (base + h * ch * t, base + c * t + h * ch * t),
            };
            for i in 0..t {
                let s: Vec<f64> = (0..t).map(|j| (0..ch).map(|cc| qkv[oq + cc * t + i] as f64 * qkv[ok + cc * t + j] as f64).sum::<f64>() / (ch as f64).sqrt()).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                out.push((m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln()) as f32);
            }
        }
    }
    out
}

/// (b, heads, ch, t, br, bc): T not a multiple of the tiles, a single partial tile, tiles of one.
const ATTN_CASES: [(usize, usize, usize, usize, usize, usize); 6] = [(2, 3, 5, 37, 8, 11), (1, 2, 7, 29, 16, 16), (2, 1, 6, 23, 64, 64), (1, 2, 3, 13, 1, 4), (3, 2, 4, 31, 10, 3), (2, 2, 8, 50, 13, 50)];

#[test]
fn flash_attention_forward_matches_unfused() {
    let mut seed = 500;
    for &(b, heads, ch, t, br, bc) in &ATTN_CASES {
        for order in [QkvOrder::Legacy, QkvOrder::New] {
            seed += 1;
            let g = geom(b, heads, ch, t, order);
            let qkv = qkv_data(&g, seed);
            let (out, lse) = flash_attention_forward_tiled(&qkv, &g, br, bc);
            let (want, _) = qkv_attention_forward(&qkv, &g);
            let what = format!("flash fwd b{b} h{heads} ch{ch} t{t} tiles {br}x{bc} {order:?}");
            assert_close(&what, &out, &want, 1e-5);
            assert_close(&format!("{what} lse"), &lse, &lse_reference(&qkv, &g), 1e-6);
        }
    }
}

#[test]
fn flash_attention_backward_matches_unfused() {
    let mut seed = 600;
    for &(b, heads, ch, t, br, bc) in &ATTN_CASES {
        for order in [QkvOrder::Legacy, QkvOrder::New] {
            seed += 1;
            let g = geom(b, heads, ch, t, order);
            let qkv = qkv_data(&g, seed);
            let dout = randn(b * heads * ch * t, seed + 1000);
            let (out, lse) = flash_attention_forward_tiled(&qkv, &g, br, bc);
            let got = flash_attention_backward_tiled(&qkv, &out, &lse, &dout, &g, br, bc);
            let (_, probs) = qkv_attention_forward(&qkv, &g);
            let want = qkv_attention_backward(&qkv, &probs, &dout, &g);
            assert_close(&format!("flash bwd b{b} h{heads} ch{ch} t{t} tiles {br}x{bc} {order:?}"), &got, &want, 1e-4);
        }
    }
}

/// 64-wide tiles with T = 200 (four tiles each way, the last of 8) and a realistic head size; and
/// the default tiles: all keys in one tile up to 1024 positions, past that two key tiles (the
/// second partial) and many query tiles.
#[test]
fn flash_attention_many_tiles_and_default_tiles() {
    assert_eq!(flash_tiles(200), (200, 200));
    assert_eq!(flash_tiles(784), (80, 784));
    assert_eq!(flash_tiles(1100), (FLASH_TILE, 1024));
    assert!(flash_tiles(7).0 * flash_tiles(7).1 <= FLASH_TILE_BUDGET && flash_tiles(5000).0 * flash_tiles(5000).1 <= FLASH_TILE_BUDGET);
    for (i, order) in [QkvOrder::Legacy, QkvOrder::New].into_iter().enumerate() {
        for (g, tiles) in [(geom(2, 3, 32, 200, order), Some((FLASH_TILE, FLASH_TILE))), (geom(1, 2, 8, 1100, order), None)] {
            let qkv = qkv_data(&g, 700 + i as u64 + g.t as u64);
            let dout = randn(g.b * g.heads * g.ch * g.t, 710 + i as u64);
            let ((out, lse), what) = match tiles {
                Some((br, bc)) => (flash_attention_forward_tiled(&qkv, &g, br, bc), format!("tiles {br}x{bc} t{} {order:?}", g.t)),
                None => (flash_attention_forward(&qkv, &g), format!("default tiles t{} {order:?}", g.t)),
            };
            let (want, probs) = qkv_attention_forward(&qkv, &g);
            assert_close(&format!("flash fwd {what}"), &out, &want, 1e-5);
            assert_close(&format!("flash lse {what}"), &lse, &lse_reference(&qkv, &g), 1e-6);
            let got = match tiles {
                Some((br, bc)) => flash_attention_backward_tiled(&qkv, &out, &lse, &dout, &g, br, bc),
                None => flash_attention_backward(&qkv, &out, &lse, &dout, &g),
            };
            assert_close(&format!("flash bwd {what}"), &got, &qkv_attention_backward(&qkv, &probs, &dout, &g), 1e-4);
        }
    }
}

#[test]
fn flash_attention_finite_differences() {
    // three or more tiles each way, the last partial
    for (i, &(b, heads, ch, t, br, bc)) in [(1, 2, 3, 11, 4, 3), (2, 1, 4, 9, 2, 4)].iter().enumerate() {
        for (j, order) in [QkvOrder::Legacy, QkvOrder::New].into_iter().enumerate() {
            let g = geom(b, heads, ch, t, order);
            let seed = 800 + 10 * i as u64 + j as u64;
            let qkv: Vec<f32> = qkv_data(&g, seed).iter().map(|v| 0.5 * v).collect();
            let gy = randn(b * heads * ch * t, seed + 1);
            let (out, lse) = flash_attention_forward_tiled(&qkv, &g, br, bc);
            let dqkv = flash_attention_backward_tiled(&qkv, &out, &lse, &gy, &g, br, bc);
            let what = format!("flash b{b} h{heads} ch{ch} t{t} tiles {br}x{bc} {order:?}");
            // every element of qkv (q, k and v of every head)
            let rel = {
                let (mut num2, mut err2) = (0.0f64, 0.0f64);
                let eps = 1e-3f32;
                let mut xp = qkv.clone();
                for e in 0..qkv.len() {
                    xp[e] = qkv[e] + eps;
                    let hi = dot(&flash_attention_forward_tiled(&xp, &g, br, bc).0, &gy);
                    xp[e] = qkv[e] - eps;
                    let lo = dot(&flash_attention_forward_tiled(&xp, &g, br, bc).0, &gy);
                    xp[e] = qkv[e];
                    let numeric = (hi - lo) / ((qkv[e] + eps) as f64 - (qkv[e] - eps) as f64);
                    num2 += numeric * numeric;
                    err2 += (dqkv[e] as f64 - numeric).powi(2);
                }
                err2.sqrt() / num2.sqrt()
            };
            eprintln!("{what}: finite-difference rel err {rel:.2e}");
            assert!(rel <= 3e-3, "{what}: finite-difference rel err {rel:.3e}");
        }
    }
}

#[test]
fn flash_attention_independent_of_thread_count() {
    let g = geom(2, 3, 5, 37, QkvOrder::New);
    let qkv = qkv_data(&g, 900);
    let dout = randn(g.b * g.heads * g.ch * g.t, 901);
    let run = || {
        let (out, lse) = flash_attention_forward_tiled(&qkv, &g, 8, 11);
        let d = flash_attention_backward_tiled(&qkv, &out, &lse, &dout, &g, 8, 11);
        (out, lse, d)
    };
    assert!(with_threads(1, run) == with_threads(3, run), "results differ between 1 and 3 threads");
}

// ---------------------------------------------------------------------------------------------
// ORW loss

struct LossCase {
    b: usize,
    p: usize,
    v: Vec<f32>,
    u: Vec<f32>,
    vref: Option<Vec<f32>>,
    w: Vec<f32>,
    alpha: f32,
}

fn loss_case(b: usize, p: usize, with_ref: bool, seed: u64) -> LossCase {
    let v = randn(b * p, seed);
    let u = randn(b * p, seed + 1);
    // v_ref near v, as a reference model's prediction would be
    let vref = with_ref.then(|| zip_map(&v, &randn(b * p, seed + 2), |a, e| a + 0.3 * e));
    let w = randn(b, seed + 3).iter().map(|r| (0.7 * r).exp()).collect();
    LossCase { b, p, v, u, vref, w, alpha: if with_ref { 0.37 } else { 0.0 } }
}

/// `orw::loss`'s arithmetic on the unfused CPU kernels: `(fm, w2, total)` and the backward chain
/// `dv` for upstream gradient `g`.
fn loss_reference(k: &LossCase, g: f32) -> ([f64; 3], Vec<f32>) {
    let (b, p) = (k.b, k.p);
    let (full, per) = ([b, p], [b, 1]);
    // per_fm = mean_pix (v − u)²; fm = mean_i(per_fm · w)
    let d = zip_map(&k.v, &k.u, |a, c| a - c);
    let per_fm = map(&sum_to_shape(&map(&d, |e| e * e), &full, &per), |s| s / p as f32);
    let fm = zip_map(&per_fm, &k.w, |a, c| a * c).iter().map(|&x| x as f64).sum::<f64>() / b as f64;
    // backward: d per_fm_i = g w_i / B; d sq = that / P; d diff = 2 diff · d sq
    let gsq = map(&map(&k.w, |wi| g * wi / b as f32), |x| x / p as f32);
    let mut dv = binary(&map(&d, |e| 2.0 * e), &full, &gsq, &per, &full, |a, c| a * c);
    let mut w2 = 0.0f64;
    if let Some(r) = &k.vref {
        let d2 = zip_map(&k.v, r, |a, c| a - c);
        w2 = map(&d2, |e| e * e).iter().map(|&x| x as f64).sum::<f64>() / (b * p) as f64;
        let gsq2 = g * k.alpha / (b * p) as f32;
        let dv2 = map(&d2, |e| 2.0 * e * gsq2);
        dv = zip_map(&dv, &dv2, |a, c| a + c);
    }
    ([fm, w2, fm + k.alpha as f64 * w2], dv)
}

#[track_caller]
fn assert_scalar(what: &str, got: f64, want: f64, tol: f64) {
    let r = (got - want).abs() / want.abs().max(1e-30);
    assert!(r <= tol, "{what}: {got} vs {want} (rel {r:.3e})");
}

#[test]
fn orw_loss_matches_unfused() {
    // several fixed-length chunks per sample (P > 16384, not a multiple of it) and small sizes
    for (i, &(b, p, with_ref)) in [(5, 231, true), (5, 231, false), (3, 40_003, true), (1, 17, true), (7, 3, false)].iter().enumerate() {
        let k = loss_case(b, p, with_ref, 1000 + 10 * i as u64);
        let g = 0.7f32;
        let ([fm, w2, total], dv_want) = loss_reference(&k, g);
        let what = format!("orw_loss b{b} p{p} ref={with_ref}");
        let (val, dv) = orw_loss_forward_backward(&k.v, &k.u, k.vref.as_deref(), &k.w, k.alpha, g);
        assert_scalar(&format!("{what} fm"), val.fm, fm, 1e-5);
        assert_scalar(&format!("{what} total"), val.total, total, 1e-5);
        if with_ref {
            assert_scalar(&format!("{what} w2"), val.w2, w2, 1e-5);
        } else {
            assert_eq!(val.w2, 0.0);
        }
        assert_close(&format!("{what} dv"), &dv, &dv_want, 1e-4);
        assert_eq!(orw_loss_forward(&k.v, &k.u, k.vref.as_deref(), &k.w, k.alpha), val, "{what}: forward alone");
        assert_eq!(orw_loss_backward(&k.v, &k.u, k.vref.as_deref(), &k.w, k.alpha, g), dv, "{what}: backward alone");
    }
}

#[test]
fn orw_loss_finite_differences() {
    for (i, with_ref) in [true, false].into_iter().enumerate() {
        let k = loss_case(3, 7, with_ref, 1100 + i as u64);
        let g = 1.3f32;
        let (_, dv) = orw_loss_forward_backward(&k.v, &k.u, k.vref.as_deref(), &k.w, k.alpha, g);
        // the loss is accumulated in f64 and quadratic: central differences are exact up to rounding
        assert_fd(&format!("orw_loss ref={with_ref} dv"), &k.v, &dv, 1e-3, 1e-4, |v| g as f64 * orw_loss_forward(v, &k.u, k.vref.as_deref(), &k.w, k.alpha).total);
    }
}

#[test]
fn orw_loss_independent_of_thread_count() {
    let k = loss_case(3, 40_003, true, 1200);
    let run = || orw_loss_forward_backward(&k.v, &k.u, k.vref.as_deref(), &k.w, k.alpha, 1.0);
    assert!(with_threads(1, run) == with_threads(3, run), "results differ between 1 and 3 threads");
}

// ---------------------------------------------------------------------------------------------
// ODE step combination

/// `odeint` with one step of `solver` whose right-hand side returns the prescribed slopes in
/// order (whatever the state), i.e. the solver's own stage combination on random data.
fn odeint_with_slopes(x: &[f32], ks: &[Vec<f32>], t0: f32, t1: f32, solver: &OdeSolver) -> Vec<f32> {
    let shape = [3, x.len() / 3];
    let mut calls = 0usize;
    let mut f = |_t: f32, _x: &Tensor| -> anyhow::Result<Tensor> {
        calls += 1;
        Ok(Tensor::from_vec(ks[calls - 1].clone(), &shape))
    };
    let (y, stats) = odeint(&mut f, &Tensor::from_vec(x.to_vec(), &shape), t0, t1, 1, solver).unwrap();
    assert_eq!(stats.nfe, ks.len());
    y.data().to_vec()
}

#[test]
fn ode_combine_matches_ode_rs() {
    let n = 3 * 4099;
    let x = randn(n, 1300);
    let ks: Vec<Vec<f32>> = (0..4).map(|i| randn(n, 1301 + i)).collect();
    let (t0, t1) = (0.3f32, 0.47f32);
    let dt = t1 - t0; // the step odeint takes (its grid's last point is exactly t1)
    let dt64 = dt as f64;
    // RK4 (3/8 rule): x + dt (k1 + 3 k2 + 3 k3 + k4) / 8
    let want = odeint_with_slopes(&x, &ks, t0, t1, &OdeSolver::Rk4);
    let e = dt64 * 0.125;
    let got = ode_combine(&x, &[(e, &ks[0]), (3.0 * e, &ks[1]), (3.0 * e, &ks[2]), (e, &ks[3])]);
    let worst = got.iter().zip(&want).map(|(a, b)| ((a - b).abs() / b.abs().max(1e-3)) as f64).fold(0.0, f64::max);
    // odeint combines the stages with this kernel on the CPU, with f32 coefficients (3·dt/8 rounded
    // to f32 here is not 3·dt/8 in f64): they agree to f32 rounding
    assert!(worst <= 5e-5, "rk4 combination: worst rel err {worst:.3e}");
    assert_close("rk4 combination", &got, &want, 1e-6);
    // Euler: x + dt k1; midpoint: x + dt k(mid), the second slope
    let want = odeint_with_slopes(&x, &ks[..1], t0, t1, &OdeSolver::Euler);
    assert_close("euler combination", &ode_combine(&x, &[(dt64, &ks[0])]), &want, 1e-7);
    let want = odeint_with_slopes(&x, &ks[..2], t0, t1, &OdeSolver::Midpoint);
    assert_close("midpoint combination", &ode_combine(&x, &[(dt64, &ks[1])]), &want, 1e-7);
    // and the plain per-op composition x + c1 k1 + … in f32
    let cs = [0.1f32, -0.7, 2.5, 0.01];
    let mut chain = x.clone();
    for (c, k) in cs.iter().zip(&ks) {
        chain = zip_map(&chain, k, |a, b| a + c * b);
    }
    let terms: Vec<(f64, &[f32])> = cs.iter().zip(&ks).map(|(&c, k)| (c as f64, k.as_slice())).collect();
    assert_close("4-term combination vs f32 chain", &ode_combine(&x, &terms), &chain, 1e-6);
}

#[test]
fn ode_combine_backward_and_finite_differences() {
    let n = 2 * 3 * 5;
    let x = randn(n, 1400);
    let ks: Vec<Vec<f32>> = (0..3).map(|i| randn(n, 1401 + i)).collect();
    let cs = [0.125f64, -0.375, 1.7];
    let gy = randn(n, 1410);
    let (dx, dk) = ode_combine_backward(&gy, &cs);
    assert_eq!(dk.len(), 3);
    // the unfused chain's backward: each `a + c·k` passes g to a and c·g to k
    assert_close("dx", &dx, &gy, 1e-7);
    for (i, (&c, d)) in cs.iter().zip(&dk).enumerate() {
        assert_close(&format!("dk{i}"), d, &map(&gy, |v| c as f32 * v), 1e-6);
    }
    let fwd = |x: &[f32], ks: &[Vec<f32>]| {
        let terms: Vec<(f64, &[f32])> = cs.iter().zip(ks).map(|(&c, k)| (c, k.as_slice())).collect();
        dot(&ode_combine(x, &terms), &gy)
    };
    assert_fd("ode_combine dx", &x, &dx, 1e-2, 1e-4, |xp| fwd(xp, &ks));
    for i in 0..3 {
        assert_fd(&format!("ode_combine dk{i}"), &ks[i], &dk[i], 1e-2, 1e-4, |kp| {
            let mut kk = ks.clone();
            kk[i] = kp.to_vec();
            fwd(&x, &kk)
        });
    }
}
