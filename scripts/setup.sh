#!/usr/bin/env bash
# One-time set-up: a Python virtual environment holding PyPI's torch==2.11.0,
# whose bundled libtorch is what tch 0.24 builds and runs against.
#
# The venv lives in a cache folder outside the checkout so that CI runs and
# later clones reuse it (about 4.6 GB):
#   ${TORCHAPPROX_CACHE:-$HOME/.cache/torchapprox}/venv-torch-2.11.0
# The checkout gets a git-ignored link `.libtorch` to the venv's torch folder;
# `.cargo/config.toml` points LIBTORCH at it, so plain `cargo` works afterwards.
# Idempotent: a second run checks the install and only refreshes the link.
set -euo pipefail

TORCH_VERSION="2.11.0"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${TORCHAPPROX_CACHE:-$HOME/.cache/torchapprox}"
venv="$cache/venv-torch-$TORCH_VERSION"
py="$venv/bin/python"

have_torch() {
    [ -x "$py" ] && "$py" - "$TORCH_VERSION" <<'PY' >/dev/null 2>&1
import sys, torch, numpy, safetensors
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
PY
}

if have_torch; then
    echo "setup: reusing $venv ($("$py" -c 'import torch; print(torch.__version__)'))"
else
    echo "setup: installing torch==$TORCH_VERSION into $venv (about 4.6 GB, a few minutes)"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==$TORCH_VERSION" numpy safetensors
    have_torch || { echo "setup: torch==$TORCH_VERSION did not import from $venv" >&2; exit 1; }
    echo "setup: installed $("$py" -c 'import torch; print(torch.__version__)')"
fi

torch_dir="$("$py" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
ln -sfn "$torch_dir" "$root/.libtorch"
ln -sfn "$venv" "$root/.venv"
echo "setup: .libtorch -> $torch_dir"
echo "setup: .venv -> $venv"
