"""An LLM gateway in one file: gatewaykit's example app.

    python examples/app.py [--host 127.0.0.1] [--port 8000] [--db URL] [--prices FILE]
                           [--hold-ttl SECONDS] [--fit-holds] [--platform URL]
                           [--ops-port PORT] [--redis URL]

Serves ``POST /v1/chat/completions``, ``/v1/messages``, ``/v1/responses`` and
``GET /healthz``. Standalone by default: API keys and budgets in the ledger named by
``--db`` (default ``$GATEWAYKIT_DB``, else ``sqlite:///gatewaykit.db``), managed with the
``gatewaykit`` command line. ``--platform URL`` asks a control plane instead, with the
gateway token from ``GATEWAYKIT_PLATFORM_TOKEN``; ``--db`` then names the database of the
durable usage-report outbox (default ``sqlite:///gatewaykit-outbox.db``). ``--fit-holds``
admits a request whose worst case does not fit its budget with the largest output cap that
does (``StandaloneMode(over_budget="fit")``) instead of refusing it. ``--redis URL``
(``pip install 'gatewaykit[redis]'``) counts the keys' rate limits in Redis, so every
process started with it shares them; without it each process counts its own.

Upstreams come from the variables the official SDKs read: ``OPENAI_BASE_URL`` (ending in
``/v1``) and ``OPENAI_API_KEY`` for chat completions and responses, ``ANTHROPIC_BASE_URL``
(no ``/v1``) and ``ANTHROPIC_API_KEY`` for messages. With none of them set, the app starts
gatewaykit's fake provider on a side port, so it runs offline. ``GATEWAYKIT_MASTER_KEY``
sets a master key (at least 16 characters) that may act for any user and logs in to the
admin page at ``/admin/`` (standalone mode; needs ``gatewaykit[admin]``).

``--ops-port PORT`` serves ``GET /metrics`` (Prometheus), ``/livez`` and ``/readyz`` on a
port of their own (needs ``gatewaykit[metrics]``), so they are never exposed with the API.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import logging
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette

from gatewaykit import GatewayKitError, PriceTable, Upstream, open_ledger, server
from gatewaykit.config import GatewayConfig, parse_config
from gatewaykit.outbox import open_outbox
from gatewaykit.testing import FakeProvider
from gatewaykit.urls import redact

DEFAULT_DB = "sqlite:///gatewaykit.db"
DEFAULT_OUTBOX = "sqlite:///gatewaykit-outbox.db"
#: Seconds the built-in fake provider keeps idle connections: above the gateway client's 30 s.
KEEP_ALIVE = 75


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the app is configured with; built from the command line and environment."""

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = DEFAULT_DB
    prices: Path | None = None
    hold_ttl: float = 600.0
    fit_holds: bool = False
    platform: str | None = None
    redis: str | None = dataclasses.field(default=None, repr=False)  # may hold a password
    platform_token: str | None = dataclasses.field(default=None, repr=False)
    master_key: str | None = dataclasses.field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_api_key: str | None = dataclasses.field(default=None, repr=False)
    anthropic_base_url: str | None = None
    anthropic_api_key: str | None = dataclasses.field(default=None, repr=False)
    ops_port: int | None = None
    denials_flush: float = 10.0

    @property
    def offline(self) -> bool:
        """No real upstream configured: serve the built-in fake provider."""
        return self.platform is None and not any(
            (self.openai_base_url, self.openai_api_key, self.anthropic_base_url,
             self.anthropic_api_key)
        )  # fmt: skip


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python examples/app.py", description="gatewaykit's example LLM gateway."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--db",
        help="ledger URL (standalone) or outbox URL (platform); default $GATEWAYKIT_DB, "
        f"else {DEFAULT_DB} ({DEFAULT_OUTBOX} with --platform)",
    )
    parser.add_argument("--prices", type=Path, help="JSON price file, merged over the defaults")
    parser.add_argument("--hold-ttl", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument(
        "--fit-holds",
        action="store_true",
        help="lower a request's output cap to what its budget can pay instead of a 402",
    )
    parser.add_argument(
        "--platform", metavar="URL", help="control plane URL (token: GATEWAYKIT_PLATFORM_TOKEN)"
    )
    parser.add_argument(
        "--ops-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /livez and /readyz on this port (default: not served)",
    )
    parser.add_argument(
        "--denials-flush",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often refusal counts are added to the ledger (default 10)",
    )
    parser.add_argument(
        "--redis", metavar="URL", help="share rate limits through Redis (redis://host:port/db)"
    )
    args = parser.parse_args(argv)
    # A separate default file in platform mode: a ledger refuses a file holding an outbox.
    default_db = DEFAULT_OUTBOX if args.platform else DEFAULT_DB
    return Settings(
        host=args.host,
        port=args.port,
        db=args.db or environ.get("GATEWAYKIT_DB") or default_db,
        prices=args.prices,
        hold_ttl=args.hold_ttl,
        fit_holds=args.fit_holds,
        platform=args.platform,
        redis=args.redis,
        platform_token=environ.get("GATEWAYKIT_PLATFORM_TOKEN"),
        master_key=environ.get("GATEWAYKIT_MASTER_KEY") or None,
        openai_base_url=environ.get("OPENAI_BASE_URL") or None,
        openai_api_key=environ.get("OPENAI_API_KEY") or None,
        anthropic_base_url=environ.get("ANTHROPIC_BASE_URL") or None,
        anthropic_api_key=environ.get("ANTHROPIC_API_KEY") or None,
        ops_port=args.ops_port,
        denials_flush=args.denials_flush,
    )


def example_config(settings: Settings, fake_port: int | None) -> GatewayConfig:
    """The settings as a ``gatewaykit serve`` configuration: both run through one factory."""
    upstreams: list[dict[str, object]] = []
    if fake_port is not None:
        fake = f"http://127.0.0.1:{fake_port}"
        upstreams = [
            {"base_url": f"{fake}/v1", "provider": "openai", "name": "fake-openai"},
            {"base_url": fake, "provider": "anthropic", "name": "fake-anthropic"},
        ]
    if settings.openai_base_url or settings.openai_api_key:
        upstreams.append(
            {
                "base_url": settings.openai_base_url or "https://api.openai.com/v1",
                "provider": "openai",
                **({"api_key_env": "OPENAI_API_KEY"} if settings.openai_api_key else {}),
            }
        )
    if settings.anthropic_base_url or settings.anthropic_api_key:
        upstreams.append(
            {
                "base_url": settings.anthropic_base_url or "https://api.anthropic.com",
                "provider": "anthropic",
                **({"api_key_env": "ANTHROPIC_API_KEY"} if settings.anthropic_api_key else {}),
            }
        )
    data: dict[str, object] = {
        "server": {"host": settings.host, "port": settings.port},
        "ledger": {
            "url": settings.db,
            "hold_ttl": settings.hold_ttl,
            "denials_flush_interval": settings.denials_flush,
        },
        "prices": {"file": None if settings.prices is None else str(settings.prices)},
    }
    if settings.platform is not None:
        data["platform"] = {
            "url": settings.platform,
            "token_env": "GATEWAYKIT_PLATFORM_TOKEN",
            "outbox": settings.db,
        }
    else:
        data["upstreams"] = upstreams
        standalone: dict[str, object] = {}
        if settings.master_key:
            standalone["master_key_env"] = "GATEWAYKIT_MASTER_KEY"
        if settings.fit_holds:
            standalone["over_budget"] = "fit"
        if standalone:
            data["standalone"] = standalone
        if settings.redis is not None:
            data["ratelimit"] = {"redis_url": settings.redis}
        if settings.master_key:
            data["admin"] = {"enabled": True}  # the admin page at /admin
    secrets = {
        "OPENAI_API_KEY": settings.openai_api_key,
        "ANTHROPIC_API_KEY": settings.anthropic_api_key,
        "GATEWAYKIT_PLATFORM_TOKEN": settings.platform_token,
        "GATEWAYKIT_MASTER_KEY": settings.master_key,
    }
    environ = {name: value for name, value in secrets.items() if value}
    return parse_config(data, environ=environ, source="examples/app.py")


def configured_upstreams(settings: Settings, fake_port: int | None) -> list[Upstream]:
    """The providers to forward to, with the meaning the official SDKs give the variables."""
    if settings.platform is not None:
        return []
    return server.upstreams(example_config(settings, fake_port))


def load_prices(settings: Settings) -> PriceTable:
    return server.load_prices(example_config(settings, 0 if settings.offline else None))


class _SideServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


#: Set inside the fake provider's task: its log records are dropped (see _QuietSideServer).
_in_fake_provider: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "in_fake_provider", default=False
)


