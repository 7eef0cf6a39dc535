"""Run a test's child process (a gateway to kill -9) with its output in a log file."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ROOT", "child_process"]

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def child_process(module: str, args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m module *args`` from the checkout; killed on exit if still running."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env, cwd=str(ROOT), stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
