#!/usr/bin/env python3
"""Fixture for src/flow/matchers.rs: x_t and u_t of every torchcfm 1.0.7 matcher for fixed
x0, x1, t and noise (the matchers' own sample_xt and compute_conditional_flow).

  /path/to/venv/bin/python scripts/export_matcher_fixture.py   # writes tests/fixtures/flow_matchers.safetensors
"""
import torch
from safetensors.torch import save_file
from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher,
                                                SchrodingerBridgeConditionalFlowMatcher, TargetConditionalFlowMatcher,
                                                VariancePreservingConditionalFlowMatcher)

torch.manual_seed(0)
x0, x1, eps = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
t = torch.tensor([0.03, 0.25, 0.5, 0.77, 0.98])
out = {"x0": x0, "x1": x1, "eps": eps, "t": t}
for name, m in [("icfm", ConditionalFlowMatcher(sigma=0.1)), ("otcfm", ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)),
                ("fm", TargetConditionalFlowMatcher(sigma=0.05)), ("sbcfm", SchrodingerBridgeConditionalFlowMatcher(sigma=0.5)),
                ("si", VariancePreservingConditionalFlowMatcher(sigma=0.2))]:
    xt = m.sample_xt(x0, x1, t, eps)
    out[f"{name}.xt"] = xt
    out[f"{name}.ut"] = m.compute_conditional_flow(x0, x1, t, xt)
    out[f"{name}.sigma"] = torch.tensor([float(m.sigma)])
# the exact OT plan's cost for a pairing test: POT's emd on the flattened batches
import ot as pot
import numpy as np
a, b = x0.reshape(5, -1).double().numpy(), x1.reshape(5, -1).double().numpy()
M = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
plan = pot.emd(pot.unif(5), pot.unif(5), M)
out["ot.cost"] = torch.tensor([float((plan * M).sum() * 5)])
save_file({k: v.contiguous().float() for k, v in out.items()}, "tests/fixtures/flow_matchers.safetensors")
print("wrote tests/fixtures/flow_matchers.safetensors")
