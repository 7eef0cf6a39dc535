"""The admin page's security rules, in-process with httpx (no browser needed)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from gatewaykit.admin import admin_app
from gatewaykit.admin.security import COOKIE
from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import Ledger
from gatewaykit.ledger.sqlite import SQLiteLedger
from tests.admin.helpers import MASTER_KEY, csrf_of, form_id_of, log_in, post_form

pytestmark = pytest.mark.anyio

PAGES = ["", "keys", "budgets", "usage", "holds", "usage.csv"]
FORMS = ["keys", "budgets", "holds/sweep", "keys/abc/revoke", "logout"]


@contextlib.asynccontextmanager
async def admin_client(
    *,
    root_path: str = "",
    base: str = "http://gw",
    client: tuple[str, int] = ("127.0.0.1", 1234),
    **options: Any,
) -> AsyncIterator[tuple[httpx.AsyncClient, Ledger]]:
    options.setdefault("master_key", MASTER_KEY)
    options.setdefault("failure_delay", 0)
    async with SQLiteLedger(":memory:") as ledger:
        host = Starlette(routes=[Mount("/admin", admin_app(ledger, **options))])
        transport = httpx.ASGITransport(host, root_path=root_path, client=client)
        url = f"{base}{root_path}/admin/"
        async with httpx.AsyncClient(transport=transport, base_url=url) as http:
            yield http, ledger


async def test_every_page_and_form_needs_a_login() -> None:
    async with admin_client() as (http, ledger):
        for page in PAGES:
            response = await http.get(page)
            assert (response.status_code, response.headers["location"]) == (303, "/admin/login")
        token = csrf_of(await http.get("login"))  # a valid token of an anonymous session
        for form in FORMS:
            response = await http.post(form, data={"csrf": token, "user": "mallory"})
            assert (response.status_code, response.headers["location"]) == (303, "/admin/login")
        assert await ledger.list_keys() == []


async def test_login_sets_a_signed_strict_httponly_expiring_cookie_scoped_to_the_mount() -> None:
    async with admin_client() as (http, _):
        anonymous = (await http.get("login")).cookies[COOKIE]
        response = await log_in(http)
        assert (response.status_code, response.headers["location"]) == (303, "/admin/")
        cookie = response.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "samesite=strict" in cookie.lower()
        assert "path=/admin/" in cookie.lower()
        assert "max-age=28800" in cookie.lower()
        assert "secure" not in attributes  # plain http: a Secure cookie would never come back
        assert http.cookies[COOKIE] != anonymous  # a fresh session on login: no fixation
        assert MASTER_KEY not in cookie
        assert (await http.get("")).status_code == 200


async def test_over_https_the_cookie_is_secure() -> None:
    async with admin_client(base="https://gw") as (http, _):
        assert "secure" in (await log_in(http)).headers["set-cookie"].lower()


async def test_a_forged_or_tampered_cookie_is_a_stranger() -> None:
    async with admin_client() as (http, _):
        await log_in(http)
        value = http.cookies[COOKIE]
        payload, stamp, signature = value.split(".")
        assert (await http.get("keys")).status_code == 200
        for forged in (f"{payload}.{stamp}.{signature[:-2]}xx", "eyJuIjoieCIsImEiOnRydWV9", ""):
            http.cookies.clear()
            http.cookies.set(COOKIE, forged)
            assert (await http.get("keys")).status_code == 303


async def test_a_session_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    async with admin_client(session_ttl=60) as (http, _):
        await log_in(http)
        assert (await http.get("")).status_code == 200
        later = time.time() + 61
        monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later)
        assert (await http.get("")).status_code == 303


async def test_a_wrong_key_gets_one_generic_answer_after_a_delay() -> None:
    async with admin_client(failure_delay=0.2) as (http, _):
        answers = []
        for guess in ("", "x", MASTER_KEY[:-1], MASTER_KEY + "x", MASTER_KEY.upper()):
            started = time.monotonic()
            response = await log_in(http, guess)
            assert time.monotonic() - started >= 0.2
            assert response.status_code == 401
            assert COOKIE not in response.cookies or response.cookies[COOKIE] == ""
            answers.append(response.text.split("<main>")[1].replace(csrf_of(response), ""))
        assert len(set(answers)) == 1
        assert "not accepted" in answers[0]
        assert (await http.get("")).status_code == 303


async def test_guessing_is_limited_per_client_address() -> None:
    async with admin_client(max_failures=3) as (http, _):
        for _ in range(3):
            assert (await log_in(http, "wrong")).status_code == 401
        refused = await log_in(http)  # even the right key, while the limit holds
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert (await http.get("")).status_code == 303
    async with SQLiteLedger(":memory:") as ledger:
        app = admin_app(ledger, master_key=MASTER_KEY, failure_delay=0, max_failures=3)
        now = [1000.0]
        app.state.admin.throttle.clock = lambda: now[0]
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw/") as http:
            for _ in range(3):
                await log_in(http, "wrong")
            now[0] += 299
            assert (await log_in(http)).status_code == 429
            now[0] += 1.5  # the first failure has left the 300 s window
            assert (await log_in(http)).status_code == 303


async def test_the_limit_is_per_address() -> None:
    async with SQLiteLedger(":memory:") as ledger:
        app = admin_app(ledger, master_key=MASTER_KEY, failure_delay=0, max_failures=2)

        def client(address: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app, client=(address, 1))
            return httpx.AsyncClient(transport=transport, base_url="http://gw/")

        async with client("10.0.0.1") as guesser, client("10.0.0.2") as operator:
            for _ in range(2):
                await log_in(guesser, "wrong")
            assert (await log_in(guesser)).status_code == 429
            assert (await log_in(operator)).status_code == 303


async def test_every_form_refuses_a_missing_or_foreign_csrf_token() -> None:
    async with admin_client() as (http, ledger), admin_client() as (other, _):
        await log_in(http)
        await log_in(other)
        foreign = csrf_of(await other.get("keys"))
        for form in FORMS:
            for data in ({}, {"csrf": ""}, {"csrf": foreign}, {"csrf": "x" * 64}):
                response = await http.post(form, data={**data, "user": "mallory"})
                assert response.status_code == 403, (form, data)
                assert "expired or did not come from this page" in response.text
        assert await ledger.list_keys() == []
        # The login form is protected too (login CSRF).
        await http.post("logout", data={"csrf": csrf_of(await http.get(""))})
        response = await http.post("login", data={"master_key": MASTER_KEY})
        assert response.status_code == 403


async def test_values_are_escaped_everywhere_they_are_shown() -> None:
    evil = "<script>alert(1)</script>"
    async with admin_client() as (http, ledger):
        await log_in(http)
        created = await post_form(http, "keys", "keys", {"user": evil, "team": evil})
        assert created.status_code == 200
        await post_form(http, "budgets", "budgets", {"scope": f"user:{evil}", "limit": "3"})
        [key] = await ledger.list_keys(user=evil)
        pages = [created, await http.get("keys"), await http.get("budgets")]
        pages.append(await http.get(f"keys/{key.key_id}/revoke"))
        for page in pages:
            assert evil not in page.text
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


async def test_the_new_key_is_shown_once_and_never_in_a_url_or_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin_client() as (http, ledger):
        await log_in(http)
        created = await post_form(http, "keys", "keys", {"user": "alice"})
        assert created.status_code == 200  # not a redirect: the key is in no URL
        assert created.headers["cache-control"] == "no-store"
        [record] = await ledger.list_keys()
        key = created.text.split('id="new-key">')[1].split("<")[0]
        assert key.startswith(f"gk_{record.key_id}_")
        assert key not in (await http.get("keys")).text
        assert key not in caplog.text
        assert MASTER_KEY not in caplog.text


async def test_a_resent_create_form_makes_no_second_key_and_shows_no_secret() -> None:
    async with admin_client() as (http, ledger):
        await log_in(http)
        form = await http.get("keys")
        data = {"csrf": csrf_of(form), "form_id": form_id_of(form), "user": "alice"}
        first = await http.post("keys", data=data)
        assert first.status_code == 200
        [record] = await ledger.list_keys()
        again = await http.post("keys", data=data)  # what a reload of the result does
        assert again.status_code == 409
        assert f"already sent: it created key {record.key_id}" in again.text
        key = first.text.split('id="new-key">')[1].split("<")[0]
        assert key.startswith(f"gk_{record.key_id}_")
        assert key not in again.text
        assert len(await ledger.list_keys()) == 1
        assert (await http.post("keys", data={**data, "form_id": ""})).status_code == 400


async def test_headers_forbid_framing_foreign_scripts_and_caching() -> None:
    async with admin_client() as (http, _):
        for response in (await http.get("login"), await http.get("static/admin.css")):
            policy = response.headers["content-security-policy"]
            assert "default-src 'none'" in policy
            assert "frame-ancestors 'none'" in policy
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "no-store"


async def test_links_redirects_and_cookie_follow_the_root_path() -> None:
    async with admin_client(root_path="/proxy") as (http, _):
        assert (await http.get("keys")).headers["location"] == "/proxy/admin/login"
        login = await http.get("login")
        assert 'action="/proxy/admin/login"' in login.text
        assert 'href="/proxy/admin/static/admin.css"' in login.text
        response = await log_in(http)
        assert response.headers["location"] == "/proxy/admin/"
        assert "path=/proxy/admin/" in response.headers["set-cookie"].lower()
        page = await http.get("")
        assert 'href="/proxy/admin/keys"' in page.text
        assert (await http.get("static/admin.js")).status_code == 200


Check = Callable[[Request], "bool | Awaitable[bool]"]


async def test_behind_the_hosts_login() -> None:
    async def only_admins(request: Request) -> bool:
        return request.headers.get("x-user") == "root"

    async with admin_client(master_key=None, authorize=only_admins, secret_key="s" * 32) as (
        http,
        _,
    ):
        assert (await http.get("")).status_code == 403
        http.headers["x-user"] = "root"
        assert (await http.get("")).status_code == 200
        assert (await http.get("login")).headers["location"] == "/admin/"
        assert "Log out" not in (await http.get("")).text
        created = await post_form(http, "keys", "keys", {"user": "alice"})
        assert created.status_code == 200
        assert (await http.post("keys", data={"user": "bob"})).status_code == 403  # CSRF still
    # With both, both are needed.
    async with admin_client(authorize=lambda request: True) as (http, _):
        assert (await http.get("")).status_code == 303


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "master_key=... or authorize"),
        ({"master_key": "short"}, "at least 16"),
        ({"authorize": lambda r: True}, "secret_key"),
        ({"master_key": MASTER_KEY, "secret_key": "short"}, "at least 16 bytes"),
        ({"master_key": MASTER_KEY, "session_ttl": 0}, "session_ttl"),
    ],
)
async def test_configuration_is_checked(options: dict[str, Any], message: str) -> None:
    async with SQLiteLedger(":memory:") as ledger:
        with pytest.raises(ConfigurationError, match=message):
            admin_app(ledger, **options)


async def test_the_master_key_is_in_no_repr() -> None:
    async with SQLiteLedger(":memory:") as ledger:
        app = admin_app(ledger, master_key=MASTER_KEY)
        assert MASTER_KEY not in repr(app.state.admin)
        assert MASTER_KEY not in repr(vars(app.state.admin))
