"""pydantic at the edges: one wording of a ``ValidationError`` for every message that
validates outside data (the platform protocol, the price file)."""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["first_problem"]


def first_problem(exc: ValidationError, *, whole: str) -> str:
    """``where: what`` for the first error (``attempts[1].provider: Input should be …``);
    ``whole`` names the document when the error is about all of it. pydantic's message
    only, never the input value, which may be a secret."""
    error = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    where = where.lstrip(".")
    if error["type"] in ("model_type", "dict_type"):
        return f"{where or whole} is not a JSON object"
    if error["type"] == "missing":
        return f"{where} is missing"
    return f"{where}: {error['msg']}" if where else f"{whole}: {error['msg']}"
