"""Developer tasks. `nox` with no arguments runs lint, typecheck and tests."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, against the real local servers (Better Auth under Node, LocalConvex)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the tests."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict")


@nox.session
def demo(session: nox.Session) -> None:
    """Sign a user in to a real Better Auth server and watch a Convex query live."""
    session.install("-e", ".[testing]")
    session.run("python", "-m", "dartvex_auth_better", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: ours vs a bare aiohttp floor vs the official PyPI and npm clients, side
    by side on the same local servers (a table, and JSON in .bench/). Options after `--`:
    `--quick`, `--only roundtrip|throughput|scale|signin|imports`, `--rounds N`."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "tests.benchmarks", "bench", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Endurance under chaos: `nox -s soak -- --minutes N`; with no options, the short
    pass/fail run (exits non-zero when an invariant breaks)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "tests.benchmarks", "soak", *session.posargs)
