//! The `classifier` reward: probability mass (or its log) that a CNN classifier running in the
//! engine puts on a set of target classes, e.g. `[0, 2, 4, 6, 8]` for "only even digits"
//! (the paper's first experiment).

use anyhow::{Result, bail};

use super::Reward;
use crate::nn::Classifier;
use crate::tensor::Tensor;

/// `r(x) = Σ_{c ∈ targets} p(c | x)`, or `ln` of it (floored at `ln 1e-6`) when `log` is set.
pub struct ClassifierReward {
    classifier: Classifier,
    targets: Vec<usize>,
    log: bool,
}

impl ClassifierReward {
    pub fn new(classifier: Classifier, targets: Vec<usize>, log: bool) -> Result<Self> {
        let k = classifier.config().num_classes;
        if targets.is_empty() {
            bail!("the classifier reward needs target_classes (e.g. [0, 2, 4, 6, 8])");
        }
        if let Some(&bad) = targets.iter().find(|&&c| c >= k) {
            bail!("target class {bad} is out of range for a classifier with {k} classes");
        }
        Ok(ClassifierReward { classifier, targets, log })
    }
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }
    pub fn targets(&self) -> &[usize] {
        &self.targets
    }
}

impl Reward for ClassifierReward {
    fn name(&self) -> String {
        let t: Vec<String> = self.targets.iter().map(|c| c.to_string()).collect();
        format!("classifier{}[{}]", if self.log { "-log" } else { "" }, t.join(","))
    }
    fn score(&mut self, x: &Tensor, _y: Option<&[usize]>) -> Result<Vec<f32>> {
        let p = self.classifier.probs(x)?;
        let k = self.classifier.config().num_classes;
        Ok(p.data()
            .chunks(k)
            .map(|row| {
                let m: f32 = self.targets.iter().map(|&c| row[c]).sum();
                if self.log { m.max(1e-6).ln() } else { m }
            })
            .collect())
    }
}
