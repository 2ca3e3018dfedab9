//! Small shared helpers.

use std::path::Path;

use anyhow::{Result, anyhow, bail};

/// ‖a − b‖ / ‖b‖ (with ‖b‖ floored at 1e-30), computed in f64. The tolerance rule of the project.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

/// The candidate closest to `word` by edit distance, if it is reasonably close.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(&str, usize)> = None;
    for c in candidates {
        let d = strsim::levenshtein(word, c);
        if best.is_none_or(|(_, bd)| d < bd) {
            best = Some((c, d));
        }
    }
    best.filter(|(c, d)| *d <= (c.len().max(word.len()) / 2).max(2)).map(|(c, _)| c)
}

/// Check early that an output file can be created, so long work is not wasted.
pub fn check_writable(out: &Path) -> Result<()> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("cannot write {}: folder {} does not exist", out.display(), dir.display());
    }
    if out.is_dir() {
        bail!("cannot write {}: it is a folder", out.display());
    }
    let probe = dir.join(format!(".orwcfm-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| anyhow!("cannot write {}: {e}", out.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
