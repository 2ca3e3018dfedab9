//! Flash-style torchcfm QKV attention (`QKVAttentionLegacy` / `QKVAttention`, see
//! `cpu::attention`): `qkv [B, 3·C, T] → out [B, C, T]`, softmax over keys of
//! `(q·s)ᵀ(k·s)`, `s = ch^-¼` (applied here as one factor `1/√ch` on the scores, like
//! `attention_forward`).
//!
//! No more than one `br × bc` tile of the `T × T` score matrix exists per task at a time.
//! Forward: per query tile, an online softmax over key tiles (running max `m`, running sum `l`,
//! the output accumulator rescaled by `exp(m_old − m_new)`); it saves only the per-row
//! log-sum-exp `lse [B·heads, T]`. Backward (FlashAttention-2): `P = exp(S − lse)` recomputed per
//! tile, `D_i = Σ_c dO[c, i] O[c, i]`, `dS = P ∘ (dP − D)`, `dV += dOᵀ P`… accumulated over tiles.
//!
//! Forward tasks are `(batch·head, query tile)`; backward tasks are `batch·head`, each running its
//! key tiles (outer) and query tiles (inner) in order, so nothing depends on the thread count.

use rayon::prelude::*;

use crate::backend::cpu::attention::AttnGeom;
use crate::backend::cpu::gemm::{Mat, sgemm};
use crate::backend::cpu::simd::{exp_f32, sum};

/// Query and key tile length for long sequences (and the fewest query rows of a default tile).
pub const FLASH_TILE: usize = 64;

/// Floats in one task's `br × bc` score tile with the default tiles (the backward keeps two).
pub const FLASH_TILE_BUDGET: usize = 1 << 16;

/// The default `(br, bc)` for `t` positions: all keys in one tile while `FLASH_TILE` query rows of
/// them fit [`FLASH_TILE_BUDGET`] (no online rescaling; fewer, larger GEMMs: on a CPU the tile's
/// per-call overhead, not memory, is what small tiles cost), and as many query rows (a multiple of
/// 8) as fit with them; longer sequences get key tiles of `FLASH_TILE_BUDGET / FLASH_TILE`.
pub fn flash_tiles(t: usize) -> (usize, usize) {
    let bc = t.clamp(1, FLASH_TILE_BUDGET / FLASH_TILE);
    let br = (FLASH_TILE_BUDGET / bc / 8 * 8).max(FLASH_TILE).min(t.max(1));
    (br, bc)
}

/// `(q, k, v)` of one batch·head, each `[ch, T]` row-major.
fn qkv_of<'a>(qkv: &'a [f32], g: &AttnGeom, bh: usize) -> (&'a [f32], &'a [f32], &'a [f32]) {
    let n = g.ch * g.t;
    let (oq, ok, ov) = g.offsets(bh / g.heads, bh % g.heads);
    (&qkv[oq..oq + n], &qkv[ok..ok + n], &qkv[ov..ov + n])
}

fn check(qkv: usize, g: &AttnGeom, br: usize, bc: usize) {
    assert!(br > 0 && bc > 0, "flash attention: tile sizes must be positive");
    assert_eq!(qkv, g.b * 3 * g.heads * g.ch * g.t, "flash attention: qkv length does not match {g:?}");
}

dispatch! {
    /// `row ← exp(row − m)`; returns the row's sum.
    fn exp_shift_sum(row: &mut [f32], m: f32) -> f32 {
        for v in row.iter_mut() {
            *v = exp_f32(*v - m);
        }
        sum(row)
    }
}

dispatch! {
    /// `p ← exp(s − lse)` in `s`, then `dp ← p ∘ (dp − d)`.
    fn probs_and_ds(s: &mut [f32], dp: &mut [f32], lse: f32, d: f32) {
        for (p, g) in s.iter_mut().zip(dp.iter_mut()) {
            *p = exp_f32(*p - lse);
            *g = *p * (*g - d);
        }
    }
}

