"""Session storage: choosing a store, restoring after a restart, writing your own store."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio.to_thread

from dartvex_auth_better import (
    BetterAuthClient,
    ConvexBetterAuthProvider,
    FileSessionStore,
    KeyringSessionStore,
    SessionStore,
    SessionStoreError,
)


# --8<-- [start:choose]
def file_store() -> FileSessionStore:
    # One file, mode 0600, replaced atomically on every write.
    return FileSessionStore(Path.home() / ".config" / "my-app" / "session.json")


def keyring_store(account: str) -> KeyringSessionStore:
    # The system keyring (pip install 'dartvex-auth-better[keyring]'); one entry per
    # account, under the service name "my-app".
    return KeyringSessionStore(username=account, service="my-app")
    # --8<-- [end:choose]


# --8<-- [start:restart]
async def sign_in_then_restart(
    convex_url: str, site_url: str | None, store: SessionStore, email: str, password: str
) -> str:
    async with BetterAuthClient(convex_url, site_url=site_url) as auth:
        # The first run signs in with the password; the provider saves the session.
        first_run = ConvexBetterAuthProvider(auth, store=store)
        await first_run.login(email, password)

        # A later run (a new process, a new provider) restores it without the password.
        later_run = ConvexBetterAuthProvider(auth, store=store)
        session = await later_run.login_from_cache()
        return session.user_id
    # --8<-- [end:restart]


# --8<-- [start:token]
async def restore_from_a_secret(convex_url: str, site_url: str | None) -> str:
    # A session token kept in a secret manager and handed over in the environment.
    async with BetterAuthClient(convex_url, site_url=site_url) as auth:
        provider = ConvexBetterAuthProvider(
            auth, initial_session_token=os.environ["MY_APP_SESSION_TOKEN"]
        )
        session = await provider.login_from_cache()
        return session.email
    # --8<-- [end:token]


# --8<-- [start:custom]
class SqliteSessionStore:
    """A SessionStore in a SQLite database: one row per account."""

    def __init__(self, path: str | Path, account: str) -> None:
        self._path = str(path)
        self._account = account

    async def get(self) -> str | None:
        return await anyio.to_thread.run_sync(self._get)

    async def set(self, value: str) -> None:
        await anyio.to_thread.run_sync(self._set, value)

    async def remove(self) -> None:
        await anyio.to_thread.run_sync(self._remove)

    # The blocking parts run in a worker thread, so the event loop never waits on disk.

    def _run(self, sql: str, *params: str) -> list[tuple[str]]:
        try:
            # It holds a bearer credential: create it readable by its owner only.
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
            with closing(sqlite3.connect(self._path)) as db, db:  # `with db` commits
                db.execute(
                    "CREATE TABLE IF NOT EXISTS sessions (account TEXT PRIMARY KEY, value TEXT)"
                )
                return db.execute(sql, params).fetchall()
        except (OSError, sqlite3.Error) as exc:
            # The SDK expects SessionStoreError from a store that cannot do its job.
            raise SessionStoreError(f"session database {self._path}: {exc}") from exc

    def _get(self) -> str | None:
        rows = self._run("SELECT value FROM sessions WHERE account = ?", self._account)
        return rows[0][0] if rows else None

    def _set(self, value: str) -> None:
        self._run("INSERT OR REPLACE INTO sessions VALUES (?, ?)", self._account, value)

    def _remove(self) -> None:
        self._run("DELETE FROM sessions WHERE account = ?", self._account)

    # --8<-- [end:custom]
