//! Reward and diversity of a set of samples: what `train` logs and `eval` reports.
//!
//! - `diversity_pixel`: mean pairwise Euclidean distance of the samples (flattened pixels);
//! - `diversity_feature`: the same in the classifier's feature space (its penultimate layer);
//! - `class_entropy_bits` and `class_histogram`: the classifier's predicted classes;
//! - `target_fraction`: share of samples classified into the reward's target classes;
//! - `w2_to_reference`: empirical 2-Wasserstein distance (exact OT on squared Euclidean cost) between
//!   the samples and a set of reference-model samples of the same size;
//! - `vendi`: the Vendi score of the classifier features (the effective number of distinct
//!   samples; near-duplicates count once), `confidence` (mean top-class probability) and
//!   `class_shares` / `min_target_share`;
//! - against real images ([`RealSet`]): `fd_real` / `fd_real_target`, the Fréchet distance of the
//!   classifier features to all held-out images / those of the target classes, beside
//!   `fd_floor` / `fd_floor_target`, the same distance for as many real images of another split
//!   (what a perfect model would score at this sample count), and `vendi_real` /
//!   `vendi_real_target`, the Vendi score of those real images.

pub mod quality;

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::Dataset;
use crate::flow::ot::{assignment_cost, linear_assignment, sq_euclidean_cost};
use crate::nn::Classifier;
use crate::rng::Rng;
use crate::tensor::Tensor;
use quality::{frechet_from_stats, mean_cov, vendi_score};

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendi: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_shares: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_target_share: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_real: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_real_target: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_floor: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_floor_target: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendi_real: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendi_real_target: Option<f32>,
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
        opt("vendi", self.vendi);
        opt("confidence", self.confidence);
        opt("min_target_share", self.min_target_share);
        opt("fd_real", self.fd_real);
        opt("fd_real_target", self.fd_real_target);
        opt("fd_floor", self.fd_floor);
        opt("fd_floor_target", self.fd_floor_target);
        opt("vendi_real", self.vendi_real);
        opt("vendi_real_target", self.vendi_real_target);
        v
    }
}

/// The floor figures of a [`RealSet`] at one sample count.
#[derive(Clone, Copy)]
struct Floor {
    fd: f32,
    fd_target: Option<f32>,
    vendi: f32,
    vendi_target: Option<f32>,
}

/// Real images to measure samples against, as features of the metrics classifier: a reference
/// set (held-out images: their features' mean and covariance, for all of them and for those of
/// the target classes) and a floor set (other real images, e.g. the training split), of which as
/// many images as there are samples give the floor of each figure.
pub struct RealSet {
    /// Where the reference (and floor) images came from, for reports.
    pub source: String,
    d: usize,
    all: (Vec<f64>, Vec<f64>),
    target: Option<(Vec<f64>, Vec<f64>)>,
    /// Features and labels of the floor set.
    floor_set: (Vec<f32>, Option<Vec<usize>>),
    targets: Vec<usize>,
    floors: Mutex<HashMap<usize, Floor>>,
}

impl RealSet {
    /// Features of `reference` (and of `floor`; without one, the reference itself, so that the
    /// floor is the distance of a subset to the whole) under `classifier`. The target-class
    /// figures need `targets` and the datasets' labels.
    pub fn new(classifier: &Classifier, reference: &Dataset, floor: Option<&Dataset>, targets: &[usize]) -> Result<Self> {
        let feats = |ds: &Dataset| -> Result<Vec<f32>> {
            if ds.len() < 2 {
                bail!("the real images {} hold {} image(s); the Fréchet distance needs at least 2", ds.source, ds.len());
            }
            Ok(classifier.predict(&ds.images)?.1.data().to_vec())
        };
        let d = classifier.config().hidden;
        let rf = feats(reference)?;
        let all = mean_cov(&rf, reference.len(), d);
        let subset = |f: &[f32], labels: &Option<Vec<usize>>| -> Option<(Vec<f32>, usize)> {
            let l = labels.as_ref()?;
            let rows: Vec<f32> = l.iter().enumerate().filter(|(_, c)| targets.contains(c)).flat_map(|(i, _)| f[i * d..(i + 1) * d].iter().copied()).collect();
            let n = rows.len() / d;
            (n >= 2 && !targets.is_empty()).then_some((rows, n))
        };
        let target = subset(&rf, &reference.labels).map(|(rows, n)| mean_cov(&rows, n, d));
        let floor_set = match floor {
            Some(f) => (feats(f)?, f.labels.clone()),
            None => (rf, reference.labels.clone()),
        };
        let source = match floor {
            Some(f) => format!("{} (floor: {})", reference.source, f.source),
            None => reference.source.clone(),
        };
        Ok(RealSet { source, d, all, target, floor_set, targets: targets.to_vec(), floors: Mutex::new(HashMap::new()) })
    }

