//! 2-D convolution (cross-correlation, groups = 1) by im2col + GEMM, parallel over the batch.

use rayon::prelude::*;

use super::gemm::{Mat, sgemm, threads_for};
use super::profile::detail;
use super::winograd;

/// Geometry of one conv2d call (also the key of the GPU's per-shape convolution plans).
pub use crate::backend::geom::ConvGeom;

/// Valid output columns `[lo, hi)` for kernel column `kj` with stride 1: those reading inside the row.
#[inline]
fn valid_cols(wo: usize, w: usize, pad: usize, kj: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(kj).min(wo);
    let hi = (w + pad).saturating_sub(kj).min(wo).max(lo);
    (lo, hi)
}

/// Unfold one image `[cin, h, w]` into `col[cin·kh·kw, ho·wo]`.
fn im2col(x: &[f32], g: &ConvGeom, col: &mut [f32]) {
    im2col_ld(x, g, col, g.ho() * g.wo());
}

/// [`im2col`] into rows `ld` floats apart (a column block of a wider matrix).
fn im2col_ld(x: &[f32], g: &ConvGeom, col: &mut [f32], ld: usize) {
    let (ho, wo) = (g.ho(), g.wo());
    let (s, p) = (g.stride as isize, g.pad as isize);
    for c in 0..g.cin {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let dst = &mut col[row * ld..row * ld + ho * wo];
                let (lo, hi) = valid_cols(wo, g.w, g.pad, kj);
                for oi in 0..ho {
                    let ii = oi as isize * s - p + ki as isize;
                    let drow = &mut dst[oi * wo..(oi + 1) * wo];
                    if ii < 0 || ii >= g.h as isize {
                        drow.fill(0.0);
                        continue;
                    }
                    let xr = &xc[ii as usize * g.w..(ii as usize + 1) * g.w];
                    if s == 1 {
                        // a contiguous run: output column oj reads input column oj + kj − pad
                        drow[..lo].fill(0.0);
                        drow[hi..].fill(0.0);
                        if hi > lo {
                            let start = lo + kj - g.pad;
                            drow[lo..hi].copy_from_slice(&xr[start..start + (hi - lo)]);
                        }
                    } else {
                        for (oj, d) in drow.iter_mut().enumerate() {
                            let jj = oj as isize * s - p + kj as isize;
                            *d = if jj >= 0 && jj < g.w as isize { xr[jj as usize] } else { 0.0 };
                        }
                    }
                }
            }
        }
    }
}

/// Fold `col[cin·kh·kw, ho·wo]` back, adding into one image `dx[cin, h, w]`.
fn col2im(col: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    col2im_ld(col, g, dx, g.ho() * g.wo());
}

