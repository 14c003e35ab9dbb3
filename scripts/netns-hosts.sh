#!/usr/bin/env bash
# Hosts for tests and benchmarks: network namespaces on one machine, joined by a bridge.
#
#   netns-hosts.sh up NAME K SUBNET [RATE]   K hosts NAMEh0..NAMEh{K-1}; host i is SUBNET.(i+1)/24 on
#                                            its eth0, a veth to bridge NAMEbr. SUBNET: three octets
#                                            from the benchmarking range, e.g. 198.18.7. RATE (e.g.
#                                            1gbit): a tc tbf on both ends of every host link.
#                                            The bridge gets SUBNET.254, so this namespace (mpirun's
#                                            own daemon) reaches the hosts.
#   netns-hosts.sh down NAME                 removes all of NAME's hosts and its bridge (idempotent)
#   netns-hosts.sh exec NAME I CMD...        runs CMD on host I
#   netns-hosts.sh cut NAME I | heal NAME I  takes host I's link down / up (bridge side)
#
# Needs root and iproute2 (`ip netns`). NAME: at most 9 characters (interface names are <= 15).
# `up` removes whatever it made if any step fails.
set -euo pipefail

die() { echo "netns-hosts.sh: $*" >&2; exit 2; }

down() {
  local name=$1 ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${name}h[0-9]+$" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns delete "$ns" 2>/dev/null || true
  done
  ip link delete "${name}br" 2>/dev/null || true
  while iptables -D FORWARD -i "${name}br" -o "${name}br" -j ACCEPT 2>/dev/null; do :; done
  # A veth whose namespace end is gone disappears with it; these are leftovers of a failed `up`.
  for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${name}v[0-9]+$" || true); do
    ip link delete "$dev" 2>/dev/null || true
  done
}

shape() { # DEV RATE [NS]
  local run=()
  [[ -n ${3:-} ]] && run=(ip netns exec "$3")
  # burst 256kb (2 ms at 1gbit): iperf3 got 0.95-0.96 Gbit/s with 128kb-1mb, 0.8 with 32-64kb
  # (drops); larger bursts let short transfers beat the rate. 50 ms of queue: short queues
  # dropped MPI's bursts.
  "${run[@]}" tc qdisc replace dev "$1" root tbf rate "$2" burst 256kb latency 50ms
}

up() {
  local name=$1 k=$2 subnet=$3 rate=${4:-} i ns
  [[ $name =~ ^[a-z][a-z0-9]{0,8}$ ]] || die "NAME must be 1-9 lowercase letters/digits"
  [[ $k =~ ^[0-9]+$ ]] && ((k >= 1 && k <= 250)) || die "K must be 1..250"
  [[ $subnet =~ ^198\.1[89]\.[0-9]{1,3}\.$ ]] || die "SUBNET must look like 198.18.N. (the benchmarking range)"
  trap 'down "$name"' ERR
  down "$name"
  # A fixed address: a bridge otherwise takes its lowest port's, which changes as hosts are
  # added and leaves the hosts' ARP entry for SUBNET.254 stale.
  ip link add "${name}br" address "02:52:4c:$(printf %02x "$(cut -d. -f2 <<<"$subnet")"):$(printf %02x "$(cut -d. -f3 <<<"$subnet")"):fe" type bridge
  ip addr add "${subnet}254/24" dev "${name}br"
  ip link set "${name}br" up
  # With br_netfilter loaded, bridged frames pass the FORWARD chain, which Docker sets to DROP.
  if [[ $(sysctl -n net.bridge.bridge-nf-call-iptables 2>/dev/null || echo 0) == 1 ]]; then
    iptables -I FORWARD -i "${name}br" -o "${name}br" -j ACCEPT
  fi
  for ((i = 0; i < k; i++)); do
    ns="${name}h$i"
    ip netns add "$ns"
    ip link add "${name}v$i" type veth peer name "${name}p$i"
    ip link set "${name}p$i" netns "$ns"
    ip -n "$ns" link set "${name}p$i" name eth0
    ip -n "$ns" addr add "${subnet}$((i + 1))/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip link set "${name}v$i" master "${name}br"
    ip link set "${name}v$i" up
    if [[ -n $rate ]]; then
      shape "${name}v$i" "$rate"
      shape eth0 "$rate" "$ns"
    fi
  done
  trap - ERR
}

cmd=${1:-}
shift || true
case $cmd in
  up) (($# >= 3)) || die "usage: up NAME K SUBNET [RATE]"; up "$@" ;;
  down) (($# == 1)) || die "usage: down NAME"; down "$1" ;;
  exec) (($# >= 3)) || die "usage: exec NAME I CMD..."; ns="$1h$2"; shift 2; exec ip netns exec "$ns" "$@" ;;
  cut) (($# == 2)) || die "usage: cut NAME I"; ip link set "$1v$2" down ;;
  heal) (($# == 2)) || die "usage: heal NAME I"; ip link set "$1v$2" up ;;
  *) die "usage: netns-hosts.sh up|down|exec|cut|heal ... (see the comment at the top)" ;;
esac
