//! Philox4x32-10, the counter-based generator of Random123 (Salmon et al., SC'11), cuRAND and
//! PyTorch, with a CPU implementation whose draws the CUDA kernels of `kernels/rng.cu` reproduce.
//!
//! A counter-based generator is a keyed bijection of a 128-bit counter: draw number `b` is
//! `philox4x32_10(counter(b), key)`, computed from nothing else, so any part of a draw can be made
//! by any thread on any device, in any order, and a generator's whole state is two `u64`.
//!
//! # Layout
//!
//! A draw is named by `(seed, offset)`; `offset` counts *Philox blocks* (one block = one call of
//! [`philox4x32_10`] = four `u32` = four outputs). Element `i` of a draw of `n` values is lane
//! `i % 4` of block `b = offset + i / 4` (wrapping mod 2⁶⁴):
//!
//! - key = `[seed as u32, (seed >> 32) as u32]` (low word first);
//! - counter = `[b as u32, (b >> 32) as u32, 0, 0]`: words 0..1 are the 64-bit block index, low
//!   word first; words 2..3 (the subsequence) are zero, reserved for future streams.
//!
//! A draw of `n` values uses `n.div_ceil(4)` blocks ([`blocks_for`]); a draw that does not end on a
//! block boundary leaves its last block's spare lanes unused. [`Philox`] advances its offset by the
//! blocks each draw uses, so its draws never overlap; the GPU side does the same with
//! [`Philox::reserve`]. One GPU thread computes one block and writes its (up to) four outputs.
//!
//! # Outputs from one `u32` lane `x`
//!
//! - uniform ([`fill_uniform`]): `(x >> 8) · 2⁻²⁴`, in **[0, 1)**, the top 24 bits, exact in f32;
//! - Box–Muller normals ([`fill_normal`]): lanes (0, 1) give elements 0 and 1 of the block, lanes
//!   (2, 3) elements 2 and 3: with `u1 = ((a >> 8) + 1) · 2⁻²⁴` in (0, 1] and `u2 = (b >> 8) · 2⁻²⁴`
//!   in [0, 1), `r = sqrt(−2 ln u1)`, `θ = 2π u2` (f32 `TAU`), `z0 = r cos θ`, `z1 = r sin θ`,
//!   all in f32 (`ln`, `sqrt`, `sin`, `cos`; the kernels `logf`, `sqrtf`, `sincosf`). |z| ≤ 5.77
//!   (`u1 ≥ 2⁻²⁴`): the tails beyond 5.77σ (probability 8·10⁻⁹) are cut;
//! - dropout ([`dropout_mask`]): `uniform ≥ p` keeps (probability 1 − p) with the value
//!   `1 / (1 − p)` (f32 division), else 0.
//!
//! # Agreement with the GPU
//!
//! The Philox bits, the uniforms and the dropout masks are integer or exact f32 operations: the
//! kernels produce them bit for bit. The normals go through `logf` and `sincosf`: the host C
//! library's (glibc's, < 1 ulp) here, CUDA's on a GPU (`logf` ≤ 1 ulp, `sinf`/`cosf` ≤ 2 ulp
//! from the exact result, CUDA Programming Guide, without `--use_fast_math`), so a GPU normal may
//! differ from the CPU's by a few ulp (relative ~4·10⁻⁷); `sqrtf` and the products are correctly
//! rounded on both (`-prec-sqrt=true`, no addition to fuse into an FMA). The kernels compiled for
//! the CPU with the host's libm (tests/kernels_on_cpu.rs) agree with these functions within 2 ulp.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Philox4x32 round multipliers and Weyl key increments (Random123's `PHILOX_M4x32_0/1`,
/// `PHILOX_W32_0/1`).
pub const M0: u32 = 0xD251_1F53;
pub const M1: u32 = 0xCD9E_8D57;
pub const W0: u32 = 0x9E37_79B9;
pub const W1: u32 = 0xBB67_AE85;

/// Outputs per Philox block (four `u32`).
pub const PER_BLOCK: usize = 4;

