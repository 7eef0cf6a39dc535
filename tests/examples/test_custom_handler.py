"""examples/custom_handler.py: a handler of one's own, settled through settle_stream."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from gatewaykit.pricing import PriceTable
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from tests.examples.helpers import create_key, ledger_state, load_example

pytestmark = pytest.mark.anyio

example = load_example("custom_handler")


def make_app(db: str, provider: FakeProvider) -> Any:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=provider))
    upstream = Upstream(base_url="http://fake/v1", name="fake")
    return example.create_app(db_url=db, upstreams=[upstream], client=client)


def gateway(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


async def test_translation_is_streamed_and_charged_its_usage(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    key, key_id = await create_key(db, user="alice", budget=Decimal(1))
    provider = FakeProvider()
    app = make_app(db, provider)
    body = {"model": "gpt-4o-mini", "text": "Good morning", "to": "French"}
    async with app.router.lifespan_context(app), gateway(app) as http:
        response = await http.post(
            "/v1/translate", json=body, headers={"authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == FakeBehavior().output_text

    [sent] = provider.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["messages"][0]["content"] == example.SYSTEM
    assert "Good morning" in sent.body["messages"][1]["content"]

    budget, [record] = await ledger_state(db, f"key:{key_id}")
    usage = FakeBehavior().expected_usage("openai_chat")
    price = PriceTable.default()["gpt-4o-mini"]
    assert (record.status, record.usage_source) == ("success", "provider")
    assert record.endpoint == "/v1/translate"
    assert (record.input_tokens, record.output_tokens) == (usage.input_tokens, usage.output_tokens)
    assert record.cost == price.cost(usage)
    assert budget is not None
    assert budget.spent == record.cost
    assert budget.held == 0


async def test_refused_before_the_handler_runs(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    key, _ = await create_key(db, user="alice")
    provider = FakeProvider()
    app = make_app(db, provider)
    async with app.router.lifespan_context(app), gateway(app) as http:
        anonymous = await http.post("/v1/translate", json={"model": "gpt-4o-mini", "text": "x"})
        assert anonymous.status_code == 401
        malformed = await http.post(
            "/v1/translate",
            json={"model": "gpt-4o-mini"},
            headers={"authorization": f"Bearer {key}"},
        )
        assert malformed.status_code == 400
        assert "text" in malformed.json()["error"]["message"]
    assert provider.requests == []


async def test_upstream_failure_refunds_the_hold(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    key, key_id = await create_key(db, user="alice", budget=Decimal(1))
    provider = FakeProvider(behavior=FakeBehavior(fail_status=500))
    app = make_app(db, provider)
    async with app.router.lifespan_context(app), gateway(app) as http:
        response = await http.post(
            "/v1/translate",
            json={"model": "gpt-4o-mini", "text": "Hello"},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 502
    budget, records = await ledger_state(db, f"key:{key_id}")
    assert budget is not None
    assert (budget.spent, budget.held) == (Decimal(0), Decimal(0))
    assert [r.status for r in records] == ["error"]
