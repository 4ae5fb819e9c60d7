#!/usr/bin/env bash
# The model tests on the oldest torch and transformers that setup.py admits, in a virtual environment of their own
# (default ${TMPDIR:-/tmp}/backpack-floor-venv; it is reused). What `pip install -e .` keeps on a machine that has an
# older torch is what these tests pass on.
#
#   bash scripts/test_floor_versions.sh                                   # the floors in setup.py
#   TORCH=2.11.0 TRANSFORMERS=5.17.0 bash scripts/test_floor_versions.sh  # any other pair
#   VENV=/tmp/other bash scripts/test_floor_versions.sh -k golden         # extra arguments go to pytest
#
# On Linux, PyPI's torch is a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
floor() { sed -nE "s/.*\"$1>=([0-9.]+).*/\1/p" setup.py | head -1; }
TORCH=${TORCH:-$(floor torch)}
TRANSFORMERS=${TRANSFORMERS:-$(floor transformers)}
# `X.Y` in setup.py is release X.Y.0
[[ $TORCH =~ ^[0-9]+\.[0-9]+$ ]] && TORCH=$TORCH.0
[[ $TRANSFORMERS =~ ^[0-9]+\.[0-9]+$ ]] && TRANSFORMERS=$TRANSFORMERS.0
VENV=${VENV:-${TMPDIR:-/tmp}/backpack-floor-venv}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "Installing torch $TORCH and transformers $TRANSFORMERS into $VENV ..."
python -m pip install --quiet "torch==$TORCH" "transformers==$TRANSFORMERS"
# The project on top, then its other requirements (the core, the export and peft extras, accelerate and pytest),
# without letting pip move torch or transformers: a pair below setup.py's floors can be tried too.
python -m pip install --quiet --no-deps -e .
requirements=$(python - <<'PY'
import re
from importlib.metadata import requires

for requirement in requires("backpack-gpt2"):
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
    extra = re.search(r'extra == "([^"]+)"', requirement)
    if name not in ("torch", "transformers") and (extra is None or extra.group(1) in ("export", "peft")):
        print(requirement.split(";")[0].replace(" ", ""))
PY
)
# shellcheck disable=SC2086  # one requirement a word
python -m pip install --quiet $requirements pytest accelerate "torch==$TORCH" "transformers==$TRANSFORMERS"
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python -m pytest -q tests/test_model.py tests/test_model_decoding.py tests/test_model_conventions.py \
    tests/test_model_hygiene.py "$@"
