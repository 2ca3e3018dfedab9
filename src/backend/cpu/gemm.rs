//! Row-major single-precision GEMM on top of the `gemm` crate family: its packed driver
//! (`gemm_common::gemm::gemm_basic_generic`) with the micro-kernels of the level
//! [`isa::level`] picks (AVX-512 16-lane, AVX2+FMA 8-lane, or scalar).

use gemm_common::Parallelism;

use super::isa::{self, Isa};

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
    static KERNEL: std::sync::OnceLock<GemmFn> = std::sync::OnceLock::new();
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    gemm_with(*KERNEL.get_or_init(|| kernel(isa::level())), m, n, k, a, b, c, ldc, accumulate, alpha, par);
}

/// [`sgemm`] at a given level (for tests that compare the levels; the level must be supported).
pub fn sgemm_at(level: Isa, m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize, accumulate: bool, alpha: f32) {
    assert!(level.supported(), "sgemm_at: the CPU does not support {level}");
    gemm_with(kernel(level), m, n, k, a, b, c, ldc, accumulate, alpha, Parallelism::None);
}

/// [`sgemm`] with the level's driver `f` (from [`kernel`], so one this CPU runs).
fn gemm_with(f: GemmFn, m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize, accumulate: bool, alpha: f32, par: Parallelism) {
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
    // SAFETY: extents are checked above; the driver reads lhs/rhs and writes dst inside them,
    // and `kernel` only returns a driver this CPU runs.
    unsafe { run(f, m, n, k, a, b, c, ldc, accumulate, alpha, par) }
}

/// `c = a·b` row-major, handed to the driver as the column-major `cᵀ = bᵀ·aᵀ` (its
/// micro-kernels want a column-major destination; `gemm::gemm` makes the same swap).
///
/// # Safety
/// The extents of `a`, `b` and `c` must have been checked, and `f` must run on this CPU.
unsafe fn run(f: GemmFn, m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize, accumulate: bool, alpha: f32, par: Parallelism) {
    // SAFETY: forwarded from the caller.
    unsafe { f(n, m, k, c.as_mut_ptr(), ldc as isize, 1, accumulate, b.data.as_ptr(), b.rs, b.cs, a.data.as_ptr(), a.rs, a.cs, 1.0, alpha, false, false, false, par) }
}

/// The gemm driver's signature: (m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs,
/// rhs, rhs_cs, rhs_rs, alpha (on dst), beta (on the product), conj ×3, parallelism).
type GemmFn = unsafe fn(usize, usize, usize, *mut f32, isize, isize, bool, *const f32, isize, isize, *const f32, isize, isize, f32, f32, bool, bool, bool, Parallelism);

/// One level's GEMM: the generic driver instantiated with that level's SIMD token and
/// micro-kernel table (`$n` lanes per register, as the gemm crate instantiates them for f32).
macro_rules! level_gemm {
    ($name:ident, $simd:ty, $uk:path, $n:expr) => {
        unsafe fn $name(
            m: usize,
            n: usize,
            k: usize,
            dst: *mut f32,
            dst_cs: isize,
            dst_rs: isize,
            read_dst: bool,
            lhs: *const f32,
            lhs_cs: isize,
            lhs_rs: isize,
            rhs: *const f32,
            rhs_cs: isize,
            rhs_rs: isize,
            alpha: f32,
            beta: f32,
            conj_dst: bool,
            conj_lhs: bool,
            conj_rhs: bool,
            par: Parallelism,
        ) {
            use $uk as uk;
            let simd = <$simd as gemm_common::simd::MixedSimd<f32, f32, f32, f32>>::try_new().expect("gemm: the CPU lacks the level it was asked to run");
            // SAFETY: forwarded from the caller (extents checked by `sgemm`).
            unsafe {
                gemm_common::gemm::gemm_basic_generic::<_, f32, { $n }, { uk::MR_DIV_N * $n }, { uk::NR }, { uk::MR_DIV_N }, { uk::H_M }, { uk::H_N }>(
                    simd,
                    m,
                    n,
                    k,
                    dst,
                    dst_cs,
                    dst_rs,
                    read_dst,
                    lhs,
                    lhs_cs,
                    lhs_rs,
                    rhs,
                    rhs_cs,
                    rhs_rs,
                    alpha,
                    beta,
                    conj_dst,
                    conj_lhs,
                    conj_rhs,
                    |a, b, c| a * b + c,
                    &uk::UKR,
                    &uk::H_UKR,
                    false,
                    par,
                )
            }
        }
    };
}

level_gemm!(gemm_scalar, gemm_common::simd::Scalar, gemm_f32::microkernel::scalar::f32, 1);
#[cfg(target_arch = "x86_64")]
level_gemm!(gemm_avx2, gemm_common::simd::V3, gemm_f32::microkernel::fma::f32, 8);
#[cfg(target_arch = "x86_64")]
level_gemm!(gemm_avx512, gemm_common::simd::V4, gemm_f32::microkernel::avx512f::f32, 16);

/// The GEMM of `level`, or of the next level down whose SIMD token the gemm crate's own CPU
/// check grants (it asks for the same features as [`isa::detected`]; the fallback only guards a
/// CPU mask where the two could disagree, so that the GEMM never panics). `sgemm` asks once.
fn kernel(level: Isa) -> GemmFn {
    #[cfg(target_arch = "x86_64")]
    {
        use gemm_common::simd::{MixedSimd, V3, V4};
        let v4 = || <V4 as MixedSimd<f32, f32, f32, f32>>::try_new().is_some();
        let v3 = || <V3 as MixedSimd<f32, f32, f32, f32>>::try_new().is_some();
        match level {
            Isa::Avx512 if v4() => gemm_avx512,
            Isa::Avx512 | Isa::Avx2 if v3() => gemm_avx2,
            _ => gemm_scalar,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        gemm_scalar
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
        // every level the CPU has gives the same product to rounding
        for level in Isa::runnable() {
            let mut c2 = c0.clone();
            sgemm_at(level, m, n, k, Mat::rm(&a, k), Mat::rm_t(&bt, k), &mut c2, n, true, 0.5);
            assert!(crate::util::rel_err(&c2, &c) < 1e-6, "{level}");
        }
    }
}
