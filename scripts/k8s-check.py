#!/usr/bin/env python3
"""Checks manifests (a JSON object, or a v1 List of them, as `ringrun k8s` writes) against the
Kubernetes API's own models, those of the official Python client: each object must deserialise
into the model of its apiVersion and kind and serialise back to exactly the same JSON. A field
the API does not know, a misspelt one, or a value of the wrong type comes back different (or
fails to deserialise), and is named.

Usage: k8s-check.py FILE   (exit 0: every object round-trips; 1: the differences are printed)
"""
import inspect
import json
import sys

from kubernetes import client

MODELS = {
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("batch/v1", "Job"): "V1Job",
    ("apps/v1", "Deployment"): "V1Deployment",
}


class Response:
    """What ApiClient.deserialize reads before client 35: the body of an API server's answer."""

    def __init__(self, obj):
        self.data = json.dumps(obj)


def deserialize(api, obj, model):
    """The client's own path from an API server's JSON answer to a model object."""
    params = inspect.signature(api.deserialize).parameters
    if "content_type" in params:  # the generator's newer signature: (text, type, content type)
        return api.deserialize(json.dumps(obj), model, "application/json")
    return api.deserialize(Response(obj), model)


def differences(want, got, path="$"):
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if k not in got:
                yield f"{path}.{k}: dropped (unknown to the model)"
            elif k not in want:
                yield f"{path}.{k}: added"
            else:
                yield from differences(want[k], got[k], f"{path}.{k}")
    elif isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (w, g) in enumerate(zip(want, got)):
            yield from differences(w, g, f"{path}[{i}]")
    elif want != got or type(want) is not type(got):
        yield f"{path}: {want!r} came back as {got!r}"


def main(path):
    with open(path) as f:
        doc = json.load(f)
    items = doc["items"] if doc.get("kind") == "List" else [doc]
    api = client.ApiClient()
    bad = 0
    for item in items:
        key = (item.get("apiVersion"), item.get("kind"))
        name = f"{key[1]} {item.get('metadata', {}).get('name')}"
        model = MODELS.get(key)
        if model is None:
            print(f"{name}: no model for apiVersion/kind {key}")
            bad += 1
            continue
        try:
            obj = deserialize(api, item, model)
        except (ValueError, TypeError) as e:
            print(f"{name}: does not deserialise into {model}: {e}")
            bad += 1
            continue
        diffs = list(differences(item, api.sanitize_for_serialization(obj)))
        for d in diffs:
            print(f"{name}: {d}")
        bad += bool(diffs)
        if not diffs:
            print(f"{name}: {model} round-trips")
    print(f"{len(items) - bad} of {len(items)} objects match the Kubernetes models")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
