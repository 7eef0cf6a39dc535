"""Embeddings, token counting, model listing and unknown paths, end to end: the official
SDKs against GatewayMiddleware + StandaloneMode + the adapters on a real uvicorn server,
in front of the fake provider on another socket. Spend is asserted to the nano-USD on
SQLite and PostgreSQL, and every ledger is checked clean (no invariant violated, no hold
left) when the test ends."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord, Ledger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import DEFAULT_PRICES, ModelPrice, PriceTable
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage
from tests.adapters.conftest import serve
from tests.middleware.conftest import open_backend

pytestmark = pytest.mark.anyio

EMBED = "text-embedding-3-small"
EMBED_PRICE = DEFAULT_PRICES[EMBED]  # $0.02 per million input tokens
UPSTREAM_KEY = "sk-upstream-7777"
MASTER = "gk-master-0123456789abcdef"
#: Each embedding input is billed 20 tokens by the fake provider; count_tokens answers 20.
BEHAVIOR = FakeBehavior(input_tokens=20)


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[tuple[FakeProvider, str]]:
    fake = FakeProvider(behavior=BEHAVIOR, api_key=UPSTREAM_KEY)
    async with serve(fake) as url:
        yield fake, url


@pytest.fixture
def fake(upstream: tuple[FakeProvider, str]) -> FakeProvider:
    provider, _ = upstream
    provider.requests.clear()
    provider.behavior = BEHAVIOR
    return provider


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[AiohttpClient]:
    async with default_client() as http:
        yield http


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    async with open_backend(request.param) as opened:
        yield opened
        assert await opened.holds() == []  # nothing leaked, whatever happened


MakeKey = Callable[..., Awaitable[str]]


@pytest.fixture
def make_key(ledger: Ledger) -> MakeKey:
    async def make(**fields: Any) -> str:
        key = generate_key()
        record = ApiKeyRecord(
            key_id=key.key_id, key_hash=key.key_hash, prefix=key.prefix, user="alice", **fields
        )
        await ledger.create_key(record)
        return key.key

    return make


Gateway = Callable[..., Any]


@pytest.fixture
def gateway(ledger: Ledger, client: AiohttpClient, upstream: tuple[FakeProvider, str]) -> Gateway:
    """``async with gateway(**mode_options) as url``: the whole stack on a socket."""
    _, url = upstream

    def make(**options: Any) -> Any:
        options.setdefault("prices", PriceTable.default())
        options.setdefault(
            "upstreams",
            [
                Upstream(f"{url}/v1", api_key=UPSTREAM_KEY, models=frozenset({EMBED, "gpt-4o"})),
                Upstream(
                    url,
                    api_key=UPSTREAM_KEY,
                    provider="anthropic",
                    models=frozenset({"claude-haiku-4-5", "claude-sonnet-4-5"}),
                ),
            ],
        )
        mode = StandaloneMode(ledger, master_key=MASTER, **options)
        app = Starlette(
            routes=gateway_routes(client=client),
            middleware=[Middleware(GatewayMiddleware, mode=mode)],
        )
        return serve(app)

    return make


def openai_client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def anthropic_client(url: str, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)


async def spent(ledger: Ledger, scope: str = "user:alice") -> Decimal:
    status = await ledger.status(scope)
    assert status is not None
    return status.spent


# -- embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "inputs"),
    [
        ("the quick brown fox", 1),
        (["one", "two", "three"], 3),
        ([1, 2, 3, 4], 1),  # one token array
        ([[1, 2], [3, 4, 5]], 2),  # a batch of token arrays
    ],
    ids=["string", "strings", "tokens", "token-arrays"],
)
async def test_embeddings_charge_the_reported_prompt_tokens_exactly(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, fake: FakeProvider, given: Any, inputs: int
) -> None:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key = await make_key()
    async with gateway() as url, openai_client(url, key) as sdk:
        result = await sdk.embeddings.create(model=EMBED, input=given, dimensions=4)
    assert [item.index for item in result.data] == list(range(inputs))
    assert all(len(item.embedding) == 4 for item in result.data)  # base64, decoded by the SDK
    assert result.usage.prompt_tokens == 20 * inputs
    [received] = fake.requests
    assert received.path == "/v1/embeddings"
    assert received.body["input"] == given  # forwarded as sent, batch and all
    assert received.body["dimensions"] == 4
    assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # Input price only, on the provider's count: 20 tokens × $0.02 per million each.
    assert await spent(ledger) == Decimal("0.0000004") * inputs
    [record] = await ledger.usage()
    assert (record.endpoint, record.status, record.usage_source) == (
        "embeddings",
        "success",
        "provider",
    )
    assert (record.input_tokens, record.output_tokens) == (20 * inputs, 0)
    assert record.cost == EMBED_PRICE.cost(Usage(input_tokens=20 * inputs))


async def test_embeddings_hold_the_input_estimate_at_the_input_price(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, upstream: tuple[FakeProvider, str]
) -> None:
    # 400 characters ≈ 100 tokens and a 5-token array: 105 tokens at $1 per million,
    # no output. One nano-dollar less than that is refused; exactly that is admitted.
    price = ModelPrice(Decimal(1), Decimal(0))
    body = {"model": "embed", "input": ["x" * 400, [1, 2, 3, 4, 5]]}
    await ledger.set_budget("user:alice", limit=Decimal("0.000104999"))
    key = await make_key()
    headers = {"authorization": f"Bearer {key}"}
    served = [Upstream(f"{upstream[1]}/v1", api_key=UPSTREAM_KEY)]
    async with (
        gateway(prices={"embed": price}, upstreams=served) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        refused = await http.post("/v1/embeddings", json=body, headers=headers)
        await ledger.set_budget("user:alice", limit=Decimal("0.000105"))
        admitted = await http.post("/v1/embeddings", json=body, headers=headers)
    assert refused.status_code == 402
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["requested"]) == (
        "insufficient_quota",
        "budget_exceeded",
        "0.000105",
    )
    assert admitted.status_code == 200
    assert admitted.headers["x-gatewaykit-budget-remaining"] == "0"  # after the hold
    assert await spent(ledger) == Decimal("0.00004")  # charged 2 × 20 reported tokens


async def test_embeddings_upstream_error_refunds_and_passes_the_error_through(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, fake: FakeProvider
) -> None:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key = await make_key()
    async with gateway() as url, openai_client(url, key) as sdk:
        fake.behavior = FakeBehavior(fail_status=400)
        with pytest.raises(openai.BadRequestError, match="fake provider failure"):
            await sdk.embeddings.create(model=EMBED, input="hello")
        fake.behavior = FakeBehavior(fail_status=503)
        with pytest.raises(openai.InternalServerError):
            await sdk.embeddings.create(model=EMBED, input="hello")
    assert await spent(ledger) == 0
    records = await ledger.usage()
    assert [(r.status, r.cost) for r in records] == [("error", Decimal(0))] * 2


async def test_embeddings_without_usage_are_charged_the_estimate(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, fake: FakeProvider
) -> None:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key = await make_key()
    fake.behavior = FakeBehavior(omit_usage=True)
    async with gateway() as url, httpx.AsyncClient(base_url=url) as http:
        body = {"model": EMBED, "input": "y" * 400, "encoding_format": "float"}
        answer = await http.post(
            "/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"}
        )
    assert answer.status_code == 200
    [record] = await ledger.usage()
    assert (record.status, record.usage_source, record.input_tokens) == (
        "no_usage",
        "estimated",
        100,
    )
    assert await spent(ledger) == Decimal("0.000002")  # 100 tokens × $0.02 per million


async def test_embeddings_bad_input_is_a_400_in_openai_s_envelope(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, fake: FakeProvider
) -> None:
    key = await make_key()
    async with gateway() as url, openai_client(url, key) as sdk:
        for bad in ([], [["a"]], 7):
            with pytest.raises(openai.BadRequestError, match="'input' must be"):
                await sdk.embeddings.create(model=EMBED, input=bad)  # type: ignore[arg-type]
    assert fake.requests == []
    assert await ledger.usage() == []


async def test_fake_provider_embeddings_in_base64_are_float32_vectors(fake: FakeProvider) -> None:
    transport = httpx.ASGITransport(app=fake)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as http:
        body = {"model": EMBED, "input": ["a", "b"], "encoding_format": "base64"}
        answer = await http.post(
            "/v1/embeddings", json=body, headers={"authorization": f"Bearer {UPSTREAM_KEY}"}
        )
    data = answer.json()["data"]
    vectors = [struct.unpack("<8f", base64.b64decode(item["embedding"])) for item in data]
    assert len(vectors) == 2
    assert vectors[0] != vectors[1]
    assert answer.json()["usage"] == {"prompt_tokens": 40, "total_tokens": 40}


# -- count_tokens -------------------------------------------------------------------------


async def test_count_tokens_is_forwarded_and_never_held_or_charged(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, fake: FakeProvider
) -> None:
    # A budget of zero: any hold at all would be refused with 402.
    await ledger.set_budget("user:alice", limit=Decimal(0))
    key = await make_key()
    async with gateway() as url, anthropic_client(url, key) as sdk:
        counted = await sdk.messages.count_tokens(
            model="claude-haiku-4-5",
            messages=[{"role": "user", "content": "hello"}],
            system="be brief",
        )
        with pytest.raises(anthropic.APIStatusError) as refused:
            await sdk.messages.create(  # the same budget refuses a billed request
                model="claude-haiku-4-5",
                max_tokens=10,
                messages=[{"role": "user", "content": "hello"}],
            )
    assert refused.value.status_code == 402
    assert counted.input_tokens == 20
    [received] = fake.requests
    assert received.path == "/v1/messages/count_tokens"
    assert received.headers["x-api-key"] == UPSTREAM_KEY
    assert received.headers["anthropic-version"]
    assert received.body["system"] == "be brief"
    assert await spent(ledger) == 0
    assert await ledger.usage() == []  # nothing billed, nothing recorded


async def test_count_tokens_is_authenticated_authorised_and_rate_limited(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, fake: FakeProvider
) -> None:
    key = await make_key(rpm=1, allowed_models=("claude-haiku-4-5",))
    messages: Any = [{"role": "user", "content": "hi"}]
    async with gateway() as url:
        async with anthropic_client(url, "gk-not-a-key") as stranger:
            with pytest.raises(anthropic.AuthenticationError):
                await stranger.messages.count_tokens(model="claude-haiku-4-5", messages=messages)
        async with anthropic_client(url, key) as sdk:
            with pytest.raises(anthropic.PermissionDeniedError, match="may not use model"):
                await sdk.messages.count_tokens(model="claude-sonnet-4-5", messages=messages)
            await sdk.messages.count_tokens(model="claude-haiku-4-5", messages=messages)
            with pytest.raises(anthropic.RateLimitError):
                await sdk.messages.count_tokens(model="claude-haiku-4-5", messages=messages)
        async with anthropic_client(url, MASTER) as master:  # no user to name: nobody pays
            await master.messages.count_tokens(model="claude-haiku-4-5", messages=messages)
    assert [r.path for r in fake.requests] == ["/v1/messages/count_tokens"] * 2
    assert await ledger.usage() == []


async def test_count_tokens_of_an_unpriced_model_is_served(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, fake: FakeProvider
) -> None:
    """Unmetered: no price is needed, even under the ``reject`` policy."""
    key = await make_key()
    async with gateway(prices={}) as url, anthropic_client(url, key) as sdk:
        counted = await sdk.messages.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}]
        )
        with pytest.raises(anthropic.BadRequestError, match="no price"):
            await sdk.messages.create(
                model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    assert counted.input_tokens == 20
    assert [r.path for r in fake.requests] == ["/v1/messages/count_tokens"]


# -- models -------------------------------------------------------------------------------


async def test_models_lists_what_the_key_may_use_in_openai_s_shape(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey
) -> None:
    # Allowed ∩ priced ∩ served: "gpt-4o-mini" is priced but no OpenAI upstream serves
    # it; "mystery" is served by nobody and priced nowhere; Claude is Anthropic's.
    allowed = ("gpt-4o", "gpt-4o-mini", EMBED, "mystery", "claude-haiku-4-5")
    key = await make_key(allowed_models=allowed)
    async with gateway() as url, openai_client(url, key) as sdk:
        listed = [model async for model in sdk.models.list()]
        assert [(m.id, m.object, m.owned_by) for m in listed] == [
            ("gpt-4o", "model", "openai"),
            (EMBED, "model", "openai"),
        ]
        model = await sdk.models.retrieve(EMBED)
        assert (model.id, model.owned_by) == (EMBED, "openai")
        for hidden in ("gpt-4o-mini", "claude-haiku-4-5", "o3"):
            with pytest.raises(openai.NotFoundError, match=f"'{hidden}' does not exist"):
                await sdk.models.retrieve(hidden)
    async with gateway() as url, openai_client(url, MASTER) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["gpt-4o", EMBED]


async def test_models_in_anthropic_s_shape_when_the_client_speaks_anthropic(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey
) -> None:
    key = await make_key(allowed_models=("gpt-4o", "claude-haiku-4-5"))
    async with gateway() as url, anthropic_client(url, key) as sdk:
        page = await sdk.models.list()
        assert [(m.id, m.type, m.display_name) for m in page.data] == [
            ("claude-haiku-4-5", "model", "claude-haiku-4-5")
        ]
        assert (page.first_id, page.last_id, page.has_more) == (
            "claude-haiku-4-5",
            "claude-haiku-4-5",
            False,
        )
        info = await sdk.models.retrieve("claude-haiku-4-5")
        assert info.id == "claude-haiku-4-5"
        with pytest.raises(anthropic.NotFoundError, match="claude-sonnet-4-5"):
            await sdk.models.retrieve("claude-sonnet-4-5")  # served, priced, not allowed


async def test_models_with_an_unrestricted_upstream_and_unpriced_models(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey, upstream: tuple[FakeProvider, str]
) -> None:
    """An upstream without ``models`` serves any name: every priced model is listed (the
    admission rule); unpriced ones only when the policy admits them."""
    _, url = upstream
    key = await make_key(allowed_models=("gpt-4o", "local-llama"))
    upstreams = [Upstream(f"{url}/v1", api_key=UPSTREAM_KEY)]
    async with gateway(upstreams=upstreams) as gw, openai_client(gw, key) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["gpt-4o"]
    async with gateway(upstreams=upstreams, unpriced="allow") as gw, openai_client(gw, key) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["gpt-4o", "local-llama"]
    async with gateway(upstreams=upstreams) as gw, openai_client(gw, MASTER) as sdk:
        assert [m.id async for m in sdk.models.list()] == list(DEFAULT_PRICES)


async def test_models_needs_a_valid_key_in_either_envelope(
    gateway: Gateway, ledger: Ledger
) -> None:
    async with gateway() as url:
        async with openai_client(url, "gk-wrong") as sdk:
            with pytest.raises(openai.AuthenticationError, match="invalid API key"):
                await sdk.models.list()
        async with anthropic_client(url, "gk-wrong") as asdk:
            with pytest.raises(anthropic.AuthenticationError, match="invalid API key"):
                await asdk.models.list()
        async with httpx.AsyncClient(base_url=url) as http:
            answer = await http.get("/v1/models")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


# -- unknown paths ------------------------------------------------------------------------


async def test_unknown_paths_answer_in_the_provider_s_envelope(
    gateway: Gateway, ledger: Ledger, make_key: MakeKey
) -> None:
    key = await make_key()
    async with gateway() as url:
        async with openai_client(url, key) as sdk:
            with pytest.raises(openai.NotFoundError, match=r"Invalid URL \(GET /v1/fine_tuning"):
                await sdk.fine_tuning.jobs.list()
        async with anthropic_client(url, key) as asdk:
            with pytest.raises(anthropic.NotFoundError, match="/v1/messages/batches"):
                await asdk.messages.batches.list()
        async with httpx.AsyncClient(base_url=url) as http:
            wrong_method = await http.get("/v1/chat/completions")
            anthropic_style = await http.post("/v1/nope", headers={"anthropic-version": "x"})
            outside = await http.get("/elsewhere")
    assert wrong_method.status_code == 404
    assert wrong_method.json() == {
        "error": {
            "message": "Invalid URL (GET /v1/chat/completions)",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    }
    assert anthropic_style.status_code == 404
    assert anthropic_style.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Invalid URL (POST /v1/nope)"},
    }
    assert outside.status_code == 404  # outside the prefix: the host app's own 404
    assert outside.text == "Not Found"
