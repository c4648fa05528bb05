"""Golden values for the quantizer tests, computed with PyTorch itself.

Run with the venv's Python (after scripts/setup.sh):
    .venv/bin/python scripts/gen_fixtures.py
It writes tests/fixtures/quantizers.safetensors. Each case `c{i}` holds
  x          the input (float32 unless noted),
  bits       int64 scalar, the bitwidth,
  alpha      float32 [1], PACT's clipping level,
  minmax_q   MinMaxQuant.quantize(x), as TorchApprox computes it,
  minmax_fq  its fake quantization, quantize(x) / scale,
  pact_q     PACTQuant.quantize(x) with that alpha,
  pact_fq    its fake quantization.
The functions below restate TorchApprox's forward code (torchapprox/quantizers,
MinMaxQuant.Quant and PACTQuant.Quant): int_max is an integer tensor, the scale
is one tensor division, and torch.round rounds half to even.
"""

import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "quantizers.safetensors")


def int_max_of(bits):
    return torch.tensor(2 ** (bits - 1) - 1)


def minmax_quantize(x, bits):
    int_max = int_max_of(bits)
    with torch.no_grad():
        minmax = torch.max(torch.abs(x))
    scale = int_max / minmax
    q = torch.round(torch.clamp(x, min=-minmax, max=minmax) * scale)
    return q, q / scale


def pact_quantize(x, alpha, bits):
    int_max = int_max_of(bits)
    scale = int_max / alpha.item()
    q = torch.round(torch.clamp(scale * x, min=-int_max, max=int_max))
    return q, q / scale


def ties(scale, int_max, n):
    """Inputs whose product with `scale` lands exactly on k + 0.5 in float32."""
    k = torch.arange(-n, n, dtype=torch.float32)
    k = k[(k + 0.5).abs() < int_max]
    x = (k + 0.5) / scale
    return x[(x * scale) == (k + 0.5)]


def main():
    gen = torch.Generator().manual_seed(20261126)
    tensors = {}
    cases = []
    shapes = [(7,), (3, 5), (2, 3, 4, 5), (1000,)]
    for bits in (2, 4, 8, 16):
        int_max = 2 ** (bits - 1) - 1
        for alpha in (2.2, 0.75):
            for shape in shapes:
                cases.append((torch.randn(shape, generator=gen) * 1.5, bits, alpha))
        # A power-of-two scale makes (k + 0.5) / scale exact, so ties are real ties.
        for j in (0, 2):
            s = 2.0 ** j
            x = ties(torch.tensor(s), int_max, 40)
            # For MinMax the extreme element fixes the scale at exactly s.
            x = torch.cat([x, torch.tensor([int_max / s])])
            cases.append((x, bits, int_max / s))
        # Ties with a non-power-of-two scale (2.2's), filtered to exact ones.
        s32 = int_max_of(bits) / 2.2
        cases.append((ties(s32, int_max, 60), bits, 2.2))
    # Values beyond alpha, exact zeros, and a float64 input for MinMax.
    cases.append((torch.tensor([-5.0, -2.2, -2.19, 0.0, -0.0, 1e-9, 2.2, 3.0, 100.0]), 8, 2.2))
    cases.append((torch.randn((4, 4), generator=gen, dtype=torch.float64), 8, 2.2))

    for i, (x, bits, alpha) in enumerate(cases):
        alpha_t = torch.tensor([alpha], dtype=torch.float32)
        mq, mfq = minmax_quantize(x, bits)
        tensors[f"c{i}.x"] = x.contiguous()
        tensors[f"c{i}.bits"] = torch.tensor(bits, dtype=torch.int64)
        tensors[f"c{i}.alpha"] = alpha_t
        tensors[f"c{i}.minmax_q"] = mq.to(x.dtype).contiguous()
        tensors[f"c{i}.minmax_fq"] = mfq.to(x.dtype).contiguous()
        if x.dtype == torch.float32:
            pq, pfq = pact_quantize(x, alpha_t, bits)
            tensors[f"c{i}.pact_q"] = pq.contiguous()
            tensors[f"c{i}.pact_fq"] = pfq.contiguous()
    tensors["count"] = torch.tensor(len(cases), dtype=torch.int64)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"torch": torch.__version__, "generator": "scripts/gen_fixtures.py"})
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
