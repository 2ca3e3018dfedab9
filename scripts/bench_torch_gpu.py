#!/usr/bin/env python3
"""PyTorch's numbers for the GPU comparison: torchcfm's own UNetModelWrapper (the CIFAR-10 recipe,
35.7 M parameters, the same model as `orwcfm-fast --unet-config cifar10`), batch 128, per mode:

  f32           eager, TF32 off (matmul and cuDNN)
  tf32          eager, TF32 on
  amp_bf16      eager under torch.autocast(bfloat16)
  amp_f16       eager under torch.autocast(float16), GradScaler for the gradient steps
  compile_bf16  torch.compile(model) (default mode) under autocast(bfloat16); compile time is
                reported apart (compile_s) and the timings are taken after warm-up

and in each mode:

  forward_ms           eval mode, no_grad, model(t, x)
  forward_backward_ms  train mode, mse(model(t, x), target).backward()
  sample_ms/img_s      --steps Euler steps of --batch samples from N(0, I), no_grad, eval mode,
                       the samples copied to the host (what a training round does)
  round_ms             one ORW-CFM-W2 round: sample --batch by --steps Euler steps from the policy
                       (no_grad), reward = mean pixel, w = exp(tau r), independent coupling
                       (x0 ~ N(0, I), t ~ U[0, 1)), loss = mean_i w_i mean (v - u)^2
                       + alpha mean (v - v_ref)^2 (v_ref from the frozen reference, no_grad),
                       backward, clip_grad_norm_(1.0), Adam(lr 2e-4), the loss read on the host:
                       `orwcfm-fast bench round --coupling independent`
  peak_memory_mb       torch.cuda.max_memory_allocated per section; peak_reserved_mb:
                       max_memory_reserved (comparable to our pool's peak reserved bytes)

Timing: CUDA events around each call (perf_counter on the CPU), after --warmup calls; medians.
The JSON (--out) is rewritten after every section of every mode, so a timeout or a crash loses
nothing that finished. It also records torch's version, the device and the NVIDIA libraries this
process really mapped (/proc/self/maps).

  python3 scripts/bench_torch_gpu.py --out torch.json                       # the GPU run
  python3 scripts/bench_torch_gpu.py --device cpu --config mnist-small --batch 2 --steps 2 \\
      --iters 1 --warmup 0 --modes f32,amp_bf16 --out /tmp/t.json           # a smoke test

torchcfm: its package __init__ imports POT (`ot`) for the OT matchers; where POT is missing the
U-Net module is imported without running that __init__ (a namespace stand-in for the package),
and the JSON says so (`torchcfm_import`).
"""
import argparse
import copy
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

CONFIGS = {
    # torchcfm's examples/images/cifar10/train_cifar10.py, as src/nn/config.rs' cifar10
    "cifar10": dict(dim=(3, 32, 32), num_channels=128, num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=4,
                    num_head_channels=64, attention_resolutions="16", dropout=0.1),
    "mnist": dict(dim=(1, 28, 28), num_channels=32, num_res_blocks=1),
    "mnist-small": dict(dim=(1, 28, 28), num_channels=32, num_res_blocks=1, attention_resolutions="7"),
}
MODES = ["amp_bf16", "amp_f16", "f32", "tf32", "compile_bf16"]
NVIDIA_LIBS = ("libcuda.so", "libcudart", "libcublasLt", "libcublas.so", "libcudnn", "libnvrtc", "libnvJitLink", "libcurand")


