"""A settlement usable outside a request, for testing your own handlers.

::

    settlement = RecordingSettlement()
    request = gateway_request(settlement, body={"model": "gpt-4o", "messages": []})
    response = await my_handler(request)          # calls get_settlement(request) inside
    assert settlement.calls == ["on_first_chunk", "on_success"]
    assert settlement.outcome.usage == Usage(12, 34)

It touches no ledger: it records every hook call and computes the charge from an optional
:class:`~gatewaykit.pricing.ModelPrice` with the same first-wins state machine as the real
settlements.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import anyio
from starlette.requests import Request
from starlette.types import Message

from gatewaykit.context import SCOPE_KEY, GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.pricing import ModelPrice
from gatewaykit.settlement import (
    RequestEstimate,
    Settlement,
    SettlementOutcome,
    SettlementStatus,
)
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage

__all__ = ["RecordingSettlement", "gateway_request", "gateway_scope"]

_PATHS = {
    WireFormat.OPENAI_CHAT: "/v1/chat/completions",
    WireFormat.ANTHROPIC_MESSAGES: "/v1/messages",
    WireFormat.OPENAI_RESPONSES: "/v1/responses",
    WireFormat.OPENAI_EMBEDDINGS: "/v1/embeddings",
    WireFormat.ANTHROPIC_COUNT_TOKENS: "/v1/messages/count_tokens",
}


class RecordingSettlement(Settlement):
    """Records hook calls in ``calls`` (every call, including ones after the first terminal).

    ``price`` (optional) prices ``on_success`` usage and any usage passed to the other
    hooks; without it every charge is 0. An ``on_error`` before ``on_first_chunk`` is a
    refund, as in the real settlements.
    """

    def __init__(
        self,
        *,
        request_id: str = "req_test",
        estimate: RequestEstimate | None = None,
        price: ModelPrice | None = None,
    ) -> None:
        super().__init__(
            request_id=request_id,
            estimate=estimate
            or RequestEstimate(prompt_tokens=0, max_output_tokens=0, amount=Decimal(0)),
        )
        self.price = price
        self.calls: list[str] = []
        self.heartbeats = 0

    async def on_first_chunk(self) -> None:
        self.calls.append("on_first_chunk")
        await super().on_first_chunk()

    async def on_success(self, usage: Usage) -> SettlementOutcome:
        self.calls.append("on_success")
        return await super().on_success(usage)

    async def on_error(
        self, error: BaseException | str, usage: Usage | None = None
    ) -> SettlementOutcome:
        self.calls.append("on_error")
        return await super().on_error(error, usage)

    async def on_no_usage(self) -> SettlementOutcome:
        self.calls.append("on_no_usage")
        return await super().on_no_usage()

    async def on_incomplete(self, partial: Usage | None = None) -> SettlementOutcome:
        self.calls.append("on_incomplete")
        return await super().on_incomplete(partial)

    async def heartbeat(self) -> None:
        self.heartbeats += 1

    async def _finish(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        usage = usage or (None if status == "success" else self.partial_usage)
        refunded = usage is None or (status == "error" and not self.committed)
        charged = Decimal(0)
        if not refunded and usage is not None and self.price is not None:
            charged = self.price.cost(usage)
        return SettlementOutcome(
            status=status, charged=charged, usage=usage, refunded=refunded, error=error
        )


def gateway_scope(
    settlement: Settlement | None = None,
    *,
    body: Mapping[str, Any] | None = None,
    format: WireFormat | None = WireFormat.OPENAI_CHAT,
    path: str | None = None,
    headers: Mapping[str, str] | None = None,
    upstream: Upstream | None = None,
    user_id: str | None = "test-user",
) -> dict[str, Any]:
    """An ASGI HTTP scope as GatewayMiddleware would hand it to a handler.

    Wrap it in ``starlette.requests.Request`` (or pass it to an ASGI app with your own
    ``receive``); ``get_settlement`` then returns ``settlement`` (a fresh
    :class:`RecordingSettlement` when omitted).
    """
    settlement = settlement or RecordingSettlement()
    body = dict(body or {})
    model = str(body.get("model", "test-model"))
    if upstream is None:
        anthropic = format is not None and not format.is_openai
        upstream = Upstream(
            "http://upstream.test" if anthropic else "http://upstream.test/v1",
            provider="anthropic" if anthropic else "openai",
        )
    context = GatewayContext(
        request_id=settlement.request_id,
        settlement=settlement,
        format=format,
        model=model,
        stream=bool(body.get("stream", False)),
        body=body,
        attempts=(Attempt(attempt_id="1", upstream=upstream, model=model),),
        user_id=user_id,
    )
    if path is None:
        path = _PATHS[format] if format is not None else "/"
    raw_headers = {"content-type": "application/json", **(headers or {})}
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in raw_headers.items()
        ],
        "client": ("127.0.0.1", 0),
        "server": ("testserver", 80),
        "state": {},
        SCOPE_KEY: context,
    }


def gateway_request(
    settlement: Settlement | None = None,
    *,
    body: Mapping[str, Any] | None = None,
    format: WireFormat | None = WireFormat.OPENAI_CHAT,
    path: str | None = None,
    headers: Mapping[str, str] | None = None,
    upstream: Upstream | None = None,
    user_id: str | None = "test-user",
) -> Request:
    """A Starlette ``Request`` over :func:`gateway_scope` whose body is ``body`` as JSON."""
    scope = gateway_scope(
        settlement,
        body=body,
        format=format,
        path=path,
        headers=headers,
        upstream=upstream,
        user_id=user_id,
    )
    payload = json.dumps(dict(body or {})).encode()
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    return Request(scope, receive)
