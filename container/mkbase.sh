#!/usr/bin/env bash
# Builds the base image (Debian 12 "bookworm", slim) from Debian packages alone, because no
# image registry may be reachable: mmdebstrap makes a minbase root file system, trimmed like
# the official bookworm-slim (no man pages, docs, locales; no recommends), and it is imported
# as an OCI image. The Containerfile starts FROM it (build-arg BASE_IMAGE).
#
#   sudo bash container/mkbase.sh [IMAGE]          # default localhost/voice-agent-base:bookworm-slim
#   MIRROR=http://deb.debian.org/debian SUITE=bookworm ARCH=arm64 ... (arm64 needs qemu-user-static)
#
# Needs: mmdebstrap, and podman (import) or buildah. Idempotent: an existing image is kept
# unless REBUILD=1.
set -euo pipefail

IMAGE=${1:-localhost/voice-agent-base:bookworm-slim}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
ARCH=${ARCH:-$(dpkg --print-architecture)}

have() { command -v "$1" >/dev/null 2>&1; }
exists() {  # podman and buildah share one image store
  if have podman; then podman image exists "$IMAGE"
  else [ -n "$(buildah images -q "$IMAGE" 2>/dev/null)" ]; fi
}
if exists && [ "${REBUILD:-0}" != 1 ]; then
  echo "==> $IMAGE exists (REBUILD=1 to make it again)"
  exit 0
fi
have mmdebstrap || { echo "mmdebstrap is missing: apt-get install mmdebstrap" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "==> mmdebstrap $SUITE ($ARCH) from $MIRROR"
# The dpkg path excludes and apt options are written into the image (/etc/dpkg/dpkg.cfg.d,
# /etc/apt/apt.conf.d), so packages installed later in the Containerfile stay slim as well.
# merged-usr hook: /usr is merged by mmdebstrap itself, instead of installing usrmerge (which
# pulls in the whole of perl, 50 MB).
# shellcheck disable=SC2016 # "$1" in the hooks is mmdebstrap's, expanded by it
mmdebstrap --variant=minbase --architectures="$ARCH" --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include=ca-certificates \
  --aptopt='APT::Install-Recommends "false"' \
  --aptopt='APT::Install-Suggests "false"' \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
  --customize-hook='rm -f "$1"/etc/machine-id && : > "$1"/etc/machine-id' \
  "$SUITE" "$tmp/rootfs.tar" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb $SECURITY $SUITE-security main"

echo "==> importing as $IMAGE ($(du -h "$tmp/rootfs.tar" | cut -f1) tar)"
if have podman; then
  podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    "$tmp/rootfs.tar" "$IMAGE" >/dev/null
elif have buildah; then
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$tmp/rootfs.tar" / >/dev/null
  buildah config --cmd /bin/bash --env LANG=C.UTF-8 "$ctr"
  buildah commit --rm "$ctr" "$IMAGE" >/dev/null
else
  echo "neither podman nor buildah found" >&2
  exit 1
fi
echo "==> $IMAGE ready"
