//! 3×3, stride-1, pad-1 convolution by Winograd F(4×4, 3×3) (Lavin & Gray, 2016, interpolation
//! points 0, ±1, ±2, ∞): each 4×4 output tile comes from a 6×6 input patch through 36 GEMMs of
//! `[Cout, Cin] × [Cin, tiles]`, 36 multiplies per 16 outputs against 16 per 4 for F(2×2, 3×3)
//! (a 4× cut in GEMM work against direct convolution, 2.25× for the smaller tiles). Its
//! transforms have larger coefficients (up to 8 in `Aᵀ`, 1/24 in `G`), so its rounding error is
//! a few times F(2×2)'s (about 1e-6 relative in f32, still below what the parity tests allow).
//! The forward pass and the input gradient (the same convolution of `dy` with the flipped,
//! transposed kernel) use it, and the weight gradient where the batch has many tiles
//! ([`super::winograd::weight_grad_tile`]).

use rayon::prelude::*;

use super::conv::Addend;
use super::gemm::{Mat, sgemm};
use super::profile::detail;
use super::winograd::{BLOCK_BYTES, Geo, KL, Lanes, SCRATCH, SyncPtr, Taps, VL, balanced_rows, lanes, store, transform_into_with};

/// Transformed values per tile (6×6).
pub const XI: usize = 36;

crate::multiversion! {
    /// `G g Gᵀ` of `KL` 3×3 kernels at once (taps `g[row-major tap][lane]`, outputs
    /// `u[ξ = 6i + j][lane]`), with `G = [¼ 0 0; −⅙ −⅙ −⅙; −⅙ ⅙ −⅙; 1/24 1/12 ⅙; 1/24 −1/12 ⅙; 0 0 1]`.
    fn kernel_transform_lanes(g: &[[f32; KL]; 9], u: &mut [[f32; KL]; XI]) {
        let mut t = [[[0.0f32; KL]; 3]; 6];
        for j in 0..3 {
            for l in 0..KL {
                let r = g_col(g[j][l], g[3 + j][l], g[6 + j][l]);
                for i in 0..6 {
                    t[i][j][l] = r[i];
                }
            }
        }
        for i in 0..6 {
            for l in 0..KL {
                let r = g_col(t[i][0][l], t[i][1][l], t[i][2][l]);
                for k in 0..6 {
                    u[i * 6 + k][l] = r[k];
                }
            }
        }
    }
}

/// `G (g0, g1, g2)ᵀ`.
#[inline(always)]
fn g_col(g0: f32, g1: f32, g2: f32) -> [f32; 6] {
    const SIXTH: f32 = 1.0 / 6.0;
    let (a, b) = (g0 * (1.0 / 24.0) + g2 * SIXTH, g1 * (1.0 / 12.0));
    [0.25 * g0, -SIXTH * (g0 + g1 + g2), -SIXTH * (g0 - g1 + g2), a + b, a - b, g2]
}

/// `U = G g Gᵀ` for every `[cout, cin]` 3×3 kernel → `u[36][cout][cin]`.
pub fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    transform_into_with(cout, cin, Taps::Direct(w), kernel_transform_lanes)
}

/// The input gradient's transformed kernel, `u[36][cin][cout]` of `w'[ci][co] = flip(w[co][ci])`.
pub fn transform_weights_flipped(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    transform_into_with(cin, cout, Taps::Flipped(w), kernel_transform_lanes)
}

/// `y[n, cout, h, w] = conv3x3(x, w) + b` (stride 1, pad 1) with pre-transformed weights `u`
/// (from [`transform_weights`]). Blocks of whole tile rows, sized so that a block's transformed
/// input and products stay in cache and their number is a multiple of the threads; blocks run in
/// parallel, each with single-threaded GEMMs.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(x: &[f32], u: &[f32], b: Option<&[f32]>, n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    conv3x3_blocked(x, u, b, None, n, cin, h, w, cout, MIN_TILES, BLOCK_BYTES)
}

/// [`conv3x3`] plus `add`, added to each output row as it is written.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_add(x: &[f32], u: &[f32], b: Option<&[f32]>, add: Option<Addend>, n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    conv3x3_blocked(x, u, b, add, n, cin, h, w, cout, MIN_TILES, BLOCK_BYTES)
}

