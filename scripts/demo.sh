#!/usr/bin/env bash
# The main job on the built-in sandbox remote: a private sshd on 127.0.0.1,
# the sample app in examples/sample-app synced to it, its two services started
# there under supervisord, and `dev-sync up` watching. Edit files under
# examples/sample-app and watch them land (and the services restart).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cfg=examples/sample-app/dev-sync.toml
.venv/bin/dev-sync sandbox start
.venv/bin/dev-sync up --once --config "$cfg"
.venv/bin/dev-sync services install --config "$cfg"
echo "the sample app runs on the sandbox: http://127.0.0.1:13000/ (api on :18000)"
exec .venv/bin/dev-sync up --config "$cfg" "$@"
