#!/usr/bin/env python3
"""Time torchcfm UNetModelWrapper on CPU (reference numbers for the Rust implementation).

  /work/venv/torch/bin/python scripts/bench_torch_cpu.py --threads 2 --iters 5 --json

forward:          eval mode, torch.no_grad()
forward_backward: train mode, loss = mse(v, target), loss.backward() (zero_grad(set_to_none) each iter)
2 warm-up iterations, then the median of --iters timed iterations (ms).
The JSON records per iteration whether a rustc process was running (the dev machine compiles concurrently);
*_quiet_median is the median over the quiet iterations only.  --wait-quiet S waits up to S seconds in total
for rustc to finish before timed iterations.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from torchcfm.models.unet.unet import UNetModelWrapper


def rustc_running():
    try:
        out = subprocess.run(["pgrep", "-c", "rustc"], capture_output=True, text=True)
        return int(out.stdout.strip() or 0)
    except Exception:
        return -1


class Quiet:
    """Optionally wait (polling `pgrep -c rustc`) for no rustc before each timed iteration, within a total budget."""

    def __init__(self, budget_s):
        self.budget_s = budget_s
        self.waited_s = 0.0

    def wait(self):
        while self.waited_s < self.budget_s and rustc_running() > 0:
            time.sleep(2.0)
            self.waited_s += 2.0
        return rustc_running() == 0


def time_it(fn, warmup, iters, quiet):
    for _ in range(warmup):
        fn()
    ts, flags = [], []
    for _ in range(iters):
        q0 = quiet.wait()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        flags.append(q0 and rustc_running() == 0)
    return statistics.median(ts), ts, flags


def bench(name, kw, batch, warmup, iters, quiet):
    torch.manual_seed(0)
    model = UNetModelWrapper(**kw)
    nparams = sum(p.numel() for p in model.parameters())
    C, H, W = kw["dim"]
    x = torch.randn(batch, C, H, W)
    t = torch.rand(batch)
    target = torch.randn(batch, C, H, W)

    def fwd():
        with torch.no_grad():
            model(t, x)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(t, x), target)
        loss.backward()

    model.eval()
    f_ms, f_all, f_q = time_it(fwd, warmup, iters, quiet)
    model.train()
    fb_ms, fb_all, fb_q = time_it(fwd_bwd, warmup, iters, quiet)

    def quiet_median(ts, flags):
        qs = [v for v, q in zip(ts, flags) if q]
        return round(statistics.median(qs), 2) if qs else None

    return {"batch": batch, "params": nparams, "forward_ms": round(f_ms, 2), "forward_backward_ms": round(fb_ms, 2),
            "forward_ms_all": [round(v, 2) for v in f_all], "forward_backward_ms_all": [round(v, 2) for v in fb_all],
            # per-iteration: True if no rustc process was seen just before and just after that iteration
            "forward_quiet": f_q, "forward_backward_quiet": fb_q,
            "forward_ms_quiet_median": quiet_median(f_all, f_q),
            "forward_backward_ms_quiet_median": quiet_median(fb_all, fb_q),
            "config": kw}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-mnist", type=int, default=32)
    ap.add_argument("--batch-cifar", type=int, default=4)
    ap.add_argument("--only", choices=["mnist", "cifar"], default=None)
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="total seconds to spend waiting for `pgrep rustc` to be empty before timed iterations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    configs = {
        "mnist": (dict(dim=(1, 28, 28), num_channels=32, num_res_blocks=1), args.batch_mnist),
        "cifar": (dict(dim=(3, 32, 32), num_channels=128, num_res_blocks=2, channel_mult=[1, 2, 2, 2],
                       num_heads=4, num_head_channels=64, attention_resolutions="16", dropout=0.1), args.batch_cifar),
    }
    rustc_before = rustc_running()
    load_before = os.getloadavg()[0]
    quiet = Quiet(args.wait_quiet)
    res = {}
    for name, (kw, batch) in configs.items():
        if args.only and name != args.only:
            continue
        res[name] = bench(name, kw, batch, args.warmup, args.iters, quiet)
    rustc_after = rustc_running()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"{'model':6s} {'batch':>5s} {'params':>10s} {'forward ms':>11s} {'fwd+bwd ms':>11s}  {'ms/img fwd':>10s} {'ms/img f+b':>10s}")
    for name, r in res.items():
        print(f"{name:6s} {r['batch']:5d} {r['params']:10d} {r['forward_ms']:11.2f} {r['forward_backward_ms']:11.2f}  "
              f"{r['forward_ms'] / r['batch']:10.2f} {r['forward_backward_ms'] / r['batch']:10.2f}")
    if args.json:
        out = {k: {kk: vv for kk, vv in v.items()} for k, v in res.items()}
        out.update({
            "threads": args.threads, "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup,
            "rustc_running": bool(rustc_before > 0 or rustc_after > 0
                                  or not all(all(r[k]) for r in res.values()
                                             for k in ("forward_quiet", "forward_backward_quiet"))),
            "waited_for_quiet_s": quiet.waited_s,
            "rustc_procs_before_after": [rustc_before, rustc_after],
            "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "nproc": os.cpu_count(),
        })
        print(json.dumps(out))


if __name__ == "__main__":
    main()
