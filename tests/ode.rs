//! src/flow/ode.rs: convergence orders on problems with closed-form solutions, parity with
//! torchdiffeq 0.2.5 (tests/fixtures/ode_torchdiffeq.safetensors, scripts/export_ode_fixture.py),
//! and error handling.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use orwcfm_fast::flow::ode::*;
use orwcfm_fast::io::safetensors::load;
use orwcfm_fast::tensor::Tensor;

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

// dx/dt = -x, x(0) = x0  =>  x(t) = x0 e^{-t}
fn decay(_t: f32, x: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(x.data().iter().map(|v| -v).collect(), x.shape()))
}

const LAMBDA: f64 = 0.3;
const OMEGA: f64 = 2.0;

// dx/dt = A x with A = [[-λ, -ω], [ω, -λ]] per row of an [n, 2] state
//  =>  x(t) = e^{-λt} R(ωt) x0
fn rotation(_t: f32, x: &Tensor) -> Result<Tensor> {
    let d = x.data();
    let mut out = vec![0.0f32; d.len()];
    for (o, v) in out.chunks_mut(2).zip(d.chunks(2)) {
        let (a, b) = (v[0] as f64, v[1] as f64);
        o[0] = (-LAMBDA * a - OMEGA * b) as f32;
        o[1] = (OMEGA * a - LAMBDA * b) as f32;
    }
    Ok(Tensor::from_vec(out, x.shape()))
}

fn rotation_exact(x0: &[f32], t: f64) -> Vec<f64> {
    let (c, s, e) = ((OMEGA * t).cos(), (OMEGA * t).sin(), (-LAMBDA * t).exp());
    x0.chunks(2)
        .flat_map(|v| {
            let (a, b) = (v[0] as f64, v[1] as f64);
            [e * (c * a - s * b), e * (s * a + c * b)]
        })
        .collect()
}

struct Problem {
    name: &'static str,
    f: fn(f32, &Tensor) -> Result<Tensor>,
    x0: Tensor,
    exact: Vec<f64>,
}

fn problems() -> Vec<Problem> {
    let d0 = Tensor::from_vec(vec![1.0, -0.5, 2.0, 0.25], &[4]);
    let r0 = Tensor::from_vec(vec![1.0, 0.0, -0.3, 0.8], &[2, 2]);
    vec![Problem { name: "decay", f: decay, exact: d0.data().iter().map(|&v| v as f64 * (-1.0f64).exp()).collect(), x0: d0 }, Problem { name: "rotation", f: rotation, exact: rotation_exact(r0.data(), 1.0), x0: r0 }]
}

fn solve(p: &Problem, steps: usize, solver: &OdeSolver) -> (Tensor, OdeStats) {
    let mut f = |t: f32, x: &Tensor| (p.f)(t, x);
    odeint(&mut f, &p.x0, 0.0, 1.0, steps, solver).unwrap()
}

#[test]
fn fixed_grid_convergence_orders() {
    // (solver, expected error ratio when steps double, allowed band, step counts)
    let cases = [(OdeSolver::Euler, 2.0, (1.7, 2.3), [16usize, 32, 64]), (OdeSolver::Midpoint, 4.0, (3.4, 4.6), [8, 16, 32]), (OdeSolver::Rk4, 16.0, (12.0, 20.0), [2, 4, 8])];
    for p in problems() {
        for (solver, expect, (lo, hi), counts) in &cases {
            // rk4: the decay problem reaches f32 round-off by 16 steps; the rotation (ω = 2) is
            // still pre-asymptotic at 2 steps.
            let counts = if *solver == OdeSolver::Rk4 && p.name == "rotation" { [4, 8, 16] } else { *counts };
            let errs: Vec<f64> = counts
                .iter()
                .map(|&n| {
                    let (x, st) = solve(&p, n, solver);
                    let per_step = match solver {
                        OdeSolver::Euler => 1,
                        OdeSolver::Midpoint => 2,
                        _ => 4,
                    };
                    assert_eq!(st, OdeStats { nfe: n * per_step, steps: n, rejected: 0 });
                    max_abs_diff(x.data(), &p.exact)
                })
                .collect();
            for w in errs.windows(2) {
                let ratio = w[0] / w[1];
                println!("{} {:?}: err {:.3e} -> {:.3e}, ratio {ratio:.2} (expect ~{expect})", p.name, solver, w[0], w[1]);
                assert!(ratio > *lo && ratio < *hi, "{} {:?}: error ratio {ratio} not in ({lo}, {hi}); errors {errs:?}", p.name, solver);
            }
        }
    }
}

