#!/usr/bin/env bash
# Runs a rank under a CPU quota, so ranks of one job have really different speeds on one machine
# (the per-device batch balancing demo). Put it between the launcher and the program:
#
#   ringrun -n 3 -- scripts/cpu-quota.sh 0.2,0.4,0.6 -- ringlet-train --balance auto ...
#
# QUOTAS: cores per rank, comma-separated, indexed by $RANK (one value: the same for all). The
# rank runs in its own cgroup (v2: cpu.max; v1: cpu.cfs_quota_us) made for it and removed when it
# exits. Needs root (or a delegated cgroup). Signals are passed on to the program.
set -euo pipefail
if [ $# -lt 3 ] || [ "$2" != "--" ]; then
    echo "usage: $0 CORES[,CORES...] -- PROGRAM [ARGS...]" >&2
    exit 2
fi
IFS=, read -r -a quotas <<< "$1"
shift 2
rank=${RANK:-0}
q=${quotas[$rank]:-${quotas[0]}}
period=10000
# The kernel refuses quotas under 1 ms per period: 0.1 core is the least at a 10 ms period.
quota=$(awk -v q="$q" -v p="$period" 'BEGIN { if (!(q >= 0.1)) exit 1; printf "%d", q * p }') || {
    echo "$0: $q cores: give at least 0.1" >&2
    exit 2
}
name="ringlet-${MASTER_PORT:-0}-rank$rank-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    dir=/sys/fs/cgroup/$name
elif [ -d /sys/fs/cgroup/cpu ]; then
    dir=/sys/fs/cgroup/cpu/$name
else
    echo "$0: no cgroup cpu controller at /sys/fs/cgroup" >&2
    exit 2
fi
cleanup() {
    # The program has exited (or setting up failed); move ourselves out so the group can go.
    echo $$ > "$(dirname "$dir")/cgroup.procs" 2>/dev/null || true
    rmdir "$dir" 2>/dev/null || true
}
mkdir "$dir"
trap cleanup EXIT
if [ -f "$dir/cpu.max" ]; then
    echo "$quota $period" > "$dir/cpu.max"
else
    echo "$period" > "$dir/cpu.cfs_period_us"
    echo "$quota" > "$dir/cpu.cfs_quota_us"
fi
echo $$ > "$dir/cgroup.procs"
"$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT
status=0
wait $child || status=$?
# A trapped signal interrupts wait; wait again for the program itself.
while kill -0 $child 2>/dev/null; do wait $child || status=$?; done
exit $status
