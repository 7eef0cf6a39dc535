"""docs/quickstart.md, word for word, as a reader on a fresh checkout runs it.

``nox -s example`` is what the README has the reader run first: it installs gatewaykit
into ``.nox/example`` and runs ``python examples/app.py``. The test gives the checkout a
``.nox/example`` that is this test run's own environment, starts the example app as that
session does, and then runs every command and script of the page in order, in bash — the
key the reader copies is the one the page's ``keys create`` printed — and compares what
each printed with what the page shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.docs.blocks import ROOT, blocks
from tests.docs.transcript import expect_output, run, steps

pytestmark = pytest.mark.slow

PAGE = ROOT / "docs" / "quickstart.md"
README_COMMAND = "python3 -m pip install nox && nox -s example"


def page_port() -> int:
    """The page's port 8000 when it is free (another test run may hold it), else another."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8000))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def example_session(checkout: Path, env: dict[str, str], port: int) -> Iterator[None]:
    """What ``nox -s example`` starts, in ``checkout``."""
    log = (checkout / "gateway.log").open("w")
    args = [] if port == 8000 else ["--port", str(port)]
    process = subprocess.Popen(
        [sys.executable, "examples/app.py", *args], cwd=checkout, env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (checkout / "gateway.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def test_the_quickstart_word_for_word(tmp_path: Path) -> None:
    page = [b for b in blocks(PAGE) if b.runnable]
    first, *rest = page
    # Step 1 is the README's command, and the nox session it runs starts examples/app.py.
    assert first.text.strip() == README_COMMAND
    readme = [b for b in blocks(ROOT / "README.md") if b.language == "bash" and not b.fragment]
    [commands] = [[line for line in b.text.splitlines() if line and line[0] != "#"] for b in readme]
    # The README's second command runs this very suite (it cannot run itself).
    assert commands == [README_COMMAND, "python3 -m pip install nox && nox -s tests"]
    noxfile = (ROOT / "noxfile.py").read_text()
    assert 'session.run("python", "examples/app.py"' in noxfile
    assert 'session.run("pytest"' in noxfile

    checkout = tmp_path / "gatewaykit"
    checkout.mkdir()
    (checkout / "examples").symlink_to(ROOT / "examples")
    (checkout / ".nox").mkdir()
    (checkout / ".nox" / "example").symlink_to(sys.prefix)  # an environment with the groups
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    for name in ("GATEWAYKIT_DB", "GATEWAYKIT_MASTER_KEY", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)  # this checkout's gatewaykit, not the installed one
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # nothing of ours until `source … activate`

    copied: dict[str, str] = {}  # what the page shows → what the reader copies instead
    prelude: list[str] = []  # `source` and `export` lines carry over, as in one terminal
    port = page_port()
    with example_session(checkout, env, port):
        for block in rest:
            if block.language == "python":
                (checkout / "hello.py").write_text(block.text)
                continue
            for step in steps(block.text):
                command = step.command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                for shown, real in copied.items():
                    command = command.replace(shown, real)
                output = run(" && ".join([*prelude, command]), cwd=checkout, env=env)
                expect_output(step, output)
                if command.startswith(("source ", "export ")):
                    prelude.append(command)
                if "keys create" in command:
                    [(key, key_id)] = re.findall(r"(gk_([0-9a-f]{12})_\S+)", output)
                    [(shown_key, shown_id)] = re.findall(
                        r"(gk_([0-9a-f]{12})_\S+)", "\n".join(step.output)
                    )
                    copied = {shown_key: key, shown_id: key_id}
        assert copied, "the page never creates a key"
