"""Running a page's console transcripts: ``$ command`` lines, then the output they show.

The page's output must appear in the real output, line by line and in order, once the
values that differ from run to run are replaced by placeholders (key ids, keys, request
ids, times). A ``...`` line in the page stands for any number of lines.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = ["Step", "expect_output", "normalise", "run", "steps"]

_VOLATILE = [
    (re.compile(r"gk_[0-9a-f]{12}_[A-Za-z0-9_\-]+…?"), "<KEY>"),  # a key, or its prefix
    (re.compile(r"\b[0-9a-f]{12}\b"), "<KEY_ID>"),
    (re.compile(r"req_[0-9a-f]{32}"), "<REQUEST_ID>"),
    (re.compile(r"\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d)"), "<TIME>"),
]


class Step:
    """One ``$ command`` and the output the page shows for it."""

    def __init__(self, command: str, output: list[str]) -> None:
        self.command = command
        self.output = output

    def __repr__(self) -> str:
        return f"Step({self.command!r})"


def steps(transcript: str) -> list[Step]:
    found: list[Step] = []
    for line in transcript.splitlines():
        if line.startswith("$ "):
            found.append(Step(line[2:], []))
        elif found:
            found[-1].output.append(line)
    return found


def normalise(line: str) -> str:
    for pattern, placeholder in _VOLATILE:
        line = pattern.sub(placeholder, line)
    return " ".join(line.split())


def expect_output(step: Step, actual: str) -> None:
    """Every non-empty line the page shows appears in ``actual``, in order."""
    real = [normalise(line) for line in actual.splitlines() if line.strip()]
    position = 0
    for shown in step.output:
        wanted = normalise(shown)
        if not wanted or wanted == "...":
            continue
        if wanted.endswith("..."):  # the line goes on; the page elides the rest
            prefix = wanted[:-3]
            matches = [i for i in range(position, len(real)) if real[i].startswith(prefix)]
        else:
            matches = [i for i in range(position, len(real)) if real[i] == wanted]
        assert matches, f"{step}: the page shows {shown!r}, the command printed:\n{actual}"
        position = matches[0] + 1


def run(command: str, *, cwd: Path, env: Mapping[str, str], timeout: float = 60) -> str:
    """``command`` in bash, its stdout and stderr together."""
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=dict(env), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr
