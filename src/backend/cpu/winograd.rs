//! 3×3, stride-1, pad-1 convolution by Winograd F(2×2, 3×3) (Lavin & Gray, 2016): 16 GEMMs of
//! `[Cout, Cin] × [Cin, tiles]` over the whole batch replace the 9·4 multiplies per 2×2 output
//! tile with 16, a 2.25× cut in GEMM work. The backward pass with respect to the input is the same
//! convolution of `dy` with the flipped, transposed kernel, so it uses this path too.

use rayon::prelude::*;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::buf::{Buf, BufKey};
use super::conv::Addend;
use super::gemm::{Mat, sgemm};
use super::profile::detail;

/// Images smaller than this (8×8, 7×7, 4×4) go through im2col + GEMM unless their batch has many
/// tiles ([`applies`]) or take it for the forward only ([`small_image_applies`]): with few tiles per
/// weight, the weight transform (16 floats written per 9 read, for every channel pair) costs as
/// much as the GEMM work it saves. Measured on the CIFAR-10 U-Net at batch 4 (2 threads,
/// AVX-512): 8×8 and 4×4 by im2col took the forward from 235 to 205 ms, forward+backward from
/// 805 to 710 ms.
pub const MIN_PIXELS: usize = 100;

/// Whether a conv geometry uses this path (weights transformed at each call unless kept): 3×3,
/// stride 1, pad 1, at least 64 channels in and out (below that the transforms cost more than
/// the GEMM work they save; measured with `cargo bench --bench kernels -- conv2d`) and at least
/// [`MIN_PIXELS`] pixels; or a small image of at least [`SMALL_FRESH_MIN_CHANNELS`] channels
/// whose batch makes at least [`SMALL_FRESH_MIN_TILES`] 2×2 tiles. `ORWCFM_NO_WINOGRAD=1` turns
/// the path off.
#[allow(clippy::too_many_arguments)]
pub fn applies(kh: usize, kw: usize, stride: usize, pad: usize, cin: usize, cout: usize, n: usize, h: usize, w: usize) -> bool {
    let small = cin.min(cout) >= SMALL_FRESH_MIN_CHANNELS && tiles2(n, h, w) >= SMALL_FRESH_MIN_TILES && h.min(w) >= SMALL_MIN_SIDE;
    same_3x3(kh, kw, stride, pad) && cin.min(cout) >= 64 && (h * w >= MIN_PIXELS || small) && !disabled()
}

/// A small image's Winograd with the weights transformed at every call (a training step) pays off
/// from this many 2×2 tiles over the batch and this many channels. Measured forward + input and
/// weight gradients, 2 threads, AVX-512, against batched im2col (`winograd4::timing_small`):
/// 256 channels at 8×8, batch 32 (512 tiles) 47.5 → 35.4 ms, batch 8 (128 tiles) 13.5 → 10.9 ms;
/// at 4×4, batch 32 (128 tiles) 20.7 → 13.4 ms; but batch 4 at 8×8 (64 tiles) 5.4 → 5.9 ms and
/// 64 channels at 7×7, batch 32, 4.2 → 4.9 ms.
pub const SMALL_FRESH_MIN_TILES: usize = 128;
pub const SMALL_FRESH_MIN_CHANNELS: usize = 128;

/// Whether the forward of a 3×3 convolution on an image too small for [`applies`] takes F(2×2)
/// Winograd, its kernel from the cache ([`transform_weights_cached`]): from
/// [`SMALL_KEPT_MIN_TILES`] tiles over the batch. Sampling meets the frozen policy's weights at
/// every ODE step, so its transform is paid once and its GEMMs do 0.44× im2col's work; measured
/// forward, 256 channels, 2 threads, AVX-512, kernel kept: 8×8 batch 4 (64 tiles) 1.92 → 0.96 ms,
/// batch 32 11.4 → 9.0 ms; 4×4 batch 8 (32 tiles) 1.50 → 0.99 ms, batch 4 (16 tiles) 0.64 →
/// 0.66 ms. A training step's forward (fresh weights) pays the transform and comes out about
/// even. The choice depends on the geometry only, never on what the cache holds: a resumed run
/// (cold cache) must repeat a straight one bit for bit. Its input and weight gradients stay on
/// im2col unless [`applies`].
#[allow(clippy::too_many_arguments)]
pub fn small_image_applies(kh: usize, kw: usize, stride: usize, pad: usize, cin: usize, cout: usize, n: usize, h: usize, w: usize) -> bool {
    same_3x3(kh, kw, stride, pad) && cin.min(cout) >= 64 && h * w < MIN_PIXELS && h.min(w) >= SMALL_MIN_SIDE && tiles2(n, h, w) >= SMALL_KEPT_MIN_TILES && !disabled()
}

pub const SMALL_KEPT_MIN_TILES: usize = 32;

/// The smallest side of the small images that take Winograd.
pub const SMALL_MIN_SIDE: usize = 4;

fn same_3x3(kh: usize, kw: usize, stride: usize, pad: usize) -> bool {
    kh == 3 && kw == 3 && stride == 1 && pad == 1
}

/// 2×2 tiles of a batch of `n` images `h × w`.
fn tiles2(n: usize, h: usize, w: usize) -> usize {
    n * h.div_ceil(2) * w.div_ceil(2)
}

fn disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var_os("ORWCFM_NO_WINOGRAD").is_some())
}

/// The Winograd tile of a convolution that takes this path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// F(2×2, 3×3): 16 transformed values per 2×2 output tile.
    F2,
    /// F(4×4, 3×3) ([`super::winograd4`]): 36 per 4×4 output tile.
    F4,
}

/// Images of at least this many rows and columns take F(4×4, 3×3) tiles. Below that the padding
/// of the 6×6 patches eats the gain: on the MNIST U-Net's 14×14, 64-channel convolutions (batch
/// 32) both tiles took 2.5 ms (`winograd4::tests::time_blocking`).
pub const F4_MIN_SIDE: usize = 16;