/// Fills shorter than this run on the calling thread.
const PAR_MIN: usize = 1 << 16;
/// Elements per rayon task (a multiple of [`PER_BLOCK`], so each task starts on a block).
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(M0, c[0]);
    let (hi1, lo1) = mulhilo(M1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with 10 rounds (Random123's `philox4x32_R(10, ctr, key)`): 10 rounds, the key bumped
/// by (W0, W1) between rounds.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    c = round(c, k);
    for _ in 1..10 {
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        c = round(c, k);
    }
    c
}

/// The key of `seed`: low word first.
#[inline]
pub fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The counter of block `block`: the 64-bit block index in words 0..1 (low first), 0 in 2..3.
#[inline]
pub fn counter(block: u64) -> [u32; 4] {
    [block as u32, (block >> 32) as u32, 0, 0]
}

/// The four `u32` of block `block` of generator `seed`.
#[inline]
pub fn block(seed: u64, block: u64) -> [u32; 4] {
    philox4x32_10(counter(block), key(seed))
}

/// Philox blocks used by a draw of `n` values.
#[inline]
pub fn blocks_for(n: usize) -> u64 {
    n.div_ceil(PER_BLOCK) as u64
}

const INV_2_24: f32 = 1.0 / (1u32 << 24) as f32;

/// Uniform in [0, 1) from the top 24 bits of `x`.
#[inline]
pub fn uniform_of(x: u32) -> f32 {
    (x >> 8) as f32 * INV_2_24
}

/// Uniform in (0, 1] from the top 24 bits of `x` (the Box–Muller radius' argument).
#[inline]
pub fn uniform_open0_of(x: u32) -> f32 {
    ((x >> 8) + 1) as f32 * INV_2_24
}

/// Two standard normals from two lanes (Box–Muller, f32; see the module doc).
#[inline]
pub fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let u1 = uniform_open0_of(a);
    let u2 = uniform_of(b);
    let r = (-2.0f32 * u1.ln()).sqrt();
    let th = std::f32::consts::TAU * u2;
    let (s, c) = th.sin_cos();
    (r * c, r * s)
}

/// The four uniforms of a block.
#[inline]
pub fn uniform4(r: [u32; 4]) -> [f32; 4] {
    r.map(uniform_of)
}

/// The four normals of a block.
#[inline]
pub fn normal4(r: [u32; 4]) -> [f32; 4] {
    let (z0, z1) = box_muller(r[0], r[1]);
    let (z2, z3) = box_muller(r[2], r[3]);
    [z0, z1, z2, z3]
}

/// The value of a kept element of dropout with drop probability `p`: `1 / (1 − p)` (∞ for p = 1,
/// where nothing is kept).
#[inline]
pub fn dropout_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

/// Dropout's mask value from one lane: `scale` when `uniform_of(x) ≥ p`, else 0.
#[inline]
pub fn keep_of(x: u32, p: f32, scale: f32) -> f32 {
    if uniform_of(x) >= p { scale } else { 0.0 }
}

fn check_p(p: f32) {
    assert!((0.0..=1.0).contains(&p), "dropout probability {p} is not in [0, 1]");
}

/// Philox blocks computed together, one per SIMD lane.
const LANES: usize = 16;

crate::multiversion! {
    /// [`philox4x32_10`] of the `LANES` consecutive blocks from `b0` (wrapping), word-major:
    /// `out[w][l]` is word `w` of block `b0 + l`. The same integer arithmetic, in SIMD lanes.
    fn philox_lanes(key: [u32; 2], b0: u64, out: &mut [[u32; LANES]; 4]) {
        let (mut c0, mut c1, mut c2, mut c3) = ([0u32; LANES], [0u32; LANES], [0u32; LANES], [0u32; LANES]);
        for l in 0..LANES {
            let b = b0.wrapping_add(l as u64);
            c0[l] = b as u32;
            c1[l] = (b >> 32) as u32;
        }
        let mut k = key;
        for r in 0..10 {
            if r > 0 {
                k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
            }
            for l in 0..LANES {
                let p0 = M0 as u64 * c0[l] as u64;
                let p1 = M1 as u64 * c2[l] as u64;
                let n0 = (p1 >> 32) as u32 ^ c1[l] ^ k[0];
                let n2 = (p0 >> 32) as u32 ^ c3[l] ^ k[1];
                c0[l] = n0;
                c1[l] = p1 as u32;
                c2[l] = n2;
                c3[l] = p0 as u32;
            }
        }
        *out = [c0, c1, c2, c3];
    }
}

