//! `CudaStorage`'s ops against `CpuStorage` (the reference), on the GPU, or on the simulated GPU
//! of `sim.rs` where there is none (the real kernels on the CPU through the C++ shim): random
//! inputs of awkward sizes in f32, f16 and bf16; f32 within 1e-5 relative, f16/bf16 within one
//! ulp of the dtype per element (both backends widen, compute in f32 and round once; the f32
//! results differ by rounding only), the GEMM-based ops (matmul, linear, conv, attention) within
//! 2e-3 (f16) / 1e-2 (bf16) relative, as their accumulation orders differ. New buffers start as
//! NaN (poison), so an element an op leaves unwritten fails. Plus: dtype casts, copy-on-write of
//! the in-place ops, an error (not a panic) for operands on two GPUs and for an injected
//! out-of-memory failure. One test at a time on the device.

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;
use half::{bf16, f16};

use super::{CudaStorage, Gpu, gpu, sim};
use crate::backend::cpu::CpuStorage;
use crate::backend::cpu::buf::Buf;
use crate::backend::{AdamStep, AttnGeom, BackendStorage, BinaryOp, ConvGeom, NormGeom, QkvOrder, UnaryOp};
use crate::rng::Rng;
use crate::tensor::DType;
use crate::util::rel_err;

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The device, poisoned, and the lock that keeps GPU tests apart; None (after saying why) with
/// neither a GPU nor a C++ compiler.
fn dev(test: &str) -> Option<(Arc<Gpu>, MutexGuard<'static, ()>)> {
    static ONE: Mutex<()> = Mutex::new(());
    let lock = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let g = match gpu(0) {
        Ok(g) => g,
        Err(e) => {
            if sim::compiler().is_none() {
                eprintln!("SKIPPED {test}: no GPU ({e:#}) and no C++ compiler for the simulated one");
                return None;
            }
            sim::enable();
            gpu(0).unwrap_or_else(|e| panic!("the simulated GPU: {e:#}"))
        }
    };
    g.set_poison(true);
    g.fail_alloc_after(None);
    Some((g, lock))
}

fn st(v: Vec<f32>, d: DType) -> CpuStorage {
    CpuStorage::from_f32_as(v, d)
}

fn randn(r: &mut Rng, n: usize, d: DType) -> CpuStorage {
    st(r.normal_vec(n), d)
}

/// How close a GPU result must be to the CPU's.
#[derive(Clone, Copy, Debug)]
enum Tol {
    /// the same bits
    Exact,
    /// f32 1e-5 relative, f16/bf16 one ulp per element
    Ulp,
    /// f32 1e-5, f16 2e-3, bf16 1e-2 relative (GEMM accumulation orders)
    Gemm,
}

/// Distance in ulps of two 16-bit floats of the same format (NaN to NaN is 0).
fn ulps16(a: u16, b: u16, nan: impl Fn(u16) -> bool) -> u32 {
    if nan(a) || nan(b) {
        return if nan(a) && nan(b) { 0 } else { u32::MAX };
    }
    let key = |v: u16| if v & 0x8000 != 0 { -((v & 0x7fff) as i32) } else { v as i32 };
    (key(a) - key(b)).unsigned_abs()
}

