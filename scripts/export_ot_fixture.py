#!/usr/bin/env python3
"""Export reference optimal assignments for tests/ot.rs.

Run: /work/venv/torch/bin/python scripts/export_ot_fixture.py

Writes tests/fixtures/ot_scipy.safetensors with, for each case `c`:
  {c}_x0, {c}_x1 : float32 [n, d] batches (the project's loader reads F64 as f32, so the
                   inputs, not the cost matrix, are stored; the cost is recomputed in Rust);
  {c}_total      : int64 [1], the bit pattern of scipy's optimal total cost (float64) for the
                   squared Euclidean cost computed in float64 from the float32 inputs;
  {c}_perm       : int64 [n], scipy's assignment (informational: with ties it need not match).
  pot_total      : int64 [1], bits of n * sum(ot.emd(uniform, uniform, M) * M) for case n64
                   (present only if POT is importable).
  int64_cost     : int64 [64, 64] small integer costs with many ties (exact in every dtype);
  int64_total    : int64 [1] scipy's optimal total for it (an exact integer).
"""
import os
import numpy as np
from scipy.optimize import linear_sum_assignment
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ot_scipy.safetensors")


def sq_cost(x0, x1):
    a = x0.astype(np.float64)
    b = x1.astype(np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def bits(x):
    return np.array([x], dtype=np.float64).view(np.int64)


def main():
    rng = np.random.default_rng(20240611)
    tensors = {}
    cases = [("n16", 16, 5), ("n64", 64, 8), ("n256", 256, 12)]
    for name, n, d in cases:
        x0 = rng.standard_normal((n, d)).astype(np.float32)
        x1 = (rng.standard_normal((n, d)) * 1.5 + 0.5).astype(np.float32)
        M = sq_cost(x0, x1)
        r, c = linear_sum_assignment(M)
        assert (r == np.arange(n)).all()
        total = float(M[r, c].sum())
        tensors[f"{name}_x0"] = x0
        tensors[f"{name}_x1"] = x1
        tensors[f"{name}_total"] = bits(total)
        tensors[f"{name}_perm"] = c.astype(np.int64)
        print(f"{name}: n={n} d={d} scipy total={total!r}")
        if name == "n64":
            try:
                import ot

                w = np.full(n, 1.0 / n)
                plan = ot.emd(w, w, M)
                pot_total = float((plan * M).sum() * n)
                tensors["pot_total"] = bits(pot_total)
                print(f"  POT {ot.__version__} ot.emd total*n={pot_total!r} (rel diff to scipy {abs(pot_total - total) / total:.2e})")
            except ImportError:
                print("  POT not available; skipping ot.emd reference")
    C = rng.integers(-5, 6, size=(64, 64)).astype(np.int64)
    r, c = linear_sum_assignment(C)
    tensors["int64_cost"] = C
    tensors["int64_total"] = np.array([int(C[r, c].sum())], dtype=np.int64)
    print(f"int64: n=64 scipy total={int(C[r, c].sum())}")
    save_file(tensors, OUT)
    print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