/// Fewest tiles per block (the GEMMs' `n`): below 64 the GEMMs run on their narrow edge
/// kernels and repack the kernel per handful of tiles. Measured (`time_blocking`, kernels
/// transformed beforehand, best of 12, 2 threads, AVX-512): 64 against 8 took the CIFAR-10
/// shapes at batch 4 from 3.26 to 2.91 ms (128 channels, 32×32) and from 4.30 to 3.21 ms
/// (256, 16×16); F(2×2) took 4.58 and 3.68 ms.
pub const MIN_TILES: usize = 64;

#[allow(clippy::too_many_arguments)]
pub fn conv3x3_blocked(x: &[f32], u: &[f32], b: Option<&[f32]>, add: Option<Addend>, n: usize, cin: usize, h: usize, w: usize, cout: usize, min_tiles: usize, block_bytes: usize) -> Vec<f32> {
    if n * h * w == 0 {
        return Vec::new();
    }
    assert_eq!(u.len(), XI * cout * cin, "winograd F(4x4): kernels of the wrong size");
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    let rows = n * th;
    let pb = (block_bytes / (4 * XI * (cin + cout))).clamp(min_tiles, 4096);
    let rb = balanced_rows(rows, (pb / tw).clamp(1, rows));
    let blocks = rows.div_ceil(rb);
    let geo = Geo { cin, h, w, th, tw };
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
        let npp = np.next_multiple_of(VL); // planes padded to whole vectors
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let dn = phase_scratch(tw);
            let need = XI * (cin + cout) * npp + dn + 16 * npp;
            if sc.len() < need {
                sc.resize(need, 0.0);
            }
            let (v, rest) = sc[..need].split_at_mut(XI * cin * npp);
            let (m, rest) = rest.split_at_mut(XI * cout * npp);
            let (d, tt) = rest.split_at_mut(dn);
            let p = detail("winograd4 fwd: input transform (cpu time)");
            input_transform(x, &geo, row0, nrows, npp, v, d);
            drop(p);
            let p = detail("winograd4 fwd: 36 gemms (cpu time)");
            for xi in 0..XI {
                let uu = &u[xi * cout * cin..(xi + 1) * cout * cin];
                let vv = &v[xi * cin * npp..(xi + 1) * cin * npp];
                sgemm(cout, np, cin, Mat::rm(uu, cin), Mat::rm(vv, npp), &mut m[xi * cout * npp..(xi + 1) * cout * npp], npp, false, 1.0, 1);
            }
            drop(p);
            let _p = detail("winograd4 fwd: output transform (cpu time)");
            for co in 0..cout {
                output_tiles(m, co, cout, npp, np, b.map_or(0.0, |b| b[co]), tt);
                for lr in 0..nrows {
                    let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                    for a in 0..4 {
                        let r = 4 * ti + a;
                        if r >= h {
                            break;
                        }
                        let base = (img * cout + co) * h * w + r * w;
                        // SAFETY: this output row of channel co belongs to this block alone.
                        let out = unsafe { std::slice::from_raw_parts_mut(yp.0.add(base), w) };
                        let ph: [&[f32]; 4] = std::array::from_fn(|b| &tt[(4 * a + b) * npp + lr * tw..(4 * a + b) * npp + (lr + 1) * tw]);
                        interleave4(ph, out);
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

/// Weight gradient of [`conv3x3`]: `dw[cout, cin, 3, 3]` from the input `x` and the output
/// gradient `dy`. With `Y_p = Aᵀ[Σ_c U ⊙ V_p]A`, the gradient of `U[ξ]` is
/// `Σ_p (A dY_p Aᵀ)[ξ] V_p[ξ]ᵀ` (36 GEMMs with the tiles as the reduction), and `dw = Gᵀ dU G`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_weight_grad(x: &[f32], dy: &[f32], n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    if n * h * w == 0 {
        return vec![0.0; cout * cin * 9];
    }
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    let rows = n * th;
    // the tiles are the GEMM reduction here: larger blocks keep k large and the accumulators few
    let pb = (4 * BLOCK_BYTES / (4 * XI * (cin + cout))).clamp(128, 4096);
    let rb = (pb / tw).clamp(1, rows).min(rows.div_ceil(rayon::current_num_threads().max(1)));
    let blocks = rows.div_ceil(rb);
    let l = tw.next_multiple_of(VL) + 1;
    let geo = Geo { cin, h, w, th, tw };
    let process = |du: &mut [f32], blk: usize, first: bool| {
        let row0 = blk * rb;
        let nrows = rb.min(rows - row0);
        let np = nrows * tw;
        let npp = np.next_multiple_of(VL);
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let need = XI * (cin + cout) * npp + phase_scratch(tw).max(24 * l);
            if sc.len() < need {
                sc.resize(need, 0.0);
            }
            let (v, rest) = sc[..need].split_at_mut(XI * cin * npp);
            let (dm, d) = rest.split_at_mut(XI * cout * npp);
            let p = detail("winograd4 dw: input transform (cpu time)");
            input_transform(x, &geo, row0, nrows, npp, v, d);
            drop(p);
            let p = detail("winograd4 dw: dy transform (cpu time)");
            dy_transform(dy, &Geo { cin: cout, ..geo }, row0, nrows, npp, dm, d);
            drop(p);
            let _p = detail("winograd4 dw: 36 gemms (cpu time)");
            for xi in 0..XI {
                let a = &dm[xi * cout * npp..(xi + 1) * cout * npp];
                let bv = &v[xi * cin * npp..(xi + 1) * cin * npp];
                sgemm(cout, cin, np, Mat::rm(a, npp), Mat::rm_t(bv, npp), &mut du[xi * cout * cin..(xi + 1) * cout * cin], cin, !first, 1.0, 1);
            }
        });
    };
    // the threads' partial dU are added up in the final transform's reads (in parallel); each
    // thread's first block writes its partial over uninitialised memory (accumulate = false)
    let parts = super::par_partials(blocks, XI * cout * cin, process);
    // dw = Gᵀ dU G
    let plane = cout * cin;
    let mut dw = vec![0.0f32; plane * 9];
    // blocks of OB kernels: each plane's run of the block is read in order (one stream at a
    // time, not 36 strided streams per kernel)
    const OB: usize = 256;
    dw.par_chunks_mut(9 * OB).enumerate().for_each(|(blk, out)| {
        let (oc0, nb) = (blk * OB, out.len() / 9);
        let mut du = vec![0.0f32; XI * nb];
        for (i, d) in du.chunks_exact_mut(nb).enumerate() {
            for p in &parts {
                for (a, b) in d.iter_mut().zip(&p[i * plane + oc0..i * plane + oc0 + nb]) {
                    *a += b;
                }
            }
        }
        for (o, out) in out.chunks_exact_mut(9).enumerate() {
            let mut t = [[0.0f32; 6]; 3]; // t[a][k] = (Gᵀ dU)[a][k]
            for k in 0..6 {
                let col: [f32; 6] = std::array::from_fn(|i| du[(i * 6 + k) * nb + o]);
                let r = gt_col(&col);
                for a in 0..3 {
                    t[a][k] = r[a];
                }
            }
            for a in 0..3 {
                let r = gt_col(&t[a]);
                out[a * 3..a * 3 + 3].copy_from_slice(&r);
            }
        }
    });
    dw
}