/// Forward with the default tiles ([`flash_tiles`]): `(out [B, C, T], lse [B·heads, T])`.
pub fn flash_attention_forward(qkv: &[f32], g: &AttnGeom) -> (Vec<f32>, Vec<f32>) {
    let (br, bc) = flash_tiles(g.t);
    flash_attention_forward_tiled(qkv, g, br, bc)
}

/// Forward with query tiles of `br` rows and key tiles of `bc` columns.
pub fn flash_attention_forward_tiled(qkv: &[f32], g: &AttnGeom, br: usize, bc: usize) -> (Vec<f32>, Vec<f32>) {
    check(qkv.len(), g, br, bc);
    let (t, ch, nbh) = (g.t, g.ch, g.b * g.heads);
    let scale = 1.0 / (ch as f32).sqrt();
    // accumulate per query row ([bh, T, ch]), transposed into [bh, ch, T] at the end
    let mut out_t = vec![0.0f32; nbh * t * ch];
    let mut lse = vec![0.0f32; nbh * t];
    if t == 0 || ch == 0 {
        return (out_t, lse);
    }
    out_t.par_chunks_mut(t * ch).zip(lse.par_chunks_mut(t)).enumerate().for_each(|(bh, (ot, lb))| {
        let (q, k, v) = qkv_of(qkv, g, bh);
        ot.par_chunks_mut(br * ch).zip(lb.par_chunks_mut(br)).enumerate().for_each(|(qi, (acc, lrow))| {
            let (i0, bi) = (qi * br, lrow.len());
            let mut s = vec![0.0f32; bi * bc.min(t)];
            let mut m = vec![f32::NEG_INFINITY; bi];
            let mut l = vec![0.0f32; bi];
            for j0 in (0..t).step_by(bc) {
                let bj = bc.min(t - j0);
                // S[i, j] = scale Σ_c q[c, i0 + i] k[c, j0 + j]
                sgemm(bi, bj, ch, Mat::rm_t(&q[i0..], t), Mat::rm(&k[j0..], t), &mut s, bj, false, scale, 1);
                for r in 0..bi {
                    let row = &mut s[r * bj..(r + 1) * bj];
                    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mn = m[r].max(mx);
                    let sum = exp_shift_sum(row, mn);
                    if m[r] != f32::NEG_INFINITY && m[r] != mn {
                        let corr = exp_f32(m[r] - mn);
                        l[r] *= corr;
                        for a in &mut acc[r * ch..(r + 1) * ch] {
                            *a *= corr;
                        }
                    }
                    l[r] += sum;
                    m[r] = mn;
                }
                // acc[i, c] += Σ_j P[i, j] v[c, j0 + j]
                sgemm(bi, ch, bj, Mat::rm(&s, bj), Mat::rm_t(&v[j0..], t), acc, ch, true, 1.0, 1);
            }
            for r in 0..bi {
                let inv = 1.0 / l[r];
                for a in &mut acc[r * ch..(r + 1) * ch] {
                    *a *= inv;
                }
                lrow[r] = m[r] + l[r].ln();
            }
        });
    });
    let mut out = vec![0.0f32; nbh * ch * t];
    out.par_chunks_mut(ch * t).zip(out_t.par_chunks(t * ch)).for_each(|(o, ot)| {
        for (i, row) in ot.chunks(ch).enumerate() {
            for (c, &val) in row.iter().enumerate() {
                o[c * t + i] = val;
            }
        }
    });
    (out, lse)
}

/// Backward with the default tiles ([`flash_tiles`]): `dqkv` from the forward's `out`, `lse` and `dout`.
pub fn flash_attention_backward(qkv: &[f32], out: &[f32], lse: &[f32], dout: &[f32], g: &AttnGeom) -> Vec<f32> {
    let (br, bc) = flash_tiles(g.t);
    flash_attention_backward_tiled(qkv, out, lse, dout, g, br, bc)
}

