"""The one app factory: ``gatewaykit serve`` and the example app both build the gateway here.

:func:`build_app` turns a validated :class:`~gatewaykit.config.GatewayConfig` into a
Starlette application: the adapters behind :class:`~gatewaykit.GatewayMiddleware`,
``GET /healthz``, the admin page when ``[admin]`` enables it (and on a port of their own,
if asked, ``/metrics``, ``/livez`` and ``/readyz``), and a lifespan that opens the upstream
client, the ledger (with a periodic sweeper and the refusal counter's flusher) or the
platform mode's outbox, and closes them in reverse order.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.config import GatewayConfig
from gatewaykit.denials import DenialCounter
from gatewaykit.errors import ConfigurationError, GatewayKitError
from gatewaykit.ledger import DenialStore, Ledger, open_ledger
from gatewaykit.middleware import GatewayMiddleware
from gatewaykit.modes.base import RequestModeStrategy
from gatewaykit.modes.platform import PlatformMode
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.observability.recorder import MetricsRecorder
from gatewaykit.outbox import Outbox, open_outbox
from gatewaykit.pricing import PriceTable
from gatewaykit.ratelimit import RateLimit
from gatewaykit.runtime import tune_gc
from gatewaykit.upstream import Upstream

if TYPE_CHECKING:
    from gatewaykit.ratelimit.redis import RedisRateLimiter

__all__ = ["build_app", "load_prices", "redis_limiter", "sweep_periodically", "upstreams"]

logger = logging.getLogger("gatewaykit.server")

#: Something to run for the app's lifetime, entered before anything else (e.g. the
#: example app's built-in fake provider).
Service = Callable[[], AbstractAsyncContextManager[object]]


def load_prices(config: GatewayConfig) -> PriceTable:
    """The built-in table (unless ``defaults = false``) with the price file merged over it."""
    prices = PriceTable.default() if config.prices.defaults else PriceTable({})
    path = config.prices_file
    return prices if path is None else prices.merged(PriceTable.from_file(path))


def upstreams(config: GatewayConfig) -> list[Upstream]:
    """``[[upstreams]]`` as :class:`~gatewaykit.Upstream` objects, in the file's order."""
    return [
        Upstream(
            base_url=u.base_url,
            api_key=u.api_key,
            provider=u.provider,
            models=None if u.models is None else frozenset(u.models),
            name=u.name,
        )
        for u in config.upstreams
    ]


def build_app(
    config: GatewayConfig,
    *,
    services: Sequence[Service] = (),
    ops_socket: socket.socket | None = None,
) -> Starlette:
    """The gateway for ``config``; nothing is opened until the app's lifespan starts.

    ``ops_socket``: a listening socket to serve ``/metrics``, ``/livez`` and ``/readyz``
    on (docs/observability.md; needs ``gatewaykit[metrics]``).
    """
    client = default_client()
    prices = load_prices(config)
    ledger: Ledger | None = None
    denials: DenialCounter | None = None
    limiter: RedisRateLimiter | None = None
    outbox: Outbox | None = None
    platform: PlatformMode | None = None
    mode: RequestModeStrategy
    if config.platform is not None:
        mode = platform = PlatformMode(
            base_url=config.platform.url,
            gateway_token=config.platform.token,
            client=client,
            outbox=(outbox := open_outbox(config.platform.outbox)),
            prices=prices,
            default_max_output_tokens=config.platform.default_max_output_tokens,
        )
    else:
        options = config.standalone
        ledger = open_ledger(config.ledger.url)
        if isinstance(ledger, DenialStore):  # both built-in ledgers
            denials = DenialCounter(ledger, interval=config.ledger.denials_flush_interval)
        limiter = redis_limiter(config)
        mode = StandaloneMode(
            ledger,
            prices=prices,
            upstreams=upstreams(config),
            master_key=options.master_key,
            unpriced=options.unpriced,
            missing_usage=options.missing_usage,
            disconnect=options.disconnect,
            hold_ttl=config.ledger.hold_ttl,
            default_max_output_tokens=options.default_max_output_tokens,
            over_budget=options.over_budget,
            min_output_tokens=options.min_output_tokens,
            key_cache_ttl=options.key_cache_ttl,
            default_rpm=options.default_rpm,
            default_tpm=options.default_tpm,
            rate_limits=[
                RateLimit(entry.scope, rpm=entry.rpm, tpm=entry.tpm)
                for entry in config.ratelimit.limits
            ],
            rate_limiter=limiter,
            user_max_concurrent=options.user_max_concurrent,
            teams=options.teams or None,
            budget_headers=options.budget_headers,
            ledger_unavailable=options.ledger_unavailable,
        )
    sweep_interval = config.ledger.sweep_interval or config.ledger.hold_ttl / 4
    metrics: MetricsRecorder | None = None
    if ops_socket is not None:
        from gatewaykit.observability.ops import ops_service

        metrics, serve_ops = ops_service(ops_socket, ledger=ledger, outbox=outbox)
        services = [*services, serve_ops]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Exit order: ledger/outbox, then the upstream client, then the services.
        async with anyio.create_task_group() as tasks, contextlib.AsyncExitStack() as stack:
            for service in services:
                await stack.enter_async_context(service())
            await stack.enter_async_context(client)
            if ledger is not None:
                await ledger.open()
                stack.push_async_callback(ledger.aclose)
                # Expire the holds of crashed requests even on budgets nobody uses again
                # (a reserve reclaims them lazily only on its own budgets).
                sweeper = anyio.CancelScope()
                tasks.start_soon(sweep_periodically, ledger, sweep_interval, sweeper)
                stack.callback(sweeper.cancel)
            if denials is not None:  # inside the ledger: its last flush finds it open
                await stack.enter_async_context(denials)
            if limiter is not None:
                await stack.enter_async_context(limiter)
            if platform is not None:
                await stack.enter_async_context(platform)
            tune_gc(config.server.gc_threshold)  # in each worker, once all is loaded
            yield

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "mode": type(mode).__name__})

    routes: list[BaseRoute] = [Route("/healthz", healthz), *gateway_routes(client=client)]
    master_key = config.standalone.master_key
    if config.admin.enabled and ledger is not None and master_key is not None:
        from gatewaykit.admin import admin_app  # the admin extra: jinja2, itsdangerous

        admin = admin_app(ledger, master_key=master_key, session_ttl=config.admin.session_ttl)
        routes.append(Mount(config.admin.path, admin))
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(
                GatewayMiddleware,
                mode=mode,
                max_body_bytes=config.server.max_body_bytes,
                metrics=metrics,
                denials=denials,
            )
        ],
        lifespan=lifespan,
    )


def redis_limiter(config: GatewayConfig) -> RedisRateLimiter | None:
    """``[ratelimit] redis_url`` as a limiter; redis-py is imported only when one is set."""
    options = config.ratelimit
    if options.redis_url is None:
        return None
    try:
        from gatewaykit.ratelimit.redis import RedisRateLimiter
    except ImportError:
        raise ConfigurationError(
            "[ratelimit] redis_url needs redis-py: pip install 'gatewaykit[redis]'"
        ) from None
    return RedisRateLimiter.from_url(options.redis_url, on_unavailable=options.on_unavailable)


async def sweep_periodically(ledger: Ledger, interval: float, scope: anyio.CancelScope) -> None:
    """Run ``ledger.sweep()`` every ``interval`` seconds until ``scope`` is cancelled."""
    with scope:
        while True:
            await anyio.sleep(interval)
            try:
                await ledger.sweep()
            except GatewayKitError as exc:  # the ledger is down: try again next round
                logger.warning("sweep failed: %s", exc)
