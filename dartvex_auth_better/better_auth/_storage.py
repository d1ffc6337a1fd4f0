"""Where a provider persists its session between runs: the SessionStore protocol and three
stores (memory, file, keyring).

A store holds one opaque string and nothing else; what goes into that string (a small
versioned JSON record with the Better Auth session token) is the provider's business.
Every method is a coroutine, and the file and keyring stores do their blocking work in a
worker thread so the event loop never waits on a disk or on D-Bus.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Protocol, runtime_checkable

import anyio.to_thread

from .._errors import SessionStoreError
from .._logging import auth_logger

__all__ = [
    "DEFAULT_KEYRING_SERVICE",
    "FileSessionStore",
    "KeyringSessionStore",
    "MemorySessionStore",
    "SessionStore",
]

log = auth_logger.getChild("store")

DEFAULT_KEYRING_SERVICE: Final = "dartvex_auth_better"
"""The keyring service name KeyringSessionStore uses unless told otherwise."""

# A session record is a few hundred bytes. Anything far larger at the path is not ours,
# and reading it whole into memory would be the only effect.
_MAX_FILE_BYTES: Final = 64 * 1024

_KEYRING_MISSING: Final = (
    "KeyringSessionStore needs the optional keyring package: "
    "pip install 'dartvex-auth-better[keyring]'"
)
_NO_KEYRING_BACKEND: Final = (
    "no usable keyring backend on this machine (keyring chose {backend}); install and "
    "unlock a system keyring (Secret Service, macOS Keychain, Windows Credential Manager), "
    "configure another keyring backend, or use FileSessionStore"
)


@runtime_checkable
class SessionStore(Protocol):
    """Async storage for one persisted session: a single string, or nothing.

    ``get`` returns what ``set`` last stored, or None when nothing is stored; ``remove``
    forgets it and succeeds when there is nothing to forget. Implementations raise
    SessionStoreError when the storage itself fails, and should not block the event loop.
    """

    async def get(self) -> str | None:
        """The stored value, or None when there is none."""
        ...

    async def set(self, value: str) -> None:
        """Store ``value``, replacing what was there."""
        ...

    async def remove(self) -> None:
        """Forget the stored value; a no-op when there is none."""
        ...


class MemorySessionStore:
    """A SessionStore that lives only as long as the object: nothing survives a restart.

    The default store of ConvexBetterAuthProvider. ``initial`` is the value it starts with.
    """

    def __init__(self, initial: str | None = None) -> None:
        self._value = initial

    async def get(self) -> str | None:
        return self._value

    async def set(self, value: str) -> None:
        self._value = value

    async def remove(self) -> None:
        self._value = None

    def __repr__(self) -> str:
        # Never the value: it carries a session token.
        return f"<MemorySessionStore {'set' if self._value is not None else 'empty'}>"


class FileSessionStore:
    """A SessionStore in one file, readable only by its owner.

    ``path`` is the file. Writes are atomic: the value goes to a temporary file in the
    same directory, created with mode 0600 (never readable by others, not even for a
    moment), flushed to disk with ``fsync`` and then renamed over ``path``, so a crash
    leaves either the old content or the new one, never a mix. A missing parent directory
    is created with mode 0700. Reads and writes run in a worker thread.

    A file that holds no text (not UTF-8, or implausibly large) reads as None and logs a
    warning: a restore then finds no session instead of crashing, and the next ``set``
    replaces the file. I/O errors (permissions, a directory in the way) raise
    SessionStoreError. The constructor does no I/O.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)

    @property
    def path(self) -> Path:
        """The file the value is stored in."""
        return self._path

    async def get(self) -> str | None:
        return await anyio.to_thread.run_sync(self._read)

    async def set(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a session store holds text")
        await anyio.to_thread.run_sync(self._write, value.encode())

    async def remove(self) -> None:
        await anyio.to_thread.run_sync(self._unlink)

    def __repr__(self) -> str:
        return f"<FileSessionStore {str(self._path)!r}>"

    # -- blocking parts, run in a worker thread ---------------------------------------------

    def _read(self) -> str | None:
        try:
            with self._path.open("rb") as file:
                data = file.read(_MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error("read", exc) from exc
        if len(data) > _MAX_FILE_BYTES:
            log.warning(
                "ignoring the session file %s: larger than %d bytes, not a session record",
                self._path,
                _MAX_FILE_BYTES,
            )
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            log.warning("ignoring the session file %s: it is not UTF-8 text", self._path)
            return None

    def _write(self, data: bytes) -> None:
        directory = self._path.parent
        try:
            # Only the directories created here get 0700; an existing one is left alone.
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkstemp creates the file with O_EXCL and mode 0600, so the token is never
            # readable by anyone else, and in the same directory, so the rename is atomic.
            fd, temp_name = tempfile.mkstemp(
                prefix=f".{self._path.name}.", suffix=".tmp", dir=directory
            )
        except OSError as exc:
            raise self._error("write", exc) from exc
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_name, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise self._error("write", exc) from exc
        _fsync_directory(directory)

    def _unlink(self) -> None:
        try:
            self._path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error("delete", exc) from exc
        _fsync_directory(self._path.parent)

    def _error(self, action: str, exc: OSError) -> SessionStoreError:
        reason = exc.strerror or type(exc).__name__
        return SessionStoreError(f"could not {action} the session file {self._path}: {reason}")


def _fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable, where the platform allows it."""
    if os.name != "posix":
        return
    # Some filesystems refuse fsync on a directory; the data itself is already safe then,
    # only the rename might be lost in a power cut.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _KeyringBackend(Protocol):
    """What KeyringSessionStore needs of a keyring backend (``keyring.backend.KeyringBackend``)."""

    def get_password(self, service: str, username: str) -> str | None: ...

    def set_password(self, service: str, username: str, password: str) -> None: ...

    def delete_password(self, service: str, username: str) -> None: ...


def _import_keyring() -> tuple[ModuleType, ModuleType, tuple[type[Any], ...]]:
    """keyring, keyring.errors, and the backend classes that store nothing; or a clear error.

    Imported by name at run time so that keyring stays optional, for mypy too.
    """
    try:
        keyring = importlib.import_module("keyring")
        errors = importlib.import_module("keyring.errors")
        fail = importlib.import_module("keyring.backends.fail")
        null = importlib.import_module("keyring.backends.null")
    except ImportError as exc:
        raise SessionStoreError(_KEYRING_MISSING) from exc
    return keyring, errors, (fail.Keyring, null.Keyring)


class KeyringSessionStore:
    """A SessionStore in the operating system's keyring, through the ``keyring`` package.

    Needs the optional extra: ``pip install 'dartvex-auth-better[keyring]'``; without it
    the constructor raises SessionStoreError saying so. The value is stored as the
    "password" of ``username`` under ``service``; use one ``username`` per account or app
    instance so that they do not overwrite each other. ``backend`` is a keyring backend
    instance to use instead of the one keyring is configured with (``keyring.get_keyring()``
    at the time of each call).

    keyring's API blocks (D-Bus, Keychain prompts), so every call runs in a worker thread.
    When the machine has no usable backend (keyring's ``fail`` backend, or the ``null``
    backend that silently stores nothing), calls raise SessionStoreError saying so, as
    they do when the backend fails (locked keyring, refused access). The record the
    provider stores is small, well under the 2560-byte limit of Windows Credential
    Manager.
    """

    def __init__(
        self,
        *,
        username: str,
        service: str = DEFAULT_KEYRING_SERVICE,
        backend: _KeyringBackend | None = None,
    ) -> None:
        for name, value in (("username", username), ("service", service)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        self._keyring, self._errors, self._storing_nothing = _import_keyring()
        self._username = username
        self._service = service
        self._backend = backend

    @property
    def service(self) -> str:
        """The keyring service name."""
        return self._service

    @property
    def username(self) -> str:
        """The keyring user name the value is stored under."""
        return self._username

    async def get(self) -> str | None:
        return await anyio.to_thread.run_sync(self._get)

    async def set(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a session store holds text")
        await anyio.to_thread.run_sync(self._set, value)

    async def remove(self) -> None:
        await anyio.to_thread.run_sync(self._delete)

    def __repr__(self) -> str:
        return f"<KeyringSessionStore service={self._service!r} username={self._username!r}>"

    # -- blocking parts, run in a worker thread ---------------------------------------------

    def _resolve_backend(self) -> _KeyringBackend:
        backend: _KeyringBackend = (
            self._backend if self._backend is not None else self._keyring.get_keyring()
        )
        if isinstance(backend, self._storing_nothing):
            raise SessionStoreError(_NO_KEYRING_BACKEND.format(backend=_backend_name(backend)))
        return backend

    def _get(self) -> str | None:
        backend = self._resolve_backend()
        try:
            value = backend.get_password(self._service, self._username)
        except Exception as exc:
            raise self._error(backend, "read", exc) from exc
        if value is not None and not isinstance(value, str):
            log.warning("ignoring a non-text value in the keyring (%s)", _backend_name(backend))
            return None
        return value

    def _set(self, value: str) -> None:
        backend = self._resolve_backend()
        try:
            backend.set_password(self._service, self._username, value)
        except Exception as exc:
            raise self._error(backend, "write", exc) from exc

    def _delete(self) -> None:
        backend = self._resolve_backend()
        try:
            backend.delete_password(self._service, self._username)
        except self._errors.PasswordDeleteError as exc:
            # Backends say "not found" with this error; removing nothing is a success.
            try:
                still_there = backend.get_password(self._service, self._username) is not None
            except Exception:
                still_there = True
            if still_there:
                raise self._error(backend, "delete", exc) from exc
        except Exception as exc:
            raise self._error(backend, "delete", exc) from exc

    def _error(self, backend: _KeyringBackend, action: str, exc: Exception) -> SessionStoreError:
        if isinstance(exc, self._errors.NoKeyringError):
            return SessionStoreError(_NO_KEYRING_BACKEND.format(backend=_backend_name(backend)))
        # The type only: a backend's message might quote what it was asked to store.
        return SessionStoreError(
            f"the keyring backend {_backend_name(backend)} could not {action} the session "
            f"(service {self._service!r}, username {self._username!r}): {type(exc).__name__}"
        )


def _backend_name(backend: object) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"
