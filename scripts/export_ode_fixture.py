#!/usr/bin/env python3
"""Fixture for src/flow/ode.rs: final states of torchdiffeq 0.2.5's odeint on a small nonlinear
batched problem, for the fixed-grid solvers (euler, midpoint, rk4) and for dopri5.

  /work/venv/torch/bin/python scripts/export_ode_fixture.py   # writes tests/fixtures/ode_torchdiffeq.safetensors

Problem: f(t, x) = -x + sin(t) * tanh(x), x of shape [4, 3] (float32), integrated from T0 to T1.

Tensors (float32):
  x0                         initial state, [4, 3]
  <case>.<method>            final state, [4, 3]; method in euler, midpoint, rk4 (STEPS steps), dopri5
  <case>.dopri5.nfe          [1] number of f evaluations torchdiffeq made for dopri5 (counting func)
Cases: "fwd" (t 0 -> 1) and "rev" (t 1 -> 0, integrating backwards).

Grid: the fixed-grid solvers are called with t = torch.linspace(t0, t1, STEPS + 1) (and no
step_size), so torchdiffeq steps exactly on the grid t_k = t0 + k (t1 - t0) / STEPS, which is the grid
the Rust solver uses. The script also runs the `options=dict(step_size=...)` form and records in the
metadata whether its torch.arange-built grid gave the same answer (metadata "step_size_grid_matches").
dopri5 is called with t = [t0, t1], atol = rtol = TOL and the default rms norm; torchdiffeq does not clamp
its last step to t1 but evaluates its dense-output polynomial at t1. Its first step's error estimate is
f32 rounding noise (|err| ~ 1e-9), so a port whose f differs by an ulp may take a slightly different
step sequence: tests/ode.rs requires equal NFE for "fwd" and allows two step attempts for "rev".
"""
import json
import math
import os

import torch
from safetensors.torch import save_file
from torchdiffeq import odeint

STEPS = 10
TOL = 1e-5
CASES = {"fwd": (0.0, 1.0), "rev": (1.0, 0.0)}


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        return -x + torch.sin(t) * torch.tanh(x)


def main():
    torch.manual_seed(0)
    x0 = (torch.randn(4, 3) * 1.5).float()
    out = {"x0": x0.clone()}
    meta = {"steps": str(STEPS), "tol": str(TOL), "problem": "f(t,x) = -x + sin(t)*tanh(x)"}
    grid_matches = {}
    with torch.no_grad():
        for case, (t0, t1) in CASES.items():
            meta[f"{case}.t0"] = str(t0)
            meta[f"{case}.t1"] = str(t1)
            for method in ["euler", "midpoint", "rk4"]:
                f = Counting()
                tgrid = torch.linspace(t0, t1, STEPS + 1)
                y = odeint(f, x0, tgrid, method=method)[-1]
                out[f"{case}.{method}"] = y.clone()
                f2 = Counting()
                y2 = odeint(f2, x0, torch.tensor([t0, t1]), method=method,
                            options=dict(step_size=abs(t1 - t0) / STEPS))[-1]
                rel = ((y2 - y).norm() / y.norm()).item()
                grid_matches[f"{case}.{method}"] = {"rel_diff": rel, "nfe_linspace": f.nfe, "nfe_step_size": f2.nfe}
                print(f"{case}.{method}: nfe {f.nfe} (step_size form: {f2.nfe}, rel diff {rel:.3e})")
            f = Counting()
            y = odeint(f, x0, torch.tensor([t0, t1]), method="dopri5", rtol=TOL, atol=TOL)[-1]
            out[f"{case}.dopri5"] = y.clone()
            out[f"{case}.dopri5.nfe"] = torch.tensor([float(f.nfe)])
            print(f"{case}.dopri5: nfe {f.nfe}")
    meta["step_size_grid_matches"] = json.dumps(grid_matches)
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ode_torchdiffeq.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print("wrote", os.path.normpath(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
