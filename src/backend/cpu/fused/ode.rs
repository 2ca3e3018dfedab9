//! `out = x + Σ_i c_i k_i`: the state update of one fixed-grid ODE step (Euler: one term,
//! midpoint: one term on the midpoint slope, RK4 / 3-8 rule: four), accumulated per element in
//! f64 like `flow::ode`'s CPU `lincomb`. Backward: `dx = g`, `dk_i = c_i g` (nothing saved but the
//! coefficients).

use rayon::prelude::*;

use super::CHUNK;

/// `x + Σ c_i k_i` (each `k_i` as long as `x`).
pub fn ode_combine(x: &[f32], terms: &[(f64, &[f32])]) -> Vec<f32> {
    for (i, (_, k)) in terms.iter().enumerate() {
        assert_eq!(k.len(), x.len(), "ode_combine: term {i} has {} elements, the state {}", k.len(), x.len());
    }
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let (lo, len) = (ci * CHUNK, o.len());
        let mut acc = vec![0.0f64; len];
        for &(c, k) in terms {
            if c == 0.0 {
                continue;
            }
            for (a, &v) in acc.iter_mut().zip(&k[lo..lo + len]) {
                *a += c * v as f64;
            }
        }
        for ((y, &a), &b) in o.iter_mut().zip(&acc).zip(&x[lo..lo + len]) {
            *y = (b as f64 + a) as f32;
        }
    });
    out
}

/// Backward of [`ode_combine`] with coefficients `coeffs`: `(dx, [dk_i])`.
pub fn ode_combine_backward(g: &[f32], coeffs: &[f64]) -> (Vec<f32>, Vec<Vec<f32>>) {
    let scaled = |c: f64| -> Vec<f32> {
        let mut d = vec![0.0f32; g.len()];
        d.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(o, gc)| {
            for (y, &v) in o.iter_mut().zip(gc) {
                *y = (c * v as f64) as f32;
            }
        });
        d
    };
    (g.to_vec(), coeffs.iter().map(|&c| scaled(c)).collect())
}