/// `Gᵀ u` of six values (the adjoint of [`g_col`]).
#[inline(always)]
fn gt_col(u: &[f32; 6]) -> [f32; 3] {
    const SIXTH: f32 = 1.0 / 6.0;
    let (s, d) = (u[1] + u[2], u[1] - u[2]);
    let (p, q) = (u[3] + u[4], u[3] - u[4]);
    [0.25 * u[0] - SIXTH * s + p * (1.0 / 24.0), -SIXTH * d + q * (1.0 / 12.0), -SIXTH * s + SIXTH * p + u[5]]
}

crate::multiversion! {
    /// `dM[ξ][co][p] = (A dY_p Aᵀ)[ξ]` for the 4×4 output-gradient tiles of the tile rows
    /// `row0 .. row0+nrows` (`g.cin` is the gradient's channel count; zero outside the image; `dm`
    /// is `[36][cout][npp]`; `d` is scratch of `16·(⌈tw⌉₈ + 1)`).
    fn dy_transform(dy: &[f32], g: &Geo, row0: usize, nrows: usize, npp: usize, dm: &mut [f32], d: &mut [f32]) {
        let Geo { cin: cout, h, w, th, tw } = *g;
        let l = tw.next_multiple_of(VL) + 1;
        d[..16 * l].fill(0.0); // phases4's padding
        for co in 0..cout {
            for lr in 0..nrows {
                let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                let base = (img * cout + co) * h * w;
                for a in 0..4 {
                    let ph = &mut d[4 * a * l..(4 * a + 4) * l];
                    let r = 4 * ti + a;
                    if r < h {
                        phases4::<0>(&dy[base + r * w..base + (r + 1) * w], ph, l);
                    } else {
                        ph.fill(0.0);
                    }
                }
                dy_tile_row(&d[..16 * l], l, tw, dm, (co * npp + lr * tw, cout * npp));
            }
        }
    }
}

