//! Figures of a run, drawn from its `metrics.jsonl` and `eval.jsonl` (see [`plot_metrics`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{Map, Value};

use super::metrics::{EVAL_JSONL, METRICS_JSONL, read_jsonl};
use crate::plot::{Series, line_chart};

/// Per-step series longer than this are smoothed with a moving average.
const SMOOTH_ABOVE: usize = 100;
/// The moving average spans about this fraction of the run (`1 / SMOOTH_PARTS`).
const SMOOTH_PARTS: usize = 50;

/// Draw the figures of the run in `run_dir`, into `run_dir`, and return their paths:
///
/// * `reward.png`: `reward_mean`, `reward_max`, `reward_min` against the step;
/// * `losses.png`: `fm_loss`, `w2_loss`, `total_loss`;
/// * `weights.png`: `weight_mean`, `weight_max`;
/// * `diversity.png`: every key of `eval.jsonl` (or `metrics.jsonl`) whose name contains
///   `diversity`.
///
/// A figure whose series are all absent is skipped. Per-step series of more than 100 points are
/// drawn as a trailing moving average over ~1/50 of the run, which the title states.
pub fn plot_metrics(run_dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = run_dir.as_ref();
    let metrics = read_jsonl(&dir.join(METRICS_JSONL))?;
    let eval = read_jsonl(&dir.join(EVAL_JSONL))?;
    let mut written = Vec::new();

    let per_step: [(&str, &str, &str, &[&str]); 3] = [
        ("reward.png", "Reward", "reward", &["reward_mean", "reward_max", "reward_min"]),
        ("losses.png", "Losses", "loss", &["fm_loss", "w2_loss", "total_loss"]),
        ("weights.png", "Sample weights", "weight", &["weight_mean", "weight_max"]),
    ];
    for (file, title, y_label, keys) in per_step {
        let series: Vec<Series> = keys.iter().map(|k| Series { name: k.to_string(), points: points(&metrics, k) }).filter(|s| !s.points.is_empty()).collect();
        if let Some(p) = draw(dir, file, title, y_label, series)? {
            written.push(p);
        }
    }

    let mut diversity = Vec::new();
    for (records, source) in [(&eval, "eval"), (&metrics, "train")] {
        for key in keys_containing(records, "diversity") {
            let name = if source == "eval" { key.clone() } else { format!("{key} (train)") };
            diversity.push(Series { name, points: points(records, &key) });
        }
    }
    diversity.retain(|s| !s.points.is_empty());
    if let Some(p) = draw(dir, "diversity.png", "Diversity", "diversity", diversity)? {
        written.push(p);
    }
    Ok(written)
}

/// Draw `series` into `dir/file`, smoothing long ones; `None` when there is nothing to draw.
fn draw(dir: &Path, file: &str, title: &str, y_label: &str, mut series: Vec<Series>) -> Result<Option<PathBuf>> {
    if series.is_empty() {
        return Ok(None);
    }
    let longest = series.iter().map(|s| s.points.len()).max().unwrap_or(0);
    let mut title = title.to_string();
    if longest > SMOOTH_ABOVE {
        let window = longest / SMOOTH_PARTS;
        for s in &mut series {
            s.points = moving_average(&s.points, window);
        }
        title = format!("{title} (moving average over {window} steps)");
    }
    let path = dir.join(file);
    line_chart(&path, &title, "step", y_label, &series)?;
    Ok(Some(path))
}

/// `(step, value)` of every record holding a number under `key` and a step, in step order.
fn points(records: &[Map<String, Value>], key: &str) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = records.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).filter(|(_, y)| y.is_finite()).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

/// The numeric keys of `records` whose name contains `needle`, in order of first appearance.
fn keys_containing(records: &[Map<String, Value>], needle: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for r in records {
        for (k, v) in r {
            if k.contains(needle) && v.is_number() && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    keys
}

/// Trailing moving average over `window` points (the first points average what exists so far).
pub fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}