/// The tile for an `h × w` image: F(4×4) from [`F4_MIN_SIDE`] on, else F(2×2);
/// `ORWCFM_WINOGRAD_TILE=2` or `4` forces one (read once), so both can be measured with one binary.
pub fn tile_for(h: usize, w: usize) -> Tile {
    static FORCED: OnceLock<Option<Tile>> = OnceLock::new();
    let forced = *FORCED.get_or_init(|| match std::env::var("ORWCFM_WINOGRAD_TILE").as_deref() {
        Ok("2") => Some(Tile::F2),
        Ok("4") => Some(Tile::F4),
        _ => None,
    });
    forced.unwrap_or(if h.min(w) >= F4_MIN_SIDE { Tile::F4 } else { Tile::F2 })
}

/// The tile of the weight gradient: F(4×4) where [`tile_for`] says so and the batch makes at
/// least [`DW_F4_MIN_TILES`] 4×4 tiles. The tiles are the GEMMs' reduction there, and with few
/// of them the 36 planes of the kernel gradient, read and written by every block's GEMMs, cost
/// more than the GEMM work saved.
pub fn weight_grad_tile(n: usize, h: usize, w: usize) -> Tile {
    match tile_for(h, w) {
        Tile::F4 if n * h.div_ceil(4) * w.div_ceil(4) >= DW_F4_MIN_TILES => Tile::F4,
        _ => Tile::F2,
    }
}

pub const DW_F4_MIN_TILES: usize = 256;

/// Transformed kernel of `w` for `tile`: `u[16 or 36][cout][cin]`.
pub fn transform_weights_for(tile: Tile, w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    match tile {
        Tile::F2 => transform_weights(w, cout, cin),
        Tile::F4 => super::winograd4::transform_weights(w, cout, cin),
    }
}

/// [`conv3x3_add`] or its F(4×4) twin, with `u` from [`transform_weights_for`] of the same tile.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_for(tile: Tile, x: &[f32], u: &[f32], b: Option<&[f32]>, add: Option<Addend>, n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    match tile {
        Tile::F2 => conv3x3_add(x, u, b, add, n, cin, h, w, cout),
        Tile::F4 => super::winograd4::conv3x3_add(x, u, b, add, n, cin, h, w, cout),
    }
}

/// [`conv3x3_weight_grad`] with `tile`'s transforms.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_weight_grad_for(tile: Tile, x: &[f32], dy: &[f32], n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    match tile {
        Tile::F2 => conv3x3_weight_grad(x, dy, n, cin, h, w, cout),
        Tile::F4 => super::winograd4::conv3x3_weight_grad(x, dy, n, cin, h, w, cout),
    }
}

/// The input gradient `dx` of a 3×3 convolution from `dy`, with `tile`'s transforms.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_input_grad(tile: Tile, dy: &[f32], w: &[f32], n: usize, cin: usize, h: usize, wd: usize, cout: usize) -> Vec<f32> {
    match tile {
        Tile::F2 => conv3x3(dy, &transform_weights_flipped(w, cout, cin), None, n, cout, h, wd, cin),
        Tile::F4 => super::winograd4::conv3x3(dy, &super::winograd4::transform_weights_flipped(w, cout, cin), None, n, cout, h, wd, cin),
    }
}

/// Kernels transformed together, one per SIMD lane.
pub(super) const KL: usize = 16;

crate::multiversion! {
    /// `G g Gᵀ` of `KL` 3×3 kernels at once (taps `g[row-major tap][lane]`, outputs `u[ξ = 4i + j][lane]`).
    fn kernel_transform_lanes(g: &[[f32; KL]; 9], u: &mut [[f32; KL]; 16]) {
        let mut t = [[[0.0f32; KL]; 3]; 4];
        for j in 0..3 {
            for l in 0..KL {
                let (g0, g1, g2) = (g[j][l], g[3 + j][l], g[6 + j][l]);
                t[0][j][l] = g0;
                t[1][j][l] = 0.5 * (g0 + g1 + g2);
                t[2][j][l] = 0.5 * (g0 - g1 + g2);
                t[3][j][l] = g2;
            }
        }
        for i in 0..4 {
            for l in 0..KL {
                let (a, b, c) = (t[i][0][l], t[i][1][l], t[i][2][l]);
                u[i * 4][l] = a;
                u[i * 4 + 1][l] = 0.5 * (a + b + c);
                u[i * 4 + 2][l] = 0.5 * (a - b + c);
                u[i * 4 + 3][l] = c;
            }
        }
    }
}

