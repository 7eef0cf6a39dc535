"""Every Python and shell block of the documentation runs, or says it is a fragment.

Python blocks run on their own, each as a script in an empty directory, offline (no
provider variables; a block that names ``https://api.openai.com`` only builds the app).
Under ``run_name="docs_snippet"``, so a block that ends in ``if __name__ == "__main__":
uvicorn.run(...)`` is checked without serving. Shell blocks and the Python blocks that need
a running gateway are run by the page's own test (``COVERED``); any other is a fragment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, Block, assembled, blocks, documentation

pytestmark = pytest.mark.slow

#: Pages whose shell blocks (and, for "all", Python blocks too) a test of their own runs,
#: in order.
COVERED = {
    "README.md": ("tests/docs/test_quickstart.py", "shell"),
    "docs/quickstart.md": ("tests/docs/test_quickstart.py", "all"),
    "docs/configuration.md": ("tests/docs/test_configuration_page.py", "shell"),
    "docs/cli.md": ("tests/docs/test_cli_page.py", "shell"),
    "docs/mounting.md": ("tests/docs/test_mounting_page.py", "shell"),
}


def _all() -> list[Block]:
    return [block for page in documentation() for block in blocks(page) if block.runnable]


def _covered(block: Block) -> bool:
    page = str(block.path.relative_to(ROOT))
    if page not in COVERED:
        return False
    return block.language != "python" or COVERED[page][1] == "all"


STANDALONE = [
    b for b in _all() if b.language == "python" and not (b.fragment or b.part or _covered(b))
]
ASSEMBLED = [
    (page, name, text)
    for page in documentation()
    if COVERED.get(str(page.relative_to(ROOT)), ("", "shell"))[1] != "all"
    for name, text in assembled(page).items()
]


def test_every_runnable_block_is_run_or_marked() -> None:
    unaccounted = [
        block.name
        for block in _all()
        if not block.fragment and not _covered(block) and block.language != "python"
    ]
    assert unaccounted == [], (
        "shell blocks nobody runs: give the page a test (COVERED) or start the block with "
        "'# Fragment: <what it needs>'"
    )


def test_covering_tests_exist() -> None:
    for test, _ in COVERED.values():
        assert (ROOT / test).is_file(), test


def test_fragments_say_what_they_need() -> None:
    for block in _all():
        if block.fragment:
            first = block.text.lstrip().splitlines()[0]
            assert len(first.removeprefix("# Fragment").strip(" :—-")) > 5, block.name


@pytest.mark.parametrize("block", STANDALONE, ids=[b.name for b in STANDALONE])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    run_python(block.name, block.text, tmp_path)


@pytest.mark.parametrize(
    ("page", "name", "text"), ASSEMBLED, ids=[f"{p.name}:{n}" for p, n, _ in ASSEMBLED]
)
def test_a_file_built_from_parts_runs(page: Path, name: str, text: str, tmp_path: Path) -> None:
    run_python(f"{page.name}: {name}", text, tmp_path)


def run_python(name: str, text: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(text, encoding="utf-8")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "GATEWAYKIT_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    runner = f"import runpy; runpy.run_path({str(script)!r}, run_name='docs_snippet')"
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", runner],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{name}\n{done.stdout}\n{done.stderr}"
