"""The background sender: delivers outbox items until the control plane acknowledges them.

It is an async context manager the host enters in its lifespan; its work runs in an anyio
task group it owns, so no task outlives it. Delivery is ``POST`` with
``Idempotency-Key: <item key>``; failures back off exponentially with jitter. On exit it
stops the loop and flushes what is queued within ``shutdown_timeout``; whatever is still
undelivered stays in the store and goes out after the next start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import anyio

from gatewaykit.errors import ConfigurationError, UpstreamError, describe_error
from gatewaykit.http import Timeouts, as_upstream_client, post
from gatewaykit.outbox.base import Outbox, OutboxItem
from gatewaykit.resource import BackgroundWorker
from gatewaykit.urls import redact

__all__ = ["OutboxSender", "RetryPolicy", "is_permanent_rejection", "parse_retry_after"]

logger = logging.getLogger("gatewaykit.outbox")


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter between delivery attempts of one item.

    After the n-th failure the item waits ``min(max_delay, initial_delay * multiplier**(n-1))``
    seconds, shortened by a random fraction of up to ``jitter`` (so many gateways that lost
    the control plane at once do not come back in lock-step). A ``Retry-After`` from the
    control plane lengthens the wait, up to ``max_retry_after``. Items are retried forever:
    a report is dropped only by an explicit permanent rejection (see the protocol docs).
    """

    initial_delay: float = 0.5
    max_delay: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_delay <= self.max_delay:
            raise ConfigurationError("RetryPolicy needs 0 < initial_delay <= max_delay")
        if self.multiplier < 1:
            raise ConfigurationError("RetryPolicy.multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("RetryPolicy.jitter must be between 0 and 1")
        if self.max_retry_after < 0:
            raise ConfigurationError("RetryPolicy.max_retry_after must not be negative")

    def delay(
        self,
        failures: int,
        *,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait after the ``failures``-th failed delivery (1-based)."""
        exponent = min(max(failures, 1) - 1, 64)
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier**exponent)
        wait = ceiling * (1 - self.jitter * (rng or random).random())
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


def is_permanent_rejection(status: int) -> bool:
    """A 4xx says the report itself is refused, so retrying it is futile — except:

    401 (the control plane refused *this gateway's* token: a configuration problem, fixed by
    the operator, after which every queued report must still go out), and 408/409/425/429
    (try again later).
    """
    return 400 <= status < 500 and status not in (401, 408, 409, 425, 429)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


class OutboxSender(BackgroundWorker):
    """Delivers ``outbox`` items to ``{base_url}{path}`` with the gateway token.

    ``client`` is an upstream client (:func:`gatewaykit.http.default_client`, or an
    ``httpx.AsyncClient`` / ``httpx2.AsyncClient``).
    ``request_timeout`` bounds each POST; ``concurrency`` bounds POSTs in flight; ``lease``
    (default ``request_timeout + 5``) is how long a claimed item is hidden from other
    senders. ``poll_interval`` is the longest the sender sleeps without looking at the
    store (other processes may enqueue into a shared store). ``retry_on_start`` makes
    every queued item due when the sender starts, so a restart retries at once.

    Observability: ``await outbox.size()``, ``outbox.oldest_age()``, ``outbox.dead_count()``,
    and the counters ``delivered``, ``failed_attempts`` and ``parked`` of this sender.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        client: Any,
        base_url: str,
        gateway_token: str,
        path: str = "/v1/usage",
        retry: RetryPolicy | None = None,
        request_timeout: float = 10.0,
        concurrency: int = 8,
        lease: float | None = None,
        shutdown_timeout: float = 5.0,
        poll_interval: float = 5.0,
        retry_on_start: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"control plane base_url must be http(s): {redact(base_url)!r}"
            )
        if not gateway_token:
            raise ConfigurationError("the gateway token must not be empty")
        if concurrency < 1 or request_timeout <= 0 or shutdown_timeout < 0 or poll_interval <= 0:
            raise ConfigurationError(
                "concurrency, request_timeout and poll_interval must be positive and "
                "shutdown_timeout not negative"
            )
        self.outbox = outbox
        self.url = base_url.rstrip("/") + path
        self._shown_url = redact(self.url)  # for logs and the repr
        self.retry = retry or RetryPolicy()
        self.request_timeout = request_timeout
        self.shutdown_timeout = shutdown_timeout
        self._client = as_upstream_client(client)
        t = request_timeout
        self._timeouts = Timeouts(connect=t, read=t, write=t, pool=t)
        self._token = gateway_token
        self._concurrency = concurrency
        self._lease = request_timeout + 5.0 if lease is None else lease
        self._poll_interval = poll_interval
        self._retry_on_start = retry_on_start
        self._rng = rng or random.Random()
        self._wakeup = anyio.Event()
        self._failing = False
        self.delivered = 0
        self.failed_attempts = 0
        self.parked = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<OutboxSender {self._shown_url} {state}>"

    def notify(self) -> None:
        """Something was enqueued: look at the store now instead of at the next poll."""
        self._wakeup.set()

    # -- lifecycle ---------------------------------------------------------------------
    async def _starting(self) -> None:
        if self._retry_on_start:
            try:
                await self.outbox.reschedule_all()
            except Exception as exc:
                logger.warning(
                    "outbox: could not reschedule queued reports: %s", describe_error(exc)
                )

    async def _run(self) -> None:
        await self._pump(False)

    async def _stopped(self) -> None:
        if await self.flush(self.shutdown_timeout):
            return
        left = await self._safe_size()
        logger.warning(
            "outbox: %s report(s) still undelivered at shutdown; they stay queued and are "
            "sent after the next start",
            "?" if left is None else left,
        )

    async def flush(self, within: float) -> bool:
        """Deliver everything queued now, ignoring backoff, for at most ``within`` seconds.

        Returns True when the queue is empty. Safe while the background loop runs.
        """
        try:
            await self.outbox.reschedule_all()
        except Exception as exc:
            logger.warning("outbox: flush could not read the store: %s", describe_error(exc))
            return False
        with anyio.move_on_after(within):
            await self._pump(True)
        return await self._safe_size() == 0

    async def _safe_size(self) -> int | None:
        try:
            return await self.outbox.size()
        except Exception:
            return None

    # -- the loop ----------------------------------------------------------------------
    async def _pump(self, drain: bool) -> None:
        """Keep up to ``concurrency`` deliveries in flight; sleep until the next item is due,
        a delivery finishes, or a notify. A slow POST holds only its own slot.

        ``drain``: return once the store is empty instead of running forever.
        """
        in_flight = 0

        async def deliver(item: OutboxItem) -> None:
            nonlocal in_flight
            try:
                await self._deliver(item)
            finally:
                in_flight -= 1
                self._wakeup.set()

        async with anyio.create_task_group() as tg:
            while True:
                self._wakeup = anyio.Event()
                wait = self._poll_interval
                try:
                    free = self._concurrency - in_flight
                    if free > 0:
                        items = await self.outbox.claim(limit=free, lease=self._lease)
                        for item in items:
                            in_flight += 1
                            tg.start_soon(deliver, item)
                        if items:
                            continue
                        if drain and in_flight == 0 and await self.outbox.size() == 0:
                            return
                        due_in = await self.outbox.next_due_in()
                        if due_in is not None:
                            wait = min(wait, due_in)
                except Exception as exc:
                    logger.warning(
                        "outbox: store error, retrying in %.1fs: %s", wait, describe_error(exc)
                    )
                with anyio.move_on_after(wait):
                    await self._wakeup.wait()

    async def _deliver(self, item: OutboxItem) -> None:
        headers = {
            "authorization": f"Bearer {self._token}",
            "idempotency-key": item.key,
            "content-type": "application/json",
        }
        body = json.dumps(dict(item.payload), separators=(",", ":")).encode()
        try:
            with anyio.fail_after(self.request_timeout):
                status, answer_headers, answer = await post(
                    self._client, self.url, body, headers=headers, timeouts=self._timeouts
                )
        except (UpstreamError, TimeoutError) as exc:
            await self._failed(item, describe_error(exc), None)
            return
        if not (200 <= status < 300 or is_permanent_rejection(status)):
            retry_after = parse_retry_after(answer_headers.get("retry-after"))
            await self._failed(item, f"HTTP {status}: {_snippet(answer)}", retry_after)
            return
        with anyio.CancelScope(shield=True):
            try:
                if 200 <= status < 300:
                    await self.outbox.ack(item.key)
                    self.delivered += 1
                    if self._failing:
                        self._failing = False
                        logger.warning("outbox: deliveries to %s succeed again", self._shown_url)
                else:
                    reason = f"HTTP {status}: {_snippet(answer)}"
                    await self.outbox.park(item.key, error=reason)
                    self.parked += 1
                    logger.error(
                        "outbox: control plane rejected report %s for good (%s); parked as a "
                        "dead letter (see Outbox.dead_letters / requeue_dead)",
                        item.key,
                        reason,
                    )
            except Exception as exc:
                # The lease runs out and the item is delivered again: idempotent, never lost.
                logger.warning(
                    "outbox: could not record the outcome of %s: %s", item.key, describe_error(exc)
                )

    async def _failed(self, item: OutboxItem, reason: str, retry_after: float | None) -> None:
        delay = self.retry.delay(item.attempts + 1, retry_after=retry_after, rng=self._rng)
        if not self._failing:
            # One warning per outage, not one per report and retry.
            self._failing = True
            logger.warning(
                "outbox: cannot deliver usage reports to %s (%s); they stay queued and are "
                "retried with backoff",
                self._shown_url,
                reason,
            )
        logger.debug(
            "outbox: delivery of %s failed (attempt %d: %s); retrying in %.2fs",
            item.key,
            item.attempts + 1,
            reason,
            delay,
        )
        with anyio.CancelScope(shield=True):
            try:
                await self.outbox.retry_later(item.key, delay=delay, error=reason)
            except Exception as exc:
                # The lease runs out instead and the item comes round again.
                logger.warning("outbox: could not reschedule %s: %s", item.key, describe_error(exc))
        self.failed_attempts += 1


def _snippet(answer: bytes) -> str:
    text = " ".join(answer.decode("utf-8", "replace").split())
    return text[:200] + ("…" if len(text) > 200 else "")