/// Where the 3×3 kernel `(r, c)` of a weight transform is read from `w [cout, cin, 3, 3]`.
#[derive(Clone, Copy)]
pub(super) enum Taps<'a> {
    /// `k(co, ci) = w[co][ci]` (the forward's kernels, rows = cout): a row's kernels are one run.
    Direct(&'a [f32]),
    /// `k(ci, co) = flip(w[co][ci])` (the input gradient's, rows = cin, cols = cout).
    Flipped(&'a [f32]),
}

crate::multiversion! {
    /// The taps of the kernels `(r, c0 .. c0 + nl)` of `k [rows][cols][9]` lane-major into
    /// `g[tap][lane]` (lanes past `nl` keep what they held): one run of `9·nl` floats.
    fn gather_taps(k: &[f32], cols: usize, r: usize, c0: usize, nl: usize, g: &mut [[f32; KL]; 9]) {
        let src = &k[(r * cols + c0) * 9..(r * cols + c0 + nl) * 9];
        if let Ok(src) = <&[f32; 9 * KL]>::try_from(src) {
            for (tap, gt) in g.iter_mut().enumerate() {
                for (l, v) in gt.iter_mut().enumerate() {
                    *v = src[l * 9 + tap];
                }
            }
        } else {
            for (l, k) in src.chunks_exact(9).enumerate() {
                for (tap, &v) in k.iter().enumerate() {
                    g[tap][l] = v;
                }
            }
        }
    }
}

/// `u[X][rows][cols]` with `u[ξ][r][c] = (G k(r, c) Gᵀ)[ξ]` by the tile's kernel transform `f`
/// (`X` outputs per kernel): one task per block of rows, `KL` kernels per step (gathered
/// lane-major, transformed in SIMD, stored as `X` runs).
pub(super) fn transform_into_with<const X: usize>(rows: usize, cols: usize, taps: Taps, f: fn(&[[f32; KL]; 9], &mut [[f32; KL]; X])) -> Vec<f32> {
    let _p = detail("winograd: weight transform");
    let plane = rows * cols;
    match taps {
        Taps::Direct(w) | Taps::Flipped(w) => assert_eq!(w.len(), plane * 9, "winograd: weights of the wrong size"),
    }
    // every element is written below (each row of each plane, all its columns), so the vector
    // is not zeroed first: that pass cost as much as the transform's own writes
    let mut u: Vec<f32> = Vec::with_capacity(X * plane);
    let up = SyncPtr(u.as_mut_ptr());
    let per = (4096 / cols.max(1)).max(1);
    (0..rows.div_ceil(per)).into_par_iter().for_each(|blk| {
        let up = &up;
        let (mut g, mut t) = ([[0.0f32; KL]; 9], [[0.0f32; KL]; X]);
        let (r0, r1) = (blk * per, ((blk + 1) * per).min(rows));
        // the task's kernels as `[rows][cols][9]` from row r0: the forward's are so already; the
        // flipped ones are copied so first, reading each output channel's run of input channels
        // in order (gathering them across output channels read a cache line per kernel, 4% of a
        // U-Net step)
        let local: Vec<f32>;
        let (k, rk0) = match taps {
            Taps::Direct(w) => (w, 0),
            Taps::Flipped(w) => {
                let mut buf = vec![0.0f32; (r1 - r0) * cols * 9];
                for co in 0..cols {
                    for (i, kern) in w[(co * rows + r0) * 9..(co * rows + r1) * 9].chunks_exact(9).enumerate() {
                        let dst = &mut buf[(i * cols + co) * 9..(i * cols + co) * 9 + 9];
                        for tap in 0..9 {
                            dst[tap] = kern[8 - tap];
                        }
                    }
                }
                local = buf;
                (&local[..], r0)
            }
        };
        for r in r0..r1 {
            for c0 in (0..cols).step_by(KL) {
                let nl = KL.min(cols - c0);
                gather_taps(k, cols, r - rk0, c0, nl, &mut g);
                f(&g, &mut t);
                for (xi, tv) in t.iter().enumerate() {
                    // SAFETY: row r of every plane is written only by the task that owns r, and
                    // [c0, c0 + nl) lies inside it.
                    unsafe {
                        let dst = up.0.add(xi * plane + r * cols + c0);
                        if nl == KL {
                            dst.cast::<[f32; KL]>().write_unaligned(*tv);
                        } else {
                            std::ptr::copy_nonoverlapping(tv.as_ptr(), dst, nl);
                        }
                    }
                }
            }
        }
    });
    // SAFETY: the tasks above wrote all X·rows·cols values (rows split into blocks, every
    // block's rows in full, KL columns at a time up to cols).
    unsafe { u.set_len(X * plane) };
    u
}

/// `U = G g Gᵀ` for every `[cout, cin]` 3×3 kernel → `u[16][cout][cin]`.
pub fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    transform_into_with(cout, cin, Taps::Direct(w), kernel_transform_lanes)
}

/// The transformed kernels of weights met more than once (sampling runs the same frozen weights
/// at every ODE step; a training step's weights are met once and are not kept). Keyed by
/// [`BufKey`], which changes with every write, so an entry can never be stale. An entry goes when
/// its weights are freed or written (both seen at the next insertion), or, oldest first, once the
/// cache holds [`KERNEL_CACHE_BYTES`].
struct KernelCache {
    kept: Vec<Kept>,
    /// Keys met once, newest last (at most [`SEEN_KEYS`]).
    seen: VecDeque<CacheKey>,
}

/// The weights' values, their shape and the tile.
type CacheKey = (BufKey, usize, usize, Tile);

struct Kept {
    key: CacheKey,
    /// The weights' memory, to drop the entry once it is freed or holds newer values.
    source: Weak<()>,
    u: Arc<Vec<f32>>,
}

impl Kept {
    /// Whether this entry came from the same range of the same memory as `key` (any values).
    fn same_view(&self, source: &Weak<()>, key: &BufKey) -> bool {
        self.source.ptr_eq(source) && self.key.0.same_range(key)
    }
}

/// The most the cache of transformed kernels holds (the CIFAR-10 U-Net's 3×3 kernels at 32×32
/// and 16×16 take about 70 MiB per model).
pub const KERNEL_CACHE_BYTES: usize = 256 << 20;
const SEEN_KEYS: usize = 1024;

static KERNEL_CACHE: Mutex<KernelCache> = Mutex::new(KernelCache { kept: Vec::new(), seen: VecDeque::new() });

fn kernel_cache() -> std::sync::MutexGuard<'static, KernelCache> {
    KERNEL_CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether kernels are cached: on unless `ORWCFM_CPU_KERNEL_CACHE=0` (read once), so that both
/// can be measured with one binary.
pub fn kernel_cache_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("ORWCFM_CPU_KERNEL_CACHE").map_or(true, |v| v != "0"))
}

/// [`transform_weights_for`] of the values of `w` (`buf`'s, when given), from the cache when they
/// were met before.
pub fn transform_weights_cached(tile: Tile, buf: Option<&Buf<f32>>, w: &[f32], cout: usize, cin: usize) -> Arc<Vec<f32>> {
    match buf.filter(|_| kernel_cache_enabled()) {
        Some(buf) => cached(tile, buf, w, cout, cin),
        None => Arc::new(transform_weights_for(tile, w, cout, cin)),
    }
}

