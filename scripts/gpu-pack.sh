#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain: stripped
# release binaries (no debug information) in one folder git ignores, small enough to carry.
#
#   scripts/gpu-pack.sh              # here, from anywhere in the repository
#   scripts/gpu-check.sh [PACK_DIR]  # there, from the repository root, with PACK_DIR carried
#
# PACK_DIR (default target/gpu-pack, below the ignored /target) holds ringrun, ringlet-train,
# ringlet-bench, ringlet-gpu-check (found by name among the workspace's binaries, whichever crate
# has them) and ringlet-train-tests (ringlet-train's lib unit tests, whose gpu:: tests compare
# the GPU model with the CPU one; its path comes from cargo's JSON, not from a guess),
# ringlet-serve-tests (ringlet-serve's lib unit tests: scoring on the GPU against the CPU), plus
# MANIFEST (commit, toolchain, sizes). The last line on stdout is PACK_DIR relative to the
# repository root (the form a `carry` list takes); everything else goes before it or to stderr.
#
# It builds with the units `cargo test --workspace --release` builds (same profile, same
# workspace-wide features), so on a tree that command has built it compiles nothing.
# Fails (exit 1) when the folder is over GPU_PACK_LIMIT_MIB (default 40) MiB.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
pack=${GPU_PACK_DIR:-target/gpu-pack}
limit_mib=${GPU_PACK_LIMIT_MIB:-40}
bins=(ringrun ringlet-train ringlet-bench ringlet-gpu-check)
tests_name=ringlet-train-tests
cargo=${CARGO:-cargo} # the cargo running us, when a test runs this script

die() {
    echo "gpu-pack: $*" >&2
    exit 1
}
case "$pack" in
    /* | *..*) die "GPU_PACK_DIR must be a path below the repository root (got $pack)" ;;
esac
git check-ignore -q "$pack" 2>/dev/null || [ ! -d .git ] ||
    die "$pack is not ignored by git: it would travel as part of the working tree"

if command -v strip >/dev/null; then
    strip_to() { strip --strip-all -o "$2" "$1"; }
elif command -v objcopy >/dev/null; then
    strip_to() { objcopy --strip-all "$1" "$2"; }
else
    die "neither strip nor objcopy is installed (binutils)"
fi

json=$(mktemp)
trap 'rm -f "$json"' EXIT
# JSON on stdout (kept), compiler messages rendered on stderr. --workspace for both: features
# are unified over the selected packages, so a narrower selection would build other units.
"$cargo" build --release --workspace --bins --message-format=json-render-diagnostics >"$json" ||
    die "cargo build --release --workspace --bins failed"
"$cargo" test --release --workspace --lib --no-run --message-format=json-render-diagnostics >>"$json" ||
    die "cargo test --release --workspace --lib --no-run failed"

# One compiler-artifact line per unit; the fields needed are flat (no nested objects), so sed
# reads them without a JSON tool.
artifact() { # NAME KIND TEST(true|false) -> the executable's path
    grep '"reason":"compiler-artifact"' "$json" |
        grep "\"target\":{\"kind\":\[\"$2\"\][^}]*\"name\":\"$1\"" |
        grep "\"profile\":{[^}]*\"test\":$3[,}]" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}

tmp="$pack.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -f "$json"; rm -rf "$tmp"' EXIT
table="$(printf '%-22s %12s %12s\n' file 'built (B)' 'stripped (B)')"
add() { # SOURCE NAME
    if [ -z "$1" ] || [ ! -x "$1" ]; then die "no executable for $2 in cargo's output"; fi
    strip_to "$1" "$tmp/$2" || die "stripping $1 failed"
    chmod 755 "$tmp/$2"
    table+=$'\n'"$(printf '%-22s %12d %12d' "$2" "$(stat -c %s "$1")" "$(stat -c %s "$tmp/$2")")"
}
for b in "${bins[@]}"; do
    add "$(artifact "$b" bin false)" "$b"
done
add "$(artifact ringlet_train lib true)" "$tests_name"
add "$(artifact ringlet_serve lib true)" ringlet-serve-tests

total=$(du -sb "$tmp" | cut -f1)
limit=$((limit_mib * 1048576))
{
    echo "ringlet gpu-pack"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $("${RUSTC:-rustc}" --version 2>/dev/null || echo 'rustc unknown')"
    echo "$table"
    echo "total: $total bytes ($(awk -v t="$total" 'BEGIN { printf "%.1f", t / 1048576 }') MiB, limit $limit_mib MiB)"
} >"$tmp/MANIFEST"
total=$(du -sb "$tmp" | cut -f1)
if [ "$total" -gt "$limit" ]; then
    cat "$tmp/MANIFEST" >&2
    die "$pack would be $total bytes, over the $limit_mib MiB limit ($limit bytes); not written"
fi
rm -rf "$pack"
mv "$tmp" "$pack"
sed 1d "$pack/MANIFEST"
echo "total with MANIFEST: $total bytes"
echo "$pack"