/// [`col2im`] from rows `ld` floats apart.
fn col2im_ld(col: &[f32], g: &ConvGeom, dx: &mut [f32], ld: usize) {
    let (ho, wo) = (g.ho(), g.wo());
    let (s, p) = (g.stride as isize, g.pad as isize);
    for c in 0..g.cin {
        let xc = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &col[row * ld..row * ld + ho * wo];
                let (lo, hi) = valid_cols(wo, g.w, g.pad, kj);
                for oi in 0..ho {
                    let ii = oi as isize * s - p + ki as isize;
                    if ii < 0 || ii >= g.h as isize {
                        continue;
                    }
                    let xr = &mut xc[ii as usize * g.w..(ii as usize + 1) * g.w];
                    let sr = &src[oi * wo..(oi + 1) * wo];
                    if s == 1 {
                        if hi > lo {
                            let start = lo + kj - g.pad;
                            for (a, &b) in xr[start..start + (hi - lo)].iter_mut().zip(&sr[lo..hi]) {
                                *a += b;
                            }
                        }
                    } else {
                        for (oj, &v) in sr.iter().enumerate() {
                            let jj = oj as isize * s - p + kj as isize;
                            if jj >= 0 && jj < g.w as isize {
                                xr[jj as usize] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's scratch buffer of at least `len` floats (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut buf = s.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// How many threads each per-image GEMM gets: parallel over images when the batch can keep
/// every thread busy, otherwise parallel inside the GEMM.
fn inner_threads(g: &ConvGeom) -> usize {
    let t = rayon::current_num_threads();
    if g.n >= t { 1 } else { threads_for(g.cout, g.ho() * g.wo(), g.k()) }
}

fn for_each_image<F: Fn(usize, &mut [f32]) + Sync + Send>(out: &mut [f32], per: usize, n: usize, f: F) {
    if n > 1 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(per).enumerate().for_each(|(i, o)| f(i, o));
    } else {
        out.chunks_mut(per).enumerate().for_each(|(i, o)| f(i, o));
    }
}

/// `y[n, cout, ho, wo] = w ⋆ x + b`, `w: [cout, cin, kh, kw]`. 3×3 stride-1 pad-1 convolutions go
/// through Winograd F(2×2, 3×3), the rest through im2col + GEMM.
pub fn conv2d_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    conv2d_forward_cached(x, w, None, b, g)
}

/// [`conv2d_forward`] with the buffer that holds `w`'s values: Winograd's transformed kernel is
/// then cached for the next call with the same values ([`winograd::transform_weights_cached`]).
pub fn conv2d_forward_cached(x: &[f32], w: &[f32], w_buf: Option<&super::buf::Buf<f32>>, b: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    conv2d_forward_add(x, w, w_buf, b, None, g)
}

/// What a convolution adds to its output as it writes it: a tensor of the output's shape (a
/// residual branch) or one value per sample and output channel (a time embedding).
#[derive(Clone, Copy, Debug)]
pub enum Addend<'a> {
    /// `[N, Cout, Ho, Wo]`
    Full(&'a [f32]),
    /// `[N, Cout]`
    PerChannel(&'a [f32]),
}

impl Addend<'_> {
    /// Add to `out`, the output row `r` (`wo` values) of image `img`, channel `co`.
    #[inline]
    pub fn add_row(&self, out: &mut [f32], img: usize, co: usize, cout: usize, r: usize, ho: usize) {
        let wo = out.len();
        match *self {
            Addend::Full(a) => {
                let at = ((img * cout + co) * ho + r) * wo;
                for (o, &v) in out.iter_mut().zip(&a[at..at + wo]) {
                    *o += v;
                }
            }
            Addend::PerChannel(e) => {
                let v = e[img * cout + co];
                for o in out.iter_mut() {
                    *o += v;
                }
            }
        }
    }
    /// Add to a whole output `y [N, Cout, Ho, Wo]`, in parallel over rows.
    fn add_to(&self, y: &mut [f32], g: &ConvGeom) {
        let (ho, wo) = (g.ho(), g.wo());
        if ho * wo == 0 {
            return;
        }
        y.par_chunks_mut(ho * wo).enumerate().for_each(|(ic, plane)| {
            let (img, co) = (ic / g.cout, ic % g.cout);
            for (r, row) in plane.chunks_exact_mut(wo).enumerate() {
                self.add_row(row, img, co, g.cout, r, ho);
            }
        });
    }
}

/// [`conv2d_forward_cached`] plus `add`: the Winograd paths add it as they write each output
/// row; the others add it in place after their GEMM (no second output either way).
pub fn conv2d_forward_add(x: &[f32], w: &[f32], w_buf: Option<&super::buf::Buf<f32>>, b: Option<&[f32]>, add: Option<Addend>, g: &ConvGeom) -> Vec<f32> {
    let _g = geometry_scope("fwd", g);
    if winograd::applies(g.kh, g.kw, g.stride, g.pad, g.cin, g.cout, g.n, g.h, g.w) {
        let _p = detail("conv fwd: winograd");
        let tile = winograd::tile_for(g.h, g.w);
        let u = winograd::transform_weights_cached(tile, w_buf, w, g.cout, g.cin);
        return winograd::conv3x3_for(tile, x, &u, b, add, g.n, g.cin, g.h, g.w, g.cout);
    }
    if winograd::small_image_applies(g.kh, g.kw, g.stride, g.pad, g.cin, g.cout, g.n, g.h, g.w) {
        let _p = detail("conv fwd: winograd, small image");
        let u = winograd::transform_weights_cached(winograd::Tile::F2, w_buf, w, g.cout, g.cin);
        return winograd::conv3x3_add(x, &u, b, add, g.n, g.cin, g.h, g.w, g.cout);
    }
    let mut y = if batched(g) {
        let _p = detail("conv fwd: batched im2col+gemm");
        conv2d_batched_forward(x, w, b, g)
    } else {
        let _p = detail(if g.pointwise() { "conv fwd: 1x1 gemm" } else { "conv fwd: im2col+gemm" });
        conv2d_im2col_forward(x, w, b, g)
    };
    if let Some(a) = add {
        a.add_to(&mut y, g);
    }
    y
}

/// While profiling, a detail row per pass and geometry (`conv fwd n4 256→256 8×8 k3 s1`), so that
/// `bench unet --profile` tells which convolutions the time goes to.
fn geometry_scope(pass: &str, g: &ConvGeom) -> Option<super::profile::Scope> {
    super::profile::enabled().then(|| detail(&format!("conv {pass} n{} {}→{} {}×{} k{} s{}", g.n, g.cin, g.cout, g.h, g.w, g.kh, g.stride)))
}

/// [`conv2d_forward`] by im2col + GEMM for every geometry (the reference the Winograd path is tested against).
pub fn conv2d_im2col_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    let (ho, wo) = (g.ho(), g.wo());
    let (hw, k) = (ho * wo, g.k());
    let mut y = vec![0.0f32; g.n * g.cout * hw];
    let threads = inner_threads(g);
    for_each_image(&mut y, g.cout * hw, g.n, |i, yi| {
        let xi = &x[i * g.cin * g.h * g.w..(i + 1) * g.cin * g.h * g.w];
        if let Some(b) = b {
            for (co, row) in yi.chunks_mut(hw).enumerate() {
                row.fill(b[co]);
            }
        }
        if g.pointwise() {
            sgemm(g.cout, hw, k, Mat::rm(w, k), Mat::rm(xi, hw), yi, hw, b.is_some(), 1.0, threads);
        } else {
            with_scratch(k * hw, |col| {
                im2col(xi, g, col);
                sgemm(g.cout, hw, k, Mat::rm(w, k), Mat::rm(col, hw), yi, hw, b.is_some(), 1.0, threads);
            });
        }
    });
    y
}

/// Gradients of conv2d: `(dx, dw, db)` from `dy`. Uses Winograd where [`conv2d_forward`] does.
pub fn conv2d_backward(x: &[f32], w: &[f32], dy: &[f32], g: &ConvGeom, need_dx: bool) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let _g = geometry_scope(if need_dx { "bwd" } else { "bwd (dw)" }, g);
    if winograd::applies(g.kh, g.kw, g.stride, g.pad, g.cin, g.cout, g.n, g.h, g.w) {
        let db = bias_grad(dy, g);
        let dw = {
            let _p = detail("conv dw: winograd");
            winograd::conv3x3_weight_grad_for(winograd::weight_grad_tile(g.n, g.h, g.w), x, dy, g.n, g.cin, g.h, g.w, g.cout)
        };
        // the input gradient is the convolution of dy with the flipped, transposed kernel
        let dx = need_dx.then(|| {
            let _p = detail("conv dx: winograd");
            winograd::conv3x3_input_grad(winograd::tile_for(g.h, g.w), dy, w, g.n, g.cin, g.h, g.w, g.cout)
        });
        return (dx, dw, db);
    }
    if batched(g) {
        return conv2d_batched_backward(x, w, dy, g, need_dx);
    }
    conv2d_im2col_backward(x, w, dy, g, need_dx)
}

/// Whether a convolution unfolds the whole batch into one matrix: small output images (at most
/// [`BATCHED_MAX_PIXELS`]) of a non-pointwise kernel, whose per-image GEMMs would have a
/// dimension of only `ho·wo` (16 or 64 for the 4×4 and 8×8 levels: the GEMM runs far below
/// peak, and the weight gradient rereads and rewrites all of `dw` once per image).
fn batched(g: &ConvGeom) -> bool {
    !g.pointwise() && g.n > 1 && g.ho() * g.wo() <= BATCHED_MAX_PIXELS && g.n * g.ho() * g.wo() <= BATCHED_MAX_COLUMNS && g.k() * g.n * g.ho() * g.wo() <= BATCHED_MAX_COL
}

/// Output images up to this many pixels use the batched unfolding.
pub const BATCHED_MAX_PIXELS: usize = 256;
/// ... when the whole batch has at most this many output pixels: beyond, the per-image GEMMs are
/// wide enough and their unfoldings stay in cache (the MNIST U-Net at batch 32, 14×14 and 7×7,
/// took 150 ms forward unfolded per image, 175 ms batched).
const BATCHED_MAX_COLUMNS: usize = 1024;
/// The batched unfolding's matrix is at most this many floats (32 MiB).
const BATCHED_MAX_COL: usize = 8 << 20;

/// `c[m×n] = a·b` split by rows over the rayon threads, each part a single-threaded GEMM
/// (the GEMM's own threading splits these shapes less evenly; measured on the 8×8 and 4×4
/// convolutions of the CIFAR-10 U-Net).
fn par_rows_gemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize) {
    let t = rayon::current_num_threads().min(m.div_ceil(16)).max(1);
    if t == 1 || m * n * k < (1 << 20) {
        sgemm(m, n, k, a, b, c, ldc, false, 1.0, 1);
        return;
    }
    let rows = m.div_ceil(t).next_multiple_of(16);
    c[..(m - 1) * ldc + n].par_chunks_mut(rows * ldc).enumerate().for_each(|(p, cp)| {
        let r0 = p * rows;
        let mr = rows.min(m - r0);
        let ap = Mat { data: &a.data[r0 * a.rs as usize..], rs: a.rs, cs: a.cs };
        sgemm(mr, n, k, ap, b, cp, ldc, false, 1.0, 1);
    });
}

/// `col[k, n·ho·wo]`: every image unfolded side by side (image i in columns `i·ho·wo ..`).
fn im2col_batch(x: &[f32], g: &ConvGeom, col: &mut [f32]) {
    let (hw, per) = (g.ho() * g.wo(), g.cin * g.h * g.w);
    let ld = g.n * hw;
    for i in 0..g.n {
        im2col_ld(&x[i * per..(i + 1) * per], g, &mut col[i * hw..], ld);
    }
}

/// [`conv2d_im2col_forward`] as one GEMM over the batch: `Y[cout, n·hw] = W · col`, then
/// scattered to `[n, cout, hw]` with the bias.
fn conv2d_batched_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    let (hw, k) = (g.ho() * g.wo(), g.k());
    let nhw = g.n * hw;
    let mut y = vec![0.0f32; g.n * g.cout * hw];
    with_scratch(k * nhw + g.cout * nhw, |buf| {
        let (col, yb) = buf.split_at_mut(k * nhw);
        im2col_batch(x, g, col);
        par_rows_gemm(g.cout, nhw, k, Mat::rm(w, k), Mat::rm(col, nhw), yb, nhw);
        for (i, yi) in y.chunks_mut(g.cout * hw).enumerate() {
            for (co, row) in yi.chunks_mut(hw).enumerate() {
                let bias = b.map_or(0.0, |b| b[co]);
                for (o, &v) in row.iter_mut().zip(&yb[co * nhw + i * hw..co * nhw + (i + 1) * hw]) {
                    *o = v + bias;
                }
            }
        }
    });
    y
}

