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
#
#   scripts/setup.sh --project DIR   # instead make the Cargo crate at DIR build and run with
#                                    # plain `cargo build` / `cargo run`, nothing exported; writes
#                                    # only into DIR and the cache (the checkout may be read-only)
# writes DIR/.cargo/config.toml: LIBTORCH set to the cached venv's torch folder (absolute,
# so the crate does not depend on this checkout) and an rpath to its lib folder.
set -euo pipefail

project=""
while [ $# -gt 0 ]; do
    case "$1" in
    --project)
        [ $# -ge 2 ] || { echo "setup: --project needs a folder" >&2; exit 2; }
        project="$2"
        shift 2
        ;;
    *)
        echo "setup: unknown argument $1 (usage: scripts/setup.sh [--project DIR])" >&2
        exit 2
        ;;
    esac
done
if [ -n "$project" ] && [ ! -f "$project/Cargo.toml" ]; then
    echo "setup: --project $project: no Cargo.toml there" >&2
    exit 2
fi

TORCH_VERSION="2.11.0"
# torchvision's release paired with that torch (it pins torch==2.11.0, so pip keeps ours);
# tests build resnet18, mobilenet and a small ViT from it.
TORCHVISION_VERSION="0.26.0"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${TORCHAPPROX_CACHE:-$HOME/.cache/torchapprox}"
venv="$cache/venv-torch-$TORCH_VERSION"
py="$venv/bin/python"

have_torch() {
    [ -x "$py" ] && "$py" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'PY' >/dev/null 2>&1
import sys, torch, torchvision, numpy, safetensors
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert torchvision.__version__.split("+")[0] == sys.argv[2], torchvision.__version__
PY
}

if have_torch; then
    echo "setup: reusing $venv ($("$py" -c 'import torch; print(torch.__version__)'))"
else
    echo "setup: installing torch==$TORCH_VERSION into $venv (about 4.6 GB, a few minutes)"
    mkdir -p "$cache"
    [ -x "$py" ] || python3 -m venv "$venv"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" numpy safetensors
    have_torch || { echo "setup: torch==$TORCH_VERSION or torchvision==$TORCHVISION_VERSION did not import from $venv" >&2; exit 1; }
    echo "setup: installed $("$py" -c 'import torch; print(torch.__version__)')"
fi

# c10d's Gloo process groups (torchapprox::distributed) need gloo's headers, which the
# wheel does not ship: Debian's libgloo-dev has them. Without them the crate still builds
# and its process groups say what is missing.
if [ ! -f /usr/include/gloo/config.h ] && [ ! -f /usr/local/include/gloo/config.h ] && [ -z "${GLOO_INCLUDE:-}" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing libgloo-dev (gloo's headers, for multi-process training)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev >/dev/null; } \
            || echo "setup: warning: could not install libgloo-dev; torchapprox::distributed will be unavailable" >&2
    else
        echo "setup: warning: gloo's headers are missing; install libgloo-dev (or set GLOO_INCLUDE) for torchapprox::distributed" >&2
    fi
fi

# The `nccl` feature (c10d's NCCL groups for CUDA tensors) compiles against CUDA's headers:
# the wheel's CUDA runtime package has most of them, these two small packages of the same
# CUDA release complete them (crt/host_config.h, libcu++'s <nv/target>). NCCL's own header
# comes with torch. Headers only: nothing here changes what torch loads.
CUDA_HEADER_PACKAGES=("nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85")
cuda_include="$("$py" -c 'import torch, os; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include"))')"
if [ -d "$cuda_include" ] && { [ ! -f "$cuda_include/crt/host_config.h" ] || [ ! -f "$cuda_include/cccl/nv/target" ]; }; then
    echo "setup: installing CUDA's remaining headers (${CUDA_HEADER_PACKAGES[*]}) for the nccl feature"
    "$py" -m pip install --quiet --no-deps "${CUDA_HEADER_PACKAGES[@]}" \
        || echo "setup: warning: could not install CUDA's headers; the nccl feature will not build" >&2
fi

torch_dir="$("$py" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
# With --project only the user's crate and the cache are written: the checkout may be read-only.
if [ -z "$project" ]; then
    ln -sfn "$torch_dir" "$root/.libtorch"
    ln -sfn "$venv" "$root/.venv"
    echo "setup: .libtorch -> $torch_dir"
    echo "setup: .venv -> $venv"
fi

if [ -n "$project" ]; then
    marker="# Written by torchapprox's scripts/setup.sh --project"
    config="$project/.cargo/config.toml"
    if [ -f "$config" ] && ! grep -qF "$marker" "$config"; then
        echo "setup: $config exists and was not written by this script; add these lines to it:" >&2
        echo "  [env] LIBTORCH = \"$torch_dir\", LIBTORCH_CXX11_ABI = \"1\"" >&2
        echo "  [build] rustflags = [\"-C\", \"link-arg=-Wl,-rpath,$torch_dir/lib\"]" >&2
        exit 1
    fi
    mkdir -p "$project/.cargo"
    cat > "$config" <<TOML
$marker: libtorch for tch/torch-sys, and an
# rpath so that binaries run without LD_LIBRARY_PATH. Rerun the script to refresh it.
[env]
LIBTORCH = "$torch_dir"
LIBTORCH_CXX11_ABI = "1"

[build]
rustflags = ["-C", "link-arg=-Wl,-rpath,$torch_dir/lib"]
TOML
    echo "setup: $config -> $torch_dir"
fi