#[test]
fn dopri5_accuracy() {
    let solver = OdeSolver::parse("dopri5", 1e-5, 1e-5).unwrap();
    for p in problems() {
        let (x, st) = solve(&p, 0, &solver);
        let err = max_abs_diff(x.data(), &p.exact);
        println!("{} dopri5: err {err:.3e}, {st:?}", p.name);
        assert!(err < 1e-4, "{}: dopri5 error {err}", p.name);
        assert_eq!(st.nfe, 2 + 6 * (st.steps + st.rejected));
        // tighter tolerance, smaller error, more work
        let (x2, st2) = solve(&p, 0, &OdeSolver::Dopri5 { atol: 1e-7, rtol: 1e-7 });
        let err2 = max_abs_diff(x2.data(), &p.exact);
        assert!(err2 < err.max(1e-6) && st2.nfe > st.nfe, "{}: {err2} vs {err}, {st2:?} vs {st:?}", p.name);
    }
}

#[test]
fn backwards_in_time() {
    // integrate the decay problem from 1 back to 0: x(0) = x(1) e^{1}
    let x1 = Tensor::from_vec(vec![1.0, -2.0, 0.5], &[3]);
    let exact: Vec<f64> = x1.data().iter().map(|&v| v as f64 * 1f64.exp()).collect();
    for solver in [OdeSolver::Rk4, OdeSolver::Dopri5 { atol: 1e-6, rtol: 1e-6 }] {
        let (x, _) = odeint(&mut decay, &x1, 1.0, 0.0, 20, &solver).unwrap();
        let err = max_abs_diff(x.data(), &exact);
        assert!(err < 1e-4, "{solver:?}: backwards error {err}");
    }
}

fn fixture_rhs(t: f32, x: &Tensor) -> Result<Tensor> {
    let s = t.sin();
    Ok(Tensor::from_vec(x.data().iter().map(|&v| -v + s * v.tanh()).collect(), x.shape()))
}

#[test]
fn torchdiffeq_parity() {
    let file = load(&fixture_path("ode_torchdiffeq.safetensors")).expect("fixture");
    let get = |n: &str| file.get(n).unwrap_or_else(|| panic!("fixture tensor {n}")).clone();
    let steps: usize = file.metadata["steps"].parse().unwrap();
    let tol: f64 = file.metadata["tol"].parse().unwrap();
    let x0 = get("x0");
    for case in ["fwd", "rev"] {
        let t0: f32 = file.metadata[&format!("{case}.t0")].parse().unwrap();
        let t1: f32 = file.metadata[&format!("{case}.t1")].parse().unwrap();
        for name in ["euler", "midpoint", "rk4", "dopri5"] {
            let solver = OdeSolver::parse(name, tol, tol).unwrap();
            let (x, st) = odeint(&mut fixture_rhs, &x0, t0, t1, steps, &solver).unwrap();
            let want = get(&format!("{case}.{name}"));
            let rel = x.rel_err(&want);
            println!("{case}.{name}: rel err {rel:.3e}, {st:?}");
            if name == "dopri5" {
                let nfe = get(&format!("{case}.dopri5.nfe")).item() as usize;
                println!("{case}.dopri5: nfe ours {} torchdiffeq {nfe}", st.nfe);
                assert!(rel <= 1e-4, "{case}.{name}: rel err {rel}");
                // The first step's error ratio is ~1e-5: its error estimate is f32 rounding noise
                // (|err| ~ 1e-9), which differs with the f32 ulps of f (Rust's vs torch's tanh/sin)
                // and our f64 stage sums, so the controller may take a slightly different path.
                // "fwd" takes the same steps as torchdiffeq; "rev" reaches t1 in 3 accepted steps
                // where torchdiffeq takes 4 (+1 rejected). Allow two step attempts (12 evaluations).
                if case == "fwd" {
                    assert_eq!(st.nfe, nfe, "{case}: dopri5 nfe");
                } else {
                    assert!(st.nfe.abs_diff(nfe) <= 12, "{case}: dopri5 nfe ours {} torchdiffeq {nfe}", st.nfe);
                }
            } else {
                assert!(rel <= 1e-5, "{case}.{name}: rel err {rel}");
            }
        }
    }
}

