//! The ORW-CFM-W2 loss of `orw::loss` in one pass over `v, u, v_ref [B, P]`:
//! `fm_i = mean_pix (v − u)²`, `w2_i = mean_pix (v − v_ref)²`, `fm = mean_i w_i fm_i`,
//! `w2 = mean_i w2_i`, `total = fm + α w2` (sums in f64), and
//! `dL/dv = g · 2/(B·P) · (w_i (v − u) + α (v − v_ref))` for an upstream scalar gradient `g`.
//!
//! Nothing is saved for backward beyond the inputs (`orw_loss_backward` recomputes from them).
//! Partial sums are per fixed-length chunk of each sample, added in order.

use rayon::prelude::*;

use super::CHUNK;

/// The loss terms (in f64).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrwLossValue {
    /// `mean_i w_i mean_pix (v − u)²`
    pub fm: f64,
    /// `mean_i mean_pix (v − v_ref)²` (before α; 0 without `v_ref`)
    pub w2: f64,
    /// `fm + α w2`
    pub total: f64,
}

fn check(v: &[f32], u: &[f32], vref: Option<&[f32]>, w: &[f32], alpha: f32) -> usize {
    let b = w.len();
    assert!(b > 0 && v.len().is_multiple_of(b), "orw_loss: {} values for a batch of {b}", v.len());
    assert_eq!(u.len(), v.len(), "orw_loss: u length");
    if let Some(r) = vref {
        assert_eq!(r.len(), v.len(), "orw_loss: v_ref length");
    } else {
        assert!(alpha == 0.0, "orw_loss: α = {alpha} without v_ref");
    }
    v.len() / b
}

/// Sums `(Σ (v − u)², Σ (v − v_ref)²)` of one chunk, writing `dv = cw (v − u) + ca (v − v_ref)`
/// when asked.
#[inline]
fn chunk(v: &[f32], u: &[f32], vref: Option<&[f32]>, dv: Option<&mut [f32]>, cw: f32, ca: f32) -> (f64, f64) {
    let (mut sf, mut sw) = (0.0f64, 0.0f64);
    match (vref, dv) {
        (Some(r), Some(d)) => {
            for (((o, &a), &b), &c) in d.iter_mut().zip(v).zip(u).zip(r) {
                let (e, f) = (a - b, a - c);
                sf += e as f64 * e as f64;
                sw += f as f64 * f as f64;
                *o = cw * e + ca * f;
            }
        }
        (Some(r), None) => {
            for ((&a, &b), &c) in v.iter().zip(u).zip(r) {
                let (e, f) = (a - b, a - c);
                sf += e as f64 * e as f64;
                sw += f as f64 * f as f64;
            }
        }
        (None, Some(d)) => {
            for ((o, &a), &b) in d.iter_mut().zip(v).zip(u) {
                let e = a - b;
                sf += e as f64 * e as f64;
                *o = cw * e;
            }
        }
        (None, None) => {
            for (&a, &b) in v.iter().zip(u) {
                let e = a - b;
                sf += e as f64 * e as f64;
            }
        }
    }
    (sf, sw)
}

/// The gradient coefficients `(g·2 w_i/(B·P), g·2α/(B·P))` of sample `i`.
fn coefs(g: f32, w: f32, alpha: f32, b: usize, p: usize) -> (f32, f32) {
    let c = g as f64 * 2.0 / (b as f64 * p as f64);
    ((c * w as f64) as f32, (c * alpha as f64) as f32)
}

fn finish(per: &[(f64, f64)], w: &[f32], alpha: f32, p: usize) -> OrwLossValue {
    let b = w.len() as f64;
    let (mut fm, mut w2) = (0.0f64, 0.0f64);
    for (&(sf, sw), &wi) in per.iter().zip(w) {
        fm += wi as f64 * (sf / p as f64);
        w2 += sw / p as f64;
    }
    let (fm, w2) = (fm / b, w2 / b);
    OrwLossValue { fm, w2, total: fm + alpha as f64 * w2 }
}

/// Per-sample sums, and `dv` with upstream gradient `g` when `grad` is set.
fn run(v: &[f32], u: &[f32], vref: Option<&[f32]>, w: &[f32], alpha: f32, grad: Option<f32>) -> (OrwLossValue, Option<Vec<f32>>) {
    let p = check(v, u, vref, w, alpha);
    let b = w.len();
    if p == 0 {
        return (OrwLossValue { fm: 0.0, w2: 0.0, total: 0.0 }, grad.map(|_| Vec::new()));
    }
    let sum = |parts: Vec<(f64, f64)>| parts.into_iter().fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d));
    // element range of chunk `c` of sample `i`
    let slice = |i: usize, c: usize| -> std::ops::Range<usize> {
        let lo = i * p + c * CHUNK;
        lo..(lo + CHUNK).min((i + 1) * p)
    };
    let (per, dv): (Vec<(f64, f64)>, Option<Vec<f32>>) = match grad {
        Some(g) => {
            let mut dv = vec![0.0f32; v.len()];
            let per = dv
                .par_chunks_mut(p)
                .enumerate()
                .map(|(i, dvi)| {
                    let (cw, ca) = coefs(g, w[i], alpha, b, p);
                    let parts: Vec<(f64, f64)> = dvi
                        .par_chunks_mut(CHUNK)
                        .enumerate()
                        .map(|(c, d)| {
                            let r = slice(i, c);
                            chunk(&v[r.clone()], &u[r.clone()], vref.map(|x| &x[r.clone()]), Some(d), cw, ca)
                        })
                        .collect();
                    sum(parts)
                })
                .collect();
            (per, Some(dv))
        }
        None => {
            let per = (0..b)
                .into_par_iter()
                .map(|i| {
                    let parts: Vec<(f64, f64)> = (0..p.div_ceil(CHUNK))
                        .into_par_iter()
                        .map(|c| {
                            let r = slice(i, c);
                            chunk(&v[r.clone()], &u[r.clone()], vref.map(|x| &x[r.clone()]), None, 0.0, 0.0)
                        })
                        .collect();
                    sum(parts)
                })
                .collect();
            (per, None)
        }
    };
    (finish(&per, w, alpha, p), dv)
}

/// The loss values only.
pub fn orw_loss_forward(v: &[f32], u: &[f32], vref: Option<&[f32]>, w: &[f32], alpha: f32) -> OrwLossValue {
    run(v, u, vref, w, alpha, None).0
}

/// The loss values and `dL/dv` (times the upstream gradient `g`) in one pass.
pub fn orw_loss_forward_backward(v: &[f32], u: &[f32], vref: Option<&[f32]>, w: &[f32], alpha: f32, g: f32) -> (OrwLossValue, Vec<f32>) {
    let (val, dv) = run(v, u, vref, w, alpha, Some(g));
    (val, dv.expect("gradient requested"))
}

/// `dL/dv` (times `g`) alone, recomputed from the inputs.
pub fn orw_loss_backward(v: &[f32], u: &[f32], vref: Option<&[f32]>, w: &[f32], alpha: f32, g: f32) -> Vec<f32> {
    orw_loss_forward_backward(v, u, vref, w, alpha, g).1
}
