"""The command line: ``dartvex-auth-better ...`` or ``python -m dartvex_auth_better ...``.

Sign in to Better Auth once, then call Convex functions as that user from a shell or a
script: the session token is saved between commands, so only ``signup`` and ``login``
ever ask for a password.

Commands::

    signup EMAIL [--name NAME]        create an account and sign in
    login EMAIL                       sign in with a password (prompted unless given)
    login EMAIL --magic-link          email a sign-in link, then paste the link (or --token)
    whoami                            the signed-in user, as JSON
    token                             a fresh Convex JWT, and nothing else (for scripts)
    query NAME [ARGS]                 run a query; ARGS is a JSON object of Convex values
    mutation NAME [ARGS]              run a mutation
    action NAME [ARGS]                run an action
    watch NAME [ARGS]                 the query's value now and after every change, one
                                      JSON line each, until Ctrl-C
    logout                            sign out on the server and forget the session
    demo                              run the local stack and watch a query update live

The deployment comes from ``--url`` or ``$DARTVEX_URL`` (``https://<name>.convex.cloud``;
Better Auth is then reached on ``<name>.convex.site``). Self-hosted and local setups name
the Better Auth host with ``--site-url`` or ``$DARTVEX_SITE_URL``. The session is kept in
``$DARTVEX_SESSION_FILE``, else ``$XDG_CONFIG_HOME/dartvex_auth_better/session.json``
(``~/.config/...`` without XDG_CONFIG_HOME), a file only its owner can read; with
``--keyring`` it is kept in the system keyring instead. One session is kept at a time,
tied to the Better Auth host that issued it: a command aimed at another deployment finds
no session rather than sending the token to a server that never issued it.

Results go to stdout as JSON (one line; ``--pretty`` indents), in Convex's JSON encoding
where plain JSON falls short (``{"$integer": ...}`` for int64, ``{"$bytes": ...}``). ARGS
use the same encoding. Progress and errors go to stderr; an error is one line starting
with ``error:``, and never shows a password or a token.

``--timeout SECONDS`` (default 30, 0 for none) bounds each wait for a server, and a first
connection that fails ends the command at once; ``--anonymous`` calls a function without
signing in; ``-v``/``-vv`` log what the SDK does (tokens redacted); ``--version`` prints
the package version. ``-v`` and the deployment and session options (``--url``,
``--site-url``, ``--allow-insecure``, ``--timeout``, ``--keyring``, ``--session-file``) go
before or after the command (given on both sides, an option takes its value from after
the command, and ``-v`` counts on both); the others follow it.
``login --magic-link --send-only`` and ``login --magic-link --token TOKEN`` split the
magic link in two steps.

Exit statuses::

    0    success
    1    any other error (e.g. the email is taken, the session cannot be saved)
    2    usage: bad options, or ARGS that are not a JSON object of Convex values
    3    not signed in: no session, session expired or signed out, credentials refused
    4    the Convex function failed; its ConvexError data (if any) is printed on stdout
    5    unavailable: the server could not be reached, did not answer within --timeout,
         or asked to retry later (5xx, 429)
    130  interrupted (Ctrl-C)
    141  stdout was closed early (e.g. piped into head)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import secrets
import select
import stat
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TextIO, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio

from ._errors import (
    AuthRejectedError,
    ConnectionLostError,
    ConvexError,
    DartvexError,
    InvalidCredentialsError,
    InvalidTokenError,
    NoSessionError,
    ProtocolError,
    SessionExpiredError,
    SessionStoreError,
    TransportError,
)
from ._jwt import token_claims
from ._urls import normalize_base_url
from ._version import __version__
from .better_auth._client import BetterAuthClient
from .better_auth._provider import ConvexBetterAuthProvider, _parse_record
from .better_auth._session import BetterAuthSession
from .better_auth._storage import FileSessionStore, KeyringSessionStore, SessionStore
from .convex._auth_types import Unauthenticated
from .convex._authed import AuthenticatedConvexClient
from .convex._client import ConnectionState, ConvexClient
from .convex._values import Int64, decode_value, encode_value

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_SIGNED_IN: Final = 3
EXIT_FUNCTION_ERROR: Final = 4
EXIT_UNAVAILABLE: Final = 5
EXIT_INTERRUPTED: Final = 130
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE, what a shell reports for `yes | head`

PROG: Final = "dartvex-auth-better"

_EXIT_STATUS_HELP: Final = """\
exit statuses:
  0    success
  1    any other error (e.g. the email is taken, the session cannot be saved)
  2    usage: bad options, or ARGS that are not a JSON object of Convex values
  3    not signed in: no session, session expired or signed out, credentials refused
  4    the Convex function failed; its ConvexError data (if any) is printed on stdout
  5    unavailable: the server could not be reached, did not answer within --timeout,
       or asked to retry later (5xx, 429)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. piped into head)
"""

_ENVIRONMENT_HELP: Final = """\
environment:
  DARTVEX_URL            the deployment URL (--url)
  DARTVEX_SITE_URL       where Better Auth answers, when not <name>.convex.site (--site-url)
  DARTVEX_SESSION_FILE   the session file (--session-file)
  XDG_CONFIG_HOME        the session file is $XDG_CONFIG_HOME/dartvex_auth_better/session.json
