"""docs/custom-handlers.md: the ``translate.py`` its parts build serves and settles.

The page's three parts, pasted in order, run under uvicorn in front of gatewaykit's fake
provider (an OpenAI-compatible server on its own port, named by ``OPENAI_BASE_URL`` as the
page's part 3 reads it); a key made with the command line translates, and is charged.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from gatewaykit.cli import main
from gatewaykit.testing import FakeBehavior
from tests.docs.blocks import ROOT, assembled
from tests.serve.test_serve import environment, fake_provider, free_port, process, wait_ready

pytestmark = pytest.mark.slow

PAGE = ROOT / "docs" / "custom-handlers.md"
SECRET = "sk-fake-upstream-secret"  # what tests.serve's fake provider requires


def cli(*args: str) -> object:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_translate_py_from_the_page_serves_and_settles(tmp_path: Path) -> None:
    (tmp_path / "translate.py").write_text(assembled(PAGE)["translate.py"])
    db = f"sqlite:///{tmp_path / 'gatewaykit.db'}"
    port = free_port()
    log = tmp_path / "translate.log"
    with fake_provider(tmp_path) as fake:
        env = environment(OPENAI_BASE_URL=f"{fake}/v1", OPENAI_API_KEY=SECRET)
        args = ["-m", "uvicorn", "translate:app", "--port", str(port)]
        with process(args, log, env) as child:
            url = f"http://127.0.0.1:{port}"
            wait_ready(f"{url}/v1/translate", child, log)  # 405 for a GET, once it is up
            created = cli("--db", db, "keys", "create", "--user", "alice", "--budget", "1")
            assert isinstance(created, dict)
            headers = {"authorization": f"Bearer {created['key']}"}
            body = {"model": "gpt-4o-mini", "text": "Good morning", "to": "French"}
            with httpx.stream("POST", f"{url}/v1/translate", json=body, headers=headers) as r:
                assert r.status_code == 200, r.read()
                assert r.read().decode() == FakeBehavior().output_text
            refused = httpx.post(f"{url}/v1/translate", json={"model": 1}, headers=headers)
            assert refused.status_code == 400
            assert "send {'model': str" in refused.json()["error"]["message"]
    records = cli("--db", db, "usage")
    assert isinstance(records, list)
    [record] = records
    assert record["status"] == "success"
    assert Decimal(record["cost"]) > 0
    assert cli("--db", db, "check") == {"ok": True, "violations": []}
