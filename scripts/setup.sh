#!/usr/bin/env bash
# Install what dev-sync needs on a Debian/Ubuntu machine (system packages, a
# virtualenv with the project). Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# ssh and rsync for dev-sync itself; supervisor, node and npm for the tests of
# remote actions, cron for those of idle auto-stop (the sandbox remote is this machine).
for pkg in openssh-server openssh-client rsync supervisor cron; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v pm2 >/dev/null 2>&1; then
  echo "installing pm2"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo npm install -g --silent pm2 >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
