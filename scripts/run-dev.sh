#!/usr/bin/env bash
# `make run`: a local gateway. Upstream is the bundled simulator unless OPENAI_API_KEY is set.
# Expects Redis and Postgres to answer (scripts/services.sh ensure) and the venv (make venv).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export GATEWAY_ENV="${GATEWAY_ENV:-dev}"
export GATEWAY_PORT="${GATEWAY_PORT:-8080}"
export GATEWAY_SPILL_DIR="${GATEWAY_SPILL_DIR:-./var/spill}"
SIM_PORT="${SIM_PORT:-8081}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$BIN/gateway" migrate
if [ -z "${OPENAI_API_KEY:-}" ]; then
  "$BIN/gateway" simulate --port "$SIM_PORT" &
  pids+=($!)
  export OPENAI_BASE_URL="http://127.0.0.1:${SIM_PORT}/v1"
  export OPENAI_API_KEY="sk-simulator-local"
  upstream="the bundled simulator on $OPENAI_BASE_URL"
  for _ in $(seq 50); do
    "$BIN/python" -c "import socket,sys; socket.create_connection(('127.0.0.1', $SIM_PORT), 0.2)" \
      2>/dev/null && break
    sleep 0.1
  done
else
  upstream="OpenAI at ${OPENAI_BASE_URL:-https://api.openai.com/v1}"
fi
KEY="$("$BIN/python" -m app.devsetup)"
cat <<MSG

  Gateway on http://127.0.0.1:${GATEWAY_PORT} (WebSocket: ws://127.0.0.1:${GATEWAY_PORT}/v1/responses)
  Upstream: ${upstream}
  Dev key (team "dev", shown once): ${KEY}

  Run one real turn through it (openai-python's WebSocket client), in another shell:

    .venv/bin/python scripts/one_turn.py --base-url http://127.0.0.1:${GATEWAY_PORT}/v1 --key ${KEY}

MSG
"$BIN/gateway" serve &
pids+=($!)
wait "${pids[-1]}"
