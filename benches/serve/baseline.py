#!/usr/bin/env python3
"""The plain Python consumer ringlet-serve is compared with: redis-py and numpy, one consumer of
the same group on the same stream, scoring the same ringlet-train MLP checkpoint (read with
safetensors) in batches, writing each prediction then acknowledging the batch (pipelined).

Usage: baseline.py REDIS_PORT CHECKPOINT_DIR CONSUMER [BATCH] [EXIT_WHEN_IDLE_S]
"""
import json
import sys
import time

import numpy as np
import redis
from safetensors.numpy import load_file


def main():
    port, ckpt, consumer = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    idle_exit = float(sys.argv[5]) if len(sys.argv) > 5 else 2.0
    t = load_file(f"{ckpt}/model.safetensors")
    layers = []
    i = 0
    while f"layers.{i}.weight" in t:
        layers.append((t[f"layers.{i}.weight"].T.copy(), t[f"layers.{i}.bias"]))
        i += 1
    with open(f"{ckpt}/manifest.json") as f:
        version = "step-%d@py" % json.load(f)["state"]["step"]
    r = redis.Redis(port=port)
    try:
        r.xgroup_create("records", "ringlet-serve", id="0", mkstream=True)
    except redis.ResponseError:
        pass
    last = time.time()
    while True:
        got = r.xreadgroup("ringlet-serve", consumer, {"records": ">"}, count=batch, block=200)
        if not got:
            if time.time() - last > idle_exit:
                return
            continue
        entries = got[0][1]
        ids, xs, dead = [], [], []
        for rid, fields in entries:
            try:
                x = json.loads(fields[b"features"])
                if len(x) != layers[0][0].shape[0]:
                    raise ValueError("wrong length")
                xs.append(x)
                ids.append(rid)
            except (KeyError, ValueError) as e:
                dead.append((rid, str(e)))
        p = r.pipeline(transaction=False)
        if xs:
            h = np.asarray(xs, dtype=np.float32)
            for k, (w, b) in enumerate(layers):
                h = h @ w + b
                if k + 1 < len(layers):
                    np.maximum(h, 0, out=h)
            h = np.exp(h - h.max(axis=1, keepdims=True))
            h /= h.sum(axis=1, keepdims=True)
            cls, conf = h.argmax(axis=1), h.max(axis=1)
            for rid, c, q in zip(ids, cls, conf):
                p.xadd("predictions", {"id": rid, "class": int(c), "confidence": f"{q:.6f}", "version": version})
        for rid, why in dead:
            p.xadd("records-dead", {"id": rid, "reason": why})
        p.xack("records", "ringlet-serve", *[rid for rid, _ in entries])
        p.execute()
        last = time.time()


if __name__ == "__main__":
    main()
