#!/usr/bin/env bash
# Builds burn-native: fetches burn-collective and burn-communication 0.21.0 from crates.io, copies
# them to patched/ with the fixes of fixes/*.patch applied (see README.md), then builds against
# those copies (Cargo.toml's [patch.crates-io]). Prints the binary's path last.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" patched
echo 'fn main() {}' >"$tmp/src/main.rs"
cat >"$tmp/Cargo.toml" <<'TOML'
[package]
name = "fetch-burn-collective"
version = "0.0.0"
edition = "2021"
[dependencies]
burn-collective = "=0.21.0"
burn-communication = "=0.21.0"
[workspace]
TOML
cargo fetch -q --manifest-path "$tmp/Cargo.toml"
for c in burn-collective-0.21.0 burn-communication-0.21.0; do
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$c" | head -1)
  rm -rf "patched/$c"
  cp -r "$src" "patched/$c"
  (cd patched && patch -s -p0 <"../fixes/$c.patch")
done
target=${CARGO_TARGET_DIR:-/tmp/burn-native-target}
CARGO_TARGET_DIR=$target cargo build --release
echo "$target/release/burn-native"
