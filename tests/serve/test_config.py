"""The ``gatewaykit serve`` configuration file: validation, secrets, ``--check-config``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gatewaykit.cli import main
from gatewaykit.config import GatewayConfig, load_config
from gatewaykit.errors import ConfigurationError
from gatewaykit.server import load_prices, upstreams

MINIMAL = """
[[upstreams]]
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
"""
SECRET = "sk-upstream-secret-123"


def write(tmp_path: Path, text: str, name: str = "gatewaykit.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigurationError) as info:
        load_config(path, environ=environ or {})
    return str(info.value)


def test_a_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), environ={"OPENAI_API_KEY": SECRET})
    assert (config.server.host, config.server.port, config.server.workers) == (
        "127.0.0.1",
        8000,
        1,
    )
    assert config.ledger.url == "sqlite:///gatewaykit.db"
    assert config.ledger.hold_ttl == 600
    assert config.standalone.missing_usage == "estimate"
    assert config.platform is None
    [upstream] = upstreams(config)
    assert (upstream.provider, upstream.api_key) == ("openai", SECRET)
    assert SECRET not in repr(config)


def test_every_section_is_read(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "anthropic").write_text("sk-ant-from-file\n")
    (tmp_path / "prices.json").write_text(
        json.dumps({"house-model": {"input_per_mtok": "1", "output_per_mtok": "2"}})
    )
    text = """
[server]
host = "0.0.0.0"
port = 9000
workers = 2
access_log = false

[ledger]
url = "postgresql://gk:pw@db/gk"
hold_ttl = 120

[prices]
file = "prices.json"

[[upstreams]]
provider = "anthropic"
base_url = "https://api.anthropic.com"
api_key_file = "secrets/anthropic"
models = ["claude-haiku-4-5"]
name = "claude"

[standalone]
missing_usage = "hold"
disconnect = "release"
default_max_output_tokens = 512
default_rpm = 60
master_key_env = "GATEWAYKIT_MASTER_KEY"

