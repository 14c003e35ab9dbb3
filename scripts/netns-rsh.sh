#!/usr/bin/env bash
# An "ssh" for Open MPI's `--mca plm_rsh_agent` that reaches namespace hosts instead of machines:
# Open MPI calls it as `netns-rsh.sh [ssh options] HOST COMMAND...`; HOST is the address of a
# host made by netns-hosts.sh, and COMMAND runs there through a shell, as ssh would run it.
#
# Each host also gets its own UTS namespace with its own hostname: the namespaces share one
# hostname and /tmp otherwise, and Open MPI's daemons, believing themselves on one machine,
# collide in the same session directory.
set -euo pipefail
while (($#)) && [[ $1 == -* ]]; do
  case $1 in -o | -p | -l | -i | -F | -E | -b | -c | -J | -L | -R | -D | -W) shift 2 ;; *) shift ;; esac
done
(($# >= 2)) || { echo "netns-rsh.sh: usage: netns-rsh.sh HOST COMMAND..." >&2; exit 255; }
host=$1
shift
ns=
for candidate in $(ip netns list | awk '{print $1}'); do
  if ip -n "$candidate" -4 -o addr show 2>/dev/null | grep -qF " $host/"; then ns=$candidate; break; fi
done
[[ -n $ns ]] || { echo "netns-rsh.sh: no namespace host has address $host" >&2; exit 255; }
export NETNS_RSH_CMD="$*" NETNS_RSH_NAME="$ns"
exec ip netns exec "$ns" unshare --uts sh -c \
  'hostname "$NETNS_RSH_NAME" || exit 255; c=$NETNS_RSH_CMD; unset NETNS_RSH_CMD NETNS_RSH_NAME; exec sh -c "$c"'
