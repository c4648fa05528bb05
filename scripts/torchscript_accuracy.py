"""PyTorch's test accuracy of TorchScript files on the embedded MNIST digits (pixel / 255).

    .venv/bin/python scripts/torchscript_accuracy.py MODEL.pt [MODEL.pt ...]
Prints `accuracy <file> <share>` per file, loading each with torch.jit.load alone, so a
file that needs anything but PyTorch fails here.
"""

import sys

import torch
from mnist_idx import load


def main():
    _, _, x, y = load()
    for path in sys.argv[1:]:
        m = torch.jit.load(path, map_location="cpu").eval()
        with torch.no_grad():
            hits = sum((m(x[i:i + 500]).argmax(-1) == y[i:i + 500]).sum().item() for i in range(0, len(y), 500))
        print(f"accuracy {path} {hits / len(y):.4f}")


if __name__ == "__main__":
    main()
