#!/usr/bin/env bash
# Data locality, measured: ringlet-train --data-locality off vs on, alternately, on K compute
# hosts (one rank each) and one storage host, all network namespaces on a bridge. Only the
# storage host's link is shaped (tc tbf, RATE, both ends): it serves the dataset's shared copy
# over SSH, mounted with sshfs on every compute host (what a cluster's NFS or object-store mount
# is to a job). Each compute host also holds 1/K of the shards on its own disk (shard s on host
# s mod K), so every shard has one local replica. Both modes get the same shard map, so "off" (the
# exact order: every rank reads every shard) reads 1/K of the set from its host's copy and the
# rest, (K-1)/K, through the storage link.
#
#   scripts/bench-locality.sh [K] [RATE] [N] [ROUNDS]       defaults: 2 100mbit 400000 3
#
# For every run it prints the wall time from start to exit, samples/s over that time (steps x
# global batch / wall), ringlet-train's own count of bytes read from the shared copy, and the
# bytes the storage host's link carried (its interface counter); then the medians per mode.
# Root only; needs sshfs and openssh-server, and target/release/{ringlet-train,ringlet-shards}.
# Hosts 198.18.201.1 (storage) .. K+1, bridge rllbr; removed on exit, whatever happens.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
k=${1:-2} rate=${2:-100mbit} n=${3:-400000} rounds=${4:-3}
train=$root/target/release/ringlet-train shards=$root/target/release/ringlet-shards
for b in "$train" "$shards" /usr/sbin/sshd "$(command -v sshfs || echo sshfs)"; do
  [[ -x $b ]] || { echo "bench-locality.sh: $b is missing (cargo build --release; apt-get install sshfs openssh-server)" >&2; exit 2; }
done
name=rll subnet=198.18.201. storage=198.18.201.1
work=$(mktemp -d /tmp/ringlet-locality.XXXXXX)
cleanup() {
  [[ -f $work/sshd.pid ]] && kill "$(cat "$work/sshd.pid")" 2>/dev/null || true
  "$here/netns-hosts.sh" down $name
  [[ -n ${KEEP:-} ]] || rm -rf "$work"
}
trap cleanup EXIT

"$shards" convert "synthetic:$n" "$work/shared" --shard-samples 8192
count=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['train']))" "$work/shared/index.json")
{
  echo '{"hosts": {'
  for ((h = 0; h < k; h++)); do
    mkdir -p "$work/local$h"
    list=test
    for ((s = h; s < count; s += k)); do
      f=$(printf 'train-%05d.safetensors' "$s")
      cp "$work/shared/$f" "$work/local$h/"
      list+=",$s"
    done
    cp "$work/shared/test.safetensors" "$work/local$h/"
    sep=,; ((h == k - 1)) && sep=
    printf '  "h%d": {"dir": "%s", "shards": "%s"}%s\n' "$h" "$work/local$h" "$list" "$sep"
  done
  echo '}}'
} >"$work/map.json"

"$here/netns-hosts.sh" up $name $((k + 1)) $subnet
for dev in "${name}v0" eth0; do
  ns=(); [[ $dev == eth0 ]] && ns=(ip netns exec ${name}h0)
  "${ns[@]}" tc qdisc replace dev $dev root tbf rate "$rate" burst 256kb latency 50ms
done

# sshd on the storage host, for this run only: its own keys, root by key, nothing else.
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$work/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$work/id"
cp "$work/id.pub" "$work/authorized_keys"
cat >"$work/sshd_config" <<EOF
ListenAddress $storage
HostKey $work/hostkey
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
PidFile $work/sshd.pid
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
ip netns exec ${name}h0 /usr/sbin/sshd -f "$work/sshd_config" -E "$work/sshd.log"

link_bytes() { ip netns exec ${name}h0 cat /sys/class/net/eth0/statistics/tx_bytes; }

run() { # MODE ROUND
  local mode=$1 round=$2 r pids=() token port=$((29600 + RANDOM % 300))
  token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  local before t0 t1 after
  before=$(link_bytes)
  t0=$(date +%s.%N)
  for ((r = 0; r < k; r++)); do
    local mnt=$work/mnt$r out=$work/out-$mode-$round-r$r
    mkdir -p "$mnt"
    # sshfs and the rank in one `ip netns exec`: the mount lives in that command's mount namespace.
    ip netns exec ${name}h$((r + 1)) env RANK=$r WORLD_SIZE=$k LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 \
      MASTER_ADDR=${subnet}2 MASTER_PORT=$port RINGLET_JOB_TOKEN=$token RINGLET_TIMEOUT=300 \
      RINGLET_LOG=warn bash -c '
        sshfs -o IdentityFile="$1/id",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,Ciphers=aes128-gcm@openssh.com \
          root@'$storage':"$1/shared" "$2" || exit 3
        "$3" --model mlp --dataset shards:"$2" --shard-map "$1/map.json" --data-host h"$RANK" \
          --data-locality "$4" --epochs 1 --global-batch 512 --checkpoint-every 0 \
          --summary "$1/summary-$4-$5.json" --log-every 100000
        rc=$?
        fusermount -u "$2"
        exit $rc' _ "$work" "$mnt" "$train" "$mode" "$round" >"$out" 2>&1 &
    pids+=($!)
  done
  local status=0
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  t1=$(date +%s.%N)
  after=$(link_bytes)
  if ((status != 0)); then
    tail -n 20 "$work"/out-"$mode-$round"-r* >&2
    echo "bench-locality.sh: the $mode run failed" >&2
    exit 1
  fi
  python3 - "$work/summary-$mode-$round.json" "$mode" "$round" "$t0" "$t1" "$before" "$after" >>"$work/rows" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
mode, rnd, t0, t1, b0, b1 = sys.argv[2], sys.argv[3], *map(float, sys.argv[4:8])
wall = t1 - t0
print(json.dumps({"mode": mode, "round": int(rnd), "wall_s": wall,
                  "samples_per_s": s["steps"] * 512 / wall, "train_samples_per_s": s["samples_per_s"],
                  "remote_bytes": s["data_remote_bytes"], "local_bytes": s["data_local_bytes"],
                  "link_bytes": b1 - b0, "accuracy": s["test_accuracy"], "steps": s["steps"]}))
EOF
  tail -1 "$work/rows"
}

echo "K=$k compute hosts, storage link $rate, synthetic:$n in $count shards ($(du -sh "$work/shared" | cut -f1)), $rounds rounds"
for ((i = 0; i < rounds; i++)); do
  run off $i
  run on $i
done
python3 - "$work/rows" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'mode':<5} {'runs':>4} {'wall s':>8} {'samples/s':>10} {'steady samples/s':>17} {'remote B (ringlet)':>19} {'storage link B':>15} {'accuracy':>8}")
med = {}
for mode in ("off", "on"):
    r = [x for x in rows if x["mode"] == mode]
    m = {k: statistics.median(x[k] for x in r) for k in ("wall_s", "samples_per_s", "train_samples_per_s", "remote_bytes", "link_bytes", "accuracy")}
    med[mode] = m
    print(f"{mode:<5} {len(r):>4} {m['wall_s']:>8.2f} {m['samples_per_s']:>10.0f} {m['train_samples_per_s']:>17.0f} {m['remote_bytes']:>19.0f} {m['link_bytes']:>15.0f} {m['accuracy']*100:>7.2f}%")
print(f"on/off samples/s (medians): {med['on']['samples_per_s'] / med['off']['samples_per_s']:.2f}x")
EOF
