"""examples/app.py end to end: a real process, the CLI, and the official SDKs as clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner, Result

from gatewaykit.cli import main
from gatewaykit.testing import FakeBehavior
from tests.examples.helpers import load_example

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "app.py"
UPSTREAM_VARIABLES = (
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_API_KEY",
)

pytestmark = pytest.mark.slow


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UPSTREAM_VARIABLES}
    env.pop("GATEWAYKIT_DB", None)
    env.pop("GATEWAYKIT_MASTER_KEY", None)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gatewaykit(*args: str) -> Result:
    """The command line, in-process (a Python start per call would dominate the run time)."""
    return CliRunner().invoke(main, list(args))


@dataclass
class Gateway:
    url: str
    db: str
    port: int
    log: Path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One example app for the module; its shutdown on Ctrl+C is checked at the end."""
    directory = tmp_path_factory.mktemp("app")
    db = f"sqlite:///{directory / 'gateway.db'}"
    port = free_port()
    log = directory / "app.log"  # a file, so a chatty log cannot block the app
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(port), "--db", db, "--hold-ttl", "120"],
            env=environment(), stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the example app did not start"
            time.sleep(0.1)
        yield Gateway(url=url, db=db, port=port, log=log)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    # The fake provider shares uvicorn's loggers; its lines are not the server's (issue 15 §4).
    for line in ("Started server process", "Shutting down", "Finished server process"):
        assert text.count(line) == 1, text


def test_each_request_is_logged_once(gateway: Gateway) -> None:
    """The built-in fake provider's own access lines stay out of the gateway's log."""
    key = create_key(gateway, "dave")["key"]
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    before = gateway.log.read_text().count('"POST /v1/responses HTTP/1.1" 200')
    client.responses.create(model="gpt-4o-mini", input="Hi")
    deadline = time.monotonic() + 5
    while gateway.log.read_text().count('"POST /v1/responses HTTP/1.1" 200') == before:
        assert time.monotonic() < deadline, "the request was not logged"
        time.sleep(0.05)
    # The gateway answers after reading the fake provider's whole answer, so a line of the
    # provider's would have been written (and flushed) before the gateway's own.
    assert gateway.log.read_text().count('"POST /v1/responses HTTP/1.1" 200') == before + 1


def create_key(gateway: Gateway, user: str, *budget: str) -> dict[str, Any]:
    created = gatewaykit("--db", gateway.db, "keys", "create", "--user", user, *budget, "--json")
    assert created.exit_code == 0, created.output
    return dict(json.loads(created.stdout))


def budget_of(gateway: Gateway, scope: str) -> dict[str, Any]:
    shown = gatewaykit("--db", gateway.db, "budgets", "show", scope, "--json")
    assert shown.exit_code == 0, shown.output
    [budget] = json.loads(shown.stdout)
    return dict(budget)


def test_streamed_request_through_the_openai_sdk_is_charged(gateway: Gateway) -> None:
    key = create_key(gateway, "alice", "--budget", "5")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key["key"], max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == FakeBehavior().output_text

    budget = budget_of(gateway, f"key:{key['key_id']}")
    assert budget["limit"] == "5"
    assert budget["held"] == "0"
    assert Decimal(budget["spent"]) > 0
    assert Decimal(budget["remaining"]) == 5 - Decimal(budget["spent"])

    [record] = json.loads(
        gatewaykit("--db", gateway.db, "usage", "--user", "alice", "--json").stdout
    )
    assert record["status"] == "success"
    assert record["usage_source"] == "provider"
    assert record["cost"] == budget["spent"]
    assert gatewaykit("--db", gateway.db, "check").exit_code == 0


def test_anthropic_and_responses_routes(gateway: Gateway) -> None:
    key = create_key(gateway, "bob")["key"]
    messages = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    with messages.messages.stream(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == FakeBehavior().output_text
    responses = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    answer = responses.responses.create(model="gpt-4o-mini", input="Hi")
    assert answer.output_text == FakeBehavior().output_text
    records = json.loads(gatewaykit("--db", gateway.db, "usage", "--user", "bob", "--json").stdout)
    assert sorted(r["model"] for r in records) == ["claude-haiku-4-5", "gpt-4o-mini"]
    assert gatewaykit("--db", gateway.db, "check").exit_code == 0


def test_exhausted_budget_is_refused_in_the_openai_envelope(gateway: Gateway) -> None:
    key = create_key(gateway, "carol", "--budget", "0")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key["key"], max_retries=0)
    with pytest.raises(openai.APIStatusError) as denied:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
        )
    assert denied.value.status_code == 402
    assert isinstance(denied.value.body, dict)
    assert denied.value.body["code"] == "budget_exceeded"
    bad_key = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="gk_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
        )


def test_embeddings_models_count_tokens_and_unknown_paths(gateway: Gateway) -> None:
    """Issue 15 point 6 / issue 16, as a new user tries them against the example app."""
    key = create_key(gateway, "dora", "--budget", "1")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key["key"], max_retries=0)
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(vectors.data) == 2
    assert "text-embedding-3-small" in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        client.fine_tuning.jobs.list()
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key["key"], max_retries=0)
    counted = claude.messages.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "Hi"}]
    )
    assert counted.input_tokens == FakeBehavior().input_tokens
    [record] = json.loads(
        gatewaykit("--db", gateway.db, "usage", "--user", "dora", "--json").stdout
    )
    assert (record["endpoint"], record["input_tokens"]) == ("embeddings", 24)
    assert Decimal(record["cost"]) == Decimal("0.00000048")  # 24 tokens × $0.02 per million
    assert budget_of(gateway, f"key:{key['key_id']}")["spent"] == record["cost"]
    assert gatewaykit("--db", gateway.db, "check").exit_code == 0


def test_healthz(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok", "mode": "StandaloneMode"}


def test_banner_names_address_database_upstream_and_the_key_command(gateway: Gateway) -> None:
    lines = gateway.log.read_text().splitlines()
    banner = "\n".join(lines)
    assert f"http://127.0.0.1:{gateway.port}" in banner
    assert gateway.db in banner
    assert "fake provider" in banner
    [command] = [line.strip() for line in lines if "keys create" in line]
    assert command.endswith(f"--db {gateway.db} keys create --user alice --budget 5")
    # The printed command works as printed.
    created = subprocess.run(
        [*command.split(), "--json"],
        env=environment(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["user"] == "alice"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--db", "nonsense"], {}, "not a ledger URL"),
        (["--platform", "http://127.0.0.1:9"], {}, "GATEWAYKIT_PLATFORM_TOKEN"),
        ([], {"GATEWAYKIT_MASTER_KEY": "short"}, "master_key"),
    ],
)
def test_configuration_errors_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name in (*UPSTREAM_VARIABLES, "GATEWAYKIT_DB", "GATEWAYKIT_MASTER_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    db = [] if "--db" in args else ["--db", f"sqlite:///{tmp_path / 'x.db'}"]
    with pytest.raises(SystemExit) as exited:
        load_example("app").main(["--port", "1", *db, *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
