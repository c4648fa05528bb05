"""TorchScript fixtures for tests/torchscript.rs, trained on the embedded MNIST digits.

Run with the venv's Python (after scripts/setup.sh):
    .venv/bin/python scripts/make_torchscript_fixtures.py
Writes to tests/fixtures/torchscript/:
  mlp_scripted.pt    torch.jit.script of an MLP (fc1 784-256, fc2 256-10), the trainer's `mlp`
  lenet_traced.pt    torch.jit.trace of LeNet-5 with the trainer's layer names
  nobias_scripted.pt an MLP without biases
  bn_dw_cnn.pt       a CNN with BatchNorm and a depthwise convolution (scripted, eval mode)
  no_weights.pt      a module with only one-dimensional parameters (an error case)
  expected.json      PyTorch's test accuracies: float, and weights fake-quantized with
                     MinMax per tensor / per channel at 8, 4 and 2 bits
  probe.safetensors  16 test digits and each model's float logits on them
Inputs are pixel/255 (no normalisation): these models take raw [0, 1] images.
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from mnist_idx import load, train
from safetensors.torch import save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "torchscript")


class NoWeights(nn.Module):
    """Only one-dimensional parameters: nothing for weight quantization to do."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(10))
        self.shift = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return x.flatten(1)[:, :10] * self.scale + self.shift


class Mlp(nn.Module):
    def __init__(self, bias=True, hidden=256):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, 10, bias=bias)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BnDwCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.dw(x))), 2)
        x = F.relu(self.pw(x))
        return self.fc(x.flatten(1))


@torch.no_grad()
def spread_channel_scales(conv, bn, seed):
    """Rescales each output channel of `conv` by a factor in [0.1, 10] and BatchNorm's
    running statistics with it, which leaves the function (nearly, up to BN's eps)
    unchanged. BatchNorm networks trained without weight decay end up with such
    per-channel weight ranges; a 3-epoch toy does not, and per-channel quantization
    exists for them."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.exp(torch.empty(conv.out_channels).uniform_(-2.3, 2.3, generator=gen))
    conv.weight.mul_(c.view(-1, 1, 1, 1))
    bn.running_mean.mul_(c)
    bn.running_var.mul_(c * c)


def fake_quant(w, bits, per_channel):
    """MinMax fake quantization as TorchApprox computes it (scale = int_max / max|w|)."""
    int_max = torch.tensor(2 ** (bits - 1) - 1)
    if per_channel and w.dim() >= 2:
        m = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
        m = torch.where(m == 0, torch.ones_like(m), m)
    else:
        m = w.abs().max()
    s = int_max / m
    return torch.round(torch.clamp(w, min=-m, max=m) * s) / s


@torch.no_grad()
def accuracy(module, vx, vy):
    return (module(vx).argmax(-1) == vy).float().mean().item()


@torch.no_grad()
def quantized_accuracy(module, vx, vy, bits, per_channel):
    saved = {n: p.detach().clone() for n, p in module.named_parameters()}
    for n, p in module.named_parameters():
        if p.dim() >= 2:
            p.copy_(fake_quant(p, bits, per_channel))
    acc = accuracy(module, vx, vy)
    for n, p in module.named_parameters():
        p.copy_(saved[n])
    return acc


def main():
    torch.set_num_threads(2)
    tx, ty, vx, vy = load()
    os.makedirs(OUT, exist_ok=True)
    example = vx[:2]
    models = {
        "mlp_scripted": (torch.jit.script, train(Mlp(), tx, ty, 2, 1)),
        "lenet_traced": (lambda m: torch.jit.trace(m, example), train(LeNet(), tx, ty, 3, 2)),
        "nobias_scripted": (torch.jit.script, train(Mlp(bias=False, hidden=64), tx, ty, 2, 3)),
        "bn_dw_cnn": (torch.jit.script, train(BnDwCnn(), tx, ty, 3, 4)),
    }
    cnn = models["bn_dw_cnn"][1]
    spread_channel_scales(cnn.conv1, cnn.bn1, 5)
    spread_channel_scales(cnn.dw, cnn.bn2, 6)
    expected = {"test_digits": int(vy.shape[0]), "torch": torch.__version__, "models": {}}
    probe = {"x": vx[:16].contiguous()}
    for name, (export, model) in models.items():
        module = export(model)
        path = os.path.join(OUT, f"{name}.pt")
        module.save(path)
        module = torch.jit.load(path)
        entry = {"float": accuracy(module, vx, vy), "bytes": os.path.getsize(path)}
        for bits in (8, 4, 2):
            for per_channel in (False, True):
                key = f"q{bits}_{'per_channel' if per_channel else 'per_tensor'}"
                entry[key] = quantized_accuracy(module, vx, vy, bits, per_channel)
        expected["models"][name] = entry
        with torch.no_grad():
            probe[f"{name}.logits"] = module(probe["x"]).contiguous()
        print(name, json.dumps(entry))
    torch.jit.script(NoWeights()).save(os.path.join(OUT, "no_weights.pt"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(probe, os.path.join(OUT, "probe.safetensors"))


if __name__ == "__main__":
    main()
