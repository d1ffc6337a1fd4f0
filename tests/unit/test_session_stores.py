"""The session stores: memory, file (0600, atomic, tolerant of corrupt content) and keyring."""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from dartvex_auth_better import (
    FileSessionStore,
    KeyringSessionStore,
    MemorySessionStore,
    SessionStore,
    SessionStoreError,
)

pytestmark = pytest.mark.anyio

RECORD = '{"version":1,"session_token":"ses_0123456789abcdefghij","user_id":"u1","email":"a@b.c"}'


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != name)


# -- memory ------------------------------------------------------------------------------


async def test_memory_store_round_trip_and_repr_hides_the_value():
    store = MemorySessionStore()
    assert isinstance(store, SessionStore)
    assert await store.get() is None
    await store.set(RECORD)
    assert await store.get() == RECORD
    assert "ses_" not in repr(store) and "set" in repr(store)
    await store.remove()
    await store.remove()  # nothing to remove is fine
    assert await store.get() is None
    assert await MemorySessionStore("seed").get() == "seed"


# -- file --------------------------------------------------------------------------------


async def test_file_store_round_trip_mode_0600_and_new_parent_0700(tmp_path: Path):
    path = tmp_path / "state" / "session.json"
    store = FileSessionStore(path)
    assert isinstance(store, SessionStore)
    assert store.path == path
    assert await store.get() is None  # neither the file nor its directory exist yet
    old_umask = os.umask(0)  # the modes must not depend on a permissive umask
    try:
        await store.set(RECORD)
    finally:
        os.umask(old_umask)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert await store.get() == RECORD
    assert path.read_text() == RECORD
    assert leftovers(path.parent, path.name) == []  # no temporary file is left behind
    assert "ses_" not in repr(store) and "session.json" in repr(store)

    await store.remove()
    assert not path.exists()
    await store.remove()
    assert await store.get() is None


async def test_file_store_replaces_a_world_readable_file_with_a_0600_one(tmp_path: Path):
    path = tmp_path / "session.json"
    path.write_text("old")
    path.chmod(0o644)
    inode = path.stat().st_ino
    await FileSessionStore(path).set(RECORD)
    assert path.stat().st_ino != inode  # a new file was renamed over the old one
    assert mode_of(path) == 0o600
    assert path.read_text() == RECORD


async def test_file_store_writes_the_temp_file_0600_before_any_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Look at the temporary file at the moment its data is synced: it must already be
    # private and must not yet be at the final path.
    path = tmp_path / "session.json"
    seen: list[tuple[int, bool]] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            seen.append((stat.S_IMODE(info.st_mode), path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    await FileSessionStore(path).set(RECORD)
    assert seen == [(0o600, False)]


async def test_file_store_failed_write_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A crash mid-write: the data reached the temporary file, syncing it fails.
    path = tmp_path / "session.json"
    store = FileSessionStore(path)
    await store.set("old value")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SessionStoreError) as caught:
        await store.set("new value that never lands")
    assert "Input/output error" in str(caught.value) and str(path) in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    monkeypatch.undo()
    assert await store.get() == "old value"
    assert leftovers(tmp_path, path.name) == []


async def test_file_store_path_that_is_a_directory_is_a_typed_error(tmp_path: Path):
    store = FileSessionStore(tmp_path)
    with pytest.raises(SessionStoreError, match="could not read"):
        await store.get()
    with pytest.raises(SessionStoreError, match="could not write"):
        await store.set(RECORD)
    with pytest.raises(SessionStoreError, match="could not delete"):
        await store.remove()


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"\xff\xfe\x00garbage", "not UTF-8"), (b"x" * (64 * 1024 + 1), "larger than")],
)
async def test_file_store_corrupt_file_reads_as_none_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, reason: str
):
    path = tmp_path / "session.json"
    path.write_bytes(content)
    store = FileSessionStore(path)
    with caplog.at_level(logging.WARNING, logger="dartvex_auth_better"):
        assert await store.get() is None
    assert any(reason in r.getMessage() for r in caplog.records)
    await store.set(RECORD)  # a new value replaces the junk
    assert await store.get() == RECORD