/// Run `f(first, block bits, out[first..first + 4])` for every block of a draw at `offset` into
/// `out` (the last slice may be shorter), in parallel for long draws; tasks start on blocks, so
/// the result does not depend on how the work is split.
fn for_blocks(seed: u64, offset: u64, out: &mut [f32], f: impl Fn(usize, [u32; 4], &mut [f32]) + Sync) {
    let k = key(seed);
    let run = |start: usize, part: &mut [f32]| {
        let b0 = offset.wrapping_add((start / PER_BLOCK) as u64);
        let mut bits = [[0u32; LANES]; 4];
        for (g, group) in part.chunks_mut(PER_BLOCK * LANES).enumerate() {
            let gb = b0.wrapping_add((g * LANES) as u64);
            philox_lanes(k, gb, &mut bits);
            for (j, o) in group.chunks_mut(PER_BLOCK).enumerate() {
                f(start + (g * LANES + j) * PER_BLOCK, [bits[0][j], bits[1][j], bits[2][j], bits[3][j]], o);
            }
        }
    };
    if out.len() < PAR_MIN {
        run(0, out);
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, part)| run(ci * CHUNK, part));
    }
}

/// Uniforms in [0, 1) (the top 24 bits of each lane): element `i` is lane `i % 4` of block
/// `offset + i / 4` of `seed`. Kernel: `philox_uniform_f32`.
pub fn fill_uniform(seed: u64, offset: u64, out: &mut [f32]) {
    for_blocks(seed, offset, out, |_, r, o| {
        let v = uniform4(r);
        o.copy_from_slice(&v[..o.len()]);
    });
}

/// Standard normals (Box–Muller on lane pairs (0, 1) and (2, 3) of each block). Kernel:
/// `philox_normal_f32`.
pub fn fill_normal(seed: u64, offset: u64, out: &mut [f32]) {
    for_blocks(seed, offset, out, |_, r, o| {
        let v = normal4(r);
        o.copy_from_slice(&v[..o.len()]);
    });
}

/// A dropout mask with drop probability `p` ∈ [0, 1]: `1 / (1 − p)` where kept (uniform ≥ p), 0
/// where dropped. Kernel: `dropout_f32` (its `mask` output).
pub fn dropout_mask(seed: u64, offset: u64, p: f32, out: &mut [f32]) {
    check_p(p);
    let scale = dropout_scale(p);
    for_blocks(seed, offset, out, |_, r, o| {
        for (l, m) in o.iter_mut().enumerate() {
            *m = keep_of(r[l], p, scale);
        }
    });
}

/// Dropout applied: `y = x · m` with `m` the [`dropout_mask`] of the same `(seed, offset, p)`,
/// also written to `mask` when given (for the backward pass). Kernel: `dropout_f32`.
pub fn dropout(seed: u64, offset: u64, p: f32, x: &[f32], y: &mut [f32], mask: Option<&mut [f32]>) {
    assert_eq!(x.len(), y.len(), "dropout: x and y differ in length");
    match mask {
        Some(m) => {
            assert_eq!(m.len(), x.len(), "dropout: mask and x differ in length");
            dropout_mask(seed, offset, p, m);
            let m: &[f32] = m;
            if y.len() < PAR_MIN {
                y.iter_mut().zip(x.iter().zip(m)).for_each(|(y, (&x, &m))| *y = x * m);
            } else {
                y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(m.par_chunks(CHUNK))).for_each(|(y, (x, m))| {
                    y.iter_mut().zip(x.iter().zip(m)).for_each(|(y, (&x, &m))| *y = x * m);
                });
            }
        }
        None => {
            if y.len() < PAR_MIN {
                dropout_part(seed, offset, p, 0, x, y);
            } else {
                y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(ci, (y, x))| dropout_part(seed, offset, p, ci * CHUNK, x, y));
            }
        }
    }
}

/// Elements per rayon task of [`dropout_part`]'s callers (a multiple of [`PER_BLOCK`]).
pub const DROPOUT_CHUNK: usize = CHUNK;

/// `y = x · m` for elements `first..first + x.len()` of the dropout draw at `(seed, offset)`
/// ([`dropout`] without a mask, one part of it): `first` must be a multiple of [`PER_BLOCK`].
/// Every value of `y` is written and none read.
pub fn dropout_part(seed: u64, offset: u64, p: f32, first: usize, x: &[f32], y: &mut [f32]) {
    check_p(p);
    assert_eq!(x.len(), y.len(), "dropout: x and y differ in length");
    assert_eq!(first % PER_BLOCK, 0, "dropout: a part must start on a block");
    dropout_run(key(seed), offset.wrapping_add((first / PER_BLOCK) as u64), p, dropout_scale(p), x, y);
}

