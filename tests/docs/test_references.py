"""Nothing the repository ships cites a design file it does not contain (issue 15 §9)."""

from __future__ import annotations

from pathlib import Path

from tests.docs.blocks import ROOT

DESIGN = "DESIGN" + " §"  # spelled apart, or this file would cite it too


def shipped() -> list[Path]:
    patterns = ["*.md", "docs/*.md", "examples/*", "gatewaykit/**/*.py", "tests/**/*.py"]
    return [path for pattern in patterns for path in ROOT.glob(pattern) if path.is_file()]


def test_no_reference_to_a_design_file_the_repository_lacks() -> None:
    assert not (ROOT / "DESIGN.md").exists()
    citing = [
        str(path.relative_to(ROOT))
        for path in shipped()
        if DESIGN in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert citing == [], "cite the docs/ page instead"