/// `A y` of four vectors (`A` is `Aᵀ`'s transpose, 6×4).
#[inline(always)]
fn a6(y: &[Lanes; 4]) -> [Lanes; 6] {
    let mut o = [[0.0f32; VL]; 6];
    for k in 0..VL {
        let (y0, y1, y2, y3) = (y[0][k], y[1][k], y[2][k], y[3][k]);
        let (e, f) = (y0 + y2, y1 + y3);
        let (e4, f2) = (y0 + 4.0 * y2, 2.0 * y1 + 8.0 * y3);
        o[0][k] = y0;
        o[1][k] = e + f;
        o[2][k] = e - f;
        o[3][k] = e4 + f2;
        o[4][k] = e4 - f2;
        o[5][k] = y3;
    }
    o
}

/// One output-gradient channel's tile row: `d` holds its 4 rows as `[row][phase][l]`; writes
/// `A dY Aᵀ` to `dm[base + ξ·stride + t]` for the 36 `ξ`, 8 tiles per step.
#[inline(always)]
fn dy_tile_row(d: &[f32], l: usize, tw: usize, dm: &mut [f32], at: (usize, usize)) {
    let (base, stride) = at;
    for c0 in (0..tw).step_by(VL) {
        let n = VL.min(tw - c0);
        let mut t = [[[0.0f32; VL]; 4]; 6]; // t[i][j] = (A dY)[i][j]
        for j in 0..4 {
            let col: [Lanes; 4] = std::array::from_fn(|a| lanes(d, (4 * a + j) * l + c0));
            for (i, r) in a6(&col).into_iter().enumerate() {
                t[i][j] = r;
            }
        }
        for (i, row) in t.iter().enumerate() {
            for (k, o) in a6(row).iter().enumerate() {
                store(dm, base + (i * 6 + k) * stride + c0, o, n);
            }
        }
    }
}

/// `out[4k + b] = ph[b][k]` for the whole row.
#[inline(always)]
fn interleave4(ph: [&[f32]; 4], out: &mut [f32]) {
    let full = out.len() / 4;
    for (k, o) in out.chunks_exact_mut(4).enumerate() {
        o.copy_from_slice(&[ph[0][k], ph[1][k], ph[2][k], ph[3][k]]);
    }
    for (b, o) in out[4 * full..].iter_mut().enumerate() {
        *o = ph[b][full];
    }
}

