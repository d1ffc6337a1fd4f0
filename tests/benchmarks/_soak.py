"""``nox -s soak -- --minutes N`` (or ``--short``): 100 clients with 5-second JWTs under chaos.

Two processes, loopback only:

* the **server process** (``python -m tests.benchmarks._soak server``): LocalConvex, a
  TestTokenIssuer-backed token endpoint minting 5-second JWTs, and the **chaos switch**,
  which at random moments drops every socket (TCP abort), closes them with 1011, makes the
  token endpoint fail for a burst (HTTP 503, or hanging past the fetchers' timeout), and
  restarts LocalConvex on the same port. A restart keeps the data and the mutation
  de-duplication record (handed from the old instance to the new one); it loses the open
  sockets (clients reconnect and re-add their queries) and mutations queued but not yet
  run (clients re-send them; the record keeps them exactly-once).
* the **client process** (this module's ``main``): 100 ``ConvexClient``s, each with
  ``set_auth(fetcher)`` against the token endpoint, one subscription to its own counter and
  a loop of sequential mutations (each tagged with client and sequence number).

At the end the chaos stops, every mutation loop finishes (this "drain" can take tens of
seconds: a client whose token fetches failed through a burst waits out the SDK's fetch
retry backoff, up to 30 s with jitter, before it can reconnect; ``drain_slowest`` and
``drain_stragglers`` in the report show who waited and in what state), each subscription
must reach the server's final value for its counter, and every client is closed. Invariants (the run
exits non-zero when one breaks): expired tokens sent = 0; mutations sent = applied, each
exactly once; no mutation call failed; every subscription ended on the right value; no
task and no socket left after close. Reported besides: token refreshes, injected token
failures, the AuthErrors the server sent (counted by the server process, by kind),
reconnects, chaos events, peak memory. The last line is ``soak: N passed, N failed`` over
the invariants (``soak: 0 passed, 1 failed`` when the run broke before checking them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec

from tests.benchmarks._common import (
    REPO_ROOT,
    RESULTS_DIR,
    Helper,
    emit,
    open_sockets,
    peak_rss_bytes,
)

TOKEN_TTL = 5.0
FETCH_TIMEOUT = 1.5
SHORT_SECONDS = 25.0


# =====================================================================================
# The server process
# =====================================================================================


class SoakServer:
    def __init__(self, seed: int) -> None:
        from dartvex_auth_better.testing import LocalConvex, TestTokenIssuer
        from tests.benchmarks._servers import TokenServer

        self.rng = random.Random(seed)
        self.issuer = TestTokenIssuer()
        self.tokens = TokenServer(self.issuer, default_ttl=TOKEN_TTL)
        self.tokens.hang_seconds = 10.0
        self.burst_until = 0.0
        self.burst_mode: str | None = None
        self.tokens.fail = self._token_fault
        self.convex: LocalConvex = self._new_convex(0)
        self.applied: Counter[tuple[int, int]] = Counter()
        self.events: Counter[str] = Counter()
        self.tokens_received = 0
        self.expired_tokens = 0
        self.rejected_tokens = 0
        self.chaos_task: asyncio.Task[None] | None = None
        self.restart_lock = asyncio.Lock()
        self.auth_errors_sent: Counter[str] = Counter()
        self._count_auth_errors()

    def _count_auth_errors(self) -> None:
        """Count every AuthError frame this process writes to a socket, by its error's
        text up to the first colon (``TokenExpired``, ...).

        LocalConvex has no counter of the AuthErrors it sends (it records the tokens it
        receives, and whether each verified, but not the frames it answers with), so this
        wraps aiohttp's ``WebSocketResponse.send_frame`` for the whole server process,
        where LocalConvex is the only WebSocket server: a frame counts once aiohttp has
        written it (one on a socket that is already gone raises instead).
        """
        from aiohttp import WSMsgType, web

        original = web.WebSocketResponse.send_frame
        counts = self.auth_errors_sent

        async def send_frame(
            ws: web.WebSocketResponse,
            message: bytes,
            opcode: WSMsgType,
            compress: int | None = None,
        ) -> None:
            await original(ws, message, opcode, compress)
            if opcode is WSMsgType.TEXT and b'"AuthError"' in message:
                frame = msgspec.json.decode(message)
                if isinstance(frame, dict) and frame.get("type") == "AuthError":
                    error = str(frame.get("error", ""))
                    counts[error.split(":", 1)[0].strip()[:60] or "(empty)"] += 1

        setattr(web.WebSocketResponse, "send_frame", send_frame)  # noqa: B010

    def _token_fault(self) -> str | None:
        return self.burst_mode if time.time() < self.burst_until else None

    def _new_convex(self, port: int) -> Any:
        from dartvex_auth_better.testing import LocalConvex

        convex = LocalConvex(jwks=self.issuer.jwks, issuer=self.issuer.issuer, port=port)

        def counter(ctx: Any, client: int) -> tuple[str | None, dict[str, Any]]:
            docs = ctx.db.query(f"soak_c{client}")
            if docs:
                return docs[0]["_id"], docs[0]
            return None, {"n": 0, "last": -1}

        @convex.mutation("soak:add")
        def add(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
            client, seq = int(args["client"]), int(args["seq"])
            self.applied[(client, seq)] += 1
            doc_id, doc = counter(ctx, client)
            fields = {"n": doc["n"] + 1, "last": seq}
            if doc_id is None:
                ctx.db.insert(f"soak_c{client}", fields)
            else:
                ctx.db.patch(doc_id, fields)
            return fields

        @convex.query("soak:get")
        def get(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
            _doc_id, doc = counter(ctx, int(args["client"]))
            return {"n": doc["n"], "last": doc["last"]}

        return convex

    def _account_tokens(self) -> None:
        received = self.convex.received_tokens
        self.tokens_received += len(received)
        self.expired_tokens += sum(1 for t in received if t.was_expired)
        self.rejected_tokens += sum(1 for t in received if t.accepted is False)
        received.clear()

    async def restart(self) -> None:
        async with self.restart_lock:
            old = self.convex
            port = old.port
            self._account_tokens()
            await old.aclose()
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))  # down for a moment
            new = self._new_convex(port)
            # Keep the deployment's data and its record of applied mutations.
            new._db = old._db
            new._db._on_commit = new._commit_ts
            new._mutation_cache = old._mutation_cache
            new._latest_ts = max(new._latest_ts, old._latest_ts)
            for attempt in range(50):
                try:
                    await new.start()
                    break
                except OSError:
                    if attempt == 49:
                        raise
                    await asyncio.sleep(0.1)
            self.convex = new
            self.events["restart"] += 1

    def burst(self, mode: str, seconds: float) -> None:
        self.burst_mode = mode
        self.burst_until = time.time() + seconds
        self.events[f"token_burst_{mode}"] += 1

    async def action(self, name: str) -> None:
        if name == "drop":
            self.events["drop_sockets"] += 1
            await self.convex.drop_connections()
        elif name == "close":
            self.events["close_1011"] += 1
            await self.convex.close_connections()
        elif name == "burst_5xx":
            self.burst("5xx", self.rng.uniform(0.5, 3.0))
        elif name == "burst_timeout":
            self.burst("timeout", self.rng.uniform(0.5, 3.0))
        elif name == "restart":
            await self.restart()

    async def chaos(self, short: bool) -> None:
        if short:
            schedule = [
                "drop",
                "burst_5xx",
                "restart",
                "burst_timeout",
                "close",
                "drop",
                "burst_5xx",
                "restart",
                "drop",
                "burst_timeout",
            ]
            for name in schedule:
                await asyncio.sleep(self.rng.uniform(1.0, 2.0))
                await self.action(name)
            return
        names = ["drop", "close", "burst_5xx", "burst_timeout", "restart"]
        weights = [35, 10, 20, 20, 15]
        for _ in range(100_000):  # bounded: stopped long before by chaos_stop
            await asyncio.sleep(self.rng.uniform(0.5, 3.0))
            await self.action(self.rng.choices(names, weights)[0])

    async def stop_chaos(self) -> None:
        if self.chaos_task is not None:
            self.chaos_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.chaos_task
            self.chaos_task = None
        async with self.restart_lock:
            pass
        self.burst_until = 0.0

    def stats(self) -> dict[str, Any]:
        self._account_tokens()
        truth: dict[str, dict[str, int]] = {}
        for doc_table in self.convex.db.tables():
            if doc_table.startswith("soak_c"):
                doc = self.convex.db.query(doc_table)[0]
                truth[doc_table[len("soak_c") :]] = {"n": int(doc["n"]), "last": int(doc["last"])}
        applied: dict[str, list[int]] = {}
        duplicates = 0
        for (client, seq), count in self.applied.items():
            applied.setdefault(str(client), []).append(seq)
            duplicates += count - 1
        return {
            "truth": truth,
            "applied": applied,
            "duplicates": duplicates,
            "events": dict(self.events),
            "token_calls": len(self.tokens.arrivals),
            "token_failures_injected": self.tokens.failures,
            "tokens_received": self.tokens_received,
            "expired_tokens_sent": self.expired_tokens,
            "rejected_tokens": self.rejected_tokens,
            "auth_errors_sent": sum(self.auth_errors_sent.values()),
            "auth_errors_sent_by_kind": dict(self.auth_errors_sent),
            "peak_rss": peak_rss_bytes(),
        }


async def serve(seed: int) -> None:
    from tests.benchmarks._common import quiet_logging
    from tests.benchmarks._servers import start_app, stdin_lines

    quiet_logging()
    server = SoakServer(seed)
    await server.convex.start()
    token_runner, token_port = await start_app(server.tokens.app())
    try:
        emit({"convex_url": server.convex.url, "token_url": f"http://127.0.0.1:{token_port}/token"})
        reader = await stdin_lines()
        while line := await reader.readline():
            request = msgspec.json.decode(line)
            op = request.get("op")
            if op == "chaos_start":
                server.chaos_task = asyncio.create_task(server.chaos(bool(request["short"])))
                emit({"ok": True})
            elif op == "chaos_stop":
                await server.stop_chaos()
                emit({"ok": True})
            elif op == "stats":
                emit(server.stats())
            else:
                emit({"error": f"unknown op {op!r}"})
    finally:
        await server.stop_chaos()
        await server.convex.aclose()
        await token_runner.cleanup()


# =====================================================================================
# The client process
# =====================================================================================


class _CountingHandler(logging.Handler):
    """Counts the SDK's log records by message template; prints nothing."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[str(record.msg)] += 1


