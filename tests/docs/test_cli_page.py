"""docs/cli.md: its transcripts, run one after the other on an empty ledger.

Each ``$ gatewaykit …`` runs in bash with this checkout's command line on the ``PATH``;
what it prints must match the page once volatile values (key ids, keys, times) are
replaced. JSON is compared as JSON, so the page may wrap it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.docs.blocks import ROOT, blocks
from tests.docs.transcript import expect_output, normalise, run, steps

pytestmark = pytest.mark.slow

PAGE = ROOT / "docs" / "cli.md"


def _normalised(value: Any) -> Any:
    if isinstance(value, str):
        return normalise(value)
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


def test_the_command_line_page_runs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYKIT_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    transcripts = [b for b in blocks(PAGE) if b.language == "console" and not b.fragment]
    assert transcripts
    for block in transcripts:
        for step in steps(block.text):
            assert step.command.startswith("gatewaykit "), step
            output = run(step.command, cwd=tmp_path, env=env)
            shown = "\n".join(step.output).strip()
            if shown.startswith(("[", "{")):
                assert _normalised(json.loads(output)) == _normalised(json.loads(shown)), output
            else:
                expect_output(step, output)
