"""The examples in the docstrings the API reference renders (docs/reference/), run
against the local stack.

Each is run as written, with its placeholders (``CONVEX_URL``, ``EMAIL``...) given
values; the one change is a ``site_url``, since the local Better Auth server does not
answer on the deployment's ``.convex.site`` host.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dartvex_auth_better import BetterAuthClient, DartvexError, TransportError
from dartvex_auth_better.integrations import starlette
from dartvex_auth_better.integrations.starlette import (
    STATE_KEY,
    ConvexLifespan,
    ConvexResources,
    convex_error_handler,
)
from dartvex_auth_better.testing import LocalBetterAuth, LocalConvex

from ._helpers import PASSWORD, WAIT, new_email, serve
from .test_pages import documented

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def literal_blocks(doc: str) -> list[str]:
    """The reStructuredText literal blocks of a docstring: the lines indented under a
    line that ends with ``::``, dedented."""
    lines = doc.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.rstrip().endswith("::"):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            body.append(lines[i])
            i += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n") + "\n")
    return blocks


def rendered_objects() -> dict[str, object]:
    """Every object whose docstring the API reference renders, by dotted name: the
    documented names and, for classes, their public members."""
    found: dict[str, object] = {}
    for name in documented():
        module_name, _, attribute = name.rpartition(".")
        try:
            obj: object = importlib.import_module(name)
        except ImportError:
            obj = getattr(importlib.import_module(module_name), attribute)
        found[name] = obj
        if inspect.isclass(obj):
            for member, value in vars(obj).items():
                if not member.startswith("_") or member == "__init__":
                    found[f"{name}.{member}"] = value
    return found


def example(owner: object) -> str:
    """The one literal block in ``owner``'s docstring."""
    [block] = literal_blocks(inspect.getdoc(owner) or "")
    return block


def for_the_local_stack(source: str) -> str:
    """The example with ``site_url=SITE_URL`` added to its ConvexLifespan."""
    call = "ConvexLifespan(CONVEX_URL"
    assert source.count(call) == 1, source
    return source.replace(call, f"{call}, site_url=SITE_URL")


def run(source: str, name: str, namespace: dict[str, Any]) -> dict[str, Any]:
    exec(compile(source, f"<docstring example: {name}>", "exec"), namespace)
    return namespace


async def new_account(better_auth: LocalBetterAuth, name: str) -> tuple[str, str]:
    email = new_email(name.lower())
    async with BetterAuthClient(better_auth.url) as auth:
        session = await auth.sign_up(name, email, PASSWORD)
    return email, session.session_token


def test_every_docstring_example_is_run_here() -> None:
    with_examples = {
        name: len(blocks)
        for name, obj in rendered_objects().items()
        if (blocks := literal_blocks(inspect.getdoc(obj) or ""))
    }
    # Each one is run by a test below; a new example needs a test of its own.
    assert with_examples == {
        "dartvex_auth_better.integrations.starlette": 1,
        "dartvex_auth_better.integrations.starlette.ConvexLifespan": 1,
        "dartvex_auth_better.integrations.starlette.convex_error_handler": 1,
    }


async def test_the_starlette_module_example(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    service_email, _ = await new_account(better_auth_server, "Service")
    _, caller_token = await new_account(better_auth_server, "Caller")
    namespace = run(
        for_the_local_stack(example(starlette)),
        "starlette",
        {
            "CONVEX_URL": convex_server.url,
            "SITE_URL": better_auth_server.url,
            "EMAIL": service_email,
            "PASSWORD": PASSWORD,
        },
    )
    app = namespace["app"]
    assert isinstance(app, FastAPI)
    assert app.exception_handlers[DartvexError] is convex_error_handler
    bearer = {"Authorization": f"Bearer {caller_token}"}
    with anyio.fail_after(WAIT):
        async with serve(app) as (http, state):
            whoami = await http.get("/service/whoami")
            assert whoami.status_code == 200 and whoami.json()["email"] == service_email
            # A message of the caller's, and one of the service's: /me/messages is the
            # caller's own.
            caller = await state[STATE_KEY].client_for(caller_token)
            await caller.mutation("messages:send", {"body": "mine"})
            assert state[STATE_KEY].service is not None
            await state[STATE_KEY].service.mutation("messages:send", {"body": "the service's"})
            mine = await http.get("/me/messages", headers=bearer)
            assert mine.status_code == 200, mine.text
            assert [m["body"] for m in mine.json()] == ["mine"]
            assert (await http.get("/me/messages")).status_code == 401


async def test_the_composed_lifespan_example(
    better_auth_server: LocalBetterAuth, convex_server: LocalConvex
) -> None:
    email, token = await new_account(better_auth_server, "Composed")
    db = object()  # the app's own resource
    namespace = run(
        for_the_local_stack(example(ConvexLifespan)),
        "ConvexLifespan",
        {
            # What the module example imported.
            "FastAPI": FastAPI,
            "ConvexLifespan": ConvexLifespan,
            "CONVEX_URL": convex_server.url,
            "SITE_URL": better_auth_server.url,
            "db": db,
        },
    )
    with anyio.fail_after(WAIT):
        async with serve(namespace["app"]) as (_, state):
            assert state["db"] is db
            resources = state[STATE_KEY]
            assert isinstance(resources, ConvexResources) and resources.service is None
            caller = await resources.client_for(token)
            assert (await caller.query("users:whoami"))["email"] == email
        assert resources.http.closed  # and the lifespan closed it all at shutdown


async def test_the_error_handler_example() -> None:
    async def unreachable(request: Request) -> JSONResponse:
        raise TransportError("could not reach Convex")

    app = Starlette(routes=[Route("/", unreachable)])
    run(
        example(convex_error_handler),
        "convex_error_handler",
        {"app": app, "DartvexError": DartvexError, "convex_error_handler": convex_error_handler},
    )
    async with serve(app) as (http, _):
        response = await http.get("/")
    assert response.status_code == 503
    assert response.json() == {"detail": "an upstream service is unavailable; retry later"}
