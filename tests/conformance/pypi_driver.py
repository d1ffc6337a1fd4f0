"""Conformance driver for the official PyPI ``convex`` client (a PyO3 build of convex-rs).

Run by ``test_conformance.py`` as ``python pypi_driver.py`` in a separate process: the
client's calls hold the GIL while they block (reference §10), so it cannot share an
interpreter with the LocalConvex the test runs in its event loop. The scenario comes in
the ``CONFORMANCE_CONFIG`` environment variable (JSON: ``url``, ``token``, ``listArgs``
and ``actArgs``, the args in Convex JSON) and is the same one the npm driver
(``npm_client/driver.mjs``) and the in-process run of our client follow:

    set_auth -> subscribe list -> mutation "one" -> action -> one-shot query whoami ->
    mutation "two" (the test drops every socket while the server runs it) ->
    mutation "three" -> action again -> unsubscribe + subscribe list again -> done.

Every observation is one stdout line, ``"@@conformance " + JSON``, with values in Convex
JSON. The wheel's own logging (``init_logging``) may also write to stdout; the test
ignores lines without the marker.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from convex import ConvexClient, QuerySubscription, convex_to_json, json_to_convex

MARK = "@@conformance "
WATCHDOG_SECONDS = 60.0


def from_convex_json(value: Any) -> Any:
    """``json_to_convex``, after turning JSON integers into floats: a Convex JSON number is
    a float64, but the wheel's decoder refuses a Python int ("Bad JSON value: 10")."""

    def floats(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str | float):
            return v
        if isinstance(v, int):
            return float(v)
        if isinstance(v, list):
            return [floats(item) for item in v]
        return {k: floats(item) for k, item in v.items()}

    return json_to_convex(floats(value))


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(event) + "\n")
    sys.stdout.flush()


class Updates:
    """Values of one subscription, read (blocking) until one satisfies a predicate."""

    def __init__(self, label: str, subscription: QuerySubscription) -> None:
        self.label = label
        self.subscription = subscription
        self.last: Any = None

    def until(self, predicate: Callable[[Any], bool]) -> Any:
        while self.last is None or not predicate(self.last):
            value = convex_to_json(next(self.subscription))
            self.last = value
            emit({"event": "update", "sub": self.label, "value": value})
        return self.last


def bodies_end(*expected: str) -> Callable[[Any], bool]:
    """The list's bodies end with ``expected`` (a client that applies a re-sent mutation
    twice still gets through the scenario; the test judges the values it printed)."""
    want = list(expected)
    return lambda value: (
        isinstance(value, dict)
        and value.get("bodies", [])[len(value.get("bodies", [])) - len(want) :] == want
    )


def step(name: str, call: Callable[[], Any]) -> None:
    try:
        value = call()
    except Exception as exc:
        emit({"event": "error", "step": name, "message": str(exc)})
        raise
    emit({"event": "result", "step": name, "value": convex_to_json(value)})


def main() -> None:
    config = json.loads(os.environ["CONFORMANCE_CONFIG"])
    list_args = from_convex_json(config["listArgs"])
    assert isinstance(list_args, dict)
    channel = list_args["channel"]
    client = ConvexClient(config["url"])
    client.set_auth(config["token"])

    listing = Updates("list", client.subscribe("conformance:list", list_args))
    listing.until(bodies_end())
    emit({"event": "subscribed"})

    step(
        "send-one", lambda: client.mutation("conformance:send", {"channel": channel, "body": "one"})
    )
    listing.until(bodies_end("one"))
    act_args = from_convex_json(config["actArgs"])
    assert isinstance(act_args, dict)
    step("act-1", lambda: client.action("conformance:act", act_args))
    step("whoami", lambda: client.query("conformance:whoami", {}))
    # The test drops every socket while the server runs this one (it waits on a gate).
    step(
        "send-two",
        lambda: client.mutation(
            "conformance:send", {"channel": channel, "body": "two", "gated": True}
        ),
    )
    listing.until(bodies_end("two"))
    step(
        "send-three",
        lambda: client.mutation("conformance:send", {"channel": channel, "body": "three"}),
    )
    listing.until(bodies_end("three"))
    step("act-2", lambda: client.action("conformance:act", {"x": 2}))

    listing.subscription.unsubscribe()
    again = Updates("list-again", client.subscribe("conformance:list", list_args))
    again.until(lambda _value: True)
    again.subscription.unsubscribe()
    emit({"event": "done"})


if __name__ == "__main__":
    # Blocking calls retry forever and hold the GIL; this C-level watchdog still fires.
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    try:
        main()
    except BaseException as exc:
        emit({"event": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # The wheel's tokio runtime keeps threads alive; leave without waiting for them.
    os._exit(0)
