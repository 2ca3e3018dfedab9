#!/usr/bin/env python3
"""Fixture for src/optim: a few steps of torch.optim.Adam with torchcfm's LambdaLR warm-up,
clip_grad_norm_ and torchcfm's EMA, on fixed parameters and gradients.

  /path/to/venv/bin/python scripts/export_optim_fixture.py   # writes tests/fixtures/optim_adam.safetensors

Tensors: param.<i> (initial), grad.<step>.<i> (the raw gradient fed at that step), after.<step>.<i>
(parameters after the step), ema.<step>.<i>, norm.<step> (clip_grad_norm_'s return), lr.<step>
(the rate used by that step). Two runs: prefix "a." (weight_decay 0) and "b." (weight_decay 0.01,
betas (0.8, 0.99), eps 1e-6).
"""
import torch
from safetensors.torch import save_file

torch.manual_seed(0)
SHAPES = [(7, 5), (5,), (3, 4, 2)]
STEPS, WARMUP, BASE_LR, CLIP, DECAY = 6, 3, 0.05, 1.0, 0.9


def run(prefix, out, **adam_kw):
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for i, p in enumerate(params):
        out[f"{prefix}param.{i}"] = p.detach().clone()
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=BASE_LR, **adam_kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda step: min(step, WARMUP) / WARMUP)
    for step in range(STEPS):
        # gradients of varying size so that clipping is active on some steps and not on others
        scale = [0.05, 3.0, 0.2, 5.0, 0.1, 2.0][step]
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p) * scale
            out[f"{prefix}grad.{step}.{i}"] = p.grad.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        out[f"{prefix}norm.{step}"] = norm.reshape(1).detach().clone()
        out[f"{prefix}lr.{step}"] = torch.tensor([opt.param_groups[0]["lr"]])
        opt.step()
        sched.step()
        for i, (e, p) in enumerate(zip(ema, params)):
            e.copy_(e * DECAY + p.detach() * (1 - DECAY))
            out[f"{prefix}after.{step}.{i}"] = p.detach().clone()
            out[f"{prefix}ema.{step}.{i}"] = e.clone()


out = {}
run("a.", out)
run("b.", out, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)
save_file({k: v.contiguous().float() for k, v in out.items()}, "tests/fixtures/optim_adam.safetensors",
          metadata={"steps": str(STEPS), "warmup": str(WARMUP), "base_lr": str(BASE_LR), "clip": str(CLIP),
                    "ema_decay": str(DECAY), "torch_version": torch.__version__})
print("wrote tests/fixtures/optim_adam.safetensors", len(out), "tensors")
