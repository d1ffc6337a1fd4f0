"""Developer tasks. `nox` with no arguments runs lint, typecheck, soak (the short pass/fail
run), bench_smoke (the benchmark harness runs), tests and docs."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import nox

# soak and bench_smoke (about a minute each) before tests, so that pytest's summary stays
# the last closing line of the run.
nox.options.sessions = ["lint", "typecheck", "soak", "bench_smoke", "tests", "docs"]
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


# The diagrams' renderer, served with the docs site rather than from a CDN.
DOCS_MERMAID = "mermaid@11.17.2"


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site: `mkdocs build --strict` into site/. Nothing is fetched but
    the installs (PyPI, and mermaid's script from npm once). `nox -s docs -- serve`
    previews it instead."""
    session.install("-e", ".[docs]")
    _vendor_mermaid(session)
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's banner about its future
    session.run("mkdocs", *(session.posargs or ["build", "--strict"]))


def _vendor_mermaid(session: nox.Session) -> None:
    """Put mermaid.min.js in docs/assets/vendor/ (git-ignored), from npm, once. Without
    npm the site still builds, and mkdocs-material loads mermaid from a CDN instead."""
    target = Path("docs/assets/vendor/mermaid.min.js")
    npm = shutil.which("npm")
    if target.exists():
        return
    if npm is None:
        session.warn(f"npm not found: the docs will load {DOCS_MERMAID} from a CDN")
        return
    with tempfile.TemporaryDirectory() as tmp:
        packed = subprocess.run(
            [npm, "pack", DOCS_MERMAID, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
        tarballs = list(Path(tmp).glob("mermaid-*.tgz"))
        if packed.returncode != 0 or not tarballs:
            session.warn(f"npm pack {DOCS_MERMAID} failed; the docs will load it from a CDN")
            return
        with tarfile.open(tarballs[0]) as tar:
            script = tar.extractfile("package/dist/mermaid.min.js")
            assert script is not None
            target.write_bytes(script.read())


@nox.session
def demo(session: nox.Session) -> None:
    """Sign a user in to a real Better Auth server and watch a Convex query live."""
    session.install("-e", ".[testing]")
    session.run("python", "-m", "dartvex_auth_better", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: ours vs a bare aiohttp floor vs the official PyPI and npm clients, side
    by side on the same local servers (a table, and JSON in .bench/). Options after `--`:
    `--quick`, `--smoke` (quick, then check the harness ran every section and wrote sane
    JSON; exits non-zero if not), `--only roundtrip|throughput|scale|signin|imports`,
    `--rounds N`."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "tests.benchmarks", "bench", *session.posargs)


@nox.session
def bench_smoke(session: nox.Session) -> None:
    """The benchmark harness runs: `bench --smoke` (small counts; the numbers mean nothing,
    the run fails only when a section breaks or writes no sane JSON)."""
    session.install("-e", ".[dev]")
    session.run(
        "python",
        "-m",
        "tests.benchmarks",
        "bench",
        "--smoke",
        "--json",
        ".bench/bench-smoke.json",
        *session.posargs,
    )


@nox.session
def soak(session: nox.Session) -> None:
    """Endurance under chaos: `nox -s soak -- --minutes N`; with no options, the short
    pass/fail run (exits non-zero when an invariant breaks; its last line reads
    `soak: N passed, N failed`)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "tests.benchmarks", "soak", *session.posargs)


@nox.session
def profile(session: nox.Session) -> None:
    """cProfile over our client's hot paths (subscription stream, mutation and query round
    trips) against the benchmark's servers; prints the top functions by own time and saves
    .prof files in .bench/profiles/. Options after `--`: `--size small|typical`,
    `--kind mutation|query`, `--updates N`, `--calls N`, `--top N`, `--out DIR`."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "tests.benchmarks", "profile", *session.posargs)
