//! Group normalisation over `[N, C, *]` (statistics in f64 accumulators, biased variance).

use rayon::prelude::*;

/// `(mean, rstd)` of one group's block: two passes in f64 (mean, then the biased variance),
/// rounded once to f32. Shared with the fused GroupNorm+SiLU node, whose statistics must be these.
pub fn block_stats(xb: &[f32], eps: f32) -> (f32, f32) {
    let mean = block_sum(xb, None) / xb.len() as f64;
    let var = block_sum(xb, Some(mean)) / xb.len() as f64;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// Independent f64 accumulators of [`block_sum`]: one add waiting on the last per element made the
/// statistics a third of GroupNorm's time; eight chains fill a vector register (the lanes are added
/// in order at the end, so every instruction-set level sums alike).
const STAT_LANES: usize = 8;

crate::multiversion! {
    /// `Σ x` (`mean` = None) or `Σ (x − mean)²` in f64.
    fn block_sum(xb: &[f32], mean: Option<f64>) -> f64 {
        let mut acc = [0.0f64; STAT_LANES];
        let n = xb.len() / STAT_LANES * STAT_LANES;
        match mean {
            None => {
                for xc in xb[..n].chunks_exact(STAT_LANES) {
                    for l in 0..STAT_LANES {
                        acc[l] += xc[l] as f64;
                    }
                }
                for (l, &v) in xb[n..].iter().enumerate() {
                    acc[l] += v as f64;
                }
            }
            Some(m) => {
                for xc in xb[..n].chunks_exact(STAT_LANES) {
                    for l in 0..STAT_LANES {
                        let d = xc[l] as f64 - m;
                        acc[l] += d * d;
                    }
                }
                for (l, &v) in xb[n..].iter().enumerate() {
                    let d = v as f64 - m;
                    acc[l] += d * d;
                }
            }
        }
        acc.iter().sum()
    }
}

/// Forward: returns `(y, mean, rstd)` with `mean`, `rstd` of length `n·groups`.
pub fn group_norm_forward(x: &[f32], n: usize, c: usize, s: usize, groups: usize, eps: f32, gamma: &[f32], beta: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let cpg = c / groups;
    let blk = cpg * s;
    let mut y = vec![0.0f32; n * c * s];
    let stats: Vec<(f32, f32)> = y
        .par_chunks_mut(blk)
        .enumerate()
        .map(|(ng, yb)| {
            let xb = &x[ng * blk..(ng + 1) * blk];
            let (meanf, rstd) = block_stats(xb, eps);
            let g0 = (ng % groups) * cpg;
            for ci in 0..cpg {
                let (ga, be) = (gamma[g0 + ci] * rstd, beta[g0 + ci]);
                let sh = be - meanf * ga;
                for (o, &v) in yb[ci * s..(ci + 1) * s].iter_mut().zip(&xb[ci * s..(ci + 1) * s]) {
                    *o = v * ga + sh;
                }
            }
            (meanf, rstd)
        })
        .collect();
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// Backward: returns `(dx, dgamma, dbeta)`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(x: &[f32], dy: &[f32], n: usize, c: usize, s: usize, groups: usize, gamma: &[f32], mean: &[f32], rstd: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let cpg = c / groups;
    let blk = cpg * s;
    let mut dx = vec![0.0f32; n * c * s];
    // per (n, channel) partial sums of dy·x̂ and dy
    let partials: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(blk)
        .enumerate()
        .map(|(ng, dxb)| {
            let xb = &x[ng * blk..(ng + 1) * blk];
            let gb = &dy[ng * blk..(ng + 1) * blk];
            let (m, r) = (mean[ng], rstd[ng]);
            let g0 = (ng % groups) * cpg;
            let mut part = Vec::with_capacity(cpg);
            let (mut sum_dxh, mut sum_dxh_xh) = (0.0f64, 0.0f64);
            for ci in 0..cpg {
                let ga = gamma[g0 + ci] as f64;
                let (mut a, mut b) = (0.0f64, 0.0f64);
                for (&xv, &gv) in xb[ci * s..(ci + 1) * s].iter().zip(&gb[ci * s..(ci + 1) * s]) {
                    let xh = ((xv - m) * r) as f64;
                    a += gv as f64 * xh;
                    b += gv as f64;
                }
                sum_dxh += b * ga;
                sum_dxh_xh += a * ga;
                part.push((a, b));
            }
            let inv = 1.0 / blk as f64;
            let (mdxh, mdxhxh) = ((sum_dxh * inv) as f32, (sum_dxh_xh * inv) as f32);
            for ci in 0..cpg {
                let ga = gamma[g0 + ci];
                for ((o, &xv), &gv) in dxb[ci * s..(ci + 1) * s].iter_mut().zip(&xb[ci * s..(ci + 1) * s]).zip(&gb[ci * s..(ci + 1) * s]) {
                    let xh = (xv - m) * r;
                    *o = r * (gv * ga - mdxh - xh * mdxhxh);
                }
            }
            part
        })
        .collect();
    let mut dgamma = vec![0.0f64; c];
    let mut dbeta = vec![0.0f64; c];
    for (ng, part) in partials.iter().enumerate() {
        let g0 = (ng % groups) * cpg;
        for (ci, &(a, b)) in part.iter().enumerate() {
            dgamma[g0 + ci] += a;
            dbeta[g0 + ci] += b;
        }
    }
    (dx, dgamma.into_iter().map(|v| v as f32).collect(), dbeta.into_iter().map(|v| v as f32).collect())
}
