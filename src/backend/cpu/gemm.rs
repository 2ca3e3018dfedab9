//! Row-major single-precision GEMM on top of the `gemm` crate (AVX2/AVX-512 micro-kernels).

use gemm::Parallelism;

/// A matrix operand: a pointer-free view described by its slice and row/column strides.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: isize,
    pub cs: isize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn rm(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: cols as isize, cs: 1 }
    }
    /// The transpose of a row-major `rows × cols` matrix (so it reads as `cols × rows`).
    pub fn rm_t(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols as isize }
    }
}

fn check_extent(m: &Mat, rows: usize, cols: usize, what: &str) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = (rows - 1) as isize * m.rs + (cols - 1) as isize * m.cs;
    assert!(m.rs >= 0 && m.cs >= 0 && (last as usize) < m.data.len(), "gemm: {what} operand out of bounds");
}

/// `c[m×n] = (accumulate ? c : 0) + alpha · a[m×k] · b[k×n]`, `c` row-major with leading dim `ldc`.
/// `threads > 1` lets the GEMM itself run on the rayon pool.
pub fn sgemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize, accumulate: bool, alpha: f32, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "gemm: output too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    check_extent(&a, m, k, "lhs");
    check_extent(&b, k, n, "rhs");
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: extents are checked above; gemm reads lhs/rhs and writes dst inside them.
    unsafe {
        gemm::gemm(m, n, k, c.as_mut_ptr(), 1, ldc as isize, accumulate, a.data.as_ptr(), a.cs, a.rs, b.data.as_ptr(), b.cs, b.rs, 1.0, alpha, false, false, false, par);
    }
}

/// Threads worth giving one GEMM of this size when nothing else runs in parallel.
pub fn threads_for(m: usize, n: usize, k: usize) -> usize {
    if (m * n * k) < (1 << 18) { 1 } else { rayon::current_num_threads() }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn matches_naive_with_transposes() {
        let mut rng = crate::rng::Rng::new(1);
        let (m, n, k) = (37, 29, 53);
        let a = rng.normal_vec(m * k);
        let bt = rng.normal_vec(n * k); // stored n×k, used transposed
        let mut c = rng.normal_vec(m * n);
        let c0 = c.clone();
        sgemm(m, n, k, Mat::rm(&a, k), Mat::rm_t(&bt, k), &mut c, n, true, 0.5, 2);
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * bt[j * k + p] as f64;
                }
                let want = c0[i * n + j] as f64 + 0.5 * s;
                assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "{i},{j}");
            }
        }
    }
}