crate::multiversion! {
    /// `V[ξ][c][p] = (Bᵀ d B)[ξ]` for the 6×6 input patches of the tile rows `row0 .. row0+nrows`
    /// (`v` is `[36][cin][npp]`; `d` is scratch of `24·(⌈tw⌉₈ + 1)`). Each of a tile row's six
    /// input rows is split into its four column phases first (patch column `j` of tile `t` is
    /// phase `j mod 4` at `t + j / 4`), so that every later step is a fixed-width vector
    /// operation over 8 tiles.
    fn input_transform(x: &[f32], g: &Geo, row0: usize, nrows: usize, npp: usize, v: &mut [f32], d: &mut [f32]) {
        let Geo { cin, h, w, th, tw } = *g;
        if tw < VL && VL.is_multiple_of(tw) {
            return input_transform_grouped(x, g, row0, nrows, npp, v, d);
        }
        let l = tw.next_multiple_of(VL) + 1;
        d[..24 * l].fill(0.0); // phases4's padding
        for c in 0..cin {
            for lr in 0..nrows {
                let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                let xc = &x[(img * cin + c) * h * w..(img * cin + c + 1) * h * w];
                for a in 0..6 {
                    let ph = &mut d[4 * a * l..(4 * a + 4) * l];
                    let r = (4 * ti + a) as isize - 1;
                    if r >= 0 && r < h as isize {
                        phases4::<1>(&xc[r as usize * w..(r as usize + 1) * w], ph, l);
                    } else {
                        ph.fill(0.0);
                    }
                }
                input_tile_row(&d[..24 * l], l, tw, v, (c * npp + lr * tw, cin * npp));
            }
        }
    }
}

/// Scratch floats of [`input_transform`] for rows of `tw` tiles.
pub(super) fn phase_scratch(tw: usize) -> usize {
    (24 * (tw.next_multiple_of(VL) + 1)).max(48 * VL)
}

/// [`input_transform`] for narrow images (`tw` divides the vector width, e.g. 16×16 with 4 tiles
/// a row): `VL / tw` tile rows share each vector, whose tiles are consecutive in `v`, so the
/// transform runs on full vectors and stores whole ones (one tile row a vector left 4 of 8 lanes
/// idle and stored each of the 36 values of a tile row by a scalar loop). `d[((a·4 + phase)·2 +
/// s)·VL + r·tw + t]` is patch row `a`, column phase `phase`, of tile `t + s` of the group's tile
/// row `r`.
#[inline(always)]
fn input_transform_grouped(x: &[f32], g: &Geo, row0: usize, nrows: usize, npp: usize, v: &mut [f32], d: &mut [f32]) {
    let Geo { cin, h, w, th, tw } = *g;
    let rg = VL / tw;
    let d = &mut d[..48 * VL];
    // one padded input row: column k is input column k − 1 (tw ≤ VL / 2, so w + 2 ≤ 2·VL + 2)
    let mut prow = [0.0f32; 4 * VL + 8];
    for c in 0..cin {
        for lr0 in (0..nrows).step_by(rg) {
            let nr = rg.min(nrows - lr0);
            for r in 0..rg {
                let (img, ti) = ((row0 + lr0 + r) / th, (row0 + lr0 + r) % th);
                for a in 0..6 {
                    let row = (4 * ti + a) as isize - 1;
                    let live = r < nr && row >= 0 && row < h as isize;
                    if live {
                        let at = ((img * cin + c) * h + row as usize) * w;
                        prow[1..1 + w].copy_from_slice(&x[at..at + w]);
                    }
                    for ph in 0..4 {
                        for s in 0..2 {
                            let dst = &mut d[((a * 4 + ph) * 2 + s) * VL + r * tw..((a * 4 + ph) * 2 + s) * VL + (r + 1) * tw];
                            if live {
                                for (t, o) in dst.iter_mut().enumerate() {
                                    *o = prow[4 * (t + s) + ph];
                                }
                            } else {
                                dst.fill(0.0);
                            }
                        }
                    }
                }
            }
            let mut t = [[[0.0f32; VL]; 6]; 6]; // t[i][j]: row i of Bᵀ d, patch column j
            for j in 0..6 {
                let col: [Lanes; 6] = std::array::from_fn(|a| lanes(d, ((a * 4 + (j & 3)) * 2 + j / 4) * VL));
                for (i, r) in bt6(&col).into_iter().enumerate() {
                    t[i][j] = r;
                }
            }
            for (i, row) in t.iter().enumerate() {
                for (k, o) in bt6(row).iter().enumerate() {
                    store(v, (i * 6 + k) * cin * npp + c * npp + lr0 * tw, o, nr * tw);
                }
            }
        }
    }
}

