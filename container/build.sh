#!/usr/bin/env bash
# Builds the voice-agent image with buildah (chroot isolation: no daemon, no user namespaces,
# works inside containers and VMs that refuse setrlimit), docker format (keeps HEALTHCHECK),
# with the layer cache.
#
#   bash container/build.sh [-t TAG] [-C CONTEXT] [BUILDAH-BUD-ARGS...]
#       -t TAG       image name (default localhost/voice-agent:latest)
#       -C CONTEXT   build context (default: the repo this script is in)
#   e.g. bash container/build.sh --build-arg MODELS="whisper-tiny.en-int8 whisper-base-int8"
#
# Environment:
#   BASE_IMAGE    start from this image instead of making one with container/mkbase.sh
#   TORCH_WHEELS  a directory with a CPU torch wheel, mounted into the build and given to pip
#                 with --find-links (default: /opt/wheels when it holds torch-*.whl). Without
#                 one, the build takes torch from download.pytorch.org's CPU index.
#   BUILD_CA      the host's CA bundle, mounted over the build's system bundle and given to
#                 pip (PIP_CERT), so that builds work behind a TLS-intercepting proxy (default:
#                 /etc/ssl/certs/ca-certificates.crt; BUILD_CA= to turn off). Build-time only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tag=localhost/voice-agent:latest
context=$(dirname "$here")
while (($#)); do
  case "$1" in
    -t) tag=$2; shift 2 ;;
    -C) context=$2; shift 2 ;;
    *) break ;;
  esac
done

args=(--isolation chroot --format docker --layers -f "$context/Containerfile" -t "$tag")
if [ -n "${BASE_IMAGE:-}" ]; then
  args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
else
  bash "$here/mkbase.sh"
fi
wheels=${TORCH_WHEELS:-/opt/wheels}
if compgen -G "$wheels/torch-*.whl" >/dev/null; then
  args+=(--volume "$wheels:/wheels:ro" --build-arg "CONVERT_PIP_ARGS=--find-links /wheels")
else
  args+=(--build-arg "CONVERT_PIP_ARGS=--extra-index-url https://download.pytorch.org/whl/cpu")
fi
# MODEL_SOURCES: a host directory of model source files (e.g. the emotion checkpoint) taken
# instead of downloading them (`voice-agent models install --from`), for offline builds.
if [ -n "${MODEL_SOURCES:-}" ]; then
  args+=(--volume "$(realpath "$MODEL_SOURCES"):/model-sources:ro"
         --build-arg "MODEL_SOURCES=/model-sources")
fi
ca=${BUILD_CA-/etc/ssl/certs/ca-certificates.crt}
if [ -n "$ca" ] && [ -f "$ca" ]; then
  args+=(--volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro"
         --build-arg "PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
fi
echo "==> buildah bud ${args[*]} $* $context"
start=$(date +%s)
buildah bud "${args[@]}" "$@" "$context"
echo "==> built $tag in $(($(date +%s) - start)) s"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag"
