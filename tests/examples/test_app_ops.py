"""examples/app.py --ops-port: the official SDKs through the app, then its /metrics,
/livez and /readyz on the operator's port agree with the ledger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.examples.test_app import APP, environment, free_port, gatewaykit

pytestmark = pytest.mark.slow


@dataclass
class Gateway:
    url: str
    ops: str
    db: str
    log: Path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("ops")
    db = f"sqlite:///{directory / 'gateway.db'}"
    port, ops_port = free_port(), free_port()
    log = directory / "app.log"
    with log.open("w") as out:
        command = [sys.executable, str(APP), "--port", str(port), "--db", db]
        process = subprocess.Popen(
            [*command, "--ops-port", str(ops_port)],
            env=environment(), stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    gateway = Gateway(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ops_port}", db, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{gateway.ops}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the example app did not start"
            time.sleep(0.1)
        yield gateway
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def metrics(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{gateway.ops}/metrics")
    assert response.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_agree_with_the_ledger(gateway: Gateway) -> None:
    created = gatewaykit("--db", gateway.db, "keys", "create", "--user", "dora", "--json")
    key = json.loads(created.stdout)["key"]
    broke = json.loads(
        gatewaykit(
            "--db", gateway.db, "keys", "create", "--user", "eve", "--budget", "0", "--json"
        ).stdout
    )["key"]
    chat = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    for _ in range(2):
        stream = chat.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    claude.messages.create(
        model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "Hi"}]
    )
    poor = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=broke, max_retries=0)
    with pytest.raises(openai.APIStatusError):
        poor.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )

    samples = metrics(gateway)
    records = json.loads(gatewaykit("--db", gateway.db, "usage", "--user", "dora", "--json").stdout)
    for model in ("gpt-4o-mini", "claude-haiku-4-5"):
        spent = sum((Decimal(r["cost"]) for r in records if r["model"] == model), Decimal(0))
        assert spent > 0
        counted = samples[("gatewaykit_cost_usd_total", frozenset({("model", model)}))]
        assert f"{counted:.9f}" == f"{spent:.9f}"  # the ledger's precision: nano-USD
    success = {("route", "/v1/chat/completions"), ("model", "gpt-4o-mini"), ("outcome", "success")}
    assert samples[("gatewaykit_requests_total", frozenset(success))] == 2
    budget = frozenset({("route", "/v1/chat/completions"), ("reason", "budget")})
    assert samples[("gatewaykit_denials_total", budget)] == 1
    assert samples[("gatewaykit_holds_live", frozenset())] == 0
    assert samples[("gatewaykit_held_usd", frozenset())] == 0


def test_health_on_the_ops_port_only(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.ops}/livez").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.ops}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"ledger": "ok"}
    assert httpx.get(f"{gateway.url}/metrics").status_code == 404  # not on the API port


def test_banner_names_the_ops_port(gateway: Gateway) -> None:
    assert f"GET {gateway.ops}/metrics  {gateway.ops}/livez  {gateway.ops}/readyz" in (
        gateway.log.read_text()
    )
