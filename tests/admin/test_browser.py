"""The admin page in headless Chromium, mounted in the example app, with the openai SDK.

Chromium is Debian's package (``apt-get install chromium``), driven by Playwright through
``executable_path`` (never ``playwright install``). Without it these tests skip and say
why. Each page is photographed at 1280×800 and at phone width (and checked not to
overflow sideways there); with ``GATEWAYKIT_UPDATE_SCREENSHOTS=1`` the pictures replace
the ones in docs/images/admin/.
"""

from __future__ import annotations

import concurrent.futures
import csv
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from gatewaykit.cli import main as gatewaykit_cli

CHROMIUM = os.environ.get("GATEWAYKIT_TEST_CHROMIUM") or next(
    filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser"))), None
)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium: `apt-get install chromium` (Debian's package) runs the admin "
        "page's browser tests",
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package")

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "images" / "admin"
MASTER_KEY = "browser-test-master-key-0123456789"
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}


@dataclass
class Gateway:
    url: str
    db: str

    @property
    def admin(self) -> str:
        return f"{self.url}/admin/"


def _size(name: str) -> dict[str, int]:
    width, height = VIEWPORTS[name]
    return {"width": width, "height": height}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """examples/app.py with a master key: the fake provider upstream, the admin at /admin."""
    directory = tmp_path_factory.mktemp("admin-app")
    db, port = f"sqlite:///{directory / 'gateway.db'}", _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    env.update(PYTHONPATH=str(ROOT), GATEWAYKIT_MASTER_KEY=MASTER_KEY)
    env.pop("GATEWAYKIT_DB", None)
    log = directory / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "app.py"), "--port", str(port), "--db", db,
             "--denials-flush", "0.2"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
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
            time.sleep(0.1)  # polling a starting process: there is no event to await
        assert f"{url}/admin/" in log.read_text()  # the banner names the admin page
        yield Gateway(url=url, db=db)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "Traceback" not in text
    assert MASTER_KEY not in text


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, gateway: Gateway) -> Iterator[Any]:
    context = browser.new_context(viewport=_size("desktop"))
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gateway.url)
    context.set_default_timeout(10_000)
    tab = context.new_page()
    dialogs: list[str] = []

    def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    tab.on("dialog", dismiss)
    yield tab
    assert dialogs == [], "a script ran that the page never ships"
    context.close()


def log_in(page: Any, gateway: Gateway, key: str = MASTER_KEY) -> None:
    page.goto(gateway.admin)
    assert page.url == f"{gateway.admin}login"
    page.fill("input[name=master_key]", key)
    page.click("button[type=submit]:has-text('Log in')")


def shoot(page: Any, name: str, tmp_path: Path) -> None:
    """Photograph the page at each width; at phone width nothing may overflow sideways."""
    for size, (width, _) in VIEWPORTS.items():
        page.set_viewport_size(_size(size))
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} overflows by {overflow}px at {width}px"
        path = tmp_path / f"{name}-{size}.png"
        page.screenshot(path=str(path), full_page=size == "desktop")
        if os.environ.get("GATEWAYKIT_UPDATE_SCREENSHOTS") == "1":
            SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, SHOTS / path.name)
    page.set_viewport_size(_size("desktop"))


