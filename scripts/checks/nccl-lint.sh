#!/usr/bin/env bash
# The `nccl` feature's code (c10d's NCCL group for CUDA tensors) compiled and linted, on a
# machine without a GPU too: it needs CUDA's and NCCL's headers, which scripts/setup.sh puts
# in the venv. About two minutes (the C++ glue is compiled again with the feature's flags);
# kept out of scripts/test.sh for that reason. It runs only on a GPU (gpu-check.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ ! -f .libtorch/../nvidia/cu13/include/crt/host_config.h ]; then
    echo "nccl-lint: CUDA's headers are missing: run scripts/setup.sh" >&2
    exit 1
fi
cargo clippy --quiet --lib --features nccl -- -D warnings
echo "nccl-lint: the nccl feature compiles and passes clippy"