/// The four column phases of one input row shifted right by `PAD` columns (1: padded column `k`
/// is input column `k − 1`; 0: no padding): `ph[p·l + t]` = column `4t + p` of the shifted row.
/// Only the row's own columns are written: `ph` must be zero elsewhere (zeroed before the first
/// row of a width, since all rows of one width write the same positions).
#[inline(always)]
fn phases4<const PAD: usize>(x: &[f32], ph: &mut [f32], l: usize) {
    let (p0, rest) = ph.split_at_mut(l);
    let (p1, rest) = rest.split_at_mut(l);
    let (p2, p3) = rest.split_at_mut(l);
    let p = [p0, p1, p2, p3];
    let mut chunks = x.chunks_exact(4 * VL);
    let mut j = 0;
    for c in &mut chunks {
        let c: &[f32; 4 * VL] = c.try_into().expect("a whole chunk");
        for k in 0..4 {
            // x[4(j + i) + k] is shifted column 4(j + i) + k + PAD
            let q: Lanes = std::array::from_fn(|i| c[4 * i + k]);
            let (phase, off) = ((k + PAD) % 4, j + (k + PAD) / 4);
            p[phase][off..off + VL].copy_from_slice(&q);
        }
        j += VL;
    }
    // the padding (the shifted row's first PAD columns, and past its end) is left as it is: zero,
    // as the callers zero the buffer before the first row, and every row of this width writes
    // the same positions (a fill per phase per row was a memset call each, 1% of a U-Net step)
    for (k, &val) in chunks.remainder().iter().enumerate() {
        let col = 4 * j + k + PAD;
        p[col % 4][col / 4] = val;
    }
}