async def test_file_store_does_not_block_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Hold the write inside fsync until another task of the loop has run: that task can
    # only run if the write is happening in a worker thread.
    path = tmp_path / "session.json"
    loop_ran = anyio.Event()
    seen_from_thread: list[bool] = []
    real_fsync = os.fsync

    def fsync_waiting_for_the_loop(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            anyio.from_thread.run(loop_ran.wait)
            seen_from_thread.append(loop_ran.is_set())
        real_fsync(fd)

    async def run_on_the_loop() -> None:
        loop_ran.set()

    monkeypatch.setattr(os, "fsync", fsync_waiting_for_the_loop)
    async with anyio.create_task_group() as tg:
        tg.start_soon(FileSessionStore(path).set, RECORD)
        tg.start_soon(run_on_the_loop)
    assert seen_from_thread == [True]
    assert path.read_text() == RECORD


async def test_file_store_rejects_non_text(tmp_path: Path):
    with pytest.raises(TypeError):
        await FileSessionStore(tmp_path / "s").set(b"bytes")  # type: ignore[arg-type]


# -- keyring -----------------------------------------------------------------------------


def test_keyring_store_without_the_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
):
    for name in [m for m in sys.modules if m == "keyring" or m.startswith("keyring.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "keyring", None)  # makes `import keyring` fail
    with pytest.raises(SessionStoreError) as caught:
        KeyringSessionStore(username="bot")
    assert "pip install 'dartvex-auth-better[keyring]'" in str(caught.value)
    assert isinstance(caught.value.__cause__, ImportError)


def test_keyring_store_validates_its_names():
    pytest.importorskip("keyring")
    with pytest.raises(ValueError, match="username"):
        KeyringSessionStore(username="")
    with pytest.raises(ValueError, match="service"):
        KeyringSessionStore(username="bot", service="")


@pytest.mark.parametrize("backend_module", ["keyring.backends.fail", "keyring.backends.null"])
async def test_keyring_store_without_a_backend_is_a_clear_error(backend_module: str):
    backend: Any = pytest.importorskip(backend_module).Keyring()
    store = KeyringSessionStore(username="bot", backend=backend)
    for call in (store.get(), store.set(RECORD), store.remove()):
        with pytest.raises(SessionStoreError, match="no usable keyring backend") as caught:
            await call
        assert backend_module in str(caught.value)


async def test_keyring_store_with_keyrings_default_backend_when_it_is_fail():
    # The machine-level case: keyring itself found no backend and fell back to `fail`.
    keyring: Any = pytest.importorskip("keyring")
    fail: Any = pytest.importorskip("keyring.backends.fail")
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        with pytest.raises(SessionStoreError, match="no usable keyring backend"):
            await KeyringSessionStore(username="bot").get()
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def file_keyring(tmp_path: Path) -> Any:
    """A real keyring backend that keeps its secrets in a file under tmp_path."""
    file_backends: Any = pytest.importorskip("keyrings.alt.file")
    backend = file_backends.PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring.cfg")
    return backend


async def test_keyring_store_round_trip_on_a_real_backend(file_keyring: Any):
    store = KeyringSessionStore(username="bot", backend=file_keyring)
    assert isinstance(store, SessionStore)
    assert await store.get() is None
    await store.set(RECORD)
    assert await store.get() == RECORD
    assert file_keyring.get_password("dartvex_auth_better", "bot") == RECORD
    other = KeyringSessionStore(username="bot", service="another-app", backend=file_keyring)
    assert await other.get() is None  # service names keep apps apart
    assert "ses_" not in repr(store) and "'bot'" in repr(store)
    await store.remove()
    await store.remove()  # removing nothing is fine (the backend raises PasswordDeleteError)
    assert await store.get() is None


async def test_keyring_backend_failure_is_typed_and_does_not_quote_the_value():
    pytest.importorskip("keyring")

    class BrokenBackend:
        def get_password(self, service: str, username: str) -> str | None:
            raise RuntimeError("D-Bus is gone")

        def set_password(self, service: str, username: str, password: str) -> None:
            raise RuntimeError(f"cannot store {password}")

        def delete_password(self, service: str, username: str) -> None:
            raise RuntimeError("D-Bus is gone")

    store = KeyringSessionStore(username="bot", backend=BrokenBackend())
    with pytest.raises(SessionStoreError, match="could not read") as caught:
        await store.get()
    assert "RuntimeError" in str(caught.value)
    with pytest.raises(SessionStoreError, match="could not write") as caught:
        await store.set(RECORD)
    assert "ses_" not in str(caught.value)
    with pytest.raises(SessionStoreError, match="could not delete"):
        await store.remove()
