"""Run the real Better Auth server (with the Convex plugin) locally, for tests and demos.

:class:`LocalBetterAuth` starts ``server.mjs`` from the bundled ``better_auth_server``
directory under Node.js on a free port of 127.0.0.1 and stops it again. The server is the
real npm ``better-auth`` package with the ``convex`` plugin of ``@convex-dev/better-auth``
on an in-memory database, so its ``/api/auth/*`` endpoints answer as a Convex
deployment's do, including ``/api/auth/convex/token`` (RS256 JWTs) and
``/api/auth/convex/jwks``.

The Node dependencies are installed once per version of the bundled files into a per-user
cache (see :func:`ensure_better_auth_server`); that first install needs the npm registry.

Example::

    async with LocalBetterAuth(jwt_ttl_seconds=60) as ba:
        ...  # point a BetterAuthClient at ba.url
        message = await ba.wait_for_message("bob@example.com", "reset-password")
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import tempfile
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import aiohttp
import anyio
import anyio.abc
from anyio.streams.text import TextReceiveStream

from dartvex_auth_better._errors import DartvexError

__all__ = ["LocalBetterAuth", "LocalStackError", "ensure_better_auth_server"]

logger = logging.getLogger("dartvex_auth_better.testing.better_auth")

_SERVER_SOURCE_DIR: Final = Path(__file__).resolve().parent / "better_auth_server"
"""The bundled server: ``package.json``, ``package-lock.json`` and ``server.mjs``."""

_SERVER_FILES: Final = ("package.json", "package-lock.json", "server.mjs")
_MIN_NODE_MAJOR: Final = 20
_NODE_REQUIRED: Final = (
    "Node.js 20 or newer with npm is required to run the local Better Auth server; "
    "install it from your package manager or nodejs.org"
)
_COMPLETE_MARKER: Final = ".installed"
_NPM_CI_TIMEOUT: Final = 900.0
_INSTALL_LOCK_TIMEOUT: Final = 1200.0
_VERSION_TIMEOUT: Final = 30.0
_STOP_GRACE_SECONDS: Final = 5.0
_OUTPUT_TAIL_LINES: Final = 50
_POLL_INTERVAL: Final = 0.05
_HTTP_TIMEOUT: Final = 30.0
_LISTENING_RE: Final = re.compile(r"^listening on (http://127\.0\.0\.1:(\d+))\b")
_NODE_VERSION_RE: Final = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


class LocalStackError(DartvexError):
    """A local test server could not be installed, started or used.

    Raised when Node.js or npm is missing or too old, when ``npm ci`` fails, when the
    server exits or does not become ready in time, and when a helper is used before
    :meth:`LocalBetterAuth.start`.
    """


# --------------------------------------------------------------------------- install


def _default_cache_root() -> Path:
    explicit = os.environ.get("DARTVEX_AUTH_BETTER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dartvex_auth_better"


def _read_server_files() -> dict[str, bytes]:
    return {name: (_SERVER_SOURCE_DIR / name).read_bytes() for name in _SERVER_FILES}


def _files_digest(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in _SERVER_FILES:
        # Length-prefix each part so moving bytes from one file to the next changes the hash.
        data = files[name]
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def _is_installed(target: Path) -> bool:
    return (target / _COMPLETE_MARKER).is_file() and (target / "node_modules").is_dir()


def _search_path(env: Mapping[str, str] | None) -> str | None:
    source = env if env is not None and "PATH" in env else os.environ
    return source.get("PATH")


def _resolve_executable(name: str, env: Mapping[str, str] | None) -> str:
    found = shutil.which(name, path=_search_path(env))
    if found is None:
        where = "" if os.sep in name else " on PATH"
        raise LocalStackError(f"{_NODE_REQUIRED} (`{name}` was not found{where})")
    return found


def _tail(text: str, lines: int = 20) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(f"  {line}" for line in kept) if kept else "  (no output)"


async def _check_node(node_executable: str, env: Mapping[str, str] | None) -> str:
    """Return the path of a Node.js 20+ binary, or raise :class:`LocalStackError`."""
    node = _resolve_executable(node_executable, env)
    try:
        with anyio.fail_after(_VERSION_TIMEOUT):
            result = await anyio.run_process([node, "--version"], check=False)
    except (OSError, TimeoutError) as exc:
        raise LocalStackError(
            f"{_NODE_REQUIRED} (running `{node} --version` failed: {exc})"
        ) from exc
    output = result.stdout.decode(errors="replace").strip()
    match = _NODE_VERSION_RE.match(output)
    if result.returncode != 0 or match is None:
        raise LocalStackError(
            f"{_NODE_REQUIRED} (`{node} --version` printed {output!r}, "
            f"exit status {result.returncode})"
        )
    if int(match.group(1)) < _MIN_NODE_MAJOR:
        raise LocalStackError(f"{_NODE_REQUIRED} (found Node.js {output} at {node})")
    return node


def _npm_env(env: Mapping[str, str] | None, node: str | None) -> dict[str, str]:
    merged = dict(os.environ)
    if env is not None:
        merged.update(env)
    if node is not None:
        # npm is a Node script started through `#!/usr/bin/env node`: make sure it finds the
        # same node we checked, even when that one was given by path and is not on PATH.
        merged["PATH"] = os.pathsep.join(
            p for p in (str(Path(node).parent), merged.get("PATH", "")) if p
        )
    merged.update(
        {
            "npm_config_update_notifier": "false",
            "npm_config_fund": "false",
            "npm_config_audit": "false",
        }
    )
    return merged


async def _acquire_lock(lock_path: Path) -> int:
    """Take an exclusive ``flock`` on *lock_path*; return the descriptor that holds it.

    Polls with ``LOCK_NB`` instead of blocking in a worker thread, so a cancelled waiter
    never acquires the lock later and keeps it.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with anyio.fail_after(_INSTALL_LOCK_TIMEOUT):
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    await anyio.sleep(0.1)
                else:
                    return fd
    except TimeoutError as exc:
        os.close(fd)
        raise LocalStackError(
            f"timed out after {_INSTALL_LOCK_TIMEOUT:.0f} s waiting for another process "
            f"to finish installing the local Better Auth server (lock {lock_path})"
        ) from exc
    except BaseException:
        os.close(fd)
        raise


