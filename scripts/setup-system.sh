#!/usr/bin/env bash
# System packages this project needs (Debian 12). Idempotent and quick when
# everything is installed: it only calls apt when something is missing.
#
#  - Debian's packaged Rust crates: the crates.io index is not reachable,
#    cargo builds from /usr/share/cargo/registry (see cargo-config.sh).
#  - nats-server and postgresql: the integration tests start real servers.
#  - chromium + chromium-driver: the browser end-to-end tests.
#  - iproute2: the vanished-client SSE test takes a private loopback down.
#  - npm (when no npm is on PATH): installs axe-core for the accessibility check.
set -euo pipefail

PACKAGES=(
  librust-pyo3-dev
  librust-serde-dev
  librust-serde-derive-dev
  librust-serde-json-dev
  librust-hashbrown-dev
  librust-ahash-dev
  librust-parking-lot-dev
  librust-rusqlite-dev
  libsqlite3-dev
  librust-proptest+default-dev
  librust-criterion-dev
  nats-server
  postgresql
  postgresql-common
  chromium
  chromium-driver
  iproute2
)

missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

echo "setup: installing system packages: ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
    echo "setup: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
install() { "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; }
if ! install; then
  "${SUDO[@]}" apt-get update -q
  install
fi
# Debian starts a PostgreSQL cluster on install where it can; the tests
# start their own throwaway clusters, so a system one is not needed.
