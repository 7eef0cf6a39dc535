"""Store URLs: the one parser ``open_ledger`` and ``open_outbox`` share, and the one redactor.

``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works),
``sqlite://:memory:``, ``postgresql://user@host/db`` (``postgres://`` too).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any, Literal

from gatewaykit.errors import ConfigurationError

__all__ = ["open_store", "redact", "store_target"]

#: A credential as a URL query parameter (``password=``, ``api_key=``, ``token=``,
#: ``sig=`` …) or as a word of a libpq keyword string (``password=…``).
_QUERY_SECRET = re.compile(
    r"((?:^|[?&;\s])[\w.-]*(?:pass|pwd|token|key|secret|sig|auth|cred)[\w.-]*\s*=\s*)[^&#;\s]*",
    re.IGNORECASE,
)


def store_target(
    url: str, *, what: str, error: type[ConfigurationError] = ConfigurationError
) -> tuple[Literal["sqlite", "postgresql"], str]:
    """``("sqlite", path or ":memory:")`` or ``("postgresql", url)``; ``error`` names the
    caller's exception, ``what`` its store ("ledger", "outbox") in the message."""
    if not isinstance(url, str) or "://" not in url:
        shown = redact(url) if isinstance(url, str) else url
        raise error(
            f"not {_article(what)} URL: {shown!r}; use sqlite:///path.db, "
            "sqlite://:memory: or postgresql://user@host/dbname"
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "sqlite":
        if rest in (":memory:", "/:memory:"):
            return "sqlite", ":memory:"
        if not rest.startswith("/") or rest == "/":
            raise error(
                f"not a SQLite URL: {url!r}; use sqlite:///path.db (three slashes) or "
                "sqlite://:memory:"
            )
        return "sqlite", rest[1:]
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    raise error(
        f"unknown {what} URL scheme {scheme!r}; use sqlite:///path.db, sqlite://:memory: or "
        "postgresql://..."
    )


def open_store(
    url: str,
    options: Mapping[str, Any],
    *,
    what: str,
    sqlite: str,
    postgresql: str,
    error: type[ConfigurationError] = ConfigurationError,
) -> Any:
    """The backend for ``url``, built with ``options``, not yet opened. ``sqlite`` and
    ``postgresql`` name the backends (``"module:Class"``), imported only when chosen, so
    asyncpg stays optional."""
    kind, target = store_target(url, what=what, error=error)
    module, _, name = (sqlite if kind == "sqlite" else postgresql).partition(":")
    try:
        backend = getattr(importlib.import_module(module), name)
    except ImportError as exc:  # asyncpg missing
        raise error(
            f"a PostgreSQL {what} needs the extra: pip install 'gatewaykit[postgres]' ({exc})"
        ) from None
    return backend(target, **options)


def redact(url: str) -> str:
    """The URL with its credentials replaced by ``***``, for messages, logs and reprs.

    The user info ends at the URL's last ``@``, so a password holding ``/``, ``:`` or ``@``
    (which should have been percent-encoded) is hidden all the same. A database user name
    is kept (it helps to read an authentication error), but an http(s) URL's user info is
    hidden whole: a lone user there is usually a token. Query parameters (or words of a
    libpq keyword string) whose name says credential (``password``, ``api_key``,
    ``token``, ``sig`` …) are hidden too.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at and "/" not in userinfo.split(":", 1)[0]:
        if scheme.lower() in ("http", "https"):
            url = f"{scheme}://***@{host}"
        elif ":" in userinfo:
            url = f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
    return _QUERY_SECRET.sub(r"\1***", url)


def _article(what: str) -> str:
    return f"an {what}" if what[:1] in "aeiou" else f"a {what}"
