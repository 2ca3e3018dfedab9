//! Reward and diversity of a set of samples: what `train` logs and `eval` reports.
//!
//! - `diversity_pixel`: mean pairwise Euclidean distance of the samples (flattened pixels);
//! - `diversity_feature`: the same in the classifier's feature space (its penultimate layer);
//! - `class_entropy_bits` and `class_histogram`: the classifier's predicted classes;
//! - `target_fraction`: share of samples classified into the reward's target classes;
//! - `w2_to_reference`: empirical 2-Wasserstein distance (exact OT on squared Euclidean cost) between
//!   the samples and a set of reference-model samples of the same size.

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::Serialize;

use crate::flow::ot::{assignment_cost, linear_assignment, sq_euclidean_cost};
use crate::nn::Classifier;
use crate::tensor::Tensor;

/// Mean pairwise Euclidean distance of the rows of `x [n, ...]` (f64 accumulation, parallel).
pub fn mean_pairwise_distance(x: &Tensor) -> f32 {
    let n = x.shape().first().copied().unwrap_or(0);
    if n < 2 {
        return 0.0;
    }
    let d = x.numel() / n;
    let p = x.data();
    let s: f64 = (0..n)
        .into_par_iter()
        .map(|i| {
            let a = &p[i * d..(i + 1) * d];
            let mut acc = 0.0f64;
            for j in i + 1..n {
                let b = &p[j * d..(j + 1) * d];
                let q: f32 = a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum();
                acc += q.sqrt() as f64;
            }
            acc
        })
        .sum();
    (s / (n * (n - 1) / 2) as f64) as f32
}

/// Empirical W2 between two equal-size sample sets: `sqrt(min_perm mean ‖a_i − b_perm(i)‖²)`.
pub fn w2_distance(a: &Tensor, b: &Tensor) -> Result<f32> {
    let n = a.shape()[0];
    if b.shape()[0] != n || a.numel() != b.numel() {
        bail!("W2 needs two sample sets of one shape, got {:?} and {:?}", a.shape(), b.shape());
    }
    if n > 2048 {
        bail!("W2 by exact assignment is O(n³): use at most 2048 samples, not {n}");
    }
    let d = a.numel() / n.max(1);
    let cost = sq_euclidean_cost(a.data(), b.data(), n, n, d);
    let perm = linear_assignment(&cost, n);
    Ok((assignment_cost(&cost, n, &perm) / n as f64).sqrt() as f32)
}

/// Entropy in bits of a histogram of counts.
pub fn entropy_bits(hist: &[usize]) -> f32 {
    let n: usize = hist.iter().sum();
    if n == 0 {
        return 0.0;
    }
    -hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            p * p.log2()
        })
        .sum::<f64>() as f32
}

/// Everything measured on one sample set.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SampleStats {
    pub samples: usize,
    pub reward_mean: f32,
    pub reward_std: f32,
    pub diversity_pixel: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diversity_feature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_histogram: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_entropy_bits: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_fraction: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub w2_to_reference: Option<f32>,
}

impl SampleStats {
    /// Scalars for logs, `(name, value)`.
    pub fn scalars(&self) -> Vec<(String, f32)> {
        let mut v = vec![("reward_mean".to_string(), self.reward_mean), ("reward_std".into(), self.reward_std), ("diversity_pixel".into(), self.diversity_pixel)];
        let mut opt = |k: &str, x: Option<f32>| {
            if let Some(x) = x {
                v.push((k.to_string(), x));
            }
        };
        opt("diversity_feature", self.diversity_feature);
        opt("class_entropy_bits", self.class_entropy_bits);
        opt("target_fraction", self.target_fraction);
        opt("w2_to_reference", self.w2_to_reference);
        v
    }
}

/// Measure `x` (samples in the model's space) given its rewards, an optional classifier (with the
/// reward's target classes) and optional reference samples.
pub fn sample_stats(x: &Tensor, rewards: &[f32], classifier: Option<(&Classifier, &[usize])>, reference: Option<&Tensor>) -> Result<SampleStats> {
    let n = x.shape()[0];
    if rewards.len() != n {
        bail!("{} rewards for {n} samples", rewards.len());
    }
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n.max(1) as f64;
    let var = rewards.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
    let mut s = SampleStats { samples: n, reward_mean: mean as f32, reward_std: var.sqrt() as f32, diversity_pixel: mean_pairwise_distance(x), ..Default::default() };
    if let Some((c, targets)) = classifier {
        let (logits, feats) = c.predict(x)?;
        s.diversity_feature = Some(mean_pairwise_distance(&feats));
        let k = c.config().num_classes;
        let mut hist = vec![0usize; k];
        for row in logits.data().chunks(k) {
            hist[crate::nn::classifier::argmax(row)] += 1;
        }
        s.class_entropy_bits = Some(entropy_bits(&hist));
        if !targets.is_empty() {
            s.target_fraction = Some(targets.iter().filter(|&&t| t < k).map(|&t| hist[t]).sum::<usize>() as f32 / n.max(1) as f32);
        }
        s.class_histogram = Some(hist);
    }
    if let Some(r) = reference {
        s.w2_to_reference = Some(w2_distance(x, r)?);
    }
    Ok(s)
}
