#!/usr/bin/env python3
"""The bookkeeping of scripts/gpu-check.sh (standard library only; it must never fail).

  gpu_check_summary.py step STEPS NAME RC SECONDS TIMEOUT_S [RESULT_JSON]
      after a step ended: writes STEPS/NAME.json from STEPS/NAME.out and NAME.err (the exit
      status, the time, the last JSON line of its output or the RESULT_JSON file it wrote, the
      tests it ran, the tail of its stderr)
  gpu_check_summary.py skip STEPS NAME REASON
      a step that did not run
  gpu_check_summary.py summary STEPS OUT_DIR
      (re)writes OUT_DIR/<date>-<device>.json from every STEPS/*.json; prints its path

The summary's schema (a measurement that is missing is null, with the reason under "missing"):

  {"device", "driver", "commit", "command", "date", "dry_run", "budget_s", "elapsed_s",
   "tests": {"<binary>::<test>": "ok" | "FAILED"},
   "unet_cifar_b128": {"ours": {"f32"|"bf16"|"f16": {"forward_ms", "forward_backward_ms"}},
                       "pytorch": {"f32"|"tf32"|"amp_bf16"|"amp_f16"|"compile_bf16": {...}}},
   "sampling_cifar_b128_euler100": {"ours_img_s": {...}, "pytorch_img_s": {...}},
   "orw_round_cifar_b128": {"ours_ms": {...}, "pytorch_ms": {...}},
   "copy_gb_s", "gemm_tflop_s": {dtype: rate},
   "kernels": [{"name", "dtype", "shape", "ms", "gb_s", "tflop_s", "bound", "fraction_of_ceiling"}],
   "peak_memory_mb": {"ours": {"unet"|"sampling"|"round": {precision: MiB}},
                      "pytorch": {"unet"|"sampling"|"round": {mode: MiB}}, "counts": "..."},
   "libraries": {"ours": [...], "pytorch": [...], "duplicates": {...}},
   "targets": {name: {"value", "target", "met", "how"}},
   "steps": {name: {"status": "ok"|"failed"|"timeout"|"skipped", "rc", "seconds", "timeout_s", "reason"}},
   "missing": {"path.in.this.json": "reason"}}
"""
import datetime
import glob
import json
import os
import re
import sys

OURS_P = ["bf16", "f32", "f16"]
TORCH_MODES = ["f32", "tf32", "amp_bf16", "amp_f16", "compile_bf16"]
# the forward FLOP of torchcfm's CIFAR-10 U-Net per image (issue 11): the tensor-core bound
FORWARD_GFLOP_PER_IMAGE = 12.44