/// The cache's lookup: a kept kernel; else, at the second meeting, the kernel transformed and
/// kept; else (the first meeting, remembered) the kernel transformed but not kept. The values are
/// those of a fresh transform either way, so whether the cache holds a kernel never changes a
/// result (a resumed run, with a cold cache, repeats the straight one bit for bit).
fn cached(tile: Tile, buf: &Buf<f32>, w: &[f32], cout: usize, cin: usize) -> Arc<Vec<f32>> {
    let k = (buf.key(), cout, cin, tile);
    let keep = {
        let mut c = kernel_cache();
        if let Some(e) = c.kept.iter().find(|e| e.key == k) {
            return e.u.clone();
        }
        match c.seen.iter().position(|s| *s == k) {
            Some(i) => {
                c.seen.remove(i);
                true
            }
            None => {
                if c.seen.len() == SEEN_KEYS {
                    c.seen.pop_front();
                }
                c.seen.push_back(k);
                false
            }
        }
    };
    // transformed outside the lock (in parallel)
    let u = Arc::new(transform_weights_for(tile, w, cout, cin));
    let size = u.len() * 4;
    if keep && size <= KERNEL_CACHE_BYTES {
        let source = buf.weak();
        let mut c = kernel_cache();
        // drop what is dead: freed weights, and older values of this same view
        c.kept.retain(|e| e.source.strong_count() > 0 && !e.same_view(&source, &k.0));
        let mut bytes = c.bytes();
        while bytes + size > KERNEL_CACHE_BYTES && !c.kept.is_empty() {
            bytes -= c.kept.remove(0).u.len() * 4;
        }
        c.kept.push(Kept { key: k, source, u: u.clone() });
    }
    u
}

impl KernelCache {
    fn bytes(&self) -> usize {
        self.kept.iter().map(|e| e.u.len() * 4).sum()
    }
}

/// Bytes held by the cache of transformed kernels.
#[cfg(test)]
fn kernel_cache_bytes() -> usize {
    kernel_cache().bytes()
}

/// Kernels the cache holds for the view `buf` (any of its values): at most one.
#[cfg(test)]
fn kernel_cache_entries_for(buf: &Buf<f32>) -> usize {
    let (w, key) = (buf.weak(), buf.key());
    kernel_cache().kept.iter().filter(|e| e.same_view(&w, &key)).count()
}

/// The transformed kernel of the input gradient, `transform_weights` of the flipped, transposed
/// kernel without forming it: `u[16][cin][cout]` of the kernels `w'[ci][co] = flip(w[co][ci])`.
pub fn transform_weights_flipped(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    transform_into_with(cin, cout, Taps::Flipped(w), kernel_transform_lanes)
}

/// `y[n, cout, h, w] = conv3x3(x, w) + b` (stride 1, pad 1) with pre-transformed weights `u`.
/// Works in blocks of whole tile rows, sized so that a block's transformed input and products stay
/// in cache; blocks run in parallel, each with single-threaded GEMMs. The transforms run along
/// tile rows so that they vectorise.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(x: &[f32], u: &[f32], b: Option<&[f32]>, n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    conv3x3_add(x, u, b, None, n, cin, h, w, cout)
}

/// [`conv3x3`] plus `add`, added to each output row as it is written.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_add(x: &[f32], u: &[f32], b: Option<&[f32]>, add: Option<Addend>, n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    if n * h * w == 0 {
        return Vec::new(); // an empty batch or image: nothing to compute
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let rows = n * th; // tile rows over the batch
    let pb = (BLOCK_BYTES / (64 * (cin + cout))).clamp(16, 512);
    let rb = balanced_rows(rows, (pb / tw).clamp(1, rows));
    let blocks = rows.div_ceil(rb);
    let wp = 2 * (tw.next_multiple_of(VL) + 1); // scratch rows: even/odd input columns, padded to whole vectors
    // every value is written below (each output row of each channel, all its columns): the
    // vector is not zeroed first, a pass over the output that cost as much as a transform
    let len = n * cout * h * w;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    let yp = SyncPtr(y.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|blk| {
        let yp = &yp;
        let row0 = blk * rb;
        let nrows = rb.min(rows - row0);
        let np = nrows * tw;
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let need = 16 * (cin + cout) * np + 4 * wp + 12 * np;
            if sc.len() < need {
                sc.resize(need, 0.0);
            }
            let (v, rest) = sc[..need].split_at_mut(16 * cin * np);
            let (m, rest) = rest.split_at_mut(16 * cout * np);
            let (d, tt) = rest.split_at_mut(4 * wp);
            let p = detail("winograd fwd: input transform (cpu time)");
            input_transform(x, &Geo { cin, h, w, th, tw }, row0, nrows, v, d);
            drop(p);
            // M[ξ] = U[ξ] · V[ξ]
            let p = detail("winograd fwd: 16 gemms (cpu time)");
            for xi in 0..16 {
                let uu = &u[xi * cout * cin..(xi + 1) * cout * cin];
                let vv = &v[xi * cin * np..(xi + 1) * cin * np];
                sgemm(cout, np, cin, Mat::rm(uu, cin), Mat::rm(vv, np), &mut m[xi * cout * np..(xi + 1) * cout * np], np, false, 1.0, 1);
            }
            drop(p);
            // output transform Y = Aᵀ M A, vectorised over the block's tiles
            let _p = detail("winograd fwd: output transform (cpu time)");
            for co in 0..cout {
                let bias = b.map_or(0.0, |b| b[co]);
                let mrow = |xi: usize| &m[(xi * cout + co) * np..(xi * cout + co + 1) * np];
                let (q, tbuf) = tt.split_at_mut(4 * np);
                let (e0, rest) = q.split_at_mut(np);
                let (o0, rest) = rest.split_at_mut(np);
                let (e1, o1) = rest.split_at_mut(np);
                // T_a[j] = rows of Aᵀ M, as whole-slice loops (they vectorise)
                let (ta, tb) = tbuf[..8 * np].split_at_mut(4 * np);
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j));
                    let (da, db) = (&mut ta[j * np..(j + 1) * np], &mut tb[j * np..(j + 1) * np]);
                    for ((((x, y), a), b2), c) in da.iter_mut().zip(db.iter_mut()).zip(m0).zip(m1).zip(m2) {
                        *x = a + b2 + c;
                        *y = b2 - c;
                    }
                    for (y, d) in db.iter_mut().zip(m3) {
                        *y -= d;
                    }
                }
                for (t, (e, o)) in [(&*ta, (&mut *e0, &mut *o0)), (&*tb, (&mut *e1, &mut *o1))] {
                    let (t0, t1, t2, t3) = (&t[..np], &t[np..2 * np], &t[2 * np..3 * np], &t[3 * np..]);
                    for ((((ev, ov), a), b2), (c, d)) in e.iter_mut().zip(o.iter_mut()).zip(t0).zip(t1).zip(t2.iter().zip(t3)) {
                        *ev = a + b2 + c + bias;
                        *ov = b2 - c - d + bias;
                    }
                }
                for lr in 0..nrows {
                    let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                    for (a, (e, o)) in [(&*e0, &*o0), (&*e1, &*o1)].into_iter().enumerate() {
                        let r = 2 * ti + a;
                        if r >= h {
                            continue;
                        }
                        let base = (img * cout + co) * h * w + r * w;
                        // SAFETY: this output row of channel co belongs to this block alone.
                        let out = unsafe { std::slice::from_raw_parts_mut(yp.0.add(base), w) };
                        let (e, o) = (&e[lr * tw..(lr + 1) * tw], &o[lr * tw..(lr + 1) * tw]);
                        for k in 0..w / 2 {
                            out[2 * k] = e[k];
                            out[2 * k + 1] = o[k];
                        }
                        if w % 2 == 1 {
                            out[w - 1] = e[tw - 1];
                        }
                        if let Some(a) = &add {
                            a.add_row(out, img, co, cout, r, h);
                        }
                    }
                }
            }
        });
    });
    // SAFETY: the blocks cover every tile row of every image, and each wrote all `w` columns of
    // its rows below `h` for every output channel: all `len` values.
    unsafe { y.set_len(len) };
    y
}

