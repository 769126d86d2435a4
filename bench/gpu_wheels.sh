#!/usr/bin/env bash
# Run HERE (a machine with the package registries), before a GPU session's first device call:
# fetches the pure-Python wheels the test suite uses that the GPU image lacks into .whl/
# (git-ignored; name it in the device call's `carry`). bench/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    "snntorch>=0.9" "gguf>=0.17" "submitit>=1.5"
ls -l .whl