def _status(c: SoakClient) -> str:
    status = c.client.connection_status
    return (
        f"c{c.index}: {status.state.value}, connections {status.connection_count}, "
        f"retries {status.connection_retries}, mutations in flight {status.inflight_mutations}"
    )


class SoakClient:
    def __init__(
        self,
        index: int,
        url: str,
        token_url: str,
        session: aiohttp.ClientSession,
        token_session: aiohttp.ClientSession,
        rng: random.Random,
        finished: asyncio.Event,
    ) -> None:
        from dartvex_auth_better import ConvexClient

        self.index = index
        self.token_url = token_url
        self.token_session = token_session
        self.rng = rng
        self.client = ConvexClient(url, session=session, initial_backoff=0.25, max_backoff=4.0)
        self.sent: list[int] = []
        self.failed: list[str] = []
        self.fetch_ok = 0
        self.fetch_failed = 0
        self.last_value: Any = None
        self.value_changed = asyncio.Event()
        self.stop = asyncio.Event()
        self.loop_done = asyncio.Event()
        self.done_at: float | None = None  # perf_counter when the mutation loop ended
        self.finished = finished

    async def fetch(self, force: bool) -> str | None:
        params = {"sub": f"c{self.index}", "ttl": str(TOKEN_TTL)}
        try:
            async with self.token_session.get(
                self.token_url, params=params, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"token endpoint answered {resp.status}")
                token: str = (await resp.json())["token"]
        except BaseException:
            self.fetch_failed += 1
            raise
        self.fetch_ok += 1
        return token

    async def watch(self, subscription: Any) -> None:
        async for value in subscription:
            self.last_value = value
            self.value_changed.set()

    async def run(self, started: asyncio.Event) -> None:
        async with self.client, asyncio.TaskGroup() as tg:
            await self.client.set_auth(self.fetch)
            subscription = self.client.subscribe("soak:get", {"client": self.index})
            watcher = tg.create_task(self.watch(subscription))
            started.set()
            seq = 0
            while not self.stop.is_set():
                seq += 1
                self.sent.append(seq)
                try:
                    await self.client.mutation("soak:add", {"client": self.index, "seq": seq})
                except Exception as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.rng.uniform(0.05, 0.4)):
                        await self.stop.wait()
            self.done_at = time.perf_counter()
            self.loop_done.set()
            await self.finished.wait()
            watcher.cancel()


