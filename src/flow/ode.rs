//! ODE solvers for sampling from a velocity field, matching torchdiffeq 0.2.5.
//!
//! [`odeint`] integrates `dx/dt = f(t, x)` from `t0` to `t1` (either direction) and returns the final
//! state with evaluation counts.
//!
//! * Fixed grid (`euler`, `midpoint`, `rk4`): `steps` uniform steps on the grid
//!   `t_k = t0 + k (t1 - t0) / steps` (computed in f64, rounded to f32; the last point is exactly
//!   `t1`); `dt = t_{k+1} - t_k` in f32. This is torchdiffeq's `odeint(f, x0, linspace(t0, t1, steps+1),
//!   method=...)` (its `step_size=(t1-t0)/steps` form builds the same number of steps; see
//!   scripts/export_ode_fixture.py).
//!   - `euler`: `x + dt f(t, x)`;
//!   - `midpoint`: `x + dt f(t + dt/2, x + dt/2 f(t, x))`;
//!   - `rk4`: torchdiffeq's `rk4`, i.e. `rk4_alt_step_func`, the Runge–Kutta 3/8 rule:
//!     `k1 = f(t, x)`, `k2 = f(t + dt/3, x + dt k1/3)`, `k3 = f(t + 2dt/3, x + dt (k2 - k1/3))`,
//!     `k4 = f(t + dt, x + dt (k1 - k2 + k3))`, `x + dt (k1 + 3 k2 + 3 k3 + k4) / 8`.
//! * `dopri5`: Dormand–Prince 5(4) with torchdiffeq's controller: first step from
//!   `_select_initial_step` (order 4), RMS error norm of `err / (atol + rtol max(|y0|, |y1|))`, accept
//!   when the ratio is ≤ 1, next step `dt · min(10, max(0.9 ratio^(-1/5), dfactor))` with dfactor 0.2
//!   (1 when the ratio is < 1), FSAL. As in torchdiffeq the last step is not clamped to `t1`: the
//!   solver steps past `t1` and evaluates the 4th-order dense-output polynomial (`_interp_fit` with the
//!   Dormand–Prince–Shampine midpoint weights) at `t1`. Times and the controller are in f64; stage
//!   combinations accumulate in f64 and are stored as f32. Stages at `alpha = 1` are evaluated one f32
//!   ulp before the step end, as torchdiffeq's `Perturb.PREV` does. Integration backwards in time
//!   follows torchdiffeq's negation of time (`τ = -t`, `g(τ, x) = -f(-τ, x)`).
//!
//! Non-finite states are errors naming the time; errors from `f` propagate (with the time as context).

use anyhow::{Context, Result, bail};

use crate::tensor::Tensor;

/// An ODE solver and its settings.
#[derive(Clone, Debug, PartialEq)]
pub enum OdeSolver {
    Euler,
    Midpoint,
    Rk4,
    Dopri5 { atol: f64, rtol: f64 },
}

const SOLVER_NAMES: &str = "euler, midpoint, rk4, dopri5";

impl OdeSolver {
    /// Parse a torchdiffeq method name (`euler`, `midpoint`, `rk4`, `dopri5`); the tolerances are
    /// used by `dopri5` only.
    pub fn parse(name: &str, atol: f64, rtol: f64) -> Result<OdeSolver> {
        match name.trim().to_ascii_lowercase().as_str() {
            "euler" => Ok(OdeSolver::Euler),
            "midpoint" => Ok(OdeSolver::Midpoint),
            "rk4" => Ok(OdeSolver::Rk4),
            "dopri5" => {
                if !(atol.is_finite() && rtol.is_finite() && atol >= 0.0 && rtol >= 0.0 && atol + rtol > 0.0) {
                    bail!("dopri5 needs finite, non-negative tolerances (not both zero), got atol={atol}, rtol={rtol}");
                }
                Ok(OdeSolver::Dopri5 { atol, rtol })
            }
            _ => bail!("unknown ODE solver '{name}': expected one of {SOLVER_NAMES}"),
        }
    }

    /// The torchdiffeq name of the method.
    pub fn name(&self) -> &'static str {
        match self {
            OdeSolver::Euler => "euler",
            OdeSolver::Midpoint => "midpoint",
            OdeSolver::Rk4 => "rk4",
            OdeSolver::Dopri5 { .. } => "dopri5",
        }
    }
}

