#!/usr/bin/env bash
# The README's test command: install what the suite needs into the project's virtual environment (the [dev]
# extra; Debian's Chromium and chromedriver for the browser test, when missing and this user may install them),
# then run the suite. Without a browser, the browser test is left out and the reason is printed.
#
#   bash scripts/test.sh              # the whole suite
#   bash scripts/test.sh -k senses    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
install_extra dev pytest selenium gradio onnxscript onnxruntime peft scipy accelerate datasets gensim

deselect=()
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Debian's chromium and chromium-driver for the browser test ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "note: could not install chromium"
  fi
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "note: leaving out the browser test (tests/test_demo.py::test_demo_in_browser): chromium or chromedriver" \
         "is not installed (as root: apt-get install chromium chromium-driver)"
    deselect=(--deselect tests/test_demo.py::test_demo_in_browser)
  fi
fi
python -m pytest -q tests "${deselect[@]}" "$@"
