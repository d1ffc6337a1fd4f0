"""Benchmark driver for the official PyPI ``convex`` client (a PyO3 build of convex-rs).

It runs in its own interpreter: the client's blocking calls hold the GIL (reference §10),
so it must not share a process with the servers or with the other contenders. Requests
arrive as JSON lines on stdin, answers go out as ``@@bench`` lines on stdout:

* ``{"op": "rt", "url", "token", "kind": "mutation"|"query", "n"}`` ->
  ``{"latencies": [microseconds, ...]}`` for n sequential calls on one client;
* ``{"op": "feed", "url", "size", "n"}`` -> ``{"elapsed", "seen", "final_seq"}``: subscribe
  to ``bench:ping``, wait for it, then time ``bench:feed`` until its n-th value.

Every request uses a fresh client. The wheel's tokio threads are left behind at exit.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from typing import Any

from convex import ConvexClient

MARK = "@@bench "
WATCHDOG_SECONDS = 600.0


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def roundtrips(request: dict[str, Any]) -> dict[str, Any]:
    client = ConvexClient(request["url"])
    client.set_auth(request["token"])
    n = int(request["n"])
    call = client.mutation if request["kind"] == "mutation" else client.query
    name = "bench:mut" if request["kind"] == "mutation" else "bench:get"
    call(name, {"n": -1.0})  # connected and authenticated before timing
    clock = time.perf_counter_ns
    latencies: list[float] = []
    for i in range(n):
        started = clock()
        call(name, {"n": float(i)})
        latencies.append((clock() - started) / 1000.0)
    return {"latencies": latencies}


def feed(request: dict[str, Any]) -> dict[str, Any]:
    client = ConvexClient(request["url"])
    size, n = str(request["size"]), int(request["n"])
    ping = client.subscribe("bench:ping", {})
    next(ping)
    started = time.perf_counter()
    seen = 0
    final_seq: float | None = None
    for item in client.subscribe("bench:feed", {"size": size, "n": float(n)}):
        value: Any = item
        seen += 1
        if value["seq"] == n - 1:
            final_seq = value["seq"]
            break
    elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "seen": seen, "final_seq": final_seq}


def main() -> None:
    emit({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
        try:
            if request["op"] == "rt":
                emit(roundtrips(request))
            elif request["op"] == "feed":
                emit(feed(request))
            else:
                emit({"error": f"unknown op {request['op']!r}"})
        except Exception as exc:
            emit({"error": f"{type(exc).__name__}: {exc}"})
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
