//! Flash-style torchcfm QKV attention on f32 device data (`kernels/attention.cu`): the forward
//! (`out`, per-row log-sum-exp `lse`) and the FlashAttention-2 backward (`dqkv` in the packed
//! layout of either head order), never forming the `T × T` probabilities. CPU twins:
//! `cpu::fused::flash_attention_forward` / `flash_attention_backward`.
//!
//! Launches (all blocks [`THREADS`] threads, grid y = `B·heads` capped at 65 535, the kernels
//! loop past it):
//! * forward `flash_attention_forward_d{32,64,128}_f32`: grid x = ⌈T / 64⌉ query tiles, each
//!   block streams key tiles of 64; [`forward_smem_bytes`] of dynamic shared memory;
//! * backward: `flash_attention_backward_dsum_f32` (D = rowsum(dO ∘ O), grid-stride), then
//!   `flash_attention_backward_d{32,64,128}_f32` with grid x = ⌈T / BC⌉ key tiles (BC = 64, 32
//!   for d128; [`backward_smem_bytes`]), then, when there is more than one key tile,
//!   `flash_attention_backward_dq_f32` summing the tiles' dQ partials in order (deterministic:
//!   no atomics anywhere).
//!
//! The `dN` variant holds the head dimension padded to N: heads of up to [`MAX_HEAD_DIM`]
//! channels ([`supported`]); wider ones are the caller's to route elsewhere.
//!
//! Work per call ([`flops`], [`bytes`]), for benchmarks: the forward does `4·BH·T²·ch` flops
//! (two `T × T × ch` products per head) and the backward `10·BH·T²·ch` (S and dP recomputed, dV,
//! dK, dQ), `BH = B·heads`, not counting the exponentials (`BH·T²` forward, as many backward).
//! The least DRAM traffic (each tensor read or written once) is `4·(4·BH·ch·T + BH·T)` bytes
//! forward (qkv in, out and lse out) and `4·(9·BH·ch·T + 3·BH·T)` backward, plus `8·k·BH·ch·T`
//! for the dQ partials when there are `k > 1` key tiles ([`bytes`]); the key/value (forward) and
//! query/gradient (backward) tiles that every block re-reads come from L2 in practice.

use anyhow::{Result, bail};

use super::f32ops::{f32_out, want_f32, want_len};
use super::gpu::{Arg, Launch};
use super::storage::{CudaStorage, same_gpu};
use crate::backend::geom::{AttnGeom, QkvOrder};
use crate::tensor::DType;

/// Threads per block of the tiled kernels (16 rows of 8 lanes).
pub const THREADS: u32 = 128;
/// Queries per forward block, keys per streamed forward tile.
pub const FWD_TILE: usize = 64;
/// Queries per tile of the backward's inner loop.
pub const BWD_QUERY_TILE: usize = 32;
/// The widest head the kernels take.
pub const MAX_HEAD_DIM: usize = 128;

/// Whether the kernels take this geometry (heads of at most [`MAX_HEAD_DIM`] channels).
pub fn supported(a: &AttnGeom) -> bool {
    a.ch <= MAX_HEAD_DIM
}

/// The kernel variant for `ch` channels per head: `(padded head dimension, backward key tile)`.
pub fn variant(ch: usize) -> Result<(usize, usize)> {
    Ok(match ch {
        0..=32 => (32, 64),
        33..=64 => (64, 64),
        65..=128 => (128, 32),
        _ => bail!("flash_attention: heads of {ch} channels (the CUDA kernels take at most {MAX_HEAD_DIM})"),
    })
}

/// Dynamic shared memory of a forward block for padded head dimension `dp` (the layout at the
/// top of the kernel file's `flash_fwd`): Q [dp][64], K [dp][64] then Vᵀ [64][dp + 4], Pᵀ [64][64].
pub fn forward_smem_bytes(dp: usize) -> u32 {
    (4 * (dp * FWD_TILE + FWD_TILE * (dp + 4) + FWD_TILE * FWD_TILE)) as u32
}