/// The worst error of `got` against `want` in the measure of `tol` (ulps or relative), and
/// whether it passes.
fn compare(got: &CpuStorage, want: &CpuStorage, tol: Tol) -> (String, bool) {
    if got.dtype() != want.dtype() || got.len() != want.len() {
        return (format!("{} × {} against {} × {}", got.len(), got.dtype(), want.len(), want.dtype()), false);
    }
    if let Tol::Exact = tol {
        let same = got.bytes() == want.bytes();
        return (if same { "exact".into() } else { "bits differ".into() }, same);
    }
    let rel = || rel_err(&got.f32s(), &want.f32s());
    match (got, want, tol) {
        (CpuStorage::I32(a), CpuStorage::I32(b), _) => ("i32".into(), a.as_slice() == b.as_slice()),
        (CpuStorage::F32(_), _, _) => {
            let e = rel();
            (format!("rel {e:.2e}"), e <= 1e-5)
        }
        (CpuStorage::F16(a), CpuStorage::F16(b), Tol::Ulp) => {
            let worst = a.iter().zip(b.iter()).map(|(x, y)| ulps16(x.to_bits(), y.to_bits(), |v| f16::from_bits(v).is_nan())).max().unwrap_or(0);
            (format!("{worst} ulp (rel {:.2e})", rel()), worst <= 1)
        }
        (CpuStorage::BF16(a), CpuStorage::BF16(b), Tol::Ulp) => {
            let worst = a.iter().zip(b.iter()).map(|(x, y)| ulps16(x.to_bits(), y.to_bits(), |v| bf16::from_bits(v).is_nan())).max().unwrap_or(0);
            (format!("{worst} ulp (rel {:.2e})", rel()), worst <= 1)
        }
        (s, _, _) => {
            let e = rel();
            let lim = if s.dtype() == DType::F16 { 2e-3 } else { 1e-2 };
            (format!("rel {e:.2e}"), e <= lim)
        }
    }
}

/// Run `$body` (a `Result<Vec<S>>` of the inputs `$x: &[S]`) on the CPU storages `$ins` and on
/// GPU copies of them; compare every output.
macro_rules! check {
    ($g:expr, $name:expr, $tol:expr, $ins:expr, |$x:ident| $body:expr) => {{
        let cpu_in: Vec<CpuStorage> = $ins;
        let gpu_in: Vec<CudaStorage> = cpu_in.iter().map(|c| CudaStorage::from_cpu($g, c).unwrap()).collect();
        let want: Vec<CpuStorage> = {
            let $x = &cpu_in[..];
            let r: Result<Vec<CpuStorage>> = (|| $body)();
            r.unwrap_or_else(|e| panic!("{} on the CPU: {e:#}", $name))
        };
        let got: Vec<CudaStorage> = {
            let $x = &gpu_in[..];
            let r: Result<Vec<CudaStorage>> = (|| $body)();
            r.unwrap_or_else(|e| panic!("{} on the GPU: {e:#}", $name))
        };
        assert_eq!(got.len(), want.len(), "{}: outputs", $name);
        let mut report = Vec::new();
        for (i, (gs, w)) in got.iter().zip(&want).enumerate() {
            assert!(matches!(gs.device(), crate::tensor::Device::Cuda(_)), "{}: output {i} is not on the GPU", $name);
            let gc = gs.to_cpu_storage().unwrap();
            let (what, ok) = compare(&gc, w, $tol);
            assert!(ok, "{}: output {i} ({}): {what}", $name, w.dtype());
            report.push(what);
        }
        // the inputs are untouched
        for (i, (gi, ci)) in gpu_in.iter().zip(&cpu_in).enumerate() {
            assert_eq!(gi.to_cpu_storage().unwrap().bytes(), ci.bytes(), "{}: input {i} was modified", $name);
        }
        eprintln!("{:<44} {}", $name, report.join(", "));
    }};
}

