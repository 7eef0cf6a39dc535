"""StandaloneSettlement against a ledger, one policy path at a time."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anyio
import pytest

from gatewaykit.ledger.base import HoldState, Ledger
from gatewaykit.modes.standalone import StandaloneSettlement
from gatewaykit.pricing import ModelPrice
from gatewaykit.settlement import (
    RequestEstimate,
    Settlement,
    SettlementOutcome,
    SettlementStatus,
)
from gatewaykit.usage import MAX_TOKENS, Usage, UsageSource
from tests.middleware.conftest import PRICES, open_backend
from tests.middleware.fake_ledger import FakeLedger

pytestmark = pytest.mark.anyio
MICRO = Decimal("0.000001")
ESTIMATE = RequestEstimate(prompt_tokens=10, max_output_tokens=20, amount=50 * MICRO)


async def settlement(
    ledger: Ledger, hold_id: str = "req_1", **options: Any
) -> StandaloneSettlement:
    await ledger.reserve(hold_id, ["user:alice"], ESTIMATE.amount, ttl=5)
    options.setdefault("price", PRICES["gpt-test"])
    return StandaloneSettlement(
        ledger,
        request_id=hold_id,
        estimate=ESTIMATE,
        model="gpt-test",
        endpoint="chat.completions",
        user="alice",
        **options,
    )


async def test_no_usage_estimate_prefers_the_providers_partial_counts(ledger: Ledger) -> None:
    s = await settlement(ledger)
    s.note_upstream_contacted()
    s.note_usage(Usage(input_tokens=30, cache_read_tokens=5, source=UsageSource.PARTIAL))
    s.note_output(10)  # 3 tokens
    outcome = await s.on_no_usage()
    assert outcome.usage == Usage(30, 3, 5, 0, UsageSource.ESTIMATED)
    assert outcome.charged == (30 + 6) * MICRO + Decimal("0.000005")
    (record,) = await ledger.usage()
    assert (record.status, record.usage_source, record.cache_read_tokens) == (
        "no_usage",
        "estimated",
        5,
    )


async def test_an_overrun_is_charged_and_recorded(ledger: Ledger) -> None:
    s = await settlement(ledger)
    outcome = await s.on_success(Usage(1000, 1000))
    assert outcome.charged == 3000 * MICRO
    hold = await ledger.get_hold("req_1")
    assert hold is not None
    assert (hold.state, hold.charged, hold.overrun) == (
        HoldState.SETTLED,
        3000 * MICRO,
        2950 * MICRO,
    )


async def test_error_after_commit_charges_the_usage_it_was_given(ledger: Ledger) -> None:
    s = await settlement(ledger)
    await s.on_first_chunk()
    outcome = await s.on_error(RuntimeError("reset"), Usage(12, 4, source=UsageSource.PARTIAL))
    assert (outcome.status, outcome.charged) == ("error", 20 * MICRO)
    assert outcome.error == "RuntimeError: reset"
    (record,) = await ledger.usage()
    assert (record.status, record.usage_source, record.error) == (
        "error",
        "partial",
        "RuntimeError: reset",
    )


async def test_incomplete_before_the_upstream_was_contacted_is_a_refund(ledger: Ledger) -> None:
    s = await settlement(ledger)
    outcome = await s.on_incomplete()
    assert (outcome.refunded, outcome.charged, outcome.usage) == (True, Decimal(0), None)
    hold = await ledger.get_hold("req_1")
    assert hold is not None
    assert hold.state is HoldState.RELEASED


async def test_unbudgeted_requests_record_usage_at_no_charge(ledger: Ledger) -> None:
    s = await settlement(ledger, price=None)
    outcome = await s.on_success(Usage(100, 100))
    assert outcome.charged == 0
    (record,) = await ledger.usage()
    assert (record.input_tokens, record.cost) == (100, Decimal(0))


async def test_heartbeat_extends_until_settled(ledger: Ledger) -> None:
    s = await settlement(ledger, hold_ttl=30)
    before = await ledger.get_hold("req_1")
    await s.heartbeat()
    after = await ledger.get_hold("req_1")
    assert before is not None
    assert after is not None
    assert after.expires_at > before.expires_at
    await s.on_success(Usage(1, 1))
    await s.heartbeat()  # settled: nothing to extend, no error
    other = await settlement(ledger, "req_2")
    await ledger.release("req_2")
    await other.heartbeat()  # closed elsewhere: HoldClosedError is swallowed


async def test_a_ledger_failure_while_settling_never_raises(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    if not isinstance(ledger, FakeLedger):
        pytest.skip("outage is simulated with the fake ledger")
    s = await settlement(ledger)
    ledger.down = True
    outcome = await s.on_success(Usage(1, 1))
    assert outcome.error == "settlement not recorded: LedgerUnavailableError"
    assert outcome.charged == 0
    assert "req_1" in caplog.text
    assert "expire" in caplog.text
    ledger.down = False
    hold = await ledger.get_hold("req_1")
    assert hold is not None
    assert hold.live  # left to expire; nothing wrong recorded
    assert await ledger.usage() == []
    await ledger.release("req_1")


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_an_absurd_usage_report_is_charged_clamped_and_flagged(backend: str) -> None:
    """10**30 tokens once overflowed the store: the hold was never charged at all."""
    async with open_backend(backend) as ledger:
        s = await settlement(ledger)
        outcome = await s.on_success(Usage(input_tokens=10, output_tokens=10**30))
        clamped = Usage(10, MAX_TOKENS, source=UsageSource.PROVIDER)
        assert outcome.usage == clamped
        assert outcome.charged == PRICES["gpt-test"].cost(clamped)  # an overrun, recorded
        assert outcome.error is not None
        assert "clamped" in outcome.error
        hold = await ledger.get_hold("req_1")
        assert hold is not None
        assert (hold.state, hold.charged) == (HoldState.SETTLED, outcome.charged)
        (record,) = await ledger.usage()
        assert (record.output_tokens, record.usage_source, record.error) == (
            MAX_TOKENS,
            "provider",  # honest: the provider said so, only the count was capped
            outcome.error,
        )
        assert f"output_tokens={10**30}" in outcome.error

        # Clamped usage still too dear to price: the whole hold is charged, both noted.
        dear = await settlement(ledger, "req_2", price=ModelPrice(Decimal(10**7), Decimal(10**7)))
        outcome = await dear.on_success(Usage(input_tokens=10**30))
        assert outcome.charged == ESTIMATE.amount
        assert outcome.error is not None
        assert "clamped" in outcome.error
        assert "too large to price" in outcome.error
        hold = await ledger.get_hold("req_2")
        assert hold is not None
        assert hold.state is HoldState.SETTLED


class _FailsOnce(Settlement):
    """A settlement whose first transition waits for ``gate`` and then fails."""

    def __init__(self) -> None:
        super().__init__(request_id="req-flaky", estimate=RequestEstimate(1, 1, Decimal(0)))
        self.gate = anyio.Event()
        self.started = anyio.Event()
        self.calls = 0

    async def _finish(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            await self.gate.wait()
            raise OSError("the ledger went away")
        return SettlementOutcome(status, Decimal(0), usage, refunded=False, error=error)


async def test_a_transition_failing_after_its_caller_left_is_logged_and_can_be_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settlement = _FailsOnce()
    async with anyio.create_task_group() as tg:
        tg.start_soon(settlement.on_success, Usage(1, 1))
        await settlement.started.wait()
        tg.cancel_scope.cancel()  # the caller leaves; the transition keeps running
    settlement.gate.set()
    with pytest.raises(OSError, match="went away"):
        await settlement.on_success(Usage(1, 1))  # joins the one in flight
    assert "settling request req-flaky failed after its caller was cancelled: OSError" in (
        caplog.text
    )
    outcome = await settlement.on_success(Usage(1, 1))  # a later hook tries again
    assert (outcome.status, settlement.calls) == ("success", 2)
