//! GEMMs on the GPU: one row-major GEMM ([`Gemm`]) turned into its column-major cuBLAS call
//! ([`CublasCall`], kept apart so that tests check the mapping on the CPU), run with cuBLAS on the
//! GPU's stream or, on the simulated GPU, by `sim::gemm`; and the GEMM plans of QKV attention.

use anyhow::{Result, bail};

use super::gpu::Gpu;
use crate::backend::geom::{AttnGeom, QkvOrder};
use crate::tensor::DType;

/// The element types of a GEMM: `ab` of both operands, `c` of the output (and of β·C). f32 is
/// cuBLAS' SGEMM; f16/bf16 operands run on the tensor cores through `cublasGemmEx` with f32
/// accumulation (`CUBLAS_COMPUTE_32F`), into an f32 or a same-dtype output: the operands are
/// exact in f32, the products are summed in f32 and the output is rounded once, which is the CPU
/// reference's definition of a half-precision GEMM (widen, f32 GEMM, round).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmTypes {
    pub ab: DType,
    pub c: DType,
}

impl GemmTypes {
    pub const F32: GemmTypes = GemmTypes { ab: DType::F32, c: DType::F32 };
    /// Operands and output in `d`.
    pub fn all(d: DType) -> GemmTypes {
        GemmTypes { ab: d, c: d }
    }
    /// Operands in `d`, output in f32 (to be rounded once after an epilogue, e.g. a bias).
    pub fn to_f32(d: DType) -> GemmTypes {
        GemmTypes { ab: d, c: DType::F32 }
    }
    /// Whether cuBLAS can run it: f32 throughout, or f16/bf16 operands with an f32 or
    /// same-dtype output.
    pub fn check(&self) -> Result<()> {
        let half = matches!(self.ab, DType::F16 | DType::BF16);
        if (self.ab == DType::F32 && self.c == DType::F32) || (half && (self.c == DType::F32 || self.c == self.ab)) { Ok(()) } else { bail!("no GEMM of {} operands into {}", self.ab, self.c) }
    }
}

/// A row-major operand of a GEMM: device pointer, whether it is used transposed, and the
/// element stride between batch items.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub trans: bool,
    pub batch_stride: i64,
}

impl Operand {
    /// A single (unbatched) operand at `ptr`.
    pub fn at(ptr: u64, trans: bool) -> Operand {
        Operand { ptr, trans, batch_stride: 0 }
    }
}

/// One row-major GEMM `C[m, n] = α·op(A)·op(B) + β·C` over `batch` items (C's items `c_stride`
/// apart).
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
    pub c: u64,
    pub c_stride: i64,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub types: GemmTypes,
}

/// The column-major cuBLAS call that computes a [`Gemm`]: `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLAS'
/// first operand is B. (Kept apart from the call so that tests can check the mapping on the CPU
/// against a reference column-major GEMM.)
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CublasCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub stride_a: i64,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: i64,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: i64,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub types: GemmTypes,
}

impl Gemm {
    pub fn cublas(&self) -> CublasCall {
        let (m, n, k) = (self.m, self.n, self.k);
        CublasCall {
            trans_a: self.b.trans,
            trans_b: self.a.trans,
            m: n,
            n: m,
            k,
            a: self.b.ptr,
            lda: if self.b.trans { k } else { n },
            stride_a: self.b.batch_stride,
            b: self.a.ptr,
            ldb: if self.a.trans { m } else { k },
            stride_b: self.a.batch_stride,
            c: self.c,
            ldc: n,
            stride_c: self.c_stride,
            alpha: self.alpha,
            beta: self.beta,
            batch: self.batch,
            types: self.types,
        }
    }
}

