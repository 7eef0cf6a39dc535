"""examples/app.py with --platform: admission by a control plane, usage through the outbox."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gatewaykit.testing import FakeBehavior, FakeControlPlane, FakeProvider, serve_app
from tests.examples.helpers import load_example

pytestmark = pytest.mark.anyio

example = load_example("app")


async def test_platform_mode_resolves_and_reports(tmp_path: Path) -> None:
    plane = FakeControlPlane(gateway_token="gw-secret-token")
    plane.add_user("tok-alice", user_id="alice")
    outbox = f"sqlite:///{tmp_path / 'outbox.db'}"
    async with serve_app(FakeProvider()) as provider_url, serve_app(plane.app) as plane_url:
        plane.set_attempts("*", {"provider": "openai", "base_url": f"{provider_url}/v1"})
        settings = example.Settings(platform=plane_url, platform_token="gw-secret-token", db=outbox)
        assert not settings.offline
        app = example.build_app(settings)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http,
        ):
            health = await http.get("/healthz")
            assert health.json() == {"status": "ok", "mode": "PlatformMode"}
            refused = await http.post(
                "/v1/chat/completions", json=body, headers={"authorization": "Bearer tok-nobody"}
            )
            assert refused.status_code == 401
            answer = await http.post(
                "/v1/chat/completions", json=body, headers={"authorization": "Bearer tok-alice"}
            )
            assert answer.status_code == 200, answer.text
        # Leaving the lifespan drains the outbox: the report is delivered by now.
    [report] = plane.reports.values()
    usage = FakeBehavior().expected_usage("openai_chat")
    assert report["status"] == "success"
    assert report["usage"]["input_tokens"] == usage.input_tokens
    assert report["usage"]["output_tokens"] == usage.output_tokens
    assert [call["user_token"] for call in plane.resolve_calls] == ["tok-nobody", "tok-alice"]
