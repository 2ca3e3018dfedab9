#!/usr/bin/env python3
"""An external reward for orwcfm-fast (protocol "orwcfm-reward/1"), standard library only.

The engine starts this program ONCE and then, for every batch:

  stdin  <- 8-byte little-endian u64 N, then N bytes of a safetensors file with
            "images": f32 [B, C, H, W], pixels in [-1, 1]
            "labels": i64 [B]  (class-conditional models only)
            metadata {"pixel_range": "[-1,1]", "protocol": "orwcfm-reward/1"}
  stdout -> exactly B little-endian f32 rewards (4*B bytes), in batch order

Never print to stdout yourself: it carries the answers. Logs go to stderr (this script sends
stray print() output there). The program ends when the engine closes stdin.

The example reward is the mean brightness of each image, in [0, 1]. Replace `reward_batch`
with your own model (see the marked section).
"""

import array
import json
import os
import struct
import sys

PROTOCOL = "orwcfm-reward/1"

# Keep the binary stdout for answers; send every print() to stderr so it cannot corrupt them.
ANSWERS = sys.stdout.buffer
REQUESTS = sys.stdin.buffer
sys.stdout = sys.stderr


def log(msg):
    print(f"external_reward.py[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def read_exact(n):
    """n bytes from stdin; None at a clean end of input (before the first byte)."""
    chunks, got = [], 0
    while got < n:
        b = REQUESTS.read(n - got)
        if not b:
            if got == 0:
                return None
            raise EOFError(f"stdin closed after {got} of {n} bytes")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def parse_safetensors(buf):
    """-> (tensors, metadata); tensors maps name -> (dtype, shape, flat list of values)."""
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(buf[8 : 8 + hlen].decode("utf-8"))
    data = memoryview(buf)[8 + hlen :]
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        dtype, shape = info["dtype"], info["shape"]
        start, end = info["data_offsets"]
        raw = bytes(data[start:end])
        if dtype == "F32":
            values = array.array("f")
        elif dtype == "I64":
            values = array.array("q")
        else:
            raise ValueError(f"tensor {name!r}: dtype {dtype} not handled by this script")
        values.frombytes(raw)
        if sys.byteorder == "big":  # the file is little-endian
            values.byteswap()
        tensors[name] = (dtype, shape, values)
    return tensors, meta


def reward_batch(images, shape, labels):
    """One reward per image.

    images: flat array('f') of B*C*H*W values in [-1, 1], row-major [B, C, H, W]
    shape:  [B, C, H, W]
    labels: list of B ints, or None for unconditional models

    ---------------------------------------------------------------------------------------
    PUT YOUR OWN MODEL HERE. With numpy / torch (load the model once, at module level):

        import numpy as np, torch
        x = np.frombuffer(images, dtype=np.float32).reshape(shape)   # [B,C,H,W] in [-1,1]
        x = torch.from_numpy(x.copy()).to("cuda")
        x01 = (x + 1) / 2                                            # [0,1], e.g. for CLIP
        with torch.no_grad():
            r = MODEL(x01)                                           # [B]
        return r.float().cpu().tolist()
    ---------------------------------------------------------------------------------------
    """
    b = shape[0]
    per = len(images) // b if b else 0
    out = []
    for i in range(b):
        s = sum(images[i * per : (i + 1) * per])
        out.append(((s / per) + 1.0) / 2.0 if per else 0.0)  # mean of (v+1)/2
    return out


def main():
    log(f"ready (pid {os.getpid()})")
    batches = 0
    while True:
        head = read_exact(8)
        if head is None:
            break  # the engine closed stdin: the run is over
        (n,) = struct.unpack("<Q", head)
        body = read_exact(n)
        if body is None:
            raise EOFError("stdin closed before the request body")
        tensors, meta = parse_safetensors(body)
        if meta.get("protocol") != PROTOCOL:
            log(f"warning: protocol {meta.get('protocol')!r}, expected {PROTOCOL!r}")
        _, shape, images = tensors["images"]
        labels = list(tensors["labels"][2]) if "labels" in tensors else None
        rewards = reward_batch(images, shape, labels)
        if len(rewards) != shape[0]:
            raise ValueError(f"{len(rewards)} rewards for a batch of {shape[0]}")
        ANSWERS.write(struct.pack(f"<{len(rewards)}f", *rewards))
        ANSWERS.flush()
        batches += 1
    log(f"stdin closed after {batches} batch(es), exiting")


if __name__ == "__main__":
    main()
