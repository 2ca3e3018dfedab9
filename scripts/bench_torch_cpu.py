#!/usr/bin/env python3
"""Time torchcfm UNetModelWrapper on CPU (reference numbers for the Rust implementation).

  /work/venv/torch/bin/python scripts/bench_torch_cpu.py --threads 2 --iters 5 --json

  /work/venv/torch/bin/python scripts/bench_torch_cpu.py --threads 2 --round --iters 3 --json

forward:          eval mode, torch.no_grad()
forward_backward: train mode, loss = mse(v, target), loss.backward() (zero_grad(set_to_none) each iter)
2 warm-up iterations, then the median of --iters timed iterations (ms).

--round: instead, one ORW-CFM-W2 round on the MNIST config, step for step what
`orwcfm-fast bench round --unet-config mnist --batch 32 --steps 20 --coupling independent` runs
(Trainer::train_step): three copies of one model (the policy, the trained net, the frozen
reference); sample --round-batch x0 ~ N(0, I) by --steps Euler steps of the policy (t = i/steps,
no_grad: --steps evaluations); reward = mean pixel; w = exp(tau r) (the trainer's default
weight_mode "exp"; --weight-mode exp-normalized divides by the batch mean); independent coupling
(x0 ~ N(0, I), t ~ U[0, 1), x_t = t x1 + (1 - t) x0, u_t = x1 - x0); v = net(t, x_t) (train mode),
v_ref = reference(t, x_t) (no_grad); loss = mean_i w_i mean (v - u)^2 + alpha mean (v - v_ref)^2;
backward, clip_grad_norm_(1.0), Adam(lr 2e-4); the loss read as a float. --warmup-round untimed
rounds (default 1, as ours), then the median of --iters.

peak_rss_mb: the process's peak resident set (resource.getrusage ru_maxrss, MiB), what
`orwcfm-fast bench` reports for the CPU (VmHWM); rss_after_import_mb: the resident set once torch is
imported, before any work. Run one case per process (--only, or --round)
for a case's own peak.
The JSON records per iteration whether a rustc process was running (the dev machine compiles concurrently);
*_quiet_median is the median over the quiet iterations only.  --wait-quiet S waits up to S seconds in total
for rustc to finish before timed iterations.
"""
import argparse
import json
import os
import copy
import platform
import resource
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


def peak_rss_mb():
    """The process's peak resident set in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_now_mb():
    """The process's resident set now, in MiB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024.0 for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def bench_round(kw, batch, steps, warmup, iters, quiet, tau, alpha, weight_mode):
    """One ORW-CFM-W2 round (see the module docs), timed."""
    torch.manual_seed(0)
    net = UNetModelWrapper(**kw)
    policy = copy.deepcopy(net).eval()
    ref = copy.deepcopy(net).eval()
    for p in list(policy.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    C, H, W = kw["dim"]
    dt = 1.0 / steps
    nfe = [0]

    def sample():
        with torch.no_grad():
            xs = torch.randn(batch, C, H, W)
            for i in range(steps):
                xs = xs + dt * policy(torch.full((batch,), i * dt), xs)
                nfe[0] += 1
            return xs

    def one_round():
        x1 = sample()
        with torch.no_grad():
            r = x1.mean(dim=(1, 2, 3))
            w = torch.exp(tau * r)
            if weight_mode == "exp-normalized":
                w = w / w.mean()
        x0 = torch.randn_like(x1)
        t = torch.rand(batch)
        tb = t.view(batch, 1, 1, 1)
        xt = tb * x1 + (1 - tb) * x0
        ut = x1 - x0
        opt.zero_grad(set_to_none=True)
        v = net(t, xt)
        with torch.no_grad():
            vref = ref(t, xt)
        fm = (w * ((v - ut) ** 2).mean(dim=(1, 2, 3))).mean()
        w2 = ((v - vref) ** 2).mean()
        loss = fm + alpha * w2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss.item()

    ms, all_ms, flags = time_it(one_round, warmup, iters, quiet)
    return {"batch": batch, "steps": steps, "nfe_per_round": nfe[0] // (warmup + iters), "params": sum(p.numel() for p in net.parameters()),
            "round_ms": round(ms, 2), "round_ms_all": [round(v, 2) for v in all_ms], "round_quiet": flags,
            "temperature": tau, "alpha": alpha, "weight_mode": weight_mode, "coupling": "independent", "config": kw}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-mnist", type=int, default=32)
    ap.add_argument("--batch-cifar", type=int, default=4)
    ap.add_argument("--only", choices=["mnist", "cifar"], default=None)
    ap.add_argument("--round", action="store_true", help="time one ORW-CFM-W2 round on the MNIST config instead")
    ap.add_argument("--round-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="Euler steps of the round's sampling")
    ap.add_argument("--warmup-round", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--weight-mode", choices=["exp", "exp-normalized"], default="exp")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="total seconds to spend waiting for `pgrep rustc` to be empty before timed iterations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # torch and torchcfm imported, nothing run: the part of the peak that is the libraries
    rss_import = rss_now_mb()

    configs = {
        "mnist": (dict(dim=(1, 28, 28), num_channels=32, num_res_blocks=1), args.batch_mnist),
        "cifar": (dict(dim=(3, 32, 32), num_channels=128, num_res_blocks=2, channel_mult=[1, 2, 2, 2],
                       num_heads=4, num_head_channels=64, attention_resolutions="16", dropout=0.1), args.batch_cifar),
    }
    rustc_before = rustc_running()
    load_before = os.getloadavg()[0]
    quiet = Quiet(args.wait_quiet)
    res = {}
    if args.round:
        r = bench_round(configs["mnist"][0], args.round_batch, args.steps, args.warmup_round, args.iters, quiet,
                        args.temperature, args.alpha, args.weight_mode)
        rustc_after = rustc_running()
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}: ORW-CFM-W2 round, MNIST config, batch {r['batch']}, "
              f"{r['steps']} Euler steps + one gradient step: {r['round_ms']:.1f} ms (median of {args.iters}), peak RSS {peak_rss_mb():.0f} MiB")
        if args.json:
            print(json.dumps({"round": r, "threads": args.threads, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "iters": args.iters,
                              "warmup": args.warmup_round, "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_import_mb": rss_import,
                              "rustc_running": bool(rustc_before > 0 or rustc_after > 0 or not all(r["round_quiet"])),
                              "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
                              "nproc": os.cpu_count()}))
        return
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
            "threads": args.threads, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "iters": args.iters, "warmup": args.warmup,
            "rustc_running": bool(rustc_before > 0 or rustc_after > 0
                                  or not all(all(r[k]) for r in res.values()
                                             for k in ("forward_quiet", "forward_backward_quiet"))),
            "waited_for_quiet_s": quiet.waited_s,
            "rustc_procs_before_after": [rustc_before, rustc_after],
            "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "nproc": os.cpu_count(), "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_import_mb": rss_import,
        })
        print(json.dumps(out))


if __name__ == "__main__":
    main()
