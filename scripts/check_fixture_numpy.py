#!/usr/bin/env python3
"""Sanity-check the exported fixtures with the independent pure-NumPy reference forward pass.

Run from the repo root:  /work/venv/torch/bin/python scripts/check_fixture_numpy.py
Uses /work/shared/research/torchcfm_numpy_ref.py (legacy attention order, no resblock_updown), so it covers
mnist, scaleshift and tiny (plus tiny's ema/net outputs via tiny_half / tiny_bf16); neworder is skipped.
Exits non-zero if any relative error (max|diff| / max|ref|) exceeds 1e-4.
"""
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import load_file

REF_DIR = os.environ.get("TORCHCFM_NUMPY_REF_DIR", "/work/shared/research")
sys.path.insert(0, REF_DIR)
from torchcfm_numpy_ref import unet_forward  # noqa: E402

FIXTURES = "tests/fixtures"
TOL = 1e-4


def read_meta(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return header, 8 + n


def load_any(path):
    """safetensors loader that also handles BF16 (numpy has no bfloat16): everything -> float32/int64."""
    header, off = read_meta(path)
    with open(path, "rb") as f:
        data = f.read()
    out = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[off + a: off + b]
        dt = info["dtype"]
        if dt == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dt == "I64":
            arr = np.frombuffer(raw, dtype="<i8")
        else:
            raise ValueError(dt)
        out[k] = arr.reshape(info["shape"]).copy()
    return out, header.get("__metadata__", {})


def heads_fn(cfg):
    if cfg["num_head_channels"] != -1:
        return lambda c: c // cfg["num_head_channels"]
    return lambda c: cfg["num_heads"]


def supported(cfg):
    return (not cfg["use_new_attention_order"] and not cfg["resblock_updown"]
            and (cfg["num_heads_upsample"] in (-1, cfg["num_heads"]) or cfg["num_head_channels"] != -1))


def rel_err(out, ref):
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)), float(np.abs(out - ref).max())


def main():
    worst = 0.0
    for name in ["mnist", "scaleshift", "neworder", "tiny"]:
        path = os.path.join(FIXTURES, f"unet_{name}.safetensors")
        if not os.path.exists(path):
            print(f"{name:11s} missing {path}")
            continue
        t = load_file(path)
        meta = read_meta(path)[0].get("__metadata__", {})
        cfg = json.loads(meta["unet_config"])
        if not supported(cfg):
            print(f"{name:11s} skipped (new attention order / resblock_updown not in the numpy reference)")
            continue
        sd = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
        y = t.get("input.y")
        out = unet_forward(sd, t["input.t"], t["input.x"], heads_fn(cfg), y)
        r, a = rel_err(out, t["output.v"])
        worst = max(worst, r)
        print(f"{name:11s} output.v       rel err {r:.3e}  (max|diff| {a:.3e}, max|v| {np.abs(t['output.v']).max():.4f})")
        if name == "tiny":
            for fname, key in (("tiny_half.safetensors", "ema_f16.output.v"),
                               ("tiny_bf16.safetensors", "ema_bf16.output.v")):
                low, lmeta = load_any(os.path.join(FIXTURES, fname))
                assert json.loads(lmeta["unet_config"]) == cfg
                assert set(low) == set(sd), "half/bf16 keys must equal the plain state_dict keys"
                out = unet_forward(low, t["input.t"], t["input.x"], heads_fn(cfg), None)
                r, a = rel_err(out, t[key])
                worst = max(worst, r)
                print(f"{name:11s} {key:17s} rel err {r:.3e}  (max|diff| {a:.3e}; weights from {fname})")
                r2, _ = rel_err(out, t["ema.output.v"])
                print(f"{'':11s} (vs f32 ema.output.v: rel err {r2:.3e}, expected from the rounding)")
    print(f"worst relative error {worst:.3e} (tolerance {TOL:g})")
    sys.exit(0 if worst < TOL else 1)


if __name__ == "__main__":
    main()