/// Tile rows per block: about `rb`, but in a number of blocks that is a multiple of the threads
/// (one block per tile row at most), so that no thread idles while another finishes (a small
/// image's whole batch in one block ran on one thread).
pub(super) fn balanced_rows(rows: usize, rb: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let mut blocks = rows.div_ceil(rb.max(1));
    if blocks < rows {
        blocks = blocks.next_multiple_of(threads).min(rows);
    }
    rows.div_ceil(blocks)
}

/// Weight gradient of [`conv3x3`]: `dw[cout, cin, 3, 3]` from the input `x` and output gradient
/// `dy`. With `Y_p = Aᵀ[Σ_c U ⊙ V_p]A`, the gradient of `U[ξ]` is `Σ_p (A dY_p Aᵀ)[ξ] V_p[ξ]ᵀ`
/// (16 GEMMs with the tiles as the reduction), and `dw = Gᵀ dU G`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_weight_grad(x: &[f32], dy: &[f32], n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    if n * h * w == 0 {
        return vec![0.0; cout * cin * 9]; // no tiles: a zero gradient
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let rows = n * th;
    // the tiles are the GEMM reduction here: larger blocks keep k large and the accumulators few
    let pb = (4 * BLOCK_BYTES / (64 * (cin + cout))).clamp(256, 4096);
    let rb = (pb / tw).clamp(1, rows).min(rows.div_ceil(rayon::current_num_threads()));
    let blocks = rows.div_ceil(rb);
    let wp = 2 * (tw.next_multiple_of(VL) + 1);
    let geo = Geo { cin, h, w, th, tw };
    let process = |du: &mut [f32], blk: usize, first: bool| {
        let row0 = blk * rb;
        let nrows = rb.min(rows - row0);
        let np = nrows * tw;
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let need = 16 * (cin + cout) * np + 8 * wp;
            if sc.len() < need {
                sc.resize(need, 0.0);
            }
            let (v, rest) = sc[..need].split_at_mut(16 * cin * np);
            let (dm, rest) = rest.split_at_mut(16 * cout * np);
            let (d, t) = rest.split_at_mut(4 * wp);
            let p = detail("winograd dw: input transform (cpu time)");
            input_transform(x, &geo, row0, nrows, v, d);
            drop(p);
            let p = detail("winograd dw: dy transform (cpu time)");
            // dM = A dY Aᵀ for every 2×2 output-gradient tile (zero outside the image)
            dy_transform(dy, &Geo { cin: cout, ..geo }, row0, nrows, dm, t);
            drop(p);
            let _p = detail("winograd dw: 16 gemms (cpu time)");
            for xi in 0..16 {
                let a = &dm[xi * cout * np..(xi + 1) * cout * np];
                let bv = &v[xi * cin * np..(xi + 1) * cin * np];
                sgemm(cout, cin, np, Mat::rm(a, np), Mat::rm_t(bv, np), &mut du[xi * cout * cin..(xi + 1) * cout * cin], cin, !first, 1.0, 1);
            }
        });
    };
    let du = super::par_accumulate(blocks, 16 * cout * cin, process);
    // dw = Gᵀ dU G
    let plane = cout * cin;
    let mut dw = vec![0.0f32; plane * 9];
    dw.par_chunks_mut(9).enumerate().for_each(|(oc, out)| {
        let u = |i: usize, j: usize| du[(i * 4 + j) * plane + oc];
        let mut t = [[0.0f32; 4]; 3];
        for j in 0..4 {
            let (u0, u1, u2, u3) = (u(0, j), u(1, j), u(2, j), u(3, j));
            t[0][j] = u0 + 0.5 * (u1 + u2);
            t[1][j] = 0.5 * (u1 - u2);
            t[2][j] = 0.5 * (u1 + u2) + u3;
        }
        for i in 0..3 {
            let (a, b, c, d) = (t[i][0], t[i][1], t[i][2], t[i][3]);
            out[i * 3] = a + 0.5 * (b + c);
            out[i * 3 + 1] = 0.5 * (b - c);
            out[i * 3 + 2] = 0.5 * (b + c) + d;
        }
    });
    dw
}

/// Sizes shared by the transforms.
#[derive(Clone, Copy)]
pub(super) struct Geo {
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) th: usize,
    pub(super) tw: usize,
}