def _release_lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _prepare_staging(root: Path, digest: str, files: Mapping[str, bytes]) -> Path:
    # Leftovers of an install that crashed (we hold the lock, so none is in progress).
    for stale in root.glob(f".server-{digest}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".server-{digest}-", dir=root))
    for name, data in files.items():
        (staging / name).write_bytes(data)
    return staging


def _publish(staging: Path, target: Path) -> None:
    (staging / _COMPLETE_MARKER).write_text("ok\n")
    if target.exists():
        # A tree without the marker: an interrupted copy from an older version of this code
        # or a hand edit. Replace it whole.
        shutil.rmtree(target)
    os.rename(staging, target)


async def ensure_better_auth_server(
    cache_dir: Path | None = None,
    *,
    npm_executable: str = "npm",
    node_executable: str | None = None,
    env: Mapping[str, str] | None = None,
    on_install: Callable[[], None] | None = None,
) -> Path:
    """Install the bundled Better Auth server's Node dependencies once; return its directory.

    The directory is ``<cache root>/server-<hash>``, where the hash covers the contents of
    ``package.json``, ``package-lock.json`` and ``server.mjs``. The cache root is
    *cache_dir*, else ``$DARTVEX_AUTH_BETTER_CACHE``, else
    ``$XDG_CACHE_HOME/dartvex_auth_better`` or ``~/.cache/dartvex_auth_better``.

    When the directory is already complete this returns at once without running npm.
    Otherwise it runs ``npm ci`` in a temporary sibling directory and renames that into
    place, under an exclusive file lock, so concurrent processes never install at the same
    time or see a half-installed tree. *npm_executable* names or points at npm;
    *node_executable*, when given, is put first on npm's PATH. *env* overrides variables of
    the environment npm runs in (``PATH`` too, also for finding npm). *on_install* is
    called just before an actual install starts (to tell a person why this takes a while).

    Raises :class:`LocalStackError` when npm is missing or ``npm ci`` fails.
    """
    root = (cache_dir if cache_dir is not None else _default_cache_root()).expanduser()
    files = await anyio.to_thread.run_sync(_read_server_files)
    digest = _files_digest(files)
    target = root / f"server-{digest}"
    if await anyio.to_thread.run_sync(_is_installed, target):
        return target

    await anyio.to_thread.run_sync(lambda: root.mkdir(parents=True, exist_ok=True))
    lock_fd = await _acquire_lock(root / f"server-{digest}.lock")
    try:
        if await anyio.to_thread.run_sync(_is_installed, target):
            return target  # another process finished while we waited for the lock
        npm = _resolve_executable(npm_executable, env)
        if on_install is not None:
            on_install()
        staging = await anyio.to_thread.run_sync(_prepare_staging, root, digest, files)
        try:
            await _npm_ci(npm, staging, _npm_env(env, node_executable))
            await anyio.to_thread.run_sync(_publish, staging, target)
        finally:
            if staging.exists():
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
    finally:
        _release_lock(lock_fd)
    logger.info("installed the local Better Auth server into %s", target)
    return target


async def _npm_ci(npm: str, cwd: Path, env: Mapping[str, str]) -> None:
    # --ignore-scripts: the only install script in the tree is esbuild's postinstall, pulled
    # in by the `convex` peer dependency that the server never loads. Skipping it means no
    # package code runs at install time and nothing is fetched beyond registry tarballs.
    command = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--ignore-scripts"]
    logger.info("running %s in %s", " ".join(command[1:]), cwd)
    try:
        with anyio.fail_after(_NPM_CI_TIMEOUT):
            result = await anyio.run_process(command, cwd=cwd, env=env, check=False)
    except TimeoutError as exc:
        raise LocalStackError(
            f"`npm ci` did not finish within {_NPM_CI_TIMEOUT:.0f} s while installing the "
            f"local Better Auth server into {cwd}"
        ) from exc
    except OSError as exc:
        raise LocalStackError(f"{_NODE_REQUIRED} (running `{npm}` failed: {exc})") from exc
    if result.returncode != 0:
        output = result.stderr.decode(errors="replace") or result.stdout.decode(errors="replace")
        raise LocalStackError(
            f"`npm ci` failed with exit status {result.returncode} while installing the "
            f"local Better Auth server (it needs the npm registry the first time); "
            f"last lines of its output:\n{_tail(output)}"
        )


# --------------------------------------------------------------------------- process


class _ChildGuard:
    """What the interpreter-exit fallback needs to kill a child; holds no ref to its owner."""

    __slots__ = ("process",)

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process: anyio.abc.Process | None = process

    def kill_if_running(self) -> None:
        process, self.process = self.process, None
        # returncode stays None until the child has been reaped, so its pid cannot have
        # been reused yet.
        if process is not None and process.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGKILL)