/// Run a [`Gemm`] with cuBLAS on the GPU's stream: SGEMM for f32, `cublasGemmEx` (tensor cores,
/// f32 accumulation) for f16/bf16 operands.
pub fn run_gemm(g: &Gpu, op: &Gemm) -> Result<()> {
    use cudarc::cublas::sys::{self as cb, cublasOperation_t as Op};
    op.types.check()?;
    if op.m == 0 || op.n == 0 {
        return Ok(());
    }
    let c = op.cublas();
    if g.is_sim() {
        return g.sim_gemm(&c); // (recorded instead during a CUDA graph capture)
    }
    let t = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
    let _x = g.exec.lock().unwrap_or_else(|e| e.into_inner());
    g.bind()?;
    let s = if op.types == GemmTypes::F32 {
        // SAFETY: the pointers are live device buffers holding the operands at these sizes; the
        // scalars are host pointers (cuBLAS' default pointer mode)
        unsafe {
            if c.batch == 1 {
                cb::cublasSgemm_v2(
                    g.blas(),
                    t(c.trans_a),
                    t(c.trans_b),
                    c.m as i32,
                    c.n as i32,
                    c.k as i32,
                    &c.alpha,
                    c.a as *const f32,
                    c.lda as i32,
                    c.b as *const f32,
                    c.ldb as i32,
                    &c.beta,
                    c.c as *mut f32,
                    c.ldc as i32,
                )
            } else {
                cb::cublasSgemmStridedBatched(
                    g.blas(),
                    t(c.trans_a),
                    t(c.trans_b),
                    c.m as i32,
                    c.n as i32,
                    c.k as i32,
                    &c.alpha,
                    c.a as *const f32,
                    c.lda as i32,
                    c.stride_a,
                    c.b as *const f32,
                    c.ldb as i32,
                    c.stride_b,
                    &c.beta,
                    c.c as *mut f32,
                    c.ldc as i32,
                    c.stride_c,
                    c.batch as i32,
                )
            }
        }
    } else {
        let ty = |d: DType| match d {
            DType::F16 => cb::cudaDataType_t::CUDA_R_16F,
            DType::BF16 => cb::cudaDataType_t::CUDA_R_16BF,
            _ => cb::cudaDataType_t::CUDA_R_32F,
        };
        let (ab, ct) = (ty(op.types.ab), ty(op.types.c));
        let compute = cb::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP;
        let (alpha, beta) = (&c.alpha as *const f32 as *const std::ffi::c_void, &c.beta as *const f32 as *const std::ffi::c_void);
        // SAFETY: as above; with CUBLAS_COMPUTE_32F the scalars are f32. One strided-batched
        // call serves a single GEMM too (batch 1, strides unused).
        unsafe {
            cb::cublasGemmStridedBatchedEx(
                g.blas(),
                t(c.trans_a),
                t(c.trans_b),
                c.m as i32,
                c.n as i32,
                c.k as i32,
                alpha,
                c.a as *const _,
                ab,
                c.lda as i32,
                c.stride_a,
                c.b as *const _,
                ab,
                c.ldb as i32,
                c.stride_b,
                beta,
                c.c as *mut _,
                ct,
                c.ldc as i32,
                c.stride_c,
                c.batch as i32,
                compute,
                algo,
            )
        }
    };
    if s != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("cuBLAS {} GEMM {}x{}x{} (batch {}) into {} failed: {s:?}", op.types.ab, op.m, op.n, op.k, op.batch, op.types.c);
    }
    Ok(())
}

/// An f32 [`run_gemm`] from its parts.
#[allow(clippy::too_many_arguments)]
pub fn gemm(g: &Gpu, m: usize, n: usize, k: usize, a: Operand, b: Operand, c: u64, c_stride: i64, alpha: f32, beta: f32, batch: usize) -> Result<()> {
    run_gemm(g, &Gemm { m, n, k, a, b, c, c_stride, alpha, beta, batch, types: GemmTypes::F32 })
}

/// [`run_gemm`] of the given element types from its parts (strides in elements of each operand).
#[allow(clippy::too_many_arguments)]
pub fn gemm_typed(g: &Gpu, types: GemmTypes, m: usize, n: usize, k: usize, a: Operand, b: Operand, c: u64, c_stride: i64, alpha: f32, beta: f32, batch: usize) -> Result<()> {
    run_gemm(g, &Gemm { m, n, k, a, b, c, c_stride, alpha, beta, batch, types })
}

/// The q, k, v operands (offset, batch stride) and the number of GEMM calls: the legacy order
/// has one uniform stride over all batch·head items; the new order is batched over heads within
/// each batch item.
fn attn_layout(a: &AttnGeom) -> (Vec<usize>, usize, [usize; 3], i64) {
    let (c, ct) = (a.heads * a.ch, a.ch * a.t);
    match a.order {
        QkvOrder::Legacy => (vec![0], a.b * a.heads, [0, ct, 2 * ct], (3 * ct) as i64),
        QkvOrder::New => ((0..a.b).map(|bi| bi * 3 * c * a.t).collect(), a.heads, [0, c * a.t, 2 * c * a.t], ct as i64),
    }
}

