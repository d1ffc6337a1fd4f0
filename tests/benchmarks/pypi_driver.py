"""Benchmark driver for the official PyPI ``convex`` client (a PyO3 build of convex-rs).

It runs in its own interpreter: the client's blocking calls hold the GIL (reference §10),
so it must not share a process with the servers or with the other contenders. Requests
arrive as JSON lines on stdin, answers go out as ``@@bench`` lines on stdout:

* ``{"op": "rt_open", "url", "token", "kind": "mutation"|"query", "warm"}`` -> ``{}``:
  a client for round trips, connected, authenticated and warmed by ``warm`` untimed calls;
* ``{"op": "rt_block", "n"}`` -> ``{"latencies": [microseconds, ...]}`` for the next n
  sequential calls on that client (the harness interleaves blocks of the contenders);
* ``{"op": "rt_close"}`` -> ``{}``: drop that client;
* ``{"op": "feed", "url", "size", "n"}`` -> ``{"elapsed", "seen", "final_seq"}``: subscribe
  to ``bench:ping``, wait for it, then time ``bench:feed`` until its n-th value.

Every ``rt_open`` and ``feed`` uses a fresh client. The wheel's tokio threads are left
behind at exit.
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


class RoundTrips:
    """The open round-trip client between ``rt_open`` and ``rt_close``."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.client = ConvexClient(request["url"])
        self.client.set_auth(request["token"])
        mutation = request["kind"] == "mutation"
        self.call = self.client.mutation if mutation else self.client.query
        self.name = "bench:mut" if mutation else "bench:get"
        self.next = 0
        for i in range(int(request.get("warm", 1)) or 1):
            self.call(self.name, {"n": -1.0 - i})  # connected and authenticated first

    def block(self, n: int) -> dict[str, Any]:
        call, name, clock = self.call, self.name, time.perf_counter_ns
        latencies: list[float] = []
        for i in range(self.next, self.next + n):
            started = clock()
            call(name, {"n": float(i)})
            latencies.append((clock() - started) / 1000.0)
        self.next += n
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
    open_rt: RoundTrips | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
        try:
            if request["op"] == "rt_open":
                open_rt = RoundTrips(request)
                emit({})
            elif request["op"] == "rt_block":
                if open_rt is None:
                    raise RuntimeError("rt_block before rt_open")
                emit(open_rt.block(int(request["n"])))
            elif request["op"] == "rt_close":
                open_rt = None
                emit({})
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