/// Backward with query tiles of `br` rows and key tiles of `bc` columns.
pub fn flash_attention_backward_tiled(qkv: &[f32], out: &[f32], lse: &[f32], dout: &[f32], g: &AttnGeom, br: usize, bc: usize) -> Vec<f32> {
    check(qkv.len(), g, br, bc);
    let (t, ch, nbh) = (g.t, g.ch, g.b * g.heads);
    let n = ch * t;
    assert!(out.len() == nbh * n && dout.len() == nbh * n && lse.len() == nbh * t, "flash attention backward: out/dout/lse lengths");
    let scale = 1.0 / (ch as f32).sqrt();
    let mut dqkv = vec![0.0f32; qkv.len()];
    if t == 0 || ch == 0 {
        return dqkv;
    }
    let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..nbh)
        .into_par_iter()
        .map(|bh| {
            let (q, k, v) = qkv_of(qkv, g, bh);
            let o = &out[bh * n..(bh + 1) * n];
            let d_o = &dout[bh * n..(bh + 1) * n];
            let lb = &lse[bh * t..(bh + 1) * t];
            // D_i = Σ_c dO[c, i] O[c, i]
            let mut dsum = vec![0.0f64; t];
            for (orow, grow) in o.chunks(t).zip(d_o.chunks(t)) {
                for ((acc, &a), &b) in dsum.iter_mut().zip(orow).zip(grow) {
                    *acc += a as f64 * b as f64;
                }
            }
            let dsum: Vec<f32> = dsum.into_iter().map(|x| x as f32).collect();
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            let mut s = vec![0.0f32; br.min(t) * bc.min(t)];
            let mut dp = vec![0.0f32; br.min(t) * bc.min(t)];
            for j0 in (0..t).step_by(bc) {
                let bj = bc.min(t - j0);
                for i0 in (0..t).step_by(br) {
                    let bi = br.min(t - i0);
                    // S = scale Q_iᵀ K_j, dP = dO_iᵀ V_j
                    sgemm(bi, bj, ch, Mat::rm_t(&q[i0..], t), Mat::rm(&k[j0..], t), &mut s, bj, false, scale, 1);
                    sgemm(bi, bj, ch, Mat::rm_t(&d_o[i0..], t), Mat::rm(&v[j0..], t), &mut dp, bj, false, 1.0, 1);
                    for r in 0..bi {
                        probs_and_ds(&mut s[r * bj..(r + 1) * bj], &mut dp[r * bj..(r + 1) * bj], lb[i0 + r], dsum[i0 + r]);
                    }
                    // dV[c, j0 + j] += Σ_i dO[c, i0 + i] P[i, j]
                    sgemm(ch, bj, bi, Mat::rm(&d_o[i0..], t), Mat::rm(&s, bj), &mut dv[j0..], t, true, 1.0, 1);
                    // dQ[c, i0 + i] += scale Σ_j k[c, j0 + j] dS[i, j]
                    sgemm(ch, bi, bj, Mat::rm(&k[j0..], t), Mat::rm_t(&dp, bj), &mut dq[i0..], t, true, scale, 1);
                    // dK[c, j0 + j] += scale Σ_i q[c, i0 + i] dS[i, j]
                    sgemm(ch, bj, bi, Mat::rm(&q[i0..], t), Mat::rm(&dp, bj), &mut dk[j0..], t, true, scale, 1);
                }
            }
            (dq, dk, dv)
        })
        .collect();
    for (bh, (dq, dk, dv)) in per.into_iter().enumerate() {
        let (oq, ok, ov) = g.offsets(bh / g.heads, bh % g.heads);
        dqkv[oq..oq + n].copy_from_slice(&dq);
        dqkv[ok..ok + n].copy_from_slice(&dk);
        dqkv[ov..ov + n].copy_from_slice(&dv);
    }
    dqkv
}
