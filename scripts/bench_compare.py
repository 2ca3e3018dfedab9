#!/usr/bin/env python3
"""Time orwcfm-fast and PyTorch/torchcfm on the CPU, interleaved, on the same shapes and threads.

  python3 scripts/bench_compare.py --torch-python /path/to/venv/bin/python [--rounds 3] [--threads 2] \\
      [--isa avx512,avx2,scalar] [--torch-isa avx2] [--only mnist,cifar,round]

Cases (each its own process, so that its peak memory is its own):
  mnist   U-Net forward and forward+backward, torchcfm's MNIST config, batch --batch-mnist (32)
  cifar   the same, torchcfm's CIFAR-10 recipe, batch --batch-cifar (4)
  round   one ORW-CFM-W2 round on the MNIST config: --round-batch (32) samples by --round-steps (20)
          Euler steps from the policy, then one gradient step (weighted FM + W2 against the frozen
          reference, clip 1.0, Adam): `orwcfm-fast bench round --coupling independent` against
          `scripts/bench_torch_cpu.py --round`, which does the same step for step
Each round of the benchmark runs, for every case, ours once per --isa level (ORWCFM_CPU_ISA; default:
the detected level only), then PyTorch; interleaving spreads any background load over both. Each
process times a warm-up (2 for the U-Net passes, 1 round) then --iters (--round-iters) iterations
and reports their median; the table has the median over rounds of those, and the peak memory: the
process's peak resident set (ours: VmHWM; PyTorch: ru_maxrss), the largest over rounds, in MiB.
Ratios are ours / PyTorch (below 1: faster, smaller); beside the ratio of medians, the table has the
ratio of each side's fastest round and the median of the per-round ratios (steadier on a shared machine). The JSON (--out, default bench/cpu_compare.json)
records the CPU model and its SIMD flags, the commit, the levels and every measurement.

--torch-isa caps PyTorch's instruction set the way an older CPU would (ATen's kernels through
ATEN_CPU_CAPABILITY, oneDNN's through ONEDNN_MAX_CPU_ISA, MKL's through MKL_ENABLE_INSTRUCTIONS):
`--isa avx2 --torch-isa avx2` compares both on what an AVX2-only machine runs. Default: uncapped.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess

# case -> (our --unet-config, the PyTorch script's batch flag)
UNET_CASES = {"mnist": ("mnist", "--batch-mnist"), "cifar": ("cifar10", "--batch-cifar")}
CASES = list(UNET_CASES) + ["round"]


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def run_json(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return last_json(p.stdout)


def env_without_isa():
    e = dict(os.environ)
    e.pop("ORWCFM_CPU_ISA", None)
    return e


# our level -> PyTorch's environment for the same cap
TORCH_ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "scalar": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def cpu_info():
    """The CPU's model name and the SIMD flags that matter here, from /proc/cpuinfo."""
    model, flags = platform.machine(), []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split() if f in ("avx", "avx2", "fma", "f16c") or f.startswith("avx512") or f.startswith("amx"))
    except OSError:
        pass
    return model, flags


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="timed U-Net passes per process")
    ap.add_argument("--round-iters", type=int, default=None, help="timed ORW-CFM-W2 rounds per process (default: --iters)")
    ap.add_argument("--batch-mnist", type=int, default=32)
    ap.add_argument("--batch-cifar", type=int, default=4)
    ap.add_argument("--round-batch", type=int, default=32)
    ap.add_argument("--round-steps", type=int, default=20)
    ap.add_argument("--bin", default="target/release/orwcfm-fast")
    ap.add_argument("--only", default=",".join(CASES), help=f"comma list of cases ({', '.join(CASES)})")
    ap.add_argument("--isa", default=None, help="comma list of our CPU levels to run (scalar, avx2, avx512); default: the detected one")
    ap.add_argument("--torch-isa", default=None, choices=sorted(TORCH_ISA_ENV), help="cap PyTorch's instruction set (default: uncapped)")
    ap.add_argument("--out", default="bench/cpu_compare.json")
    a = ap.parse_args()
    round_iters = a.round_iters or a.iters
    cases = [c for c in a.only.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown cases {bad} (known: {CASES})")
    cpu_json = run_json([a.bin, "devices", "--json"], env_without_isa())["cpu"]
    detected, supported = cpu_json["isa_detected"], cpu_json["isa_levels"]
    levels = [l.strip() for l in a.isa.split(",") if l.strip()] if a.isa else [detected]
    bad = [l for l in levels if l not in supported]
    if bad:
        ap.error(f"levels {bad}: this CPU runs {supported}")
    batches = {"mnist": a.batch_mnist, "cifar": a.batch_cifar, "round": a.round_batch}
    passes = {"mnist": ["forward", "forward_backward"], "cifar": ["forward", "forward_backward"], "round": ["round"]}
    ours = {c: {l: {**{p: [] for p in passes[c]}, "peak": []} for l in levels} for c in cases}
    torch = {c: {**{p: [] for p in passes[c]}, "peak": []} for c in cases}
    torch_version, torch_busy, torch_caps = None, False, set()
    torch_env = dict(os.environ)
    for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        torch_env.pop(k, None)
    torch_env.update(TORCH_ISA_ENV.get(a.torch_isa, {}))
    for r in range(a.rounds):
        for c in cases:
            for level in levels:
                env = env_without_isa()
                env["ORWCFM_CPU_ISA"] = level
                if c == "round":
                    cmd = [a.bin, "--threads", str(a.threads), "bench", "round", "--unet-config", "mnist", "--batch", str(a.round_batch),
                           "--steps", str(a.round_steps), "--iters", str(round_iters), "--warmup", "1", "--coupling", "independent", "--json"]
                else:
                    cmd = [a.bin, "--threads", str(a.threads), "bench", "unet", "--unet-config", UNET_CASES[c][0], "--batch", str(batches[c]),
                           "--iters", str(a.iters), "--json"]
                o = run_json(cmd, env)
                ran = o["device_info"].get("isa_level")
                if ran != level:
                    raise SystemExit(f"asked for {level}, ours ran at {ran}")
                for p in passes[c]:
                    ours[c][level][p].append(o[f"{p}_ms"])
                ours[c][level]["peak"].append(o["peak_memory_mb"])
            if c == "round":
                cmd = [a.torch_python, "scripts/bench_torch_cpu.py", "--threads", str(a.threads), "--round", "--round-batch", str(a.round_batch),
                       "--steps", str(a.round_steps), "--iters", str(round_iters), "--warmup-round", "1", "--json"]
            else:
                cmd = [a.torch_python, "scripts/bench_torch_cpu.py", "--threads", str(a.threads), "--only", c, UNET_CASES[c][1], str(batches[c]),
                       "--iters", str(a.iters), "--json"]
            t = run_json(cmd, torch_env)
            torch_version = t["torch"]
            torch_caps.add(t.get("cpu_capability", "?"))
            torch_busy = torch_busy or t.get("rustc_running", False)
            for p in passes[c]:
                torch[c][p].append(t[c][f"{p}_ms"])
            torch[c]["peak"].append(t["peak_rss_mb"])
            torch[c].setdefault("rss_after_import", []).append(t.get("rss_after_import_mb"))
            ours_s = ", ".join(f"{l} " + "/".join(f"{ours[c][l][p][-1]:.0f}" for p in passes[c]) + f" ms {ours[c][l]['peak'][-1]:.0f} MiB" for l in levels)
            torch_s = "/".join(f"{torch[c][p][-1]:.0f}" for p in passes[c]) + f" ms {torch[c]['peak'][-1]:.0f} MiB"
            print(f"round {r + 1} {c}: ours {ours_s}; torch {torch_s}", flush=True)
    model, flags = cpu_info()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
    summary = {"cpu": model, "cpu_flags": flags, "nproc": os.cpu_count(), "threads": a.threads, "torch": torch_version, "rounds": a.rounds,
               "iters": a.iters, "round_iters": round_iters, "round_steps": a.round_steps, "commit": commit, "dirty": dirty,
               "isa_detected": detected, "levels": levels, "torch_isa": a.torch_isa or "uncapped", "torch_isa_env": TORCH_ISA_ENV.get(a.torch_isa, {}), "torch_cpu_capability": sorted(torch_caps), "loadavg_1m_end": round(os.getloadavg()[0], 2),
               "torch_saw_rustc": torch_busy, "peak_memory": "process peak resident set, MiB (ours VmHWM, PyTorch ru_maxrss)", "results": {}}
    print(f"\n{model} ({' '.join(flags)}), {a.threads} threads, torch {torch_version} (ATen {'/'.join(sorted(torch_caps))}{', capped: ' + a.torch_isa if a.torch_isa else ''}), commit {commit}{' (dirty)' if dirty else ''}; "
          f"median over {a.rounds} rounds of per-process medians of {a.iters} ({round_iters} rounds); peak memory: largest over rounds\n")
    print("| model | batch | pass | ISA | orwcfm-fast ms | PyTorch ms | ratio | fastest-round ratio | paired ratio | ours MiB | PyTorch MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    labels = {"forward": "forward", "forward_backward": "forward+backward", "round": f"ORW-CFM-W2 round ({a.round_steps} Euler steps + 1 step)"}
    for c in cases:
        th_peak = max(torch[c]["peak"])
        for p in passes[c]:
            th = statistics.median(torch[c][p])
            for level in levels:
                o = statistics.median(ours[c][level][p])
                o_peak = max(ours[c][level]["peak"])
                # on a shared machine the load drifts between rounds: the fastest rounds of each
                # side and the median of the rounds' own ratios (ours and PyTorch run back to back)
                # are steadier than the ratio of medians
                best = min(ours[c][level][p]) / min(torch[c][p])
                paired = statistics.median(x / y for x, y in zip(ours[c][level][p], torch[c][p]))
                summary["results"][f"{c}_{p}_{level}"] = {
                    "case": c, "pass": p, "isa": level, "batch": batches[c], "ours_ms": o, "torch_ms": th, "ratio": o / th,
                    "fastest_round_ratio": best, "paired_ratio": paired,
                    "ours_peak_mb": o_peak, "torch_peak_mb": th_peak, "peak_ratio": o_peak / th_peak,
                    "ours_all": ours[c][level][p], "torch_all": torch[c][p], "ours_peak_all": ours[c][level]["peak"], "torch_peak_all": torch[c]["peak"],
                    "torch_rss_after_import_mb": torch[c].get("rss_after_import")}
                print(f"| {'mnist' if c == 'round' else c} | {batches[c]} | {labels[p]} | {level} | {o:.0f} | {th:.0f} | {o / th:.2f} | {best:.2f} | {paired:.2f} | {o_peak:.0f} | {th_peak:.0f} | {o_peak / th_peak:.2f} |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
