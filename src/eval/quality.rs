//! Sample quality and diversity against real data, in a classifier's feature space:
//!
//! - [`frechet_distance`]: FID's formula, `‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})`,
//!   on the features of the digit classifier instead of Inception's (the unbiased covariance,
//!   `np.cov`'s, as pytorch-fid uses). Its value depends on the sample count, so it is reported
//!   beside the same distance between real images and real images of the same count (the floor).
//! - [`vendi_score`]: the Vendi score (Friedman & Dieng, 2023) with the cosine kernel, `exp` of the
//!   entropy of the eigenvalues of `K / n`: the effective number of distinct samples, from 1 (all
//!   the same) to `min(n, d)`; near-duplicates count once, unlike a mean pairwise distance.
//!
//! Everything is computed in f64; the symmetric eigenproblems are solved by cyclic Jacobi
//! rotations ([`sym_eigen`]), exact to rounding for the ≤ 512-wide matrices used here.

/// Eigenvalues (ascending) and eigenvectors of the symmetric `n × n` matrix `a` (row-major):
/// `vecs[i * n + k]` is component `i` of the eigenvector of `vals[k]`. Cyclic Jacobi rotations
/// until the off-diagonal mass is below `1e-30` of the total (or 100 sweeps).
pub fn sym_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n, "sym_eigen: not an n × n matrix");
    let mut m = a.to_vec();
    // symmetrise: rounding may leave the two triangles a few ulps apart
    for i in 0..n {
        for j in i + 1..n {
            let s = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = s;
            m[j * n + i] = s;
        }
    }
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = m.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| m[i * n + j] * m[i * n + j]).sum();
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A ← Jᵀ A J on rows and columns p, q
                for k in 0..n {
                    let (akp, akq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * akp - s * akq;
                    m[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * apk - s * aqk;
                    m[q * n + k] = s * apk + c * aqk;
                }
                m[p * n + q] = 0.0;
                m[q * n + p] = 0.0;
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m[i * n + i].total_cmp(&m[j * n + j]));
    let vals = order.iter().map(|&k| m[k * n + k]).collect();
    let mut vecs = vec![0.0f64; n * n];
    for (dst, &k) in order.iter().enumerate() {
        for i in 0..n {
            vecs[i * n + dst] = v[i * n + k];
        }
    }
    (vals, vecs)
}

/// Mean and unbiased covariance (`np.cov(x, rowvar=False)`) of the rows of `x [n, d]`.
pub fn mean_cov(x: &[f32], n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(x.len(), n * d, "mean_cov: {} values for {n} rows of {d}", x.len());
    let mut mu = vec![0.0f64; d];
    for r in x.chunks(d) {
        for (m, &v) in mu.iter_mut().zip(r) {
            *m += v as f64;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    let mut cov = vec![0.0f64; d * d];
    let mut c = vec![0.0f64; d];
    for r in x.chunks(d) {
        for ((ci, &v), m) in c.iter_mut().zip(r).zip(&mu) {
            *ci = v as f64 - m;
        }
        for i in 0..d {
            let ci = c[i];
            for (o, &cj) in cov[i * d..(i + 1) * d].iter_mut().zip(&c) {
                *o += ci * cj;
            }
        }
    }
    let den = (n.max(2) - 1) as f64;
    cov.iter_mut().for_each(|v| *v /= den);
    (mu, cov)
}

/// `tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})` = `tr(sqrtm(Σ₁ Σ₂))` for symmetric positive semi-definite
/// `d × d` matrices (negative rounding noise in the eigenvalues is clamped to zero).
fn trace_sqrt_product(s1: &[f64], s2: &[f64], d: usize) -> f64 {
    let (l, q) = sym_eigen(s1, d);
    // R = Q diag(√λ) Qᵀ
    let mut r = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            r[i * d + j] = (0..d).map(|k| q[i * d + k] * l[k].max(0.0).sqrt() * q[j * d + k]).sum();
        }
    }
    // M = R Σ₂ R
    let mul = |a: &[f64], b: &[f64]| -> Vec<f64> {
        let mut o = vec![0.0f64; d * d];
        for i in 0..d {
            for k in 0..d {
                let aik = a[i * d + k];
                if aik != 0.0 {
                    for (oj, &bj) in o[i * d..(i + 1) * d].iter_mut().zip(&b[k * d..(k + 1) * d]) {
                        *oj += aik * bj;
                    }
                }
            }
        }
        o
    };
    let m = mul(&mul(&r, s2), &r);
    sym_eigen(&m, d).0.iter().map(|&e| e.max(0.0).sqrt()).sum()
}

