#!/bin/sh
# Installs models for the image: `voice-agent models install` into CACHE (a build cache that
# outlives the layer; the installer is idempotent, so a model already there is only checked,
# not downloaded and converted again), then copies each one into DEST.
#
#   install_models.sh CACHE DEST [ID ...]      # no ID: the manifest's default set
set -eu
cache=$1
dest=$2
shift 2
va=/opt/venv/bin/voice-agent
if [ $# -eq 0 ]; then
  # The default set, as the manifest names it (the installer's --default reads the same list).
  # shellcheck disable=SC2046 # one word per id, on purpose
  set -- $(/opt/venv/bin/python -c '
import os, yaml
with open(os.environ["VOICE_AGENT_MODELS_MANIFEST"]) as f:
    print(" ".join(yaml.safe_load(f).get("defaults") or []))')
fi
mkdir -p "$cache" "$dest"
"$va" models install --models-dir "$cache" --quiet "$@"
for id in "$@"; do
  src=$("$va" models path --models-dir "$cache" "$id")
  rm -rf "${dest:?}/$id"
  cp -a "$src" "$dest/$id"
done
"$va" models verify --models-dir "$dest" "$@"
ls -l "$dest"
