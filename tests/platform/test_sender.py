"""The outbox sender against a fake control plane on a real socket.

Every report must reach the control plane exactly once per idempotency key, whatever the
control plane does: fail, stall past the timeout, answer garbage, go away and come back.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox import Outbox, OutboxSender, RetryPolicy, SQLiteOutbox
from gatewaykit.outbox.sender import is_permanent_rejection, parse_retry_after
from gatewaykit.testing import FakeControlPlane, serve_app

from .conftest import GATEWAY_TOKEN, until

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(initial_delay=0.02, max_delay=0.1)


def report(n: int) -> tuple[str, dict[str, object]]:
    body: dict[str, object] = {
        "request_id": f"req_{n}",
        "attempt_id": "att_1",
        "status": "success",
        "usage": {
            "input_tokens": 10 + n,
            "output_tokens": 5,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
        },
        "usage_source": "provider",
    }
    return f"req_{n}:att_1", body


def sender(outbox: Outbox, client: httpx.AsyncClient, url: str, **options: object) -> OutboxSender:
    settings: dict[str, object] = {
        "retry": FAST,
        "request_timeout": 0.5,
        "shutdown_timeout": 2.0,
        "poll_interval": 0.2,
        "rng": random.Random(7),
    }
    settings.update(options)
    return OutboxSender(
        outbox,
        client=client,
        base_url=url,
        gateway_token=GATEWAY_TOKEN,
        **settings,  # type: ignore[arg-type]
    )


async def wait_empty(outbox: Outbox, within: float = 10.0) -> None:
    async def empty() -> bool:
        return await outbox.size() == 0

    await until(empty, within)


@pytest.fixture
async def sqlite_outbox(tmp_path: Path) -> AsyncIterator[SQLiteOutbox]:
    async with SQLiteOutbox(str(tmp_path / "outbox.db")) as box:
        yield box


async def test_every_report_exactly_once_through_failures_stalls_and_garbage(
    outbox: Outbox, plane: FakeControlPlane, plane_url: str, client: httpx.AsyncClient
) -> None:
    plane.fail_usage_posts = 4
    plane.stall_usage_posts = 2
    plane.stall_seconds = 3.0
    plane.malformed_usage_posts = 2
    expected = dict(report(n) for n in range(12))
    async with sender(outbox, client, plane_url, request_timeout=0.3) as s:
        for key, body in expected.items():
            assert await outbox.enqueue(key, body)
            s.notify()
        await wait_empty(outbox)
    assert plane.reports == expected  # exactly one accepted report per key, the right one
    assert all(post.answered != 422 for post in plane.usage_posts)  # no conflicting repeat
    stalled = [key for key in expected if len(plane.posts_for(key)) > 1]
    assert stalled  # the failed and stalled posts were sent again under the same key
    assert s.delivered == 12
    assert s.failed_attempts >= 6
    assert await outbox.dead_count() == 0
    for post in plane.usage_posts:
        assert post.idempotency_key == f"{post.body['request_id']}:{post.body['attempt_id']}"


async def test_control_plane_down_then_back_on_the_same_port(
    sqlite_outbox: SQLiteOutbox, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    async with serve_app(plane.app) as url:
        port = int(url.rsplit(":", 1)[1])
    expected = dict(report(n) for n in range(5))
    async with sender(sqlite_outbox, client, url) as s:
        for key, body in expected.items():
            await sqlite_outbox.enqueue(key, body)
        s.notify()
        # Connection refused, retried with backoff.
        await until(lambda: s.failed_attempts >= 10)
        assert await sqlite_outbox.size() == 5
        age = await sqlite_outbox.oldest_age()
        assert age is not None
        assert age > 0
        async with serve_app(plane.app, port=port):
            await wait_empty(sqlite_outbox)
    assert plane.reports == expected
    warnings = [r.getMessage() for r in caplog.records if r.name == "gatewaykit.outbox"]
    assert len([m for m in warnings if "cannot deliver" in m]) == 1  # once per outage
    assert len([m for m in warnings if "succeed again" in m]) == 1


async def test_control_plane_answering_503_while_down(
    sqlite_outbox: SQLiteOutbox,
    plane: FakeControlPlane,
    plane_url: str,
    client: httpx.AsyncClient,
) -> None:
    plane.down = True
    key, body = report(1)
    async with sender(sqlite_outbox, client, plane_url) as s:
        await sqlite_outbox.enqueue(key, body)
        s.notify()
        await until(lambda: s.failed_attempts >= 3)
        [item] = await sqlite_outbox.claim(limit=1, lease=0, due_only=False)
        assert item.last_error is not None
        assert item.last_error.startswith("HTTP 503")
        plane.down = False
        await wait_empty(sqlite_outbox)
    assert plane.reports == {key: body}


async def test_a_permanent_rejection_is_parked_and_can_be_requeued(
    sqlite_outbox: SQLiteOutbox,
    plane: FakeControlPlane,
    plane_url: str,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plane.reject_usage_posts = 1
    async with sender(sqlite_outbox, client, plane_url) as s:
        for n in range(2):
            await sqlite_outbox.enqueue(*report(n))
        s.notify()
        await wait_empty(sqlite_outbox)
        assert await sqlite_outbox.dead_count() == 1
        assert s.parked == 1
        [dead] = await sqlite_outbox.dead_letters()
        assert dead.last_error is not None
        assert dead.last_error.startswith("HTTP 400")
        assert "parked as a dead letter" in caplog.text
        assert await sqlite_outbox.requeue_dead() == 1
        s.notify()
        await wait_empty(sqlite_outbox)
    assert plane.delivered_keys() == {"req_0:att_1", "req_1:att_1"}
    assert GATEWAY_TOKEN not in caplog.text


async def test_a_refused_gateway_token_is_retried_not_parked(
    sqlite_outbox: SQLiteOutbox,
    plane: FakeControlPlane,
    plane_url: str,
    client: httpx.AsyncClient,
) -> None:
    plane.gateway_token = "rotated"
    async with sender(sqlite_outbox, client, plane_url) as s:
        await sqlite_outbox.enqueue(*report(1))
        s.notify()
        await until(lambda: s.failed_attempts >= 3)
        assert await sqlite_outbox.dead_count() == 0
        plane.gateway_token = GATEWAY_TOKEN  # the operator fixed the configuration
        await wait_empty(sqlite_outbox)
    assert plane.delivered_keys() == {"req_1:att_1"}


async def test_shutdown_flushes_backed_off_reports(
    sqlite_outbox: SQLiteOutbox,
    plane: FakeControlPlane,
    plane_url: str,
    client: httpx.AsyncClient,
) -> None:
    plane.fail_usage_posts = 3
    slow = RetryPolicy(initial_delay=60, max_delay=60, jitter=0)
    async with sender(sqlite_outbox, client, plane_url, retry=slow) as s:
        for n in range(3):
            await sqlite_outbox.enqueue(*report(n))
        s.notify()
        await until(lambda: s.failed_attempts >= 3)
        due_in = await sqlite_outbox.next_due_in()
        assert due_in is not None
        assert due_in > 50  # backing off for a minute
        started = time.monotonic()
    assert time.monotonic() - started < 2
    assert await sqlite_outbox.size() == 0  # the flush on exit ignored the backoff
    assert len(plane.reports) == 3


async def test_shutdown_is_bounded_when_the_control_plane_is_gone(
    sqlite_outbox: SQLiteOutbox, client: httpx.AsyncClient
) -> None:
    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    async with serve_app(plane.app) as url:
        pass  # now nothing listens there
    s = sender(sqlite_outbox, client, url, shutdown_timeout=0.3)
    async with s:
        await sqlite_outbox.enqueue(*report(1))
        s.notify()
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert await sqlite_outbox.size() == 1  # kept for the next start
    assert not s.running


async def test_shutdown_is_bounded_while_a_post_stalls(
    sqlite_outbox: SQLiteOutbox,
    plane: FakeControlPlane,
    plane_url: str,
    client: httpx.AsyncClient,
) -> None:
    plane.stall_usage_posts = 10
    plane.stall_seconds = 5
    s = sender(sqlite_outbox, client, plane_url, request_timeout=3, shutdown_timeout=0.3)
    async with s:
        await sqlite_outbox.enqueue(*report(1))
        s.notify()
        await until(lambda: plane.usage_posts, 2)
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert await sqlite_outbox.size() == 1  # unacknowledged: it stays


async def test_sender_posts_the_protocol_headers(sqlite_outbox: SQLiteOutbox) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        key, body = report(3)
        async with sender(sqlite_outbox, mock, "http://cp.test/base/") as s:
            await sqlite_outbox.enqueue(key, body)
            s.notify()
            await wait_empty(sqlite_outbox)
    [request] = seen
    assert str(request.url) == "http://cp.test/base/v1/usage"
    assert request.headers["authorization"] == f"Bearer {GATEWAY_TOKEN}"
    assert request.headers["idempotency-key"] == key
    assert request.headers["content-type"] == "application/json"
    assert GATEWAY_TOKEN not in repr(s)


async def test_works_with_an_httpx2_client(
    sqlite_outbox: SQLiteOutbox, plane: FakeControlPlane, plane_url: str
) -> None:
    import httpx2

    plane.fail_usage_posts = 1
    async with httpx2.AsyncClient() as client2, sender(sqlite_outbox, client2, plane_url) as s:
        await sqlite_outbox.enqueue(*report(1))
        s.notify()
        await wait_empty(sqlite_outbox)
    assert plane.delivered_keys() == {"req_1:att_1"}


def test_retry_policy_backs_off_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=8, jitter=0.5)
    rng = random.Random(1)
    for failures, ceiling in [(1, 0.5), (2, 1), (3, 2), (4, 4), (5, 8), (6, 8), (500, 8)]:
        delays = [policy.delay(failures, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # actually jittered
    assert RetryPolicy(jitter=0).delay(1) == 0.5
    assert policy.delay(1, retry_after=30) == 30
    assert policy.delay(1, retry_after=10_000) == 300  # capped by max_retry_after
    with pytest.raises(ConfigurationError):
        RetryPolicy(initial_delay=0)
    with pytest.raises(ConfigurationError):
        RetryPolicy(jitter=2)


def test_status_classification_and_retry_after() -> None:
    assert [
        s
        for s in (400, 401, 403, 404, 408, 409, 410, 422, 425, 429, 500, 503)
        if is_permanent_rejection(s)
    ] == [400, 403, 404, 410, 422]
    assert parse_retry_after("7") == 7
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0


def test_logs_never_carry_the_gateway_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = OutboxSender(
        SQLiteOutbox(":memory:"),
        client=httpx.AsyncClient(),
        base_url="http://x",
        gateway_token="tok-secret",
    )
    assert "tok-secret" not in repr(s)


async def test_a_stalled_post_does_not_hold_up_the_others(
    sqlite_outbox: SQLiteOutbox,
    plane: FakeControlPlane,
    plane_url: str,
    client: httpx.AsyncClient,
) -> None:
    plane.stall_usage_posts = 1
    plane.stall_seconds = 5
    async with sender(sqlite_outbox, client, plane_url, request_timeout=4, concurrency=2) as s:
        for n in range(6):
            await sqlite_outbox.enqueue(*report(n))
        s.notify()
        started = time.monotonic()
        await until(lambda: s.delivered == 5, 3)
        assert time.monotonic() - started < 3  # not waiting for the stalled post's timeout
        assert await sqlite_outbox.size() == 1
        assert len(plane.reports) == 6  # the stalled one was stored, its answer is late