/// The Fréchet distance between two Gaussians `(μ₁, Σ₁)` and `(μ₂, Σ₂)` in `d` dimensions.
pub fn frechet_from_stats(mu1: &[f64], s1: &[f64], mu2: &[f64], s2: &[f64], d: usize) -> f64 {
    let dm: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let tr = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    (dm + tr(s1) + tr(s2) - 2.0 * trace_sqrt_product(s1, s2, d)).max(0.0)
}

/// The Fréchet distance between the feature sets `a [na, d]` and `b [nb, d]` (each at least 2 rows).
pub fn frechet_distance(a: &[f32], na: usize, b: &[f32], nb: usize, d: usize) -> f64 {
    let (m1, s1) = mean_cov(a, na, d);
    let (m2, s2) = mean_cov(b, nb, d);
    frechet_from_stats(&m1, &s1, &m2, &s2, d)
}

/// The Vendi score of the rows of `x [n, d]` with the cosine-similarity kernel: `exp(−Σ λ log λ)`
/// over the eigenvalues `λ` of `K / n`, `K = X̂ X̂ᵀ` for the unit-normalised rows `X̂`. The
/// nonzero eigenvalues of `K / n` are those of the `d × d` matrix `X̂ᵀ X̂ / n`, whichever is smaller
/// is decomposed. A zero row counts as a row of its own direction (it is left at zero: it adds
/// nothing to `K` and lowers the score).
pub fn vendi_score(x: &[f32], n: usize, d: usize) -> f64 {
    assert_eq!(x.len(), n * d, "vendi_score: {} values for {n} rows of {d}", x.len());
    if n == 0 {
        return 0.0;
    }
    let rows: Vec<Vec<f64>> = x
        .chunks(d)
        .map(|r| {
            let norm = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            r.iter().map(|&v| if norm > 0.0 { v as f64 / norm } else { 0.0 }).collect()
        })
        .collect();
    let (k, size) = if n <= d {
        let mut k = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                k[i * n + j] = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum::<f64>() / n as f64;
            }
        }
        (k, n)
    } else {
        let mut k = vec![0.0f64; d * d];
        for r in &rows {
            for i in 0..d {
                let ri = r[i] / n as f64;
                for (o, &rj) in k[i * d..(i + 1) * d].iter_mut().zip(r) {
                    *o += ri * rj;
                }
            }
        }
        (k, d)
    };
    let h: f64 = sym_eigen(&k, size).0.iter().filter(|&&l| l > 1e-15).map(|&l| -l * l.ln()).sum();
    h.exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_reconstructs_the_matrix() {
        let mut r = crate::rng::Rng::new(3);
        let n = 17;
        let b: Vec<f64> = (0..n * n).map(|_| r.normal() as f64).collect();
        let a: Vec<f64> = (0..n * n).map(|k| (b[k] + b[(k % n) * n + k / n]) / 2.0).collect();
        let (l, q) = sym_eigen(&a, n);
        assert!(l.windows(2).all(|w| w[0] <= w[1]));
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n).map(|k| q[i * n + k] * l[k] * q[j * n + k]).sum();
                assert!((s - a[i * n + j]).abs() < 1e-10, "{i},{j}: {s} vs {}", a[i * n + j]);
            }
        }
    }

    #[test]
    fn frechet_of_a_set_with_itself_is_zero_and_shifts_add_their_square() {
        let mut r = crate::rng::Rng::new(5);
        let (n, d) = (200, 6);
        let a = r.normal_vec(n * d);
        assert!(frechet_distance(&a, n, &a, n, d) < 1e-9);
        let b: Vec<f32> = a.iter().map(|v| v + 0.5).collect();
        // a pure shift by 0.5 in every dimension: ‖Δμ‖² = 6 · 0.25
        assert!((frechet_distance(&a, n, &b, n, d) - 1.5).abs() < 1e-6);
    }

    #[test]
    fn vendi_counts_distinct_directions() {
        // 12 copies each of 3 orthogonal directions: exactly 3
        let d = 5;
        let mut x = Vec::new();
        for k in 0..36 {
            let mut row = vec![0.0f32; d];
            row[k % 3] = 1.0 + (k / 3) as f32;
            x.extend(row);
        }
        assert!((vendi_score(&x, 36, d) - 3.0).abs() < 1e-9);
        // the same through the n × n kernel (n < d)
        let x2: Vec<f32> = x[..3 * d].to_vec();
        assert!((vendi_score(&x2, 3, d) - 3.0).abs() < 1e-9);
    }
}
