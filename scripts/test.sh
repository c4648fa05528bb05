#!/usr/bin/env bash
# Every check, on a fresh machine too: set-up (reused when cached), format,
# lints, docs, then all tests. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings
echo "== cargo doc (warnings are errors)"
# The examples too: with them the dependencies resolve the features clippy and the tests
# use (dev-dependencies unify theirs), so libtorch's C++ is not compiled once more for docs.
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps --lib --examples
if .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "== CUDA is available: CUDA tests run"
else
    echo "== no CUDA device here: CUDA tests (cpu_and_cuda_agree, device mismatch, CUDA passes of device-generic tests) are SKIPPED"
fi
echo "== cargo test"
cargo test
# The `nccl` feature (c10d's NCCL group) is compiled by `scripts/checks/gpu-check.sh build`
# and `scripts/checks/nccl-lint.sh`, not here: it recompiles the C++ glue, two more minutes.
