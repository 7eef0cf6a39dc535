"""examples/mount_existing_app.py: an existing FastAPI app keeps its routes and gains gated ones."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from tests.examples.helpers import create_key, ledger_state, load_example

pytestmark = pytest.mark.anyio

example = load_example("mount_existing_app")


async def test_own_routes_untouched_and_llm_routes_gated(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'gw.db'}"
    key, key_id = await create_key(db, user="alice", budget=Decimal(1))
    provider = FakeProvider()
    upstream_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=provider))
    app = example.create_app(
        db_url=db,
        upstreams=[Upstream(base_url="http://fake/v1", name="fake")],
        client=upstream_client,
    )
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http,
    ):
        assert (await http.get("/")).json() == {"service": "inventory"}
        assert (await http.get("/items/7")).json() == {"item_id": 7, "name": "item 7"}
        assert (await http.get("/items/x")).status_code == 422  # FastAPI's own validation

        anonymous = await http.post("/v1/chat/completions", json=chat)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        assert provider.requests == []

        auth = {"authorization": f"Bearer {key}"}
        plain = await http.post("/v1/chat/completions", json=chat, headers=auth)
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"] == FakeBehavior().output_text

        streamed = await http.post(
            "/v1/chat/completions", json={**chat, "stream": True}, headers=auth
        )
        assert streamed.status_code == 200
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        # The client did not ask for usage, so the usage chunk is cut from its stream.
        assert all("usage" not in json.loads(e) or not json.loads(e)["usage"] for e in events[:-1])

    budget, records = await ledger_state(db, f"key:{key_id}")
    assert budget is not None
    expected = FakeBehavior().expected_usage("openai_chat")
    assert {r.status for r in records} == {"success"}
    assert len(records) == 2
    assert all(r.input_tokens == expected.input_tokens for r in records)
    assert all(r.output_tokens == expected.output_tokens for r in records)
    assert budget.spent == sum((r.cost for r in records), Decimal(0)) > 0
    assert budget.held == 0


async def test_from_environment_runs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    db = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("GATEWAYKIT_DB", db)
    key, _ = await create_key(db, user="bob")
    app = example.from_environment()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http,
    ):
        response = await http.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
    _, records = await ledger_state(db, "user:bob")
    assert [r.user for r in records] == ["bob"]
