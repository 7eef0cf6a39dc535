"""Where requests go: provider endpoints and their credentials."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

from gatewaykit.errors import ConfigurationError
from gatewaykit.urls import redact

__all__ = ["Attempt", "Upstream"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


def header_value_ok(value: str) -> bool:
    """Printable ASCII (and tabs), without surrounding whitespace: safe in any HTTP client."""
    return value == value.strip() and _HEADER_VALUE.fullmatch(value) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Upstream:
    """A provider endpoint. ``base_url`` means what the official SDKs mean by it.

    ``provider="openai"`` (any OpenAI-compatible server; serves chat completions and
    responses): ``base_url`` ends in ``/v1``, e.g. ``https://api.openai.com/v1``.
    ``provider="anthropic"`` (serves messages): ``base_url`` has no ``/v1``, e.g.
    ``https://api.anthropic.com``. ``models`` limits which client model names it serves
    (None: any). The API key and headers never appear in reprs, nor does a credential in
    ``base_url`` (user info, ``?api_key=``).

    Whitespace around ``api_key`` is stripped (a key read from a file keeps its newline);
    a key or header value with any other control character is refused here, at
    configuration, because an HTTP library refusing it later would quote it in its error.
    """

    base_url: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    provider: Literal["openai", "anthropic"] = "openai"
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    models: frozenset[str] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"Upstream base_url must be an http(s) URL: {redact(self.base_url)!r}"
            )
        if self.provider not in ("openai", "anthropic"):
            raise ConfigurationError(f"unknown upstream provider {self.provider!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.api_key is not None:
            if not isinstance(self.api_key, str):
                raise ConfigurationError("Upstream api_key must be a string")
            key = self.api_key.strip()
            if not key or not header_value_ok(key):
                raise ConfigurationError(
                    "Upstream api_key is empty or holds a control or non-ASCII character "
                    "(the key is not shown)"
                )
            object.__setattr__(self, "api_key", key)
        for name, value in self.headers.items():
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise ConfigurationError(f"Upstream header name {name!r} is not a valid name")
            if not isinstance(value, str) or not header_value_ok(value):
                raise ConfigurationError(
                    f"Upstream header {name!r} holds a control or non-ASCII character "
                    "(the value is not shown)"
                )
        if self.models is not None and not isinstance(self.models, frozenset):
            object.__setattr__(self, "models", frozenset(self.models))

    def __repr__(self) -> str:  # base_url may carry credentials (user info, ?api_key=)
        return (
            f"Upstream(base_url={redact(self.base_url)!r}, provider={self.provider!r}, "
            f"models={self.models!r}, name={self.name!r})"
        )

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def label(self) -> str:
        """The upstream's name, else its provider (the ``owned_by`` of a model listing)."""
        return self.name or self.provider


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One way to serve a request: an upstream and the model name to send it."""

    attempt_id: str
    upstream: Upstream
    model: str
