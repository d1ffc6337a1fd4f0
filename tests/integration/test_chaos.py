"""Chaos: mutations keep their exactly-once promise while the socket keeps dying."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import anyio
import pytest

from dartvex_auth_better import ConvexClient
from dartvex_auth_better.testing import LocalConvex

pytestmark = [pytest.mark.anyio]

MUTATIONS = 500
IN_FLIGHT = 20
SEED = 20261203


def register_counter(convex: LocalConvex, committed: list[int], on_commit: asyncio.Event) -> None:
    @convex.query("counter:get")
    def get(ctx: Any, args: dict[str, Any]) -> float:
        rows = ctx.db.query("counters")
        return float(rows[0]["value"]) if rows else 0.0

    @convex.mutation("counter:increment")
    def increment(ctx: Any, args: dict[str, Any]) -> float:
        rows = ctx.db.query("counters")
        value: float
        if rows:
            value = rows[0]["value"] + 1
            ctx.db.patch(rows[0]["_id"], {"value": value})
        else:
            value = 1
            ctx.db.insert("counters", {"value": value})
        committed.append(args["n"])
        on_commit.set()
        return value


async def test_500_mutations_apply_exactly_once_through_random_drops():
    rng = random.Random(SEED)
    committed: list[int] = []
    drops = 0
    commit_seen = asyncio.Event()
    async with LocalConvex() as convex:
        register_counter(convex, committed, commit_seen)
        # Short reconnect delays: the point is many drops, not waiting out the backoff
        # (whose numbers have their own tests).
        async with ConvexClient(convex.url, initial_backoff=0.05, max_backoff=0.5) as client:
            subscription = client.subscribe("counter:get")
            with anyio.fail_after(10):
                assert await subscription.next() == 0

            # Drop the socket after a random number of commits: sometimes between a
            # commit and its response reaching the client (the replay must not apply it
            # twice), sometimes with many mutations queued or in flight.
            next_drop_at = rng.randint(5, 60)

            async def chaos() -> None:
                nonlocal next_drop_at, drops
                while True:
                    await commit_seen.wait()
                    commit_seen.clear()
                    if len(committed) >= next_drop_at:
                        await convex.drop_connections()
                        drops += 1
                        next_drop_at = len(committed) + rng.randint(5, 60)

            results: list[float] = []
            limiter = anyio.CapacityLimiter(IN_FLIGHT)

            async def one(n: int) -> None:
                async with limiter:
                    results.append(await client.mutation("counter:increment", {"n": n}))

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(chaos)
                    async with anyio.create_task_group() as workers:
                        for n in range(MUTATIONS):
                            workers.start_soon(one, n)
                    tg.cancel_scope.cancel()

                # Every call returned, each with a distinct counter value.
                assert sorted(results) == list(range(1, MUTATIONS + 1))
                # The server applied each mutation exactly once.
                assert sorted(committed) == list(range(MUTATIONS))
                # The subscription ends on the final value (read-your-writes after the
                # last mutation returned).
                assert subscription.current() == MUTATIONS
            subscription.close()
            assert drops >= 3, f"the chaos must actually drop sockets (dropped {drops})"
            assert len(convex.connections) == drops + 1
        # Nothing left behind: no SDK task, every server-side socket closed.
        leftovers = [
            t
            for t in asyncio.all_tasks()
            if not t.done() and t.get_name().startswith("dartvex_auth_better.convex")
        ]
        assert leftovers == []
        with anyio.fail_after(5):
            for record in convex.connections:
                await record.wait_closed()