async def soak(seconds: float, short: bool, seed: int, clients: int) -> dict[str, Any]:
    from dartvex_auth_better import ClientClosedError  # noqa: F401  (import cost outside timing)

    handler = _CountingHandler()
    sdk_logger = logging.getLogger("dartvex_auth_better")
    sdk_logger.addHandler(handler)
    sdk_logger.setLevel(logging.DEBUG)
    sdk_logger.propagate = False
    rng = random.Random(seed)
    server = Helper(
        "soak-server",
        [sys.executable, "-m", "tests.benchmarks._soak", "server", "--seed", str(seed)],
        cwd=REPO_ROOT,
    )
    await server.start()
    report: dict[str, Any] = {
        "seconds": seconds,
        "clients": clients,
        "token_ttl": TOKEN_TTL,
        "token_source": "TestTokenIssuer-backed HTTP endpoint",
    }
    try:
        info = await server.answer(120)
        baseline_tasks = set(asyncio.all_tasks())
        baseline_sockets = open_sockets()
        started_at = time.perf_counter()
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as tokens:
            finished = asyncio.Event()
            fleet = [
                SoakClient(
                    i,
                    info["convex_url"],
                    info["token_url"],
                    session,
                    tokens,
                    random.Random(rng.random()),
                    finished,
                )
                for i in range(clients)
            ]
            starts = [asyncio.Event() for _ in fleet]
            runs = [asyncio.create_task(c.run(e)) for c, e in zip(fleet, starts, strict=True)]
            async with asyncio.timeout(120):
                await asyncio.gather(*(e.wait() for e in starts))
            report["startup_seconds"] = time.perf_counter() - started_at
            await server.call({"op": "chaos_start", "short": short}, 30)
            await asyncio.sleep(seconds)
            await server.call({"op": "chaos_stop"}, 60)
            for c in fleet:
                c.stop.set()
            # Every loop finishes its last mutation (all of them must land).
            drain_started = time.perf_counter()
            liveness_ok = True
            all_done = asyncio.gather(*(c.loop_done.wait() for c in fleet))
            # A client still in its last mutation 3 s after the chaos stopped is a
            # straggler: what its connection looked like then goes in the report.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    await asyncio.shield(all_done)
            stragglers = [c for c in fleet if not c.loop_done.is_set()]
            report["drain_stragglers"] = len(stragglers)
            report["drain_stragglers_sample"] = [_status(c) for c in stragglers[:5]]
            try:
                async with asyncio.timeout(117):
                    await all_done
            except TimeoutError:
                liveness_ok = False
            report["drain_seconds"] = time.perf_counter() - drain_started
            report["drain_slowest"] = sorted(
                (round(c.done_at - drain_started, 2), f"c{c.index}")
                for c in fleet
                if c.done_at is not None
            )[-5:]
            stats = await server.call({"op": "stats"}, 60)
            truth = stats["truth"]
            # Each subscription must reach the server's final value for its counter, all
            # within one 30-second window (waited for together, so a broken run fails in
            # 30 s, not 30 s per client).
            deadline = asyncio.get_running_loop().time() + 30.0

            async def reaches(c: SoakClient, want: dict[str, int]) -> bool:
                try:
                    async with asyncio.timeout_at(deadline):
                        while c.last_value != want:
                            c.value_changed.clear()
                            await c.value_changed.wait()
                except TimeoutError:
                    return False
                return True

            wants = [truth.get(str(c.index), {"n": 0, "last": -1}) for c in fleet]
            oks = await asyncio.gather(*(reaches(c, w) for c, w in zip(fleet, wants, strict=True)))
            right = sum(oks)
            wrong = [
                f"c{c.index}: saw {c.last_value}, want {want}"
                for c, want, ok in zip(fleet, wants, oks, strict=True)
                if not ok
            ]
            reconnects = sum(max(c.client.connection_status.connection_count - 1, 0) for c in fleet)
            finished.set()
            try:
                # Closing is bounded too: a client that cannot close fails the run.
                async with asyncio.timeout(60):
                    results = await asyncio.gather(*runs, return_exceptions=True)
            except TimeoutError:
                results = [TimeoutError("a client did not close within 60 s")]
            run_errors = [repr(r) for r in results if isinstance(r, BaseException)]
        await asyncio.sleep(0.5)  # aiohttp's connector closes transports on the next tick
        tasks_left = [
            t for t in asyncio.all_tasks() - baseline_tasks if t is not asyncio.current_task()
        ]
        # A closed transport's file descriptor goes when the loop gets to it; a busy
        # machine may need longer than the half second. A socket still open after 5 s
        # more is a leak.
        settle_started = time.perf_counter()
        sockets_left = open_sockets() - baseline_sockets
        while sockets_left > 0 and time.perf_counter() - settle_started < 5.0:
            await asyncio.sleep(0.1)
            sockets_left = open_sockets() - baseline_sockets
        report["socket_settle_seconds"] = 0.5 + time.perf_counter() - settle_started
        # Mutations: sent vs applied, exactly once.
        applied: dict[str, list[int]] = stats["applied"]
        sent_total = sum(len(c.sent) for c in fleet)
        applied_total = sum(len(v) for v in applied.values())
        mismatched = [
            f"c{c.index}" for c in fleet if sorted(applied.get(str(c.index), [])) != c.sent
        ]
        failed_calls = [f for c in fleet for f in c.failed]
        counts = handler.counts
        report.update(
            {
                "chaos_events": stats["events"],
                "token_refreshes": sum(c.fetch_ok for c in fleet),
                "token_fetch_failures": sum(c.fetch_failed for c in fleet),
                "token_failures_injected": stats["token_failures_injected"],
                "tokens_received_by_server": stats["tokens_received"],
                # Counted by the server as it sent them (not from the clients' logs).
                "auth_errors_sent": stats["auth_errors_sent"],
                "auth_errors_sent_by_kind": stats["auth_errors_sent_by_kind"],
                "rejected_tokens": stats["rejected_tokens"],
                "expired_tokens_sent": stats["expired_tokens_sent"],
                "reconnects": reconnects,
                "mutations_sent": sent_total,
                "mutations_applied": applied_total,
                "mutations_applied_twice": stats["duplicates"],
                "mutation_calls_failed": len(failed_calls),
                "mutation_failures_sample": failed_calls[:5],
                "clients_with_mismatched_mutations": mismatched[:10],
                "subscriptions_right": right,
                "subscriptions_wrong_sample": wrong[:5],
                "tasks_left": len(tasks_left),
                "tasks_left_sample": [repr(t)[:200] for t in tasks_left[:5]],
                "sockets_left": sockets_left,
                "client_errors": run_errors[:5],
                "liveness_ok": liveness_ok,
                "peak_rss_client_mib": peak_rss_bytes() / 2**20,
                "peak_rss_server_mib": stats["peak_rss"] / 2**20,
                "log_counts": dict(counts.most_common(12)),
            }
        )
        invariants = {
            "expired tokens sent = 0": stats["expired_tokens_sent"] == 0,
            "mutations sent = applied, exactly once": (
                not mismatched and stats["duplicates"] == 0 and sent_total == applied_total
            ),
            "no mutation call failed": not failed_calls,
            "every subscription ended on the right value": right == len(fleet),
            "no task left after close": not tasks_left,
            "no socket left after close": sockets_left <= 0,
            "every client ran to the end": not run_errors and liveness_ok,
        }
        report["invariants"] = invariants
    finally:
        await server.stop()
    return report