/// The GEMMs of attention's forward around the row softmax: `[S = scale·qᵀk into probs]`, then
/// `[out = v·Pᵀ]`, for buffers at the given addresses (bytes).
pub fn qkv_attention_forward_gemms(a: &AttnGeom, qkv: u64, probs: u64, out: u64) -> [Vec<Gemm>; 2] {
    let (t, ch) = (a.t, a.ch);
    let scale = 1.0 / (ch as f32).sqrt();
    let (bases, count, offs, stride) = attn_layout(a);
    let at = |off: usize, trans: bool| Operand { ptr: qkv + 4 * off as u64, trans, batch_stride: stride };
    let item = |base: u64, ci: usize, size: usize, trans: bool| Operand { ptr: base + 4 * (ci * count * size) as u64, trans, batch_stride: size as i64 };
    let mut s = Vec::new();
    let mut o = Vec::new();
    for (ci, &b0) in bases.iter().enumerate() {
        let p = item(probs, ci, t * t, false);
        s.push(Gemm { m: t, n: t, k: ch, a: at(b0 + offs[0], true), b: at(b0 + offs[1], false), c: p.ptr, c_stride: (t * t) as i64, alpha: scale, beta: 0.0, batch: count, types: GemmTypes::F32 });
        let oc = item(out, ci, ch * t, false);
        o.push(Gemm { m: ch, n: t, k: t, a: at(b0 + offs[2], false), b: Operand { trans: true, ..p }, c: oc.ptr, c_stride: (ch * t) as i64, alpha: 1.0, beta: 0.0, batch: count, types: GemmTypes::F32 });
    }
    [s, o]
}

/// The GEMMs of attention's backward around the row-softmax backward (which turns dP into dS in
/// place): `[dV = dout·P, dP = doutᵀ·v]`, then `[dQ = scale·k·dSᵀ, dK = scale·q·dS]`.
pub fn qkv_attention_backward_gemms(a: &AttnGeom, qkv: u64, probs: u64, dout: u64, dqkv: u64, dp: u64) -> [Vec<Gemm>; 2] {
    let (t, ch) = (a.t, a.ch);
    let scale = 1.0 / (ch as f32).sqrt();
    let (bases, count, offs, stride) = attn_layout(a);
    let at = |base: u64, off: usize, trans: bool| Operand { ptr: base + 4 * off as u64, trans, batch_stride: stride };
    let item = |base: u64, ci: usize, size: usize, trans: bool| Operand { ptr: base + 4 * (ci * count * size) as u64, trans, batch_stride: size as i64 };
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for (ci, &b0) in bases.iter().enumerate() {
        let d_out = item(dout, ci, ch * t, false);
        let p = item(probs, ci, t * t, false);
        let dpp = item(dp, ci, t * t, false);
        first.push(Gemm { m: ch, n: t, k: t, a: d_out, b: p, c: at(dqkv, b0 + offs[2], false).ptr, c_stride: stride, alpha: 1.0, beta: 0.0, batch: count, types: GemmTypes::F32 });
        first.push(Gemm { m: t, n: t, k: ch, a: Operand { trans: true, ..d_out }, b: at(qkv, b0 + offs[2], false), c: dpp.ptr, c_stride: (t * t) as i64, alpha: 1.0, beta: 0.0, batch: count, types: GemmTypes::F32 });
        second.push(Gemm {
            m: ch,
            n: t,
            k: t,
            a: at(qkv, b0 + offs[1], false),
            b: Operand { trans: true, ..dpp },
            c: at(dqkv, b0 + offs[0], false).ptr,
            c_stride: stride,
            alpha: scale,
            beta: 0.0,
            batch: count,
            types: GemmTypes::F32,
        });
        second.push(Gemm { m: ch, n: t, k: t, a: at(qkv, b0 + offs[0], false), b: dpp, c: at(dqkv, b0 + offs[1], false).ptr, c_stride: stride, alpha: scale, beta: 0.0, batch: count, types: GemmTypes::F32 });
    }
    [first, second]
}

#[cfg(test)]
mod tests {
    //! The host-side logic of the GEMM-based ops, checked without a GPU: each [`Gemm`] is turned
    //! into its cuBLAS call and executed by a reference column-major GEMM over a flat memory
    //! (addresses are byte offsets into it), then compared with the CPU backend.
    use super::*;
    use crate::backend::cpu::attention::{qkv_attention_backward as cpu_attn_bwd, qkv_attention_forward as cpu_attn_fwd};
    use crate::backend::cpu::elementwise::{softmax_rows as cpu_softmax, softmax_rows_backward as cpu_softmax_bwd};
    use crate::rng::Rng;

    /// cuBLAS' `sgemm(_strided_batched)` semantics, column-major, on host memory.
    fn emulate(mem: &mut [f32], c: &CublasCall) {
        for bi in 0..c.batch {
            let ao = (c.a / 4) as i64 + bi as i64 * c.stride_a;
            let bo = (c.b / 4) as i64 + bi as i64 * c.stride_b;
            let co = (c.c / 4) as i64 + bi as i64 * c.stride_c;
            for j in 0..c.n {
                for i in 0..c.m {
                    let mut acc = 0.0f64;
                    for p in 0..c.k {
                        let ai = if c.trans_a { p + i * c.lda } else { i + p * c.lda };
                        let bj = if c.trans_b { j + p * c.ldb } else { p + j * c.ldb };
                        acc += mem[(ao + ai as i64) as usize] as f64 * mem[(bo + bj as i64) as usize] as f64;
                    }
                    let ci = (co + (i + j * c.ldc) as i64) as usize;
                    let old = if c.beta == 0.0 { 0.0 } else { c.beta * mem[ci] };
                    mem[ci] = c.alpha * acc as f32 + old;
                }
            }
        }
    }

