"""Writes BENCHMARKS.md from the JSON of scripts/bench.sh (target/bench/latest.json)."""
#
#     scripts/bench.sh                                  # measures; writes target/bench/latest.json
#     python3 scripts/bench_markdown.py                 # target/bench/latest.json -> BENCHMARKS.md
#     python3 scripts/bench_markdown.py IN.json OUT.md  # other paths
#
# Python 3 standard library only. The JSON is what examples/bench.rs writes:
#
#     {"device": "Cpu", "reference_torch": "2.11.0" | null,
#      "cases":  [{"threads", "n", "quantizer", "forward_s", "forward_out_s", "forward_backward_s",
#                  "bound_copy_s", "clone_s", "forward_over_bound", "forward_out_over_bound",
#                  "forward_backward_over_bound", "torch_forward_s", "torch_forward_backward_s",
#                  "speedup_forward_vs_torch", "speedup_forward_backward_vs_torch",
#                  "torch_fused_fake_quantize_s"}, ...],
#      "lenet":  [{"threads", "float_step_s", "quantized_step_s", "quantized_over_float",
#                  "torch_float_step_s", "torch_quantized_step_s"}, ...],
#      "approx": [{"threads", "layer", "lookups", "seconds", "lookups_per_s", "torch_s",
#                  "speedup_vs_torch"}, ...],
#      "networks": [{"network", "threads", "batch", "float_step_s", "quantized_step_s",
#                  "quantized_over_float"}, ...],
#      "torchscript": [{"model", "batch", "threads", "float_s", "quantized_s", "ratio",
#                  "step_ratio", "float_step_s", "quantized_step_s", "layers_rewritten",
#                  "left_in_float"}, ...],
#      "distributed": [{"processes", "threads", "samples_per_s", "allreduce_share", "seconds", "overlap"}, ...]}
#
# Times are seconds (medians); the PyTorch entries are null when bench ran without a reference.
# A missing or unreadable file ends with one line `error: ...` and exit status 1.

import datetime
import json
import math
import os
import sys

DEFAULT_IN = os.path.join("target", "bench", "latest.json")
DEFAULT_OUT = "BENCHMARKS.md"

# The fixed text before the tables; BENCHMARKS.md written by hand uses the same.
HEADER = """\
# Benchmarks

<!-- Written by scripts/bench_markdown.py from target/bench/latest.json: change the script, not this file. -->

Speed of the quantizers, of a LeNet-5 training step and of the approximate mode's
table GEMM, each against a bound or a PyTorch reference measured in the same run.
To measure again and regenerate this file:

```sh
scripts/bench.sh                     # 1 and 2 threads; BENCH_THREADS=1 scripts/bench.sh for one
python3 scripts/bench_markdown.py    # target/bench/latest.json -> BENCHMARKS.md
```

`scripts/bench.sh` builds `examples/bench.rs` in release mode, runs
`scripts/checks/bench_reference.py` (TorchApprox's semantics in PyTorch: `autograd.Function`
nodes, fake quantization as `quantize / scale`) and prints one table of ratios; the
JSON lands in `target/bench/latest.json`. Every time is a median.

- Two bounds: `copy_` into a preallocated tensor (8 bytes per element, no
  allocation) and `clone` (the same plus a fresh tensor's page faults, which any
  function returning a new tensor pays).
- `fwd` is fake quantization into a fresh tensor without gradient, `fwd-out` into a
  reused buffer (`f_fake_quantize_out`), `fwd+bwd` fake quantization of a leaf that
  requires grad followed by `sum().backward()`.
- Ratios against a bound are bound time / our time (1.0 = as fast as the bound);
  against PyTorch, PyTorch's time / ours (> 1: we are faster). A dash: no PyTorch
  reference in that run.
- The LeNet-5 step is one Adam step at batch 64, in float and quantized (PACT
  activations, MinMax weights, every layer). Since stop 27 its ratio is the median
  over 12 rounds of each round's ratio (15 steps of each network back to back), so
  that drift between rounds cancels; before, it was the ratio of the two medians.
- The table GEMM reads every product from the `drum:4` table; lookups are products
  per call. PyTorch's reference indexes the table with both operands' bytes, then sums.

Why the numbers are what they are, and what limits them:
[docs/speed.md](docs/speed.md) and
[docs/approx.md](docs/approx.md#speed-of-the-table-gemm).
"""

QUANTIZERS = {"minmax": "MinMax", "pact": "PACT", "lsq": "LSQ"}

LAYERS = {
    "lenet.conv1": "LeNet conv1 (1→6, 5×5, pad 2)",
    "lenet.conv2": "LeNet conv2 (6→16, 5×5)",
    "lenet.fc1": "LeNet fc1 (400→120)",
    "lenet.fc2": "LeNet fc2 (120→84)",
    "lenet.fc3": "LeNet fc3 (84→10)",
    "linear.512x512x1024": "Linear 512 rows × 512 → 1024",
}

DASH = "—"