#[test]
fn parse_names() {
    assert_eq!(OdeSolver::parse("euler", 0.0, 0.0).unwrap(), OdeSolver::Euler);
    assert_eq!(OdeSolver::parse("midpoint", 0.0, 0.0).unwrap(), OdeSolver::Midpoint);
    assert_eq!(OdeSolver::parse("rk4", 0.0, 0.0).unwrap(), OdeSolver::Rk4);
    assert_eq!(OdeSolver::parse("dopri5", 1e-4, 1e-3).unwrap(), OdeSolver::Dopri5 { atol: 1e-4, rtol: 1e-3 });
    let e = OdeSolver::parse("heun", 1e-5, 1e-5).unwrap_err().to_string();
    for n in ["euler", "midpoint", "rk4", "dopri5", "heun"] {
        assert!(e.contains(n), "{e}");
    }
}

#[test]
fn errors_propagate() {
    let x0 = Tensor::from_vec(vec![1.0, 2.0], &[2]);
    let all = [OdeSolver::Euler, OdeSolver::Midpoint, OdeSolver::Rk4, OdeSolver::Dopri5 { atol: 1e-5, rtol: 1e-5 }];
    for solver in &all {
        // f fails on its third call
        let mut calls = 0;
        let mut f = |_t: f32, x: &Tensor| -> Result<Tensor> {
            calls += 1;
            if calls == 3 {
                return Err(anyhow!("velocity field exploded"));
            }
            Ok(x.clone())
        };
        let e = odeint(&mut f, &x0, 0.0, 1.0, 10, solver).unwrap_err();
        assert!(format!("{e:#}").contains("velocity field exploded"), "{solver:?}: {e:#}");

        // f produces NaN after t > 0.45: the error names a time
        let mut g = |t: f32, x: &Tensor| -> Result<Tensor> {
            let v = if t > 0.45 { f32::NAN } else { 1.0 };
            Ok(Tensor::from_vec(x.data().iter().map(|_| v).collect(), x.shape()))
        };
        let e = odeint(&mut g, &x0, 0.0, 1.0, 10, solver).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("non-finite") && msg.contains("t = "), "{solver:?}: {msg}");
    }
    // zero steps on a fixed grid
    for solver in &all[..3] {
        let e = odeint(&mut decay, &x0, 0.0, 1.0, 0, solver).unwrap_err().to_string();
        assert!(e.contains("steps"), "{e}");
    }
    // non-finite initial state
    let bad = Tensor::from_vec(vec![1.0, f32::INFINITY], &[2]);
    assert!(odeint(&mut decay, &bad, 0.0, 1.0, 4, &OdeSolver::Euler).is_err());
    // wrong output shape
    let mut h = |_t: f32, _x: &Tensor| -> Result<Tensor> { Ok(Tensor::zeros(&[3])) };
    assert!(odeint(&mut h, &x0, 0.0, 1.0, 4, &OdeSolver::Rk4).is_err());
}
