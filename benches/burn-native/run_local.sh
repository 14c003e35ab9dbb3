#!/usr/bin/env bash
# Run N ranks of burn-native on loopback: one orchestrator process + N rank processes.
# usage: ./run_local.sh N [extra burn-native flags...]   (JSON result line from rank 0 on stdout)
set -euo pipefail
N=${1:?usage: run_local.sh N [flags...]}; shift
BIN=${BIN:-${CARGO_TARGET_DIR:-/tmp/burn-native-target}/release/burn-native}
GPORT=${GPORT:-29500}; NPORT=${NPORT:-29600}
"$BIN" orchestrator --port "$GPORT" >/dev/null 2>&1 &
ORCH=$!
trap 'kill $ORCH 2>/dev/null || true' EXIT
pids=()
for ((r = 0; r < N; r++)); do
  # stdout also carries burn-collective's "Connecting to ..." lines: keep only the JSON.
  "$BIN" --rank "$r" --world "$N" --global-addr "127.0.0.1:$GPORT" \
    --node-addr "127.0.0.1:$((NPORT + r))" "$@" | { grep '^{' || true; } &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
