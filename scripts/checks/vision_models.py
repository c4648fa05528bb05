"""Real architectures for the TorchScript rewrite's tests (tests/torchscript/vision.rs).

    .venv/bin/python scripts/checks/vision_models.py build DIR
        Builds torchvision's resnet18, mobilenet_v2, mobilenet_v3_small and a small
        VisionTransformer (image 32, patch 8, 2 layers, hidden 64), plus `geometry`, a network
        of every convolution geometry the rewrite handles (1x7 kernels with padding (0, 3),
        stride (1, 2), dilation (1, 2), reflect / replicate / circular padding, padding='same'
        with an even kernel, padding='valid', groups, a biased and a bias-free Conv2d of one
        shape), each with a fixed seed and BatchNorm statistics from a few training-mode
        passes. Writes DIR/NAME_scripted.pt and DIR/NAME_traced.pt, DIR/NAME-x.safetensors (the
        input `x`) and DIR/models.json: for each model its name, files, and `layers`, the
        module paths of its Conv2d and Linear layers (attention projections included).

    .venv/bin/python scripts/checks/vision_models.py bench DIR
        Writes DIR/NAME.pt, torch.jit.script of torchvision's resnet18, resnet50, mobilenet_v2,
        efficientnet_b0, vgg11_bn and alexnet (random weights, seed 0, evaluation mode), for
        the `torchscript[]` rows of examples/bench.

    .venv/bin/python scripts/checks/vision_models.py check NAME MODEL.pt IO.safetensors
        MODEL.pt is a rewritten model written by Rust, IO holds `x` and Rust's output `y`.
        Checks that torch.jit.load gives `y` (max difference at most 1e-5), that every PACT
        alpha requires grad, and that an independent eager reference agrees: NAME rebuilt in
        plain PyTorch with MODEL.pt's state, each rewritten layer computing
        `op(q_x, q_w) / (s_x s_w) + b` (PACT inputs, MinMax weights, 8 bits), the others in
        float. Prints the differences; exits 1 on disagreement.
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file


class Geometry(nn.Module):
    """Every convolution geometry of the rewrite, in one small network on 3x16x16 inputs."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(3, 8, (1, 7), padding=(0, 3))
        self.tall = nn.Conv2d(8, 8, (7, 1), padding=(3, 0), bias=False)
        self.stride12 = nn.Conv2d(8, 8, 3, stride=(1, 2), padding=1)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.replicate = nn.Conv2d(8, 8, 3, padding=(2, 1), dilation=(2, 1), padding_mode="replicate")
        self.circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", groups=2)
        self.same = nn.Conv2d(8, 8, 4, padding="same", dilation=(1, 2))
        self.valid = nn.Conv2d(8, 8, 3, padding="valid")
        # One shape with and without bias: one TorchScript class when scripted.
        self.biased = nn.Conv2d(8, 8, 1)
        self.plain = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = F.relu(self.tall(F.relu(self.wide(x))))
        x = F.relu(self.stride12(x))
        x = F.relu(self.reflect(x)) + F.relu(self.replicate(x)) + F.relu(self.circular(x))
        x = F.relu(self.valid(F.relu(self.same(x))))
        x = F.relu(self.bn(self.plain(F.relu(self.biased(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 6).flatten(1))


def vit():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    # torchvision starts the head at zero: the logits would be the bias whatever the rest
    # computes, and no comparison of logits could fail.
    with torch.no_grad():
        model.heads.head.weight.normal_(0.0, 0.2)
    return model


# name -> (constructor, input shape, trace too)
MODELS = {
    "geometry": (Geometry, (2, 3, 16, 16), True),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64), True),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64), True),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 64, 64), False),
    "vit": (vit, (2, 3, 32, 32), True),
}


def build_model(name):
    """The model `name` with fixed weights and BatchNorm statistics, in evaluation mode."""
    make, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, *shape[1:]))
    return model.eval()


def layer_paths(model):
    """Conv2d and Linear modules, and MultiheadAttention's packed input projection."""
    paths = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            paths.append(path)
        if isinstance(m, nn.MultiheadAttention):
            paths.append(path + ".in_proj")
    return paths


def build(out):
    os.makedirs(out, exist_ok=True)
    index = []
    for name, (_, shape, trace) in MODELS.items():
        model = build_model(name)
        torch.manual_seed(1)
        x = torch.randn(*shape)
        files = {"scripted": f"{name}_scripted.pt"}
        torch.jit.script(model).save(os.path.join(out, files["scripted"]))
        if trace:
            files["traced"] = f"{name}_traced.pt"
            # The check re-traces and compares graphs, which differ by class names alone for a ViT.
            torch.jit.trace(model, x, check_trace=False).save(os.path.join(out, files["traced"]))
        save_file({"x": x}, os.path.join(out, f"{name}-x.safetensors"))
        index.append({"name": name, "files": files, "layers": layer_paths(model)})
    with open(os.path.join(out, "models.json"), "w") as f:
        json.dump(index, f, indent=1)


BENCH = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vgg11_bn", "alexnet"]


