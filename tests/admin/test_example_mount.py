"""examples/app.py mounts the admin page at /admin when (and only when) a master key is set."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount

from tests.admin.helpers import MASTER_KEY, log_in
from tests.examples.helpers import load_example

example = load_example("app")

pytestmark = pytest.mark.anyio


def admin_mounts(settings: object) -> list[Mount]:
    app = example.build_app(settings)
    return [r for r in app.routes if isinstance(r, Mount) and r.path == "/admin"]


def test_the_banner_names_the_admin_page_only_with_a_master_key() -> None:
    with_key = example.parse_settings([], {"GATEWAYKIT_MASTER_KEY": MASTER_KEY})
    assert "admin      http://127.0.0.1:8000/admin/" in example.banner(with_key, None)
    assert MASTER_KEY not in example.banner(with_key, None)
    without = example.parse_settings([], {})
    assert "GATEWAYKIT_MASTER_KEY opens an admin page" in example.banner(without, None)


def test_mounted_with_a_master_key_in_standalone_mode_only(tmp_path: Path) -> None:
    db = ["--db", f"sqlite:///{tmp_path / 'a.db'}"]
    env = {"GATEWAYKIT_MASTER_KEY": MASTER_KEY, "GATEWAYKIT_PLATFORM_TOKEN": "t" * 20}
    assert len(admin_mounts(example.parse_settings(db, env))) == 1
    assert admin_mounts(example.parse_settings(db, {})) == []
    platform = example.parse_settings([*db, "--platform", "http://127.0.0.1:9"], env)
    assert admin_mounts(platform) == []


async def test_the_mounted_page_logs_in_with_the_master_key(tmp_path: Path) -> None:
    settings = example.parse_settings(
        ["--db", f"sqlite:///{tmp_path / 'a.db'}"], {"GATEWAYKIT_MASTER_KEY": MASTER_KEY}
    )
    app = example.build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw/admin/") as http:
            assert (await log_in(http)).headers["location"] == "/admin/"
            assert "every invariant holds" in (await http.get("")).text
