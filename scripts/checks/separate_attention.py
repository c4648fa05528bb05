"""Writes OUT/attention_separate.pt: a scripted network of two nn.MultiheadAttention with
separate q/k/v projection weights (kdim, vdim other than embed_dim), for the rewrite's
separate projections (tests/torchscript/rewrite.rs).

`a`: 4 heads, keys of 12 and values of 8 features, returns its weights; `b`: 2 heads, batch
first, key and value one tensor of 12 features, without weights (PyTorch cannot script a
bias-free attention).
Usage: separate_attention.py OUT
"""
import os
import sys

import torch
from torch import nn


class Separate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(16, 4, kdim=12, vdim=8)
        self.b = nn.MultiheadAttention(16, 2, kdim=12, vdim=12, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        s = x.transpose(0, 1)
        y, w = self.a(s, s[:, :, :12], s[:, :, 4:12])
        kv = x[:, :, 2:14]
        z, _ = self.b(y.transpose(0, 1), kv, kv, need_weights=False)
        extra = (w * w).sum((1, 2)) if w is not None else torch.zeros(x.size(0))
        return self.fc(z).mean(1) + extra.unsqueeze(1)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.manual_seed(0)
    model = Separate().eval()
    os.makedirs(sys.argv[1], exist_ok=True)
    torch.jit.script(model).save(os.path.join(sys.argv[1], "attention_separate.pt"))


if __name__ == "__main__":
    main()
