"""docs/configuration.md: every TOML file of the docs is valid, the documented defaults are
the real ones, and the page's ``--check-config`` transcript runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gatewaykit.config import (
    LedgerConfig,
    PricesConfig,
    ServerConfig,
    StandaloneConfig,
    load_config,
)
from tests.docs.blocks import ROOT, Block, blocks, documentation
from tests.docs.transcript import expect_output, run, steps

PAGE = ROOT / "docs" / "configuration.md"
SECRETS = {
    "OPENAI_API_KEY": "sk-test",
    "ANTHROPIC_API_KEY": "sk-ant-test",
    "GATEWAYKIT_PLATFORM_TOKEN": "gw-token",
}
TOML = [b for page in documentation() for b in blocks(page) if b.language == "toml"]


@pytest.mark.parametrize("block", TOML, ids=[b.name for b in TOML])
def test_every_toml_block_is_a_valid_configuration(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "gatewaykit.toml"
    path.write_text(block.text)
    load_config(path, environ=SECRETS)


def test_the_documented_defaults_are_the_defaults(tmp_path: Path) -> None:
    [full] = [b for b in blocks(PAGE) if b.text.startswith("# gatewaykit.toml")]
    path = tmp_path / "gatewaykit.toml"
    path.write_text(full.text)
    config = load_config(path, environ=SECRETS)
    assert config.server == ServerConfig()
    assert config.ledger == LedgerConfig()
    assert config.prices == PricesConfig()
    assert config.standalone == StandaloneConfig()
    assert [u.provider for u in config.upstreams] == ["openai", "anthropic"]


@pytest.mark.slow
def test_the_check_config_transcript_runs(tmp_path: Path) -> None:
    [full] = [b for b in blocks(PAGE) if b.text.startswith("# gatewaykit.toml")]
    (tmp_path / "gatewaykit.toml").write_text(full.text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    transcripts = [b for b in blocks(PAGE) if b.language == "console"]
    assert transcripts
    for block in transcripts:
        for step in steps(block.text):
            output = run(step.command, cwd=tmp_path, env=env)
            expect_output(step, output)
            assert "sk-test" not in output
