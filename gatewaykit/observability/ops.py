"""The operator's endpoints on a port of their own: ``/metrics``, ``/livez``, ``/readyz``.

Used by the app factory (:func:`gatewaykit.server.build_app`) when it is given a socket
for them, as the example app's ``--ops-port`` does. Serving them apart from the API keeps
them from clients, whatever the API port is exposed to.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

import anyio
from starlette.applications import Starlette
from starlette.routing import Route

from gatewaykit.ledger.base import Ledger
from gatewaykit.observability.health import HealthApp
from gatewaykit.observability.prometheus import MetricsApp, MetricsBase, PrometheusMetrics
from gatewaykit.outbox.base import Outbox

__all__ = ["ops_app", "ops_service"]


def ops_app(metrics: MetricsBase, health: HealthApp) -> Starlette:
    """``GET /metrics`` (``metrics``), ``/livez`` and ``/readyz`` (``health``)."""
    return Starlette(
        routes=[
            Route("/metrics", MetricsApp(metrics)),
            Route("/livez", health),
            Route("/readyz", health),
        ]
    )


def ops_service(
    sock: socket.socket, *, ledger: Ledger | None = None, outbox: Outbox | None = None
) -> tuple[PrometheusMetrics, Callable[[], AbstractAsyncContextManager[None]]]:
    """A recorder for the middleware, and a service serving it (and the health checks of
    ``ledger`` or ``outbox``) on ``sock`` under uvicorn for the app's lifetime."""
    metrics = PrometheusMetrics()
    if outbox is not None:
        metrics.watch_outbox(outbox)
    app = ops_app(metrics, HealthApp(ledger=ledger, outbox=outbox))

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[None]:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # the main server handles the signals

        # log_config/log_level None: leave the main server's logging as it is.
        config = uvicorn.Config(app, log_config=None, log_level=None, lifespan="off")
        server = Server(config)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve, [sock])
            try:
                yield
            finally:
                server.should_exit = True

    return metrics, serve