def cli(gateway: Gateway, *args: str) -> Any:
    """The command line, in-process on a thread of its own (Playwright's loop owns this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        invoke = CliRunner().invoke
        argv = ["--db", gateway.db, *args, "--json"]
        result = thread.submit(invoke, gatewaykit_cli, argv).result()
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def chat(gateway: Gateway, key: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
    )


def test_an_operator_creates_watches_and_revokes_a_key(
    page: Any, gateway: Gateway, tmp_path: Path
) -> None:
    page.goto(gateway.admin)
    shoot(page, "login", tmp_path)
    log_in(page, gateway, "not-the-master-key")
    assert page.locator("[role=alert]").inner_text() == "That key was not accepted."
    log_in(page, gateway)
    assert page.url == gateway.admin
    assert "every invariant holds" in page.inner_text("#check")

    # Create a key with a monthly budget; the secret is shown once, with a copy button.
    page.click("nav >> text=Keys")
    page.fill("input[name=user]", "alice")
    page.fill("input[name=budget]", "5")
    page.select_option("select[name=period]", "month")
    page.click("button:has-text('Create key')")
    key = page.inner_text("#new-key")
    key_id = key.split("_")[1]
    assert key.startswith("gk_")
    assert key not in page.url
    page.click("button[data-copy=new-key]")
    page.wait_for_selector("button[data-copy=new-key]:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == key
    page.reload()  # resends the POST: no second key, and the secret is not shown again
    assert "This form was already sent" in page.inner_text("[role=alert]")
    assert key not in page.content()
    assert [k["key_id"] for k in cli(gateway, "keys", "list") if k["user"] == "alice"] == [key_id]

    # The openai SDK uses it against the example app; the spend shows on every page.
    chat(gateway, key)
    [record] = cli(gateway, "usage", "--user", "alice")
    cost = Decimal(record["cost"])
    assert cost > 0
    shown = "$" + f"{cost.normalize():f}"
    page.goto(f"{gateway.admin}keys")
    assert page.locator(f"#key-{key_id}").inner_text().count("never") == 1  # used: expiry only
    shoot(page, "keys", tmp_path)

    # A wrong key (401) and a key over its budget (402) are refused; each gateway process
    # adds its counts to the ledger every --denials-flush seconds (0.2 here).
    with pytest.raises(openai.AuthenticationError):
        chat(gateway, key + "x")
    broke = cli(gateway, "keys", "create", "--user", "bob", "--budget", "0")
    with pytest.raises(openai.APIStatusError) as refused:
        chat(gateway, broke["key"])
    assert refused.value.status_code == 402

    page.click("nav >> text=Overview")
    assert page.inner_text("#spent-today") == shown
    assert page.inner_text("#requests-24h") == "1"
    assert "alice" in page.inner_text("main")
    deadline = time.monotonic() + 10
    while page.inner_text("#denials-24h") != "2":
        assert time.monotonic() < deadline, page.inner_text("main")
        time.sleep(0.1)  # the next flush is a timer in another process: poll the page
        page.reload()
    reasons = page.inner_text("#denials-by-reason")
    assert "Bad or missing key (401): 1" in reasons
    assert "Budget exhausted (402): 1" in reasons
    shoot(page, "overview", tmp_path)

    page.click("nav >> text=Budgets")
    row = page.locator("#budgets tr", has_text=f"key:{key_id}")
    assert shown in row.inner_text()
    assert "$5.00 per month" in row.inner_text()
    shoot(page, "budgets", tmp_path)

    page.click("nav >> text=Usage")
    page.fill("input[name=user]", "alice")
    page.click("button:has-text('Filter')")
    assert "user=alice" in page.url
    assert page.inner_text("#usage-cost") == shown
    assert page.locator("#usage tbody tr").count() == 1
    assert page.locator("svg.chart rect").count() >= 1
    assert "gpt-4o-mini" in page.inner_text(".legend")
    shoot(page, "usage", tmp_path)
    with page.expect_download() as download_info:
        page.click("#csv")
    download = download_info.value
    assert download.suggested_filename == "gatewaykit-usage.csv"
    rows = list(csv.DictReader(Path(download.path()).read_text().splitlines()))
    assert [(r["user"], r["key_id"], r["model"]) for r in rows] == [
        ("alice", key_id, "gpt-4o-mini")
    ]
    assert Decimal(rows[0]["cost"]) == cost

    page.click("nav >> text=Holds")
    page.click("button:has-text('Sweep expired holds')")
    assert "Sweep expired 0 holds." in page.inner_text("main")
    shoot(page, "holds", tmp_path)

    # Revoke, with a confirmation; the SDK is refused from then on.
    page.click("nav >> text=Keys")
    page.click(f"#key-{key_id} >> text=Revoke")
    assert "Revoke key" in page.inner_text("h1")
    shoot(page, "revoke", tmp_path)
    page.click("button:has-text('Revoke the key')")
    assert f"Revoked key {key_id}." in page.inner_text("main")
    assert "revoked" in page.locator(f"#key-{key_id}").inner_text()
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(gateway, key)
    assert refused.value.status_code == 401
    assert [k["revoked"] for k in cli(gateway, "keys", "list") if k["key_id"] == key_id] == [True]
    assert cli(gateway, "check")["ok"]


def test_a_user_id_with_markup_is_shown_not_run(page: Any, gateway: Gateway) -> None:
    evil = "<script>alert(1)</script><img/src/onerror=alert(2)>"
    log_in(page, gateway)
    page.goto(f"{gateway.admin}keys")
    page.fill("input[name=user]", evil)
    page.click("button:has-text('Create key')")
    assert f"Key created for {evil}" in page.inner_text(".created h2")
    page.goto(f"{gateway.admin}keys")
    row = page.locator("#keys tbody tr", has_text=evil)
    assert row.locator("td").nth(1).inner_text() == evil
    assert page.locator("#keys img").count() == 0
    assert page.locator("main script").count() == 0
    page.goto(f"{gateway.admin}budgets")
    page.fill("input[name=scope]", f"user:{evil}")
    page.fill("input[name=limit]", "1")
    page.click("button:has-text('Save')")
    assert f"Budget user:{evil} saved." in page.inner_text("main")
    assert page.locator("main img").count() == 0
    # The page fixture fails the test if any dialog (alert) opened.


def test_a_forged_form_changes_nothing(page: Any, gateway: Gateway) -> None:
    log_in(page, gateway)
    page.goto(f"{gateway.admin}keys")
    page.fill("input[name=user]", "mallory")
    page.eval_on_selector("form.grid input[name=csrf]", "input => input.value = 'forged'")
    page.click("button:has-text('Create key')")
    assert page.inner_text("h1") == "Form expired"
    assert [k for k in cli(gateway, "keys", "list") if k["user"] == "mallory"] == []

    # Another site's page posting to the admin: SameSite=Strict keeps the cookie home.
    attack = (
        f'<form id="f" method="post" action="{gateway.admin}keys">'
        '<input name="user" value="mallory"><input name="csrf" value="guess"></form>'
        "<script>document.getElementById('f').submit()</script>"
    ).encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with page.expect_navigation(url=f"{gateway.admin}login"):
            page.goto(f"http://localhost:{server.server_address[1]}/")  # another site
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert [k for k in cli(gateway, "keys", "list") if k["user"] == "mallory"] == []
