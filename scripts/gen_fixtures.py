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


LAYERS_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "layers.safetensors")


def approx_conv(x, weight, bias, alpha, bits, per_channel, **geometry):
    """TorchApprox's quantized ApproxConv2d: conv(q_x, q_w) / (s_x * s_w) + bias,
    PACT on the input, MinMax on the weight (per tensor or per output channel)."""
    int_max = int_max_of(bits)
    s_x = int_max / alpha.item()
    q_x = torch.round(torch.clamp(s_x * x, min=-int_max, max=int_max))
    if per_channel:
        m = weight.abs().amax(dim=(1, 2, 3), keepdim=True)
        s_w = int_max / m
        q_w = torch.round(torch.clamp(weight, min=-m, max=m) * s_w)
        s_w = s_w.reshape(-1, 1, 1)
    else:
        q_w, _ = minmax_quantize(weight, bits)
        s_w = int_max / weight.abs().max()
    acc = torch.nn.functional.conv2d(q_x, q_w, None, **geometry)
    return acc / (s_x * s_w) + bias.reshape(-1, 1, 1)


def layer_fixtures():
    """Grouped and depthwise convolutions, float and quantized, for tests/layers.rs."""
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    specs = [
        ("grouped", 4, 6, 3, dict(stride=1, padding=1, dilation=1, groups=2)),
        ("depthwise", 4, 4, 3, dict(stride=2, padding=1, dilation=1, groups=4)),
        ("dilated", 3, 6, 3, dict(stride=1, padding=2, dilation=2, groups=3)),
    ]
    for name, cin, cout, k, geo in specs:
        conv = torch.nn.Conv2d(cin, cout, k, **geo)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
        x = torch.randn((2, cin, 9, 9), generator=gen) * 1.2
        alpha = torch.tensor([2.2])
        tensors[f"{name}.x"] = x
        tensors[f"{name}.weight"] = conv.weight.detach().clone()
        tensors[f"{name}.bias"] = conv.bias.detach().clone()
        tensors[f"{name}.geometry"] = torch.tensor([geo["stride"], geo["padding"], geo["dilation"], geo["groups"]])
        with torch.no_grad():
            tensors[f"{name}.float"] = conv(x)
            for bits in (4, 8):
                for per_channel in (False, True):
                    key = f"{name}.q{bits}{'_pc' if per_channel else ''}"
                    tensors[key] = approx_conv(x, conv.weight, conv.bias, alpha, bits, per_channel, **geo)
    save_file({k: v.contiguous() for k, v in tensors.items()}, LAYERS_OUT,
              metadata={"torch": torch.__version__, "generator": "scripts/gen_fixtures.py"})
    print(f"wrote {len(specs)} convolutions to {os.path.normpath(LAYERS_OUT)}")


if __name__ == "__main__":
    layer_fixtures()