crate::multiversion! {
    /// [`dropout_part`]'s loop: `LANES` blocks of bits at a time, the mask made word-major (one
    /// vector compare per word) and applied element-major (element `4j + w` is word `w` of block `j`).
    fn dropout_run(k: [u32; 2], b0: u64, p: f32, scale: f32, x: &[f32], y: &mut [f32]) {
        const G: usize = PER_BLOCK * LANES;
        let mut bits = [[0u32; LANES]; 4];
        let mut m = [[0.0f32; LANES]; 4];
        for (g, (xg, yg)) in x.chunks(G).zip(y.chunks_mut(G)).enumerate() {
            philox_lanes(k, b0.wrapping_add((g * LANES) as u64), &mut bits);
            for w in 0..4 {
                for l in 0..LANES {
                    m[w][l] = keep_of(bits[w][l], p, scale);
                }
            }
            if let (Ok(xg), Ok(yg)) = (<&[f32; G]>::try_from(xg), <&mut [f32; G]>::try_from(&mut *yg)) {
                for l in 0..LANES {
                    for w in 0..4 {
                        yg[4 * l + w] = xg[4 * l + w] * m[w][l];
                    }
                }
            } else {
                for (i, (o, &v)) in yg.iter_mut().zip(xg).enumerate() {
                    *o = v * m[i % 4][i / 4];
                }
            }
        }
    }
}

/// A Philox stream: a seed and the next unused block. Each draw starts at the current offset and
/// advances it by the blocks it used ([`blocks_for`]), so consecutive draws never overlap. The
/// state is `(seed, offset)`, two `u64` ([`Philox::state`] / [`Philox::from_state`], as
/// [`super::Rng::state`] for checkpoints; also serde, as `{"seed": .., "offset": ..}`).
///
/// A draw of `n` values split into two draws of `n1` and `n − n1` gives the same values when `n1`
/// is a multiple of 4; otherwise the second starts on a fresh block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Philox {
    seed: u64,
    offset: u64,
}

impl Philox {
    pub fn new(seed: u64) -> Self {
        Philox { seed, offset: 0 }
    }

    /// `(seed, offset)`, for checkpoints.
    pub fn state(&self) -> (u64, u64) {
        (self.seed, self.offset)
    }

    pub fn from_state(seed: u64, offset: u64) -> Self {
        Philox { seed, offset }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next unused block.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reserve a draw of `n` values: returns its offset and advances past its blocks (for a
    /// kernel launch: `kernel(.., seed, reserve(n))`).
    pub fn reserve(&mut self, n: usize) -> u64 {
        let o = self.offset;
        self.offset = o.wrapping_add(blocks_for(n));
        o
    }

    /// [`fill_uniform`] at the current offset, then advance.
    pub fn uniform(&mut self, out: &mut [f32]) {
        let o = self.reserve(out.len());
        fill_uniform(self.seed, o, out);
    }

    /// [`fill_normal`] at the current offset, then advance.
    pub fn normal(&mut self, out: &mut [f32]) {
        let o = self.reserve(out.len());
        fill_normal(self.seed, o, out);
    }

    /// [`dropout_mask`] at the current offset, then advance.
    pub fn dropout_mask(&mut self, p: f32, out: &mut [f32]) {
        let o = self.reserve(out.len());
        dropout_mask(self.seed, o, p, out);
    }

    /// [`dropout`] at the current offset, then advance.
    pub fn dropout(&mut self, p: f32, x: &[f32], y: &mut [f32], mask: Option<&mut [f32]>) {
        let o = self.reserve(y.len());
        dropout(self.seed, o, p, x, y, mask);
    }

    pub fn uniform_vec(&mut self, n: usize) -> Vec<f32> {
        let mut v = vec![0.0; n];
        self.uniform(&mut v);
        v
    }

    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        let mut v = vec![0.0; n];
        self.normal(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
    }

    #[test]
    fn lanes_match_the_scalar_generator() {
        let mut bits = [[0u32; LANES]; 4];
        for (seed, b0) in [(0u64, 0u64), (0xDEAD_BEEF_0123_4567, u64::MAX - 5), (7, 1 << 40)] {
            philox_lanes(key(seed), b0, &mut bits);
            for l in 0..LANES {
                let want = block(seed, b0.wrapping_add(l as u64));
                assert_eq!([bits[0][l], bits[1][l], bits[2][l], bits[3][l]], want, "seed {seed} block {b0}+{l}");
            }
        }
    }

    #[test]
    fn reserve_advances_by_blocks() {
        let mut p = Philox::new(1);
        assert_eq!((p.reserve(5), p.reserve(4), p.reserve(0), p.offset()), (0, 2, 3, 3));
    }
}