def bench(out):
    os.makedirs(out, exist_ok=True)
    for name in BENCH:
        path = os.path.join(out, f"{name}.pt")
        if not os.path.exists(path):
            torch.manual_seed(0)
            torch.jit.script(getattr(torchvision.models, name)().eval()).save(path)


def pact(x, alpha, bits=8):
    """PACT quantization as the rewrite computes it: integers and the scale."""
    top = float(2 ** (bits - 1) - 1)
    a = torch.clamp(torch.nan_to_num(alpha.reshape([]), 1e-6, 3.4028234663852886e38, 1e-6), 1e-6, 3.4028234663852886e38)
    s = torch.full_like(a, top) / a
    return torch.round(torch.clamp(x * s, -top, top)), s


def minmax(w, bits=8):
    top = float(2 ** (bits - 1) - 1)
    m = torch.max(torch.abs(w))
    m = torch.where(m == 0.0, torch.ones_like(m), torch.clamp_min(m, 1e-30))
    s = torch.full_like(m, top) / m
    return torch.round(torch.clamp(w, -m, m) * s), s


def quantized_forward(module, alpha):
    """A replacement forward computing op(q_x, q_w) / (s_x s_w) + b, the rewrite's definition."""

    def forward(x):
        qx, sx = pact(x, alpha)
        qw, sw = minmax(module.weight)
        if isinstance(module, nn.Linear):
            acc = F.linear(qx, qw)
            shape = [-1]
        else:
            # _conv_forward applies padding_mode and padding='same' exactly as the float layer.
            acc = module._conv_forward(qx, qw, None)
            shape = [-1, 1, 1]
        y = acc / (sx * sw)
        return y if module.bias is None else y + module.bias.reshape(shape)

    return forward


def quantized_attention(module, alpha_in, alpha_out):
    """A replacement forward of nn.MultiheadAttention with both projections computing
    op(q_x, q_w) / (s_x s_w) + b and the attention between them in float (the rewrite's
    definition; the ViT calls it with need_weights=False and no masks)."""

    def project(x, alpha, qw, sw, b, start, size):
        qx, sx = pact(x, alpha)
        y = F.linear(qx, qw.narrow(0, start, size)) / (sx * sw)
        return y if b is None else y + b.narrow(0, start, size)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        assert key_padding_mask is None and attn_mask is None and not need_weights and not is_causal
        if module.batch_first:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        tgt, bsz, embed = query.shape
        src, heads = key.shape[0], module.num_heads
        hd = embed // heads
        qw, sw = minmax(module.in_proj_weight)
        b = module.in_proj_bias
        q = project(query, alpha_in, qw, sw, b, 0, embed).view(tgt, bsz * heads, hd).transpose(0, 1)
        k = project(key, alpha_in, qw, sw, b, embed, embed).view(src, bsz * heads, hd).transpose(0, 1)
        v = project(value, alpha_in, qw, sw, b, 2 * embed, embed).view(src, bsz * heads, hd).transpose(0, 1)
        attn = F.scaled_dot_product_attention(
            q.view(bsz, heads, tgt, hd), k.view(bsz, heads, src, hd), v.view(bsz, heads, src, hd), None, 0.0, False
        )
        attn = attn.permute(2, 0, 1, 3).contiguous().view(bsz * tgt, embed)
        wo, swo = minmax(module.out_proj.weight)
        out = project(attn, alpha_out, wo, swo, module.out_proj.bias, 0, wo.shape[0]).view(tgt, bsz, -1)
        return (out.transpose(1, 0) if module.batch_first else out), None

    return forward


def check(name, model_path, io_path):
    io = load_file(io_path)
    x, y = io["x"], io["y"]
    loaded = torch.jit.load(model_path, map_location="cpu").eval()
    with torch.no_grad():
        reload_diff = (loaded(x) - y).abs().max().item()
    state = loaded.state_dict()
    alphas = {k: v for k, v in loaded.named_parameters() if k.endswith("quantizer.alpha")}
    frozen = [k for k, v in alphas.items() if not v.requires_grad]
    reference = build_model(name)
    float_state = {k: v for k, v in state.items() if "_quantizer." not in k}
    reference.load_state_dict(float_state)
    rewritten = 0
    for path, m in reference.named_modules():
        key = f"{path}.x_quantizer.alpha"
        if key in alphas and isinstance(m, nn.MultiheadAttention):
            out = alphas[f"{path}.out_proj.x_quantizer.alpha"].detach()
            m.forward = quantized_attention(m, alphas[key].detach(), out)
            rewritten += 1
        elif key in alphas and not path.endswith("self_attention.out_proj"):
            m.forward = quantized_forward(m, alphas[key].detach())
            rewritten += 1
    with torch.no_grad():
        ref = reference(x)
    ref_diff = (ref - y).abs().max().item()
    scale = max(y.abs().max().item(), 1.0)
    print(
        f"{name}: reload max_abs_diff {reload_diff:.3g}, reference max_abs_diff {ref_diff:.3g} "
        f"over {rewritten} rewritten layers, {len(frozen)} frozen alphas"
    )
    ok = reload_diff <= 1e-5 and ref_diff <= 1e-5 * scale and not frozen and rewritten > 0
    sys.exit(0 if ok else 1)


def main():
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        build(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "bench":
        bench(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