#[test]
fn storage_round_trips_and_casts_match_the_cpu() {
    let Some((g, _one)) = dev("storage_round_trips_and_casts_match_the_cpu") else { return };
    let mut r = Rng::new(11);
    // awkward values: odd lengths (half a word left over), specials, subnormals, rounding ties
    let mut v: Vec<f32> = r.normal_vec(1001).into_iter().map(|x| x * 300.0).collect();
    v.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-8, -6.0e-8, 65504.0, 65520.0, 3.0e38, 2.5, -3.5, 1.0 + 1.0 / 2048.0, 16_777_217.0, -2.2e9, 2.2e9]);
    for d in [DType::F32, DType::F16, DType::BF16, DType::I32] {
        let c = st(v.clone(), d);
        let s = CudaStorage::from_cpu(&g, &c).unwrap();
        assert_eq!((s.len(), s.dtype()), (c.len(), d));
        assert_eq!(s.to_cpu_storage().unwrap().bytes(), c.bytes(), "{d}: upload and download");
        for to in [DType::F32, DType::F16, DType::BF16, DType::I32] {
            let want = c.to_dtype(to).unwrap();
            let got = s.to_dtype(to).unwrap().to_cpu_storage().unwrap();
            assert_eq!(got.dtype(), to);
            assert_eq!(got.bytes(), want.bytes(), "to_dtype {d} -> {to}");
        }
        for (n, x) in [(0usize, 1.5f32), (1, -2.25), (7, 1e-6), (4096, f32::NAN), (3, 70000.0)] {
            let want = c.full_like(n, x, d).unwrap();
            let got = s.full_like(n, x, d).unwrap().to_cpu_storage().unwrap();
            assert_eq!(got.bytes(), want.bytes(), "full_like {n} × {x} in {d}");
        }
    }
    // float ops on indices are errors, as on the CPU
    let ids = CudaStorage::from_cpu(&g, &CpuStorage::I32(Buf::new(vec![1, 2, 3]))).unwrap();
    let e = ids.unary(UnaryOp::Exp, 0.0).unwrap_err();
    assert!(format!("{e:#}").contains("i32"), "{e:#}");
}

#[test]
fn elementwise_ops_match_the_cpu() {
    let Some((g, _one)) = dev("elementwise_ops_match_the_cpu") else { return };
    let mut r = Rng::new(1);
    for d in FLOATS {
        let (a, b, c) = (randn(&mut r, 3 * 5 * 67, d), randn(&mut r, 5, d), randn(&mut r, 3 * 5 * 67, d));
        let pos = st(r.normal_vec(5).into_iter().map(|v| v.abs() + 0.5).collect(), d);
        let (sa, sb, so) = ([3usize, 5, 67], [5usize, 1], [3usize, 5, 67]);
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
            check!(&g, format!("{d} binary {op:?} broadcast"), Tol::Ulp, vec![a.clone(), b.clone()], |x| Ok(vec![x[0].binary(&sa, &x[1], &sb, &so, op)?, x[1].binary(&sb, &x[0], &sa, &so, op)?]));
            check!(&g, format!("{d} binary {op:?} same shape"), Tol::Ulp, vec![a.clone(), c.clone()], |x| Ok(vec![x[0].binary(&sa, &x[1], &sa, &so, op)?]));
        }
        check!(&g, format!("{d} binary Div broadcast"), Tol::Ulp, vec![a.clone(), pos.clone()], |x| Ok(vec![x[0].binary(&sa, &x[1], &sb, &so, BinaryOp::Div)?]));
        // a leading broadcast axis and a scalar
        let s1 = randn(&mut r, 1, d);
        check!(&g, format!("{d} binary Mul by a scalar"), Tol::Ulp, vec![a.clone(), s1], |x| Ok(vec![x[0].binary(&sa, &x[1], &[], &so, BinaryOp::Mul)?]));
        for (op, s) in [
            (UnaryOp::AddScalar, 0.37),
            (UnaryOp::MulScalar, -1.7),
            (UnaryOp::Exp, 0.0),
            (UnaryOp::Relu, 0.0),
            (UnaryOp::Square, 0.0),
            (UnaryOp::Silu, 0.0),
            (UnaryOp::Sigmoid, 0.0),
            (UnaryOp::Neg, 0.0),
            (UnaryOp::Gelu, 0.0),
            (UnaryOp::QuickGelu, 0.0),
        ] {
            check!(&g, format!("{d} unary {op:?}"), Tol::Ulp, vec![a.clone()], |x| Ok(vec![x[0].unary(op, s)?]));
        }
        let gy = randn(&mut r, a.len(), d);
        for op in [UnaryOp::Exp, UnaryOp::Relu, UnaryOp::Square, UnaryOp::Silu, UnaryOp::Sigmoid, UnaryOp::Neg, UnaryOp::Gelu, UnaryOp::QuickGelu] {
            check!(&g, format!("{d} unary_backward {op:?}"), Tol::Ulp, vec![gy.clone(), a.clone()], |x| {
                let y = x[1].unary(op, 0.0)?;
                Ok(vec![x[0].unary_backward(op, &x[1], &y)?])
            });
        }
        // a large input: many blocks of the grid-stride loops
        let big = randn(&mut r, 300_007, d);
        check!(&g, format!("{d} unary Silu (300007)"), Tol::Ulp, vec![big], |x| Ok(vec![x[0].unary(UnaryOp::Silu, 0.0)?]));
    }
    let x = CudaStorage::full(&g, 4, 1.0, DType::F32).unwrap();
    assert!(x.unary_backward(UnaryOp::MulScalar, &x, &x).is_err());
}