/// What an integration cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OdeStats {
    /// Evaluations of `f`.
    pub nfe: usize,
    /// Steps taken (accepted steps for dopri5).
    pub steps: usize,
    /// Rejected steps (dopri5 only).
    pub rejected: usize,
}

/// Integrate dx/dt = f(t, x) from t0 to t1. Fixed-grid solvers take `steps` uniform steps
/// (t_k = t0 + k (t1-t0)/steps, computed so the last point is exactly t1); Dopri5 ignores `steps`.
pub fn odeint(f: &mut dyn FnMut(f32, &Tensor) -> Result<Tensor>, x0: &Tensor, t0: f32, t1: f32, steps: usize, solver: &OdeSolver) -> Result<(Tensor, OdeStats)> {
    if !t0.is_finite() || !t1.is_finite() {
        bail!("odeint: non-finite time interval [{t0}, {t1}]");
    }
    if steps == 0 && !matches!(solver, OdeSolver::Dopri5 { .. }) {
        bail!("odeint: {} needs at least one step (steps = 0)", solver.name());
    }
    match solver {
        // the state stays on the tensors' device (and in their dtype)
        OdeSolver::Euler | OdeSolver::Midpoint | OdeSolver::Rk4 => fixed_grid(f, x0, t0, t1, steps, solver, true),
        // dopri5's step-size controller runs on host values; the right-hand side gets its
        // states on x0's device
        OdeSolver::Dopri5 { atol, rtol } => {
            let host = x0.to_cpu()?.to_dtype(crate::tensor::DType::F32)?;
            check_finite(host.data(), t0 as f64)?;
            let (y, stats) = dopri5(f, &host, x0.device(), t0, t1, *atol, *rtol)?;
            Ok((y.to_dtype(x0.dtype())?.to_device(x0.device())?, stats))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

/// Counts evaluations, checks shapes and attaches the time to errors.
struct Rhs<'a> {
    f: &'a mut dyn FnMut(f32, &Tensor) -> Result<Tensor>,
    shape: Vec<usize>,
    /// where the right-hand side is evaluated
    device: crate::tensor::Device,
    nfe: usize,
    /// +1 forwards, -1 for time-reversed dopri5 (τ = -t).
    sign: f32,
}

impl Rhs<'_> {
    /// Evaluate at (solver) time `t` on a state given as data; returns the derivative's data.
    fn eval(&mut self, t: f32, y: Vec<f32>) -> Result<Vec<f32>> {
        let real_t = self.sign * t;
        let x = Tensor::from_vec(y, &self.shape).to_device(self.device)?;
        self.nfe += 1;
        let out = (self.f)(real_t, &x).with_context(|| format!("ODE right-hand side failed at t = {real_t}"))?;
        if out.shape() != self.shape.as_slice() {
            bail!("ODE right-hand side returned shape {:?} at t = {real_t}, expected {:?}", out.shape(), self.shape);
        }
        let mut v = out.values()?;
        if self.sign < 0.0 {
            for e in v.iter_mut() {
                *e = -*e;
            }
        }
        Ok(v)
    }
}

fn check_finite(y: &[f32], t: f64) -> Result<()> {
    if let Some(i) = y.iter().position(|v| !v.is_finite()) {
        bail!("ODE state became non-finite at t = {t} (element {i} is {})", y[i]);
    }
    Ok(())
}

/// `base + scale * Σ c_j k_j`, accumulated in f64 per element.
fn lincomb(base: &[f32], scale: f64, terms: &[(f64, &[f32])]) -> Vec<f32> {
    let n = base.len();
    let mut acc = vec![0.0f64; n];
    for &(c, k) in terms {
        if c == 0.0 {
            continue;
        }
        debug_assert_eq!(k.len(), n);
        for (a, &v) in acc.iter_mut().zip(k) {
            *a += c * v as f64;
        }
    }
    base.iter().zip(&acc).map(|(&b, &a)| (b as f64 + scale * a) as f32).collect()
}

fn rms(v: impl Iterator<Item = f64>, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (v.map(|x| x * x).sum::<f64>() / n as f64).sqrt()
}

/// The largest f32 below `x` (C `nextafterf(x, -inf)`), for finite `x`.
fn next_down(x: f32) -> f32 {
    if x == 0.0 {
        return -f32::from_bits(1);
    }
    let b = x.to_bits();
    if x > 0.0 { f32::from_bits(b - 1) } else { f32::from_bits(b + 1) }
}

// ---------------------------------------------------------------------------------------------
// fixed grid

/// Point `k` of the uniform grid of `steps` steps over `[t0, t1]` (in f64, rounded to f32; the
/// last point is exactly `t1`).
fn grid_time(k: usize, steps: usize, t0: f32, t1: f32) -> f32 {
    if k == steps { t1 } else { (t0 as f64 + k as f64 * (t1 as f64 - t0 as f64) / steps as f64) as f32 }
}

/// The fixed-grid solvers (torchdiffeq's grid and stage times) with the state on its device:
/// stages are combined as `y + Σ c_j k_j` (f32 coefficients) by the fused `ode_combine` on the
/// tensors' backend (the sum in f64, rounded once: on the GPU in one `kernels/fused.cu` launch).
///
/// `check_steps`: whether each state is checked for non-finite values (a host read per step).
/// Without it nothing is read back, which is what a CUDA graph capture of the solve needs
/// (`ode_graph.rs`); the caller then checks the final state.
pub(crate) fn fixed_grid(f: &mut dyn FnMut(f32, &Tensor) -> Result<Tensor>, x0: &Tensor, t0: f32, t1: f32, steps: usize, solver: &OdeSolver, check_steps: bool) -> Result<(Tensor, OdeStats)> {
    let check = |y: &Tensor, t: f64| -> Result<()> {
        if !check_steps {
            return Ok(());
        }
        let s = Tensor::sum_squares(&[y])?;
        if !s.is_finite() {
            bail!("ODE state became non-finite at t = {t}");
        }
        Ok(())
    };
    check(x0, t0 as f64)?;
    let shape = x0.shape().to_vec();
    let mut nfe = 0usize;
    let mut eval = |t: f32, x: &Tensor| -> Result<Tensor> {
        nfe += 1;
        let v = f(t, x).with_context(|| format!("ODE right-hand side failed at t = {t}"))?;
        if v.shape() != shape.as_slice() {
            bail!("ODE right-hand side returned shape {:?} at t = {t}, expected {:?}", v.shape(), shape);
        }
        Ok(v)
    };
    // y + Σ c_j k_j as a fresh tensor, in one pass (the fused `ode_combine`)
    let comb = |y: &Tensor, terms: &[(f32, &Tensor)]| -> Result<Tensor> { crate::autograd::fused::ode_combine_tensors(y, terms) };
    let grid = |k: usize| grid_time(k, steps, t0, t1);
    let mut y = x0.clone();
    for k in 0..steps {
        let (ta, tb) = (grid(k), grid(k + 1));
        let dt = tb - ta;
        y = match solver {
            OdeSolver::Euler => {
                let f0 = eval(ta, &y)?;
                comb(&y, &[(dt, &f0)])?
            }
            OdeSolver::Midpoint => {
                let half = 0.5 * dt;
                let f0 = eval(ta, &y)?;
                let ymid = comb(&y, &[(half, &f0)])?;
                let fm = eval(ta + half, &ymid)?;
                comb(&y, &[(dt, &fm)])?
            }
            OdeSolver::Rk4 => {
                let third = (1.0f64 / 3.0) as f32;
                let k1 = eval(ta, &y)?;
                let k2 = eval(ta + dt * (1.0 / 3.0), &comb(&y, &[(dt * third, &k1)])?)?;
                let k3 = eval(ta + dt * (2.0 / 3.0), &comb(&y, &[(-dt * third, &k1), (dt, &k2)])?)?;
                let k4 = eval(tb, &comb(&y, &[(dt, &k1), (-dt, &k2), (dt, &k3)])?)?;
                let e = dt * 0.125;
                comb(&y, &[(e, &k1), (3.0 * e, &k2), (3.0 * e, &k3), (e, &k4)])?
            }
            OdeSolver::Dopri5 { .. } => unreachable!(),
        };
        check(&y, tb as f64)?;
    }
    Ok((y, OdeStats { nfe, steps, rejected: 0 }))
}

// ---------------------------------------------------------------------------------------------
// dopri5

const DP_ALPHA: [f64; 6] = [1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const DP_BETA: [&[f64]; 6] = [
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
    &[9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
    &[35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0],
];
const DP_C_ERROR: [f64; 7] = [35.0 / 384.0 - 1951.0 / 21600.0, 0.0, 500.0 / 1113.0 - 22642.0 / 50085.0, 125.0 / 192.0 - 451.0 / 720.0, -2187.0 / 6784.0 - -12231.0 / 42400.0, 11.0 / 84.0 - 649.0 / 6300.0, -1.0 / 60.0];
const DP_C_MID: [f64; 7] = [
    6025192743.0 / 30085553152.0 / 2.0,
    0.0,
    51252292925.0 / 65400821598.0 / 2.0,
    -2691868925.0 / 45128329728.0 / 2.0,
    187940372067.0 / 1594534317056.0 / 2.0,
    -1776094331.0 / 19743644256.0 / 2.0,
    11237099.0 / 235043384.0 / 2.0,
];
const SAFETY: f64 = 0.9;
const IFACTOR: f64 = 10.0;
const DFACTOR: f64 = 0.2;
const ORDER: f64 = 5.0;
const MAX_STEPS: usize = 1_000_000;

/// The last accepted step, for dense output.
struct Dense {
    t0: f64,
    t1: f64,
    dt: f64,
    y0: Vec<f32>,
    y1: Vec<f32>,
    ymid: Vec<f32>,
    f0: Vec<f32>,
    f1: Vec<f32>,
}

impl Dense {
    /// torchdiffeq's `_interp_fit` + `_interp_evaluate` at time `t` (t0 ≤ t ≤ t1).
    fn eval(&self, t: f64) -> Vec<f32> {
        let x = if self.t1 > self.t0 { (t - self.t0) / (self.t1 - self.t0) } else { 1.0 };
        let x = x as f32 as f64;
        let dt = self.dt as f32 as f64;
        (0..self.y0.len())
            .map(|i| {
                let (y0, y1, ym) = (self.y0[i] as f64, self.y1[i] as f64, self.ymid[i] as f64);
                let (f0, f1) = (self.f0[i] as f64, self.f1[i] as f64);
                let a = 2.0 * dt * (f1 - f0) - 8.0 * (y1 + y0) + 16.0 * ym;
                let b = dt * (5.0 * f0 - 3.0 * f1) + 18.0 * y0 + 14.0 * y1 - 32.0 * ym;
                let c = dt * (f1 - 4.0 * f0) - 11.0 * y0 - 5.0 * y1 + 16.0 * ym;
                let d = dt * f0;
                let e = y0;
                (e + x * (d + x * (c + x * (b + x * a)))) as f32
            })
            .collect()
    }
}

fn dopri5(f: &mut dyn FnMut(f32, &Tensor) -> Result<Tensor>, x0: &Tensor, device: crate::tensor::Device, t0: f32, t1: f32, atol: f64, rtol: f64) -> Result<(Tensor, OdeStats)> {
    if !(atol.is_finite() && rtol.is_finite() && atol >= 0.0 && rtol >= 0.0 && atol + rtol > 0.0) {
        bail!("dopri5 needs finite, non-negative tolerances (not both zero), got atol={atol}, rtol={rtol}");
    }
    if t0 == t1 {
        return Ok((x0.clone(), OdeStats::default()));
    }
    // Work in τ = sign·t so that τ increases (torchdiffeq's time reversal).
    let sign: f32 = if t1 > t0 { 1.0 } else { -1.0 };
    let tau0 = (sign * t0) as f64;
    let tau_end = (sign * t1) as f64;
    let n = x0.numel();
    let mut rhs = Rhs { f, shape: x0.shape().to_vec(), device, nfe: 0, sign };
    let real_t = |tau: f64| tau * sign as f64;

    let mut y: Vec<f32> = x0.data().to_vec();
    let mut fy = rhs.eval(tau0 as f32, y.clone())?;

    // _select_initial_step(order = 4)
    let mut dt = {
        let scale: Vec<f64> = y.iter().map(|&v| atol + (v as f64).abs() * rtol).collect();
        let d0 = rms(y.iter().zip(&scale).map(|(&v, s)| v as f64 / s), n);
        let d1 = rms(fy.iter().zip(&scale).map(|(&v, s)| v as f64 / s), n);
        let h0 = if d0 < 1e-5 || d1 < 1e-5 { 1e-6 } else { 0.01 * d0 / d1 };
        let y1 = lincomb(&y, h0, &[(1.0, &fy)]);
        let f1 = rhs.eval((tau0 + h0) as f32, y1)?;
        let d2 = rms(f1.iter().zip(&fy).zip(&scale).map(|((&a, &b), s)| (a as f64 - b as f64) / s), n) / h0;
        let h1 = if d1 <= 1e-15 && d2 <= 1e-15 { (h0 * 1e-3).max(1e-6) } else { (0.01 / d1.max(d2)).powf(1.0 / 5.0) };
        (100.0 * h0).min(h1)
    };

    let mut t = tau0;
    let mut dense: Option<Dense> = None;
    let mut stats = OdeStats::default();
    let mut attempts = 0usize;
    let mut k: Vec<Vec<f32>> = Vec::with_capacity(7);
    while tau_end > t {
        attempts += 1;
        if attempts > MAX_STEPS {
            bail!("dopri5: more than {MAX_STEPS} steps (stuck at t = {})", real_t(t));
        }
        if !dt.is_finite() || dt < 0.0 {
            dt = 0.0;
        }
        let t_next = t + dt;
        if t_next <= t {
            bail!("dopri5: step size underflow (dt = {dt}) at t = {}", real_t(t));
        }
        check_finite(&y, real_t(t))?;

        // Runge–Kutta stages, in torchdiffeq's f32 time arithmetic.
        let t0f = t as f32;
        let dtf = dt as f32;
        let t1f = t_next as f32;
        k.clear();
        k.push(fy.clone());
        let mut y_stage = Vec::new();
        for (i, (&alpha, beta)) in DP_ALPHA.iter().zip(DP_BETA.iter()).enumerate() {
            let ti = if alpha == 1.0 { next_down(t1f) } else { t0f + (alpha as f32) * dtf };
            let terms: Vec<(f64, &[f32])> = beta.iter().zip(&k[..=i]).map(|(&b, kk)| (b, kk.as_slice())).collect();
            y_stage = lincomb(&y, dt, &terms);
            if i + 1 == DP_ALPHA.len() && !y_stage.iter().all(|v| v.is_finite()) {
                bail!("ODE state became non-finite at t = {}", real_t(t_next));
            }
            let kn = rhs.eval(ti, y_stage.clone())?;
            k.push(kn);
        }
        let y1 = y_stage; // c_sol equals the last beta row (FSAL)
        let f1 = k[6].clone();

        // error ratio (RMS norm)
        let err_terms: Vec<(f64, &[f32])> = DP_C_ERROR.iter().zip(&k).map(|(&c, kk)| (c, kk.as_slice())).collect();
        let err = lincomb(&vec![0.0f32; n], dt, &err_terms);
        let ratio = rms((0..n).map(|i| err[i] as f64 / (atol + rtol * (y[i] as f64).abs().max((y1[i] as f64).abs()))), n);
        if !ratio.is_finite() {
            bail!("ODE state became non-finite at t = {} (dopri5 error estimate is {ratio})", real_t(t_next));
        }
        let accept = ratio <= 1.0;
        if accept {
            let mid_terms: Vec<(f64, &[f32])> = DP_C_MID.iter().zip(&k).map(|(&c, kk)| (c, kk.as_slice())).collect();
            let ymid = lincomb(&y, dt, &mid_terms);
            let prev_y = std::mem::replace(&mut y, y1);
            dense = Some(Dense { t0: t, t1: t_next, dt, y0: prev_y, y1: y.clone(), ymid, f0: k[0].clone(), f1: f1.clone() });
            fy = f1;
            t = t_next;
            stats.steps += 1;
        } else {
            stats.rejected += 1;
        }
        // _optimal_step_size
        dt = if ratio == 0.0 {
            dt * IFACTOR
        } else {
            let dfactor = if ratio < 1.0 { 1.0 } else { DFACTOR };
            dt * IFACTOR.min((SAFETY / ratio.powf(1.0 / ORDER)).max(dfactor))
        };
    }
    let dense = dense.expect("dopri5 takes at least one accepted step");
    let out = dense.eval(tau_end);
    check_finite(&out, t1 as f64)?;
    stats.nfe = rhs.nfe;
    Ok((Tensor::from_vec(out, x0.shape()), stats))
}
