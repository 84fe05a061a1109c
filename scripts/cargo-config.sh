#!/usr/bin/env bash
# Point cargo at Debian's packaged crates (/usr/share/cargo/registry): the
# crates.io index is not reachable from these machines. Written into the
# checkout's .cargo/config.toml so that it applies to this project only and a
# machine that can reach crates.io builds from the same sources.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/.cargo"
cat > "$root/.cargo/config.toml.tmp" <<'CFG'
# Written by scripts/cargo-config.sh (make setup). Do not edit.
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "/usr/share/cargo/registry"

[net]
offline = true
CFG
mv "$root/.cargo/config.toml.tmp" "$root/.cargo/config.toml"