#[test]
fn reductions_and_softmax_match_the_cpu() {
    let Some((g, _one)) = dev("reductions_and_softmax_match_the_cpu") else { return };
    let mut r = Rng::new(2);
    for d in FLOATS {
        let a = randn(&mut r, 4 * 7 * 33, d);
        let from = [4usize, 7, 33];
        for to in [&[7usize, 1][..], &[][..], &[4, 1, 33][..], &[1][..], &[4, 7, 33][..]] {
            check!(&g, format!("{d} sum_to_shape {from:?} -> {to:?}"), Tol::Ulp, vec![a.clone()], |x| Ok(vec![x[0].sum_to_shape(&from, to)?]));
        }
        let b = randn(&mut r, 5, d);
        check!(&g, format!("{d} broadcast_to [5,1] -> [3,5,7]"), Tol::Exact, vec![b], |x| Ok(vec![x[0].broadcast_to(&[5, 1], &[3, 5, 7])?]));
        for n in [33usize, 3001] {
            let rows = if n == 33 { 28 } else { 3 };
            let (x0, dy) = (randn(&mut r, rows * n, d), randn(&mut r, rows * n, d));
            check!(&g, format!("{d} softmax rows of {n}"), Tol::Ulp, vec![x0.clone(), dy.clone()], |x| {
                let y = x[0].softmax_rows(n)?;
                let dx = y.softmax_rows_backward(&x[1], n)?;
                Ok(vec![y, dx])
            });
            check!(&g, format!("{d} log_softmax rows of {n}"), Tol::Ulp, vec![x0, dy], |x| {
                let y = x[0].log_softmax_rows(n)?;
                let dx = y.log_softmax_rows_backward(&x[1], n)?;
                Ok(vec![y, dx])
            });
        }
    }
}

