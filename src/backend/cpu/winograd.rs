//! 3×3, stride-1, pad-1 convolution by Winograd F(2×2, 3×3) (Lavin & Gray, 2016): 16 GEMMs of
//! `[Cout, Cin] × [Cin, tiles]` over the whole batch replace the 9·4 multiplies per 2×2 output
//! tile with 16, a 2.25× cut in GEMM work. The backward pass with respect to the input is the same
//! convolution of `dy` with the flipped, transposed kernel, so it uses this path too.

use rayon::prelude::*;

use super::gemm::{Mat, sgemm};
use super::profile::detail;

/// Whether a conv geometry uses this path: 3×3, stride 1, pad 1, and at least 64 channels in and
/// out (below that the transforms cost more than the GEMM work they save; measured with
/// `cargo bench --bench kernels -- conv2d`). `ORWCFM_NO_WINOGRAD=1` turns the path off.
pub fn applies(kh: usize, kw: usize, stride: usize, pad: usize, cin: usize, cout: usize) -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let disabled = *DISABLED.get_or_init(|| std::env::var_os("ORWCFM_NO_WINOGRAD").is_some());
    kh == 3 && kw == 3 && stride == 1 && pad == 1 && cin.min(cout) >= 64 && !disabled
}

/// `U = G g Gᵀ` for every `[cout, cin]` 3×3 kernel → `u[16][cout][cin]`.
pub fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let _p = detail("winograd: weight transform");
    let plane = cout * cin;
    let mut u = vec![0.0f32; 16 * plane];
    let up = SyncPtr(u.as_mut_ptr());
    (0..plane).into_par_iter().for_each(|oc| {
        let up = &up;
        let g = &w[oc * 9..oc * 9 + 9];
        // tmp = G g (4×3)
        let mut t = [[0.0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            t[0][j] = g0;
            t[1][j] = 0.5 * (g0 + g1 + g2);
            t[2][j] = 0.5 * (g0 - g1 + g2);
            t[3][j] = g2;
        }
        for i in 0..4 {
            let (a, b, c) = (t[i][0], t[i][1], t[i][2]);
            let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            for j in 0..4 {
                // SAFETY: slot (ξ, oc) is written only by the task for oc.
                unsafe { *up.0.add((i * 4 + j) * plane + oc) = row[j] };
            }
        }
    });
    u
}

