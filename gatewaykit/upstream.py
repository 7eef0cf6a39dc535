"""Where requests go: provider endpoints and their credentials."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from gatewaykit.errors import ConfigurationError

__all__ = ["Attempt", "Upstream"]


@dataclasses.dataclass(frozen=True, slots=True)
class Upstream:
    """A provider endpoint. ``base_url`` means what the official SDKs mean by it.

    ``provider="openai"`` (any OpenAI-compatible server; serves chat completions and
    responses): ``base_url`` ends in ``/v1``, e.g. ``https://api.openai.com/v1``.
    ``provider="anthropic"`` (serves messages): ``base_url`` has no ``/v1``, e.g.
    ``https://api.anthropic.com``. ``models`` limits which client model names it serves
    (None: any). The API key and headers never appear in reprs.
    """

    base_url: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    provider: Literal["openai", "anthropic"] = "openai"
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    models: frozenset[str] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"Upstream base_url must be an http(s) URL: {self.base_url!r}")
        if self.provider not in ("openai", "anthropic"):
            raise ConfigurationError(f"unknown upstream provider {self.provider!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.models is not None and not isinstance(self.models, frozenset):
            object.__setattr__(self, "models", frozenset(self.models))

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def label(self) -> str:
        return self.name or self.provider


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One way to serve a request: an upstream and the model name to send it."""

    attempt_id: str
    upstream: Upstream
    model: str
