"""The documentation's pages checked against the code: no untested example, no error
or public name missing, no table out of date."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import dartvex_auth_better
import dartvex_auth_better._errors as errors_module
from dartvex_auth_better import cli, testing
from dartvex_auth_better.integrations import starlette
from dartvex_auth_better.testing import pytest_plugin

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```$", re.M | re.S)
SNIPPET = re.compile(r"^(?P<path>[\w./-]+)(?::(?P<section>[\w-]+))?$")


def fences(page: Path) -> list[tuple[str, str]]:
    return [(m["lang"], m["body"]) for m in FENCE.finditer(page.read_text())]


def included(body: str) -> list[str] | None:
    """The files a code block includes (pymdownx.snippets' block form: the paths between
    two ``--8<--`` lines), or None when it is not an include. The block form, unlike the
    one-line form, is not valid Python, so ``ruff format`` leaves it alone."""
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if len(lines) >= 3 and lines[0] == lines[-1] == "--8<--":
        return lines[1:-1]
    return None


def includes() -> list[tuple[Path, str, str | None]]:
    found = []
    for page in PAGES:
        for _, body in fences(page):
            for spec in included(body) or []:
                match = SNIPPET.match(spec)
                assert match, (page.name, spec)
                found.append((page, match["path"], match["section"]))
    return found


def test_every_code_example_is_a_file_that_a_test_runs() -> None:
    """Python and shell examples come from docs/snippets/ (run by tests/docs) or
    docs/examples/ (run by tests/integration); the only other code blocks are shell
    commands checked below, and outputs, data formats and diagrams."""
    for page in PAGES:
        for lang, body in fences(page):
            if included(body) is not None:
                continue
            assert lang in ("text", "json", "mermaid", "sh"), (page.name, lang, body[:80])
            if lang == "sh":
                assert page.name == "getting-started.md", (page.name, body[:80])


def test_snippet_includes_exist() -> None:
    found = includes()
    assert found
    for page, path, section in found:
        assert path.startswith(("docs/snippets/", "docs/examples/")), (page.name, path)
        source = ROOT / path
        assert source.is_file(), (page.name, path)
        if section is not None:
            text = source.read_text()
            assert f"--8<-- [start:{section}]" in text, (page.name, path, section)
            assert f"--8<-- [end:{section}]" in text, (page.name, path, section)


def test_every_snippet_is_shown_somewhere() -> None:
    shown = {path for _, path, _ in includes()}
    snippets = {
        str(p.relative_to(ROOT))
        for p in (DOCS / "snippets").rglob("*")
        if p.suffix in (".py", ".sh", ".txt") and "__pycache__" not in p.parts
    }
    assert snippets <= shown, snippets - shown


def test_getting_started_shell_commands() -> None:
    """The two commands are the README's, verbatim (CI runs the second one), and the
    install command names extras that exist."""
    blocks = [body for lang, body in fences(DOCS / "getting-started.md") if lang == "sh"]
    install, commands = blocks
    assert commands in (ROOT / "README.md").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = re.findall(r"\.\[([\w,]+)\]", install + (DOCS / "getting-started.md").read_text())
    assert named
    for group in named:
        for extra in group.split(","):
            assert extra in extras, extra


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, page


def test_the_build_fetches_nothing() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^  font: false$", config, re.M)
    for plugin in ("privacy", "social", "optimize"):
        assert f"- {plugin}" not in config


# -- the errors reference ------------------------------------------------------------------


def errors_page() -> str:
    return (DOCS / "errors.md").read_text()


def test_the_error_tree_matches_the_classes() -> None:
    tree = next(body for lang, body in fences(DOCS / "errors.md") if lang == "text")
    parents: list[str] = []
    seen = set()
    for line in tree.splitlines():
        match = re.match(r"^(?P<prefix>[│├└─ ]*)(?P<name>\w+)", line)
        assert match, line
        depth = len(match["prefix"]) // 4
        name = match["name"]
        parents[depth:] = [name]
        cls = getattr(errors_module, name)
        if depth:
            assert issubclass(cls, getattr(errors_module, parents[depth - 1])), name
        seen.add(name)
    assert seen == set(errors_module.__all__)


def test_each_error_section_matches_its_class() -> None:
    sections = re.findall(
        r"^### `(\w+)`\n\nSubclass of (.*?)\. `retryable`: (.*?)\.$", errors_page(), re.M
    )
    assert sorted(name for name, _, _ in sections) == sorted(errors_module.__all__)
    for name, bases, retryable in sections:
        cls = getattr(errors_module, name)
        assert re.findall(r"`(\w+)`", bases) == [b.__name__ for b in cls.__bases__], name
        if retryable in ("yes", "no"):
            assert cls.retryable is (retryable == "yes"), name


# -- the API reference ---------------------------------------------------------------------


def documented() -> list[str]:
    names = []
    for page in sorted((DOCS / "reference").glob("*.md")):
        text = page.read_text()
        names += re.findall(r"^::: (dartvex_auth_better[\w.]*)$", text, re.M)
        for module, block in re.findall(
            r"^::: (dartvex_auth_better[\w.]*)\n((?:    .*\n)+)", text, re.M
        ):
            names += [f"{module}.{m}" for m in re.findall(r"^        - (\w+)$", block, re.M)]
    return names


@pytest.mark.parametrize(
    ("module", "public"),
    [
        ("dartvex_auth_better", [n for n in dartvex_auth_better.__all__ if n != "__version__"]),
        ("dartvex_auth_better.testing", list(testing.__all__)),
        ("dartvex_auth_better.testing.pytest_plugin", list(pytest_plugin.__all__)),
        ("dartvex_auth_better.integrations.starlette", list(starlette.__all__)),
    ],
)
def test_the_reference_documents_every_public_name_once(module: str, public: list[str]) -> None:
    names = documented()
    for name in public:
        assert names.count(f"{module}.{name}") == 1, name


def test_the_reference_documents_nothing_private() -> None:
    for name in documented():
        assert not any(part.startswith("_") for part in name.split(".")), name


# -- the command line ----------------------------------------------------------------------


def test_the_exit_statuses_are_the_commands_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    documented = (DOCS / "snippets" / "cli_exit_statuses.txt").read_text().strip()
    section = help_text[help_text.index("exit statuses:") :].split("\n\n")[0].strip()
    assert documented == section


def test_the_commands_table_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    commands = re.findall(r"^    (\w+) ", help_text, re.M)
    assert commands
    page = (DOCS / "cli.md").read_text()
    for command in commands:
        assert re.search(rf"^\| `{command}\b", page, re.M), command
