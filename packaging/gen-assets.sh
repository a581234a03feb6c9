#!/bin/sh
# Writes the man pages and shell completions of a certmesh binary into a directory,
# as [package.metadata.deb] in Cargo.toml expects them (run by check-deb.sh):
#   packaging/gen-assets.sh target/release/certmesh target/assets
set -eu
BIN=${1:?usage: $0 BINARY OUT_DIR}
OUT=${2:?usage: $0 BINARY OUT_DIR}
rm -rf "$OUT/man" "$OUT/completions"
mkdir -p "$OUT/man" "$OUT/completions"
"$BIN" man --out-dir "$OUT/man"
"$BIN" completions bash >"$OUT/completions/certmesh.bash"
"$BIN" completions zsh >"$OUT/completions/_certmesh"
"$BIN" completions fish >"$OUT/completions/certmesh.fish"
