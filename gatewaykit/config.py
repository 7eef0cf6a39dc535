"""The ``gatewaykit serve`` configuration file: TOML, validated by pydantic.

One frozen model per ``[section]``; unknown keys are errors, and every error names the file
and the key path (``gatewaykit.toml: upstreams[0].base_url: …``). Secrets are never
written in the file: a ``*_env`` key names an environment variable, a ``*_file`` key a
file (relative to the config file's directory) that holds the secret. ``load_config``
resolves them with the environment it is handed — the library itself reads none.

A later section is one more field on :class:`GatewayConfig` (a model deriving from
:class:`Section`) and one more step in :func:`gatewaykit.server.build_app`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from gatewaykit.errors import ConfigurationError
from gatewaykit.runtime import DEFAULT_GC_THRESHOLD
from gatewaykit.urls import redact

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "AdminConfig",
    "GatewayConfig",
    "LedgerConfig",
    "PlatformConfig",
    "PricesConfig",
    "RateLimitConfig",
    "Section",
    "ServerConfig",
    "StandaloneConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

MASK = "********"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Section(BaseModel):
    """A table of the file: frozen, and a key it does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _secret(info: ValidationInfo, *, env: str | None, file: Path | None, what: str) -> str | None:
    """The secret named by ``env`` (a variable) or ``file`` (a path), read at load time."""
    if env is not None and file is not None:
        raise ValueError(f"give {what}_env or {what}_file, not both")
    context: Mapping[str, Any] = info.context or {}
    if env is not None:
        if not _ENV_NAME.fullmatch(env):  # perhaps the secret itself: never repeat it
            raise ValueError(f"{what}_env: not an environment variable name (A-Z, 0-9, _)")
        value = context.get("environ", {}).get(env)
        if not value or not value.strip():
            raise ValueError(f"{what}_env: the environment variable {env} is not set or empty")
        return str(value).strip()
    if file is not None:
        path = Path(context.get("base_dir", ".")) / file
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{what}_file: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ValueError(f"{what}_file: {path} is empty")
        return value
    return None


def _refuse_inline(data: Any, key: str) -> Any:
    if isinstance(data, dict) and key in data:
        raise ValueError(
            f"{key} may not be written in the file; name an environment variable with "
            f"{key}_env or a file with {key}_file"
        )
    return data


