//! Exact optimal-transport pairing of minibatches (torchcfm's `ExactOptimalTransportConditionalFlowMatcher`).
//!
//! torchcfm computes the OT plan between a noise batch `x0` and a data batch `x1` with
//! POT's `ot.emd`, uniform weights and squared Euclidean cost. For two batches of equal
//! size `n` an optimal plan can always be taken to be a permutation matrix divided by `n`
//! (Birkhoff–von Neumann), so the problem is a linear assignment problem. We solve it
//! exactly with the shortest augmenting path algorithm of Jonker–Volgenant in the form of
//! Crouse (2016) — the algorithm behind `scipy.optimize.linear_sum_assignment` — using
//! f64 dual potentials: O(n³) worst case, and far less on random costs.

use crate::rng::Rng;
use crate::tensor::Tensor;
use anyhow::{Result, bail};
use rayon::prelude::*;

/// Squared Euclidean distances between the rows of `a` [n, d] and `b` [m, d] (f64 accumulation),
/// row-major n×m.
///
/// Each entry is computed from the differences directly (not via `|a|² + |b|² - 2a·b`), so it is
/// accurate to f64 rounding and non-negative; the summation order is fixed, so the result does not
/// depend on the number of threads.
pub fn sq_euclidean_cost(a: &[f32], b: &[f32], n: usize, m: usize, d: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * d, "sq_euclidean_cost: a has {} values, expected {n}×{d}", a.len());
    assert_eq!(b.len(), m * d, "sq_euclidean_cost: b has {} values, expected {m}×{d}", b.len());
    let mut out = vec![0.0f64; n * m];
    if n == 0 || m == 0 || d == 0 {
        return out;
    }
    let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    out.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
        let ai = &a64[i * d..(i + 1) * d];
        for (j, o) in row.iter_mut().enumerate() {
            *o = sq_dist(ai, &b64[j * d..(j + 1) * d]);
        }
    });
    out
}