/// The kernel for the input gradient: `w'[ci][co] = flip(w[co][ci])`.
pub fn flip_transpose(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
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

/// `y[n, cout, h, w] = conv3x3(x, w) + b` (stride 1, pad 1) with pre-transformed weights `u`.
/// Works in blocks of whole tile rows, sized so that a block's transformed input and products stay
/// in cache; blocks run in parallel, each with single-threaded GEMMs. The transforms run along
/// tile rows so that they vectorise.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(x: &[f32], u: &[f32], b: Option<&[f32]>, n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Vec<f32> {
    if n * h * w == 0 {
        return Vec::new(); // an empty batch or image: nothing to compute
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let rows = n * th; // tile rows over the batch
    let pb = (BLOCK_BYTES / (64 * (cin + cout))).clamp(16, 512);
    let rb = (pb / tw).clamp(1, rows);
    let blocks = rows.div_ceil(rb);
    let wp = 2 * tw + 2; // padded row width: input columns −1 ..= 2·tw
    let mut y = vec![0.0f32; n * cout * h * w];
    let yp = SyncPtr(y.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|blk| {
        let yp = &yp;
        let row0 = blk * rb;
        let nrows = rb.min(rows - row0);
        let np = nrows * tw;
        SCRATCH.with(|sc| {
            let mut sc = sc.borrow_mut();
            let need = 16 * (cin + cout) * np + 8 * wp + 12 * np;
            if sc.len() < need {
                sc.resize(need, 0.0);
            }
            let (v, rest) = sc[..need].split_at_mut(16 * cin * np);
            let (m, rest) = rest.split_at_mut(16 * cout * np);
            let (d, rest) = rest.split_at_mut(4 * wp);
            let (t, tt) = rest.split_at_mut(4 * wp);
            let p = detail("winograd fwd: input transform (cpu time)");
            input_transform(x, &Geo { cin, h, w, th, tw, wp }, row0, nrows, v, d, t);
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
                    }
                }
            }
        });
    });
    y
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
    let pb = (8 * BLOCK_BYTES / (64 * (cin + cout))).clamp(256, 4096);
    let rb = (pb / tw).clamp(1, rows).min(rows.div_ceil(rayon::current_num_threads()));
    let blocks = rows.div_ceil(rb);
    let wp = 2 * tw + 2;
    let geo = Geo { cin, h, w, th, tw, wp };
    let process = |du: &mut [f32], blk: usize| {
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
            input_transform(x, &geo, row0, nrows, v, d, t);
            drop(p);
            let p = detail("winograd dw: dy transform (cpu time)");
            // dM = A dY Aᵀ for every 2×2 output-gradient tile (zero outside the image)
            for co in 0..cout {
                for lr in 0..nrows {
                    let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                    let base = (img * cout + co) * h * w;
                    for tj in 0..tw {
                        let at = |a: usize, b: usize| -> f32 {
                            let (r, c) = (2 * ti + a, 2 * tj + b);
                            if r < h && c < w { dy[base + r * w + c] } else { 0.0 }
                        };
                        let (y00, y01, y10, y11) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                        // rows of A·dY: [y0, y0+y1, y0−y1, −y1]
                        let rws = [[y00, y01], [y00 + y10, y01 + y11], [y00 - y10, y01 - y11], [-y10, -y11]];
                        let p = lr * tw + tj;
                        for (i, r) in rws.iter().enumerate() {
                            let cols = [r[0], r[0] + r[1], r[0] - r[1], -r[1]];
                            for (j, &val) in cols.iter().enumerate() {
                                dm[((i * 4 + j) * cout + co) * np + p] = val;
                            }
                        }
                    }
                }
            }
            drop(p);
            let _p = detail("winograd dw: 16 gemms (cpu time)");
            for xi in 0..16 {
                let a = &dm[xi * cout * np..(xi + 1) * cout * np];
                let bv = &v[xi * cin * np..(xi + 1) * cin * np];
                sgemm(cout, cin, np, Mat::rm(a, np), Mat::rm_t(bv, np), &mut du[xi * cout * cin..(xi + 1) * cout * cin], cin, true, 1.0, 1);
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
struct Geo {
    cin: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    wp: usize,
}

/// `V[ξ][c][p] = (Bᵀ d B)[ξ]` for the 4×4 input patches of the tile rows `row0 .. row0+nrows`
/// (`v` is `[16][cin][nrows·tw]`; `d`, `t` are scratch of `4·wp`).
fn input_transform(x: &[f32], g: &Geo, row0: usize, nrows: usize, v: &mut [f32], d: &mut [f32], t: &mut [f32]) {
    let Geo { cin, h, w, th, tw, wp } = *g;
    let np = nrows * tw;
    for lr in 0..nrows {
        let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
        for c in 0..cin {
            let xc = &x[(img * cin + c) * h * w..(img * cin + c + 1) * h * w];
            for a in 0..4 {
                let dr = &mut d[a * wp..(a + 1) * wp];
                let r = (2 * ti + a) as isize - 1;
                dr.fill(0.0);
                if r >= 0 && r < h as isize {
                    dr[1..1 + w].copy_from_slice(&xc[r as usize * w..(r as usize + 1) * w]);
                }
            }
            let (d0, d1, d2, d3) = (&d[0..wp], &d[wp..2 * wp], &d[2 * wp..3 * wp], &d[3 * wp..4 * wp]);
            let (t0, rest) = t.split_at_mut(wp);
            let (t1, rest) = rest.split_at_mut(wp);
            let (t2, t3) = rest.split_at_mut(wp);
            for j in 0..wp {
                t0[j] = d0[j] - d2[j];
                t1[j] = d1[j] + d2[j];
                t2[j] = d2[j] - d1[j];
                t3[j] = d1[j] - d3[j];
            }
            for (i, ti_row) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                let o = lr * tw;
                let base = (i * 4 * cin + c) * np + o;
                let stride = cin * np;
                for tj in 0..tw {
                    let q = &ti_row[2 * tj..2 * tj + 4];
                    v[base + tj] = q[0] - q[2];
                    v[base + stride + tj] = q[1] + q[2];
                    v[base + 2 * stride + tj] = q[2] - q[1];
                    v[base + 3 * stride + tj] = q[1] - q[3];
                }
            }
        }
    }
}

/// Target size of one block's transformed input plus products.
const BLOCK_BYTES: usize = 1 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes from parallel tasks, as documented at each use.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::conv::{ConvGeom, conv2d_im2col_forward};
    #[test]
    fn matches_im2col_conv() {
        let mut r = crate::rng::Rng::new(11);
        for &(n, cin, h, w, cout) in &[(2, 3, 7, 5, 4), (1, 8, 8, 8, 16), (3, 5, 1, 3, 2), (2, 4, 28, 28, 6)] {
            let x = r.normal_vec(n * cin * h * w);
            let wt = r.normal_vec(cout * cin * 9);
            let b = r.normal_vec(cout);
            let g = ConvGeom { n, cin, h, w, cout, kh: 3, kw: 3, stride: 1, pad: 1 };
            let want = conv2d_im2col_forward(&x, &wt, Some(&b), &g);
            let got = conv3x3(&x, &transform_weights(&wt, cout, cin), Some(&b), n, cin, h, w, cout);
            let e = crate::util::rel_err(&got, &want);
            assert!(e < 1e-6, "{n} {cin} {h} {w} {cout}: {e:e}");
            // gradients against the im2col backward
            let dy = r.normal_vec(n * cout * h * w);
            let (dx_want, dw_want, _) = crate::backend::cpu::conv::conv2d_im2col_backward(&x, &wt, &dy, &g, true);
            let dw = conv3x3_weight_grad(&x, &dy, n, cin, h, w, cout);
            let e = crate::util::rel_err(&dw, &dw_want);
            assert!(e < 1e-5, "dw {n} {cin} {h} {w} {cout}: {e:e}");
            let dx = conv3x3(&dy, &transform_weights(&flip_transpose(&wt, cout, cin), cin, cout), None, n, cout, h, w, cin);
            let e = crate::util::rel_err(&dx, &dx_want.unwrap());
            assert!(e < 1e-5, "dx {n} {cin} {h} {w} {cout}: {e:e}");
        }
    }
}
