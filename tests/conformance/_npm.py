"""Install the official npm ``convex`` client for the conformance tests, once per lockfile.

The same pattern as ``ensure_better_auth_server``: ``npm ci --ignore-scripts`` of
``npm_client/package.json`` + ``package-lock.json`` into
``<cache root>/conformance-npm-<hash>``, where the hash covers both files and the cache
root is ``$DARTVEX_AUTH_BETTER_CACHE``, else ``$XDG_CACHE_HOME/dartvex_auth_better``, else
``~/.cache/dartvex_auth_better``. The install runs in a temporary sibling directory that
is renamed into place under an exclusive file lock, so concurrent runs never see half a
tree. The driver (``npm_client/driver.mjs``) stays in the repository and loads the
package from the cache directory, so editing it never triggers a reinstall.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

import anyio

__all__ = ["NPM_CLIENT_DIR", "NodeUnavailable", "ensure_npm_client", "find_node_and_npm"]

NPM_CLIENT_DIR: Final = Path(__file__).resolve().parent / "npm_client"
_LOCKED_FILES: Final = ("package.json", "package-lock.json")
_MARKER: Final = ".installed"
_MIN_NODE_MAJOR: Final = 20
_NPM_CI_TIMEOUT: Final = 600.0
_LOCK_TIMEOUT: Final = 900.0


class NodeUnavailable(Exception):
    """Node.js 20+ or npm is not installed: the conformance tests skip."""


def _cache_root() -> Path:
    explicit = os.environ.get("DARTVEX_AUTH_BETTER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dartvex_auth_better"


def find_node_and_npm() -> tuple[str, str]:
    """Paths of ``node`` (20 or newer) and ``npm``; raises :class:`NodeUnavailable`.

    Synchronous (a ``node --version`` subprocess), so it can run at collection time."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        raise NodeUnavailable(f"{missing} not found on PATH (Node.js 20+ with npm is needed)")
    try:
        result = subprocess.run(
            [node, "--version"], capture_output=True, timeout=30, check=False, text=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeUnavailable(f"`node --version` failed: {exc}") from exc
    version = result.stdout.strip()
    match = re.match(r"^v?(\d+)\.", version)
    if result.returncode != 0 or match is None or int(match.group(1)) < _MIN_NODE_MAJOR:
        raise NodeUnavailable(f"Node.js {_MIN_NODE_MAJOR}+ is needed, found {version!r}")
    return node, npm


def _digest() -> str:
    digest = hashlib.sha256()
    for name in _LOCKED_FILES:
        data = (NPM_CLIENT_DIR / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def _installed(target: Path) -> bool:
    return (target / _MARKER).is_file() and (target / "node_modules" / "convex").is_dir()


async def _lock(path: Path) -> int:
    # Poll with LOCK_NB rather than block in a thread: a cancelled waiter never takes the
    # lock later and keeps it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with anyio.fail_after(_LOCK_TIMEOUT):
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    await anyio.sleep(0.1)
                else:
                    return fd
    except BaseException:
        os.close(fd)
        raise


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _stage(root: Path, name: str) -> Path:
    # Leftovers of an install that crashed (we hold the lock, so none is in progress).
    for stale in root.glob(f".{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    for file in _LOCKED_FILES:
        shutil.copyfile(NPM_CLIENT_DIR / file, staging / file)
    return staging


def _publish(staging: Path, target: Path) -> None:
    (staging / _MARKER).write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)  # a tree without the marker: an interrupted install
    os.rename(staging, target)


async def ensure_npm_client(node: str, npm: str) -> Path:
    """Install (once) and return the directory whose ``node_modules`` holds ``convex``."""
    root = _cache_root()
    target = root / f"conformance-npm-{await anyio.to_thread.run_sync(_digest)}"
    if await anyio.to_thread.run_sync(_installed, target):
        return target
    await anyio.to_thread.run_sync(lambda: root.mkdir(parents=True, exist_ok=True))
    fd = await _lock(root / f"{target.name}.lock")
    try:
        if await anyio.to_thread.run_sync(_installed, target):
            return target  # another process installed it while we waited for the lock
        staging = await anyio.to_thread.run_sync(_stage, root, target.name)
        try:
            await _npm_ci(node, npm, staging)
            await anyio.to_thread.run_sync(_publish, staging, target)
        finally:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
    finally:
        _unlock(fd)
    return target


async def _npm_ci(node: str, npm: str, cwd: Path) -> None:
    env = dict(os.environ)
    # npm is started through `#!/usr/bin/env node`: let it find the node we checked.
    env["PATH"] = os.pathsep.join((str(Path(node).parent), env.get("PATH", "")))
    env.update(
        npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false"
    )
    # --ignore-scripts: esbuild's postinstall is the only install script in the tree, and
    # the browser client never loads esbuild.
    command = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--ignore-scripts"]
    with anyio.fail_after(_NPM_CI_TIMEOUT):
        result = await anyio.run_process(command, cwd=cwd, env=env, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).decode(errors="replace")
        tail = "\n".join(output.strip().splitlines()[-20:])
        raise RuntimeError(
            f"`npm ci` of the conformance npm client failed with status {result.returncode} "
            f"(it needs the npm registry the first time):\n{tail}"
        )
