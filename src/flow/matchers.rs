//! torchcfm's conditional flow matchers (`conditional_flow_matching.py`), with its formulas and σ.
//!
//! Every matcher draws `t ~ U[0,1)` (unless given) and noise `ε ~ N(0, I)` (always, even when
//! σ = 0, as torchcfm does), and returns `x_t = μ_t + σ_t ε` and the target velocity `u_t`.
//! Couplings that re-pair the batch (exact OT) report which `x1` row each output row came from,
//! so that per-sample data such as ORW's reward weights stay with their samples.

use anyhow::{Result, bail};

use super::ot::{exact_ot_pairing, sample_plan_with_replacement};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The matcher families of torchcfm 1.0.7.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MatcherKind {
    /// `ConditionalFlowMatcher` (I-CFM): μ = t x1 + (1−t) x0, σ_t = σ, u = x1 − x0.
    Independent,
    /// `ExactOptimalTransportConditionalFlowMatcher`: I-CFM after pairing the batch by exact OT.
    ExactOt,
    /// `TargetConditionalFlowMatcher` (Lipman et al.): μ = t x1, σ_t = 1 − (1−σ) t,
    /// u = (x1 − (1−σ) x_t) / (1 − (1−σ) t).
    Target,
    /// `SchrodingerBridgeConditionalFlowMatcher`: OT pairing, σ_t = σ √(t(1−t)),
    /// u = (1−2t)/(2t(1−t)+1e−8) (x_t − μ) + x1 − x0.
    SchrodingerBridge,
    /// `VariancePreservingConditionalFlowMatcher`: μ = cos(πt/2) x0 + sin(πt/2) x1, σ_t = σ,
    /// u = π/2 (cos(πt/2) x1 − sin(πt/2) x0).
    VariancePreserving,
}

impl MatcherKind {
    pub const NAMES: &'static [&'static str] = &["icfm", "otcfm", "fm", "sbcfm", "si"];

    /// torchcfm's `--model` names: icfm, otcfm, fm (target), sbcfm, si (variance preserving).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "icfm" | "independent" => MatcherKind::Independent,
            "otcfm" | "exact-ot" | "ot" => MatcherKind::ExactOt,
            "fm" | "target" => MatcherKind::Target,
            "sbcfm" | "schrodinger-bridge" => MatcherKind::SchrodingerBridge,
            "si" | "vp" | "variance-preserving" => MatcherKind::VariancePreserving,
            _ => bail!("unknown flow matcher '{s}' (valid: {})", Self::NAMES.join(", ")),
        })
    }

    /// Whether the batch is re-paired by an OT plan first.
    pub fn uses_ot(&self) -> bool {
        matches!(self, MatcherKind::ExactOt | MatcherKind::SchrodingerBridge)
    }
}

/// A flow matcher: its kind, σ, and (for OT couplings) how pairs are drawn from the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatcher {
    pub kind: MatcherKind,
    pub sigma: f32,
    /// torchcfm draws `n` pairs from the OT plan *with replacement* (duplicating some pairs and
    /// dropping others); `false` uses the optimal permutation itself.
    pub ot_replace: bool,
}

/// One draw of training pairs.
pub struct FlowSample {
    /// `[B]`
    pub t: Tensor,
    pub xt: Tensor,
    pub ut: Tensor,
    pub eps: Tensor,
    /// Row `k` of `xt`/`ut` was built from `x0[x0_idx[k]]` and `x1[x1_idx[k]]`.
    pub x0_idx: Vec<usize>,
    pub x1_idx: Vec<usize>,
}

fn rows(x: &Tensor, idx: &[usize]) -> Tensor {
    let per = x.numel() / x.shape()[0];
    let mut out = Vec::with_capacity(idx.len() * per);
    for &i in idx {
        out.extend_from_slice(&x.data()[i * per..(i + 1) * per]);
    }
    let mut shape = x.shape().to_vec();
    shape[0] = idx.len();
    Tensor::from_vec(out, &shape)
}

impl FlowMatcher {
    pub fn new(kind: MatcherKind, sigma: f32) -> Self {
        FlowMatcher { kind, sigma, ot_replace: false }
    }

