#!/usr/bin/env python3
"""Make the small torch.save checkpoints used by tests/pt_reader.rs.

Run with the torch venv:  /work/venv/torch/bin/python scripts/make_pt_reader_fixtures.py

For every `<name>.pt` the expected tensors (converted to float32, contiguous) are written to
`<name>.expected.safetensors`; its metadata maps each tensor name to the stored dtype string
("F32", "F16", ...). Output: tests/fixtures/pt/.
"""

import copy
import io
import os
import struct
import zipfile

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "pt")

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
}


def expected(name, sd):
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}
    meta = {k: DTYPE_NAMES[v.dtype] for k, v in sd.items()}
    # safetensors wants the key order preserved by the reader; record it explicitly.
    meta["__order__"] = ",".join(sd.keys())
    save_file(tensors, os.path.join(OUT, f"{name}.expected.safetensors"), metadata=meta)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.norm = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.SiLU(), torch.nn.Linear(4, 2))


def warmup_lr(step):
    return min(step, 5000) / 5000.0


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)

    # (a) bare state_dict of a small module (f32 params + BatchNorm i64 buffer)
    net = Small()
    with torch.no_grad():
        net.norm.running_mean.normal_()
        net.norm.running_var.uniform_(0.5, 2.0)
        net.norm.num_batches_tracked.fill_(12)
    sd = net.state_dict()
    torch.save(sd, os.path.join(OUT, "bare.pt"))
    expected("bare", sd)

    # (b) torchcfm train_cifar10.py-style checkpoint
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5).add_(0.25)
    optim = torch.optim.Adam(net.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=warmup_lr)
    x = torch.randn(2, 2, 7, 7)
    net.train()
    loss = net.head(net.norm(net.conv(x)).mean(dim=(2, 3)).repeat(1, 2)[:, :5]).pow(2).sum()
    loss.backward()
    optim.step()
    sched.step()
    ckpt = {
        "net_model": net.state_dict(),
        "ema_model": ema.state_dict(),
        "sched": sched.state_dict(),
        "optim": optim.state_dict(),
        "step": 7,
    }
    torch.save(ckpt, os.path.join(OUT, "ckpt.pt"))
    expected("ckpt_net", ckpt["net_model"])
    expected("ckpt_ema", ckpt["ema_model"])

    # (b') no ema_model and two state_dicts -> ambiguous without a key
    torch.save(
        {"net_model": ckpt["net_model"], "other_model": ckpt["ema_model"], "step": 3},
        os.path.join(OUT, "two_models.pt"),
    )

    # (c) dtypes
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g) * 3
    dt = {
        "f16": base.to(torch.float16),
        "bf16": base.to(torch.bfloat16),
        "f64": base.to(torch.float64),
        "i64": torch.tensor([-(2**40), -1, 0, 7, 2**20], dtype=torch.int64),
        "i32": torch.tensor([[-5, 6], [7, -8]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "u16": torch.tensor([0, 65535, 3], dtype=torch.uint16),  # _rebuild_tensor_v3 + UntypedStorage
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    torch.save(dt, os.path.join(OUT, "dtypes.pt"))
    expected("dtypes", dt)

    # (d) views: non-contiguous and storage_offset > 0, sharing storage
    big = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8 - 1
    w = torch.randn(3, 5, generator=g)
    views = {
        "big": big,
        "rows": big[1:3],  # offset 6, shares storage with "big"
        "col": big[:, 2],  # offset 2, stride 6
        "block_t": big[1:4, 2:5].t(),  # offset 8, strides (1, 6)
        "w": w,
        "wt": w.t(),  # transposed view saved as-is
        "expanded": torch.tensor([[1.0], [2.0], [3.0]]).expand(3, 4),  # stride 0
        "step2": torch.arange(10, dtype=torch.float16)[1::3],  # offset 1, stride 3
    }
    assert not views["wt"].is_contiguous() and views["rows"].storage_offset() == 6
    torch.save(views, os.path.join(OUT, "views.pt"))
    expected("views", views)

    # (e) DataParallel-style "module." prefixed keys, under "ema_model", with a Parameter
    sd_mod = {"module." + k: v for k, v in Small().state_dict().items()}
    sd_mod["module.extra"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    torch.save({"ema_model": sd_mod, "step": 1}, os.path.join(OUT, "module_prefixed.pt"))
    expected("module_prefixed", sd_mod)

    # checkpoint written without CRCs (torch then stores CRC = 0)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"a": big, "b": w}, os.path.join(OUT, "nocrc.pt"))
    finally:
        torch.serialization.set_crc32_options(True)
    expected("nocrc", {"a": big, "b": w})

    # legacy (pre-1.6, non-zip) format -> must be rejected with a clear message
    torch.save({"a": torch.ones(2)}, os.path.join(OUT, "legacy.pt"), _use_new_zipfile_serialization=False)

    # Re-zip helpers (python zipfile, STORED) for an odd archive name and a big-endian file.
    def rezip(src, dst, rename, transform=None, compression=zipfile.ZIP_STORED):
        zin = zipfile.ZipFile(src)
        with zipfile.ZipFile(dst, "w", compression=compression) as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                name = rename(info.filename)
                if transform is not None:
                    data = transform(name, data)
                if data is None:
                    continue  # drop the entry
                zi = zipfile.ZipInfo(name)
                zi.compress_type = compression
                zout.writestr(zi, data)

    rezip(
        os.path.join(OUT, "bare.pt"),
        os.path.join(OUT, "renamed.pt"),
        lambda n: "my model v2/" + n.split("/", 1)[1],
    )

    # Broken archives (each valid as a zip, CRCs correct) for error-message tests.
    small = os.path.join(OUT, "_small_tmp.pt")
    torch.save({"a": big, "b": w}, small)
    same = lambda n: n  # noqa: E731
    rezip(small, os.path.join(OUT, "bad_missing_storage.pt"), same,
          lambda n, d: None if n.endswith("/data/1") else d)
    rezip(small, os.path.join(OUT, "bad_short_storage.pt"), same,
          lambda n, d: d[:40] if n.endswith("/data/0") else d)
    rezip(small, os.path.join(OUT, "bad_opcode.pt"), same,
          lambda n, d: b"\x80\x02}q\x00\xff." if n.endswith("/data.pkl") else d)
    rezip(small, os.path.join(OUT, "bad_no_pickle.pt"), same,
          lambda n, d: None if n.endswith("/data.pkl") else d)
    rezip(small, os.path.join(OUT, "bad_deflated.pt"), same, compression=zipfile.ZIP_DEFLATED)
    os.remove(small)

    # Big-endian: a dict of independent tensors; storage keys are assigned "0", "1", ... in order.
    be_sd = {
        "f32": torch.randn(2, 3, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "i64": torch.tensor([1, -2, 3 * 2**33]),
        "f64_t": torch.randn(2, 3, generator=g).double().t(),
    }
    torch.save(be_sd, os.path.join(OUT, "_le_tmp.pt"))
    sizes = {str(i): t.element_size() for i, t in enumerate(be_sd.values())}

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        parts = name.split("/")
        if len(parts) == 3 and parts[1] == "data":
            n = sizes[parts[2]]
            return b"".join(data[i : i + n][::-1] for i in range(0, len(data), n))
        return data

    rezip(os.path.join(OUT, "_le_tmp.pt"), os.path.join(OUT, "bigendian.pt"), lambda n: n, to_big)
    os.remove(os.path.join(OUT, "_le_tmp.pt"))
    expected("bigendian", be_sd)
    back = torch.load(os.path.join(OUT, "bigendian.pt"), weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in be_sd.items()), "big-endian rewrite is wrong"

    # sanity: torch reads all zip fixtures back
    for f in ["bare", "ckpt", "dtypes", "views", "module_prefixed", "nocrc", "renamed", "two_models"]:
        torch.load(os.path.join(OUT, f + ".pt"), weights_only=True)

    for f in os.listdir(OUT):
        os.chmod(os.path.join(OUT, f), 0o644)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