def number(v):
    """A finite float, or None for null, missing or non-numeric values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def three_digits(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def seconds(v):
    """Seconds as µs, ms or s with three significant digits."""
    v = number(v)
    if v is None:
        return DASH
    if v >= 1:
        return f"{three_digits(v)} s"
    if v >= 1e-3:
        return f"{three_digits(v * 1e3)} ms"
    return f"{three_digits(v * 1e6)} µs"


def millis(v):
    """Seconds as milliseconds with two decimals (LeNet-5 steps)."""
    v = number(v)
    return DASH if v is None else f"{v * 1e3:.2f} ms"


def ratio(v):
    v = number(v)
    return DASH if v is None else f"{v:.2f}"


def speedup(v):
    v = number(v)
    return DASH if v is None else f"{v:.1f}×"


def times(v):
    v = number(v)
    return DASH if v is None else f"{v:.2f}×"


def quotient(a, b):
    a, b = number(a), number(b)
    return a / b if a is not None and b else None


def elements(n):
    n = number(n)
    if n is None:
        return DASH
    n = int(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}Mi"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}Ki"
    return f"{n:,}"


def count(n):
    """A count as 54K, 7.5M, 268M, 1.2G."""
    n = number(n)
    if n is None:
        return DASH
    if n >= 1e9:
        return f"{n / 1e9:.1f}G"
    if n >= 1e6:
        m = n / 1e6
        return f"{m:.0f}M" if m >= 100 else f"{m:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return f"{n:.0f}"


def rate(v):
    """A rate as 1.37e9."""
    v = number(v)
    if v is None or v <= 0:
        return DASH
    e = math.floor(math.log10(v))
    m = round(v / 10**e, 2)
    if m >= 10:
        m, e = m / 10, e + 1
    return f"{m:.2f}e{e}"


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def by_threads(entries):
    """Entries grouped by their thread count, in order of first appearance."""
    groups = {}
    for e in entries:
        if isinstance(e, dict):
            groups.setdefault(e.get("threads"), []).append(e)
    return groups.items()


def threads_heading(t):
    return f"### {t} thread" + ("" if t == 1 else "s")


def entries(report, key):
    v = report.get(key)
    return v if isinstance(v, list) else []


def quantizer_tables(cases):
    out = []
    head = ["elements", "quantizer", "fwd", "fwd-out", "fwd+bwd", "fwd / clone", "fwd-out / copy",
            "fwd+bwd / clone", "vs PyTorch fwd", "vs PyTorch fwd+bwd"]
    for t, group in by_threads(cases):
        rows = []
        for c in group:
            q = c.get("quantizer")
            rows.append([
                elements(c.get("n")),
                QUANTIZERS.get(q, f"`{q}`"),
                seconds(c.get("forward_s")),
                seconds(c.get("forward_out_s")),
                seconds(c.get("forward_backward_s")),
                ratio(quotient(c.get("clone_s"), c.get("forward_s"))),
                ratio(quotient(c.get("bound_copy_s"), c.get("forward_out_s"))),
                ratio(quotient(c.get("clone_s"), c.get("forward_backward_s"))),
                speedup(c.get("speedup_forward_vs_torch")),
                speedup(c.get("speedup_forward_backward_vs_torch")),
            ])
        out += [threads_heading(t), "", table(head, rows), ""]
    return out


def lenet_table(lenet):
    head = ["threads", "float", "quantized", "quantized / float", "PyTorch float", "PyTorch quantized",
            "PyTorch quantized / float"]
    rows = []
    for e in lenet:
        if not isinstance(e, dict):
            continue
        q_over_f = number(e.get("quantized_over_float"))
        if q_over_f is None:
            q_over_f = quotient(e.get("quantized_step_s"), e.get("float_step_s"))
        rows.append([
            str(e.get("threads", DASH)),
            millis(e.get("float_step_s")),
            millis(e.get("quantized_step_s")),
            times(q_over_f),
            millis(e.get("torch_float_step_s")),
            millis(e.get("torch_quantized_step_s")),
            times(quotient(e.get("torch_quantized_step_s"), e.get("torch_float_step_s"))),
        ])
    return [table(head, rows), ""] if rows else []


def approx_tables(approx):
    out = []
    head = ["layer (batch 64)", "lookups", "ours", "lookups/s", "PyTorch", "speed-up"]
    for t, group in by_threads(approx):
        rows = []
        for e in group:
            layer = e.get("layer")
            lps = number(e.get("lookups_per_s"))
            if lps is None:
                lps = quotient(e.get("lookups"), e.get("seconds"))
            sp = number(e.get("speedup_vs_torch"))
            if sp is None:
                sp = quotient(e.get("torch_s"), e.get("seconds"))
            rows.append([
                LAYERS.get(layer, f"`{layer}`"),
                count(e.get("lookups")),
                seconds(e.get("seconds")),
                rate(lps),
                seconds(e.get("torch_s")),
                speedup(sp),
            ])
        out += [threads_heading(t), "", table(head, rows), ""]
    return out


def networks_table(networks):
    head = ["network", "threads", "batch", "float step", "quantized step", "quantized / float"]
    rows = [[
        f"`{e.get('network')}`", str(e.get("threads", DASH)), str(e.get("batch", DASH)),
        millis(e.get("float_step_s")), millis(e.get("quantized_step_s")),
        times(number(e.get("quantized_over_float"))),
    ] for e in networks if isinstance(e, dict)]
    return [table(head, rows), ""] if rows else []


def torchscript_table(rows_in):
    head = ["model", "threads", "batch", "float eval", "quantized eval", "ratio", "float step",
            "quantized step", "step ratio", "layers rewritten"]
    rows = []
    for e in rows_in:
        if not isinstance(e, dict):
            continue
        left = e.get("left_in_float") or []
        n = e.get("layers_rewritten")
        rows.append([
            f"`{e.get('model')}`", str(e.get("threads", DASH)), str(e.get("batch", DASH)),
            millis(e.get("float_s")), millis(e.get("quantized_s")), times(number(e.get("ratio"))),
            millis(e.get("float_step_s")), millis(e.get("quantized_step_s")),
            times(number(e.get("step_ratio"))),
            DASH if n is None else f"{n} of {n + len(left)}",
        ])
    return [table(head, rows), ""] if rows else []


def distributed_table(rows_in):
    head = ["processes", "threads each", "gradient sums", "samples/s", "speed-up", "sums after the pass (share of the time)"]
    rows, base = [], None
    for e in rows_in:
        if not isinstance(e, dict):
            continue
        sps = number(e.get("samples_per_s"))
        if base is None:
            base = sps
        when = "during the backward pass" if e.get("overlap") else "after the backward pass"
        if e.get("processes") == 1:
            when = DASH
        rows.append([str(e.get("processes", DASH)), str(e.get("threads", DASH)), when,
                     DASH if sps is None else f"{sps:.0f}", times(quotient(sps, base)),
                     DASH if number(e.get("allreduce_share")) is None else f"{100 * e['allreduce_share']:.1f}%"])
    return [table(head, rows), ""] if rows else []


def render(report, written):
    torch = report.get("reference_torch")
    run = [
        "## The run",
        "",
        f"Device `{report.get('device', '?')}`, float32; JSON written {written}; "
        + (f"PyTorch reference: torch {torch}." if isinstance(torch, str) else "no PyTorch reference."),
        "",
    ]
    parts = [HEADER, *run]
    cases, lenet, approx = entries(report, "cases"), entries(report, "lenet"), entries(report, "approx")
    if cases:
        parts += ["## Quantizers", "", *quantizer_tables(cases)]
    if lenet:
        parts += ["## LeNet-5 training step (batch 64, Adam)", "", *lenet_table(lenet)]
    if approx:
        parts += ["## Table GEMM of the approximate mode (`drum:4`)", "", *approx_tables(approx)]
    networks, torchscript = entries(report, "networks"), entries(report, "torchscript")
    if networks:
        parts += ["## The crate's networks: a training step, quantized against float", "",
                  "8-bit PACT inputs and MinMax weights; ResNet-18 is built with `approx_sequential` "
                  "(224x224 inputs, Adam).", "", *networks_table(networks)]
    distributed = entries(report, "distributed")
    if distributed:
        parts += ["## Data-parallel training (LeNet, 2 epochs of the embedded digits, 127.0.0.1)", "",
                  "The trainer as 1 process and under 2 ranks of c10d's Gloo group; samples per second over the "
                  "epochs (each with its evaluation).", "", *distributed_table(distributed)]
    if torchscript:
        parts += ["## torchvision models rewritten by `quantize_layers`", "",
                  "TorchScript from `torch.jit.script` (random weights, seed 0, 224x224 inputs), "
                  "8-bit PACT inputs (calibrated) and MinMax weights; evaluation without gradients, "
                  "and an SGD step in training mode.", "", *torchscript_table(torchscript)]
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv):
    src = argv[1] if len(argv) > 1 else DEFAULT_IN
    dst = argv[2] if len(argv) > 2 else DEFAULT_OUT
    if len(argv) > 3:
        raise SystemExit("usage: python3 scripts/bench_markdown.py [LATEST.json [BENCHMARKS.md]]")
    try:
        with open(src, "rb") as f:
            report = json.loads(f.read().decode("utf-8"))
        mtime = os.stat(src).st_mtime
    except FileNotFoundError:
        raise SystemExit(f"error: {src}: no such file (run scripts/bench.sh first)")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"error: {src}: {e}")
    if not isinstance(report, dict):
        raise SystemExit(f"error: {src}: expected a JSON object as examples/bench.rs writes it")
    written = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = render(report, written)
    # Atomically, as the crate writes its own files: a temporary beside the target, then a rename.
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, dst)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SystemExit(f"error: cannot write {dst}: {e}")
    print(f"wrote {dst} from {src}")


if __name__ == "__main__":
    main(sys.argv)
