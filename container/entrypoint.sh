#!/bin/sh
# The image's entry point, run under tini (-s: it reaps children and forwards signals also
# when it is not PID 1, as under `buildah run`).
#
#   IMAGE                     -> voice-agent run [--config /config/agent.yaml]
#   IMAGE --mode vad ...      -> voice-agent run [--config ...] --mode vad ...
#   IMAGE models list         -> voice-agent models list   (any voice-agent subcommand)
#   IMAGE sh -c '...'         -> runs as given
#
# Config: /config/agent.yaml when it exists (VOICE_AGENT_CONFIG names another file), then the
# VOICE_AGENT__SECTION__KEY environment on top (the image sets state_dir=/data and the API on
# 0.0.0.0:8765 that way). Audio: with PULSE_SERVER set, ALSA's default device is routed to
# that PulseAudio/PipeWire server; otherwise ALSA devices (--device /dev/snd) are used as is.
set -eu

case "${1:-}" in
  "" | -*) set -- run "$@" ;;
esac
case "$1" in
  run | transcribe | emotion | speakers | diarize | say | call | check-config | devices | models \
    | service) ;;
  *) exec "$@" ;;
esac

if [ -n "${PULSE_SERVER:-}" ] && [ -z "${ALSA_CONFIG_PATH:-}" ]; then
  # PortAudio (Debian 12) speaks ALSA only: point ALSA's default at the pulse plugin.
  # A file of our own, so that a read-only or foreign home directory does not matter.
  conf=${TMPDIR:-/tmp}/voice-agent-asound.conf
  printf '%s\n' '</usr/share/alsa/alsa.conf>' 'pcm.!default pulse' 'ctl.!default pulse' \
    >"$conf"
  export ALSA_CONFIG_PATH="$conf"
fi

if [ "$1" = run ]; then
  state=${VOICE_AGENT__STATE_DIR:-/data}
  mkdir -p "$state" 2>/dev/null || true
  if ! [ -w "$state" ]; then
    # Fail here with the fix, rather than on the first journal write deep in the daemon.
    echo "voice-agent: state directory $state is not writable by uid $(id -u);" \
      "chown $(id -u):$(id -g) the host directory mounted there" >&2
    exit 2
  fi
  config=${VOICE_AGENT_CONFIG:-/config/agent.yaml}
  shift
  has_config=no
  for a in "$@"; do
    case "$a" in -c | --config | --config=*) has_config=yes ;; esac
  done
  if [ "$has_config" = no ] && [ -f "$config" ]; then
    set -- --config "$config" "$@"
  fi
  set -- run "$@"
fi
exec voice-agent "$@"
