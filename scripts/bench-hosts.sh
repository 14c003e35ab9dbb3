#!/usr/bin/env bash
# ringlet-bench across K namespace hosts whose links are shaped to RATE (tc tbf), one rank per host
# (PER_HOST=m: m ranks per host, ranks i·m .. i·m + m − 1 on host i).
#
#   scripts/bench-hosts.sh K RATE BENCH [ARGS...]        Ringlet (ranks started here with the
#                                                        torchrun variables)
#   MODE=mpirun scripts/bench-hosts.sh K RATE BENCH ...  the same binary started by Open MPI's
#                                                        mpirun on the same hosts (BENCH built with
#                                                        --features mpi; pass --backend tcp,mpi to
#                                                        measure MPI_Allreduce beside the ring)
#
# e.g. scripts/bench-hosts.sh 4 1gbit target/release/ringlet-bench -b 16M -e 256M -f 2
# Root only. The hosts are 198.18.200.1..K on bridge rlbbr; removed on exit, whatever happens.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
(($# >= 3)) || { sed -n '2,12p' "$0" >&2; exit 2; }
k=$1 rate=$2 bench=$(realpath "$3")
shift 3
name=rlb subnet=198.18.200.
trap '"$here/netns-hosts.sh" down $name' EXIT
"$here/netns-hosts.sh" up $name "$k" $subnet "$rate"

if [[ ${MODE:-} == mpirun ]]; then
  hosts=$(for ((i = 1; i <= k; i++)); do printf '%s%d,' $subnet "$i"; done)
  mpirun --allow-run-as-root -np "$k" --host "${hosts%,}" \
    --mca plm_rsh_agent "$here/netns-rsh.sh" \
    --mca oob_tcp_if_include ${subnet}0/24 --mca btl self,tcp --mca btl_tcp_if_include ${subnet}0/24 \
    -x RINGLET_TIMEOUT=120 -x PATH \
    "$bench" "$@"
  exit
fi

port=29500 token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') pids=()
m=${PER_HOST:-1} n=$((k * ${PER_HOST:-1}))
for ((r = 0; r < n; r++)); do
  out=/dev/null
  ((r == 0)) && out=/dev/stdout
  RANK=$r WORLD_SIZE=$n LOCAL_RANK=$((r % m)) LOCAL_WORLD_SIZE=$m MASTER_ADDR=${subnet}1 MASTER_PORT=$port \
    RINGLET_JOB_TOKEN=$token RINGLET_TIMEOUT=${RINGLET_TIMEOUT:-120} \
    "$here/netns-hosts.sh" exec $name "$((r / m))" "$bench" "$@" >"$out" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