/// [`conv2d_im2col_backward`] as single GEMMs over the batch: `dy` gathered to `[cout, n·hw]`,
/// `dw = dy · colᵀ` (the reduction over all `n·hw` positions at once) and `dcol = Wᵀ · dy`,
/// folded back image by image.
fn conv2d_batched_backward(x: &[f32], w: &[f32], dy: &[f32], g: &ConvGeom, need_dx: bool) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (hw, k) = (g.ho() * g.wo(), g.k());
    let nhw = g.n * hw;
    let db = bias_grad(dy, g);
    let mut dw = vec![0.0f32; g.cout * k];
    let mut dx = need_dx.then(|| vec![0.0f32; g.n * g.cin * g.h * g.w]);
    with_scratch(k * nhw + g.cout * nhw, |buf| {
        let (col, dyt) = buf.split_at_mut(k * nhw);
        for i in 0..g.n {
            for co in 0..g.cout {
                dyt[co * nhw + i * hw..co * nhw + (i + 1) * hw].copy_from_slice(&dy[(i * g.cout + co) * hw..(i * g.cout + co + 1) * hw]);
            }
        }
        {
            let _p = detail("conv dw: batched im2col+gemm");
            im2col_batch(x, g, col);
            par_rows_gemm(g.cout, k, nhw, Mat::rm(dyt, nhw), Mat::rm_t(col, nhw), &mut dw, k);
        }
        if let Some(dx) = dx.as_mut() {
            let _p = detail("conv dx: batched im2col+gemm");
            // the unfolded input is no longer needed: its buffer takes dcol
            par_rows_gemm(k, nhw, g.cout, Mat::rm_t(w, k), Mat::rm(dyt, nhw), col, nhw);
            let per = g.cin * g.h * g.w;
            for (i, dxi) in dx.chunks_mut(per).enumerate() {
                col2im_ld(&col[i * hw..], g, dxi, nhw);
            }
        }
    });
    (dx, dw, db)
}