    /// The floor figures for `n` samples: `n` floor images drawn without replacement (seeded;
    /// all of them when the set is smaller), and as many of the target classes.
    fn floor(&self, n: usize) -> Floor {
        if let Some(f) = self.floors.lock().expect("floor cache").get(&n) {
            return *f;
        }
        let d = self.d;
        let (feats, labels) = &self.floor_set;
        let pick = |pool: Vec<usize>, seed: u64| -> Vec<f32> {
            let mut pool = pool;
            Rng::new(seed).shuffle(&mut pool);
            pool.truncate(n.max(2));
            pool.iter().flat_map(|&i| feats[i * d..(i + 1) * d].iter().copied()).collect()
        };
        let total = feats.len() / d;
        let a = pick((0..total).collect(), 0xF100);
        let na = a.len() / d;
        let (m, s) = mean_cov(&a, na, d);
        let fd = frechet_from_stats(&m, &s, &self.all.0, &self.all.1, d) as f32;
        let tpool: Vec<usize> = labels.as_ref().map(|l| (0..total).filter(|&i| self.targets.contains(&l[i])).collect()).unwrap_or_default();
        let (fd_target, vendi_target) = if tpool.len() >= 2 {
            let t = pick(tpool, 0xF101);
            let nt = t.len() / d;
            let (mt, st) = mean_cov(&t, nt, d);
            (self.target.as_ref().map(|(m2, s2)| frechet_from_stats(&mt, &st, m2, s2, d) as f32), Some(vendi_score(&t, nt, d) as f32))
        } else {
            (None, None)
        };
        let f = Floor { fd, fd_target, vendi: vendi_score(&a, na, d) as f32, vendi_target };
        self.floors.lock().expect("floor cache").insert(n, f);
        f
    }
}

/// Measure `x` (samples in the model's space) given its rewards, an optional classifier (with the
/// reward's target classes), optional reference-model samples and optional real images.
pub fn sample_stats(x: &Tensor, rewards: &[f32], classifier: Option<(&Classifier, &[usize])>, reference: Option<&Tensor>, real: Option<&RealSet>) -> Result<SampleStats> {
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
        let d = c.config().hidden;
        s.vendi = Some(vendi_score(feats.data(), n, d) as f32);
        let k = c.config().num_classes;
        let mut hist = vec![0usize; k];
        let mut conf = 0.0f64;
        for row in logits.data().chunks(k) {
            let top = crate::nn::classifier::argmax(row);
            hist[top] += 1;
            // softmax probability of the top class: 1 / Σ exp(l − l_top)
            conf += 1.0 / row.iter().map(|&l| ((l - row[top]) as f64).exp()).sum::<f64>();
        }
        s.confidence = Some((conf / n.max(1) as f64) as f32);
        s.class_entropy_bits = Some(entropy_bits(&hist));
        let shares: Vec<f32> = hist.iter().map(|&h| h as f32 / n.max(1) as f32).collect();
        if !targets.is_empty() {
            s.target_fraction = Some(targets.iter().filter(|&&t| t < k).map(|&t| hist[t]).sum::<usize>() as f32 / n.max(1) as f32);
            s.min_target_share = targets.iter().filter(|&&t| t < k).map(|&t| shares[t]).min_by(f32::total_cmp);
        }
        s.class_shares = Some(shares);
        s.class_histogram = Some(hist);
        if let Some(r) = real {
            if r.d != d {
                bail!("the real-image features have {} dimensions, the classifier's {d}", r.d);
            }
            if n >= 2 {
                let (m, cv) = mean_cov(feats.data(), n, d);
                s.fd_real = Some(frechet_from_stats(&m, &cv, &r.all.0, &r.all.1, d) as f32);
                s.fd_real_target = r.target.as_ref().map(|(m2, s2)| frechet_from_stats(&m, &cv, m2, s2, d) as f32);
                let f = r.floor(n);
                // fd_target is None when the reference has no target-class images
                (s.fd_floor, s.fd_floor_target, s.vendi_real, s.vendi_real_target) = (Some(f.fd), f.fd_target, Some(f.vendi), f.vendi_target);
            }
        }
    }
    if let Some(r) = reference {
        s.w2_to_reference = Some(w2_distance(x, r)?);
    }
    Ok(s)
}
