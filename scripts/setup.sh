#!/usr/bin/env bash
# Creates .venv with kvjax. Idempotent; safe to rerun, and quick when nothing changed.
#   bash scripts/setup.sh        what generation needs (jax, flax, tokenizers, gguf, ...)
#   bash scripts/setup.sh test   that plus the test tools: the CPU build of torch, transformers
# torch comes first and only if absent: a plain `pip install torch` on Linux fetches the CUDA
# build (gigabytes). Here the CPU wheel is local; elsewhere set
# KVJAX_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to take it from PyTorch's index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRA=${1:-}
case "$EXTRA" in
  "") SPEC="." ;;
  test) SPEC=".[test]" ;;
  *) echo "error: unknown extra '$EXTRA'; use no argument (generation) or 'test'" >&2; exit 2 ;;
esac
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  "${PIP[@]}" --upgrade pip
fi
# A stamp per extra remembers the pyproject.toml and this script it was installed from.
STAMP=".venv/.kvjax-setup${EXTRA:+-$EXTRA}"
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
if [ "$EXTRA" = test ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" ${KVJAX_TORCH_INDEX_URL:+--index-url "$KVJAX_TORCH_INDEX_URL"} "torch==2.13.0"
fi
"${PIP[@]}" -e "$SPEC"
if [ "$EXTRA" = test ]; then
  .venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" || {
    echo "warning: .venv has a CUDA build of torch; the tests need only the CPU build" \
         "(see the README)" >&2; }
fi
echo "$WANT" > "$STAMP"
