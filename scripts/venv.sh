# Sourced by quickstart.sh and test.sh (from the repository root): use the active virtual environment (venv or
# conda), else ./.venv, made here when missing. A new .venv sees the system's packages when the system Python
# already has torch, so that the torch a machine has (a CUDA build, say) is used instead of downloaded again.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    if python3 -c "import torch" 2>/dev/null; then
      python3 -m venv --system-site-packages .venv
    else
      python3 -m venv .venv
    fi
    echo "Made a virtual environment: .venv (later: . .venv/bin/activate)"
  fi
  . .venv/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  # The release the project is tested on. Left to the resolver, a plain `torch` is the newest release (on Linux a
  # CUDA build of several GB); for a CPU-only build, install torch first from pytorch.org's CPU index.
  echo "Installing torch 2.13.0 ..."
  python -m pip install --quiet torch==2.13.0
fi

# install_extra EXTRA MODULE...: `pip install -e '.[EXTRA]'` unless this checkout is installed with MODULE... already.
install_extra() {
  local extra=$1
  shift
  if ! python - "$@" 2>/dev/null <<'PY'
import importlib, os, sys
import backpack
assert os.path.dirname(os.path.dirname(os.path.abspath(backpack.__file__))) == os.getcwd()  # this checkout's
for name in sys.argv[1:]:
    importlib.import_module(name)
PY
  then
    echo "Installing this checkout with its [$extra] extra ..."
    python -m pip install --quiet -e ".[$extra]"
  fi
}
