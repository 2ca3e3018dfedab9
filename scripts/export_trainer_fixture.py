#!/usr/bin/env python3
"""Fixture for one ORW-CFM-W2 gradient step (src/orw): torchcfm U-Net, fixed x0, x1, t, rewards.

  /path/to/venv/bin/python scripts/export_trainer_fixture.py   # writes tests/fixtures/orw_step.safetensors

Models: `net` = ema_model and `ref` = net_model of tests/fixtures/tiny_ckpt.pt (two different
torchcfm U-Nets of the `tiny` config). Step: I-CFM with sigma 0 (x_t = t x1 + (1-t) x0,
u_t = x1 - x0), w = exp(tau * r), loss = mean_i[w_i mean_pix (v - u)^2] + alpha mean_i[mean_pix (v - v_ref)^2]
with v_ref under no_grad, backward, clip_grad_norm_(1.0), Adam(lr 1e-3) step.
Stored: inputs, loss terms, the gradient norm before clipping (grad_norm), and for every parameter
the gradient after clipping (what Adam sees) and the updated value as an evenly
strided sample of <= 256 elements (grad.sample.<k>, after.sample.<k>) plus full norms
(grad.norm.<k>, after.norm.<k>) to keep the file small.
"""
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchcfm.models.unet.unet import UNetModelWrapper

torch.manual_seed(0)
with safe_open("tests/fixtures/unet_tiny.safetensors", "pt") as f:
    cfg = json.loads(f.metadata()["unet_config"])
cfg["dim"] = tuple(cfg["dim"])
ck = torch.load("tests/fixtures/tiny_ckpt.pt", map_location="cpu", weights_only=True)
net, ref = UNetModelWrapper(**cfg), UNetModelWrapper(**cfg)
net.load_state_dict(ck["ema_model"])
ref.load_state_dict(ck["net_model"])
net.train()  # dropout is 0 in this config, so train/eval only differ in nothing
ref.eval()

B = 4
x0, x1 = torch.randn(B, *cfg["dim"]), torch.randn(B, *cfg["dim"])
t = torch.tensor([0.1, 0.4, 0.6, 0.95])
r = torch.tensor([0.3, -1.2, 0.8, 0.05])
tau, alpha, clip, lr = 2.0, 0.7, 1.0, 1e-3
xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
ut = x1 - x0
w = torch.exp(tau * r)
v = net(t, xt)
with torch.no_grad():
    v_ref = ref(t, xt)
fm = (w * ((v - ut) ** 2).mean(dim=(1, 2, 3))).mean()
w2 = ((v - v_ref) ** 2).mean(dim=(1, 2, 3)).mean()
loss = fm + alpha * w2
loss.backward()
norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
opt = torch.optim.Adam(net.parameters(), lr=lr)
grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
opt.step()

out = {"x0": x0, "x1": x1, "t": t, "r": r, "w": w, "loss": loss.reshape(1).detach(), "fm": fm.reshape(1).detach(),
       "w2": w2.reshape(1).detach(), "grad_norm": norm.reshape(1).detach()}
for k, p in net.named_parameters():
    n = p.numel()
    stride = -(-n // 256)
    out[f"grad.sample.{k}"] = grads[k].flatten()[::stride]
    out[f"grad.norm.{k}"] = grads[k].norm().reshape(1)
    out[f"after.sample.{k}"] = p.detach().flatten()[::stride]
    out[f"after.norm.{k}"] = p.detach().norm().reshape(1)
meta = {"tau": str(tau), "alpha": str(alpha), "clip": str(clip), "lr": str(lr), "unet_config": json.dumps({**cfg, "dim": list(cfg["dim"])}),
        "net": "tiny_ckpt.pt ema_model", "ref": "tiny_ckpt.pt net_model", "torch_version": torch.__version__}
save_file({k: v.contiguous().float() for k, v in out.items()}, "tests/fixtures/orw_step.safetensors", metadata=meta)
print(f"loss {loss.item():.6f} fm {fm.item():.6f} w2 {w2.item():.6f} grad_norm {norm.item():.4f}")
