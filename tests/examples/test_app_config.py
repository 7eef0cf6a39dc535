"""examples/app.py configuration: flags, the SDKs' variables, prices, the start message."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path

from gatewaykit import StandaloneMode, server
from tests.examples.helpers import load_example

example = load_example("app")
#: An upstream, so build_app has something to route to without the fake provider's socket.
ONLINE = {"openai_base_url": "https://api.openai.com/v1"}


def test_defaults_are_offline_standalone() -> None:
    settings = example.parse_settings([], {})
    assert settings.db == "sqlite:///gatewaykit.db"
    assert (settings.host, settings.port, settings.hold_ttl) == ("127.0.0.1", 8000, 600.0)
    assert settings.platform is None
    assert settings.offline


def test_database_from_flag_over_environment() -> None:
    env = {"GATEWAYKIT_DB": "sqlite:///from-env.db"}
    assert example.parse_settings([], env).db == "sqlite:///from-env.db"
    assert example.parse_settings(["--db", "sqlite:///flag.db"], env).db == "sqlite:///flag.db"
    # Platform mode keeps its outbox apart from a standalone ledger by default.
    platform = example.parse_settings(["--platform", "https://plane.example"], {})
    assert platform.db == "sqlite:///gatewaykit-outbox.db"


def test_upstreams_follow_the_sdks_variables() -> None:
    settings = example.parse_settings(
        [], {"OPENAI_API_KEY": "sk-openai-secret", "ANTHROPIC_BASE_URL": "http://claude:9000/"}
    )
    assert not settings.offline
    openai, anthropic = example.configured_upstreams(settings, None)
    assert (openai.provider, openai.base_url) == ("openai", "https://api.openai.com/v1")
    assert openai.api_key == "sk-openai-secret"
    assert (anthropic.provider, anthropic.base_url) == ("anthropic", "http://claude:9000")
    assert anthropic.api_key is None
    only_openai = example.parse_settings([], {"OPENAI_BASE_URL": "http://vllm:8000/v1"})
    [upstream] = example.configured_upstreams(only_openai, None)
    assert upstream.base_url == "http://vllm:8000/v1"

    banner = example.banner(settings, None)
    assert "https://api.openai.com/v1" in banner
    assert "http://claude:9000" in banner
    assert "sk-openai-secret" not in banner
    assert "sk-openai-secret" not in repr(settings)


def test_fake_upstreams_serve_all_three_formats() -> None:
    openai, anthropic = example.configured_upstreams(example.parse_settings([], {}), 4321)
    assert openai.base_url == "http://127.0.0.1:4321/v1"
    assert anthropic.base_url == "http://127.0.0.1:4321"


def test_price_file_is_merged_over_the_defaults(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {
                "llama-3.1-70b": {"input_per_mtok": "0.59", "output_per_mtok": "0.79"},
                "gpt-4o": {"input_per_mtok": "1", "output_per_mtok": "2"},
            }
        )
    )
    table = example.load_prices(example.parse_settings(["--prices", str(prices)], {}))
    assert table["llama-3.1-70b"].output_per_mtok == Decimal("0.79")
    assert table["gpt-4o"].input_per_mtok == Decimal(1)
    assert "gpt-4o-mini" in table


def test_platform_banner_names_the_control_plane_and_outbox() -> None:
    settings = example.parse_settings(
        ["--platform", "https://plane.example", "--db", "sqlite:///outbox.db"],
        {"GATEWAYKIT_PLATFORM_TOKEN": "gw-secret"},
    )
    assert not settings.offline
    banner = example.banner(settings, None)
    assert "https://plane.example" in banner
    assert "outbox.db" in banner
    assert "gw-secret" not in banner
    assert "gw-secret" not in repr(settings)


def test_redis_flag_is_named_in_the_banner_without_its_password() -> None:
    settings = example.parse_settings(["--redis", "redis://:hunter2@cache.internal:6380/2"], {})
    assert settings.redis == "redis://:hunter2@cache.internal:6380/2"
    banner = example.banner(settings, 1234)
    assert "limits     shared through Redis at redis://:***@cache.internal:6380/2" in banner
    assert "hunter2" not in banner
    assert "hunter2" not in repr(settings)
    assert "Redis" not in example.banner(example.parse_settings([], {}), 1234)
    app = example.build_app(dataclasses.replace(settings, db="sqlite://:memory:", **ONLINE))
    [middleware] = app.user_middleware
    assert type(middleware.kwargs["mode"].rate_limiter).__name__ == "RedisRateLimiter"


def test_the_app_imports_redis_only_when_asked_to() -> None:
    import subprocess
    import sys

    from tests.processes import ROOT

    code = (
        "import sys; sys.path.insert(0, 'examples'); import app; "
        "a = app.build_app(app.parse_settings(['--db', 'sqlite://:memory:'], "
        "{'OPENAI_BASE_URL': 'https://api.openai.com/v1'})); "
        "print(type(a.user_middleware[0].kwargs['mode'].rate_limiter).__name__, "
        "'redis' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["InProcessRateLimiter", "False"]


def test_fit_holds_flag_sets_the_over_budget_policy() -> None:
    assert example.parse_settings([], {}).fit_holds is False
    settings = example.parse_settings(["--fit-holds", "--db", "sqlite://:memory:"], {})
    assert settings.fit_holds is True
    for fit, policy in ((settings, "fit"), (example.Settings(db="sqlite://:memory:"), "refuse")):
        app = server.build_app(example.example_config(fit, fake_port=9))
        [middleware] = app.user_middleware
        mode = middleware.kwargs["mode"]
        assert isinstance(mode, StandaloneMode)
        assert mode.over_budget == policy


def test_the_banner_never_prints_a_database_password() -> None:
    url = "postgresql://gateway:dbsecret@db.internal:5432/llm?schema=gateway"
    for argv in (["--db", url], ["--db", url, "--platform", "https://plane.example"]):
        settings = example.parse_settings(
            argv, {"OPENAI_API_KEY": "sk-x", "GATEWAYKIT_PLATFORM_TOKEN": "gw-secret"}
        )
        banner = example.banner(settings, None)
        assert "dbsecret" not in banner
        assert "postgresql://gateway:***@db.internal:5432/llm?schema=gateway" in banner
