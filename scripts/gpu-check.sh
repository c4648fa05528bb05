#!/usr/bin/env bash
# The CUDA check, for a session that has the GPU machine. Two halves:
#
#   scripts/gpu-check.sh build    # here: build test and example binaries into gpu-bin/
#   scripts/gpu-check.sh run      # there (carry gpu-bin): run them against that machine's torch
#
# `run` executes every test binary (CUDA tests stop saying SKIPPED; the quantizers' autograd
# nodes take their libtorch path there, with no host sync in PACT), the trainer for two epochs
# on CUDA, a TorchScript layer rewrite with calibration and one fine-tuning epoch on CUDA, an
# epoch of approximate mode (the table products' libtorch gather path) on CUDA, the
# custom_net example (BatchNorm and residual blocks of approx_sequential) on CUDA, and
# the speed benchmark with --device cuda, each under a time box.
# gpu-bin/ is listed in .git/info/exclude by `build`, so it travels only when carried.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-run}" in
build)
    grep -qx 'gpu-bin/' .git/info/exclude 2>/dev/null || echo 'gpu-bin/' >> .git/info/exclude
    rm -rf gpu-bin && mkdir -p gpu-bin/tests
    cargo test --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | while read -r exe; do cp "$exe" gpu-bin/tests/; done
    cargo build --quiet --release --example train --example bench --example quantize_torchscript --example custom_net
    cp target/release/examples/{train,bench,quantize_torchscript,custom_net} gpu-bin/
    ls -la gpu-bin gpu-bin/tests
    ;;
run)
    torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    status=0
    for t in gpu-bin/tests/*; do
        echo "== $(basename "$t")"
        # The reload check needs the venv's Python; here the machine's python3 serves.
        timeout 300 "$t" --test-threads=1 2>&1 | grep -E "^test |test result|SKIPPED|panicked" || status=1
    done
    echo "== trainer on CUDA, 2 epochs"
    timeout 180 gpu-bin/train --device cuda --epochs 2 || status=1
    echo "== TorchScript layer rewrite on CUDA: calibrate, fine-tune one epoch"
    timeout 180 gpu-bin/quantize_torchscript --model tests/fixtures/rewrite/resnet_scripted.pt --device cuda \
        --x-quant pact --bits 4 --per-channel --calibrate 4 --finetune-epochs 1 --finetune-lr 1e-3 || status=1
    echo "== approximate mode on CUDA (table products through libtorch gathers), 1 epoch"
    timeout 180 gpu-bin/train --device cuda --epochs 1 --mode approx --multiplier drum:4 || status=1
    echo "== a network of your own (approx_sequential, BatchNorm, residual blocks) on CUDA: train, calibrate, QAT, reload"
    timeout 180 gpu-bin/custom_net --device cuda --epochs 1 --out gpu-bin/custom_net.safetensors || status=1
    echo "== benchmark on CUDA"
    timeout 240 gpu-bin/bench --device cuda --threads 1 || status=1
    exit $status
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