/// `Bᵀ d` of six vectors, with `Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0;
/// 0 2 −1 −2 1 0; 0 4 0 −5 0 1]`.
#[inline(always)]
fn bt6(d: &[Lanes; 6]) -> [Lanes; 6] {
    let mut o = [[0.0f32; VL]; 6];
    for k in 0..VL {
        let (d0, d1, d2, d3, d4, d5) = (d[0][k], d[1][k], d[2][k], d[3][k], d[4][k], d[5][k]);
        let (s1, s2) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
        let (s3, s4) = (d4 - d2, 2.0 * (d3 - d1));
        o[0][k] = 4.0 * d0 - 5.0 * d2 + d4;
        o[1][k] = s1 + s2;
        o[2][k] = s1 - s2;
        o[3][k] = s3 + s4;
        o[4][k] = s3 - s4;
        o[5][k] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    o
}

/// `Aᵀ m` of six vectors, with `Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0; 0 1 −1 8 −8 1]`.
#[inline(always)]
fn at4(m: &[Lanes; 6]) -> [Lanes; 4] {
    let mut o = [[0.0f32; VL]; 4];
    for k in 0..VL {
        let (p, q) = (m[1][k] + m[2][k], m[1][k] - m[2][k]);
        let (r, s) = (m[3][k] + m[4][k], m[3][k] - m[4][k]);
        o[0][k] = m[0][k] + p + r;
        o[1][k] = q + 2.0 * s;
        o[2][k] = p + 4.0 * r;
        o[3][k] = q + 8.0 * s + m[5][k];
    }
    o
}

/// One channel's tile row: `d` holds the 6 padded input rows as `[row][phase][l]`; writes
/// `v[base + ξ·stride + t]` for the 36 `ξ` (`at = (base, stride)`), 8 tiles per step.
#[inline(always)]
fn input_tile_row(d: &[f32], l: usize, tw: usize, v: &mut [f32], at: (usize, usize)) {
    let (base, stride) = at;
    for c0 in (0..tw).step_by(VL) {
        let n = VL.min(tw - c0);
        let mut t = [[[0.0f32; VL]; 6]; 6]; // t[i][j]: row i of Bᵀ d, patch column j
        for j in 0..6 {
            let col: [Lanes; 6] = std::array::from_fn(|a| lanes(d, (4 * a + (j & 3)) * l + c0 + j / 4));
            for (i, r) in bt6(&col).into_iter().enumerate() {
                t[i][j] = r;
            }
        }
        for (i, row) in t.iter().enumerate() {
            for (k, o) in bt6(row).iter().enumerate() {
                store(v, base + (i * 6 + k) * stride + c0, o, n);
            }
        }
    }
}

crate::multiversion! {
    /// `Aᵀ M A + bias` of output channel `co` for the block's `np` tiles: `tt[4a + b][p]` is
    /// output row `a`, column `b` of tile `p` (`m` is `[36][cout][npp]`).
    fn output_tiles(m: &[f32], co: usize, cout: usize, npp: usize, np: usize, bias: f32, tt: &mut [f32]) {
        for c0 in (0..np).step_by(VL) {
            let n = VL.min(np - c0);
            let mut s = [[[0.0f32; VL]; 6]; 4]; // s[a][k]: row a of Aᵀ M, column k
            for k in 0..6 {
                let col: [Lanes; 6] = std::array::from_fn(|i| lanes(m, ((i * 6 + k) * cout + co) * npp + c0));
                for (a, r) in at4(&col).into_iter().enumerate() {
                    s[a][k] = r;
                }
            }
            for (a, row) in s.iter().enumerate() {
                for (b, o) in at4(row).iter().enumerate() {
                    let o: Lanes = std::array::from_fn(|q| o[q] + bias);
                    store(tt, (4 * a + b) * npp + c0, &o, n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel transform is `G g Gᵀ` with Lavin's `G`, element for element.
    #[test]
    fn kernel_transform_is_g_g_gt() {
        let mut r = crate::rng::Rng::new(3);
        let g = r.normal_vec(9);
        let gm: [[f64; 3]; 6] = [[0.25, 0.0, 0.0], [-1.0 / 6.0; 3], [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0], [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0], [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0], [0.0, 0.0, 1.0]];
        let u = transform_weights(&g, 1, 1);
        for i in 0..6 {
            for k in 0..6 {
                let want: f64 = (0..3).flat_map(|a| (0..3).map(move |b| (a, b))).map(|(a, b)| gm[i][a] * g[a * 3 + b] as f64 * gm[k][b]).sum();
                assert!((u[i * 6 + k] as f64 - want).abs() < 1e-6, "u[{i}][{k}] {} vs {want}", u[i * 6 + k]);
            }
        }
    }
}

#[cfg(test)]
mod timing {
    /// Timing harness (not a check): F(2×2) against F(4×4) at several blockings.
    #[test]
    #[ignore]
    fn time_blocking() {
        use crate::backend::cpu::winograd as w2;
        let mut r = crate::rng::Rng::new(4);
        for &(n, c, h) in &[(4usize, 128usize, 32usize), (4, 256, 16), (32, 128, 32), (32, 256, 16), (32, 64, 14)] {
            let x = r.normal_vec(n * c * h * h);
            let w = r.normal_vec(c * c * 9);
            let u2 = w2::transform_weights(&w, c, c);
            let u4 = super::transform_weights(&w, c, c);
            let variants: Vec<(String, Box<dyn Fn() -> Vec<f32>>)> = {
                let mut v: Vec<(String, Box<dyn Fn() -> Vec<f32>>)> = vec![("f2".into(), Box::new(|| w2::conv3x3(&x, &u2, None, n, c, h, h, c)))];
                for &(mt, bb) in &[(8usize, 2usize << 20), (32, 2 << 20), (64, 2 << 20), (128, 2 << 20), (8, 8 << 20), (64, 8 << 20), (8, 32 << 20)] {
                    let (x, u4) = (&x, &u4);
                    v.push((format!("f4 t{mt} b{}M", bb >> 20), Box::new(move || super::conv3x3_blocked(x, u4, None, None, n, c, h, h, c, mt, bb))));
                }
                v
            };
            let mut best = vec![f64::MAX; variants.len()];
            for _ in 0..12 {
                for (i, (_, f)) in variants.iter().enumerate() {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            let line: Vec<String> = variants.iter().zip(&best).map(|((s, _), b)| format!("{s}: {b:.2}")).collect();
            eprintln!("n{n} c{c} {h}x{h}: {}", line.join(" | "));
        }
    }

    #[test]
    #[ignore]
    fn time_weight_transforms() {
        use crate::backend::cpu::winograd as w2;
        let mut r = crate::rng::Rng::new(4);
        for &c in &[128usize, 256] {
            let w = r.normal_vec(c * c * 9);
            let mut best = [f64::MAX; 4];
            for _ in 0..10 {
                let fs: [&dyn Fn() -> Vec<f32>; 4] =
                    [&|| w2::transform_weights(&w, c, c), &|| w2::transform_weights_flipped(&w, c, c), &|| super::transform_weights(&w, c, c), &|| super::transform_weights_flipped(&w, c, c)];
                for (i, f) in fs.iter().enumerate() {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            eprintln!("c{c}: f2 {:.2} f2flip {:.2} f4 {:.2} f4flip {:.2} ms", best[0], best[1], best[2], best[3]);
        }
        // weight gradients, each tile
        for &(n, c, h) in &[(4usize, 128usize, 32usize), (4, 256, 16), (16, 256, 16), (32, 128, 32), (32, 256, 16)] {
            let x = r.normal_vec(n * c * h * h);
            let dy = r.normal_vec(n * c * h * h);
            let mut best = [f64::MAX; 2];
            for _ in 0..10 {
                let fs: [&dyn Fn() -> Vec<f32>; 2] = [&|| w2::conv3x3_weight_grad(&x, &dy, n, c, h, h, c), &|| super::conv3x3_weight_grad(&x, &dy, n, c, h, h, c)];
                for (i, f) in fs.iter().enumerate() {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            eprintln!("dw n{n} c{c} {h}x{h}: f2 {:.2} f4 {:.2} ms", best[0], best[1]);
        }
    }
}

#[cfg(test)]
mod timing_small {
    /// Timing harness (not a check): small images by im2col against Winograd with kept kernels.
    #[test]
    #[ignore]
    fn time_small_images() {
        use crate::backend::cpu::conv::{ConvGeom, conv2d_forward};
        use crate::backend::cpu::winograd as w2;
        let mut r = crate::rng::Rng::new(4);
        for &(n, c, h) in &[(4usize, 256usize, 8usize), (4, 256, 4), (32, 256, 8), (32, 256, 4), (32, 64, 7), (8, 256, 8), (8, 256, 4)] {
            let x = r.normal_vec(n * c * h * h);
            let w = r.normal_vec(c * c * 9);
            let g = ConvGeom { n, cin: c, h, w: h, cout: c, kh: 3, kw: 3, stride: 1, pad: 1 };
            let u2 = w2::transform_weights(&w, c, c);
            let u4 = super::transform_weights(&w, c, c);
            let fs: [(&str, &dyn Fn() -> Vec<f32>); 3] =
                [("im2col", &|| conv2d_forward(&x, &w, None, &g)), ("f2", &|| w2::conv3x3(&x, &u2, None, n, c, h, h, c)), ("f4", &|| super::conv3x3(&x, &u4, None, n, c, h, h, c))];
            let mut best = [f64::MAX; 3];
            for _ in 0..15 {
                for (i, (_, f)) in fs.iter().enumerate() {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            eprintln!("n{n} c{c} {h}x{h}: im2col {:.3} f2 {:.3} f4 {:.3} ms", best[0], best[1], best[2]);
            // a training step's convolution: fresh weights, forward, dx and dw
            let dy = r.normal_vec(n * c * h * h);
            let fb: [(&str, &dyn Fn() -> usize); 2] = [
                ("im2col", &|| {
                    let y = crate::backend::cpu::conv::conv2d_im2col_forward(&x, &w, None, &g);
                    let (dx, dw, _) = crate::backend::cpu::conv::conv2d_backward(&x, &w, &dy, &g, true);
                    y.len() + dx.unwrap().len() + dw.len()
                }),
                ("f2", &|| {
                    let y = w2::conv3x3(&x, &w2::transform_weights(&w, c, c), None, n, c, h, h, c);
                    let dx = w2::conv3x3_input_grad(w2::Tile::F2, &dy, &w, n, c, h, h, c);
                    let dw = w2::conv3x3_weight_grad(&x, &dy, n, c, h, h, c);
                    y.len() + dx.len() + dw.len()
                }),
            ];
            let mut best = [f64::MAX; 2];
            for _ in 0..10 {
                for (i, (_, f)) in fb.iter().enumerate() {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            eprintln!("   fresh fwd+dx+dw: im2col {:.3} f2 {:.3} ms", best[0], best[1]);
        }
    }
}
