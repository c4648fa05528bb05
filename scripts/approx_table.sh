#!/usr/bin/env bash
# docs/approx.md's approximate-multiplier table: LeNet-5 trained with 8-bit QAT on the embedded
# digits, then evaluated through each multiplier's table before and after 1 and 2 epochs of
# approximate-aware retraining (release build, 1 thread). Prints markdown rows.
#   bash scripts/approx_table.sh [MULTIPLIER ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --quiet --release --example train --example multiplier
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
train=./target/release/examples/train
acc() { python3 -c 'import json,sys; print("%.2f" % (100 * json.load(sys.stdin)["test_accuracy"]))'; }
base="$($train --model lenet --mode quant --epochs 10 --threads 1 --save "$tmp/q8.safetensors" --json | acc)"
echo "| multiplier | MRED | error rate | 8-bit QAT network through it | after 1 epoch of retraining | after 2 epochs |"
echo "| --- | --- | --- | --- | --- | --- |"
echo "| (8-bit Quantized mode, no table) | - | - | $base | - | - |"
for m in "${@:-exact truncated:6 mitchell drum:4 drum:3}"; do
    for spec in $m; do
        mred="$(./target/release/examples/multiplier --multiplier "$spec" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.4f %.3f" % (d["mred"], d["error_rate"]))')"
        before="$($train --model lenet --mode approx --multiplier "$spec" --load "$tmp/q8.safetensors" --epochs 0 --threads 1 --json | acc)"
        one="$($train --model lenet --mode approx --multiplier "$spec" --load "$tmp/q8.safetensors" --epochs 1 --lr 1e-4 --threads 1 --json | acc)"
        two="$($train --model lenet --mode approx --multiplier "$spec" --load "$tmp/q8.safetensors" --epochs 2 --lr 1e-4 --threads 1 --json | acc)"
        echo "| \`$spec\` | ${mred% *} | ${mred#* } | $before | $one | $two |"
    done
done
