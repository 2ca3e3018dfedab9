//! torchcfm's conditional flow matchers (`conditional_flow_matching.py`), with its formulas and σ.
//!
//! Every matcher draws `t ~ U[0,1)` (unless given) and noise `ε ~ N(0, I)` (always, even when
//! σ = 0, as torchcfm does), and returns `x_t = μ_t + σ_t ε` and the target velocity `u_t`.
//! Couplings that re-pair the batch (exact OT) report which `x1` row each output row came from,
//! so that per-sample data such as ORW's reward weights stay with their samples.
//!
//! [`FlowMatcher::sample`] is torchcfm's one call on host tensors, drawing `t` and `ε` from a
//! xoshiro [`Rng`]. Its parts work on any device: [`FlowMatcher::pairing`] (the coupling, solved
//! on host tensors), [`FlowMatcher::paired_sample`] and [`FlowMatcher::location_and_flow`]
//! (row gathers and the formulas as tensor ops where the data is), so the ORW trainer pairs
//! device noise drawn from Philox streams without reading it back.

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

impl FlowMatcher {
    pub fn new(kind: MatcherKind, sigma: f32) -> Self {
        FlowMatcher { kind, sigma, ot_replace: false }
    }

    /// `(x_t, u_t)` for given `x0`, `x1` (already paired), `t [B]` and noise `ε`, on the device
    /// where `x0`, `x1` and `ε` are (one device): per-row coefficients are computed from `t` on
    /// the host, element-wise work by tensor ops, in the order of torchcfm's formulas (the CPU
    /// result is the plain f32 loop's, bit for bit).
    pub fn location_and_flow(&self, x0: &Tensor, x1: &Tensor, t: &[f32], eps: &Tensor) -> Result<(Tensor, Tensor)> {
        if x0.shape() != x1.shape() || x0.shape() != eps.shape() {
            bail!("flow matching needs x0, x1 and noise of one shape, got {:?}, {:?}, {:?}", x0.shape(), x1.shape(), eps.shape());
        }
        let b = x0.shape()[0];
        if t.len() != b {
            bail!("t has {} values for a batch of {b}", t.len());
        }
        let s = self.sigma;
        // a per-row coefficient as [B, 1, …, 1] on the data's device
        let mut col_shape = vec![1; x0.ndim()];
        col_shape[0] = b;
        let dev = x0.device();
        let col = |f: &dyn Fn(f32) -> f32| Tensor::from_vec(t.iter().map(|&tt| f(tt)).collect(), &col_shape).to_device(dev);
        // `a + σ ε` (σ = 0 adds nothing: the ε term is ±0)
        let plus_noise = |a: Tensor, scale: &Tensor| -> Result<Tensor> { if s == 0.0 { Ok(a) } else { a.add(&scale.mul(eps)?) } };
        let sigma_col = || col(&|_| s);
        let half_pi = std::f32::consts::FRAC_PI_2;
        Ok(match self.kind {
            MatcherKind::Independent | MatcherKind::ExactOt => {
                // x_t = t x1 + (1 − t) x0 + σ ε,  u_t = x1 − x0
                let mu = col(&|tt| tt)?.mul(x1)?.add(&col(&|tt| 1.0 - tt)?.mul(x0)?)?;
                (plus_noise(mu, &sigma_col()?)?, x1.sub(x0)?)
            }
            MatcherKind::Target => {
                // σ_t = 1 − (1 − σ) t;  x_t = t x1 + σ_t ε;  u_t = (x1 − (1 − σ) x_t) / σ_t
                let st = col(&|tt| 1.0 - (1.0 - s) * tt)?;
                let xt = col(&|tt| tt)?.mul(x1)?.add(&st.mul(eps)?)?;
                let ut = x1.sub(&xt.mul_scalar(1.0 - s)?)?.div(&st)?;
                (xt, ut)
            }
            MatcherKind::SchrodingerBridge => {
                // σ_t = σ √(t(1−t));  u_t = (1−2t)/(2t(1−t)+1e−8) (x_t − μ_t) + x1 − x0
                let mu = col(&|tt| tt)?.mul(x1)?.add(&col(&|tt| 1.0 - tt)?.mul(x0)?)?;
                let xt = mu.add(&col(&|tt| s * (tt * (1.0 - tt)).sqrt())?.mul(eps)?)?;
                let ratio = col(&|tt| (1.0 - 2.0 * tt) / (2.0 * tt * (1.0 - tt) + 1e-8))?;
                let ut = ratio.mul(&xt.sub(&mu)?)?.add(x1)?.sub(x0)?;
                (xt, ut)
            }
            MatcherKind::VariancePreserving => {
                // x_t = cos(πt/2) x0 + sin(πt/2) x1 + σ ε;  u_t = π/2 (cos(πt/2) x1 − sin(πt/2) x0)
                let (c, sn) = (col(&|tt| (half_pi * tt).cos())?, col(&|tt| (half_pi * tt).sin())?);
                let mu = c.mul(x0)?.add(&sn.mul(x1)?)?;
                let ut = c.mul(x1)?.sub(&sn.mul(x0)?)?.mul_scalar(half_pi)?;
                (plus_noise(mu, &sigma_col()?)?, ut)
            }
        })
    }

