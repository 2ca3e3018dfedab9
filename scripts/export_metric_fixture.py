#!/usr/bin/env python3
"""Export reference Fréchet distances and Vendi scores for tests/quality_metrics.rs.

Run: <venv with numpy, scipy, safetensors>/bin/python scripts/export_metric_fixture.py

Writes tests/fixtures/quality_scipy.safetensors with, for each case `c`:
  fd_{c}_a, fd_{c}_b : float32 [n, d] feature sets;
  fd_{c}             : int64 [1], the bit pattern of the float64 Fréchet distance computed as
                       pytorch-fid does (np.cov, scipy.linalg.sqrtm of the covariance product,
                       its real part, the eps-offset retry when sqrtm is not finite);
  vendi_{c}_x        : float32 [n, d] a feature set (with near-duplicates);
  vendi_{c}          : int64 [1], bits of the Vendi score with the cosine kernel, as the
                       `vendi_score` package computes it (K / n, eigvalsh, exp of the entropy).
"""
import os
import numpy as np
from scipy import linalg
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "quality_scipy.safetensors")


def bits(x):
    return np.array([x], dtype=np.float64).view(np.int64)


def fid(a, b, eps=1e-6):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def vendi(x):
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    k = x @ x.T / x.shape[0]
    w = np.linalg.eigvalsh(k)
    w = w[w > 0]
    return float(np.exp(-np.sum(w * np.log(w))))


def main():
    rng = np.random.default_rng(20261201)
    t = {}
    # full-rank covariances, different means and shapes
    d = 24
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    B = rng.standard_normal((d, d)) / np.sqrt(d)
    a = (rng.standard_normal((300, d)) @ A).astype(np.float32)
    b = (rng.standard_normal((200, d)) @ B + 0.3).astype(np.float32)
    # like the classifier's: non-negative-ish SiLU features, 128 wide, 400 vs 250 rows
    f = rng.standard_normal((128, 128)) / 8
    feat = lambda n, shift: (lambda z: z / (1 + np.exp(-z)))(rng.standard_normal((n, 128)) @ f + shift).astype(np.float32)
    c, e = feat(400, 0.0), feat(250, 0.2)
    for name, (x, y) in {"full": (a, b), "silu128": (c, e)}.items():
        t[f"fd_{name}_a"], t[f"fd_{name}_b"] = x, y
        t[f"fd_{name}"] = bits(fid(x, y))
        print(name, fid(x, y))
    # Vendi: 8 clusters of near-duplicates in 16-d (n > d), and 10 rows in 32-d (n < d)
    centres = rng.standard_normal((8, 16))
    v1 = (np.repeat(centres, 20, axis=0) + 0.05 * rng.standard_normal((160, 16))).astype(np.float32)
    v2 = rng.standard_normal((10, 32)).astype(np.float32)
    for name, x in {"clusters": v1, "wide": v2}.items():
        t[f"vendi_{name}_x"] = x
        t[f"vendi_{name}"] = bits(vendi(x))
        print(name, vendi(x))
    save_file(t, OUT)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
