"""Reloads a TorchScript file written by Rust and compares its outputs with Rust's.

    .venv/bin/python scripts/checks/torchscript_reload_check.py MODEL.pt IO.safetensors
IO.safetensors holds `x` (the input) and `y` (Rust's output). Prints the max
absolute difference and exits 1 when it exceeds 1e-5 (or the file does not load).
"""

import sys

import torch
from safetensors.torch import load_file


def main():
    model_path, io_path = sys.argv[1], sys.argv[2]
    module = torch.jit.load(model_path, map_location="cpu")
    module.eval()
    io = load_file(io_path)
    with torch.no_grad():
        y = module(io["x"])
    diff = (y - io["y"]).abs().max().item()
    print(f"max_abs_diff {diff:.3g}")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main()
