//! `out = x + Σ_i c_i k_i`: the state update of one fixed-grid ODE step (Euler: one term,
//! midpoint: one term on the midpoint slope, RK4 / 3-8 rule: four), accumulated per element in
//! f64 like `flow::ode`'s CPU `lincomb`. Backward: `dx = g`, `dk_i = c_i g` (nothing saved but the
//! coefficients).

use rayon::prelude::*;

use super::CHUNK;

/// `out[i] = x[i] + Σ_t c_t k_t[i]`, the sum in f64 in the terms' order, for `N` terms (a fixed
/// count, so that the loop over elements vectorises).
#[inline(always)]
fn combine_fixed<const N: usize>(out: &mut [f32], x: &[f32], ks: [&[f32]; N], cs: [f64; N]) {
    let n = out.len();
    let x = &x[..n];
    let ks: [&[f32]; N] = std::array::from_fn(|t| &ks[t][..n]);
    for i in 0..n {
        let mut a = 0.0f64;
        for t in 0..N {
            a += cs[t] * ks[t][i] as f64;
        }
        out[i] = (x[i] as f64 + a) as f32;
    }
}

dispatch! {
    /// One chunk of [`ode_combine`], `terms` without zero coefficients.
    fn combine_chunk(out: &mut [f32], x: &[f32], terms: &[(f64, &[f32])]) {
        let k = |t: usize| terms[t].1;
        let c = |t: usize| terms[t].0;
        match terms.len() {
            0 => out.copy_from_slice(&x[..out.len()]),
            1 => combine_fixed(out, x, [k(0)], [c(0)]),
            2 => combine_fixed(out, x, [k(0), k(1)], [c(0), c(1)]),
            3 => combine_fixed(out, x, [k(0), k(1), k(2)], [c(0), c(1), c(2)]),
            4 => combine_fixed(out, x, [k(0), k(1), k(2), k(3)], [c(0), c(1), c(2), c(3)]),
            _ => {
                for (i, o) in out.iter_mut().enumerate() {
                    let a = terms.iter().fold(0.0f64, |a, &(c, k)| a + c * k[i] as f64);
                    *o = (x[i] as f64 + a) as f32;
                }
            }
        }
    }
}

/// `x + Σ c_i k_i` (each `k_i` as long as `x`).
pub fn ode_combine(x: &[f32], terms: &[(f64, &[f32])]) -> Vec<f32> {
    for (i, (_, k)) in terms.iter().enumerate() {
        assert_eq!(k.len(), x.len(), "ode_combine: term {i} has {} elements, the state {}", k.len(), x.len());
    }
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let lo = ci * CHUNK;
        let terms: Vec<(f64, &[f32])> = terms.iter().filter(|t| t.0 != 0.0).map(|&(c, k)| (c, &k[lo..])).collect();
        combine_chunk(o, &x[lo..], &terms);
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
