"""StandaloneMode and stored context (OpenAI responses continuing a stored response or
conversation), at the mode's own seam: ``resolve`` then the settlement's hooks."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError, ErrorKind, LedgerUnavailableError, RequestRejected
from gatewaykit.ledger.base import Ledger
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.standalone import StandaloneMode, StandaloneSettlement
from gatewaykit.parsing import parse_request
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.usage import Usage
from tests.middleware.conftest import MakeKey, bearer
from tests.middleware.fake_ledger import FakeLedger

pytestmark = pytest.mark.anyio

MICRO = Decimal("0.000001")
PRICES = PriceTable(
    {
        "gpt-test": ModelPrice(Decimal(1), Decimal(2), context_window=1000),
        "gpt-nowindow": ModelPrice(Decimal(1), Decimal(2)),
    }
)
_ids = iter(range(10**6))


def request(
    key: str, body: dict[str, Any], fmt: WireFormat = WireFormat.OPENAI_RESPONSES
) -> GatewayRequest:
    body = {"model": "gpt-test", "max_output_tokens": 10, **body}
    if fmt is WireFormat.OPENAI_RESPONSES:
        body.setdefault("input", "abcd")  # one token
    else:
        body.setdefault("messages", [{"role": "user", "content": "abcd"}])
        body.pop("max_output_tokens")
        body["max_tokens"] = 10
    parsed = parse_request(fmt, body)
    return GatewayRequest(
        request_id=f"req_{next(_ids)}",
        path="/v1/responses",
        format=fmt,
        headers=bearer(key),
        body=body,
        raw_body=json.dumps(body).encode(),
        parsed=parsed,
    )


@pytest.fixture
def mode(make_mode: Callable[..., StandaloneMode]) -> Callable[..., StandaloneMode]:
    def make(**options: Any) -> StandaloneMode:
        options.setdefault("prices", PRICES)
        return make_mode(**options)

    return make


async def serve(
    mode: StandaloneMode, req: GatewayRequest, response_id: str | None, usage: Usage
) -> StandaloneSettlement:
    """Admit ``req`` and settle it as a success that created ``response_id``."""
    context = await mode.resolve(req)
    settlement = context.settlement
    assert isinstance(settlement, StandaloneSettlement)
    await settlement.on_first_chunk()
    if response_id is not None:
        settlement.note_response(response_id)
    await settlement.on_success(usage)
    return settlement


async def test_a_served_response_is_remembered_and_continued(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    m = mode()
    first = await serve(m, request(key, {}), "resp_1", Usage(300, 50, cache_read_tokens=20))
    assert first.estimate.prompt_tokens == 1
    assert await ledger.response_context("resp_1", "user:alice") == 370
    context = await m.resolve(request(key, {"previous_response_id": "resp_1"}))
    estimate = context.settlement.estimate
    assert estimate.prompt_tokens == 1 + 370
    assert estimate.amount == (371 + 2 * 10) * MICRO
    await context.settlement.on_error("never sent")  # refunded


async def test_other_formats_ignore_the_field(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    m = mode()
    body = {"previous_response_id": "resp_x", "model": "gpt-test"}
    context = await m.resolve(request(key, body, WireFormat.OPENAI_CHAT))
    assert context.settlement.estimate.prompt_tokens == 1
    await context.settlement.on_first_chunk()
    context.settlement.note_response("chatcmpl-1")
    await context.settlement.on_success(Usage(1, 1))
    assert await ledger.response_context("chatcmpl-1", "user:alice") is None


async def test_the_owner_is_the_user_across_their_keys(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    first_key, _ = await make_key("alice")
    second_key, _ = await make_key("alice")
    bobs, _ = await make_key("bob")
    m = mode()
    await serve(m, request(first_key, {}), "resp_a", Usage(100, 10))
    mine = await m.resolve(request(second_key, {"previous_response_id": "resp_a"}))
    assert mine.settlement.estimate.prompt_tokens == 1 + 110
    theirs = await m.resolve(request(bobs, {"previous_response_id": "resp_a"}))
    assert theirs.settlement.estimate.prompt_tokens == 1 + 1000  # the whole window
    for context in (mine, theirs):
        await context.settlement.on_error("never sent")


async def test_unknown_ids_under_each_policy(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    lax, strict = mode(), mode(unknown_response_context="reject")
    context = await lax.resolve(request(key, {"conversation": {"id": "conv_x"}}))
    assert context.settlement.estimate.prompt_tokens == 1 + 1000
    await context.settlement.on_error("never sent")
    with pytest.raises(RequestRejected) as info:
        await strict.resolve(request(key, {"conversation": "conv_x"}))
    assert info.value.status == 400
    assert info.value.details["code"] == "unknown_conversation"
    with pytest.raises(RequestRejected) as info:
        await lax.resolve(request(key, {"model": "gpt-nowindow", "previous_response_id": "r"}))
    assert info.value.details["code"] == "unknown_previous_response"
    # Nothing was held by the refusals.
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.held == 0


async def test_the_400_beats_403_429_404_and_402(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice", allowed_models=("gpt-other",))
    strict = mode(unknown_response_context="reject", upstreams=())
    await ledger.set_budget("user:alice", limit=Decimal(0))
    with pytest.raises(RequestRejected) as info:
        await strict.resolve(request(key, {"previous_response_id": "resp_x"}))
    assert info.value.kind is ErrorKind.INVALID_REQUEST


async def test_unpriced_models_hold_nothing_but_the_reject_policy_holds(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    allow = mode(unpriced="allow")
    context = await allow.resolve(request(key, {"model": "free", "previous_response_id": "r"}))
    assert context.settlement.estimate.amount == 0
    await context.settlement.on_error("never sent")
    strict = mode(unpriced="allow", unknown_response_context="reject")
    with pytest.raises(RequestRejected):
        await strict.resolve(request(key, {"model": "free", "previous_response_id": "r"}))


async def test_only_a_success_is_remembered_and_not_when_unstored(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    m = mode()
    await serve(m, request(key, {"store": False}), "resp_unstored", Usage(5, 5))
    assert await ledger.response_context("resp_unstored", "user:alice") is None
    context = await m.resolve(request(key, {}))
    await context.settlement.on_first_chunk()
    context.settlement.note_response("resp_cut")
    await context.settlement.on_incomplete(Usage(5, 1))
    assert await ledger.response_context("resp_cut", "user:alice") is None
    # A conversation turn that is not stored still grows the conversation.
    await serve(m, request(key, {"store": False, "conversation": "conv_1"}), "r9", Usage(7, 3))
    assert await ledger.response_context("conv_1", "user:alice") == 10
    assert await ledger.response_context("r9", "user:alice") is None


async def test_ledger_outage_during_the_lookup(
    ledger: Ledger, mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    if not isinstance(ledger, FakeLedger):
        pytest.skip("outage is simulated with the fake ledger")
    key, _ = await make_key("alice")
    closed = mode()
    body = {"previous_response_id": "resp_1"}
    await closed.authenticate(bearer(key))  # cache the key: only the lookup fails
    ledger.down = True
    with pytest.raises(LedgerUnavailableError):
        await closed.resolve(request(key, body))
    # fail_open admits (without a hold), counting the window, never refusing for it.
    ledger.down = False
    opened = mode(ledger_unavailable="fail_open", unknown_response_context="reject")
    await opened.authenticate(bearer(key))
    ledger.down = True
    context = await opened.resolve(request(key, body))
    assert context.settlement.estimate.prompt_tokens == 1 + 1000
    ledger.down = False
    await context.settlement.on_error("never sent")


async def test_options_are_checked(make_mode: Callable[..., StandaloneMode]) -> None:
    with pytest.raises(ConfigurationError, match="unknown_response_context"):
        make_mode(unknown_response_context="refuse")
    with pytest.raises(ConfigurationError):
        make_mode(response_context_ttl=0)
    mode = make_mode(response_context_ttl=3600)
    assert (mode.response_context_ttl, mode.unknown_response_context) == (3600, "context_window")
