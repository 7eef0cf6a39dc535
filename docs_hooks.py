"""mkdocs hook: show Sphinx roles left in docstrings (:class:`~a.B`) as plain code (``B``)."""

from __future__ import annotations

import re

__all__ = ["on_page_content"]

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):<code>(~?)([\w.]+)</code>")


def _short(match: re.Match[str]) -> str:
    name = match.group(2)
    return f"<code>{name.rsplit('.', 1)[-1] if match.group(1) else name}</code>"


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub(_short, html)
