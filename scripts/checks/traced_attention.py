"""Writes OUT/attention_traced.pt: a traced network of six nn.MultiheadAttention, for the
rewrite's recognition of traced attentions (tests/torchscript/rewrite.rs).

`a`: 4 heads, [sequence, batch, features], returns its weights averaged over the heads;
`b`: 8 heads, batch first, no biases, returns per-head weights; `c`: cross-attention whose
key and value are one tensor (two inputs); `e`: 4 heads, batch first, three inputs; `f`:
separate q/k/v weights (keys of 12, values of 8 features), per-head weights; and `d`:
traced on an unbatched input, which the rewrite leaves in float.
Usage: traced_attention.py OUT
"""
import os
import sys

import torch
from torch import nn


class Attentions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(16, 4)
        self.b = nn.MultiheadAttention(16, 8, bias=False, batch_first=True)
        self.c = nn.MultiheadAttention(16, 2)
        self.d = nn.MultiheadAttention(16, 2)
        self.e = nn.MultiheadAttention(16, 4, batch_first=True)
        self.f = nn.MultiheadAttention(16, 2, kdim=12, vdim=8)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        s = x.transpose(0, 1)
        y, w = self.a(s, s, s)
        z = y.transpose(0, 1)
        z, w2 = self.b(z, z, z, average_attn_weights=False)
        c, _ = self.c(z.transpose(0, 1), s, s, need_weights=False)
        # Squares: a row of weights sums to 1 whatever the attention computed.
        u = x[0]
        d, _ = self.d(u, u, u)
        e, we = self.e(z, x, x * 0.5)
        f, wf = self.f(s, s[:, :, :12], s[:, :, 4:12], average_attn_weights=False)
        extra = (w * w).sum((1, 2)) + (w2 * w2).sum((1, 2, 3)) + d.sum()
        extra = extra + (we * we).sum((1, 2)) + (wf * wf).sum((1, 2, 3))
        return self.fc(c.transpose(0, 1) + z + e + f.transpose(0, 1)).mean(1) + extra.unsqueeze(1)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.manual_seed(0)
    model = Attentions().eval()
    x = torch.randn(2, 5, 16)
    os.makedirs(sys.argv[1], exist_ok=True)
    torch.jit.trace(model, x, check_trace=False).save(os.path.join(sys.argv[1], "attention_traced.pt"))


if __name__ == "__main__":
    main()
