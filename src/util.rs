//! Small shared helpers.

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
