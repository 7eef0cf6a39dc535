"""PlatformMode: a remote control plane owns users, keys, budgets and provider credentials.

Per request the gateway makes one *resolve* call (the user's token, the model and an
estimate → the upstream attempts to try, in order) and, when the request ends, one *usage
report* (keyed ``<request_id>:<attempt_id>``). Reports are written to a durable
:class:`~gatewaykit.outbox.Outbox` before the settlement returns and delivered by a
background :class:`~gatewaykit.outbox.OutboxSender` until the control plane acknowledges
them, so a report survives control-plane outages, crashes and restarts. The wire protocol
is specified in docs/platform-protocol.md.

Exactly one report per admitted request, even across a crash: before a request goes
upstream its admission is recorded in the outbox's store (one group-committed write), and
its report is queued and the admission closed in one transaction. Admissions left open by
a process that died become ``incomplete`` reports (see
:class:`~gatewaykit.outbox.AdmissionKeeper`). A resolve whose outcome the gateway does not
know (no answer in time, the connection lost after sending, a 5xx, an unusable 200) may
still have been admitted: it is reported ``released`` (attempt id ``"-"``).

The host enters the mode in its lifespan; that opens the outbox and runs the sender::

    outbox = open_outbox("sqlite:///outbox.db")
    mode = PlatformMode(base_url=..., gateway_token=..., client=client, outbox=outbox)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with mode:
            yield
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import anyio

from gatewaykit.context import GatewayContext
from gatewaykit.errors import ConfigurationError, ErrorKind, RequestRejected, describe_error
from gatewaykit.http import as_upstream_client
from gatewaykit.modes.admission import (
    check_default_max_output_tokens,
    credential,
    endpoint_name,
    missing_credential,
)
from gatewaykit.modes.admission import estimate as held_estimate
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.platform_messages import MalformedAnswer, parse_attempts, unavailable
from gatewaykit.modes.platform_reports import (
    RELEASE_ATTEMPT_ID,
    ReportStatus,
    admission_details,
    recovered_report,
    released_report,
    usage_report,
)
from gatewaykit.modes.platform_resolve import ResolveClient
from gatewaykit.modes.platform_settlement import ATTEMPT_ID_HEADER, PlatformSettlement
from gatewaykit.outbox.admissions import AdmissionKeeper
from gatewaykit.outbox.base import AdmissionStore, Outbox
from gatewaykit.outbox.sender import OutboxSender, RetryPolicy
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.resource import AsyncResource
from gatewaykit.settlement import RequestEstimate
from gatewaykit.urls import redact

__all__ = [
    "ATTEMPT_ID_HEADER",
    "RELEASE_ATTEMPT_ID",
    "PlatformMode",
    "PlatformSettlement",
    "ReportStatus",
    "admission_details",
    "recovered_report",
    "released_report",
    "usage_report",
]

logger = logging.getLogger("gatewaykit.platform")


class PlatformMode(AsyncResource):
    """Admit requests by asking a control plane; report usage through a durable outbox.

    ``base_url`` is the control plane's root (``{base_url}/v1/resolve``,
    ``{base_url}/v1/usage``); ``gateway_token`` authenticates this gateway to it (sent as
    ``Authorization: Bearer``; never logged). ``client`` is the injected
    upstream client used for both calls (:func:`gatewaykit.http.default_client`, or an
    ``httpx``/``httpx2`` ``AsyncClient``). ``outbox`` holds the
    usage reports (``open_outbox("sqlite:///outbox.db")``); entering the mode opens it if
    needed and closes it on exit if it opened it.

    ``prices`` (optional): with a price table the resolve call carries an estimate in USD
    (every prompt token at the dearest input rate plus the request's max output tokens,
    else ``default_max_output_tokens``); without one, or for an unpriced model, the
    estimate is ``"0"`` and the control plane prices the request itself.

    ``resolve_timeout`` bounds the whole resolve call; past it the request fails 503 (and
    is reported ``released``, in case the control plane admitted it after all).
    ``retry``, ``report_timeout``, ``report_concurrency`` and ``shutdown_timeout``
    configure the outbox sender (see :class:`~gatewaykit.outbox.OutboxSender`).

    ``instance_id`` and ``admission_lease`` configure the record of open admissions (see
    :class:`~gatewaykit.outbox.AdmissionKeeper`): this process heart-beats every
    ``admission_lease / 3`` seconds, and the open requests of a process that stopped
    beating for ``admission_lease`` seconds are reported ``incomplete`` by whichever
    process sharing the outbox notices first. The instance id is random per start unless
    given; give a stable one only if no two live processes can share it — its admissions
    from an earlier run are then reported at start, without waiting for the lease. An
    outbox that does not implement :class:`~gatewaykit.outbox.AdmissionStore` keeps no
    admissions (a warning at start says so).
    """

    def __init__(
        self,
        *,
        base_url: str,
        gateway_token: str,
        client: Any,
        outbox: Outbox,
        prices: PriceTable | Mapping[str, ModelPrice] | None = None,
        default_max_output_tokens: int = 4096,
        resolve_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        report_timeout: float = 10.0,
        report_concurrency: int = 8,
        shutdown_timeout: float = 5.0,
        instance_id: str | None = None,
        admission_lease: float = 30.0,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            shown = redact(base_url) if isinstance(base_url, str) else base_url
            raise ConfigurationError(f"control plane base_url must be an http(s) URL: {shown!r}")
        if not isinstance(gateway_token, str) or not gateway_token.strip():
            raise ConfigurationError("gateway_token must be a non-empty string")
        if not isinstance(outbox, Outbox):
            raise ConfigurationError("outbox must implement gatewaykit.outbox.Outbox")
        if prices is not None and not isinstance(prices, PriceTable):
            if not isinstance(prices, Mapping) or not all(
                isinstance(p, ModelPrice) for p in prices.values()
            ):
                raise ConfigurationError(
                    "prices must be a PriceTable, a mapping of ModelPrice, or None"
                )
            prices = PriceTable(prices)
        check_default_max_output_tokens(default_max_output_tokens)
        if not resolve_timeout > 0:
            raise ConfigurationError("resolve_timeout must be a positive number of seconds")
        self.base_url = base_url.rstrip("/")
        self.outbox = outbox
        self.prices: PriceTable | None = prices
        self.default_max_output_tokens = default_max_output_tokens
        self.resolve_timeout = float(resolve_timeout)
        self._client = as_upstream_client(client)
        self._resolver = ResolveClient(
            self._client,
            base_url=self.base_url,
            gateway_token=gateway_token,
            timeout=self.resolve_timeout,
            release=self._release,
        )
        self.sender = OutboxSender(
            outbox,
            client=self._client,
            base_url=self.base_url,
            gateway_token=gateway_token,
            path="/v1/usage",
            retry=retry,
            request_timeout=report_timeout,
            concurrency=report_concurrency,
            shutdown_timeout=shutdown_timeout,
        )
        self.admissions: AdmissionKeeper | None = None
        if isinstance(outbox, AdmissionStore):
            self.admissions = AdmissionKeeper(
                outbox,
                report=recovered_report,
                instance_id=instance_id,
                lease=admission_lease,
                on_recovered=lambda keys: self.sender.notify(),
            )
        self._opened_outbox = False
        self._stopping = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PlatformMode {redact(self.base_url)} {state}>"

    @property
    def running(self) -> bool:
        return self.sender.running and not self._stopping

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Open the outbox (unless the host did), start the sender and the keeper."""
        if not self.outbox.is_open:
            await self.outbox.open()
            self._opened_outbox = True
        try:
            await self.sender.open()
            try:
                # Reports what a dead process left open (the sender is woken for them).
                await self._start_admissions()
            except BaseException:
                await self.sender.aclose()
                raise
        except BaseException:
            await self._close_outbox()
            raise
        self._stopping = False

    async def aclose(self) -> None:
        """Refuse new requests, report the open ones incomplete, flush, close the outbox."""
        self._stopping = True  # refuse new requests: their admissions would outlive the mode
        try:
            # Requests still open now are reported incomplete, then the sender flushes.
            await self._stop_admissions()
            await self.sender.aclose()
        finally:
            await self._close_outbox()

    async def _start_admissions(self) -> None:
        if self.admissions is not None:
            await self.admissions.open()
        else:
            logger.warning(
                "%r does not keep open admissions (gatewaykit.outbox.AdmissionStore): the "
                "requests in flight when this process dies will never be reported",
                self.outbox,
            )

    async def _stop_admissions(self) -> None:
        # Task groups unwind in reverse: the keeper (entered last) stops first.
        if self.admissions is not None:
            await self.admissions.aclose()

    async def _close_outbox(self) -> None:
        if self._opened_outbox:
            self._opened_outbox = False
            with anyio.CancelScope(shield=True):
                await self.outbox.aclose()

    # -- admission ---------------------------------------------------------------------
    async def authenticate(self, headers: Mapping[str, str]) -> None:
        """401 when the request carries no credential (checked before a bad body's 400)."""
        if credential(headers) is None:
            raise missing_credential()

    async def resolve(self, request: GatewayRequest) -> GatewayContext:
        token = credential(request.headers)
        if token is None:
            raise missing_credential()
        if self._stopping:
            logger.info("refusing request %s: the gateway is shutting down", request.request_id)
            raise RequestRejected(ErrorKind.UNAVAILABLE, "the gateway is shutting down; retry")
        if not self.running or not self.outbox.is_open:
            logger.error(
                "PlatformMode is not running: enter `async with mode:` in the app's lifespan; "
                "refusing request %s so that its usage report cannot be lost",
                request.request_id,
            )
            raise RequestRejected(ErrorKind.UNAVAILABLE, "the gateway is not ready; retry shortly")
        price = None if self.prices is None else self.prices.lookup(request.parsed.model)
        estimate = held_estimate(
            request, price, default_max_output_tokens=self.default_max_output_tokens
        )
        endpoint = endpoint_name(request)
        payload = {
            "request_id": request.request_id,
            "user_token": token,
            "model": request.parsed.model,
            "endpoint": endpoint,
            "estimate_usd": str(estimate.amount),
        }
        answer = await self._resolver.post(request.request_id, payload, estimate)
        try:
            user_id, attempts = parse_attempts(answer, request)
        except MalformedAnswer as exc:
            logger.warning("resolve of %s: malformed answer: %s", request.request_id, exc)
            # A 200 is an admission from the control plane's side: give it back.
            await self._release(
                request.request_id, f"the resolve answer was unusable ({exc})", estimate
            )
            raise unavailable(f"the control plane gave a malformed answer ({exc})") from None
        admitted = await self._record_admission(
            request.request_id,
            admission_details(attempts, request.parsed.model, endpoint, estimate),
            estimate,
        )
        settlement = PlatformSettlement(
            mode=self,
            request_id=request.request_id,
            estimate=estimate,
            attempts=attempts,
            admitted=admitted,
        )
        context = GatewayContext(
            request_id=request.request_id,
            settlement=settlement,
            format=request.format,
            model=request.parsed.model,
            stream=request.parsed.stream,
            body=request.body,
            raw_body=request.raw_body,
            attempts=attempts,
            user_id=user_id,
        )
        context.response_headers[ATTEMPT_ID_HEADER] = attempts[0].attempt_id
        settlement.bind(context)
        return context

    # -- admissions and releases -------------------------------------------------------
    async def _record_admission(
        self, request_id: str, details: Mapping[str, Any], estimate: RequestEstimate
    ) -> bool:
        """Durably note that ``request_id`` was admitted, before anything goes upstream.

        True when noted; False when the outbox keeps no admissions. A request whose
        admission cannot be noted is refused 503 (and released): its report could not be
        guaranteed.
        """
        if self.admissions is None:
            return False
        try:
            with anyio.CancelScope(shield=True):
                noted = await self.admissions.admit(request_id, details)
        except Exception as exc:
            logger.error(
                "could not record the admission of %s (%s); refusing the request",
                request_id,
                describe_error(exc),
            )
            await self._release(request_id, "the gateway could not record the admission", estimate)
            raise unavailable("the gateway cannot record usage right now") from None
        if not noted:
            # Not released: the open admission with this id belongs to another request.
            logger.error("request id %s is already admitted and open; refusing it", request_id)
            raise unavailable("the gateway cannot record usage right now")
        return True

    async def _release(self, request_id: str, reason: str, estimate: RequestEstimate) -> None:
        """Queue a ``released`` report: the control plane may have admitted ``request_id``,
        and it was never served. Never raises (the log keeps a report it cannot store)."""
        key, report = released_report(request_id, reason, estimate.prompt_tokens)
        with anyio.CancelScope(shield=True):
            try:
                await self.enqueue_report(key, report)
            except Exception:
                logger.exception(
                    "could not store usage report %s; report: %s",
                    key,
                    json.dumps(report, separators=(",", ":")),
                )

    # -- reporting ---------------------------------------------------------------------
    async def enqueue_report(self, key: str, payload: Mapping[str, Any]) -> None:
        """Durably queue one usage report and wake the sender."""
        await self.outbox.enqueue(key, payload)
        self.sender.notify()

    async def complete_admission(
        self, request_id: str, key: str, payload: Mapping[str, Any]
    ) -> bool:
        """Queue the report of an admitted request and close its admission, together.

        False (nothing queued) when the admission was already closed: another process
        found this one's heart-beat stale and reported the request ``incomplete``.
        """
        assert isinstance(self.outbox, AdmissionStore)
        completed = await self.outbox.complete(request_id, key, payload)
        self.sender.notify()
        return completed