def _print(report: dict[str, Any]) -> None:
    keys = [
        "seconds",
        "clients",
        "token_ttl",
        "token_source",
        "chaos_events",
        "token_refreshes",
        "token_fetch_failures",
        "token_failures_injected",
        "auth_errors_sent",
        "auth_errors_sent_by_kind",
        "rejected_tokens",
        "expired_tokens_sent",
        "reconnects",
        "mutations_sent",
        "mutations_applied",
        "mutations_applied_twice",
        "mutation_calls_failed",
        "subscriptions_right",
        "startup_seconds",
        "drain_seconds",
        "drain_slowest",
        "drain_stragglers",
        "drain_stragglers_sample",
        "tasks_left",
        "sockets_left",
        "peak_rss_client_mib",
        "peak_rss_server_mib",
    ]
    print("== soak ==")
    for key in keys:
        value = report.get(key)
        if isinstance(value, float):
            value = round(value, 1)
        print(f"{key:28} {value}")
    print("-- invariants --")
    for name, ok in report["invariants"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "server":
        parser = argparse.ArgumentParser(prog="python -m tests.benchmarks._soak server")
        parser.add_argument("--seed", type=int, default=1)
        args = parser.parse_args(argv[1:])
        asyncio.run(serve(args.seed))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks soak")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument(
        "--short",
        action="store_true",
        help=f"the CI-sized pass/fail run (~{SHORT_SECONDS:.0f} s of chaos)",
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", default=str(RESULTS_DIR / "soak.json"))
    args = parser.parse_args(argv)
    short = args.short or args.minutes is None
    seconds = SHORT_SECONDS if short else float(args.minutes) * 60
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    started = time.perf_counter()
    try:
        report = asyncio.run(soak(seconds, short, seed, args.clients))
    except Exception as exc:
        # The run broke before it could check its invariants (a helper died, a timeout):
        # that is a failure too, and says so in the same closing line.
        traceback.print_exc()
        print(f"soak: the run itself failed (seed {seed}): {type(exc).__name__}: {exc}")
        print("soak: 0 passed, 1 failed")
        return 1
    report["seed"] = seed
    report["wall_seconds"] = time.perf_counter() - started
    _print(report)
    RESULTS_DIR.mkdir(exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"results written to {args.json} (seed {seed}, {report['wall_seconds']:.0f} s)")
    outcomes = list(report["invariants"].values())
    passed = sum(1 for ok in outcomes if ok)
    print(f"soak: {passed} passed, {len(outcomes) - passed} failed")
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
