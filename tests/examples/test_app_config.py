"""examples/app.py configuration: flags, the SDKs' variables, prices, the start message."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from gatewaykit import StandaloneMode, server
from tests.examples.helpers import load_example

example = load_example("app")


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