def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def tests_of(text):
    """`test name ... ok|FAILED|ignored` lines of a Rust test binary."""
    out = {}
    for m in re.finditer(r"^test (\S+) \.\.\. (ok|FAILED|ignored)", text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def cmd_step(steps, name, rc, secs, tmo, result=None):
    rc, secs, tmo = int(rc), float(secs), int(tmo)
    out, err = read(os.path.join(steps, name + ".out")), read(os.path.join(steps, name + ".err"))
    status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
    j = None
    if result:
        try:
            j = json.loads(read(result, "null"))
        except ValueError:
            j = None
    if j is None:
        j = last_json(out)
    err_lines = [l for l in err.splitlines() if l.strip()]
    reason = None
    if status == "timeout":
        reason = f"killed at its {tmo} s limit"
    elif status == "failed":
        errs = [l for l in err_lines if "error" in l.lower() or "FAILED" in l]
        if not errs:
            # a Rust test binary: the first failing test's panic message (printed on stdout)
            lines = out.splitlines()
            at = next((i for i, l in enumerate(lines) if "panicked at" in l), None)
            if at is not None and at + 1 < len(lines):
                errs = [f"{lines[at].strip()} {lines[at + 1].strip()}"]
        reason = (errs[-1] if errs else (err_lines[-1] if err_lines else f"exit status {rc}"))[:400]
    rec = {"name": name, "status": status, "rc": rc, "seconds": round(secs, 2), "timeout_s": tmo, "reason": reason,
           "json": j, "tests": tests_of(out), "stderr_tail": err_lines[-25:]}
    with open(os.path.join(steps, name + ".json"), "w") as f:
        json.dump(rec, f, indent=1)


def cmd_skip(steps, name, reason):
    rec = {"name": name, "status": "skipped", "rc": None, "seconds": 0, "timeout_s": 0, "reason": reason, "json": None, "tests": {}, "stderr_tail": []}
    with open(os.path.join(steps, name + ".json"), "w") as f:
        json.dump(rec, f, indent=1)


def slug(s):
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "unknown"


def cmd_summary(steps, out_dir):
    recs = {}
    for p in sorted(glob.glob(os.path.join(steps, "*.json"))):
        try:
            r = json.loads(read(p, "null"))
        except ValueError:
            continue
        if isinstance(r, dict) and "status" in r:
            recs[r["name"]] = r
    env = os.environ.get
    missing = {}

    def why(step):
        r = recs.get(step)
        if r is None:
            return f"step {step} did not run (the check stopped before it)"
        if r["status"] == "ok":
            return f"step {step} printed no such value"
        return f"step {step} {r['status']}" + (f": {r['reason']}" if r.get("reason") else "")

    def val(step, *keys):
        r = recs.get(step)
        j = r.get("json") if r else None
        for k in keys:
            if not isinstance(j, dict):
                return None
            j = j.get(k)
        return j

    def put(path, value, step):
        if value is None:
            missing[path] = why(step)
        return value

    # tests
    tests = {}
    for name, r in recs.items():
        if not name.startswith("test_"):
            continue
        label = name[len("test_"):]
        if r["tests"]:
            for t, res in r["tests"].items():
                if res != "ignored":
                    tests[f"{label}::{t}"] = "ok" if res == "ok" else "FAILED"
        if r["status"] != "ok" and not any(v == "FAILED" for k, v in tests.items() if k.startswith(label + "::")):
            tests[label] = "FAILED"
            missing[f"tests.{label}"] = why(name)
    # ours
    unet_ours, samp_ours, round_ours = {}, {}, {}
    peak_ours = {"unet": {}, "sampling": {}, "round": {}}
    for p in OURS_P:
        s = f"ours_unet_{p}"
        fm, fb = val(s, "forward_ms"), val(s, "forward_backward_ms")
        unet_ours[p] = {"forward_ms": fm, "forward_backward_ms": fb} if fm is not None else put(f"unet_cifar_b128.ours.{p}", None, s)
        peak_ours["unet"][p] = val(s, "peak_memory_mb")
        s = f"ours_sample_{p}"
        samp_ours[p] = put(f"sampling_cifar_b128_euler100.ours_img_s.{p}", val(s, "img_s"), s)
        peak_ours["sampling"][p] = val(s, "peak_memory_mb")
        s = f"ours_round_{p}"
        round_ours[p] = put(f"orw_round_cifar_b128.ours_ms.{p}", val(s, "round_ms"), s)
        peak_ours["round"][p] = val(s, "peak_memory_mb")
    # PyTorch: the eager modes and the compiled one come from two steps
    torch_modes, torch_step, torch_json = {}, {}, {}
    for s in ("torch_eager", "torch_compile"):
        j = recs[s]["json"] if s in recs else None
        if isinstance(j, dict):
            torch_json[s] = j
            for m, v in (j.get("modes") or {}).items():
                torch_modes[m] = v
                torch_step[m] = s
    unet_pt, samp_pt, round_pt = {}, {}, {}
    peak_pt = {"unet": {}, "sampling": {}, "round": {}}
    peak_pt_alloc = {"unet": {}, "sampling": {}, "round": {}}
    for m in TORCH_MODES:
        step = torch_step.get(m, "torch_compile" if m.startswith("compile") else "torch_eager")
        v = torch_modes.get(m) or {}
        err = v.get("error")
        def tput(path, x):
            if x is None:
                missing[path] = f"{m}: {err}" if err else why(step) if step not in recs or recs[step]["status"] != "ok" else f"{step} did not measure it"
            return x
        fm, fb = v.get("forward_ms"), v.get("forward_backward_ms")
        unet_pt[m] = {"forward_ms": fm, "forward_backward_ms": fb} if fm is not None else tput(f"unet_cifar_b128.pytorch.{m}", None)
        if v.get("compile_s"):
            unet_pt[m]["compile_s"] = v["compile_s"]
        samp_pt[m] = tput(f"sampling_cifar_b128_euler100.pytorch_img_s.{m}", v.get("sample_img_s"))
        round_pt[m] = tput(f"orw_round_cifar_b128.pytorch_ms.{m}", v.get("round_ms"))
        for sec in ("unet", "sampling", "round"):
            peak_pt[sec][m] = (v.get("peak_reserved_mb") or {}).get(sec)
            peak_pt_alloc[sec][m] = (v.get("peak_memory_mb") or {}).get(sec)
    # kernels
    kj = val("ours_kernels") or {}
    kernels = [{k: e.get(k) for k in ("name", "dtype", "shape", "ms", "gb_s", "tflop_s", "bound", "fraction_of_ceiling")} for e in kj.get("kernels", [])]
    if not kernels:
        missing["kernels"] = why("ours_kernels")
    copy_gb_s = put("copy_gb_s", kj.get("copy_gb_s"), "ours_kernels")
    gemm = kj.get("gemm_tflop_s") or None
    if gemm is None:
        missing["gemm_tflop_s"] = why("ours_kernels")
    # libraries
    ours_libs = val("devices", "libraries")
    if ours_libs is None:
        for s in recs:
            if s.startswith("ours_") and isinstance(val(s, "libraries"), list):
                ours_libs = val(s, "libraries")
                break
    pt_libs = next((j.get("libraries") for j in torch_json.values() if j.get("libraries") is not None), None)

    def dups(libs):
        by = {}
        for p in libs or []:
            by.setdefault(os.path.basename(p).split(".so")[0], []).append(p)
        return {k: v for k, v in by.items() if len(v) > 1}

    libraries = {"ours": ours_libs, "pytorch": pt_libs, "duplicates": {"ours": dups(ours_libs), "pytorch": dups(pt_libs)}}
    if ours_libs is None:
        missing["libraries.ours"] = why("devices")
    if pt_libs is None:
        missing["libraries.pytorch"] = why("torch_eager")

    # the targets
    def best(d, keys, hi=True):
        xs = [(d.get(k), k) for k in keys if isinstance(d.get(k), (int, float))]
        if not xs:
            return None, None
        return (max if hi else min)(xs)

    targets = {}

    def target(name, value, goal, how, higher=True):
        met = None if value is None else (value >= goal if higher else value <= goal)
        targets[name] = {"value": value, "target": goal, "met": met, "how": how}

    o, ok_ = best(samp_ours, ["bf16", "f16"])
    t, tk = best(samp_pt, ["amp_bf16", "amp_f16"])
    target("sampling_vs_pytorch_amp_eager", o / t if o and t else None, 2.0, f"our best half-precision img/s ({ok_}) over PyTorch's best AMP eager ({tk})")
    c = samp_pt.get("compile_bf16")
    target("sampling_vs_torch_compile", o / c if o and c else None, 1.2, f"our best half-precision img/s ({ok_}) over torch.compile bf16")
    o, ok_ = best(round_ours, ["bf16", "f16"], hi=False)
    t, tk = best(round_pt, ["amp_bf16", "amp_f16"], hi=False)
    target("round_vs_pytorch_amp_eager", t / o if o and t else None, 1.5, f"PyTorch's best AMP eager round ms ({tk}) over ours ({ok_})")
    mem = [k for k in kernels if k.get("bound") == "memory" and isinstance(k.get("fraction_of_ceiling"), (int, float))]
    worst = min(mem, key=lambda k: k["fraction_of_ceiling"]) if mem else None
    target("memory_bound_kernels_fraction_of_copy", worst["fraction_of_ceiling"] if worst else None, 0.7,
           f"the lowest fraction of the copy bandwidth among memory-bound kernels ({worst['name']} {worst['dtype']} {worst['shape']})" if worst else "no memory-bound kernel measured")
    rate = (gemm or {}).get("bf16")
    fwd = (unet_ours.get("bf16") or {}).get("forward_ms") if isinstance(unet_ours.get("bf16"), dict) else None
    bound_ms = FORWARD_GFLOP_PER_IMAGE * 128 / (rate * 1e3) if rate else None
    target("forward_over_tensor_core_bound", fwd / bound_ms if fwd and bound_ms else None, 2.0,
           f"our bf16 forward ms over {FORWARD_GFLOP_PER_IMAGE} GFLOP x 128 at the measured bf16 GEMM rate" + (f" ({bound_ms:.2f} ms)" if bound_ms else ""), higher=False)
    om = peak_ours["round"].get("bf16")
    pm = peak_pt["round"].get("amp_bf16")
    target("peak_memory_round_ours_over_pytorch", om / pm if om and pm else None, 1.0,
           "our bf16 round's peak reserved MiB over PyTorch amp_bf16's peak reserved MiB", higher=False)

    steps_out = {n: {k: r.get(k) for k in ("status", "rc", "seconds", "timeout_s", "reason")} for n, r in recs.items()}
    device = env("GC_DEVICE") or "unknown"
    now = datetime.datetime.now(datetime.timezone.utc)
    start = float(env("GC_START") or now.timestamp())
    res = {
        "device": device, "driver": env("GC_DRIVER") or None, "commit": env("GC_COMMIT") or None, "command": env("GC_COMMAND") or None,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "dry_run": env("GC_DRY") == "1", "budget_s": int(env("GC_BUDGET") or 0),
        "elapsed_s": round(now.timestamp() - start, 1), "lib_dirs": env("ORWCFM_CUDA_LIB_DIRS"),
        "pytorch_version": next((j.get("torch") for j in torch_json.values()), None),
        "torchcfm": next((f"{j.get('torchcfm')} ({j.get('torchcfm_import')})" for j in torch_json.values() if j.get("torchcfm_import")), None),
        "params": next((j.get("params") for j in torch_json.values() if j.get("params")), None),
        "tests": tests,
        "unet_cifar_b128": {"ours": unet_ours, "pytorch": unet_pt},
        "sampling_cifar_b128_euler100": {"ours_img_s": samp_ours, "pytorch_img_s": samp_pt},
        "orw_round_cifar_b128": {"ours_ms": round_ours, "pytorch_ms": round_pt},
        "copy_gb_s": copy_gb_s, "gemm_tflop_s": gemm, "kernels": kernels,
        "peak_memory_mb": {"ours": peak_ours, "pytorch": peak_pt, "pytorch_allocated": peak_pt_alloc,
                           "counts": "ours: the CUDA pool's peak bytes reserved from the driver; pytorch: torch.cuda.max_memory_reserved (pytorch_allocated: max_memory_allocated)"},
        "libraries": libraries,
        "targets": targets,
        "steps": steps_out,
        "missing": missing,
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{now.strftime('%Y-%m-%d')}-{slug(device)}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)
    print(path)


def main():
    a = sys.argv[1:]
    try:
        if a and a[0] == "step":
            cmd_step(*a[1:6], result=a[6] if len(a) > 6 else None)
        elif a and a[0] == "skip":
            cmd_skip(a[1], a[2], " ".join(a[3:]))
        elif a and a[0] == "summary":
            cmd_summary(a[1], a[2])
        else:
            print(__doc__, file=sys.stderr)
            sys.exit(2)
    except Exception as e:  # the bookkeeping must not stop the check
        print(f"gpu_check_summary: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
