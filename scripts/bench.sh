#!/usr/bin/env bash
# Speed benchmark, all in one run on this machine: our quantizers (release build), the
# memory-copy bound (libtorch copy_ into a preallocated tensor, and clone) and the PyTorch reference
# (scripts/checks/bench_reference.py), the table GEMM, whole networks against float (LeNet-5,
# ResNet-18, torchvision models rewritten as TorchScript), then one table of ratios; JSON in
# target/bench/.
#   scripts/bench.sh                 # 1 and 2 threads, 1,000 to 16Mi elements
#   BENCH_THREADS=1 scripts/bench.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
threads="${BENCH_THREADS:-1,2}"
mkdir -p target/bench
cargo build --quiet --release --example bench --example train
echo "== PyTorch reference (threads ${threads})"
.venv/bin/python scripts/checks/bench_reference.py --threads ${threads//,/ } --out target/bench/reference.json
echo "== torchvision models for the torchscript[] rows (target/bench/models)"
.venv/bin/python scripts/checks/vision_models.py bench target/bench/models
echo "== ours, with the bound and the reference ratios (ratios > 1 mean ours is faster)"
./target/release/examples/bench --threads "$threads" --reference target/bench/reference.json \
    --models target/bench/models --out target/bench/latest.json "$@"