    fn run(mem: &mut [f32], ops: &[Gemm]) {
        for op in ops {
            emulate(mem, &op.cublas());
        }
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        let e = crate::util::rel_err(a, b);
        assert!(e < 1e-5, "{what}: rel err {e:e}");
    }

    #[test]
    fn row_major_gemm_maps_to_cublas_for_every_transpose() {
        let mut r = Rng::new(1);
        let (m, n, k) = (5usize, 7usize, 3usize);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = r.normal_vec(m * k); // stored [m,k], or [k,m] when ta
            let b = r.normal_vec(k * n); // stored [k,n], or [n,k] when tb
            let c0 = r.normal_vec(m * n);
            let mut mem = [a.clone(), b.clone(), c0.clone()].concat();
            let op = Gemm {
                m,
                n,
                k,
                a: Operand { ptr: 0, trans: ta, batch_stride: 0 },
                b: Operand { ptr: 4 * (m * k) as u64, trans: tb, batch_stride: 0 },
                c: 4 * (m * k + k * n) as u64,
                c_stride: 0,
                alpha: 0.5,
                beta: 1.0,
                batch: 1,
                types: GemmTypes::F32,
            };
            run(&mut mem, &[op]);
            let want: Vec<f32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    let s: f32 = (0..k).map(|p| (if ta { a[p * m + i] } else { a[i * k + p] }) * (if tb { b[j * k + p] } else { b[p * n + j] })).sum();
                    0.5 * s + c0[idx]
                })
                .collect();
            close(&mem[m * k + k * n..], &want, &format!("ta={ta} tb={tb}"));
        }
    }

    fn attention_case(order: QkvOrder) {
        let mut r = Rng::new(2);
        let a = AttnGeom { b: 2, heads: 3, ch: 4, t: 5, order };
        let (c, t, bh) = (a.heads * a.ch, a.t, a.b * a.heads);
        let qkv = r.normal_vec(a.b * 3 * c * t);
        let dout = r.normal_vec(a.b * c * t);
        // memory: qkv | probs | out | dout | dqkv | dp
        let sizes = [qkv.len(), bh * t * t, a.b * c * t, dout.len(), qkv.len(), bh * t * t];
        let mut at = vec![0usize];
        for s in sizes {
            at.push(at.last().unwrap() + s);
        }
        let mut mem = vec![f32::NAN; at[6]];
        mem[at[0]..at[1]].copy_from_slice(&qkv);
        mem[at[3]..at[4]].copy_from_slice(&dout);
        let addr = |i: usize| 4 * at[i] as u64;
        let [s, pv] = qkv_attention_forward_gemms(&a, addr(0), addr(1), addr(2));
        run(&mut mem, &s);
        let p = cpu_softmax(&mem[at[1]..at[2]], t);
        mem[at[1]..at[2]].copy_from_slice(&p);
        run(&mut mem, &pv);
        let (want_out, want_p) = cpu_attn_fwd(&qkv, &a);
        close(&mem[at[1]..at[2]], &want_p, &format!("{order:?} probabilities"));
        close(&mem[at[2]..at[3]], &want_out, &format!("{order:?} output"));
        let [first, second] = qkv_attention_backward_gemms(&a, addr(0), addr(1), addr(3), addr(4), addr(5));
        run(&mut mem, &first);
        let ds = cpu_softmax_bwd(&mem[at[1]..at[2]], &mem[at[5]..at[6]], t);
        mem[at[5]..at[6]].copy_from_slice(&ds);
        run(&mut mem, &second);
        let want_d = cpu_attn_bwd(&qkv, &want_p, &dout, &a);
        assert!(mem[at[4]..at[5]].iter().all(|v| v.is_finite()), "{order:?}: dqkv has unwritten elements");
        close(&mem[at[4]..at[5]], &want_d, &format!("{order:?} dqkv"));
    }

    #[test]
    fn attention_gemm_plan_matches_the_cpu_legacy_order() {
        attention_case(QkvOrder::Legacy);
    }

    #[test]
    fn attention_gemm_plan_matches_the_cpu_new_order() {
        attention_case(QkvOrder::New);
    }
}
