#!/usr/bin/env bash
# docs/approx.md's table of error models: LeNet-5 trained with 8-bit QAT on the embedded digits,
# then evaluated through each built-in signed EvoApprox multiplier's table and under its noise
# model (the error's mean and std scaled to each layer's fan-in), with each evaluation's time
# (release build, 1 thread). Prints markdown rows.
#   bash scripts/noise_table.sh [MULTIPLIER ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --quiet --release --example train --example multiplier
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
train=./target/release/examples/train
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f %.2f" % (100 * d["test_accuracy"], d["seconds"]))'; }
base="$($train --model lenet --mode quant --epochs 10 --threads 1 --save "$tmp/q8.safetensors" --json | field)"
signed="$(./target/release/examples/multiplier --list --json | python3 -c 'import json,sys; print(" ".join(e["name"] for e in json.load(sys.stdin) if e["signed"]))')"
echo "| multiplier | power (mW) | MAE % | through the table: accuracy % | time (s) | under its noise model: accuracy % | time (s) |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
echo "| (8-bit Quantized mode) | - | - | ${base% *} | ${base#* } | - | - |"
for m in ${@:-$signed}; do
    figures="$(./target/release/examples/multiplier --list --json | python3 -c "import json,sys; e=[e for e in json.load(sys.stdin) if e['name']=='$m'][0]; print(e['power'], e['mae'])")"
    table="$($train --model lenet --mode approx --multiplier "$m" --load "$tmp/q8.safetensors" --epochs 0 --threads 1 --json | field)"
    noise="$($train --model lenet --mode noise --multiplier "$m" --load "$tmp/q8.safetensors" --epochs 0 --threads 1 --json | field)"
    echo "| \`$m\` | ${figures% *} | ${figures#* } | ${table% *} | ${table#* } | ${noise% *} | ${noise#* } |"
done
