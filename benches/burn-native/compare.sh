#!/usr/bin/env bash
# Ringlet (ringlet-train --model cnn) against burn-native (Burn's burn-collective) on the same CNN,
# data and global batch, alternating, ROUNDS times; prints each run and the medians.
#
#   compare.sh loopback N ROUNDS          N ranks on this machine (loopback)
#   compare.sh hosts:RATE N ROUNDS        one rank per network-namespace host, links shaped to
#                                         RATE (e.g. 1gbit) with tc tbf; root only
#
# Build first: cargo build --release (the repository) and benches/burn-native/build.sh.
# Extra flags for both: CHANNELS, HIDDEN, BATCH, STEPS (environment; defaults 16, 64, 64, 200).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mode=${1:?usage: compare.sh loopback|hosts:RATE N ROUNDS} n=${2:?N} rounds=${3:?ROUNDS}
burn=${BURN_NATIVE:-${CARGO_TARGET_DIR:-/tmp/burn-native-target}/release/burn-native}
train=$root/target/release/ringlet-train
ch=${CHANNELS:-16} hid=${HIDDEN:-64} batch=${BATCH:-64} steps=${STEPS:-200}
common=(--global-batch "$batch" --steps "$steps")
out=$(mktemp -d)
trap 'rm -rf "$out"; "$root/scripts/netns-hosts.sh" down bnb >/dev/null 2>&1 || true' EXIT

ringlet() { # -> summary JSON file
  local args=(--model cnn --cnn-channels "$ch" --cnn-hidden "$hid" --lr 0.05 --warmup 0
    --calibration-steps 5 --log-every 1000000 --summary "$out/r.json" "${common[@]}")
  if [[ $mode == loopback ]]; then
    RINGLET_DEVICE=cpu "$root/target/release/ringrun" -n "$n" -- "$train" "${args[@]}" >/dev/null 2>&1
  else
    RINGLET_DEVICE=cpu "$root/scripts/bench-hosts.sh" "$n" "${mode#hosts:}" "$train" "${args[@]}" >/dev/null 2>&1
  fi
  python3 -c "import json,sys; d=json.load(open('$out/r.json')); print(d['samples_per_s'], d['comm_wait_fraction'])"
}

burn_native() {
  local args=(--world "$n" --channels "$ch" --hidden "$hid" "${common[@]}") pids=()
  if [[ $mode == loopback ]]; then
    "$burn" orchestrator --port 29511 >/dev/null 2>&1 &
    local orch=$!
    sleep 0.3
    for ((r = 0; r < n; r++)); do
      "$burn" --rank "$r" --global-addr 127.0.0.1:29511 --node-addr "127.0.0.1:$((29611 + r))" \
        "${args[@]}" >"$out/b$r.txt" 2>/dev/null &
      pids+=($!)
    done
  else
    "$root/scripts/netns-hosts.sh" up bnb "$n" 198.18.201. "${mode#hosts:}" >/dev/null
    "$root/scripts/netns-hosts.sh" exec bnb 0 "$burn" orchestrator --port 29511 >/dev/null 2>&1 &
    local orch=$!
    sleep 0.3
    for ((r = 0; r < n; r++)); do
      "$root/scripts/netns-hosts.sh" exec bnb "$r" "$burn" --rank "$r" --global-addr 198.18.201.1:29511 \
        --node-addr "198.18.201.$((r + 1)):29611" "${args[@]}" >"$out/b$r.txt" 2>/dev/null &
      pids+=($!)
    done
  fi
  for p in "${pids[@]}"; do wait "$p"; done
  kill "$orch" 2>/dev/null || true
  wait "$orch" 2>/dev/null || true
  [[ $mode == loopback ]] || "$root/scripts/netns-hosts.sh" down bnb >/dev/null
  grep '^{' "$out/b0.txt" | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print(d['samples_per_s'], d['comm_wait_fraction'])"
}

echo "mode $mode, $n ranks, CNN channels $ch hidden $hid, global batch $batch, $steps steps; samples/s and comm-wait fraction"
: >"$out/rows"
for ((i = 1; i <= rounds; i++)); do
  read -r rs rw < <(ringlet)
  read -r bs bw < <(burn_native)
  printf 'round %d: ringlet %.0f samples/s (wait %.1f%%)  burn-collective %.0f samples/s (wait %.1f%%)\n' \
    "$i" "$rs" "$(python3 -c "print($rw*100)")" "$bs" "$(python3 -c "print($bw*100)")"
  echo "$rs $rw $bs $bw" >>"$out/rows"
done
python3 - "$out/rows" <<'PY'
import statistics as st, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
med = [st.median(c) for c in zip(*rows)]
ratio = st.median(r[0] / r[2] for r in rows)
print(f"median: ringlet {med[0]:.0f} samples/s (wait {med[1]*100:.1f}%), burn-collective {med[2]:.0f} samples/s (wait {med[3]*100:.1f}%); speedup (median of per-round ratios) {ratio:.2f}x")
PY
