"""mkdocs hook: tidy the reStructuredText left in the package's docstrings.

The docstrings are written for ``help()`` and IDEs and use a little reStructuredText:
roles such as :meth:`aclose` and literal blocks introduced by ``::``. Markdown renders
a role as the role name followed by inline code; this hook keeps only the code (the
last dotted part for ``~``-prefixed targets, the title for ``title <target>``), turns a
paragraph-ending ``::`` into ``:`` and drops a paragraph that is only ``::``.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:meth|class|func|attr|mod|data|exc|obj):<code>(.*?)</code>")
_TITLED = re.compile(r"^(.*?)\s*&lt;.*&gt;$")
_LONE_DOUBLE_COLON = re.compile(r"<p>::</p>")
_DOUBLE_COLON = re.compile(r"::</p>")


def _role(match: re.Match[str]) -> str:
    text = match.group(1)
    titled = _TITLED.match(text)
    if titled:
        text = titled.group(1)
    elif text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return f"<code>{text}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    html = _LONE_DOUBLE_COLON.sub("", _ROLE.sub(_role, html))
    return _DOUBLE_COLON.sub(":</p>", html)
