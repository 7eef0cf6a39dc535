"""Interpreter settings for a process that serves the gateway.

A gated request allocates some forty container objects (coroutines, futures, the
settlement, its records) that reference counting frees when the request ends. With many
requests in flight, CPython's default cyclic collector still counts them and collects the
young generation every ~700 allocations, and a full collection now and then walks every
object start-up created — about 15 µs per request at 16 in flight
(docs/performance.md). A request that succeeds leaves no cycle behind, so collecting less
often only delays the rare one (an exception and its traceback, say); with several hundred
requests in flight young collections come back, less often.

:func:`tune_gc` is what the app :func:`gatewaykit.server.build_app` makes — so
``gatewaykit serve`` and the example app — calls once it has started (``[server]
gc_threshold``, 0 to opt out); an app that mounts the middleware itself may call it from
its own lifespan. It changes process-wide state, so ``GatewayMiddleware`` and the modes
never call it.
"""

from __future__ import annotations

import gc

from gatewaykit.errors import ConfigurationError

__all__ = ["DEFAULT_GC_THRESHOLD", "tune_gc"]

#: The young generation's threshold ``tune_gc`` sets by default (CPython's is 700).
DEFAULT_GC_THRESHOLD = 10_000


def tune_gc(threshold: int = DEFAULT_GC_THRESHOLD) -> None:
    """Freeze what exists now and collect the young generation every ``threshold`` net
    allocations.

    Call it after start-up (imports, configuration, open pools): ``gc.freeze()`` moves
    every object alive to a permanent generation that collections no longer walk. The
    older generations keep CPython's thresholds. ``threshold`` 0 leaves the collector as
    it is.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ConfigurationError(f"the GC threshold must be an int ≥ 0, got {threshold!r}")
    if threshold == 0:
        return
    gc.collect()  # start-up's garbage must not become permanent
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