/// Σ (x - y)² with eight independent accumulators (vectorisable, fixed order).
#[inline]
fn sq_dist(x: &[f64], y: &[f64]) -> f64 {
    const L: usize = 8;
    let mut acc = [0.0f64; L];
    let xc = x.chunks_exact(L);
    let yc = y.chunks_exact(L);
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (cx, cy) in xc.zip(yc) {
        for k in 0..L {
            let t = cx[k] - cy[k];
            acc[k] += t * t;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&p, &q) in xr.iter().zip(yr) {
        let t = p - q;
        s += t * t;
    }
    s
}

/// Minimum-cost perfect assignment for a square n×n cost (row-major): `perm[i]` = column of row i.
///
/// Exact: shortest augmenting paths with dual potentials (Jonker–Volgenant, Crouse's variant as in
/// SciPy), all in f64. With ties any one optimal assignment is returned (deterministically).
/// Panics if `cost.len() != n * n` or a cost is not finite.
pub fn linear_assignment(cost: &[f64], n: usize) -> Vec<usize> {
    assert_eq!(cost.len(), n * n, "linear_assignment: {} costs for a {n}×{n} matrix", cost.len());
    assert!(cost.iter().all(|c| c.is_finite()), "linear_assignment: the cost matrix has a non-finite entry");
    if n == 0 {
        return Vec::new();
    }
    const NONE: usize = usize::MAX;
    let mut u = vec![0.0f64; n]; // row potentials
    let mut v = vec![0.0f64; n]; // column potentials
    let mut col4row = vec![NONE; n];
    let mut row4col = vec![NONE; n];
    let mut path = vec![NONE; n];
    let mut spc = vec![f64::INFINITY; n]; // shortest path costs to each column
    let mut remaining = vec![0usize; n];
    let mut scanned_rows: Vec<usize> = Vec::with_capacity(n);
    let mut scanned_cols: Vec<usize> = Vec::with_capacity(n);

    for cur_row in 0..n {
        // Dijkstra from `cur_row` over reduced costs until a free column is reached.
        let mut min_val = 0.0f64;
        let mut num_remaining = n;
        for (it, r) in remaining.iter_mut().enumerate() {
            // Reverse order, so that with ties the lowest column index is taken (as SciPy does).
            *r = n - it - 1;
        }
        scanned_rows.clear();
        scanned_cols.clear();
        spc.fill(f64::INFINITY);

        let mut i = cur_row;
        let sink;
        loop {
            scanned_rows.push(i);
            let row = &cost[i * n..(i + 1) * n];
            let base = min_val - u[i];
            let mut index = NONE;
            let mut lowest = f64::INFINITY;
            for it in 0..num_remaining {
                let j = remaining[it];
                let r = base + row[j] - v[j];
                if r < spc[j] {
                    path[j] = i;
                    spc[j] = r;
                }
                let s = spc[j];
                if s < lowest || (s == lowest && row4col[j] == NONE) {
                    lowest = s;
                    index = it;
                }
            }
            assert!(index != NONE && lowest.is_finite(), "linear_assignment: no augmenting path (non-finite costs?)");
            min_val = lowest;
            let j = remaining[index];
            scanned_cols.push(j);
            num_remaining -= 1;
            remaining[index] = remaining[num_remaining];
            if row4col[j] == NONE {
                sink = j;
                break;
            }
            i = row4col[j];
        }

        // Update the dual variables.
        u[cur_row] += min_val;
        for &r in &scanned_rows {
            if r != cur_row {
                u[r] += min_val - spc[col4row[r]];
            }
        }
        for &c in &scanned_cols {
            v[c] -= min_val - spc[c];
        }

        // Augment along the path back to `cur_row`.
        let mut j = sink;
        loop {
            let r = path[j];
            row4col[j] = r;
            std::mem::swap(&mut col4row[r], &mut j);
            if r == cur_row {
                break;
            }
        }
    }
    col4row
}

/// Total cost Σ cost[i, perm[i]] of an assignment (f64).
pub fn assignment_cost(cost: &[f64], n: usize, perm: &[usize]) -> f64 {
    assert_eq!(perm.len(), n);
    perm.iter().enumerate().map(|(i, &j)| cost[i * n + j]).sum()
}

/// The exact OT pairing of two equal batches (first axis = batch, the rest flattened):
/// `perm` such that `x0[i]` pairs with `x1[perm[i]]`.
///
/// Errors if the batch sizes or the per-sample element counts differ, or a tensor has no batch axis.
pub fn exact_ot_pairing(x0: &Tensor, x1: &Tensor) -> Result<Vec<usize>> {
    if x0.ndim() == 0 || x1.ndim() == 0 {
        bail!("exact_ot_pairing: batches need a leading batch axis (got shapes {:?} and {:?})", x0.shape(), x1.shape());
    }
    let n = x0.dim(0);
    if x1.dim(0) != n {
        bail!("exact_ot_pairing: batch sizes differ ({} vs {}; shapes {:?} and {:?})", n, x1.dim(0), x0.shape(), x1.shape());
    }
    if x0.numel() != x1.numel() {
        bail!("exact_ot_pairing: samples have different sizes (shapes {:?} and {:?})", x0.shape(), x1.shape());
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let d = x0.numel() / n;
    let cost = sq_euclidean_cost(x0.data(), x1.data(), n, n, d);
    if cost.iter().any(|c| !c.is_finite()) {
        bail!("exact_ot_pairing: non-finite squared distances (NaN/inf in the batches?)");
    }
    Ok(linear_assignment(&cost, n))
}

/// torchcfm's default sampling from the plan (`replace=True`): draw `n` index pairs (i, j) with
/// replacement, each nonzero entry (i, perm[i]) of the plan with probability 1/perm.len().
pub fn sample_plan_with_replacement(perm: &[usize], n: usize, rng: &mut Rng) -> Vec<(usize, usize)> {
    if n == 0 {
        return Vec::new();
    }
    assert!(!perm.is_empty(), "sample_plan_with_replacement: empty plan");
    let len = perm.len() as u64;
    (0..n)
        .map(|_| {
            let i = rng.below(len) as usize;
            (i, perm[i])
        })
        .collect()
}
