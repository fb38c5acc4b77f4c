#!/usr/bin/env bash
# The project's tests: the Rust workspace, then the Python package installed as a user installs
# it (`pip install .` into a fresh virtual environment) and its pytest suite, which compares the
# package with the release `attnc` binary.
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k torch   # extra arguments go to pytest
#
# The virtual environment lives in $CARGO_TARGET_DIR (default target/)/python-venv; maturin,
# numpy, pytest and torch come from the package registry. A second run reuses the environment
# when it holds the same pinned packages, and reinstalls only attnc. PYTHON chooses the
# interpreter (default python3, CPython >= 3.9); ATTNC_TEST_VENV names an existing virtual
# environment to use instead (the pinned packages are installed into it where missing).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

# Pinned so every run tests the same stack; torch is the largest download (about 3 GB installed
# with the CUDA libraries PyPI's Linux wheel depends on, though only its CPU side is used).
REQUIREMENTS=(
    "maturin==1.16.0"
    "numpy==2.4.6"
    "pytest==9.2.0"
    "torch==2.15.0"
)

section() { printf '\n== %s ==\n' "$*"; }

section "cargo test --workspace"
cargo test --workspace

target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
python="${PYTHON:-python3}"
# Wheels are installed straight from the download (no second copy in pip's cache).
pip_install=(-m pip install --quiet --no-cache-dir)

if [[ -n "${ATTNC_TEST_VENV:-}" ]]; then
    venv="$ATTNC_TEST_VENV"
    section "python environment ($venv, given)"
    "$venv/bin/python" "${pip_install[@]}" "${REQUIREMENTS[@]}"
else
    venv="$target/python-venv"
    stamp="$venv/.requirements"
    section "python environment ($venv)"
    if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]]; then
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/python" "${pip_install[@]}" --upgrade pip
        "$venv/bin/python" "${pip_install[@]}" "${REQUIREMENTS[@]}"
        echo "${REQUIREMENTS[*]}" >"$stamp"
    else
        echo "reusing it: ${REQUIREMENTS[*]}"
    fi
fi

section "pip install ."
# The build backend runs the `maturin` executable by name: the environment's bin/ comes first.
export PATH="$venv/bin:$PATH"
# maturin (installed above) builds the extension in release mode into $target; without build
# isolation pip uses that maturin instead of downloading another.
CARGO_TARGET_DIR="$target" "$venv/bin/python" "${pip_install[@]}" --no-build-isolation --force-reinstall --no-deps .

section "attnc binary (the reference the package is compared with)"
CARGO_TARGET_DIR="$target" cargo build --release --bin attnc

section "pytest"
# From outside the checkout, so `import attnc` is the installed package, not python/attnc.
cd "$target"
ATTNC_CLI="$target/release/attnc" CARGO_TARGET_DIR="$target" \
    "$venv/bin/python" -m pytest "$repo/python/tests" -p no:cacheprovider "$@"
