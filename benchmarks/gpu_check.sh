#!/usr/bin/env bash
# The one-shot GPU check (project issue 23), run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh              # on the GPU machine (docs/gpu.md)
#   OUT=/some/dir bash benchmarks/gpu_check.sh --dry-run    # any CPU, tiny sizes (CI: tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --download                 # here, once: fill benchmarks/.wheels
#   OUT=... bash benchmarks/gpu_check.sh --parts tf32,merge # rerun some parts (installs again)
#
# The GPU machine has Python 3.12 with CUDA torch, transformers, peft, safetensors,
# pyyaml, pytest and hypothesis, but neither mergekit nor its small dependencies, and
# no package index. --download fetches those as manylinux wheels for CPython 3.12 into
# benchmarks/.wheels (git-ignored, about 3.5 MiB, carried with the working tree); the
# check installs them with --no-index: pydantic and immutables through pip's resolver
# (which upgrades typing-extensions only if the machine's is too old), mergekit with
# --no-deps (it lists `datasets`, which it never imports), then this project, built
# by hatchling from the same folder.
#
# Then benchmarks/gpu_check.py runs the parts, each in its own process under its own
# timeout, a failing part not stopping the next: its output is $OUT/gpu_<part>.txt and
# $OUT/gpu_summary.txt lists what passed. This script's own part is gpu_install.txt.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}  # the machine's own; the dry-run test passes its interpreter
WHEELS=benchmarks/.wheels
PINNED=(
    mergekit==0.1.5 immutables==0.21
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    # hatchling and what it needs in pip's isolated build environment
    hatchling==1.33.0 trove-classifiers==2026.9.21.13 packaging==26.4 pathspec==1.1.1
    pluggy==1.7.0 tomlkit==0.15.1
)

if [ "${1:-}" = "--download" ]; then
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PINNED[@]}" || exit
    du -sh "$WHEELS"
    exit
fi

: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

install() {
    echo "# Install (wheels from $WHEELS, no index)"
    started=$SECONDS
    if [ "$(ls "$WHEELS"/*.whl 2>/dev/null | wc -l)" -lt "${#PINNED[@]}" ]; then
        echo "missing wheels: $WHEELS has $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) of ${#PINNED[@]};" \
            "run bash benchmarks/gpu_check.sh --download and carry $WHEELS"
        return 1
    fi
    local pip=("$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-cache-dir
               --disable-pip-version-check)
    "${pip[@]}" pydantic==2.14.4 immutables==0.21 \
        && "${pip[@]}" --no-deps mergekit==0.1.5 \
        && "${pip[@]}" --no-deps . \
        || return
    echo "installed in $((SECONDS - started)) s"
    # The startup hook registers wudi in a fresh interpreter with no import of ours.
    (cd /tmp && PYTHONPATH= "$PYTHON" -c "from mergekit.merge_methods.registry import get; print('installed:', get('wudi').spec.pretty_name, 'registered in mergekit')") \
        && command -v mergekit-yaml
}

environment() {
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    "$PYTHON" -m pip list --disable-pip-version-check 2>/dev/null \
        | grep -iE '^(torch|transformers|peft|safetensors|mergekit|mergekit-wudi|pydantic|typing.extensions|accelerate|tokenizers) '
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
}

ARGS=("$@")
{
    if [ "${1:-}" = "--dry-run" ]; then
        echo "# Install: skipped (--dry-run)"
        status=0
    else
        install
        status=$?
    fi
    environment
    echo "install status: $status"
} >"$OUT/gpu_install.txt" 2>&1
"$PYTHON" benchmarks/gpu_check.py --out "$OUT" --install-status "$status" "${ARGS[@]}"