class ServerConfig(Section):
    """``[server]``: where and how ``gatewaykit serve`` listens."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    access_log: bool = True
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    #: The collector's young-generation threshold once the app started (gatewaykit.runtime);
    #: 0 leaves CPython's defaults.
    gc_threshold: int = Field(default=DEFAULT_GC_THRESHOLD, ge=0)


class LedgerConfig(Section):
    """``[ledger]``: the budget store (standalone mode)."""

    url: str = Field(default="sqlite:///gatewaykit.db", repr=False)  # it may hold a password
    #: The URL from a variable or a file instead, so its password stays out of the file.
    url_env: str | None = None
    url_file: Path | None = None
    hold_ttl: float = Field(default=600.0, gt=0)
    #: Seconds between sweeps that expire crashed requests' holds; default ``hold_ttl / 4``.
    sweep_interval: float | None = Field(default=None, gt=0)
    #: Seconds between the additions of each process's refusal counts to the ledger
    #: (the admin page's denials lag by up to this much).
    denials_flush_interval: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _url_from_secret(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not {"url_env", "url_file"} & data.keys():
            return data
        if "url" in data:
            raise ValueError("give url, url_env or url_file, not two")
        file = data.get("url_file")
        url = _secret(
            info, env=data.get("url_env"), file=None if file is None else Path(file), what="url"
        )
        return {**data, "url": url}


class PricesConfig(Section):
    """``[prices]``: the built-in table, with a JSON price file merged over it."""

    file: Path | None = None
    defaults: bool = True


class UpstreamConfig(Section):
    """``[[upstreams]]``: one provider endpoint, tried in the order of the file."""

    provider: Literal["openai", "anthropic"] = "openai"
    base_url: str
    api_key_env: str | None = None
    api_key_file: Path | None = None
    models: list[str] | None = None
    name: str | None = None
    _api_key: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        return _refuse_inline(data, "api_key")

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> UpstreamConfig:
        self._api_key = _secret(info, env=self.api_key_env, file=self.api_key_file, what="api_key")
        return self

    @property
    def api_key(self) -> str | None:
        return self._api_key


class StandaloneConfig(Section):
    """``[standalone]``: the :class:`~gatewaykit.StandaloneMode` options set most often."""

    missing_usage: Literal["estimate", "hold", "allow_free", "fail"] = "estimate"
    disconnect: Literal["charge_observed", "release"] = "charge_observed"
    default_max_output_tokens: int = Field(default=4096, gt=0)
    #: "fit": admit with the largest output cap the budgets can pay (docs/modes.md).
    over_budget: Literal["refuse", "fit"] = "refuse"
    min_output_tokens: int = Field(default=256, gt=0)
    default_rpm: int | None = Field(default=None, gt=0)
    default_tpm: int | None = Field(default=None, gt=0)
    #: The most requests one user may have in flight, across their keys (None: no cap).
    user_max_concurrent: int | None = Field(default=None, gt=0)
    unpriced: Literal["reject", "allow"] = "reject"
    ledger_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed"
    budget_headers: bool = True
    key_cache_ttl: float = Field(default=5.0, ge=0)
    #: User → team: such a user's requests also hold against ``team:<team>``.
    teams: dict[str, str] = Field(default_factory=dict)
    master_key_env: str | None = None
    master_key_file: Path | None = None
    _master_key: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        return _refuse_inline(data, "master_key")

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> StandaloneConfig:
        self._master_key = _secret(
            info, env=self.master_key_env, file=self.master_key_file, what="master_key"
        )
        return self

    @property
    def master_key(self) -> str | None:
        return self._master_key


class RateLimitEntry(Section):
    """One ``[[ratelimit.limits]]`` table: a user or team scope (``user:*``: every user)."""

    scope: str = Field(pattern=r"^(user|team):\S{1,200}$")
    rpm: int | None = Field(default=None, gt=0, lt=2**31)
    tpm: int | None = Field(default=None, gt=0, lt=2**31)


class RateLimitConfig(Section):
    """``[ratelimit]``: where rate limits are counted, and the users' and teams' limits.

    Without ``redis_url`` each gateway process counts its own (docs/rate-limits.md).
    """

    redis_url: str | None = None
    on_unavailable: Literal["fail_open", "fail_closed"] = "fail_open"
    limits: list[RateLimitEntry] = Field(default_factory=list)


class AdminConfig(Section):
    """``[admin]``: the admin page (``gatewaykit[admin]``), logged in with the master key."""

    enabled: bool = False
    path: str = Field(default="/admin", pattern=r"^(/[A-Za-z0-9._~-]+)+$")
    session_ttl: float = Field(default=8 * 3600, ge=1)


class PlatformConfig(Section):
    """``[platform]``: a control plane decides instead of the local ledger."""

    url: str
    token_env: str | None = None
    token_file: Path | None = None
    #: The durable usage-report outbox (a database of its own, never the ledger's).
    outbox: str = Field(default="sqlite:///gatewaykit-outbox.db", repr=False)
    default_max_output_tokens: int = Field(default=4096, gt=0)
    _token: str = PrivateAttr(default="")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_token(cls, data: Any) -> Any:
        return _refuse_inline(data, "token")

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> PlatformConfig:
        token = _secret(info, env=self.token_env, file=self.token_file, what="token")
        if token is None:
            raise ValueError("the gateway token is required: give token_env or token_file")
        self._token = token
        return self

    @property
    def token(self) -> str:
        return self._token


class GatewayConfig(Section):
    """The whole file. Without ``[platform]`` the gateway runs in standalone mode."""

    server: ServerConfig = ServerConfig()
    ledger: LedgerConfig = LedgerConfig()
    prices: PricesConfig = PricesConfig()
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    standalone: StandaloneConfig = StandaloneConfig()
    ratelimit: RateLimitConfig = RateLimitConfig()
    platform: PlatformConfig | None = None
    admin: AdminConfig = AdminConfig()
    _base_dir: Path = PrivateAttr(default=Path())

    @model_validator(mode="after")
    def _one_mode(self, info: ValidationInfo) -> GatewayConfig:
        if self.platform is not None and self.upstreams:
            raise ValueError(
                "[[upstreams]] are the control plane's in platform mode: remove them or [platform]"
            )
        if self.platform is None and not self.upstreams:
            raise ValueError("standalone mode needs at least one [[upstreams]] table")
        if self.admin.enabled and (self.platform is not None or not self.standalone.master_key):
            raise ValueError(
                "[admin] enabled needs standalone mode and a master key to log in with "
                "([standalone] master_key_env or master_key_file)"
            )
        self._base_dir = Path((info.context or {}).get("base_dir", "."))
        return self

    @property
    def prices_file(self) -> Path | None:
        """``[prices] file``, relative to the config file's directory."""
        return None if self.prices.file is None else self._base_dir / self.prices.file

    def masked(self) -> dict[str, Any]:
        """The resolved configuration for people to read: every secret shown as a mask."""
        data = self.model_dump(mode="json")
        for upstream, shown in zip(self.upstreams, data["upstreams"], strict=True):
            shown["api_key"] = None if upstream.api_key is None else MASK
        data["standalone"]["master_key"] = None if self.standalone.master_key is None else MASK
        if self.platform is not None:
            data["platform"]["token"] = MASK
        data["prices"]["file"] = None if self.prices_file is None else str(self.prices_file)
        for path, url in self._urls():
            table: Any = data
            for part in path[:-1]:
                table = table[part]
            table[path[-1]] = redact(url)
        return data

    def passwords_in_file(self) -> list[str]:
        """Key paths of the URLs written in the file with a credential (to warn about)."""
        from_secret = self.ledger.url_env is not None or self.ledger.url_file is not None
        return [
            _where(path)
            for path, url in self._urls()
            if redact(url) != url and not (path == ("ledger", "url") and from_secret)
        ]

    def _urls(self) -> list[tuple[tuple[int | str, ...], str]]:
        """Every URL of the configuration with its key path: any may hold a credential."""
        urls: list[tuple[tuple[int | str, ...], str]] = [(("ledger", "url"), self.ledger.url)]
        urls += [(("upstreams", i, "base_url"), u.base_url) for i, u in enumerate(self.upstreams)]
        if self.ratelimit.redis_url is not None:
            urls.append((("ratelimit", "redis_url"), self.ratelimit.redis_url))
        if self.platform is not None:
            urls.append((("platform", "url"), self.platform.url))
            urls.append((("platform", "outbox"), self.platform.outbox))
        return urls


def _where(location: tuple[int | str, ...]) -> str:
    """``("upstreams", 0, "base_url")`` → ``upstreams[0].base_url``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def parse_config(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str],
    source: str = "<config>",
    base_dir: Path | None = None,
) -> GatewayConfig:
    """Validate an already-parsed configuration; errors name ``source`` and the key path."""
    context = {"environ": environ, "base_dir": base_dir or Path()}
    try:
        return GatewayConfig.model_validate(data, context=context)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key (check its spelling and its [section])"
            lines.append(f"{source}: {_where(tuple(error['loc']))}: {message}")
        raise ConfigurationError("\n".join(lines)) from None


def load_config(path: str | Path, *, environ: Mapping[str, str]) -> GatewayConfig:
    """Read, validate and resolve the TOML file at ``path``; secrets come from ``environ``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, environ=environ, source=str(path), base_dir=path.parent)