"""

_DEFAULT_TIMEOUT: Final = 30.0
_SESSION_ENVELOPE_VERSION: Final = 1

T = TypeVar("T")


class _Failure(Exception):
    """Ends the command: ``error: <message>`` on stderr and exit status ``status``; a
    ``data`` that is not None is printed on stdout as JSON (a ConvexError's payload)."""

    def __init__(self, status: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.data = data


def _function_failed(what: str, exc: ConvexError) -> _Failure:
    return _Failure(EXIT_FUNCTION_ERROR, f"{what} failed: {exc}", exc.data)


def _usage(message: str) -> _Failure:
    return _Failure(EXIT_USAGE, message)


# -- output -------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    """A value a Convex function returned, as data ``json.dumps`` can write.

    Int64, bytes and the floats JSON has no syntax for (NaN, the infinities, -0.0) take
    Convex's tagged form, so the output can be fed back as ARGS. Plain ints are the
    server's numbers and stay as they are, however large.
    """
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool | Int64):
        return value
    return encode_value(value)


def _print_json(value: Any, *, pretty: bool = False) -> None:
    text = json.dumps(_json_value(value), ensure_ascii=False, indent=2 if pretty else None)
    # Flushed line by line: `watch` output is read live through pipes.
    print(text, flush=True)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


# -- configuration ------------------------------------------------------------------------


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _default_session_file() -> Path:
    explicit = _env("DARTVEX_SESSION_FILE")
    if explicit is not None:
        return Path(explicit).expanduser()
    config = _env("XDG_CONFIG_HOME")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    base = Path(config) if config is not None and os.path.isabs(config) else None
    if base is None:
        base = Path.home() / ".config"
    return base / "dartvex_auth_better" / "session.json"


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a command talks to and keeps its session, from options and environment."""

    url: str
    site_url: str | None
    allow_insecure: bool
    timeout: float | None
    keyring: bool
    session_file: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Target:
        url = args.url or _env("DARTVEX_URL")
        if url is None:
            raise _usage(
                "no deployment URL: pass --url https://<name>.convex.cloud or set DARTVEX_URL"
            )
        if args.keyring and args.session_file:
            raise _usage("--keyring and --session-file are two places for one session: pick one")
        site_url = args.site_url or _env("DARTVEX_SITE_URL")
        _check_url(url, "--url", args.allow_insecure)
        if site_url is not None:
            _check_url(site_url, "--site-url", args.allow_insecure)
        timeout: float = args.timeout
        return cls(
            url=url,
            site_url=site_url,
            allow_insecure=args.allow_insecure,
            timeout=timeout if timeout > 0 else None,
            keyring=args.keyring,
            session_file=(
                Path(args.session_file).expanduser()
                if args.session_file
                else _default_session_file()
            ),
        )

    def auth_client(self) -> BetterAuthClient:
        return BetterAuthClient(
            self.url, site_url=self.site_url, allow_insecure=self.allow_insecure
        )

    def convex_client(self, *, expect_auth: bool) -> ConvexClient:
        return ConvexClient(self.url, allow_insecure=self.allow_insecure, expect_auth=expect_auth)

    def store(self, site_url: str) -> _HostBoundStore:
        inner: SessionStore
        if self.keyring:
            # One keyring entry per Better Auth host, so deployments never share one.
            inner = KeyringSessionStore(username=site_url)
            where = "the system keyring"
        else:
            inner = FileSessionStore(self.session_file)
            where = str(self.session_file)
        return _HostBoundStore(inner, site_url, where)


def _check_url(url: str, option: str, allow_insecure: bool) -> None:
    """A usage error, in the command line's terms, for a URL the clients would refuse."""
    try:
        normalize_base_url(url, name=option, allow_insecure=allow_insecure)
    except ValueError as exc:
        raise _usage(str(exc).replace("allow_insecure=True", "--allow-insecure")) from None


class _HostBoundStore:
    """A SessionStore that ties the session it holds to the Better Auth host that issued it.

    What the provider stores is wrapped in ``{"version", "site_url", "session"}``. A read
    for another host finds nothing (and remembers whose session is there, for the error
    message), so a command aimed at another deployment never sends this session's token
    to a server that did not issue it, and that server's "unknown session" answer never
    makes the provider delete it. A removal for another host leaves the file alone.

    Write errors are kept in :attr:`save_error` instead of raised: the provider only logs
    them, and the command line reports them as its own error after a sign-in.
    """

    def __init__(self, inner: SessionStore, site_url: str, where: str) -> None:
        self._inner = inner
        self.site_url = site_url
        """The Better Auth host this store keeps a session for."""
        self.where = where
        """Where the session is kept, for messages: a file path or "the system keyring"."""
        self.other_host: str | None = None
        """The host a session found by :meth:`get` belongs to, when it is not ours."""
        self.unrecognised = False
        """True when :meth:`get` found something that is not a session saved here."""
        self.save_error: DartvexError | None = None

    def _unwrap(self, stored: str) -> tuple[str | None, str | None]:
        """(host, session) of a stored envelope; (None, None) when it is not one."""
        try:
            envelope = json.loads(stored)
        except ValueError:
            return None, None
        if not isinstance(envelope, dict) or envelope.get("version") != _SESSION_ENVELOPE_VERSION:
            return None, None
        host, session = envelope.get("site_url"), envelope.get("session")
        if not isinstance(host, str) or not isinstance(session, str):
            return None, None
        return host, session

    async def get(self) -> str | None:
        stored = await self._inner.get()
        if stored is None:
            return None
        host, session = self._unwrap(stored)
        if host is None:
            self.unrecognised = True  # said in the "not signed in" error; login replaces it
            return None
        if host != self.site_url:
            self.other_host = host
            return None
        return session

    async def set(self, value: str) -> None:
        envelope = {
            "version": _SESSION_ENVELOPE_VERSION,
            "site_url": self.site_url,
            "session": value,
        }
        try:
            await self._inner.set(json.dumps(envelope))
        except DartvexError as exc:
            self.save_error = exc

    async def remove(self) -> None:
        stored = await self._inner.get()
        if stored is not None and self._unwrap(stored)[0] not in (None, self.site_url):
            return  # another deployment's session: not ours to delete
        await self._inner.remove()


# -- reading secrets and arguments ----------------------------------------------------------


def _prompt_secret(prompt: str) -> str:
    """Read a secret from the terminal without echo."""
    try:
        with warnings.catch_warnings():
            # Without a terminal getpass reads stdin with echo and warns that it cannot
            # hide the input: there is nothing on screen to hide then.
            warnings.simplefilter("ignore", getpass.GetPassWarning)
            return getpass.getpass(prompt, stream=sys.stderr)
    except KeyboardInterrupt:
        # The cursor is still after the prompt; end the line before "interrupted".
        print(file=sys.stderr)
        raise
    except EOFError:
        print(file=sys.stderr)
        raise _usage("no password given; use --password-stdin to pipe one in") from None


def _read_line(prompt: str) -> str:
    """Print ``prompt`` on stderr and read one line from stdin (EOF: a usage error)."""
    try:
        # Inside the try: a Ctrl-C just after the prompt is shown still ends its line.
        print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise
    if not line:
        print(file=sys.stderr)
        raise _usage("standard input ended before a value was given")
    return line.rstrip("\r\n")


def _password(args: argparse.Namespace, *, confirm: bool) -> str:
    """The password from --password, --password-stdin or a prompt."""
    if args.password is not None:
        password: str = args.password
    elif args.password_stdin:
        # One line, exactly as typed apart from its line ending: spaces may be meant.
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = _prompt_secret("Password: ")
        if confirm and password and _prompt_secret("Repeat the password: ") != password:
            raise _usage("the passwords do not match")
    if not password:
        raise _usage("the password is empty")
    return password


def _magic_token(text: str) -> str:
    """The token in a pasted magic link, or the text itself when it is a bare token."""
    text = text.strip()
    if "://" in text or "?" in text:
        tokens = parse_qs(urlsplit(text).query).get("token")
        if not tokens or not tokens[0]:
            raise _usage("the link has no token= parameter; paste the whole link from the email")
        return tokens[0]
    if not text:
        raise _usage("no magic-link token given")
    return text


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f'{name} is not JSON; write a float like that as {{"$float": ...}}')


def _function_args(text: str) -> dict[str, Any]:
    """ARGS as the Python values to send: a JSON object in Convex's JSON encoding."""
    if text == "-":
        text = sys.stdin.read()
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise _usage(f"ARGS is not valid JSON: {exc}") from None
    try:
        value = decode_value(raw)
        if not isinstance(value, dict):
            raise _usage('ARGS must be a JSON object, such as \'{"body": "hello"}\'')
        encode_value(value)  # catches what cannot be sent now, not after connecting
    except (ProtocolError, TypeError, ValueError) as exc:
        raise _usage(f"ARGS is not a valid Convex value: {exc}") from None
    return value


# -- sessions -----------------------------------------------------------------------------


def _not_signed_in(store: _HostBoundStore) -> _Failure:
    if store.other_host is not None:
        return _Failure(
            EXIT_NOT_SIGNED_IN,
            f"not signed in to {store.site_url}: the saved session is for {store.other_host}; "
            f"run '{PROG} login EMAIL' with this --url",
        )
    found = "what is there is not a session saved by this command" if store.unrecognised else ""
    return _Failure(
        EXIT_NOT_SIGNED_IN,
        f"not signed in (no session in {store.where}{'; ' + found if found else ''}); "
        f"run '{PROG} login EMAIL' first",
    )


async def _restore(
    restore: Callable[[], Awaitable[BetterAuthSession]], store: _HostBoundStore
) -> BetterAuthSession:
    """Run a provider's (or an authenticated client's) ``login_from_cache``, with the
    command line's messages for "there is no session" and "the session is gone"."""
    try:
        return await restore()
    except NoSessionError:
        raise _not_signed_in(store) from None
    except SessionExpiredError:
        raise _Failure(
            EXIT_NOT_SIGNED_IN,
            f"the session has ended (signed out, expired or revoked); run '{PROG} login' again",
        ) from None


def _check_saved(store: _HostBoundStore) -> None:
    if store.save_error is not None:
        raise _Failure(
            EXIT_ERROR,
            f"signed in, but the session could not be saved, so later commands will not be "
            f"signed in: {store.save_error}",
        )


def _signed_in_message(
    session: BetterAuthSession, store: _HostBoundStore, how: str = "signed in"
) -> str:
    who = session.email or session.user_id
    return f"{how} as {who} (user id {session.user_id}); session saved in {store.where}"


def _user_json(session: BetterAuthSession) -> dict[str, Any]:
    return {"user_id": session.user_id, "email": session.email, "name": session.name}


async def _within(limit: float | None, work: Awaitable[T], what: str, note: str = "") -> T:
    """``await work``; after ``limit`` seconds (None: never), a status-5 failure saying
    that ``what`` did not answer in time, followed by ``note``."""
    with anyio.move_on_after(limit):
        return await work
    raise _Failure(EXIT_UNAVAILABLE, f"{what} did not answer within {limit:g} s{note}")


# -- commands: Better Auth only -------------------------------------------------------------


async def _check_store_usable(target: _Target) -> None:
    """Read the session store once, so an unusable one (no keyring backend, an unreadable
    file) fails the command before it signs anybody in."""
    async with target.auth_client() as auth:
        await target.store(auth.site_url).get()


async def _cmd_signup(target: _Target, args: argparse.Namespace, password: str) -> None:
    name: str = args.name or args.email.partition("@")[0] or args.email
    async with target.auth_client() as auth:
        store = target.store(auth.site_url)
        provider = ConvexBetterAuthProvider(auth, store=store)
        session = await _within(
            target.timeout,
            provider.sign_up(name, args.email, password),
            f"Better Auth at {auth.site_url}",
        )
    _check_saved(store)
    _progress(_signed_in_message(session, store, "signed up and signed in"))


async def _cmd_login(target: _Target, args: argparse.Namespace, password: str) -> None:
    async with target.auth_client() as auth:
        store = target.store(auth.site_url)
        provider = ConvexBetterAuthProvider(auth, store=store)
        session = await _within(
            target.timeout,
            provider.login(args.email, password),
            f"Better Auth at {auth.site_url}",
        )
    _check_saved(store)
    _progress(_signed_in_message(session, store))


async def _cmd_send_magic_link(target: _Target, email: str) -> None:
    async with target.auth_client() as auth:
        await _within(
            target.timeout,
            auth.send_magic_link(email),
            f"Better Auth at {auth.site_url}",
        )
    _progress(f"sent a sign-in link to {email}")


async def _cmd_verify_magic_link(target: _Target, token: str) -> None:
    async with target.auth_client() as auth:
        store = target.store(auth.site_url)
        deadline = f"Better Auth at {auth.site_url}"
        verified = await _within(target.timeout, auth.verify_magic_link(token), deadline)
        # Restoring the new session through the provider is what saves it, exactly as a
        # password login would; it costs one get-session call.
        provider = ConvexBetterAuthProvider(
            auth, initial_session_token=verified.session_token, store=store
        )
        session = await _within(
            target.timeout, _restore(provider.login_from_cache, store), deadline
        )
    _check_saved(store)
    _progress(_signed_in_message(session, store))


async def _cmd_whoami_or_token(target: _Target, args: argparse.Namespace) -> None:
    async with target.auth_client() as auth:
        store = target.store(auth.site_url)
        provider = ConvexBetterAuthProvider(auth, store=store)
        session = await _within(
            target.timeout,
            _restore(provider.login_from_cache, store),
            f"Better Auth at {auth.site_url}",
        )
    if args.command == "token":
        print(session.token, flush=True)
    else:
        _print_json(_user_json(session), pretty=args.pretty)


async def _cmd_logout(target: _Target) -> None:
    async with target.auth_client() as auth:
        store = target.store(auth.site_url)
        stored = await store.get()
        record = _parse_record(stored) if stored is not None else None
        if record is None:
            if stored is not None:
                await store.remove()  # unusable: nothing to revoke, but do not keep it
            _progress(
                f"not signed in to {auth.site_url}; nothing to do"
                if store.other_host is None
                else f"not signed in to {auth.site_url} (the saved session is for "
                f"{store.other_host} and is kept); nothing to do"
            )
            return
        provider = ConvexBetterAuthProvider(
            auth, initial_session_token=record.session_token, store=store
        )
        try:
            # The provider forgets the session here and in the store even when the
            # sign-out request fails, so only the server side can be left behind.
            await _within(
                target.timeout,
                provider.logout(),
                f"Better Auth at {auth.site_url}",
            )
        except _Failure as exc:
            raise _Failure(exc.status, _not_revoked(exc.message)) from None
        except SessionStoreError as exc:
            # Raised only after the server signed the session out.
            raise _Failure(
                EXIT_ERROR, f"signed out, but the saved session could not be removed: {exc}"
            ) from None
        except DartvexError as exc:
            raise _Failure(_status_of(exc), _not_revoked(str(exc))) from None
    _progress(f"signed out{f' {record.email}' if record.email else ''}")


def _not_revoked(reason: str) -> str:
    return f"the session was removed from this machine but not revoked on the server: {reason}"


# -- commands: Convex functions -------------------------------------------------------------


async def _fail_if_first_connect_fails(client: ConvexClient) -> None:
    """Raise a status-5 failure when the client's first connection attempt fails.

    The client itself retries forever, which is right for a long-lived process; a command
    aimed at a wrong or dead URL should say so at once instead. Once a socket has opened,
    later drops are left to the client's reconnects.
    """
    async for status in client.connection_statuses():
        if status.has_ever_connected or status.state in (
            ConnectionState.CLOSED,
            ConnectionState.FATAL,  # pending calls raise the client's own error
        ):
            return
        if status.state is ConnectionState.RECONNECTING:
            raise _Failure(
                EXIT_UNAVAILABLE,
                f"could not connect to the Convex deployment at {client.url} "
                "(is the URL right and the deployment up?)",
            )


class _Convex:
    """What a function command works with: the client, and the sign-in it runs under."""

    def __init__(
        self,
        client: ConvexClient,
        authed: AuthenticatedConvexClient[BetterAuthSession] | None,
    ) -> None:
        self.client = client
        self.authed = authed
        """The signed-in wrapper; None for an --anonymous command."""

    def check_still_signed_in(self) -> None:
        """Raise status 3 when a signed-in command's session ended while it ran."""
        if self.authed is not None and isinstance(self.authed.auth_state, Unauthenticated):
            raise _session_ended()

    async def raise_when_signed_out(self) -> None:
        """Raise status 3 once a signed-in command's session ends; else wait forever."""
        if self.authed is None:
            await anyio.sleep_forever()
            return
        async for state in self.authed.auth_states():
            if isinstance(state, Unauthenticated):
                raise _session_ended()


def _session_ended() -> _Failure:
    return _Failure(
        EXIT_NOT_SIGNED_IN,
        f"the session ended (signed out, expired or revoked); run '{PROG} login' again",
    )


@contextlib.asynccontextmanager
async def _convex(target: _Target, *, anonymous: bool) -> AsyncIterator[_Convex]:
    """A connected ConvexClient, signed in with the saved session unless ``anonymous``."""
    auth = target.auth_client()
    client = target.convex_client(expect_auth=not anonymous)
    async with auth, client, anyio.create_task_group() as tg:
        tg.start_soon(_fail_if_first_connect_fails, client)
        authed = None
        if not anonymous:
            store = target.store(auth.site_url)
            authed = client.with_auth(ConvexBetterAuthProvider(auth, store=store))
            await _within(
                target.timeout,
                _restore(authed.login_from_cache, store),
                f"the sign-in (Better Auth at {auth.site_url}, then Convex at {client.url})",
            )
        yield _Convex(client, authed)
        tg.cancel_scope.cancel()


async def _cmd_call(target: _Target, args: argparse.Namespace, fn_args: dict[str, Any]) -> None:
    kind: str = args.command
    name: str = args.name
    async with _convex(target, anonymous=args.anonymous) as convex:
        client = convex.client
        if kind == "query":
            call = client.query(name, fn_args)
        elif kind == "mutation":
            call = client.mutation(name, fn_args)
        else:
            call = client.action(name, fn_args)
        # A mutation or action that times out was sent, and may still be applied.
        note = "" if kind == "query" else f"; the {kind} may or may not have run"
        try:
            result = await _within(target.timeout, call, f"Convex at {client.url}", note)
        except ConvexError as exc:
            convex.check_still_signed_in()
            raise _function_failed(f"{kind} {name}", exc) from None
    _print_json(result, pretty=args.pretty)


async def _cmd_watch(target: _Target, args: argparse.Namespace, fn_args: dict[str, Any]) -> None:
    async with (
        _convex(target, anonymous=args.anonymous) as convex,
        convex.client.subscribe(args.name, fn_args) as subscription,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_raise_when_stdout_closed)
        # The client goes on anonymously when the session ends; a watch of a query that
        # anonymous callers may run would carry on as if nothing had happened.
        tg.start_soon(convex.raise_when_signed_out)
        try:
            value = await _within(
                target.timeout, subscription.next(), f"Convex at {convex.client.url}"
            )
            while True:
                _print_json(value, pretty=args.pretty)
                value = await subscription.next()
                convex.check_still_signed_in()  # not even one anonymous value
        except ConvexError as exc:
            convex.check_still_signed_in()
            raise _function_failed(f"query {args.name}", exc) from None


async def _raise_when_stdout_closed() -> None:
    """Raise BrokenPipeError once the reader of a piped stdout has gone; for a terminal or
    a file, wait forever.

    A watch only writes when the query changes, so without this ``watch ... | head -1``
    would linger, connected, until the next change, which may be hours away.
    """
    try:
        fd = sys.stdout.fileno()
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (OSError, ValueError):
        is_pipe = False
    if not is_pipe or not hasattr(select, "poll"):
        await anyio.sleep_forever()
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def check() -> None:
        # The write end of a pipe never has anything to read: the selector reports it
        # ready only for an error condition, which poll() then names.
        poller = select.poll()
        poller.register(fd, select.POLLERR | select.POLLHUP)
        loop.remove_reader(fd)  # one look: a readiness we cannot explain must not spin
        if poller.poll(0):
            closed.set()

    try:
        loop.add_reader(fd, check)
    except (OSError, ValueError, NotImplementedError):
        await anyio.sleep_forever()
    try:
        await closed.wait()
    finally:
        loop.remove_reader(fd)
    raise BrokenPipeError("the reader of stdout has gone")


# -- the demo -------------------------------------------------------------------------------


class _Printer:
    """Prints progress lines with the time since the start."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self._start:5.1f}s] {message}", flush=True)


async def run_demo(*, messages: Sequence[str], jwt_ttl_seconds: int) -> None:
    """Start the local stack, sign a user in, and watch a live query as mutations land."""
    # The testing extra is needed only here; import late so the CLI loads without it.
    from .testing import LocalBetterAuth, LocalConvex, register_demo_app
    from .testing._better_auth import ensure_better_auth_server

    say = _Printer()
    await ensure_better_auth_server(
        on_install=lambda: say("first run: installing the Better Auth server's npm packages")
    )
    say("starting the real Better Auth server (Node)")
    async with LocalBetterAuth(jwt_ttl_seconds=jwt_ttl_seconds) as better_auth:
        say(f"Better Auth is up at {better_auth.url}")
        async with LocalConvex(jwks_url=better_auth.jwks_url, issuer=better_auth.issuer) as convex:
            register_demo_app(convex)
            say(f"LocalConvex (sync protocol server) is up at {convex.url}")

            email = f"demo-{secrets.token_hex(4)}@example.com"
            password = secrets.token_urlsafe(16)
            async with (
                BetterAuthClient(better_auth.url) as auth,
                ConvexClient(convex.url, expect_auth=True) as client,
            ):
                # The main job: a provider turns the Better Auth session into Convex JWTs
                # and the client keeps them fresh for as long as the session lives.
                provider = ConvexBetterAuthProvider(auth)
                authed = client.with_auth(provider)
                say(f"signing up {email} (nothing reaches Convex before the first token)")
                session = await authed.sign_up("Demo User", email, password)
                claims = token_claims(session.token) or {}
                lifetime = int(claims.get("exp", 0)) - int(claims.get("iat", 0))
                say(
                    f"signed in as {session.user_id}; Convex confirmed the identity "
                    f"({type(authed.auth_state).__name__}); JWTs live {lifetime} s and are "
                    "refreshed before they expire"
                )
                me = await authed.query("users:whoami")
                say(f"the server verified the token and sees: {me}")

                seen = anyio.Event()
                expected = 0

                async def watch() -> None:
                    nonlocal seen
                    async for rows in authed.subscribe("messages:list"):
                        bodies = [row["body"] for row in rows]
                        say(f"live update: {len(bodies)} message(s) {bodies}")
                        if len(bodies) >= expected:
                            seen.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    with anyio.fail_after(10):
                        await seen.wait()
                    for body in messages:
                        seen = anyio.Event()
                        expected += 1
                        say(f"mutation messages:send {body!r}")
                        await authed.mutation("messages:send", {"body": body})
                        with anyio.fail_after(10):
                            await seen.wait()
                    tg.cancel_scope.cancel()

                say("signing out")
                await authed.logout()
                try:
                    await authed.query("messages:list")
                except SessionExpiredError:
                    say(
                        "signed out: the client refuses messages:list itself "
                        "(with expect_auth nothing is sent anonymously)"
                    )
                after = await auth.get_session(session.session_token)
                say(f"get_session with the old session token after sign-out: {after}")
            say("shutting down the local servers")
    say("done")


# -- the parser -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line, like every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


# The deployment and session options, which go before or after the command: set by
# neither, they take these values (see _fill_target_defaults).
_TARGET_DEFAULTS: Final[dict[str, object]] = {
    "url": None,
    "site_url": None,
    "allow_insecure": False,
    "timeout": _DEFAULT_TIMEOUT,
    "keyring": False,
    "session_file": None,
}


def _build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    verbose_help = "log what the SDK does on stderr (-vv: debug detail; tokens stay redacted)"
    # -v counts both before and after the command (`-v whoami -v` is -vv): two options
    # with their own dest, added up by main(). One dest would not do: a subcommand's
    # parser starts from its own defaults and overwrites what the main parser counted.
    verbosity = _Parser(add_help=False)
    verbosity.add_argument(
        "-v", "--verbose", dest="verbose_after", action="count", default=0, help=verbose_help
    )

    # No defaults here (SUPPRESS): an option given before the command must survive the
    # subcommand's parser, which would otherwise set every default it knows over it.
    target = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    group = target.add_argument_group("deployment and session")
    group.add_argument(
        "--url",
        help="the Convex deployment URL, https://<name>.convex.cloud (default: $DARTVEX_URL)",
    )
    group.add_argument(
        "--site-url",
        help="where Better Auth answers, for self-hosted and local setups "
        "(default: $DARTVEX_SITE_URL, else the deployment's .convex.site host)",
    )
    group.add_argument(
        "--allow-insecure",
        action="store_true",
        help="allow plain http:// to a host that is not loopback (tokens travel in clear)",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="give up waiting for a server after this long; 0 waits forever "
        f"(default: {_DEFAULT_TIMEOUT:g}; `watch` waits this long for its first value)",
    )
    # Not an argparse mutually exclusive group: those are lost when a parent parser's
    # argument group is copied into a subcommand. _Target.from_args checks instead.
    group.add_argument(
        "--keyring",
        action="store_true",
        help="keep the session in the system keyring instead of a file "
        "(needs the keyring extra); use it on every command",
    )
    group.add_argument(
        "--session-file",
        metavar="PATH",
        help="keep the session in this file (default: $DARTVEX_SESSION_FILE, else "
        "$XDG_CONFIG_HOME/dartvex_auth_better/session.json)",
    )

    password = _Parser(add_help=False)
    given = password.add_mutually_exclusive_group()
    given.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    given.add_argument(
        "--password",
        help="the password (visible to other users in the process list: "
        "prefer the prompt or --password-stdin)",
    )

    output = _Parser(add_help=False)
    output.add_argument("--pretty", action="store_true", help="indent the JSON output")

    function = _Parser(add_help=False)
    function.add_argument("name", metavar="NAME", help="the function, such as messages:list")
    function.add_argument(
        "args",
        nargs="?",
        default="{}",
        metavar="ARGS",
        help='its arguments as a JSON object, such as \'{"body": "hi"}\', in Convex JSON '
        '(an int64 is {"$integer": "<base64>"}); "-" reads them from stdin (default: {})',
    )
    function.add_argument(
        "--anonymous",
        action="store_true",
        help="call without signing in (for functions that anyone may call)",
    )

    parser = _Parser(
        prog=PROG,
        description="Sign in to Better Auth and use a live Convex connection as that user.",
        epilog=_EXIT_STATUS_HELP + "\n" + _ENVIRONMENT_HELP,
        formatter_class=formatter,
        parents=[target],
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, *parents: _Parser) -> _Parser:
        return commands.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            parents=[*parents, verbosity],
            epilog=_EXIT_STATUS_HELP,
            formatter_class=formatter,
        )

    signup = command(
        "signup", "create an account with email and password, and sign in", target, password
    )
    signup.add_argument("email")
    signup.add_argument("--name", help="the user's display name (default: the email's local part)")

    login = command(
        "login", "sign in with a password, or with a magic link (--magic-link)", target, password
    )
    login.add_argument("email", nargs="?", help="the account's email (not needed with --token)")
    magic = login.add_argument_group("magic link")
    magic.add_argument(
        "--magic-link",
        action="store_true",
        help="email a sign-in link, then read the link (or its token) from stdin",
    )
    magic.add_argument(
        "--send-only",
        action="store_true",
        help="with --magic-link: send the link and exit; finish later with --token",
    )
    magic.add_argument(
        "--token",
        help="with --magic-link: sign in with this token (or link) from the email, "
        "without sending a new one",
    )

    command("whoami", "print the signed-in user as JSON", target, output)
    command("token", "print a fresh Convex JWT for the session, and nothing else", target)
    command("query", "run a query and print its result as JSON", target, function, output)
    command("mutation", "run a mutation and print its result as JSON", target, function, output)
    command("action", "run an action and print its result as JSON", target, function, output)
    command(
        "watch",
        "print a query's value, then one JSON line per change, until Ctrl-C",
        target,
        function,
        output,
    )
    command("logout", "sign out on the server and forget the saved session", target)

    demo = command("demo", "run the local stack and watch a query update live as messages are sent")
    demo.add_argument(
        "--message",
        dest="messages",
        action="append",
        help="a message to send (repeatable; default: three greetings)",
    )
    demo.add_argument("--jwt-ttl", type=int, default=900, help="Convex JWT lifetime in seconds")
    return parser


def _fill_target_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Give the deployment and session options left unset their defaults; refuse them for
    ``demo``, which runs its own local servers."""
    given = [name for name in _TARGET_DEFAULTS if hasattr(args, name)]
    if args.command == "demo" and given:
        option = "--" + given[0].replace("_", "-")
        parser.error(f"demo runs its own local servers and takes no {option}")
    for name, default in _TARGET_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


# -- running a command ----------------------------------------------------------------------


def _run(args: argparse.Namespace) -> None:
    """Run the parsed command; failures raise."""
    command: str = args.command
    if command == "demo":
        messages = args.messages or ["hello", "from asyncio", "live over Convex"]
        anyio.run(lambda: run_demo(messages=messages, jwt_ttl_seconds=args.jwt_ttl))
        return
    target = _Target.from_args(args)
    if command in ("signup", "login") and target.keyring:
        # Before any password prompt or server call: a machine with no usable keyring
        # must not end up with a server session (or a new account) that nothing holds.
        anyio.run(_check_store_usable, target)
    if command == "signup":
        # Secrets are read before the event loop starts: a prompt blocks, and Ctrl-C at a
        # prompt must be a plain KeyboardInterrupt.
        password = _password(args, confirm=True)
        anyio.run(_cmd_signup, target, args, password)
    elif command == "login":
        _login(target, args)
    elif command in ("whoami", "token"):
        anyio.run(_cmd_whoami_or_token, target, args)
    elif command == "logout":
        anyio.run(_cmd_logout, target)
    elif command in ("query", "mutation", "action"):
        anyio.run(_cmd_call, target, args, _function_args(args.args))
    elif command == "watch":
        anyio.run(_cmd_watch, target, args, _function_args(args.args))
    else:  # pragma: no cover - argparse allows only the commands above
        raise AssertionError(f"no code for the command {command!r}")


def _login(target: _Target, args: argparse.Namespace) -> None:
    if not args.magic_link:
        if args.send_only or args.token is not None:
            raise _usage("--send-only and --token go with --magic-link")
        if args.email is None:
            raise _usage("login needs the account's EMAIL")
        password = _password(args, confirm=False)
        anyio.run(_cmd_login, target, args, password)
        return
    if args.password is not None or args.password_stdin:
        raise _usage("--magic-link signs in without a password")
    if args.token is not None:
        anyio.run(_cmd_verify_magic_link, target, _magic_token(args.token))
        return
    if args.email is None:
        raise _usage("login --magic-link needs the EMAIL to send the link to")
    anyio.run(_cmd_send_magic_link, target, args.email)
    if args.send_only:
        _progress(f"finish with: {PROG} login --magic-link --token <token or link>")
        return
    # Between two event loops on purpose: the wait for the user blocks, and Ctrl-C there
    # must be a plain KeyboardInterrupt.
    token = _magic_token(_read_line("paste the link (or its token) from the email: "))
    anyio.run(_cmd_verify_magic_link, target, token)


def _status_of(exc: DartvexError) -> int:
    """The exit status for an SDK error (see the module docstring)."""
    if isinstance(
        exc,
        NoSessionError
        | SessionExpiredError
        | InvalidCredentialsError
        | InvalidTokenError
        | AuthRejectedError,
    ):
        return EXIT_NOT_SIGNED_IN
    if isinstance(exc, ConvexError):
        return EXIT_FUNCTION_ERROR
    if isinstance(exc, TransportError | ConnectionLostError) or exc.retryable:
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _report(exc: BaseException, verbose: bool) -> int:
    """Tell the user about the exception that ended the command; return the exit status."""
    leaves = _leaves(exc)

    def first(kind: type[BaseException]) -> BaseException | None:
        return next((leaf for leaf in leaves if isinstance(leaf, kind)), None)

    if first(KeyboardInterrupt) is not None:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if first(BrokenPipeError) is not None:
        # Whoever reads stdout has gone. Point stdout at /dev/null so that the flush at
        # exit does not fail a second time (the recipe in Python's signal docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    failure = first(_Failure)
    if isinstance(failure, _Failure):
        print(f"error: {_one_line(failure.message)}", file=sys.stderr)
        if failure.data is not None:
            with contextlib.suppress(BrokenPipeError):
                _print_json(failure.data)
        return failure.status
    error = first(DartvexError)
    if isinstance(error, DartvexError):
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        if isinstance(error, ConvexError) and error.data is not None:
            with contextlib.suppress(BrokenPipeError):
                _print_json(error.data)
        return _status_of(error)
    system_exit = first(SystemExit)
    if isinstance(system_exit, SystemExit):
        code = system_exit.code
        return code if isinstance(code, int) else EXIT_ERROR
    # A bug, not a situation we know: say what it was in one line; -v adds the traceback.
    unexpected = leaves[0]
    if verbose:
        logging.getLogger(__name__).error("unexpected error", exc_info=unexpected)
    detail = _one_line(str(unexpected))
    print(
        f"error: unexpected {type(unexpected).__name__}{f': {detail}' if detail else ''}"
        + ("" if verbose else " (run with -v for the traceback)"),
        file=sys.stderr,
    )
    return EXIT_ERROR


class _LogHandler(logging.StreamHandler[TextIO]):
    """The command line's handler for the SDK's loggers, on stderr."""


class _LogFormatter(logging.Formatter):
    """``warning: message`` by default; level and logger name when verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self._verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self._verbose:
            return f"{record.levelname.lower()} {record.name}: {text}"
        return f"{record.levelname.lower()}: {text}"


def _configure_logging(verbosity: int) -> None:
    """Log on stderr: by default only this module's warnings and the SDK's errors; with -v
    the SDK's info too, with -vv its debug detail."""
    sdk = logging.getLogger("dartvex_auth_better")
    for old in [h for h in sdk.handlers if isinstance(h, _LogHandler)]:
        sdk.removeHandler(old)  # main() called again in one process
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(verbose=verbosity > 0))
    sdk.addHandler(handler)
    sdk.propagate = False
    # The SDK's warnings are about things it recovers from (a reconnect, a rejected token
    # replaced) or that a command reports as its own error (no usable stored session); by
    # default they would be a second line next to the one error line.
    sdk.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity else logging.ERROR)
    logging.getLogger(__name__).setLevel(logging.NOTSET if verbosity else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _fill_target_defaults(parser, args)
    verbosity: int = args.verbose + args.verbose_after
    _configure_logging(verbosity)
    try:
        _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BaseException as exc:
        return _report(exc, verbose=verbosity > 0)
    return EXIT_OK
