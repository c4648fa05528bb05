"""TorchScript fixtures for the layer rewrite (tests/rewrite.rs), trained on the embedded MNIST digits.

Run with the venv's Python (after scripts/setup.sh):
    .venv/bin/python scripts/make_rewrite_fixtures.py
Writes to tests/fixtures/rewrite/:
  resnet_scripted.pt  torch.jit.script of a small residual CNN: a stem convolution with
                      BatchNorm, two residual blocks of 8 channels (a 3x3 convolution and a
                      depthwise 3x3 one, each with BatchNorm; the two blocks share TorchScript
                      classes), a strided downsampling convolution with bias, a dilated block
                      of 16 channels, 2x2 average pooling and a Linear classifier
  resnet_traced.pt    torch.jit.trace of the same trained network
  mixed_scripted.pt   a model with layers the rewrite leaves in float: a Conv1d over image
                      rows, a functional F.linear, and a Linear called twice in one forward
  expected.json       PyTorch's float test accuracy of each model on the embedded digits
Inputs are pixel/255 (no normalisation).
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from mnist_idx import load, train

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "rewrite")


class Block(nn.Module):
    def __init__(self, c, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer2 = nn.Sequential(Block(16, dilation=2))
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        x = self.layer2(F.relu(self.down(self.layer1(self.stem(x)))))
        return self.fc(F.avg_pool2d(x, 2).flatten(1))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rows = nn.Conv1d(28, 16, 3, padding=1)
        self.hidden = nn.Linear(16 * 28, 64)
        self.twice = nn.Linear(64, 64)
        self.head = nn.Parameter(torch.randn(10, 64) * 0.1)

    def forward(self, x):
        h = F.relu(self.rows(x.squeeze(1)))
        h = F.relu(self.hidden(h.flatten(1)))
        h = F.relu(self.twice(F.relu(self.twice(h))))
        return F.linear(h, self.head)


@torch.no_grad()
def accuracy(module, vx, vy):
    return (module(vx).argmax(-1) == vy).float().mean().item()


def main():
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    tx, ty, vx, vy = load()
    torch.manual_seed(0)
    net = train(ResNet(), tx, ty, epochs=4, seed=1, lr=2e-3)
    expected = {}
    scripted = torch.jit.script(net)
    scripted.save(os.path.join(OUT, "resnet_scripted.pt"))
    traced = torch.jit.trace(net, vx[:4])
    traced.save(os.path.join(OUT, "resnet_traced.pt"))
    torch.manual_seed(0)
    mixed = torch.jit.script(train(Mixed(), tx, ty, epochs=3, seed=2, lr=2e-3))
    mixed.save(os.path.join(OUT, "mixed_scripted.pt"))
    for name in ["resnet_scripted", "resnet_traced", "mixed_scripted"]:
        m = torch.jit.load(os.path.join(OUT, name + ".pt"))
        expected[name] = accuracy(m, vx, vy)
        print(name, expected[name])
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"float_accuracy": expected, "test_digits": int(vy.shape[0])}, f, indent=1)


if __name__ == "__main__":
    main()