    /// `(x_t, u_t)` for given `x0`, `x1` (already paired), `t [B]` and noise `ε`.
    pub fn location_and_flow(&self, x0: &Tensor, x1: &Tensor, t: &[f32], eps: &Tensor) -> Result<(Tensor, Tensor)> {
        if x0.shape() != x1.shape() || x0.shape() != eps.shape() {
            bail!("flow matching needs x0, x1 and noise of one shape, got {:?}, {:?}, {:?}", x0.shape(), x1.shape(), eps.shape());
        }
        let b = x0.shape()[0];
        if t.len() != b {
            bail!("t has {} values for a batch of {b}", t.len());
        }
        let per = x0.numel() / b.max(1);
        let s = self.sigma;
        let mut xt = vec![0.0f32; x0.numel()];
        let mut ut = vec![0.0f32; x0.numel()];
        let (a0, a1, e) = (x0.data(), x1.data(), eps.data());
        let half_pi = std::f32::consts::FRAC_PI_2;
        for i in 0..b {
            let tt = t[i];
            let r = i * per..(i + 1) * per;
            let (xo, uo) = (&mut xt[r.clone()], &mut ut[r.clone()]);
            let (p0, p1, pe) = (&a0[r.clone()], &a1[r.clone()], &e[r]);
            match self.kind {
                MatcherKind::Independent | MatcherKind::ExactOt => {
                    for k in 0..per {
                        xo[k] = tt * p1[k] + (1.0 - tt) * p0[k] + s * pe[k];
                        uo[k] = p1[k] - p0[k];
                    }
                }
                MatcherKind::Target => {
                    let st = 1.0 - (1.0 - s) * tt;
                    for k in 0..per {
                        xo[k] = tt * p1[k] + st * pe[k];
                        uo[k] = (p1[k] - (1.0 - s) * xo[k]) / (1.0 - (1.0 - s) * tt);
                    }
                }
                MatcherKind::SchrodingerBridge => {
                    let st = s * (tt * (1.0 - tt)).sqrt();
                    let ratio = (1.0 - 2.0 * tt) / (2.0 * tt * (1.0 - tt) + 1e-8);
                    for k in 0..per {
                        let mu = tt * p1[k] + (1.0 - tt) * p0[k];
                        xo[k] = mu + st * pe[k];
                        uo[k] = ratio * (xo[k] - mu) + p1[k] - p0[k];
                    }
                }
                MatcherKind::VariancePreserving => {
                    let (c, sn) = ((half_pi * tt).cos(), (half_pi * tt).sin());
                    for k in 0..per {
                        xo[k] = c * p0[k] + sn * p1[k] + s * pe[k];
                        uo[k] = half_pi * (c * p1[k] - sn * p0[k]);
                    }
                }
            }
        }
        Ok((Tensor::from_vec(xt, x0.shape()), Tensor::from_vec(ut, x0.shape())))
    }

    /// torchcfm's `sample_location_and_conditional_flow`: pair (OT couplings), draw `t` (unless
    /// given) and `ε`, and compute `x_t`, `u_t`. Draws come from `rng` in a fixed order: pairing,
    /// then t, then ε.
    pub fn sample(&self, x0: &Tensor, x1: &Tensor, t: Option<&[f32]>, rng: &mut Rng) -> Result<FlowSample> {
        if x0.shape() != x1.shape() {
            bail!("flow matching needs x0 and x1 of one shape, got {:?} and {:?}", x0.shape(), x1.shape());
        }
        let b = x0.shape()[0];
        let (x0_idx, x1_idx): (Vec<usize>, Vec<usize>) = if self.kind.uses_ot() {
            let perm = exact_ot_pairing(x0, x1)?;
            if self.ot_replace {
                sample_plan_with_replacement(&perm, b, rng).into_iter().unzip()
            } else {
                // keep x1 (and whatever belongs to it) in place; move the noise to its partner
                let mut inv = vec![0; b];
                for (i, &j) in perm.iter().enumerate() {
                    inv[j] = i;
                }
                (inv, (0..b).collect())
            }
        } else {
            ((0..b).collect(), (0..b).collect())
        };
        let identity = |v: &[usize]| v.iter().enumerate().all(|(i, &j)| i == j);
        let x0p = if identity(&x0_idx) { x0.clone() } else { rows(x0, &x0_idx) };
        let x1p = if identity(&x1_idx) { x1.clone() } else { rows(x1, &x1_idx) };
        let t: Vec<f32> = match t {
            Some(t) => t.to_vec(),
            None => (0..b).map(|_| rng.uniform()).collect(),
        };
        let eps = Tensor::randn(x0.shape(), rng);
        let (xt, ut) = self.location_and_flow(&x0p, &x1p, &t, &eps)?;
        Ok(FlowSample { t: Tensor::from_vec(t, &[b]), xt, ut, eps, x0_idx, x1_idx })
    }
}
