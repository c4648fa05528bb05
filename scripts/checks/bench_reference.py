"""PyTorch reference timings for scripts/bench.sh: TorchApprox's quantizer semantics in Python.

    .venv/bin/python scripts/checks/bench_reference.py --threads 1 --out ref.json
MinMax and PACT are written as TorchApprox writes them (torch.autograd.Function
nodes, fake quantization as quantize / scale); the LeNet-5 step uses the same
quantizers on every layer (PACT activations, MinMax weights, integer-valued
conv / linear, rescaled by s_x * s_w), against the plain float LeNet-5.
Each figure is the median of many calls, in seconds.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MinMaxQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, minmax, int_max):
        scale_factor = int_max / minmax
        ctx.save_for_backward(scale_factor)
        return torch.round(torch.clamp(x, min=-minmax, max=minmax) * scale_factor)

    @staticmethod
    def backward(ctx, grad):
        (scale_factor,) = ctx.saved_tensors
        return grad * scale_factor, None, None


class PACTQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, int_max):
        scale_factor = int_max / alpha.item()
        ctx.save_for_backward(scale_factor)
        return torch.round(torch.clamp(scale_factor * x, min=-int_max, max=int_max))

    @staticmethod
    def backward(ctx, grad):
        (scale_factor,) = ctx.saved_tensors
        return grad * scale_factor, None, None


class MinMaxQuant(nn.Module):
    def __init__(self, bitwidth=8):
        super().__init__()
        self.int_max = torch.tensor(2 ** (bitwidth - 1) - 1)

    def quantize(self, x):
        with torch.no_grad():
            minmax = torch.max(torch.abs(x))
            self.scale = self.int_max / minmax
        return MinMaxQuantFn.apply(x, minmax, self.int_max)

    def forward(self, x):
        return self.quantize(x) / self.scale


class PACTQuant(nn.Module):
    def __init__(self, bitwidth=8):
        super().__init__()
        self.int_max = torch.tensor(2 ** (bitwidth - 1) - 1)
        self.alpha = nn.Parameter(torch.tensor([2.2]))

    def quantize(self, x):
        self.scale = self.int_max / self.alpha.item()
        return PACTQuantFn.apply(x, self.alpha, self.int_max)

    def forward(self, x):
        return self.quantize(x) / self.scale


def median_time(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def iters_for(n):
    return max(10, min(2000, (1 << 26) // max(n, 1) // 4))


class QLayer(nn.Module):
    def __init__(self, op, **kw):
        super().__init__()
        self.op, self.kw = op, kw
        self.xq, self.wq = PACTQuant(8), MinMaxQuant(8)

    def forward(self, x, weight, bias):
        qx, qw = self.xq.quantize(x), self.wq.quantize(weight)
        return self.op(qx, qw, None, **self.kw) / (self.xq.scale * self.wq.scale) + bias.view(-1, *([1] * (qx.dim() - 2)))


class LeNet(nn.Module):
    def __init__(self, quantized):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)
        self.quantized = quantized
        self.q = nn.ModuleDict({
            "conv1": QLayer(F.conv2d, padding=2), "conv2": QLayer(F.conv2d),
            "fc1": QLayer(F.linear), "fc2": QLayer(F.linear), "fc3": QLayer(F.linear),
        })

    def layer(self, name, x):
        m = getattr(self, name)
        if self.quantized:
            return self.q[name](x, m.weight, m.bias)
        return m(x)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.layer("conv1", x)), 2)
        x = F.max_pool2d(F.relu(self.layer("conv2", x)), 2)
        x = F.relu(self.layer("fc1", x.flatten(1)))
        x = F.relu(self.layer("fc2", x))
        return self.layer("fc3", x)


def lenet_step(quantized):
    torch.manual_seed(0)
    net = LeNet(quantized)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step():
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return median_time(step, 60, warmup=10)


# Table-GEMM layers of the approximate mode: (name, kind, input shape, weight shape, stride, padding).
APPROX_LAYERS = [
    ("lenet.conv1", "conv", (64, 1, 28, 28), (6, 1, 5, 5), 1, 2, 1),
    ("lenet.conv2", "conv", (64, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1),
    ("lenet.fc1", "linear", (64, 400), (120, 400), 1, 0, 1),
    ("lenet.fc2", "linear", (64, 120), (84, 120), 1, 0, 1),
    ("lenet.fc3", "linear", (64, 84), (10, 84), 1, 0, 1),
    ("linear.512x512x1024", "linear", (512, 512), (1024, 512), 1, 0, 1),
    ("resnet18.conv64.56x56.b1", "conv", (1, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
    ("resnet18.conv256.14x14.b4", "conv", (4, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
    ("depthwise32.112x112.b1", "conv", (1, 32, 112, 112), (32, 1, 3, 3), 1, 1, 32),
    ("linear.512x1000.b16", "linear", (16, 512), (1000, 512), 1, 0, 1),
]


def approx_inputs(kind, xs, ws):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, xs, generator=g).float()
    w = torch.randint(-127, 128, ws, generator=g).float()
    return x, w


def lut_matmul(table, x, w):
    """The PyTorch way: index the table with both operands' bytes, then sum (rows in chunks)."""
    xi, wi = x.long() % 256, w.long() % 256
    rows = max(1, (8 << 20) // (w.shape[0] * w.shape[1]))
    out = []
    for r in range(0, x.shape[0], rows):
        idx = xi[r:r + rows].unsqueeze(1) * 256 + wi.unsqueeze(0)
        out.append(table.take(idx).sum(-1))
    return torch.cat(out).float()


def approx_layer(table, kind, x, w, stride, padding, groups=1):
    if kind == "linear":
        return lut_matmul(table, x, w)
    n, o, kh, kw = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    cg, og = x.shape[1] // groups, o // groups
    outs = []
    for g in range(groups):
        cols = F.unfold(x[:, g * cg:(g + 1) * cg], (kh, kw), padding=padding, stride=stride)  # [N, K, L]
        l = cols.shape[2]
        y = lut_matmul(table, cols.transpose(1, 2).reshape(n * l, -1), w[g * og:(g + 1) * og].reshape(og, -1))
        outs.append(y.reshape(n, l, og).transpose(1, 2))
    return torch.cat(outs, 1)


def lookups(kind, xs, ws, stride, padding):
    if kind == "linear":
        return xs[0] * ws[0] * ws[1]
    ho = (xs[2] + 2 * padding - ws[2]) // stride + 1
    wo = (xs[3] + 2 * padding - ws[3]) // stride + 1
    return xs[0] * ho * wo * ws[0] * ws[1] * ws[2] * ws[3]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 1 << 16, 1 << 20, 1 << 24])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {"torch": torch.__version__, "cases": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.sizes:
            x = torch.randn(n) * 1.5
            iters = iters_for(n)
            for name, q in (("minmax", MinMaxQuant(8)), ("pact", PACTQuant(8))):
                with torch.no_grad():
                    fwd = median_time(lambda: q(x), iters)

                def fwd_bwd():
                    xl = x.detach().requires_grad_()
                    q(xl).sum().backward()

                fb = median_time(fwd_bwd, iters)
                results["cases"].append({"threads": threads, "n": n, "quantizer": name, "forward": fwd, "forward_backward": fb})
            fused = median_time(lambda: torch.fake_quantize_per_tensor_affine(x, 0.01, 0, -127, 127), iters)
            results["cases"].append({"threads": threads, "n": n, "quantizer": "torch_fake_quantize", "forward": fused})
        results.setdefault("lenet", []).append(
            {"threads": threads, "float_step": lenet_step(False), "quantized_step": lenet_step(True)})
        v = torch.arange(256)
        s = torch.where(v < 128, v, v - 256)
        table = torch.outer(s, s).reshape(-1)
        for name, kind, xs, ws, stride, padding, groups in APPROX_LAYERS:
            x, w = approx_inputs(kind, xs, ws)
            n = lookups(kind, xs, ws, stride, padding)
            t = median_time(lambda: approx_layer(table, kind, x, w, stride, padding, groups), 3 if n > 1e8 else 10, warmup=1)
            results.setdefault("approx", []).append({"threads": threads, "layer": name, "lookups": n, "seconds": t})
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
