#!/bin/sh
# Home Assistant add-on start: /data/options.json -> /tmp/agent.yaml (validated), then the
# daemon. The image's VOICE_AGENT__* defaults are dropped so that the options alone decide;
# state lives in /data, the add-on's persistent directory.
set -eu
OPTIONS=${OPTIONS:-/data/options.json}
CONFIG=${TMPDIR:-/tmp}/agent.yaml
HELPER=/opt/voice-agent/ha_options.py
PY=/opt/venv/bin/python

for var in $(env | sed -n 's/^\(VOICE_AGENT__[A-Za-z0-9_]*\)=.*/\1/p'); do
  unset "$var"
done
export VOICE_AGENT__STATE_DIR=/data

"$PY" "$HELPER" config "$OPTIONS" "$CONFIG" || exit 2

wyoming=$("$PY" -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1]));
print("yes" if (c.get("wyoming") or {}).get("enabled") else "no")' "$CONFIG")
if [ "$wyoming" = yes ] && [ -n "${SUPERVISOR_TOKEN:-}" ]; then
  # Announce Wyoming once the daemon answers; Home Assistant then offers to add it.
  (
    for _ in $(seq 1 120); do
      if "$PY" /opt/voice-agent/healthcheck.py >/dev/null 2>&1; then
        "$PY" "$HELPER" discover || true
        exit 0
      fi
      sleep 1
    done
  ) &
fi

exec /opt/voice-agent/entrypoint.sh run --config "$CONFIG" "$@"
