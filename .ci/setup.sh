#!/usr/bin/env bash
# Install everything ccamerge needs on a fresh Debian machine: the Debian packages, a virtual
# environment in .venv and the Python packages. Idempotent; safe to run again.
#   bash .ci/setup.sh          # runtime (dashboard, CLI)
#   bash .ci/setup.sh --dev    # plus test tools and Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

apt_packages=(dataset-fashion-mnist)
[ "$dev" = 1 ] && apt_packages+=(chromium)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
requirements=requirements.txt
[ "$dev" = 1 ] && requirements=requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
