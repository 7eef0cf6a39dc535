"""CSV cells a spreadsheet shows as text and never runs (CSV formula injection).

User ids, key ids, model names and endpoints come from clients and configuration; a cell
starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to
Excel, LibreOffice and Google Sheets. OWASP's remedy: prefix such a text cell with ``'``.
Numbers are written as they are, so a numeric column never changes meaning.
"""

from __future__ import annotations

__all__ = ["FORMULA_START", "text_cell"]

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def text_cell(value: object) -> object:
    """``value``, with a leading ``'`` if it is a string a spreadsheet would run."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