    /// The coupling of a batch: `(x0_idx, x1_idx)`, the `x0` and `x1` rows each training pair is
    /// built from. Exact OT couplings solve the assignment on these host tensors (with
    /// `ot_replace`, drawing pairs from the plan with `rng`); the others pair row with row.
    pub fn pairing(&self, x0: &Tensor, x1: &Tensor, rng: &mut Rng) -> Result<(Vec<usize>, Vec<usize>)> {
        if x0.shape() != x1.shape() {
            bail!("flow matching needs x0 and x1 of one shape, got {:?} and {:?}", x0.shape(), x1.shape());
        }
        let b = x0.shape()[0];
        Ok(if self.kind.uses_ot() {
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
        })
    }

    /// Training pairs from a coupling, times and noise: the rows `x0_idx` of `x0` and `x1_idx`
    /// of `x1` (gathered on their device), then [`FlowMatcher::location_and_flow`].
    pub fn paired_sample(&self, x0: &Tensor, x1: &Tensor, (x0_idx, x1_idx): (Vec<usize>, Vec<usize>), t: Vec<f32>, eps: Tensor) -> Result<FlowSample> {
        let identity = |v: &[usize]| v.iter().enumerate().all(|(i, &j)| i == j);
        let x0p = if identity(&x0_idx) { x0.clone() } else { x0.index_rows(&x0_idx)? };
        let x1p = if identity(&x1_idx) { x1.clone() } else { x1.index_rows(&x1_idx)? };
        let (xt, ut) = self.location_and_flow(&x0p, &x1p, &t, &eps)?;
        let b = t.len();
        Ok(FlowSample { t: Tensor::from_vec(t, &[b]), xt, ut, eps, x0_idx, x1_idx })
    }

    /// torchcfm's `sample_location_and_conditional_flow` on host tensors: pair (OT couplings),
    /// draw `t` (unless given) and `ε`, and compute `x_t`, `u_t`. Draws come from `rng` in a fixed
    /// order: pairing, then t, then ε. (The ORW trainer composes [`FlowMatcher::pairing`] and
    /// [`FlowMatcher::paired_sample`] itself, with `ε` from a Philox stream on the model's device.)
    pub fn sample(&self, x0: &Tensor, x1: &Tensor, t: Option<&[f32]>, rng: &mut Rng) -> Result<FlowSample> {
        let pairs = self.pairing(x0, x1, rng)?;
        let b = x0.shape()[0];
        let t: Vec<f32> = match t {
            Some(t) => t.to_vec(),
            None => (0..b).map(|_| rng.uniform()).collect(),
        };
        let eps = Tensor::randn(x0.shape(), rng);
        self.paired_sample(x0, x1, pairs, t, eps)
    }
}
