//! `y = act(GN(x) · (1 + scale) + shift)`: GroupNorm with affine `gamma`/`beta` over `x [N, C, S]`,
//! an optional per-(sample, channel) `scale`/`shift [N, C]` (torchcfm's ResBlock with
//! `use_scale_shift_norm`: `silu(out_norm(h) · (1 + scale) + shift)`; without them it is the
//! in-layers' `silu(GN(x))`), then `act` (none or SiLU).
//!
//! Conventions of `norm.rs`: statistics per `(n, group)` block with f64 accumulators and the biased
//! variance, `mean`/`rstd` saved in f32 (bitwise those of `group_norm_forward`), the normalised
//! value computed as `x · (γ·rstd) + (β − mean·γ·rstd)`.
//!
//! Backward saves nothing but `mean`, `rstd [N·groups]`; it recomputes the pre-activation from `x`.

use crate::backend::cpu::norm::block_stats;
use crate::backend::cpu::simd::exp_f32;

/// The activation after the (modulated) normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Silu,
}

/// GroupNorm geometry: `x [n, c, s]` in `groups` groups of `c / groups` channels.
#[derive(Clone, Copy, Debug)]
pub struct GnGeom {
    pub n: usize,
    pub c: usize,
    /// spatial size per channel (H·W)
    pub s: usize,
    pub groups: usize,
    pub eps: f32,
}

impl GnGeom {
    fn check(&self, x: usize, gamma: usize, beta: usize, scale: Option<usize>, shift: Option<usize>) {
        assert!(self.groups > 0 && self.c.is_multiple_of(self.groups), "group_norm_act: {} channels in {} groups", self.c, self.groups);
        assert_eq!(x, self.n * self.c * self.s, "group_norm_act: x length");
        assert!(gamma == self.c && beta == self.c, "group_norm_act: gamma/beta length");
        for l in [scale, shift].into_iter().flatten() {
            assert_eq!(l, self.n * self.c, "group_norm_act: scale/shift must be [N, C]");
        }
    }
}

/// Gradients of [`group_norm_act_backward`]; `dscale`/`dshift` are present when the inputs were.
pub struct GnActGrads {
    pub dx: Vec<f32>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
    pub dscale: Option<Vec<f32>>,
    pub dshift: Option<Vec<f32>>,
}

dispatch! {
    /// One channel row forward: `y = act((x·ga + sh)·sc1 + shv)`.
    fn row_forward(x: &[f32], y: &mut [f32], ga: f32, sh: f32, sc1: f32, shv: f32, silu: bool) {
        if silu {
            for (o, &v) in y.iter_mut().zip(x) {
                let a = (v * ga + sh) * sc1 + shv;
                *o = a * (1.0 / (1.0 + exp_f32(-a)));
            }
        } else {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = (v * ga + sh) * sc1 + shv;
            }
        }
    }
}

dispatch! {
    /// One channel row of the backward's first pass: `da = dy · act'(a)` into `da`.
    fn row_dact(x: &[f32], dy: &[f32], da: &mut [f32], ga: f32, sh: f32, sc1: f32, shv: f32, silu: bool) {
        if silu {
            for ((o, &v), &g) in da.iter_mut().zip(x).zip(dy) {
                let a = (v * ga + sh) * sc1 + shv;
                let s = 1.0 / (1.0 + exp_f32(-a));
                *o = g * s * (1.0 + a * (1.0 - s));
            }
        } else {
            da.copy_from_slice(dy);
        }
    }
}

dispatch! {
    /// One channel row of the backward's second pass, in place over `da`:
    /// `dx = r (da·(1 + scale)·γ − mean(dz γ) − x̂ mean(dz γ x̂))` with `x̂ = (x − m) r`.
    fn row_dx(x: &[f32], d: &mut [f32], m: f32, r: f32, sc1: f32, gam: f32, mdxh: f32, mdxhxh: f32) {
        for (o, &xv) in d.iter_mut().zip(x) {
            let xh = (xv - m) * r;
            *o = r * ((*o * sc1) * gam - mdxh - xh * mdxhxh);
        }
    }
}

/// Independent f64 accumulators per sum of [`row_sums`] (so that the sums vectorise instead of
/// waiting on one add each; the lanes are added in order at the end).
const LANES: usize = 8;

dispatch! {
    /// `(Σ d, Σ d·x)` of one row in f64 (each product `d·x` of two f32 is exact in f64).
    fn row_sums(x: &[f32], d: &[f32]) -> [f64; 2] {
        let (mut s, mut sx) = ([0.0f64; LANES], [0.0f64; LANES]);
        let n = x.len() / LANES * LANES;
        for (xc, dc) in x[..n].chunks_exact(LANES).zip(d[..n].chunks_exact(LANES)) {
            for l in 0..LANES {
                s[l] += dc[l] as f64;
                sx[l] += dc[l] as f64 * xc[l] as f64;
            }
        }
        for (l, (&xv, &dv)) in x[n..].iter().zip(&d[n..]).enumerate() {
            s[l] += dv as f64;
            sx[l] += dv as f64 * xv as f64;
        }
        [s.iter().sum(), sx.iter().sum()]
    }
}

/// `(1 + scale, shift)` for sample `ni`, channel `ch`.
#[inline]
fn modulation(scale: Option<&[f32]>, shift: Option<&[f32]>, c: usize, ni: usize, ch: usize) -> (f32, f32) {
    (scale.map_or(1.0, |s| 1.0 + s[ni * c + ch]), shift.map_or(0.0, |s| s[ni * c + ch]))
}

