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
# MODEL_SOURCES (build.sh mounts it): source files to take instead of downloading them. A
# model whose files are not there is installed the usual way below.
if [ -n "${MODEL_SOURCES:-}" ] && [ -d "$MODEL_SOURCES" ]; then
  for id in "$@"; do
    "$va" models path --models-dir "$cache" "$id" >/dev/null 2>&1 && continue
    "$va" models install --models-dir "$cache" --quiet --from "$MODEL_SOURCES" "$id" ||
      echo "$id: not in $MODEL_SOURCES (installed the usual way below)"
  done
fi
"$va" models install --models-dir "$cache" --quiet "$@"
for id in "$@"; do
  src=$("$va" models path --models-dir "$cache" "$id")
  rm -rf "${dest:?}/$id"
  cp -a "$src" "$dest/$id"
done
"$va" models verify --models-dir "$dest" "$@"
ls -l "$dest"