/// Dynamic shared memory of a backward block (`flash_bwd`'s layout): K, V [dp][bc + 4],
/// Q, dO [dp][36], P, dS [32][bc + 4], dSᵀ [bc][36], lse and D [32].
pub fn backward_smem_bytes(dp: usize, bc: usize) -> u32 {
    let br = BWD_QUERY_TILE;
    (4 * (2 * dp * (bc + 4) + 2 * dp * (br + 4) + 2 * br * (bc + 4) + bc * (br + 4) + 2 * br)) as u32
}

/// `(forward, backward)` flops of one call (multiply-adds counted as two).
pub fn flops(a: &AttnGeom) -> (f64, f64) {
    let w = (a.b * a.heads) as f64 * (a.t as f64).powi(2) * a.ch as f64;
    (4.0 * w, 10.0 * w)
}

/// `(forward, backward)` bytes of DRAM traffic with every tensor touched once: forward reads qkv
/// and writes out and lse; backward reads out and dout (for D), writes D, then reads qkv, dout,
/// lse and D and writes dqkv, plus, with `k = ⌈T / BC⌉ > 1` key tiles, writes and reads the `k`
/// dQ partials.
pub fn bytes(a: &AttnGeom) -> (f64, f64) {
    let (bh, ch, t) = ((a.b * a.heads) as f64, a.ch as f64, a.t as f64);
    let n = bh * ch * t;
    let fwd = 4.0 * (3.0 * n + n + bh * t);
    let bc = variant(a.ch).map(|v| v.1).unwrap_or(64);
    let k = a.t.div_ceil(bc).max(1) as f64;
    let partials = if k > 1.0 { 2.0 * k * bh * ch * t } else { 0.0 };
    let bwd = 4.0 * ((2.0 * n + bh * t) + (3.0 * n + n + 2.0 * bh * t + 3.0 * n) + partials);
    (fwd, bwd)
}

fn order_code(o: QkvOrder) -> i64 {
    match o {
        QkvOrder::Legacy => 0,
        QkvOrder::New => 1,
    }
}

fn check(qkv: &CudaStorage, a: &AttnGeom, op: &str) -> Result<()> {
    want_f32(qkv, op)?;
    want_len(qkv, a.qkv_shape().iter().product(), op, "qkv")
}

/// The grid's y extent for `nbh` batch·heads.
fn grid_y(nbh: usize) -> u32 {
    nbh.clamp(1, 65_535) as u32
}

/// The geometry arguments every tiled kernel ends with.
fn geom_args(a: &AttnGeom) -> [Arg<'static>; 6] {
    [Arg::I64((a.b * a.heads) as i64), Arg::I64(a.heads as i64), Arg::I64(a.ch as i64), Arg::I64(a.t as i64), Arg::I64(order_code(a.order)), Arg::F32(1.0 / (a.ch as f32).sqrt())]
}

/// `(out [b, heads·ch, t], lse [b·heads, t])` of f32 `qkv [b, 3·heads·ch, t]` (CPU:
/// `cpu::fused::flash_attention_forward`).
pub fn flash_attention_forward(qkv: &CudaStorage, a: &AttnGeom) -> Result<(CudaStorage, CudaStorage)> {
    check(qkv, a, "flash_attention")?;
    let g = qkv.gpu().clone();
    let (nbh, ch, t) = (a.b * a.heads, a.ch, a.t);
    if nbh * t == 0 || ch == 0 {
        // as the CPU twin: an empty output, log-sum-exps of 0
        return Ok((f32_out(&g, nbh * ch * t)?, CudaStorage::full(&g, nbh * t, 0.0, DType::F32)?));
    }
    let (dp, _) = variant(ch)?;
    let out = f32_out(&g, nbh * ch * t)?;
    let lse = f32_out(&g, nbh * t)?;
    let cfg = Launch::dims((t.div_ceil(FWD_TILE) as u32, grid_y(nbh), 1), (THREADS, 1, 1)).with_shared(forward_smem_bytes(dp));
    let mut args = vec![Arg::Ptr(qkv.ptr()), Arg::Ptr(out.ptr()), Arg::Ptr(lse.ptr())];
    args.extend(geom_args(a));
    g.launch(&format!("flash_attention_forward_d{dp}_f32"), cfg, &args)?;
    Ok((out, lse))
}

