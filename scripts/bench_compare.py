#!/usr/bin/env python3
"""Time orwcfm-fast and PyTorch/torchcfm on the CPU, interleaved, on the same shapes and threads.

  python3 scripts/bench_compare.py --torch-python /path/to/venv/bin/python [--rounds 3] [--threads 2]

Each round runs, one after the other: ours MNIST, PyTorch MNIST, ours CIFAR-10, PyTorch CIFAR-10
(each its own process: 2 warm-up + --iters timed iterations, median). Interleaving spreads any
background load over both. Prints a Markdown table of the medians over rounds and ratios
(ours / PyTorch; below 1 means faster), and writes bench/cpu_compare.json (--out).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess

CONFIGS = {"mnist": ("mnist", "--batch-mnist"), "cifar": ("cifar10", "--batch-cifar")}


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch-python", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch-mnist", type=int, default=32)
    ap.add_argument("--batch-cifar", type=int, default=4)
    ap.add_argument("--bin", default="target/release/orwcfm-fast")
    ap.add_argument("--only", choices=list(CONFIGS), default=None)
    ap.add_argument("--out", default="bench/cpu_compare.json")
    a = ap.parse_args()
    batches = {"mnist": a.batch_mnist, "cifar": a.batch_cifar}
    names = [a.only] if a.only else list(CONFIGS)
    res = {k: {"ours": {"f": [], "fb": []}, "torch": {"f": [], "fb": []}} for k in names}
    torch_version = None
    for r in range(a.rounds):
        for name in names:
            ours_cfg, batch_flag = CONFIGS[name]
            o = last_json(subprocess.run([a.bin, "--threads", str(a.threads), "bench", "unet", "--unet-config", ours_cfg,
                                          "--batch", str(batches[name]), "--iters", str(a.iters), "--json"],
                                         check=True, capture_output=True, text=True).stdout)
            res[name]["ours"]["f"].append(o["forward_ms"])
            res[name]["ours"]["fb"].append(o["forward_backward_ms"])
            t = last_json(subprocess.run([a.torch_python, "scripts/bench_torch_cpu.py", "--threads", str(a.threads), "--only", name,
                                          batch_flag, str(batches[name]), "--iters", str(a.iters), "--json"],
                                         check=True, capture_output=True, text=True).stdout)
            torch_version = t["torch"]
            res[name]["torch"]["f"].append(t[name]["forward_ms"])
            res[name]["torch"]["fb"].append(t[name]["forward_backward_ms"])
            print(f"round {r + 1} {name}: ours {o['forward_ms']:.0f}/{o['forward_backward_ms']:.0f} ms, "
                  f"torch {t[name]['forward_ms']:.0f}/{t[name]['forward_backward_ms']:.0f} ms", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    summary = {"cpu": cpu, "nproc": os.cpu_count(), "threads": a.threads, "torch": torch_version, "rounds": a.rounds,
               "iters": a.iters, "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
               "results": {}}
    print(f"\n{cpu}, {a.threads} threads, torch {torch_version}; median over {a.rounds} rounds of per-process medians of {a.iters}\n")
    print("| model | batch | pass | orwcfm-fast ms | PyTorch ms | ratio |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for key, label in (("f", "forward"), ("fb", "forward+backward")):
            ours = statistics.median(res[name]["ours"][key])
            th = statistics.median(res[name]["torch"][key])
            summary["results"][f"{name}_{label}"] = {"batch": batches[name], "ours_ms": ours, "torch_ms": th, "ratio": ours / th,
                                                       "ours_all": res[name]["ours"][key], "torch_all": res[name]["torch"][key]}
            print(f"| {name} | {batches[name]} | {label} | {ours:.0f} | {th:.0f} | {ours / th:.2f} |")
    os.makedirs("bench", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