#[test]
fn layout_ops_match_the_cpu() {
    let Some((g, _one)) = dev("layout_ops_match_the_cpu") else { return };
    let mut r = Rng::new(3);
    for d in [DType::F32, DType::F16, DType::BF16, DType::I32] {
        // i32 within ±2^24, where the CPU's concat/narrow (through f32) are exact too
        let mk = |r: &mut Rng, n: usize| if d == DType::I32 { CpuStorage::I32(Buf::new((0..n).map(|_| r.below(1 << 25) as i32 - (1 << 24)).collect())) } else { randn(r, n, d) };
        let (a, b) = (mk(&mut r, 2 * 3 * 5 * 7), mk(&mut r, 2 * 4 * 5 * 7));
        let (sa, sb) = ([2usize, 3, 5, 7], [2usize, 4, 5, 7]);
        // permute [2, 0, 3, 1] of [2, 3, 5, 7]: shape [5, 2, 7, 3], source strides [7, 105, 1, 35]
        check!(&g, format!("{d} gather_strided (permute)"), Tol::Exact, vec![a.clone()], |x| Ok(vec![x[0].gather_strided(&[5, 2, 7, 3], &[7, 105, 1, 35])?]));
        check!(&g, format!("{d} concat axis 1"), Tol::Exact, vec![a.clone(), b.clone()], |x| Ok(vec![BackendStorage::concat(&[(&x[0], &sa[..]), (&x[1], &sb[..])], 1)?]));
        check!(&g, format!("{d} concat axis 0"), Tol::Exact, vec![b.clone(), b.clone()], |x| Ok(vec![BackendStorage::concat(&[(&x[0], &sb[..]), (&x[1], &sb[..])], 0)?]));
        check!(&g, format!("{d} narrow axis 1 / 3 and backward"), Tol::Exact, vec![b.clone(), a.clone()], |x| {
            let n1 = x[0].narrow(&sb, 1, 1, 2)?;
            let n3 = x[1].narrow(&sa, 3, 2, 4)?;
            let b1 = n1.narrow_backward(&sb, 1, 1, 2)?;
            Ok(vec![n1, n3, b1])
        });
    }
    for d in FLOATS {
        let a = randn(&mut r, 2 * 3 * 5 * 7, d);
        check!(&g, format!("{d} upsample 2x and backward"), Tol::Ulp, vec![a.clone()], |x| {
            let y = x[0].upsample_nearest2x(6, 5, 7)?;
            let dx = y.upsample_nearest2x_backward(6, 5, 7)?;
            Ok(vec![y, dx])
        });
        check!(&g, format!("{d} avg_pool 2x (odd sizes) and backward"), Tol::Ulp, vec![a.clone()], |x| {
            let y = x[0].avg_pool2x(6, 5, 7)?;
            let dx = y.avg_pool2x_backward(6, 5, 7)?;
            Ok(vec![y, dx])
        });
        let w = randn(&mut r, 11 * 19, d);
        let ids = CpuStorage::I32(Buf::new(vec![3, 10, 0, 3, 7]));
        let gy = randn(&mut r, 5 * 19, d);
        check!(&g, format!("{d} embedding and backward"), Tol::Ulp, vec![w, ids, gy], |x| Ok(vec![x[0].embedding(&x[1], 11, 19)?, x[2].embedding_backward(&x[1], 11, 19)?]));
        let t = st(r.uniform_vec(13, 0.0, 1.0), d);
        for dim in [65usize, 128] {
            let gy = randn(&mut r, 13 * dim, d);
            check!(&g, format!("{d} timestep_embedding dim {dim} and backward"), Tol::Ulp, vec![t.clone(), gy], |x| {
                let e = x[0].timestep_embedding(dim, 10000.0)?;
                let dt = e.timestep_embedding_backward(&x[1], dim, 10000.0)?;
                Ok(vec![e, dt])
            });
        }
    }
    // an id outside the table is an error on both devices, not an out-of-bounds read
    let w = CudaStorage::full(&g, 4 * 3, 1.0, DType::F32).unwrap();
    let bad = CudaStorage::from_cpu(&g, &CpuStorage::I32(Buf::new(vec![1, 4]))).unwrap();
    let e = w.embedding(&bad, 4, 3).unwrap_err();
    assert!(format!("{e:#}").contains("out of range"), "{e:#}");
    // a view reaching past the buffer is an error too
    assert!(w.gather_strided(&[4, 4], &[3, 1]).is_err());
}