def import_unet():
    """torchcfm's UNetModelWrapper, and how it was imported."""
    try:
        from torchcfm.models.unet.unet import UNetModelWrapper
        return UNetModelWrapper, "package"
    except Exception as e:  # ImportError, or a POT built for another numpy
        reason = repr(e)
    for k in [k for k in sys.modules if k == "torchcfm" or k.startswith("torchcfm.")]:
        del sys.modules[k]
    spec = importlib.util.find_spec("torchcfm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"torchcfm is not installed ({reason})")
    # the package without its __init__ (which imports POT for the OT matchers)
    pkg = types.ModuleType("torchcfm")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["torchcfm"] = pkg
    mod = importlib.import_module("torchcfm.models.unet.unet")
    return mod.UNetModelWrapper, f"stub package ({reason})"


def libraries():
    """The distinct NVIDIA shared libraries mapped into this process."""
    out = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and os.path.basename(parts[5]).startswith(NVIDIA_LIBS):
                    out.add(parts[5])
    except OSError:
        pass
    return sorted(out)


def duplicates(libs):
    by = {}
    for p in libs:
        by.setdefault(os.path.basename(p).split(".so")[0], []).append(p)
    return {k: v for k, v in by.items() if len(v) > 1}


class Runner:
    def __init__(self, a):
        self.a = a
        self.dev = torch.device(a.device)
        self.cuda = self.dev.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, warmup, iters):
        """Median ms of `fn` after `warmup` calls, and all the times; no further call is timed
        once --max-seconds have passed (warm-up included), at least one is."""
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(iters):
            if ts and time.perf_counter() - start >= self.a.max_seconds:
                break
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts), ts

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        if not self.cuda:
            return None, None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def run_mode(r, mode, Unet, cfg, base_state, res, save):
    a, dev = r.a, r.dev
    set_tf32(mode == "tf32")
    amp = {"amp_bf16": torch.bfloat16, "compile_bf16": torch.bfloat16, "amp_f16": torch.float16}.get(mode)
    compiled = mode.startswith("compile")

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=amp, enabled=amp is not None)

    def new_model():
        m = Unet(**cfg).to(dev)
        m.load_state_dict(base_state)
        return m

    def maybe_compile(m):
        return torch.compile(m) if compiled else m

    B, (C, H, W) = a.batch, cfg["dim"]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, C, H, W, device=dev, generator=g)
    t = torch.rand(B, device=dev, generator=g)
    target = torch.randn(B, C, H, W, device=dev, generator=g)
    out = res["modes"].setdefault(mode, {})
    peaks, reserved = out.setdefault("peak_memory_mb", {}), out.setdefault("peak_reserved_mb", {})

    # forward and forward+backward
    r.reset_peak()
    net = new_model()
    fnet = maybe_compile(net)

    def fwd():
        with torch.no_grad(), autocast():
            fnet(t, x)

    net.eval()
    t0 = time.perf_counter()
    fwd()
    r.sync()
    first_fwd_s = time.perf_counter() - t0
    out["forward_ms"], out["forward_ms_all"] = r.time(fwd, a.warmup, a.iters)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)

    def fwd_bwd():
        net.zero_grad(set_to_none=True)
        with autocast():
            v = fnet(t, x)
        loss = F.mse_loss(v.float(), target)
        scaler.scale(loss).backward()

    net.train()
    t0 = time.perf_counter()
    fwd_bwd()
    r.sync()
    first_fb_s = time.perf_counter() - t0
    out["forward_backward_ms"], out["forward_backward_ms_all"] = r.time(fwd_bwd, a.warmup, a.iters)
    peaks["unet"], reserved["unet"] = r.peak()
    if compiled:
        out["compile_s"] = {"forward_first_call": first_fwd_s, "forward_backward_first_call": first_fb_s}
    save()
    del net, fnet
    net = None

    # sampling: the policy, eval mode, no_grad
    r.reset_peak()
    policy = new_model().eval()
    fpolicy = maybe_compile(policy)
    dt = 1.0 / a.steps

    def sample():
        with torch.no_grad():
            xs = torch.randn(B, C, H, W, device=dev)
            for i in range(a.steps):
                tt = torch.full((B,), i * dt, device=dev)
                with autocast():
                    v = fpolicy(tt, xs)
                xs = xs + dt * v.float()
            return xs

    def sample_to_host():
        sample().cpu()

    out["sample_ms"], out["sample_ms_all"] = r.time(sample_to_host, max(a.warmup, 1) if compiled else a.warmup, a.sample_iters)
    out["sample_img_s"] = B / (out["sample_ms"] / 1e3)
    peaks["sampling"], reserved["sampling"] = r.peak()
    save()

    # one ORW-CFM-W2 round: policy, trained net, frozen reference
    r.reset_peak()
    net = new_model().train()
    ref = new_model().eval()
    fnet, fref = maybe_compile(net), maybe_compile(ref)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)
    tau, alpha = a.temperature, a.alpha

    def one_round():
        x1 = sample()
        with torch.no_grad():
            rwd = x1.mean(dim=(1, 2, 3))
            w = torch.exp(tau * rwd)
        x0 = torch.randn_like(x1)
        tt = torch.rand(B, device=dev)
        tb = tt.view(B, 1, 1, 1)
        xt = tb * x1 + (1 - tb) * x0
        ut = x1 - x0
        opt.zero_grad(set_to_none=True)
        with autocast():
            v = fnet(tt, xt)
        with torch.no_grad(), autocast():
            vref = fref(tt, xt)
        v = v.float()
        fm = (w * ((v - ut) ** 2).mean(dim=(1, 2, 3))).mean()
        w2 = ((v - vref.float()) ** 2).mean()
        loss = fm + alpha * w2
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        loss.item()

    out["round_ms"], out["round_ms_all"] = r.time(one_round, max(a.warmup, 1) if compiled else a.warmup, a.round_iters)
    peaks["round"], reserved["round"] = r.peak()
    out["ok"] = True
    save()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file, rewritten after every section")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="cifar10", choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100, help="Euler steps of the sampling")
    ap.add_argument("--iters", type=int, default=10, help="timed forward and forward+backward calls")
    ap.add_argument("--sample-iters", type=int, default=3)
    ap.add_argument("--round-iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="per timed loop: no further call after this")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=1.0)
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad} (known: {MODES})")

    res = {"command": " ".join(sys.argv), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python": sys.version.split()[0], "config_name": a.config, "config": CONFIGS[a.config],
           "batch": a.batch, "steps": a.steps, "iters": a.iters, "sample_iters": a.sample_iters,
           "round_iters": a.round_iters, "warmup": a.warmup, "modes_asked": modes, "modes": {},
           "complete": False}

    def save():
        res["libraries"] = libraries()
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)

    try:
        Unet, how = import_unet()
        res["torchcfm_import"] = how
        try:
            from importlib.metadata import version
            res["torchcfm"] = version("torchcfm")
        except Exception:
            res["torchcfm"] = None
        cfg = CONFIGS[a.config]
        torch.manual_seed(0)
        base = Unet(**cfg)
        res["params"] = sum(p.numel() for p in base.parameters())
        base_state = copy.deepcopy(base.state_dict())
        del base
        r = Runner(a)
        if r.cuda:
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device")
            res["device"] = torch.cuda.get_device_name(0)
            res["capability"] = list(torch.cuda.get_device_capability(0))
        else:
            res["device"] = "cpu"
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        save()
        print(f"error: {res['error']}", file=sys.stderr)
        sys.exit(1)
    save()
    print(f"torch {torch.__version__} on {res['device']}, torchcfm {res['torchcfm']} ({how}), {res['params']} parameters", flush=True)
    failed = False
    for mode in modes:
        t0 = time.perf_counter()
        try:
            run_mode(r, mode, Unet, cfg, base_state, res, save)
        except Exception as e:
            failed = True
            res["modes"].setdefault(mode, {})["error"] = f"{type(e).__name__}: {e}"
            print(f"{mode}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        res["modes"][mode]["seconds"] = time.perf_counter() - t0
        save()
        m = res["modes"][mode]
        f = lambda k: f"{m[k]:.2f}" if isinstance(m.get(k), (int, float)) else "-"
        print(f"{mode:13s} forward {f('forward_ms')} ms, fwd+bwd {f('forward_backward_ms')} ms, "
              f"sampling {f('sample_img_s')} img/s, round {f('round_ms')} ms ({m['seconds']:.0f} s)", flush=True)
        if r.cuda:
            torch.cuda.empty_cache()
    res["complete"] = True
    dup = duplicates(res["libraries"] if "libraries" in res else libraries())
    if dup:
        res["duplicate_libraries"] = dup
        print(f"warning: libraries mapped twice: {dup}", file=sys.stderr)
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "modes"}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
