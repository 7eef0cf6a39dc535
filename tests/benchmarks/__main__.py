"""Run benchmarks: ``python -m tests.benchmarks [NAME|all] [args...]``.

NAME is one of ledger, postgres, keys, gateway, usage, metrics.

Each benchmark is a module ``tests/benchmarks/bench_<name>.py`` exposing ``main(argv)``,
sync or async; a module that is not present is skipped with a note. Arguments after the
benchmark name are passed to it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import sys

BENCHMARKS = ("ledger", "postgres", "keys", "gateway", "usage", "metrics")


def run(name: str, argv: list[str]) -> None:
    module_name = f"tests.benchmarks.bench_{name}"
    if importlib.util.find_spec(module_name) is None:
        print(f"(skipping {name}: {module_name} is not present)", file=sys.stderr)
        return
    main = importlib.import_module(module_name).main
    result = main(argv)
    if inspect.isawaitable(result):
        asyncio.run(result)  # type: ignore[arg-type]


def cli(argv: list[str]) -> None:
    target = argv[0] if argv else "all"
    rest = argv[1:]
    if target in ("-h", "--help"):
        print(__doc__)
        return
    if target not in (*BENCHMARKS, "all"):
        raise SystemExit(
            f"unknown benchmark {target!r}; choose one of {', '.join(BENCHMARKS)}, all"
        )
    for name in BENCHMARKS if target == "all" else (target,):
        run(name, rest)


if __name__ == "__main__":
    cli(sys.argv[1:])
