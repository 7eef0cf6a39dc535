"""The code blocks of the documentation: which a reader would run, and which are fragments.

A block is runnable when its language is Python or a shell (``python``, ``bash``, ``sh``,
``console``). A runnable block the suite cannot run on its own is marked for the reader:
its first line is a comment beginning with ``# Fragment`` that says what it needs. A page
may build one file from several blocks, each opening with ``# name.py, part N of M``, or
name a one-block file with ``# name.py``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

__all__ = ["DOCS", "ROOT", "RUNNABLE", "Block", "assembled", "blocks", "documentation"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RUNNABLE = frozenset({"python", "bash", "sh", "console"})
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^`]*)$")
_PART = re.compile(r"# (?P<file>[\w.-]+\.py)(?:, part (?P<number>\d+) of (?P<parts>\d+)\b|$)", re.M)


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE

    @property
    def fragment(self) -> bool:
        return self.text.lstrip().startswith("# Fragment")

    @property
    def part(self) -> tuple[str, int, int] | None:
        """``(file, n, of)`` for a block that opens with ``# file.py, part n of m`` (or
        just ``# file.py``): the page builds one file from its parts, in order."""
        found = _PART.match(self.text.lstrip())
        if found is None:
            return None
        return found["file"], int(found["number"] or 1), int(found["parts"] or 1)


def documentation() -> list[Path]:
    """Every page a reader follows: the README, docs/, and the examples' README."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "examples" / "README.md"]


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order (indented fences included)."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        language = (opening["info"].split() or [""])[0]
        body: list[str] = []
        index += 1
        while index < len(lines) and lines[index].strip() != fence:
            body.append(lines[index][indent:])
            index += 1
        start = index - len(body)  # the opening fence's 1-based number
        found.append(Block(path, start, language, "\n".join(body) + "\n"))
        index += 1
    return found


def assembled(page: Path) -> dict[str, str]:
    """The files a page builds from its parts, by name; the parts must be complete."""
    parts: dict[str, list[Block]] = {}
    for block in blocks(page):
        if block.part is not None:
            parts.setdefault(block.part[0], []).append(block)
    files = {}
    for name, found in parts.items():
        numbers = [b.part[1:] for b in found if b.part is not None]
        count = numbers[0][1]
        assert numbers == [(n, count) for n in range(1, count + 1)], f"{page}: {name} {numbers}"
        files[name] = "\n\n".join(b.text for b in found)
    return files