/// Forward: returns `(y [N, C, S], mean [N·groups], rstd [N·groups])`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act_forward(x: &[f32], g: &GnGeom, gamma: &[f32], beta: &[f32], scale: Option<&[f32]>, shift: Option<&[f32]>, act: Act) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    g.check(x.len(), gamma.len(), beta.len(), scale.map(<[f32]>::len), shift.map(<[f32]>::len));
    let (c, s, groups) = (g.c, g.s, g.groups);
    let cpg = c / groups;
    let blk = cpg * s;
    if blk == 0 {
        return (vec![0.0; x.len()], vec![0.0; g.n * groups], vec![0.0; g.n * groups]);
    }
    let (y, stats) = crate::backend::cpu::par_fill_chunks(x.len(), blk, |ng, yb| {
        let xb = &x[ng * blk..(ng + 1) * blk];
        let (mean, rstd) = block_stats(xb, g.eps);
        let (ni, g0) = (ng / groups, (ng % groups) * cpg);
        for ci in 0..cpg {
            let ch = g0 + ci;
            let ga = gamma[ch] * rstd;
            let sh = beta[ch] - mean * ga;
            let (sc1, shv) = modulation(scale, shift, c, ni, ch);
            row_forward(&xb[ci * s..(ci + 1) * s], &mut yb[ci * s..(ci + 1) * s], ga, sh, sc1, shv, act == Act::Silu);
        }
        (mean, rstd)
    });
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// Backward from `dy`, the forward's inputs and its saved `mean`, `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_act_backward(x: &[f32], dy: &[f32], g: &GnGeom, gamma: &[f32], beta: &[f32], scale: Option<&[f32]>, shift: Option<&[f32]>, act: Act, mean: &[f32], rstd: &[f32]) -> GnActGrads {
    g.check(x.len(), gamma.len(), beta.len(), scale.map(<[f32]>::len), shift.map(<[f32]>::len));
    assert_eq!(dy.len(), x.len(), "group_norm_act_backward: dy length");
    assert!(mean.len() == g.n * g.groups && rstd.len() == g.n * g.groups, "group_norm_act_backward: mean/rstd length");
    let (n, c, s, groups) = (g.n, g.c, g.s, g.groups);
    let cpg = c / groups;
    let blk = cpg * s;
    // per (n, channel): (Σ dz·x̂, Σ dz, Σ da·z, Σ da) with dz = da·(1 + scale), z = GN(x)
    let (dx, partials): (Vec<f32>, Vec<Vec<[f64; 4]>>) = if blk == 0 {
        (vec![0.0; x.len()], vec![Vec::new(); n * groups])
    } else {
        // pass 1 writes every value of the block (da) before pass 2 reads it
        crate::backend::cpu::par_fill_chunks(x.len(), blk, |ng, dxb| {
            let xb = &x[ng * blk..(ng + 1) * blk];
            let gb = &dy[ng * blk..(ng + 1) * blk];
            let (m, r) = (mean[ng], rstd[ng]);
            let (ni, g0) = (ng / groups, (ng % groups) * cpg);
            let mut part = Vec::with_capacity(cpg);
            let (mut sum_dxh, mut sum_dxh_xh) = (0.0f64, 0.0f64);
            // pass 1: da (kept in dx) and the per-channel sums
            for ci in 0..cpg {
                let ch = g0 + ci;
                let ga = gamma[ch] * r;
                let sh = beta[ch] - m * ga;
                let (sc1, shv) = modulation(scale, shift, c, ni, ch);
                let (xr, dar) = (&xb[ci * s..(ci + 1) * s], &mut dxb[ci * s..(ci + 1) * s]);
                row_dact(xr, &gb[ci * s..(ci + 1) * s], dar, ga, sh, sc1, shv, act == Act::Silu);
                // Σ da·x̂ = r (Σ da·x − m Σ da) and Σ da·z = ga Σ da·x + sh Σ da, z = x·ga + sh
                let [b, sdx] = row_sums(xr, dar);
                let a = r as f64 * (sdx - m as f64 * b);
                let cz = ga as f64 * sdx + sh as f64 * b;
                let (sc1, gam) = (sc1 as f64, gamma[ch] as f64);
                sum_dxh += sc1 * b * gam;
                sum_dxh_xh += sc1 * a * gam;
                part.push([sc1 * a, sc1 * b, cz, b]);
            }
            // pass 2: dx = rstd (dz γ − mean(dz γ) − x̂ mean(dz γ x̂))
            let inv = 1.0 / blk as f64;
            let (mdxh, mdxhxh) = ((sum_dxh * inv) as f32, (sum_dxh_xh * inv) as f32);
            for ci in 0..cpg {
                let ch = g0 + ci;
                let (sc1, _) = modulation(scale, shift, c, ni, ch);
                row_dx(&xb[ci * s..(ci + 1) * s], &mut dxb[ci * s..(ci + 1) * s], m, r, sc1, gamma[ch], mdxh, mdxhxh);
            }
            part
        })
    };
    let mut dgamma = vec![0.0f64; c];
    let mut dbeta = vec![0.0f64; c];
    let mut dscale = scale.map(|_| vec![0.0f32; n * c]);
    let mut dshift = shift.map(|_| vec![0.0f32; n * c]);
    for (ng, part) in partials.iter().enumerate() {
        let (ni, g0) = (ng / groups, (ng % groups) * cpg);
        for (ci, p) in part.iter().enumerate() {
            let ch = g0 + ci;
            dgamma[ch] += p[0];
            dbeta[ch] += p[1];
            if let Some(d) = dscale.as_mut() {
                d[ni * c + ch] = p[2] as f32;
            }
            if let Some(d) = dshift.as_mut() {
                d[ni * c + ch] = p[3] as f32;
            }
        }
    }
    GnActGrads { dx, dgamma: dgamma.into_iter().map(|v| v as f32).collect(), dbeta: dbeta.into_iter().map(|v| v as f32).collect(), dscale, dshift }
}
