//! The `classifier` reward: what a CNN classifier running in the engine says of the target
//! classes, e.g. `[0, 2, 4, 6, 8]` for "only even digits" (the paper's first experiment): the
//! probability mass it puts on them, its log, or whether its top class is one of them.

use anyhow::{Result, bail};

use super::Reward;
use crate::nn::Classifier;
use crate::tensor::Tensor;

/// How the reward reads the classifier's probabilities `p(c | x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassifierMode {
    /// `Σ_{c ∈ targets} p(c | x)`.
    Prob,
    /// `ln Σ_{c ∈ targets} p(c | x)`, floored at `ln 1e-6`.
    Log,
    /// 1 when the top class is a target, else 0 (ties go to the lowest class index). Every
    /// sample the classifier files under a target counts the same, so target classes it is less
    /// sure of are not weighted down against those it is surest of.
    Top,
}

impl ClassifierMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "prob" => ClassifierMode::Prob,
            "log" => ClassifierMode::Log,
            "top" => ClassifierMode::Top,
            _ => bail!("unknown classifier_mode '{s}' (prob, log, top)"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            ClassifierMode::Prob => "prob",
            ClassifierMode::Log => "log",
            ClassifierMode::Top => "top",
        }
    }
}

/// The classifier's verdict on the target classes, read as [`ClassifierMode`] says.
pub struct ClassifierReward {
    classifier: Classifier,
    targets: Vec<usize>,
    mode: ClassifierMode,
}

impl ClassifierReward {
    pub fn new(classifier: Classifier, targets: Vec<usize>, mode: ClassifierMode) -> Result<Self> {
        let k = classifier.config().num_classes;
        if targets.is_empty() {
            bail!("the classifier reward needs target_classes (e.g. [0, 2, 4, 6, 8])");
        }
        if let Some(&bad) = targets.iter().find(|&&c| c >= k) {
            bail!("target class {bad} is out of range for a classifier with {k} classes");
        }
        Ok(ClassifierReward { classifier, targets, mode })
    }
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }
    pub fn targets(&self) -> &[usize] {
        &self.targets
    }
}

/// The reward of one row of class probabilities.
fn read_row(row: &[f32], targets: &[usize], mode: ClassifierMode) -> f32 {
    match mode {
        ClassifierMode::Prob => targets.iter().map(|&c| row[c]).sum(),
        ClassifierMode::Log => targets.iter().map(|&c| row[c]).sum::<f32>().max(1e-6).ln(),
        ClassifierMode::Top => {
            // the class the metrics' histogram files the sample under
            if targets.contains(&crate::nn::classifier::argmax(row)) { 1.0 } else { 0.0 }
        }
    }
}

impl Reward for ClassifierReward {
    fn name(&self) -> String {
        let t: Vec<String> = self.targets.iter().map(|c| c.to_string()).collect();
        let m = if self.mode == ClassifierMode::Prob { String::new() } else { format!("-{}", self.mode.name()) };
        format!("classifier{m}[{}]", t.join(","))
    }
    fn score(&mut self, x: &Tensor, _y: Option<&[usize]>) -> Result<Vec<f32>> {
        let p = self.classifier.probs(x)?;
        let k = self.classifier.config().num_classes;
        Ok(p.data().chunks(k).map(|row| read_row(row, &self.targets, self.mode)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_a_row_as_documented() {
        let even = [0, 2, 4, 6, 8];
        // top class 2 (even) with 0.4; even mass 0.4 + 0.1 = 0.5
        let row = [0.0, 0.3, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0];
        assert!((read_row(&row, &even, ClassifierMode::Prob) - 0.5).abs() < 1e-6);
        assert!((read_row(&row, &even, ClassifierMode::Log) - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(read_row(&row, &even, ClassifierMode::Top), 1.0);
        // more even mass (0.55) than odd, but the top class 1 is odd
        let row = [0.2, 0.45, 0.15, 0.0, 0.1, 0.0, 0.05, 0.0, 0.05, 0.0];
        assert_eq!(read_row(&row, &even, ClassifierMode::Top), 0.0);
        assert!(read_row(&row, &even, ClassifierMode::Prob) > 0.5);
        // a tie goes to the lower class, as in the metrics' argmax
        let row = [0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(read_row(&row, &even, ClassifierMode::Top), 0.0);
        assert_eq!(read_row(&[0.0; 10], &even, ClassifierMode::Log), 1e-6f32.ln());
    }

    #[test]
    fn mode_names_round_trip_and_unknown_ones_are_refused() {
        for m in [ClassifierMode::Prob, ClassifierMode::Log, ClassifierMode::Top] {
            assert_eq!(ClassifierMode::parse(m.name()).unwrap(), m);
        }
        let e = ClassifierMode::parse("argmax").unwrap_err().to_string();
        assert!(e.contains("prob, log, top"), "{e}");
    }
}