#[test]
fn gemm_ops_match_the_cpu() {
    let Some((g, _one)) = dev("gemm_ops_match_the_cpu") else { return };
    let mut r = Rng::new(4);
    for d in FLOATS {
        let (m, n, k) = (33usize, 29usize, 47usize);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            check!(&g, format!("{d} matmul {m}x{n}x{k} ta={ta} tb={tb}"), Tol::Gemm, vec![randn(&mut r, m * k, d), randn(&mut r, k * n, d)], |x| Ok(vec![x[0].matmul(ta, &x[1], tb, m, n, k, 0.7)?]));
        }
        let (xs, w, b) = (randn(&mut r, 17 * 130, d), randn(&mut r, 65 * 130, d), randn(&mut r, 65, d));
        check!(&g, format!("{d} linear with and without bias"), Tol::Gemm, vec![xs, w.clone(), b.clone()], |x| Ok(vec![x[0].linear(&x[1], Some(&x[2]), 17, 130, 65)?, x[0].linear(&x[1], None, 17, 130, 65)?]));
        // one row: the broadcast bias must be a copy, not the bias itself
        check!(&g, format!("{d} linear with bias, 1 row"), Tol::Gemm, vec![randn(&mut r, 130, d), w, b], |x| Ok(vec![x[0].linear(&x[1], Some(&x[2]), 1, 130, 65)?]));
        for (cn, cin, h, wd, cout, kk, stride, pad) in [(3, 5, 9, 11, 7, 3, 1, 1), (2, 8, 16, 16, 12, 3, 2, 1), (2, 6, 7, 5, 4, 1, 1, 0)] {
            let geo = ConvGeom { n: cn, cin, h, w: wd, cout, kh: kk, kw: kk, stride, pad };
            let xs = randn(&mut r, geo.in_shape().iter().product(), d);
            let ws = st(r.normal_vec(geo.weight_shape().iter().product()).into_iter().map(|v| v * 0.2).collect(), d);
            let bs = randn(&mut r, cout, d);
            let dy = randn(&mut r, geo.out_shape().iter().product(), d);
            check!(&g, format!("{d} conv {cn}x{cin}x{h}x{wd} k{kk} s{stride} p{pad}"), Tol::Gemm, vec![xs, ws, bs, dy], |x| {
                let y = x[0].conv2d(&x[1], Some(&x[2]), &geo)?;
                let (dx, dw, db) = x[0].conv2d_backward(&x[1], &x[3], &geo, true)?;
                let (none, dw2, _) = x[0].conv2d_backward(&x[1], &x[3], &geo, false)?;
                assert!(none.is_none());
                Ok(vec![y, dx.unwrap(), dw, db, dw2])
            });
        }
        for order in [QkvOrder::Legacy, QkvOrder::New] {
            let a = AttnGeom { b: 2, heads: 3, ch: 4, t: 9, order };
            let qkv = randn(&mut r, a.qkv_shape().iter().product(), d);
            let dout = randn(&mut r, a.out_shape().iter().product(), d);
            check!(&g, format!("{d} attention {order:?} and backward"), Tol::Gemm, vec![qkv, dout], |x| {
                let (o, p) = x[0].qkv_attention(&a)?;
                let dq = x[0].qkv_attention_backward(&p, &x[1], &a)?;
                Ok(vec![o, p, dq])
            });
        }
    }
}

#[test]
fn group_norm_matches_the_cpu() {
    let Some((g, _one)) = dev("group_norm_matches_the_cpu") else { return };
    let mut r = Rng::new(5);
    for d in FLOATS {
        for geo in [NormGeom { n: 3, c: 12, s: 37, groups: 4, eps: 1e-5 }, NormGeom { n: 2, c: 6, s: 5, groups: 6, eps: 1e-6 }] {
            let n = geo.n * geo.c * geo.s;
            let xs = st(r.normal_vec(n).into_iter().map(|v| v * 3.0 + 1.5).collect(), d);
            let (gm, bt, dy) = (randn(&mut r, geo.c, d), randn(&mut r, geo.c, d), randn(&mut r, n, d));
            check!(&g, format!("{d} group_norm {geo:?}"), Tol::Ulp, vec![xs, gm, bt, dy], |x| {
                let (y, mean, rstd) = x[0].group_norm(&x[1], &x[2], &geo)?;
                let (dx, dg, db) = x[0].group_norm_backward(&x[3], &x[1], &mean, &rstd, &geo)?;
                Ok(vec![y, mean, rstd, dx, dg, db])
            });
        }
    }
}

