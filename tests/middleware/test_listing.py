"""GatewayMiddleware's model listing admission: which GETs it admits, and how it refuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from gatewaykit import GatewayMiddleware
from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import Ledger
from gatewaykit.listing import MODELS_SCOPE_KEY, ListedModel
from gatewaykit.modes.standalone import StandaloneMode
from tests.asgi import call
from tests.middleware.conftest import MASTER_KEY, MakeKey
from tests.middleware.fake_ledger import FakeLedger

pytestmark = pytest.mark.anyio


class Recorder:
    """The host app: records the scopes it was called with and answers 204."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    @property
    def models(self) -> list[Any]:
        return [scope.get(MODELS_SCOPE_KEY) for scope in self.scopes]


async def test_listing_gets_are_admitted_with_the_key_s_models(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key(allowed_models=("gpt-test",))
    app = Recorder()
    gateway = GatewayMiddleware(app, mode=make_mode())
    auth = {"authorization": f"Bearer {key}"}
    for path in ("/v1/models", "/v1/models/gpt-test", "/v1/models/a/b"):
        await call(gateway, path, method="GET", headers=auth)
    await call(gateway, "/v1/models", method="HEAD", headers=auth)
    for path in ("/v1/modelsx", "/v1/model", "/v2/models"):  # not listing paths
        await call(gateway, path, method="GET", headers=auth)
    await call(gateway, "/v1/models", method="POST", headers=auth)  # not gated either
    gpt = ListedModel(id="gpt-test", owned_by="openai")
    assert app.models == [(gpt,)] * 4 + [None] * 4


async def test_listing_under_a_root_path_and_at_another_path(
    make_mode: Callable[..., StandaloneMode],
) -> None:
    app = Recorder()
    gateway = GatewayMiddleware(app, mode=make_mode(), models_path="/api/models")
    master = {"authorization": f"Bearer {MASTER_KEY}"}

    async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
        await gateway({**scope, "root_path": "/gw", "path": "/gw" + scope["path"]}, receive, send)

    await call(mounted, "/api/models", method="GET", headers=master)
    await call(gateway, "/v1/models", method="GET", headers=master)
    [listed, not_listed] = app.models
    assert [m.id for m in listed] == ["gpt-test", "claude-test"]  # any name: models=None
    assert not_listed is None
    off = GatewayMiddleware(app, mode=make_mode(), models_path=None)
    await call(off, "/v1/models", method="GET")
    assert app.models[-1] is None


async def test_models_path_is_checked(make_mode: Callable[..., StandaloneMode]) -> None:
    for path in ("models", "/v1/models/", ""):
        with pytest.raises(ConfigurationError, match="models_path"):
            GatewayMiddleware(Recorder(), mode=make_mode(), models_path=path)


async def test_listing_refusals_use_the_client_s_envelope(
    make_mode: Callable[..., StandaloneMode], ledger: Ledger
) -> None:
    app = Recorder()
    gateway = GatewayMiddleware(app, mode=make_mode())
    openai_style = await call(gateway, "/v1/models", method="GET")
    anthropic_style = await call(
        gateway, "/v1/models", method="GET", headers={"x-api-key": "nope", "anthropic-version": "1"}
    )
    assert (openai_style.status, openai_style.json()["error"]["type"]) == (
        401,
        "invalid_request_error",
    )
    assert (anthropic_style.status, anthropic_style.json()["error"]["type"]) == (
        401,
        "authentication_error",
    )
    if isinstance(ledger, FakeLedger):
        ledger.down = True
        down = await call(gateway, "/v1/models", method="GET", headers={"x-api-key": "gk-x"})
        assert down.status == 503
        assert down.json()["error"]["type"] == "api_error"
    assert app.scopes == []
