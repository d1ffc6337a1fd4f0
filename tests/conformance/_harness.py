"""The conformance scenario: one LocalConvex, three clients, one after the other.

:class:`ConformanceApp` registers the scenario's functions on a LocalConvex; ``run_ours``,
``run_npm`` and ``run_pypi`` drive the same scenario, with the same Better Auth JWT, through

* ``ours``: :class:`dartvex_auth_better.ConvexClient`, in this process and event loop;
* ``npm``: the npm ``convex`` package's ``ConvexClient`` under Node (``npm_client/driver.mjs``);
* ``pypi``: the PyPI ``convex`` client in a separate interpreter (``pypi_driver.py``).

Scenario (keep the three in step; the drivers carry the same list):

1. authenticate with the JWT, subscribe to ``conformance:list`` (args of every Convex type),
   see ``[]``;
2. mutation ``send("one")``, see ``["one"]``; action ``act``; one-shot query ``whoami``;
3. mutation ``send("two")``, which waits on a gate in the server. While it is waiting the
   test calls ``LocalConvex.drop_connections()`` (TCP abort: a forced reconnect with a
   mutation in flight) and then opens the gate. The client must reconnect, authenticate
   again, re-add the subscription, re-send the mutation, and see ``["one", "two"]``;
4. mutation ``send("three")`` on the new socket, see it; action again;
5. unsubscribe and subscribe again to the same query (a re-subscribe after reconnect).

Clients run one at a time so that each one's connection records are exactly the ones
opened while it ran; the table is emptied between runs so all see the same values.
Observations are dicts ``{"event": "update"|"result"|"error"|..., ...}`` with values in
Convex JSON, the same shape from every client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream

from dartvex_auth_better import ConvexClient, ConvexError, Int64
from dartvex_auth_better.convex._values import encode_value
from dartvex_auth_better.testing import LocalConvex
from dartvex_auth_better.testing._convex_server import ConnectionRecord

__all__ = [
    "ACT_ARGS",
    "CLIENTS",
    "LIST_ARGS",
    "ClientRun",
    "ConformanceApp",
    "run_npm",
    "run_ours",
    "run_pypi",
]

HERE: Final = Path(__file__).resolve().parent
MARK: Final = "@@conformance "
CLIENTS: Final = ("ours", "npm", "pypi")
CHANNEL: Final = "conformance"
PHASE_TIMEOUT: Final = 30.0
"""Upper bound for one client's whole run; a normal run takes 1-3 s."""

# Arguments that exercise every Convex JSON encoding (reference §5): float64 given as a
# whole number, int64, a fraction, bool, null, bytes, -0.0, NaN, nested array/object.
LIST_ARGS: Final[dict[str, Any]] = {
    "channel": CHANNEL,
    "limit": 10,
    "big": Int64(5),
    "ratio": 1.5,
    "flag": True,
    "nothing": None,
    "blob": b"\x01\x02",
    "negz": -0.0,
    "nan": float("nan"),
    "nested": {"arr": [1, "x", None, True]},
}
ACT_ARGS: Final[dict[str, Any]] = {"x": 21}


# --------------------------------------------------------------------------------------
# The deployment's functions
# --------------------------------------------------------------------------------------


@dataclass
class Gate:
    """Holds ``send(gated=True)`` in the server until the test has dropped the sockets."""

    entered: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    entries: int = 0


