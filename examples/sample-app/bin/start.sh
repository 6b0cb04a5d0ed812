#!/bin/sh
# Start the sample app: the API in the background, the web front end in the
# foreground (Ctrl-C stops both). Logs go to tmp/, which is never synced.
set -eu
cd "$(dirname "$0")/.."
mkdir -p tmp
python3 services/api/server.py >tmp/api.log 2>&1 &
api=$!
trap 'kill "$api" 2>/dev/null || true' EXIT INT TERM
if command -v node >/dev/null 2>&1; then
    node services/web/index.js
else
    echo "node not found: only the API runs (http://127.0.0.1:${API_PORT:-8000}/health)"
    wait "$api"
fi
