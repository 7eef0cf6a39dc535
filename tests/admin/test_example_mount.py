"""The example app and ``gatewaykit serve`` mount the admin page when configured to."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount

from gatewaykit import server
from gatewaykit.config import parse_config
from gatewaykit.errors import ConfigurationError
from tests.admin.helpers import MASTER_KEY, log_in
from tests.examples.helpers import load_example

example = load_example("app")

pytestmark = pytest.mark.anyio


def admin_mounts(settings: object) -> list[Mount]:
    app = example.build_app(settings)
    return [r for r in app.routes if isinstance(r, Mount) and r.path == "/admin"]


def test_the_banner_names_the_admin_page_only_with_a_master_key() -> None:
    with_key = example.parse_settings([], {"GATEWAYKIT_MASTER_KEY": MASTER_KEY})
    assert "admin      http://127.0.0.1:8000/admin/" in example.banner(with_key, 1)
    assert MASTER_KEY not in example.banner(with_key, 1)
    without = example.parse_settings([], {})
    assert "GATEWAYKIT_MASTER_KEY opens an admin page" in example.banner(without, 1)


def test_mounted_with_a_master_key_in_standalone_mode_only(tmp_path: Path) -> None:
    db = ["--db", f"sqlite:///{tmp_path / 'a.db'}"]
    upstream = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    env = {"GATEWAYKIT_MASTER_KEY": MASTER_KEY, "GATEWAYKIT_PLATFORM_TOKEN": "t" * 20}
    assert len(admin_mounts(example.parse_settings(db, {**env, **upstream}))) == 1
    assert admin_mounts(example.parse_settings(db, upstream)) == []
    platform = example.parse_settings([*db, "--platform", "http://127.0.0.1:9"], env)
    assert admin_mounts(platform) == []


async def test_the_mounted_page_logs_in_with_the_master_key(tmp_path: Path) -> None:
    settings = example.parse_settings(
        ["--db", f"sqlite:///{tmp_path / 'a.db'}"],
        {"GATEWAYKIT_MASTER_KEY": MASTER_KEY, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
    )
    app = example.build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw/admin/") as http:
            assert (await log_in(http)).headers["location"] == "/admin/"
            assert "every invariant holds" in (await http.get("")).text


UPSTREAM = {"base_url": "http://127.0.0.1:9/v1"}
KEYED = {"master_key_env": "MK"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"upstreams": [UPSTREAM], "admin": {"enabled": True}}, "needs standalone mode"),
        (
            {"platform": {"url": "http://p", "token_env": "MK"}, "admin": {"enabled": True}},
            "needs standalone mode",
        ),
        ({"upstreams": [UPSTREAM], "standalone": KEYED, "admin": {"path": "admin"}}, "admin.path"),
        ({"upstreams": [UPSTREAM], "standalone": KEYED, "admin": {"path": "/"}}, "admin.path"),
        ({"upstreams": [UPSTREAM], "admin": {"session_ttl": 0}}, "admin.session_ttl"),
    ],
)
def test_the_admin_section_is_checked(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_config(data, environ={"MK": MASTER_KEY})


def test_serve_mounts_the_admin_page_where_the_file_says(tmp_path: Path) -> None:
    data = {
        "ledger": {"url": f"sqlite:///{tmp_path / 'a.db'}"},
        "upstreams": [UPSTREAM],
        "standalone": KEYED,
        "admin": {"enabled": True, "path": "/ops/admin"},
    }
    app = server.build_app(parse_config(data, environ={"MK": MASTER_KEY}))
    assert [r.path for r in app.routes if isinstance(r, Mount)] == ["/ops/admin"]
    del data["admin"]
    app = server.build_app(parse_config(data, environ={"MK": MASTER_KEY}))
    assert [r for r in app.routes if isinstance(r, Mount)] == []
