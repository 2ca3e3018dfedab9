#!/usr/bin/env python3
"""Check that safetensors written by orwcfm-fast load into torchcfm with strict=True and give the
same output. Usage (from the repo root, after `cargo build --release`):

  /path/to/venv/bin/python scripts/check_torch_roundtrip.py

It converts tests/fixtures/tiny_ckpt.pt and saves each fixture model through `orwcfm-fast convert`,
rebuilds UNetModelWrapper from the `unet_config` metadata, loads with strict=True, and compares
the output with the fixture's reference output.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchcfm.models.unet.unet import UNetModelWrapper

BIN = "target/release/orwcfm-fast"


def check(src, key, want_name, fixture):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "m.safetensors")
        args = [BIN, "convert", src, out]
        if key:
            args += ["--key", key]
        cfg_path = os.path.join(d, "cfg.json")
        with safe_open(fixture, "pt") as f:
            meta = f.metadata()
            x, t = f.get_tensor("input.x"), f.get_tensor("input.t")
            y = f.get_tensor("input.y") if "input.y" in f.keys() else None
            want = f.get_tensor(want_name)
        with open(cfg_path, "w") as fh:
            fh.write(meta["unet_config"])
        subprocess.run(args + ["--unet-config", cfg_path], check=True, capture_output=True)
        with safe_open(out, "pt") as f:
            cfg = json.loads(f.metadata()["unet_config"])
        cfg["dim"] = tuple(cfg["dim"])
        model = UNetModelWrapper(**cfg).eval()
        model.load_state_dict(load_file(out), strict=True)
        with torch.no_grad():
            v = model(t, x, y) if y is not None else model(t, x)
        err = ((v - want).norm() / want.norm()).item()
        print(f"{src} [{key or 'default'}] -> strict load ok, rel err {err:.2e}")
        return err


def main():
    errs = [check("tests/fixtures/tiny_ckpt.pt", None, "ema.output.v", "tests/fixtures/unet_tiny.safetensors"),
            check("tests/fixtures/tiny_ckpt.pt", "net_model", "net.output.v", "tests/fixtures/unet_tiny.safetensors")]
    # fixture models saved through safetensors: re-save the param.* tensors, convert, load
    for name in ["mnist", "scaleshift", "neworder"]:
        fx = f"tests/fixtures/unet_{name}.safetensors"
        with tempfile.TemporaryDirectory() as d:
            sd = {}
            with safe_open(fx, "pt") as f:
                for k in f.keys():
                    if k.startswith("param."):
                        sd[k[len("param."):]] = f.get_tensor(k)
            # a .pt checkpoint in torchcfm's format
            pt = os.path.join(d, "ckpt.pt")
            torch.save({"ema_model": sd, "step": 0}, pt)
            errs.append(check(pt, None, "output.v", fx))
    if max(errs) > 1e-5:
        sys.exit("parity failed")


if __name__ == "__main__":
    main()