class ConformanceApp:
    """The functions the scenario calls, registered on a LocalConvex."""

    def __init__(self, convex: LocalConvex) -> None:
        self.convex = convex
        self.gate = Gate()
        self.send_calls = 0
        convex.query("conformance:list")(self._list)
        convex.mutation("conformance:send")(self._send)
        convex.action("conformance:act")(self._act)
        convex.query("conformance:whoami")(self._whoami)

    def reset(self) -> None:
        """Empty the table and arm a new gate before the next client runs."""
        self.gate.release.set()
        self.gate = Gate()
        self.send_calls = 0
        for doc in self.convex.db.query("conformance_messages"):
            self.convex.db.delete(doc["_id"])

    def close(self) -> None:
        self.gate.release.set()

    @staticmethod
    def _subject(ctx: Any) -> str:
        identity = ctx.auth.get_user_identity()
        if identity is None:
            raise ConvexError("Not authenticated", data={"code": "UNAUTHENTICATED"})
        subject: str = identity["subject"]
        return subject

    def _list(self, ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        self._subject(ctx)
        rows = [m for m in ctx.db.query("conformance_messages") if m["channel"] == args["channel"]]
        return {
            "bodies": [m["body"] for m in rows],
            "authors": sorted({m["author"] for m in rows}),
            # What the server decoded from the wire, for comparing the args encodings.
            "echo": {k: v for k, v in args.items() if k != "channel"},
        }

    async def _send(self, ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        subject = self._subject(ctx)
        self.send_calls += 1
        if args.get("gated"):
            gate = self.gate
            gate.entries += 1
            gate.entered.set()
            await gate.release.wait()
        ctx.db.insert(
            "conformance_messages",
            {"channel": args["channel"], "body": args["body"], "author": subject},
        )
        count = sum(
            1 for m in ctx.db.query("conformance_messages") if m["channel"] == args["channel"]
        )
        return {"body": args["body"], "count": count, "subject": subject}

    def _act(self, ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        identity = ctx.auth.get_user_identity()
        return {
            "doubled": args["x"] * 2,
            "subject": identity["subject"] if identity else None,
            "email": identity.get("email") if identity else None,
        }

    def _whoami(self, ctx: Any, args: dict[str, Any]) -> dict[str, Any] | None:
        identity = ctx.auth.get_user_identity()
        if identity is None:
            return None
        return {k: identity.get(k) for k in ("subject", "issuer", "email", "tokenIdentifier")}


# --------------------------------------------------------------------------------------
# One client's run
# --------------------------------------------------------------------------------------


@dataclass
class ClientRun:
    """What one client observed, and what LocalConvex recorded about its sockets."""

    name: str
    events: list[dict[str, Any]] = field(default_factory=list)
    connections: list[ConnectionRecord] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0
    gate_entries: int = 0
    send_calls: int = 0

    def results(self) -> dict[str, Any]:
        return {e["step"]: e["value"] for e in self.events if e["event"] == "result"}

    def updates(self, sub: str) -> list[Any]:
        return [e["value"] for e in self.events if e["event"] == "update" and e["sub"] == sub]

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] in ("error", "fatal", "update-error")]

    def describe(self) -> str:
        tail = "\n".join(self.log[-30:]) or "(no output)"
        return f"{self.name} events: {json.dumps(self.events)[:3000]}\n{self.name} log:\n{tail}"


class ScenarioFailed(AssertionError):
    pass


async def _first_of(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


async def _force_reconnect(app: ConformanceApp, finished: anyio.Event) -> None:
    """When the gated mutation is running in the server, cut every socket, then let it
    commit (its response is lost with the socket: the client must re-send it)."""
    await _first_of(app.gate.entered, finished)
    if not app.gate.entered.is_set():
        return
    await app.convex.drop_connections()
    app.gate.release.set()


async def _run_phase(
    name: str,
    app: ConformanceApp,
    body: Callable[[ClientRun, anyio.Event], Awaitable[None]],
) -> ClientRun:
    convex = app.convex
    app.reset()
    run = ClientRun(name)
    first = len(convex.connections)
    finished = anyio.Event()
    started = anyio.current_time()
    try:
        with anyio.fail_after(PHASE_TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_force_reconnect, app, finished)
                try:
                    await body(run, finished)
                finally:
                    finished.set()
            # Every socket of this client is gone before the next one starts.
            for record in convex.connections[first:]:
                await record.wait_closed(timeout=PHASE_TIMEOUT)
    except TimeoutError:
        raise ScenarioFailed(
            f"the {name} client did not finish the scenario within {PHASE_TIMEOUT:g} s\n"
            + run.describe()
        ) from None
    run.seconds = anyio.current_time() - started
    run.connections = list(convex.connections[first:])
    run.gate_entries = app.gate.entries
    run.send_calls = app.send_calls
    if run.errors() or not any(e["event"] == "done" for e in run.events):
        raise ScenarioFailed(f"the {name} client failed the scenario\n" + run.describe())
    return run


# -- ours ------------------------------------------------------------------------------


async def run_ours(app: ConformanceApp, url: str, token: str) -> ClientRun:
    async def body(run: ClientRun, finished: anyio.Event) -> None:
        def emit(event: dict[str, Any]) -> None:
            run.events.append(event)

        async def step(name: str, call: Awaitable[Any]) -> None:
            try:
                value = await call
            except Exception as exc:
                emit({"event": "error", "step": name, "message": repr(exc)})
                raise
            emit({"event": "result", "step": name, "value": encode_value(value)})

        def bodies_end(*expected: str) -> Callable[[Any], bool]:
            want = list(expected)
            return lambda value: value["bodies"][len(value["bodies"]) - len(want) :] == want

        class Updates:
            def __init__(self, label: str, subscription: Any) -> None:
                self.label = label
                self.subscription = subscription
                self.last: Any = None

            async def until(self, predicate: Callable[[Any], bool]) -> None:
                while self.last is None or not predicate(self.last):
                    self.last = encode_value(await self.subscription.next())
                    emit({"event": "update", "sub": self.label, "value": self.last})

        channel = LIST_ARGS["channel"]
        async with ConvexClient(url) as client, anyio.create_task_group() as tg:
            # Like the npm driver (whose setAuth is not awaited either): authenticate and
            # subscribe at once; the Authenticate must still precede the query on the wire.
            tg.start_soon(client.set_auth, token)
            listing = Updates("list", client.subscribe("conformance:list", LIST_ARGS))
            await listing.until(bodies_end())
            emit({"event": "subscribed"})
            send = "conformance:send"
            await step("send-one", client.mutation(send, {"channel": channel, "body": "one"}))
            await listing.until(bodies_end("one"))
            await step("act-1", client.action("conformance:act", ACT_ARGS))
            await step("whoami", client.query("conformance:whoami", {}))
            # The test drops every socket while the server runs this one (it waits on a gate).
            two = {"channel": channel, "body": "two", "gated": True}
            await step("send-two", client.mutation(send, two))
            await listing.until(bodies_end("two"))
            await step("send-three", client.mutation(send, {"channel": channel, "body": "three"}))
            await listing.until(bodies_end("three"))
            await step("act-2", client.action("conformance:act", {"x": 2}))
            listing.subscription.close()
            again = Updates("list-again", client.subscribe("conformance:list", LIST_ARGS))
            await again.until(lambda _value: True)
            again.subscription.close()
        emit({"event": "done"})

    return await _run_phase("ours", app, body)


# -- the official clients, in subprocesses ------------------------------------------------


def _config(url: str, token: str) -> str:
    return json.dumps(
        {
            "url": url,
            "token": token,
            "listArgs": encode_value(LIST_ARGS),
            "actArgs": encode_value(ACT_ARGS),
        }
    )


async def _run_process(
    name: str, app: ConformanceApp, argv: list[str], url: str, token: str, cwd: Path
) -> ClientRun:
    env = dict(os.environ)
    env["CONFORMANCE_CONFIG"] = _config(url, token)
    env["NO_COLOR"] = "1"

    async def body(run: ClientRun, finished: anyio.Event) -> None:
        process = await anyio.open_process(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
        try:
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None and process.stderr is not None
                tg.start_soon(_read_lines, process.stdout, run, True)
                tg.start_soon(_read_lines, process.stderr, run, False)
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
            await process.aclose()
        run.log.append(f"[exit status {process.returncode}]")

    return await _run_phase(name, app, body)


async def _read_lines(stream: anyio.abc.ByteReceiveStream, run: ClientRun, stdout: bool) -> None:
    buffer = ""
    async for chunk in TextReceiveStream(stream, errors="replace"):
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            _take_line(line, run, stdout)
    if buffer:
        _take_line(buffer, run, stdout)


def _take_line(line: str, run: ClientRun, stdout: bool) -> None:
    if stdout and line.startswith(MARK):
        run.events.append(json.loads(line[len(MARK) :]))
    elif line.strip():
        run.log.append(("" if stdout else "[stderr] ") + line)


async def run_npm(
    app: ConformanceApp, url: str, token: str, *, node: str, install_dir: Path
) -> ClientRun:
    driver = HERE / "npm_client" / "driver.mjs"
    return await _run_process(
        "npm", app, [node, str(driver), str(install_dir)], url, token, HERE / "npm_client"
    )


async def run_pypi(app: ConformanceApp, url: str, token: str) -> ClientRun:
    driver = HERE / "pypi_driver.py"
    return await _run_process("pypi", app, [sys.executable, str(driver)], url, token, HERE)
