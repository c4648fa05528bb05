#!/usr/bin/env bash
# The CUDA check: every test binary, and the examples' CUDA paths, on a machine with a GPU.
#
#   scripts/checks/gpu-check.sh build   # compile the test binaries and release examples into gpu-bin/
#   scripts/checks/gpu-check.sh run     # on the GPU machine (gpu-bin/ carried there): run every step
#
# gpu-bin/ is git-ignored, so it travels to another machine only when carried. `run` uses that
# machine's torch (`python3 -c 'import torch'`), runs each step under a time box, prints one
# line per step and a closing `N passed, M failed` summary, and exits non-zero if a step failed.
# What it covers on CUDA: the device-generic tests (which print SKIPPED without CUDA), the
# quantizers' libtorch path, training, a TorchScript layer rewrite with calibration and
# fine-tuning, approximate mode's gather path, a network of approx_sequential, the benchmark,
# and c10d's NCCL group (everything is built with the `nccl` feature): the distributed tests'
# NCCL ranks, and the trainer under torchrun with one rank per GPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

build() {
    rm -rf gpu-bin && mkdir -p gpu-bin/tests
    cargo test --features nccl --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | while read -r exe; do cp "$exe" gpu-bin/tests/; done
    cargo build --quiet --release --features nccl --example train --example bench --example quantize_torchscript --example custom_net
    cp target/release/examples/{train,bench,quantize_torchscript,custom_net} gpu-bin/
    ls gpu-bin gpu-bin/tests
}

passed=0
failed=0
failures=()

# record NAME STATUS: counts a step's outcome and says it.
record() {
    if [ "$2" -eq 0 ]; then
        passed=$((passed + 1))
        echo "-- ok: $1"
    else
        failed=$((failed + 1))
        failures+=("$1")
        echo "-- FAILED: $1"
    fi
}

# step NAME SECONDS COMMAND...: runs COMMAND under a time box.
step() {
    local name="$1" seconds="$2"
    shift 2
    echo "== $name"
    timeout "$seconds" "$@"
    record "$name" $?
}

# test_step BINARY: runs one test binary under a time box, keeping the lines that say what happened.
test_step() {
    local name="tests: $(basename "$1")"
    echo "== $name"
    timeout 300 "$1" --test-threads=1 2>&1 | grep -E "^test |test result|SKIPPED|panicked"
    record "$name" "${PIPESTATUS[0]}"
}

run() {
    local torch_lib
    torch_lib="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    for t in gpu-bin/tests/*; do
        test_step "$t"
    done
    step "train on CUDA, 2 epochs" 180 gpu-bin/train --device cuda --epochs 2
    step "TorchScript layer rewrite on CUDA: calibrate, fine-tune one epoch" 180 \
        gpu-bin/quantize_torchscript --model tests/fixtures/rewrite/resnet_scripted.pt --device cuda \
        --x-quant pact --bits 4 --per-channel --calibrate 4 --finetune-epochs 1 --finetune-lr 1e-3
    step "approximate mode on CUDA (table products through libtorch gathers), 1 epoch" 180 \
        gpu-bin/train --device cuda --epochs 1 --mode approx --multiplier drum:4
    step "approx_sequential network on CUDA: train, calibrate, QAT, reload" 180 \
        gpu-bin/custom_net --device cuda --epochs 1 --out gpu-bin/custom_net.safetensors
    step "benchmark on CUDA" 240 gpu-bin/bench --device cuda --threads 1
    # NCCL runs one rank per GPU (two ranks on one GPU are refused): with one GPU the test
    # binaries' NCCL check runs one rank, and the trainer's two-rank run needs two GPUs.
    local gpus
    gpus="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
    if [ "$gpus" -ge 2 ]; then
        step "trainer under torchrun, 2 ranks on NCCL, 1 epoch" 240 \
            python3 -m torch.distributed.run --no-python --nproc-per-node 2 --master-port 29517 \
            gpu-bin/train --device cuda --dist-backend nccl --epochs 1 --json
    else
        echo "== trainer under torchrun on NCCL: SKIPPED ($gpus GPU; NCCL needs one per rank)"
    fi
    echo
    for f in "${failures[@]}"; do echo "failed: $f"; done
    echo "gpu-check: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

case "${1:-}" in
build) build ;;
run) run ;;
*)
    echo "usage: scripts/checks/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