class _QuietSideServer(logging.Filter):
    """Drop the fake provider's uvicorn records: it shares uvicorn's loggers with the main
    server, whose start-up, shutdown and access lines would otherwise appear twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _in_fake_provider.get()


@contextlib.asynccontextmanager
async def fake_provider(sock: socket.socket) -> AsyncIterator[None]:
    """Serve gatewaykit's fake provider on ``sock`` for as long as the context lasts."""
    # log_config/log_level None: leave the main server's logging as it is (access_log=False
    # would too: uvicorn would remove the access logger's handlers, the main server's too).
    # Idle connections outlive the gateway client's keep-alive (30 s), as a real provider's
    # do: uvicorn's 5 s default would close pooled connections under the client's feet.
    config = uvicorn.Config(
        FakeProvider(),
        log_config=None,
        log_level=None,
        lifespan="off",
        timeout_keep_alive=KEEP_ALIVE,
    )
    server = _SideServer(config)

    async def serve() -> None:
        _in_fake_provider.set(True)
        await server.serve([sock])

    quiet = _QuietSideServer()
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(quiet)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            try:
                yield
            finally:
                server.should_exit = True
    finally:
        for name in ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).removeFilter(quiet)


def build_app(
    settings: Settings,
    *,
    fake_socket: socket.socket | None = None,
    ops_socket: socket.socket | None = None,
) -> Starlette:
    """The gateway, built by gatewaykit's own app factory (the one ``gatewaykit serve`` uses).

    ``fake_socket``: a listening socket to serve the built-in fake provider on;
    ``ops_socket``: one to serve ``/metrics``, ``/livez`` and ``/readyz`` on.
    """
    if fake_socket is None:
        return server.build_app(example_config(settings, None), ops_socket=ops_socket)
    config = example_config(settings, fake_socket.getsockname()[1])
    return server.build_app(
        config, services=[lambda: fake_provider(fake_socket)], ops_socket=ops_socket
    )


