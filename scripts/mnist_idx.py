"""The embedded MNIST digits (examples/data/mnist-10k) and the fixtures' training loop, for the scripts under scripts/."""

import gzip
import os

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "data", "mnist-10k")


def read_idx(name):
    """One IDX file of the embedded set (`name` without `.gz`) as a numpy array."""
    with gzip.open(os.path.join(DATA, name + ".gz"), "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load():
    """(train images, train labels, test images, test labels) as tensors, images pixel/255 in [N, 1, 28, 28]."""
    import torch

    tx = torch.tensor(read_idx("train-images-idx3-ubyte"), dtype=torch.float32).unsqueeze(1) / 255.0
    ty = torch.tensor(read_idx("train-labels-idx1-ubyte"), dtype=torch.int64)
    vx = torch.tensor(read_idx("t10k-images-idx3-ubyte"), dtype=torch.float32).unsqueeze(1) / 255.0
    vy = torch.tensor(read_idx("t10k-labels-idx1-ubyte"), dtype=torch.int64)
    return tx, ty, vx, vy


def train(model, tx, ty, epochs, seed, lr=1e-3):
    """Adam on cross-entropy, batches of 64 in a seeded random order; returns the model in eval mode."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(tx.shape[0])
        for i in range(0, tx.shape[0], 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(tx[idx]), ty[idx]).backward()
            opt.step()
    model.eval()
    return model
