#!/usr/bin/env bash
# The main job on the built-in sandbox remote: a private sshd on 127.0.0.1,
# the sample app in examples/sample-app, and `dev-sync up` watching it.
# Edit files under examples/sample-app and watch them land in the sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dev-sync sandbox start
exec .venv/bin/dev-sync up --config examples/sample-app/dev-sync.toml "$@"
