"""PyTorch's test accuracy of TorchScript files on the embedded MNIST digits (pixel / 255).

    .venv/bin/python scripts/torchscript_accuracy.py MODEL.pt [MODEL.pt ...]
Prints `accuracy <file> <share>` per file, loading each with torch.jit.load alone, so a
file that needs anything but PyTorch fails here.
"""

import gzip
import os
import sys

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "mnist-10k")


def read_idx(name):
    with gzip.open(os.path.join(DATA, name + ".gz"), "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
    x = torch.tensor(read_idx("t10k-images-idx3-ubyte"), dtype=torch.float32).unsqueeze(1) / 255.0
    y = torch.tensor(read_idx("t10k-labels-idx1-ubyte"), dtype=torch.int64)
    for path in sys.argv[1:]:
        m = torch.jit.load(path, map_location="cpu").eval()
        with torch.no_grad():
            hits = sum((m(x[i:i + 500]).argmax(-1) == y[i:i + 500]).sum().item() for i in range(0, len(y), 500))
        print(f"accuracy {path} {hits / len(y):.4f}")


if __name__ == "__main__":
    main()