/// `dqkv` (packed like `qkv`) from f32 `qkv`, the forward's `out` and `lse`, and `dout` (CPU:
/// `cpu::fused::flash_attention_backward`).
pub fn flash_attention_backward(qkv: &CudaStorage, out: &CudaStorage, lse: &CudaStorage, dout: &CudaStorage, a: &AttnGeom) -> Result<CudaStorage> {
    let g = same_gpu("flash_attention_backward", &[qkv, out, lse, dout])?;
    check(qkv, a, "flash_attention_backward")?;
    let (nbh, ch, t) = (a.b * a.heads, a.ch, a.t);
    let n = nbh * ch * t;
    for (x, len, what) in [(out, n, "the output"), (dout, n, "the output gradient"), (lse, nbh * t, "the log-sum-exps")] {
        want_f32(x, "flash_attention_backward")?;
        want_len(x, len, "flash_attention_backward", what)?;
    }
    let dqkv = f32_out(&g, qkv.elements())?;
    if qkv.elements() == 0 {
        return Ok(dqkv);
    }
    let (dp, bc) = variant(ch)?;
    let dsum = f32_out(&g, nbh * t)?;
    g.launch_n("flash_attention_backward_dsum_f32", nbh * t, &[Arg::Ptr(out.ptr()), Arg::Ptr(dout.ptr()), Arg::Ptr(dsum.ptr()), Arg::I64(nbh as i64), Arg::I64(ch as i64), Arg::I64(t as i64)])?;
    let nkt = t.div_ceil(bc);
    // one key tile: dQ goes straight into dqkv (the kernel ignores dqp)
    let dqp = if nkt > 1 { Some(f32_out(&g, nkt * n)?) } else { None };
    let cfg = Launch::dims((nkt as u32, grid_y(nbh), 1), (THREADS, 1, 1)).with_shared(backward_smem_bytes(dp, bc));
    let mut args = vec![Arg::Ptr(qkv.ptr()), Arg::Ptr(dout.ptr()), Arg::Ptr(lse.ptr()), Arg::Ptr(dsum.ptr()), Arg::Ptr(dqkv.ptr()), Arg::Ptr(dqp.as_ref().map_or(dqkv.ptr(), |p| p.ptr()))];
    args.extend(geom_args(a));
    g.launch(&format!("flash_attention_backward_d{dp}_f32"), cfg, &args)?;
    if let Some(p) = &dqp {
        let a = [Arg::Ptr(p.ptr()), Arg::Ptr(dqkv.ptr()), Arg::I64(nkt as i64), Arg::I64(nbh as i64), Arg::I64(a.heads as i64), Arg::I64(ch as i64), Arg::I64(t as i64), Arg::I64(order_code(a.order))];
        g.launch_n("flash_attention_backward_dq_f32", n, &a)?;
    }
    Ok(dqkv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_cover_every_head_up_to_128_and_fit_the_shared_memory() {
        assert_eq!(variant(1).unwrap(), (32, 64));
        assert_eq!(variant(33).unwrap(), (64, 64));
        assert_eq!(variant(64).unwrap(), (64, 64));
        assert_eq!(variant(65).unwrap(), (128, 32));
        assert!(variant(129).is_err());
        for ch in [32, 64, 128] {
            let (dp, bc) = variant(ch).unwrap();
            // sm_80's opt-in limit, the lower of the two targets (sm_90: 227 KiB)
            assert!(forward_smem_bytes(dp) <= 163 << 10 && backward_smem_bytes(dp, bc) <= 163 << 10, "ch {ch}");
        }
        assert_eq!(forward_smem_bytes(64), 4 * (64 * 64 + 64 * 68 + 64 * 64));
        let g = AttnGeom { b: 2, heads: 4, ch: 64, t: 256, order: QkvOrder::Legacy };
        let (f, b) = flops(&g);
        assert_eq!((f, b), (4.0 * 8.0 * 256.0 * 256.0 * 64.0, 10.0 * 8.0 * 256.0 * 256.0 * 64.0));
        let (bf, bb) = bytes(&g);
        let n = 8.0 * 64.0 * 256.0;
        assert_eq!(bf, 4.0 * (4.0 * n + 8.0 * 256.0));
        // four key tiles of 64: the partials are written and read once each
        assert_eq!(bb, 4.0 * (9.0 * n + 3.0 * 8.0 * 256.0 + 2.0 * 4.0 * n));
    }
}