def absolute_db_url(url: str) -> str:
    """``sqlite:///relative.db`` made absolute, so the printed commands work from anywhere."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).resolve()}"
    return url


def cli_command() -> str:
    """How to run the ``gatewaykit`` command line installed beside this interpreter."""
    script = Path(sys.executable).parent / "gatewaykit"
    if not script.exists():
        return f"{sys.executable} -m gatewaykit"
    with contextlib.suppress(ValueError):
        return str(script.absolute().relative_to(Path.cwd()))
    on_path = shutil.which("gatewaykit")
    return "gatewaykit" if on_path and Path(on_path).samefile(script) else str(script)


async def preflight(settings: Settings) -> None:
    """Open the database once before serving, so a bad --db fails here, readably."""
    if settings.platform is not None:
        async with open_outbox(settings.db):
            return
    ledger = open_ledger(settings.db)
    await ledger.open()
    await ledger.aclose()


def banner(settings: Settings, fake_port: int | None, ops_port: int | None = None) -> str:
    base = f"http://{settings.host}:{settings.port}"
    db = redact(absolute_db_url(settings.db))  # the banner goes to logs: never a password
    lines = [f"gatewaykit example gateway on {base}"]
    lines.append(
        "  routes     POST /v1/chat/completions  /v1/messages  /v1/responses  /v1/embeddings"
        "  /v1/messages/count_tokens, GET /v1/models  /healthz"
    )
    if ops_port is not None:
        ops = f"http://{settings.host}:{ops_port}"
        lines.append(f"  ops        GET {ops}/metrics  {ops}/livez  {ops}/readyz")
    if settings.platform is not None:
        lines.append(f"  mode       platform: control plane {settings.platform}")
        lines.append(f"  outbox     {db}")
        lines.append(
            "Keys, budgets and upstreams are the control plane's; clients send its tokens."
        )
        return "\n".join(lines)
    lines.append(f"  mode       standalone, ledger {db}")
    if fake_port is not None:
        lines.append(
            f"  upstreams  built-in fake provider on http://127.0.0.1:{fake_port} (offline: set "
            "OPENAI_BASE_URL/OPENAI_API_KEY or ANTHROPIC_BASE_URL/ANTHROPIC_API_KEY for real ones)"
        )
    else:
        for upstream in configured_upstreams(settings, None):
            served = "chat completions + responses" if upstream.provider == "openai" else "messages"
            lines.append(f"  upstream   {upstream.provider} {upstream.base_url} ({served})")
    prices = f"defaults + {settings.prices}" if settings.prices else "built-in defaults"
    lines.append(f"  prices     {prices}; hold TTL {settings.hold_ttl:g} s")
    if settings.redis is not None:
        lines.append(f"  limits     shared through Redis at {redact(settings.redis)}")
    if settings.master_key:
        lines.append(f"  admin      {base}/admin/ (log in with GATEWAYKIT_MASTER_KEY)")
    else:
        lines.append("  master key not set (GATEWAYKIT_MASTER_KEY opens an admin page at /admin/)")
    lines.append("Create a key (printed once) with:")
    lines.append(f"  {cli_command()} --db {db} keys create --user alice --budget 5")
    lines.append("then use it with the SDK you already have:")
    lines.append(f'  OpenAI(base_url="{base}/v1", api_key="gk_...")')
    lines.append(f'  Anthropic(base_url="{base}", api_key="gk_...")')
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv, os.environ)
    fake_socket = ops_socket = None
    try:
        anyio.run(preflight, settings)
        if settings.offline:
            fake_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fake_socket.bind(("127.0.0.1", 0))
            fake_socket.listen(128)
        if settings.ops_port is not None:
            ops_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ops_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ops_socket.bind((settings.host, settings.ops_port))
            ops_socket.listen(128)
        app = build_app(settings, fake_socket=fake_socket, ops_socket=ops_socket)
    except (GatewayKitError, OSError, ImportError) as exc:
        for sock in (fake_socket, ops_socket):
            if sock is not None:
                sock.close()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    fake_port = fake_socket.getsockname()[1] if fake_socket is not None else None
    ops_port = ops_socket.getsockname()[1] if ops_socket is not None else None
    print(banner(settings, fake_port, ops_port), flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