[standalone.teams]
alice = "ml"
"""
    config = load_config(write(tmp_path, text), environ={"GATEWAYKIT_MASTER_KEY": "m" * 20})
    assert config.server.workers == 2
    assert config.ledger.hold_ttl == 120
    assert config.standalone.teams == {"alice": "ml"}
    assert config.standalone.master_key == "m" * 20
    [upstream] = upstreams(config)
    assert upstream.api_key == "sk-ant-from-file"  # relative to the file, newline stripped
    assert upstream.models == frozenset({"claude-haiku-4-5"})
    prices = load_prices(config)
    assert "house-model" in prices
    assert "gpt-4o-mini" in prices  # merged over the defaults


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "\n[server]\nprot = 8000\n", "server.prot: unknown key"),
        (MINIMAL + "\n[sever]\nport = 8000\n", "sever: unknown key"),
        (MINIMAL + "\n[server]\nport = 'eighty'\n", "server.port: Input should be a valid integer"),
        (MINIMAL + "\n[server]\nworkers = 0\n", "server.workers: Input should be greater"),
        (MINIMAL + "\n[standalone]\nmissing_usage = 'free'\n", "standalone.missing_usage:"),
        (
            '[[upstreams]]\nbase_url = "https://x/v1"\napi_key = "sk-inline"\n',
            "upstreams[0]: api_key may not be written in the file",
        ),
        (
            '[[upstreams]]\nbase_url = "https://x/v1"\nprovider = "cohere"\n',
            "upstreams[0].provider: Input should be 'openai' or 'anthropic'",
        ),
        ("[[upstreams]]\nprovider = 'openai'\n", "upstreams[0].base_url: Field required"),
        ("", "standalone mode needs at least one [[upstreams]] table"),
        (
            MINIMAL + '\n[platform]\nurl = "https://plane"\ntoken_env = "T"\n',
            "[[upstreams]] are the control plane's in platform mode",
        ),
        (
            '[platform]\nurl = "https://plane"\ntoken = "gw-inline"\n',
            "platform: token may not be written in the file",
        ),
        ('[platform]\nurl = "https://plane"\n', "platform: the gateway token is required"),
        ("[server\nport = 1\n", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key_path(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = error_of(path, {"OPENAI_API_KEY": SECRET, "T": "token"})
    assert message.startswith(f"{path}: "), message
    assert expected in message
    assert "inline" not in message  # the secret a user wrote in the file is never echoed


def test_secrets_that_cannot_be_resolved(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert "upstreams[0]: api_key_env: the environment variable OPENAI_API_KEY is not set" in (
        error_of(path)
    )
    path = write(
        tmp_path, MINIMAL.replace('api_key_env = "OPENAI_API_KEY"', 'api_key_file = "nope"')
    )
    assert "upstreams[0]: api_key_file: cannot read" in error_of(path)
    both = MINIMAL + 'api_key_file = "nope"\n'
    assert "give api_key_env or api_key_file, not both" in error_of(write(tmp_path, both))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, MINIMAL + "\n[server]\nprot = 1\nworkers = -1\n"))
    assert "server.prot" in message
    assert "server.workers" in message


def test_check_config_prints_the_resolved_configuration_with_secrets_masked(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, MINIMAL + '\n[ledger]\nurl = "postgresql://gk:dbpassword@db/gk"\n')
    result = CliRunner().invoke(
        main,
        ["serve", "--config", str(path), "--check-config", "--port", "9001"],
        env={"OPENAI_API_KEY": SECRET},
    )
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert "dbpassword" not in result.output
    shown = json.loads(result.stdout)
    assert shown["server"]["port"] == 9001  # the flag wins over the file
    assert shown["upstreams"][0]["api_key"] == "********"
    assert shown["upstreams"][0]["api_key_env"] == "OPENAI_API_KEY"
    assert shown["ledger"]["url"] == "postgresql://gk:***@db/gk"
    assert GatewayConfig.model_fields.keys() <= shown.keys()


def test_serve_reports_a_bad_file_in_one_line_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[server]\nprot = 1\n")
    result = CliRunner().invoke(
        main, ["serve", "--config", str(path)], env={"OPENAI_API_KEY": SECRET}
    )
    assert result.exit_code == 2
    assert f"{path}: server.prot: unknown key" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "absent.toml")])
    assert missing.exit_code == 2
    assert "cannot read the configuration" in missing.output


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("postgresql://gk:pa/ss@db/gk", "pa/ss"),  # a '/' the URL should have encoded
        ("postgresql://gk:p@ss@db/gk", "p@ss"),
        ("postgresql://gk@db/gk?password=dbsecret", "dbsecret"),
    ],
)
def test_check_config_masks_every_form_of_database_password(
    tmp_path: Path, url: str, password: str
) -> None:
    text = MINIMAL + f'\n[ledger]\nurl = "{url}"\n'
    shown = load_config(write(tmp_path, text), environ={"OPENAI_API_KEY": SECRET}).masked()
    assert password not in json.dumps(shown)
    assert "ss@" not in shown["ledger"]["url"]


def test_a_secret_written_where_a_variable_name_belongs_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('"OPENAI_API_KEY"', f'"{SECRET}"'))
    message = error_of(path)
    assert SECRET not in message
    assert "upstreams[0]: api_key_env: not an environment variable name" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('\n[prices]\nfile = "prices.json"\n', "price file"),
        ("\n[ledger]\nhold_ttl = 1e12\n", "hold TTL"),
    ],
)
@pytest.mark.parametrize("check", [True, False])
def test_what_serve_would_refuse_check_config_refuses_too(
    tmp_path: Path, extra: str, expected: str, check: bool
) -> None:
    (tmp_path / "prices.json").write_text('{"m": {"input_per_mtok": "x", "output_per_mtok": "1"}}')
    path = write(tmp_path, MINIMAL + extra)
    flags = ["--check-config"] if check else ["--port", "0"]
    result = CliRunner().invoke(
        main, ["serve", "--config", str(path), *flags], env={"OPENAI_API_KEY": SECRET}
    )
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_config_repr_never_shows_a_database_password(tmp_path: Path) -> None:
    standalone = MINIMAL + '\n[ledger]\nurl = "postgresql://gk:dbpassword@db/gk"\n'
    config = load_config(write(tmp_path, standalone), environ={"OPENAI_API_KEY": SECRET})
    platform = (
        '[platform]\nurl = "https://cp.example"\ntoken_env = "T"\n'
        'outbox = "postgresql://gk:outboxpassword@db/gk"\n'
    )
    plane = load_config(write(tmp_path, platform, "p.toml"), environ={"T": "gw-token"})
    for text in (repr(config), str(config), repr(plane), str(plane)):
        assert "dbpassword" not in text
        assert "outboxpassword" not in text
        assert SECRET not in text
        assert "gw-token" not in text


def test_check_config_and_reprs_hide_credentials_in_upstream_and_control_plane_urls(
    tmp_path: Path,
) -> None:
    text = MINIMAL.replace(
        "https://api.openai.com/v1", "https://proxy:basicpass@llm.example/v1?api_key=querykey"
    )
    path = write(tmp_path, text)
    result = CliRunner().invoke(
        main, ["serve", "--config", str(path), "--check-config"], env={"OPENAI_API_KEY": SECRET}
    )
    assert result.exit_code == 0, result.output
    assert "basicpass" not in result.output
    assert "querykey" not in result.output
    shown = json.loads(result.stdout)
    assert shown["upstreams"][0]["base_url"] == "https://***@llm.example/v1?api_key=***"
    [upstream] = upstreams(load_config(path, environ={"OPENAI_API_KEY": SECRET}))
    assert "basicpass" not in repr(upstream)
    platform = write(
        tmp_path,
        '[platform]\nurl = "https://gw:cppass@cp.example"\ntoken_env = "T"\n'
        f'outbox = "sqlite:///{tmp_path / "outbox.db"}"\n',
        "p.toml",
    )
    plane = CliRunner().invoke(
        main, ["serve", "--config", str(platform), "--check-config"], env={"T": "gw-token"}
    )
    assert plane.exit_code == 0, plane.output
    assert "cppass" not in plane.output
    assert json.loads(plane.stdout)["platform"]["url"] == "https://***@cp.example"


def test_the_serve_banner_hides_the_control_planes_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    platform = write(
        tmp_path,
        '[platform]\nurl = "https://gw:cppass@cp.example/?token=t0k"\ntoken_env = "T"\n'
        f'outbox = "sqlite:///{tmp_path / "outbox.db"}"\n',
    )
    result = CliRunner().invoke(main, ["serve", "--config", str(platform)], env={"T": "gw-tok"})
    assert result.exit_code == 0, result.output
    assert "control plane https://***@cp.example/?token=***" in result.stderr
    assert "cppass" not in result.output
    assert "t0k" not in result.output


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('\n[ledger]\nurl = "postgresql://gk:dbpassword@db/gk"\n', "ledger.url"),
        ('\n[ratelimit]\nredis_url = "redis://:dbpassword@cache/0"\n', "ratelimit.redis_url"),
    ],
)
def test_a_password_written_in_the_file_is_warned_about(
    tmp_path: Path, extra: str, key: str
) -> None:
    path = write(tmp_path, MINIMAL + extra)
    result = CliRunner().invoke(
        main, ["serve", "--config", str(path), "--check-config"], env={"OPENAI_API_KEY": SECRET}
    )
    assert result.exit_code == 0, result.output
    assert f"warning: {path}: {key} holds a password written in the file" in result.stderr
    assert "dbpassword" not in result.output


def test_the_ledger_url_may_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    url = "postgresql://gk:dbpassword@db/gk"
    env = {"OPENAI_API_KEY": SECRET, "GK_DB": url}
    by_env = load_config(write(tmp_path, MINIMAL + '\n[ledger]\nurl_env = "GK_DB"\n'), environ=env)
    assert by_env.ledger.url == url
    assert by_env.masked()["ledger"]["url"] == "postgresql://gk:***@db/gk"
    (tmp_path / "db-url").write_text(url + "\n")
    text = MINIMAL + '\n[ledger]\nurl_file = "db-url"\n'
    assert load_config(write(tmp_path, text), environ=env).ledger.url == url
    result = CliRunner().invoke(
        main, ["serve", "--config", str(tmp_path / "gatewaykit.toml"), "--check-config"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    both = write(tmp_path, MINIMAL + '\n[ledger]\nurl = "sqlite:///a.db"\nurl_env = "GK_DB"\n')
    assert "ledger: give url, url_env or url_file, not two" in error_of(both, env)
