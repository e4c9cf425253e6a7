#!/usr/bin/env bash
# Installs what the VS Code end-to-end test needs, each step only when missing: Debian's Chromium
# and ripgrep plus code-server's build dependencies, code-server in editors/vscode/.e2e (offline:
# its ripgrep download is served from a cache seeded with Debian's rg), Playwright in the venv.
# Usage: setup-e2e.sh PYTHON (the venv's python)
set -euo pipefail
python=${1:?usage: setup-e2e.sh PYTHON}
e2e="$(cd "$(dirname "$0")/.." && pwd)/.e2e"
code_server_version=4.100.3  # VS Code 1.100.3, the last release that runs on Node 20
ripgrep_cache="${TMPDIR:-/tmp}/vscode-ripgrep-cache-1.15.11"
ripgrep_tarball=ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz
apt_packages=(chromium ripgrep libkrb5-dev libx11-dev libxkbfile-dev libsecret-1-dev pkg-config build-essential)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for package in "${apt_packages[@]}"; do installed "$package" || missing+=("$package"); done
if ((${#missing[@]})); then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

installed_version() { node -p "require('$e2e/node_modules/code-server/package.json').version" 2>/dev/null; }

if [ "$(installed_version)" != "$code_server_version" ]; then
  if [ ! -f "$ripgrep_cache/$ripgrep_tarball" ]; then
    staging=$(mktemp -d)
    cp "$(command -v rg)" "$staging/rg"
    mkdir -p "$ripgrep_cache"
    tar -czf "$ripgrep_cache/$ripgrep_tarball" -C "$staging" rg
    rm -rf "$staging"
  fi
  mkdir -p "$e2e"
  [ -f "$e2e/package.json" ] || echo '{"private": true}' > "$e2e/package.json"
  echo "installing code-server $code_server_version in $e2e (log: $e2e/install.log)"
  if ! (cd "$e2e" && npm_config_yes=true npm install "code-server@$code_server_version" \
    --unsafe-perm --foreground-scripts --no-audit --no-fund) > "$e2e/install.log" 2>&1; then
    tail -n 40 "$e2e/install.log"
    exit 1
  fi
fi

"$python" -c "import playwright" 2>/dev/null || "$python" -m pip install -q "playwright>=1.50,<2"
