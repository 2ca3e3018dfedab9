//! 3×3, stride-1, pad-1 convolution by Winograd F(2×2, 3×3) (Lavin & Gray, 2016): 16 GEMMs of
//! `[Cout, Cin] × [Cin, tiles]` over the whole batch replace the 9·4 multiplies per 2×2 output
//! tile with 16, a 2.25× cut in GEMM work. The backward pass with respect to the input is the same
//! convolution of `dy` with the flipped, transposed kernel, so it uses this path too.

use rayon::prelude::*;

use super::gemm::{sgemm, Mat};

/// Whether a conv geometry uses this path: 3×3, stride 1, pad 1, and at least 64 channels in and
/// out (below that the transforms cost more than the GEMM work they save; measured with
/// `cargo bench --bench kernels -- conv2d`). `ORWCFM_NO_WINOGRAD=1` turns the path off.
pub fn applies(kh: usize, kw: usize, stride: usize, pad: usize, cin: usize, cout: usize) -> bool {
    kh == 3 && kw == 3 && stride == 1 && pad == 1 && cin.min(cout) >= 64 && std::env::var_os("ORWCFM_NO_WINOGRAD").is_none()
}

/// `U = G g Gᵀ` for every `[cout, cin]` 3×3 kernel → `u[16][cout][cin]`.
pub fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let plane = cout * cin;
    let mut u = vec![0.0f32; 16 * plane];
    for oc in 0..plane {
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
                u[(i * 4 + j) * plane + oc] = row[j];
            }
        }
    }
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
            let need = 16 * (cin + cout) * np + 8 * wp + 8 * tw;
            if sc.len() < need {
                sc.resize(need, 0.0);
            }
            let (v, rest) = sc[..need].split_at_mut(16 * cin * np);
            let (m, rest) = rest.split_at_mut(16 * cout * np);
            let (d, rest) = rest.split_at_mut(4 * wp);
            let (t, tt) = rest.split_at_mut(4 * wp);
            // input transform V = Bᵀ d B
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
            // M[ξ] = U[ξ] · V[ξ]
            for xi in 0..16 {
                let uu = &u[xi * cout * cin..(xi + 1) * cout * cin];
                let vv = &v[xi * cin * np..(xi + 1) * cin * np];
                sgemm(cout, np, cin, Mat::rm(uu, cin), Mat::rm(vv, np), &mut m[xi * cout * np..(xi + 1) * cout * np], np, false, 1.0, 1);
            }
            // output transform Y = Aᵀ M A, along tile rows
            for co in 0..cout {
                let bias = b.map_or(0.0, |b| b[co]);
                for lr in 0..nrows {
                    let (img, ti) = ((row0 + lr) / th, (row0 + lr) % th);
                    let mrow = |xi: usize| &m[(xi * cout + co) * np + lr * tw..(xi * cout + co) * np + (lr + 1) * tw];
                    for a in 0..2 {
                        let r = 2 * ti + a;
                        if r >= h {
                            continue;
                        }
                        // T_a[j] over the tile row, then the two output columns of each tile
                        let (ta, tb) = tt.split_at_mut(4 * tw);
                        for j in 0..4 {
                            let (m0, m1, m2, m3) = (mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j));
                            let dst = &mut ta[j * tw..(j + 1) * tw];
                            if a == 0 {
                                for k in 0..tw {
                                    dst[k] = m0[k] + m1[k] + m2[k];
                                }
                            } else {
                                for k in 0..tw {
                                    dst[k] = m1[k] - m2[k] - m3[k];
                                }
                            }
                        }
                        let (e, o) = tb[..4 * tw].split_at_mut(2 * tw);
                        for k in 0..tw {
                            e[k] = ta[k] + ta[tw + k] + ta[2 * tw + k] + bias;
                            o[k] = ta[tw + k] - ta[2 * tw + k] - ta[3 * tw + k] + bias;
                        }
                        let base = (img * cout + co) * h * w + r * w;
                        // SAFETY: this output row of channel co belongs to this block alone.
                        let out = unsafe { std::slice::from_raw_parts_mut(yp.0.add(base), w) };
                        for k in 0..tw {
                            out[2 * k] = e[k];
                            if 2 * k + 1 < w {
                                out[2 * k + 1] = o[k];
                            }
                        }
                    }
                }
            }
        });
    });
    y
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
    use crate::backend::cpu::conv::{conv2d_im2col_forward, ConvGeom};
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
        }
    }
}
