#!/usr/bin/env python3
"""ringlet-serve against the plain Python consumer (baseline.py), side by side on one machine:
the same Redis, the same records, the same MLP checkpoint, 1 and 3 replicas.

- Throughput: N records are in the stream before the replicas start; records/s is N over the
  time from the first prediction to the last (Redis's clock: the output entries' ids).
- Latency: records arrive at a steady RATE per second; each record's latency is from the
  producer's XADD to an observer (another connection, blocked in XREAD on the output stream)
  seeing its prediction, both on this process's clock.

Usage: bench.py RINGLET_SERVE CHECKPOINT_DIR [--records N] [--rate R] [--seconds S] [--repeats K]
Needs redis-server, and python3 with redis, numpy and safetensors.
"""
import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

import redis

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def records(n, seed):
    rnd = random.Random(seed)
    return [json.dumps([round(rnd.random() * 16, 3) for _ in range(64)]) for _ in range(n)]


def ms(entry_id):
    return int(entry_id.split(b"-")[0])


def replicas(kind, k, port, serve, ckpt):
    procs = []
    for i in range(k):
        if kind == "ringlet-serve":
            cmd = [serve, "run", "--redis", f"redis://127.0.0.1:{port}", "--pin", ckpt,
                   "--consumer", f"rs{i}", "--exit-when-idle", "2"]
        else:
            cmd = [sys.executable, os.path.join(HERE, "baseline.py"), str(port), ckpt, f"py{i}", "64", "2"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def wait(procs):
    for p in procs:
        if p.wait(timeout=600) != 0:
            sys.exit(f"a replica failed: {p.args}")


def outputs(r):
    return r.xrange("predictions")


def throughput(r, port, kind, k, serve, ckpt, data):
    r.flushall()
    p = r.pipeline(transaction=False)
    for x in data:
        p.xadd("records", {"features": x})
    p.execute()
    wait(replicas(kind, k, port, serve, ckpt))
    out = outputs(r)
    assert len(out) == len(data), (kind, len(out))
    span = (ms(out[-1][0]) - ms(out[0][0])) / 1000
    return len(data) / max(span, 1e-3)


def latency(r, port, kind, k, serve, ckpt, data, rate):
    r.flushall()
    r.xgroup_create("records", "ringlet-serve", id="0", mkstream=True)
    procs = replicas(kind, k, port, serve, ckpt)
    time.sleep(1.0)  # replicas connected and waiting
    # An observer on its own connection sees each prediction arrive; sent and seen times are this
    # process's clock, in microseconds.
    seen = {}

    def observe():
        o = redis.Redis(port=port)
        last = "0"
        while len(seen) < len(data):
            got = o.xread({"predictions": last}, block=1000, count=1000)
            now = time.perf_counter()
            for _, es in got or []:
                for oid, f in es:
                    seen[f[b"id"]] = now
                    last = oid

    watcher = threading.Thread(target=observe)
    watcher.start()
    start = time.perf_counter()
    sent = {}
    for i, x in enumerate(data):
        due = start + i / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        t = time.perf_counter()
        sent[r.xadd("records", {"features": x})] = t
    watcher.join(timeout=120)
    wait(procs)
    lat = sorted((seen[i] - t) * 1000 for i, t in sent.items())
    assert len(lat) == len(data), (kind, len(lat))
    q = lambda f: lat[min(len(lat) - 1, int(round((len(lat) - 1) * f)))]
    return q(0.5), q(0.99)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("serve")
    a.add_argument("checkpoint")
    a.add_argument("--records", type=int, default=20000)
    a.add_argument("--rate", type=int, default=1000)
    a.add_argument("--seconds", type=float, default=5)
    a.add_argument("--repeats", type=int, default=3)
    args = a.parse_args()
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        bulk = records(args.records, 1)
        paced = records(int(args.rate * args.seconds), 2)
        print(f"{args.records} records preloaded for records/s; {len(paced)} at {args.rate}/s for latency; "
              f"median of {args.repeats} runs, alternating")
        print(f"{'consumer':<14} {'replicas':>8} {'records/s':>10} {'p50 ms':>7} {'p99 ms':>7}")
        for k in (1, 3):
            results = {}
            for _ in range(args.repeats):
                for kind in ("ringlet-serve", "python"):
                    t = throughput(r, port, kind, k, args.serve, args.checkpoint, bulk)
                    l50, l99 = latency(r, port, kind, k, args.serve, args.checkpoint, paced, args.rate)
                    results.setdefault(kind, []).append((t, l50, l99))
            for kind, runs in results.items():
                med = [statistics.median(x) for x in zip(*runs)]
                print(f"{kind:<14} {k:>8} {med[0]:>10.0f} {med[1]:>7.2f} {med[2]:>7.2f}")
            ratio = statistics.median(x[0] for x in results["ringlet-serve"]) / statistics.median(
                x[0] for x in results["python"])
            print(f"{'':<14} {k:>8} ringlet-serve / python records/s: {ratio:.1f}x")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