#[test]
fn optimiser_ops_match_the_cpu_and_copy_on_write() {
    let Some((g, _one)) = dev("optimiser_ops_match_the_cpu_and_copy_on_write") else { return };
    let mut r = Rng::new(6);
    for d in FLOATS {
        let (y0, x0) = (randn(&mut r, 1003, d), randn(&mut r, 1003, d));
        for (a, b) in [(1.0f32, 1.0f32), (0.001, 0.999)] {
            check!(&g, format!("{d} axpby {a} {b}"), Tol::Ulp, vec![y0.clone(), x0.clone()], |x| {
                let mut y = x[0].clone();
                y.axpby_in_place(a, &x[1], b)?;
                Ok(vec![y])
            });
        }
        // a shared target is copied first: the other holder keeps its values
        let ys = CudaStorage::from_cpu(&g, &y0).unwrap();
        let xs = CudaStorage::from_cpu(&g, &x0).unwrap();
        let mut y = ys.clone();
        y.axpby_in_place(1.0, &xs, 1.0).unwrap();
        assert!(!y.ptr_eq(&ys));
        assert_eq!(ys.to_cpu_storage().unwrap().bytes(), y0.bytes(), "{d}: axpby wrote into a shared buffer");
        // x and y the same buffer
        let mut z = xs.clone();
        z.axpby_in_place(1.0, &xs, 1.0).unwrap();
        let want = {
            let mut c = x0.clone();
            c.axpby_in_place(1.0, &x0, 1.0).unwrap();
            c
        };
        assert!(compare(&z.to_cpu_storage().unwrap(), &want, Tol::Ulp).1, "{d}: axpby of a buffer with itself");
    }
    let h = AdamStep { step_size: 1e-3 / (1.0 - 0.9f32.powi(3)), beta1: 0.9, beta2: 0.999, eps: 1e-8, bc2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(), weight_decay: 0.01 };
    for gd in FLOATS {
        let n = 2051;
        let (p, gr, m) = (randn(&mut r, n, DType::F32), randn(&mut r, n, gd), randn(&mut r, n, DType::F32));
        let v = st(r.normal_vec(n).into_iter().map(|x| x * x).collect(), DType::F32);
        check!(&g, format!("adam (gradient {gd})"), Tol::Ulp, vec![p, gr, m, v], |x| {
            let (mut p, mut m, mut v) = (x[0].clone(), x[2].clone(), x[3].clone());
            for _ in 0..3 {
                p.adam_in_place(&x[1], &mut m, &mut v, &h)?;
            }
            Ok(vec![p, m, v])
        });
    }
    let f16p = CudaStorage::full(&g, 3, 1.0, DType::F16).unwrap();
    let (mut p, mut m, mut v) = (f16p.clone(), CudaStorage::full(&g, 3, 0.0, DType::F32).unwrap(), CudaStorage::full(&g, 3, 0.0, DType::F32).unwrap());
    assert!(p.adam_in_place(&f16p, &mut m, &mut v, &h).is_err(), "adam of an f16 parameter");
    for d in FLOATS {
        let ts: Vec<CpuStorage> = [0usize, 1, 1000, 70_001].iter().map(|&n| randn(&mut r, n, d)).collect();
        let want = CpuStorage::sum_squares(&ts.iter().collect::<Vec<_>>()).unwrap();
        let gs: Vec<CudaStorage> = ts.iter().map(|t| CudaStorage::from_cpu(&g, t).unwrap()).collect();
        let got = CudaStorage::sum_squares(&gs.iter().collect::<Vec<_>>()).unwrap();
        let e = (got - want).abs() / want;
        assert!(e < 1e-12, "{d} sum_squares: {got} against {want} ({e:e})");
        eprintln!("{d} sum_squares (4 tensors)                    rel {e:.1e}");
    }
    assert_eq!(CudaStorage::sum_squares(&[]).unwrap(), 0.0);
}

