"""A TorchScript fixture for tests/hostile.rs: a well-formed model whose output is not logits.

Run with the venv's Python (after scripts/setup.sh):
    .venv/bin/python scripts/make_hostile_fixtures.py
Writes tests/fixtures/torchscript/flat_output.pt: torch.jit.script of Linear(784, 10) whose
forward flattens its [N, 10] result to [N * 10], so accuracy and fine-tuning must refuse it
instead of scoring it. The other hostile files (truncated records, overflowing headers,
gzip bombs, overlapping views) are made by the tests themselves from the committed fixtures.
"""

import os

import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "torchscript")


class FlatOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)).flatten()


def main():
    torch.manual_seed(0)
    model = torch.jit.script(FlatOutput().eval())
    path = os.path.join(OUT, "flat_output.pt")
    model.save(path)
    assert torch.jit.load(path)(torch.zeros(3, 1, 28, 28)).shape == (30,)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