crate::multiversion! {
    /// `V[ξ][c][p] = (Bᵀ d B)[ξ]` for the 4×4 input patches of the tile rows `row0 .. row0+nrows`
    /// (`v` is `[16][cin][nrows·tw]`; `d` is scratch of `8·(⌈tw⌉₈ + 1)`). The four input
    /// rows of a tile row are split into even and odd columns first, so that every later step is
    /// a fixed-width vector operation over 8 tiles.
    fn input_transform(x: &[f32], g: &Geo, row0: usize, nrows: usize, v: &mut [f32], d: &mut [f32]) {
        let Geo { cin, h, w, th, tw } = *g;
        let np = nrows * tw;
        let l = tw.next_multiple_of(VL) + 1; // even/odd columns of a padded row: input columns −1 ..
        // channel by channel, so that each channel's rows are read in order (and the rows two
        // tile rows share come from cache) and each ξ's outputs are written in one run
        for c in 0..cin {
            for lr in 0..nrows {
                let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                let xc = &x[(img * cin + c) * h * w..(img * cin + c + 1) * h * w];
                for a in 0..4 {
                    let (de, dodd) = d[2 * a * l..(2 * a + 2) * l].split_at_mut(l);
                    let r = (2 * ti + a) as isize - 1;
                    if r >= 0 && r < h as isize {
                        // padded column k is input column k − 1: even padded columns are the
                        // odd input columns, shifted by one
                        de[0] = 0.0;
                        deinterleave(&xc[r as usize * w..(r as usize + 1) * w], dodd, &mut de[1..]);
                    } else {
                        de.fill(0.0);
                        dodd.fill(0.0);
                    }
                }
                input_tile_row(&d[..8 * l], l, tw, v, (c * np + lr * tw, cin * np));
            }
        }
    }
}

crate::multiversion! {
    /// `dM[ξ][co][p] = (A dY_p Aᵀ)[ξ]` for the 2×2 output-gradient tiles of the tile rows
    /// `row0 .. row0+nrows` (`g.cin` is the gradient's channel count; zero outside the image;
    /// `t` is scratch of `4·⌈tw⌉₈`).
    fn dy_transform(dy: &[f32], g: &Geo, row0: usize, nrows: usize, dm: &mut [f32], t: &mut [f32]) {
        let Geo { cin: cout, h, w, th, tw } = *g;
        let np = nrows * tw;
        let twp = tw.next_multiple_of(VL);
        let ys = &mut t[..4 * twp];
        for co in 0..cout {
            for lr in 0..nrows {
                let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                let base = (img * cout + co) * h * w;
                for a in 0..2 {
                    let (e, o) = ys[2 * a * twp..(2 * a + 2) * twp].split_at_mut(twp);
                    let r = 2 * ti + a;
                    if r < h {
                        deinterleave(&dy[base + r * w..base + (r + 1) * w], e, o);
                    } else {
                        e.fill(0.0);
                        o.fill(0.0);
                    }
                }
                dy_tile_row(ys, twp, tw, dm, (co * np + lr * tw, cout * np));
            }
        }
    }
}

/// Tiles per vector step of the transforms: a fixed width, so that each step is one SIMD
/// operation whatever the image width (loops over a run-time `tw` of 8 or 16 tiles would stay
/// scalar: too short for LLVM's vector loop).
pub(super) const VL: usize = 8;
pub(super) type Lanes = [f32; VL];

#[inline(always)]
pub(super) fn lanes(s: &[f32], at: usize) -> Lanes {
    s[at..at + VL].try_into().expect("a whole vector")
}

/// `dst[at..at + n] = r[..n]`, a whole-vector store when `n` is the full width (the partial
/// case as a loop: a `copy_from_slice` of a run-time length is a `memcpy` call per vector).
#[inline(always)]
#[allow(clippy::manual_memcpy)]
pub(super) fn store(dst: &mut [f32], at: usize, r: &Lanes, n: usize) {
    if n == VL {
        dst[at..at + VL].copy_from_slice(r);
    } else {
        for k in 0..n {
            dst[at + k] = r[k];
        }
    }
}

/// `even[j] = x[2j]`, `odd[j] = x[2j + 1]`, 8 pairs per step, and zero after the row's end up
/// to the slices' ends.
#[inline(always)]
fn deinterleave(x: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let mut chunks = x.chunks_exact(2 * VL);
    let mut j = 0;
    for c in &mut chunks {
        let c: &[f32; 2 * VL] = c.try_into().expect("a whole chunk");
        let (e, o): (Lanes, Lanes) = (std::array::from_fn(|k| c[2 * k]), std::array::from_fn(|k| c[2 * k + 1]));
        even[j..j + VL].copy_from_slice(&e);
        odd[j..j + VL].copy_from_slice(&o);
        j += VL;
    }
    let rest = chunks.remainder();
    for (k, &v) in rest.iter().enumerate() {
        if k % 2 == 0 {
            even[j + k / 2] = v;
        } else {
            odd[j + k / 2] = v;
        }
    }
    even[j + rest.len().div_ceil(2)..].fill(0.0);
    odd[j + rest.len() / 2..].fill(0.0);
}

/// One output-gradient channel's tile row, `ys = [row 0 even | row 0 odd | row 1 even | row 1
/// odd]` (each `twp ≥ ⌈tw⌉₈`, zero past `tw`): writes `A dY Aᵀ` to `dm[base + ξ·stride + tj]`
/// for the 16 `ξ`, 8 tiles per step.
#[inline(always)]
fn dy_tile_row(ys: &[f32], twp: usize, tw: usize, dm: &mut [f32], at: (usize, usize)) {
    let (base, stride) = at;
    for c0 in (0..tw).step_by(VL) {
        let n = VL.min(tw - c0);
        let (y00, y01, y10, y11) = (lanes(ys, c0), lanes(ys, twp + c0), lanes(ys, 2 * twp + c0), lanes(ys, 3 * twp + c0));
        // rows of A·dY, each a pair (a_i, b_i) over the tile's two columns
        let rows: [(Lanes, Lanes); 4] = [
            (y00, y01),
            (std::array::from_fn(|k| y00[k] + y10[k]), std::array::from_fn(|k| y01[k] + y11[k])),
            (std::array::from_fn(|k| y00[k] - y10[k]), std::array::from_fn(|k| y01[k] - y11[k])),
            (std::array::from_fn(|k| -y10[k]), std::array::from_fn(|k| -y11[k])),
        ];
        for (i, (a, b)) in rows.iter().enumerate() {
            let outs: [Lanes; 4] = [*a, std::array::from_fn(|k| a[k] + b[k]), std::array::from_fn(|k| a[k] - b[k]), std::array::from_fn(|k| -b[k])];
            for (j, r) in outs.iter().enumerate() {
                store(dm, base + (i * 4 + j) * stride + c0, r, n);
            }
        }
    }
}

