"""Loads a state dict that Rust saved from a network built with `approx_sequential` into
PyTorch's own ResNet class (scripts/fixtures/make_rewrite_fixtures.py) and compares the logits.

    .venv/bin/python scripts/checks/state_dict_reload_check.py STATE.safetensors IO.safetensors
IO.safetensors holds `x` (the input) and `y` (Rust's eval-mode logits). PyTorch's
`load_state_dict(strict=False)` may only miss BatchNorm's `num_batches_tracked` counters
(tch has none; PyTorch's BatchNorm fills them in itself and does not report them) and only
find the crate's quantizer state (`*_quantizer.*`) unexpected.
Prints the max absolute difference and exits 1 when it exceeds 1e-5 or a key is wrong.
"""

import os
import sys

import torch
from safetensors.torch import load_file

# PyTorch's own class of the network lives with the fixture that trains it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from make_rewrite_fixtures import ResNet  # noqa: E402


def main():
    state_path, io_path = sys.argv[1], sys.argv[2]
    model = ResNet()
    result = model.load_state_dict(load_file(state_path), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if "_quantizer." not in k]
    if missing or unexpected:
        print(f"missing {missing}, unexpected {unexpected}")
        sys.exit(1)
    model.eval()
    io = load_file(io_path)
    with torch.no_grad():
        y = model(io["x"])
    diff = (y - io["y"]).abs().max().item()
    print(f"max_abs_diff {diff:.3g}, {len(result.missing_keys)} counters missing, "
          f"{len(result.unexpected_keys)} quantizer entries ignored")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main()
