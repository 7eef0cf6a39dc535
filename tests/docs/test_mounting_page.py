"""docs/mounting.md: ``main.py`` served with the page's own command lists the gateway's
routes in FastAPI's OpenAPI schema and answers on them in the provider's envelope."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.docs.blocks import ROOT, assembled, blocks
from tests.serve.test_serve import free_port, process, wait_ready

pytestmark = pytest.mark.slow

PAGE = ROOT / "docs" / "mounting.md"


def test_main_py_serves_with_the_gateway_routes_in_its_openapi_schema(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(assembled(PAGE)["main.py"])
    [command] = [b.text.strip() for b in blocks(PAGE) if b.language == "bash" and not b.fragment]
    assert command == "uvicorn main:app"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "GATEWAYKIT_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port = free_port()
    env["UVICORN_PORT"] = str(port)  # uvicorn's own variable: the page's command, verbatim
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "uvicorn.log"
    with process(["-m", *command.split()], log, env) as child:
        wait_ready(f"{url}/openapi.json", child, log)
        schema = httpx.get(f"{url}/openapi.json").json()
        refused = httpx.post(f"{url}/v1/chat/completions", json={})
        docs = httpx.get(f"{url}/docs")
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        operation = schema["paths"][path]["post"]
        assert {"200", "401", "402"} <= operation["responses"].keys()
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert docs.status_code == 200