/// One channel's tile row: `d` holds the 4 padded input rows as `[row][even | odd][l]` (`l ≥
/// ⌈tw⌉₈ + 1`, zero-padded); writes `v[base + ξ·stride + tj]` for the 16 `ξ` (`at = (base,
/// stride)`), 8 tiles per step, in registers.
#[inline(always)]
fn input_tile_row(d: &[f32], l: usize, tw: usize, v: &mut [f32], at: (usize, usize)) {
    let (base, stride) = at;
    let sub = |a: Lanes, b: Lanes| -> Lanes { std::array::from_fn(|k| a[k] - b[k]) };
    let add = |a: Lanes, b: Lanes| -> Lanes { std::array::from_fn(|k| a[k] + b[k]) };
    for c0 in (0..tw).step_by(VL) {
        let n = VL.min(tw - c0);
        // column j of tile tj is padded column 2tj + j: even[tj], odd[tj], even[tj+1], odd[tj+1]
        let col = |k: usize, j: usize| lanes(d, (2 * k + (j & 1)) * l + c0 + j / 2);
        let mut t = [[[0.0f32; VL]; 4]; 4]; // t[i][j]: row i of Bᵀ d, column j
        for j in 0..4 {
            let (d0, d1, d2, d3) = (col(0, j), col(1, j), col(2, j), col(3, j));
            // t = Bᵀ d down column j: t0 = d0 − d2, t1 = d1 + d2, t2 = d2 − d1, t3 = d1 − d3
            t[0][j] = sub(d0, d2);
            t[1][j] = add(d1, d2);
            t[2][j] = sub(d2, d1);
            t[3][j] = sub(d1, d3);
        }
        // then along the rows: v[4i + ·] = (t_i0 − t_i2, t_i1 + t_i2, t_i2 − t_i1, t_i1 − t_i3)
        for (i, r) in t.iter().enumerate() {
            let outs = [sub(r[0], r[2]), add(r[1], r[2]), sub(r[2], r[1]), sub(r[1], r[3])];
            for (j, o) in outs.iter().enumerate() {
                store(v, base + (i * 4 + j) * stride + c0, o, n);
            }
        }
    }
}

/// Target size of one forward block's transformed input plus products (2 MiB: 1 MiB kept the
/// 256-channel blocks at 32 tiles, whose GEMMs ran on the narrow edge micro-kernels; measured
/// 205 -> 195 ms on the CIFAR-10 forward at batch 4; 4 MiB was no better).
pub(super) const BLOCK_BYTES: usize = 2 << 20;

