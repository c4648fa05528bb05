"""PyTorch's test accuracy of TorchScript files on the embedded MNIST digits (pixel / 255).

    .venv/bin/python scripts/checks/torchscript_accuracy.py MODEL.pt [MODEL.pt ...]
Prints `accuracy <file> <share>` per file, loading each with torch.jit.load alone, so a
file that needs anything but PyTorch fails here.
"""

import os
import sys

import torch

# The embedded digits' reader is shared with the fixture scripts.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from mnist_idx import load  # noqa: E402


def main():
    _, _, x, y = load()
    for path in sys.argv[1:]:
        m = torch.jit.load(path, map_location="cpu").eval()
        with torch.no_grad():
            hits = sum((m(x[i:i + 500]).argmax(-1) == y[i:i + 500]).sum().item() for i in range(0, len(y), 500))
        print(f"accuracy {path} {hits / len(y):.4f}")


if __name__ == "__main__":
    main()
