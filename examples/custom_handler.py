"""A handler of your own behind GatewayMiddleware, settled with ``settle_stream``.

``POST /v1/translate`` takes ``{"model": "gpt-4o-mini", "text": "...", "to": "French"}``
and streams back the translation as plain text. It is not a provider's wire format, so:

* ``estimate_translation`` tells the middleware what it needs before admitting the
  request (model, prompt size, output cap); the middleware then authenticates the key,
  holds the estimate on the key's and user's budgets, and hands the handler a settlement;
* the handler calls an OpenAI-compatible upstream itself and wraps the upstream's bytes in
  ``settle_stream``, which marks the first chunk and settles on success (the usage read by
  ``ChatStreamUsage``), on an error, or when the stream ends without usage;
* if the client goes away mid-stream, the middleware cancels the handler and settles the
  request as incomplete — the handler needs no code for that.

    OPENAI_API_KEY=sk-... python examples/custom_handler.py     # offline without it
    gatewaykit keys create --user alice --budget 1
    curl -N http://127.0.0.1:8000/v1/translate -H "Authorization: Bearer gk_..." \\
         -d '{"model": "gpt-4o-mini", "text": "Good morning", "to": "French"}'
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gatewaykit import (
    GatewayMiddleware,
    PriceTable,
    StandaloneMode,
    Upstream,
    get_settlement,
    open_ledger,
    settle_stream,
)
from gatewaykit.adapters import ChatStreamUsage
from gatewaykit.adapters.sse import SSESplitter
from gatewaykit.context import get_context
from gatewaykit.parsing import ParsedRequest
from gatewaykit.testing import FakeProvider

SYSTEM = "Translate the user's text. Answer with the translation only."


def estimate_translation(body: Mapping[str, Any]) -> ParsedRequest:
    """Read a /v1/translate body for admission; a ValueError becomes a 400."""
    model, text, to = body.get("model"), body.get("text"), body.get("to", "English")
    if not isinstance(model, str) or not isinstance(text, str) or not isinstance(to, str):
        raise ValueError("send {'model': str, 'text': str, 'to': str}")
    return ParsedRequest(
        model=model,
        stream=True,
        prompt_chars=len(SYSTEM) + len(text) + len(to),
        max_output_tokens=max(64, len(text)),  # a translation is about as long as the text
    )


async def translate(request: Request) -> Response:
    context = get_context(request)  # what the middleware admitted: model, upstream attempts
    settlement = get_settlement(request)
    body = context.body
    attempt = context.attempts[0]
    upstream = attempt.upstream
    client: httpx.AsyncClient = request.app.state.client

    headers = {"authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    upstream_request = client.build_request(
        "POST",
        f"{upstream.base_url}/chat/completions",
        headers=headers,
        json={
            "model": attempt.model,
            "stream": True,
            "stream_options": {"include_usage": True},  # or the stream carries no usage
            "max_tokens": settlement.estimate.max_output_tokens,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Into {body.get('to', 'English')}: {body['text']}"},
            ],
        },
    )
    settlement.note_upstream_contacted()
    try:
        response = await client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        await settlement.on_error(exc)  # nothing was delivered: the hold is refunded
        return JSONResponse({"error": "the translation service is unreachable"}, 502)
    if response.status_code != 200:
        await response.aclose()
        await settlement.on_error(f"upstream answered {response.status_code}")
        return JSONResponse({"error": "the translation service failed"}, 502)

    async def text() -> AsyncIterator[str]:
        splitter = SSESplitter()
        try:
            # settle_stream passes the upstream bytes through unchanged and settles the
            # request when they end; this generator only turns them into plain text.
            async for chunk in settle_stream(response.aiter_raw(), settlement, ChatStreamUsage()):
                for event in splitter.feed(chunk):
                    if event.data and event.data != "[DONE]":
                        for choice in json.loads(event.data).get("choices", []):
                            yield choice.get("delta", {}).get("content") or ""
        finally:
            with anyio.CancelScope(shield=True):  # close even when the client went away
                await response.aclose()

    return StreamingResponse(text(), media_type="text/plain; charset=utf-8")


def create_app(*, db_url: str, upstreams: list[Upstream], client: httpx.AsyncClient) -> Starlette:
    ledger = open_ledger(db_url)
    mode = StandaloneMode(ledger, prices=PriceTable.default(), upstreams=upstreams)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            await ledger.open()
            try:
                app.state.client = client
                yield
            finally:
                await ledger.aclose()

    return Starlette(
        routes=[Route("/v1/translate", translate, methods=["POST"])],
        middleware=[
            Middleware(GatewayMiddleware, mode=mode, routes={"/v1/translate": estimate_translation})
        ],
        lifespan=lifespan,
    )


def from_environment() -> Starlette:
    db_url = os.environ.get("GATEWAYKIT_DB", "sqlite:///gatewaykit.db")
    base_url = os.environ.get("OPENAI_BASE_URL")
    api_key = os.environ.get("OPENAI_API_KEY")
    if base_url or api_key:
        upstream = Upstream(base_url=base_url or "https://api.openai.com/v1", api_key=api_key)
        return create_app(db_url=db_url, upstreams=[upstream], client=httpx.AsyncClient(timeout=60))
    fake = httpx.AsyncClient(transport=httpx.ASGITransport(app=FakeProvider()))
    upstream = Upstream(base_url="http://fake-provider/v1", name="fake")
    return create_app(db_url=db_url, upstreams=[upstream], client=fake)


if __name__ == "__main__":
    uvicorn.run(from_environment(), host="127.0.0.1", port=8000)