thread_local! {
    pub(super) static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub(super) struct SyncPtr(pub(super) *mut f32);
// SAFETY: used only for disjoint writes from parallel tasks, as documented at each use.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::conv::{ConvGeom, conv2d_im2col_forward};
    /// The input gradient's kernel, `w'[ci][co] = flip(w[co][ci])`: the reference for
    /// [`transform_weights_flipped`].
    fn flip_transpose(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                let src = &w[(co * cin + ci) * 9..(co * cin + ci) * 9 + 9];
                let dst = &mut out[(ci * cout + co) * 9..(ci * cout + co) * 9 + 9];
                for k in 0..9 {
                    dst[k] = src[8 - k];
                }
            }
        }
        out
    }

    /// Forward, input and weight gradients of both tiles against im2col on random data, on sizes
    /// that are and are not multiples of the tiles (and of the 8-tile vector step), with one tile
    /// row or many. F(4×4)'s larger coefficients round a few times more.
    #[test]
    fn matches_im2col_conv() {
        let mut r = crate::rng::Rng::new(11);
        for (tile, tol) in [(Tile::F2, 1e-6), (Tile::F4, 4e-6)] {
            for &(n, cin, h, w, cout) in
                &[(2, 3, 7, 5, 4), (1, 8, 8, 8, 16), (3, 5, 1, 3, 2), (2, 4, 28, 28, 6), (1, 6, 16, 37, 5), (2, 16, 32, 32, 8), (1, 3, 13, 70, 2), (3, 8, 20, 16, 8), (2, 16, 16, 13, 4), (5, 32, 16, 16, 24)]
            {
                let x = r.normal_vec(n * cin * h * w);
                let wt = r.normal_vec(cout * cin * 9);
                let b = r.normal_vec(cout);
                let g = ConvGeom { n, cin, h, w, cout, kh: 3, kw: 3, stride: 1, pad: 1 };
                let want = conv2d_im2col_forward(&x, &wt, Some(&b), &g);
                let got = conv3x3_for(tile, &x, &transform_weights_for(tile, &wt, cout, cin), Some(&b), None, n, cin, h, w, cout);
                let e = crate::util::rel_err(&got, &want);
                assert!(e < tol, "{tile:?} {n} {cin} {h} {w} {cout}: {e:e}");
                let dy = r.normal_vec(n * cout * h * w);
                let (dx_want, dw_want, _) = crate::backend::cpu::conv::conv2d_im2col_backward(&x, &wt, &dy, &g, true);
                let dw = conv3x3_weight_grad_for(tile, &x, &dy, n, cin, h, w, cout);
                let e = crate::util::rel_err(&dw, &dw_want);
                assert!(e < 10.0 * tol, "{tile:?} dw {n} {cin} {h} {w} {cout}: {e:e}");
                let dx = conv3x3_input_grad(tile, &dy, &wt, n, cin, h, w, cout);
                let e = crate::util::rel_err(&dx, &dx_want.unwrap());
                assert!(e < 10.0 * tol, "{tile:?} dx {n} {cin} {h} {w} {cout}: {e:e}");
            }
        }
        // the input gradient's kernel, transformed directly, is the transform of the flipped one
        let (cout, cin) = (5, 3);
        let wt = r.normal_vec(cout * cin * 9);
        assert_eq!(transform_weights_flipped(&wt, cout, cin), transform_weights(&flip_transpose(&wt, cout, cin), cin, cout));
        assert_eq!(super::super::winograd4::transform_weights_flipped(&wt, cout, cin), super::super::winograd4::transform_weights(&flip_transpose(&wt, cout, cin), cin, cout));
    }

    /// Small images: a convolution takes Winograd for forward and gradients from a batch of many
    /// tiles, for the forward only from fewer; both match im2col, the gradients too, and the
    /// forward gives the same bits whether its kernel is transformed afresh (the first call) or
    /// taken from the cache (later ones), so a cold cache after a resume changes nothing.
    #[test]
    fn small_images_take_winograd_where_it_pays_and_match_im2col() {
        use crate::backend::cpu::conv::{conv2d_backward, conv2d_im2col_backward};
        use crate::tensor::Tensor;
        let mut r = crate::rng::Rng::new(8);
        assert!(applies(3, 3, 1, 1, 128, 128, 8, 8, 8), "128 tiles, 128 channels");
        assert!(!applies(3, 3, 1, 1, 128, 128, 4, 8, 8), "64 tiles");
        assert!(!applies(3, 3, 1, 1, 64, 64, 32, 7, 7), "64 channels");
        assert!(small_image_applies(3, 3, 1, 1, 64, 64, 2, 8, 8) && !small_image_applies(3, 3, 1, 1, 64, 64, 1, 8, 8));
        for &(n, c, h) in &[(8usize, 128usize, 8usize), (32, 128, 4), (2, 64, 8), (3, 64, 5)] {
            let g = ConvGeom { n, cin: c, h, w: h, cout: c, kh: 3, kw: 3, stride: 1, pad: 1 };
            let x = Tensor::from_vec(r.normal_vec(n * c * h * h), &[n, c, h, h]);
            let wt = Tensor::from_vec(r.normal_vec(c * c * 9), &[c, c, 3, 3]);
            let want = conv2d_im2col_forward(x.data(), wt.data(), None, &g);
            let first = x.conv2d(&wt, None, 1, 1).unwrap().to_vec();
            let e = crate::util::rel_err(&first, &want);
            assert!(e < 1e-5, "n{n} c{c} {h}x{h}: {e:e}");
            for call in 1..3 {
                let got = x.conv2d(&wt, None, 1, 1).unwrap().to_vec();
                assert!(got.iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits()), "n{n} c{c} {h}x{h}: call {call} differs from the first");
            }
            let dy = r.normal_vec(n * c * h * h);
            let (dx, dw, _) = conv2d_backward(x.data(), wt.data(), &dy, &g, true);
            let (dx_want, dw_want, _) = conv2d_im2col_backward(x.data(), wt.data(), &dy, &g, true);
            assert!(crate::util::rel_err(&dx.unwrap(), &dx_want.unwrap()) < 1e-5, "dx n{n} c{c} {h}x{h}");
            assert!(crate::util::rel_err(&dw, &dw_want) < 1e-5, "dw n{n} c{c} {h}x{h}");
        }
    }

    /// The cached kernel is the kernel of the values the convolution is given: repeated calls hit
    /// the cache (the weight transform is skipped), and a write to the weights in place, a copy
    /// on write, a new tensor of equal shape or an arena view are each transformed afresh.
    #[test]
    fn cached_kernels_follow_every_write_to_the_weights() {
        use crate::tensor::Tensor;
        let mut r = crate::rng::Rng::new(5);
        let (n, cin, h, w, cout) = (2, 64, 10, 10, 64);
        let g = ConvGeom { n, cin, h, w, cout, kh: 3, kw: 3, stride: 1, pad: 1 };
        assert!(applies(3, 3, 1, 1, cin, cout, n, h, w), "the geometry must take the Winograd path");
        let x = Tensor::from_vec(r.normal_vec(n * cin * h * w), &[n, cin, h, w]);
        let check = |wt: &Tensor, what: &str| {
            let want = conv2d_im2col_forward(x.data(), wt.data(), None, &g);
            for call in 0..3 {
                let got = x.conv2d(wt, None, 1, 1).unwrap();
                let e = crate::util::rel_err(got.data(), &want);
                assert!(e < 1e-6, "{what}, call {call}: {e:e}");
            }
        };
        let mut wt = Tensor::from_vec(r.normal_vec(cout * cin * 9), &[cout, cin, 3, 3]);
        check(&wt, "fresh weights");
        if kernel_cache_enabled() {
            assert!(kernel_cache_bytes() >= cout * cin * 16 * 4, "weights met three times are kept");
        }
        // in place: the only holder writes one tap
        wt.data_mut()[7] += 1.0;
        check(&wt, "after a write in place");
        // updates of every value, as optimiser steps do: each is transformed afresh, and the
        // kernels of the older values are dropped, not piled up
        let buf = |t: &Tensor| match t.storage() {
            crate::tensor::Storage::Cpu(super::super::storage::CpuStorage::F32(b)) => b.clone(),
            _ => unreachable!("f32 on the CPU"),
        };
        for step in 0..4 {
            for v in wt.data_mut() {
                *v *= 0.9;
            }
            check(&wt, "after a whole update");
            if kernel_cache_enabled() {
                assert_eq!(kernel_cache_entries_for(&buf(&wt)), 1, "step {step}: one kernel per view");
            }
        }
        // copy on write: another holder keeps the old values, this one writes
        let old = wt.clone();
        wt.data_mut()[0] = -3.0;
        check(&wt, "after a copy on write");
        check(&old, "the other holder");
        // equal shape, other values
        check(&Tensor::from_vec(r.normal_vec(cout * cin * 9), &[cout, cin, 3, 3]), "another tensor");
        // views of one arena at two offsets
        let mut arena = Tensor::from_vec(r.normal_vec(2 * cout * cin * 9), &[2 * cout * cin * 9]);
        for round in 0..2 {
            for part in 0..2 {
                let v = arena.view(part * cout * cin * 9, &[cout, cin, 3, 3]).unwrap();
                assert!(v.is_view_of(&arena, part * cout * cin * 9));
                check(&v, "an arena view");
            }
            // the views are gone: the arena is written in place, as the optimiser's step does
            if round == 0 {
                for v in arena.data_mut() {
                    *v -= 0.01;
                }
            }
        }
        assert!(kernel_cache_bytes() <= KERNEL_CACHE_BYTES);
    }
}