#[test]
fn operands_on_two_gpus_are_an_error_naming_both() {
    let Some((g, _one)) = dev("operands_on_two_gpus_are_an_error_naming_both") else { return };
    let Ok(g1) = gpu(1) else {
        eprintln!("SKIPPED operands_on_two_gpus_are_an_error_naming_both: no second GPU");
        return;
    };
    let a = CudaStorage::full(&g, 6, 1.0, DType::F32).unwrap();
    let b = CudaStorage::full(&g1, 6, 2.0, DType::F32).unwrap();
    let errs = [
        a.binary(&[6], &b, &[6], &[6], BinaryOp::Add).unwrap_err(),
        a.matmul(false, &b, false, 2, 2, 3, 1.0).unwrap_err(),
        a.conv2d(&b, None, &ConvGeom { n: 1, cin: 1, h: 2, w: 3, cout: 1, kh: 1, kw: 1, stride: 1, pad: 0 }).unwrap_err(),
        BackendStorage::concat(&[(&a, &[6][..]), (&b, &[6][..])], 0).unwrap_err(),
        CudaStorage::sum_squares(&[&a, &b]).unwrap_err(),
        {
            let mut y = a.clone();
            y.axpby_in_place(1.0, &b, 1.0).unwrap_err()
        },
    ];
    for e in errs {
        let msg = format!("{e:#}");
        assert!(msg.contains("cuda:0") && msg.contains("cuda:1"), "{msg}");
    }
    eprintln!("two GPUs: {:#}", a.binary(&[6], &b, &[6], &[6], BinaryOp::Add).unwrap_err());
}

#[test]
fn an_injected_out_of_memory_failure_is_an_error() {
    let Some((g, _one)) = dev("an_injected_out_of_memory_failure_is_an_error") else { return };
    let mut r = Rng::new(7);
    let x = CudaStorage::from_cpu(&g, &randn(&mut r, 1000, DType::F16)).unwrap();
    let w = CudaStorage::from_cpu(&g, &randn(&mut r, 5 * 8, DType::F16)).unwrap();
    // each of a widen-compute-round op's three allocations in turn: each fails cleanly, and the
    // next call works
    for k in 1..=3 {
        g.fail_alloc_after(Some(k));
        let e = x.softmax_rows(50).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("out of memory") && msg.contains("softmax_rows on cuda:0"), "allocation {k}: {msg}");
        x.softmax_rows(50).unwrap();
    }
    // the 16-bit element-wise ops run in one pass: one allocation (its output)
    g.fail_alloc_after(Some(1));
    let e = x.unary(UnaryOp::Silu, 0.0).unwrap_err();
    assert!(format!("{e:#}").contains("out of memory") && format!("{e:#}").contains("unary on cuda:0"), "{e:#}");
    g.fail_alloc_after(Some(2));
    x.unary(UnaryOp::Silu, 0.0).unwrap();
    g.fail_alloc_after(None);
    let geo = ConvGeom { n: 1, cin: 8, h: 5, w: 25, cout: 5, kh: 1, kw: 1, stride: 1, pad: 0 };
    g.fail_alloc_after(Some(3));
    let e = x.conv2d(&w, None, &geo).unwrap_err();
    assert!(format!("{e:#}").contains("conv2d on cuda:0"), "{e:#}");
    x.conv2d(&w, None, &geo).unwrap();
    g.fail_alloc_after(Some(1));
    assert!(CudaStorage::full(&g, 10, 0.0, DType::F32).is_err());
    eprintln!("injected: {:#}", {
        g.fail_alloc_after(Some(1));
        x.unary(UnaryOp::Exp, 0.0).unwrap_err()
    });
    g.fail_alloc_after(None);
}
