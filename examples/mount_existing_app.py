"""An existing FastAPI app gains budget-gated LLM routes.

The app below has routes of its own (``/`` and ``/items/{item_id}``). Two additions turn
it into a gateway as well: ``GatewayMiddleware`` (which gates only the LLM paths and lets
every other request through untouched) and the adapters' routes. The ledger and the
upstream HTTP client are opened in the app's own lifespan.

    OPENAI_API_KEY=sk-... python examples/mount_existing_app.py
    gatewaykit keys create --user alice --budget 5       # same default database
    curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer gk_..." \\
         -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}'

Without ``OPENAI_API_KEY``/``OPENAI_BASE_URL`` it forwards to gatewaykit's fake provider,
in-process, so it also runs offline.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI

from gatewaykit import GatewayMiddleware, PriceTable, StandaloneMode, Upstream, open_ledger
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.testing import FakeProvider


def create_app(
    *, db_url: str, upstreams: list[Upstream], client: AiohttpClient | httpx.AsyncClient
) -> FastAPI:
    ledger = open_ledger(db_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            await ledger.open()
            try:
                yield
            finally:
                await ledger.aclose()

    app = FastAPI(title="Inventory", lifespan=lifespan)

    # -- the app's own routes, unchanged ---------------------------------------------
    @app.get("/")
    async def index() -> dict[str, str]:
        return {"service": "inventory"}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int | str]:
        return {"item_id": item_id, "name": f"item {item_id}"}

    # -- the gateway: one middleware, three routes -----------------------------------
    mode = StandaloneMode(ledger, prices=PriceTable.default(), upstreams=upstreams)
    app.add_middleware(GatewayMiddleware, mode=mode)
    app.router.routes.extend(gateway_routes(client=client))
    return app


def from_environment() -> FastAPI:
    """OpenAI (or any OpenAI-compatible server) from the SDK's variables, else the fake."""
    db_url = os.environ.get("GATEWAYKIT_DB", "sqlite:///gatewaykit.db")
    base_url = os.environ.get("OPENAI_BASE_URL")
    api_key = os.environ.get("OPENAI_API_KEY")
    if base_url or api_key:
        upstream = Upstream(base_url=base_url or "https://api.openai.com/v1", api_key=api_key)
        return create_app(db_url=db_url, upstreams=[upstream], client=default_client())
    fake = httpx.AsyncClient(transport=httpx.ASGITransport(app=FakeProvider()))
    upstream = Upstream(base_url="http://fake-provider/v1", name="fake")
    return create_app(db_url=db_url, upstreams=[upstream], client=fake)


if __name__ == "__main__":
    uvicorn.run(from_environment(), host="127.0.0.1", port=8000)
