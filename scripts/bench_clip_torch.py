#!/usr/bin/env python3
"""The CLIP reward in PyTorch + transformers, timed as `orwcfm-fast bench clip` times ours.

Run: <venv with torch, transformers>/bin/python scripts/bench_clip_torch.py [--batch 128]
     [--image 32] [--threads 2] [--iters 3] [--device cpu|cuda] [--dtype f32|f16|bf16]

A random CLIPModel of OpenAI's ViT-B/32 architecture (the same shapes as `--arch vit-b-32`);
per batch: images in [-1, 1] to [0, 1], bicubic resize to 224 (torch's antialiased bicubic, the
GPU-friendly stand-in for the processor's PIL resize), CLIP's mean/std, get_image_features, the
cosine with the two prompts' embeddings (computed once), logit scale, softmax, p0 − p1. Prints a
JSON line last: {"ms": median ms per batch, "ms_per_image", "torch", "threads", "peak_memory_mb"
(the process's ru_maxrss), ...}.
"""
import argparse
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    cfg = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32),
        projection_dim=512,
    )
    torch.manual_seed(0)
    m = CLIPModel(cfg).eval().to(a.device, dt)
    ids = torch.tensor([[49406, 550, 2867, 539, 1929, 49407, 49407], [49406, 783, 550, 2867, 539, 1929, 49407]], device=a.device)
    mean = torch.tensor(MEAN, device=a.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=a.device).view(1, 3, 1, 1)
    with torch.no_grad():
        txt = m.get_text_features(input_ids=ids)
        txt = getattr(txt, "pooler_output", txt)
        txt = F.normalize(txt.float(), dim=-1)
    x = torch.rand(a.batch, 3, a.image, a.image, device=a.device) * 2 - 1

    def reward():
        with torch.no_grad():
            p = ((x + 1) / 2).clamp(0, 1)
            p = F.interpolate(p, size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            p = ((p - mean) / std).to(dt)
            img = m.get_image_features(pixel_values=p)
            img = getattr(img, "pooler_output", img)
            img = F.normalize(img.float(), dim=-1)
            logits = m.logit_scale.exp().float() * img @ txt.T
            pr = logits.softmax(-1)
            r = (pr[:, 0] - pr[:, 1]).cpu()
        return r

    for _ in range(a.warmup):
        reward()
    ms = []
    for _ in range(a.iters):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        reward()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        ms.append((time.perf_counter() - t) * 1e3)
    med = statistics.median(ms)
    print(f"PyTorch {torch.__version__} CLIP reward ViT-B/32 (random weights): {a.batch} images {a.image}x{a.image} -> 224, {a.device} {a.dtype}, {a.threads} threads: {med:.1f} ms per batch ({med / a.batch:.2f} ms per image)")
    print(json.dumps({"ms": med, "ms_all": ms, "ms_per_image": med / a.batch, "batch": a.batch, "torch": torch.__version__, "threads": a.threads, "device": a.device, "dtype": a.dtype, "cpu": platform.processor(), "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
