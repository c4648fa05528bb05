"""Fixtures for importing PyTorch weights and buffers into networks built from the crate's layers (tests/import.rs).

Run with the venv's Python (after scripts/setup.sh):
    .venv/bin/python scripts/make_import_fixtures.py
Reads tests/fixtures/rewrite/resnet_scripted.pt (a residual CNN with BatchNorm, trained on
the embedded digits by make_rewrite_fixtures.py) and writes to tests/fixtures/import/:
  resnet_state.safetensors   its state_dict as PyTorch names it (stem.0.weight,
                             layer1.0.bn1.running_var, ..., num_batches_tracked included),
                             as safetensors.torch.save_file writes it
  resnet_logits.safetensors  `inputs`: the first 64 test digits (pixel/255, [64, 1, 28, 28]);
                             `logits`: PyTorch's eval-mode output for them, [64, 10]
"""

import os

import torch
from mnist_idx import load
from safetensors.torch import save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
SRC = os.path.join(ROOT, "tests", "fixtures", "rewrite", "resnet_scripted.pt")
OUT = os.path.join(ROOT, "tests", "fixtures", "import")


def main():
    os.makedirs(OUT, exist_ok=True)
    model = torch.jit.load(SRC).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "resnet_state.safetensors"))
    _, _, vx, _ = load()
    inputs = vx[:64].contiguous()
    with torch.no_grad():
        logits = model(inputs)
    save_file({"inputs": inputs, "logits": logits.contiguous()}, os.path.join(OUT, "resnet_logits.safetensors"))
    buffers = [k for k, _ in model.named_buffers()]
    print(f"{len(state)} state entries, {len(buffers)} buffers; logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