class LocalBetterAuth:
    """The real Better Auth server with the Convex plugin, run locally under Node.js.

    Use it as ``async with LocalBetterAuth() as ba:`` (or call :meth:`start` and
    :meth:`aclose`, both idempotent, from the same task). The constructor does no I/O.
    Starting installs the Node dependencies on first use (see
    :func:`ensure_better_auth_server`), runs ``node server.mjs`` on a free port of
    127.0.0.1 and waits until it is ready; closing stops it (SIGTERM, then SIGKILL after
    5 s). The server keeps all data in memory.

    Options map to the server's environment: *jwt_ttl_seconds* is the lifetime of the
    Convex JWTs, *session_ttl_seconds* and *session_update_age_seconds* the Better Auth
    session lifetime and sliding-refresh age, *trusted_origins* extra CORS/redirect
    origins, *rate_limit_max* / *rate_limit_window_seconds* switch on Better Auth's rate
    limiter, and *extra_env* sets any other variable for the Node process (its ``PATH``
    is also used to find ``node`` and ``npm``). *cache_dir* overrides the install cache
    root; *node_executable* and *npm_executable* name or point at the binaries.
    """

    def __init__(
        self,
        *,
        jwt_ttl_seconds: int = 900,
        session_ttl_seconds: int | None = None,
        session_update_age_seconds: int | None = None,
        trusted_origins: Sequence[str] = (),
        rate_limit_max: int | None = None,
        rate_limit_window_seconds: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        cache_dir: Path | None = None,
        node_executable: str = "node",
        npm_executable: str = "npm",
    ) -> None:
        if isinstance(trusted_origins, str):
            raise TypeError("trusted_origins must be a sequence of origins, not one string")
        self._jwt_ttl_seconds = jwt_ttl_seconds
        self._session_ttl_seconds = session_ttl_seconds
        self._session_update_age_seconds = session_update_age_seconds
        self._trusted_origins = tuple(trusted_origins)
        self._rate_limit_max = rate_limit_max
        self._rate_limit_window_seconds = rate_limit_window_seconds
        self._extra_env = dict(extra_env or {})
        self._startup_timeout = startup_timeout
        self._cache_dir = cache_dir
        self._node_executable = node_executable
        self._npm_executable = npm_executable

        self._url: str | None = None
        self._port: int | None = None
        self._process: anyio.abc.Process | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._http: aiohttp.ClientSession | None = None
        self._finalizer: weakref.finalize[[], LocalBetterAuth] | None = None
        self._output: deque[str] = deque(maxlen=_OUTPUT_TAIL_LINES)
        # Both are replaced in _launch(); anyio events belong to one event loop.
        self._ready = anyio.Event()
        self._startup_over = anyio.Event()
        self._started = False
        self._closed = False
        self._start_lock = anyio.Lock()

    # ----------------------------------------------------------------- properties

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:41234`` (no slash)."""
        if self._url is None:
            raise self._not_started()
        return self._url

    @property
    def issuer(self) -> str:
        """The ``iss`` of the Convex JWTs it signs: the same as :attr:`url`."""
        return self.url

    @property
    def jwks_url(self) -> str:
        """Where the server publishes the JWTs' public keys."""
        return f"{self.url}/api/auth/convex/jwks"

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 the server listens on."""
        if self._port is None:
            raise self._not_started()
        return self._port

    @property
    def jwt_ttl_seconds(self) -> int:
        """Lifetime of the Convex JWTs it issues (``exp - iat``)."""
        return self._jwt_ttl_seconds

    @property
    def pid(self) -> int | None:
        """Process id of the Node server while it runs, else None."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def recent_output(self) -> list[str]:
        """The server's last lines of stdout and stderr (for diagnosing test failures)."""
        return list(self._output)

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> LocalBetterAuth:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Install if needed, start the server and wait until it is ready.

        Raises :class:`LocalStackError` when Node.js/npm are missing, the install fails,
        or the server exits or is not ready within *startup_timeout* seconds.
        """
        async with self._start_lock:
            if self._closed:
                raise LocalStackError("this LocalBetterAuth was closed; create a new one")
            if self._started:
                return
            lookup_env = self._extra_env if "PATH" in self._extra_env else None
            node = await _check_node(self._node_executable, lookup_env)
            server_dir = await ensure_better_auth_server(
                self._cache_dir,
                npm_executable=self._npm_executable,
                node_executable=node,
                env=lookup_env,
            )
            await self._launch(node, server_dir)
            self._started = True

    async def _launch(self, node: str, server_dir: Path) -> None:
        started_at = anyio.current_time()
        self._ready = anyio.Event()
        self._startup_over = anyio.Event()
        try:
            process = await anyio.open_process(
                [node, "server.mjs"], cwd=server_dir, env=self._server_env()
            )
        except OSError as exc:
            raise LocalStackError(f"could not start `{node} server.mjs`: {exc}") from exc
        self._process = process
        # Fallback for when aclose() never runs: weakref.finalize fires when this object is
        # collected and, for objects still alive, at interpreter exit.
        self._finalizer = weakref.finalize(self, _ChildGuard(process).kill_if_running)

        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            assert process.stdout is not None and process.stderr is not None
            task_group.start_soon(_drain, process.stdout, self._on_stdout_line)
            task_group.start_soon(_drain, process.stderr, self._on_stderr_line)
            with anyio.move_on_after(self._startup_timeout):
                # `ready` comes on stdout; if the server dies first, stdout hits EOF.
                await self._startup_over.wait()
            if not self._ready.is_set():
                await self._raise_startup_failure(process)
            assert self._url is not None
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT))
        except BaseException:
            await self._shutdown()
            raise
        logger.info(
            "local Better Auth server ready at %s in %.0f ms (pid %d)",
            self._url,
            (anyio.current_time() - started_at) * 1000,
            process.pid,
        )

    async def _raise_startup_failure(self, process: anyio.abc.Process) -> None:
        if self._startup_over.is_set():
            # It exited: collect the status and let the stderr drain catch up briefly.
            with anyio.move_on_after(2.0):
                await process.wait()
            reason = f"exited with status {process.returncode} before it was ready"
        else:
            reason = f"was not ready within {self._startup_timeout:g} s"
        output = "\n".join(f"  {line}" for line in self._output) or "  (no output)"
        raise LocalStackError(f"the local Better Auth server {reason}; its last output:\n{output}")

    def _server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PORT": "0",
                "JWT_TTL_SECONDS": str(self._jwt_ttl_seconds),
                "BETTER_AUTH_TELEMETRY": "0",
                # The server exits when our end of its stdin closes: no orphan even when
                # this interpreter is killed without running any cleanup.
                "BA_EXIT_ON_STDIN_EOF": "1",
            }
        )
        optional = {
            "SESSION_TTL_SECONDS": self._session_ttl_seconds,
            "SESSION_UPDATE_AGE_SECONDS": self._session_update_age_seconds,
            "RATE_LIMIT_MAX": self._rate_limit_max,
            "RATE_LIMIT_WINDOW_SECONDS": self._rate_limit_window_seconds,
        }
        for name, value in optional.items():
            if value is not None:
                env[name] = str(value)
            else:
                env.pop(name, None)  # never inherit these from the caller's environment
        if self._trusted_origins:
            env["TRUSTED_ORIGINS"] = ",".join(self._trusted_origins)
        else:
            env.pop("TRUSTED_ORIGINS", None)
        env.update(self._extra_env)
        return env

    def _on_stdout_line(self, line: str | None) -> None:
        if line is None:  # EOF: the server is exiting
            self._startup_over.set()
            return
        self._remember("stdout", line)
        match = _LISTENING_RE.match(line)
        if match:
            self._url = match.group(1)
            self._port = int(match.group(2))
        elif line.strip() == "ready" and self._url is not None:
            self._ready.set()
            self._startup_over.set()

    def _on_stderr_line(self, line: str | None) -> None:
        if line is not None:
            self._remember("stderr", line)

    def _remember(self, source: str, line: str) -> None:
        # The server never prints secrets, so its lines may be kept and logged as they are.
        self._output.append(f"[{source}] {line}")
        logger.debug("better-auth %s: %s", source, line)

    async def aclose(self) -> None:
        """Stop the server and release everything; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._process is not None or self._task_group is not None:
            await self._shutdown()

    async def _shutdown(self) -> None:
        process, task_group, http = self._process, self._task_group, self._http
        self._http = None
        self._task_group = None
        try:
            with anyio.CancelScope(shield=True):
                if process is not None:
                    await _stop_process(process)
                if http is not None:
                    await http.close()
        finally:
            if task_group is not None:
                task_group.cancel_scope.cancel()
                try:
                    await task_group.__aexit__(None, None, None)
                finally:
                    if process is not None:
                        with anyio.CancelScope(shield=True):
                            await process.aclose()  # closes the pipes
            if self._finalizer is not None:
                self._finalizer.detach()
            self._url = None
            self._port = None

    # ----------------------------------------------------------------- helpers

    async def health(self) -> bool:
        """True when the server runs and answers ``GET /test/health`` with ``{"ok": true}``."""
        if self._http is None:
            return False
        try:
            status, body = await self._request("GET", "/test/health")
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200 and isinstance(body, dict) and body.get("ok") is True

    async def outbox(
        self, email: str | None = None, type: str | None = None
    ) -> list[dict[str, Any]]:
        """Messages the server has "sent", oldest first, optionally filtered.

        Each is ``{"type", "email", "token", "url", "createdAt"}``; *type* is
        ``"reset-password"`` or ``"magic-link"``. *email* matches ignoring case.
        """
        params = {k: v for k, v in (("email", email), ("type", type)) if v}
        status, body = await self._request("GET", "/test/outbox", params=params)
        self._expect(status == 200 and isinstance(body, dict), "GET /test/outbox", status)
        messages = body["messages"]
        if not isinstance(messages, list):
            raise LocalStackError("GET /test/outbox returned no message list")
        return messages

    async def wait_for_message(
        self,
        email: str,
        type: str,
        timeout: float = 10.0,  # noqa: ASYNC109  (a polling deadline, part of the API)
    ) -> dict[str, Any]:
        """Wait until the outbox has a *type* message for *email*; return the newest.

        Polls every 50 ms. Raises ``TimeoutError`` when none arrives within *timeout*
        seconds. Call :meth:`clear_outbox` first when an older message must not count.
        """
        with anyio.move_on_after(timeout):
            while True:
                messages = await self.outbox(email=email, type=type)
                if messages:
                    return messages[-1]
                await anyio.sleep(_POLL_INTERVAL)
        raise TimeoutError(
            f"no {type!r} message for {email!r} arrived in the local Better Auth outbox "
            f"within {timeout:g} s"
        )

    async def clear_outbox(self) -> None:
        """Forget every message in the outbox."""
        status, _ = await self._request("DELETE", "/test/outbox")
        self._expect(status == 200, "DELETE /test/outbox", status)

    async def issued_session_tokens(self) -> list[str]:
        """Every session token this server has issued, oldest first (a reset keeps them).

        For leak checks: a test suite can search its logs and output for each of them.
        """
        path = "/test/issued-session-tokens"
        status, body = await self._request("GET", path)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        self._expect(status == 200 and isinstance(tokens, list), f"GET {path}", status)
        assert isinstance(tokens, list)
        return [token for token in tokens if isinstance(token, str)]

    async def reset(self, jwks: bool = False) -> None:
        """Delete all users, sessions, accounts, verifications and outbox messages.

        With *jwks* the signing keys go too, so the next token is signed by a new key.
        """
        params = {"jwks": "1"} if jwks else {}
        status, _ = await self._request("POST", "/test/reset", params=params)
        self._expect(status == 200, "POST /test/reset", status)

    async def _request(
        self, method: str, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        http = self._http
        if http is None:
            raise self._not_started()
        async with http.request(method, f"{self.url}{path}", params=params) as response:
            body: Any = None
            if response.content_type == "application/json":
                body = await response.json()
            else:
                await response.read()
            return response.status, body

    @staticmethod
    def _expect(ok: bool, what: str, status: int) -> None:
        if not ok:
            raise LocalStackError(f"{what} on the local Better Auth server answered {status}")

    @staticmethod
    def _not_started() -> LocalStackError:
        return LocalStackError(
            "the local Better Auth server is not running; use "
            "`async with LocalBetterAuth() as ba:` or `await ba.start()` first"
        )

    def __repr__(self) -> str:
        state = self._url if self._url is not None else ("closed" if self._closed else "idle")
        return f"<LocalBetterAuth {state}>"


async def _drain(
    stream: anyio.abc.ByteReceiveStream,
    on_line: Callable[[str | None], None],
) -> None:
    """Read *stream* to the end, calling *on_line* per line and with None at EOF.

    Never raises (apart from cancellation): it runs in the task group that spans the
    user's ``async with`` body, where an error would cancel that body.
    """
    text = TextReceiveStream(stream, errors="replace")
    buffer = ""
    try:
        while True:
            try:
                chunk = await text.receive()
            except (
                anyio.EndOfStream,
                anyio.ClosedResourceError,
                anyio.BrokenResourceError,
                OSError,
            ):
                break
            buffer += chunk
            *complete, buffer = buffer.split("\n")
            for line in complete:
                on_line(line.rstrip("\r"))
        if buffer:
            on_line(buffer)
    finally:
        on_line(None)


async def _stop_process(process: anyio.abc.Process) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within the grace period."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    with anyio.move_on_after(_STOP_GRACE_SECONDS):
        await process.wait()
        return
    logger.warning("local Better Auth server ignored SIGTERM; killing it")
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
