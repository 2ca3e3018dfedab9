//! torchcfm's QKV self-attention (`QKVAttentionLegacy` and `QKVAttention`), fused:
//! `qkv [B, 3·C, T] → out [B, C, T]`, softmax over keys, scale 1/√ch (as (q·s)(k·s), s = ch^-¼).

use rayon::prelude::*;

use super::gemm::{Mat, sgemm};
use super::simd::{softmax_backward_inplace, softmax_inplace};

pub use crate::backend::geom::{AttnGeom, QkvOrder};

/// Forward. Returns `(out [B, C, T], probs [B·H, T, T])`; the probabilities are kept for backward.
pub fn qkv_attention_forward(qkv: &[f32], g: &AttnGeom) -> (Vec<f32>, Vec<f32>) {
    let (t, ch) = (g.t, g.ch);
    let scale = 1.0 / (ch as f32).sqrt();
    let mut out = vec![0.0f32; g.b * g.heads * ch * t];
    let mut probs = vec![0.0f32; g.b * g.heads * t * t];
    out.par_chunks_mut(ch * t).zip(probs.par_chunks_mut(t * t)).enumerate().for_each(|(bh, (o, p))| {
        let (bi, h) = (bh / g.heads, bh % g.heads);
        let (oq, ok, ov) = g.offsets(bi, h);
        let q = &qkv[oq..oq + ch * t];
        let k = &qkv[ok..ok + ch * t];
        let v = &qkv[ov..ov + ch * t];
        // S[t, s] = Σ_c q[c, t] k[c, s] · scale
        sgemm(t, t, ch, Mat::rm_t(q, t), Mat::rm(k, t), p, t, false, scale, 1);
        for row in p.chunks_mut(t) {
            softmax_inplace(row);
        }
        // out[c, t] = Σ_s v[c, s] P[t, s]
        sgemm(ch, t, t, Mat::rm(v, t), Mat::rm_t(p, t), o, t, false, 1.0, 1);
    });
    (out, probs)
}

/// Backward: `dqkv` from `dout` and the saved probabilities.
pub fn qkv_attention_backward(qkv: &[f32], probs: &[f32], dout: &[f32], g: &AttnGeom) -> Vec<f32> {
    let (t, ch) = (g.t, g.ch);
    let scale = 1.0 / (ch as f32).sqrt();
    let per: Vec<(usize, Vec<f32>, Vec<f32>, Vec<f32>)> = (0..g.b * g.heads)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / g.heads, bh % g.heads);
            let (oq, ok, ov) = g.offsets(bi, h);
            let q = &qkv[oq..oq + ch * t];
            let k = &qkv[ok..ok + ch * t];
            let v = &qkv[ov..ov + ch * t];
            let p = &probs[bh * t * t..(bh + 1) * t * t];
            let d = &dout[bh * ch * t..(bh + 1) * ch * t];
            // dV[c, s] = Σ_t d[c, t] P[t, s]
            let mut dv = vec![0.0f32; ch * t];
            sgemm(ch, t, t, Mat::rm(d, t), Mat::rm(p, t), &mut dv, t, false, 1.0, 1);
            // dP[t, s] = Σ_c d[c, t] v[c, s]
            let mut dp = vec![0.0f32; t * t];
            sgemm(t, t, ch, Mat::rm_t(d, t), Mat::rm(v, t), &mut dp, t, false, 1.0, 1);
            // dS = softmax backward, in place in dP
            for (pr, gr) in p.chunks(t).zip(dp.chunks_mut(t)) {
                softmax_backward_inplace(pr, gr);
            }
            let ds = dp;
            // dQ[c, t] = scale Σ_s k[c, s] dS[t, s];  dK[c, s] = scale Σ_t q[c, t] dS[t, s]
            let mut dq = vec![0.0f32; ch * t];
            sgemm(ch, t, t, Mat::rm(k, t), Mat::rm_t(&ds, t), &mut dq, t, false, scale, 1);
            let mut dk = vec![0.0f32; ch * t];
            sgemm(ch, t, t, Mat::rm(q, t), Mat::rm(&ds, t), &mut dk, t, false, scale, 1);
            (bh, dq, dk, dv)
        })
        .collect();
    let mut dqkv = vec![0.0f32; qkv.len()];
    for (bh, dq, dk, dv) in per {
        let (bi, h) = (bh / g.heads, bh % g.heads);
        let (oq, ok, ov) = g.offsets(bi, h);
        dqkv[oq..oq + ch * t].copy_from_slice(&dq);
        dqkv[ok..ok + ch * t].copy_from_slice(&dk);
        dqkv[ov..ov + ch * t].copy_from_slice(&dv);
    }
    dqkv
}