fn bias_grad(dy: &[f32], g: &ConvGeom) -> Vec<f32> {
    let hw = g.ho() * g.wo();
    let mut db = vec![0.0f32; g.cout];
    for i in 0..g.n {
        for (co, row) in dy[i * g.cout * hw..(i + 1) * g.cout * hw].chunks(hw).enumerate() {
            db[co] += row.iter().map(|&v| v as f64).sum::<f64>() as f32;
        }
    }
    db
}

/// [`conv2d_backward`] by im2col + GEMM for every geometry.
pub fn conv2d_im2col_backward(x: &[f32], w: &[f32], dy: &[f32], g: &ConvGeom, need_dx: bool) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (ho, wo) = (g.ho(), g.wo());
    let (hw, k) = (ho * wo, g.k());
    let threads = inner_threads(g);
    let db = bias_grad(dy, g);
    // dw = Σ_i dy_i · col_iᵀ, accumulated per worker then summed.
    // dw = Σ_i dy_i · col_iᵀ
    let dw_of = |acc: &mut [f32], i: usize, first: bool| {
        let xi = &x[i * g.cin * g.h * g.w..(i + 1) * g.cin * g.h * g.w];
        let dyi = &dy[i * g.cout * hw..(i + 1) * g.cout * hw];
        if g.pointwise() {
            sgemm(g.cout, k, hw, Mat::rm(dyi, hw), Mat::rm_t(xi, hw), acc, k, !first, 1.0, threads);
        } else {
            with_scratch(k * hw, |col| {
                im2col(xi, g, col);
                sgemm(g.cout, k, hw, Mat::rm(dyi, hw), Mat::rm_t(col, hw), acc, k, !first, 1.0, threads);
            });
        }
    };
    let p = detail(if g.pointwise() { "conv dw: 1x1 gemm" } else { "conv dw: im2col+gemm" });
    let dw = if threads == 1 && g.n > 1 {
        super::par_accumulate(g.n, g.cout * k, dw_of)
    } else {
        let mut acc = vec![0.0f32; g.cout * k];
        for i in 0..g.n {
            dw_of(&mut acc, i, false);
        }
        acc
    };
    drop(p);
    let dx = need_dx.then(|| {
        let _p = detail(if g.pointwise() { "conv dx: 1x1 gemm" } else { "conv dx: im2col+gemm" });
        let per = g.cin * g.h * g.w;
        let mut dx = vec![0.0f32; g.n * per];
        for_each_image(&mut dx, per, g.n, |i, dxi| {
            let dyi = &dy[i * g.cout * hw..(i + 1) * g.cout * hw];
            if g.pointwise() {
                sgemm(k, hw, g.cout, Mat::rm_t(w, k), Mat::rm(dyi, hw), dxi, hw, false, 1.0, threads);
            } else {
                with_scratch(k * hw, |col| {
                    sgemm(k, hw, g.cout, Mat::rm_t(w, k), Mat::rm(dyi, hw), col, hw, false, 1.0, threads);
                    col2im(col, g, dxi);
                });
            }
        });
        dx
    });
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn naive(x: &[f32], w: &[f32], b: &[f32], g: &ConvGeom) -> Vec<f32> {
        let (ho, wo) = (g.ho(), g.wo());
        let mut y = vec![0.0; g.n * g.cout * ho * wo];
        for n in 0..g.n {
            for co in 0..g.cout {
                for i in 0..ho {
                    for j in 0..wo {
                        let mut s = b[co] as f64;
                        for c in 0..g.cin {
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let ii = (i * g.stride + ki) as isize - g.pad as isize;
                                    let jj = (j * g.stride + kj) as isize - g.pad as isize;
                                    if ii >= 0 && jj >= 0 && (ii as usize) < g.h && (jj as usize) < g.w {
                                        s += x[((n * g.cin + c) * g.h + ii as usize) * g.w + jj as usize] as f64 * w[((co * g.cin + c) * g.kh + ki) * g.kw + kj] as f64;
                                    }
                                }
                            }
                        }
                        y[((n * g.cout + co) * ho + i) * wo + j] = s as f32;
                    }
                }
            }
        }
        y
    }
    #[test]
    fn forward_matches_naive() {
        let mut r = crate::rng::Rng::new(5);
        for &(stride, pad, kh, h, w) in &[(1, 1, 3, 7, 5), (2, 1, 3, 7, 8), (1, 0, 1, 5, 5), (2, 0, 3, 9, 6)] {
            let g = ConvGeom { n: 3, cin: 4, h, w, cout: 5, kh, kw: kh, stride, pad };
            let x = r.normal_vec(g.n * g.cin * h * w);
            let wt = r.normal_vec(g.cout * g.cin * kh * kh);
            let b = r.normal_vec(g.cout);
            let y = conv2d_forward(&x, &wt, Some(&b), &g);
            let want = naive(&x, &wt, &b, &g);
            assert!(crate::util::rel_err(&y, &want) < 1e-6);
        }
    }
    #[test]
    fn batched_unfolding_matches_the_per_image_path() {
        let mut r = crate::rng::Rng::new(6);
        for &(n, cin, cout, h, stride, pad) in &[(3, 5, 4, 8, 1, 1), (2, 64, 70, 4, 1, 1), (4, 3, 6, 9, 2, 1), (2, 8, 8, 16, 1, 0)] {
            let g = ConvGeom { n, cin, h, w: h, cout, kh: 3, kw: 3, stride, pad };
            assert!(batched(&g), "{g:?} should take the batched path");
            let x = r.normal_vec(g.n * g.cin * h * h);
            let wt = r.normal_vec(g.cout * g.cin * 9);
            let b = r.normal_vec(g.cout);
            let dy = r.normal_vec(g.n * g.cout * g.ho() * g.wo());
            assert!(crate::util::rel_err(&conv2d_batched_forward(&x, &wt, Some(&b), &g), &naive(&x, &wt, &b, &g)) < 1e-6);
            let (dx, dw, db) = conv2d_batched_backward(&x, &wt, &dy, &g, true);
            let (dx0, dw0, db0) = conv2d_im2col_backward(&x, &wt, &dy, &g, true);
            assert!(crate::util::rel_err(&dx.unwrap(), &dx0.unwrap()) < 1e-6, "dx {g:?}");
            assert!(crate::util::rel_err(&dw, &dw0) < 1e-6, "dw {g:?}");
            assert_eq!(db, db0);
            assert!(conv2d_batched_backward(&x, &wt, &dy, &g, false).0.is_none());
        }
    }
}
