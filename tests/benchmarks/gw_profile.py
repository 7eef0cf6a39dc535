"""Profile one server of the gateway benchmark under wrk load with py-spy.

``python -m tests.benchmarks.gw_profile gateway-sqlite --seconds 10 [--stream]`` starts
the fake provider and that server exactly as the benchmark does, drives it with wrk (or,
with ``--stream``, with sequential streams), samples it with ``py-spy record`` and prints
where the time goes: inclusive and self time per function, for gatewaykit's own
functions and overall. The collapsed stacks are kept for a flame graph. Needs
``py-spy`` on PATH or next to the interpreter (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.benchmarks import bench_gateway as bench
from tests.benchmarks import gw_gateway

__all__ = ["main", "summarize"]

_LINE = re.compile(r":\d+\)$")


def summarize(collapsed: Path, *, top: int = 25, only: str = "", per_sample_us: float = 0.0) -> str:
    """Inclusive and self share of samples per function from py-spy's collapsed stacks.

    Frames are aggregated per function (line numbers dropped). With ``per_sample_us``
    (sampling interval / requests served), shares are also shown as µs per request.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";") if f]
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            self_time[frames[-1]] += n
    out = [f"{total} samples"]
    for title, counter in (("inclusive", inclusive), ("self", self_time)):
        out.append(f"-- {title} (top {top}{', ' + only if only else ''}) --")
        rows = [(f, n) for f, n in counter.most_common() if only in f][:top]
        out += [
            f"{100 * n / max(total, 1):5.1f}%  {n * per_sample_us:8.1f} µs/req  {f}"
            for f, n in rows
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gw_profile")
    parser.add_argument(
        "kind", help="a benchmark path, e.g. gateway-sqlite or gateway-sqlite:nohdr"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stream", action="store_true", help="profile streaming, not c=16")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gk-profile.txt")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    plan = bench.make_plan(bench.parse_args(["--quick"]))
    notes: list[str] = []
    wrk = bench.ensure_wrk()
    with bench.servers(plan, ["direct", args.kind], bench.POSTGRES_DSN, notes) as srv:
        server = srv[args.kind]
        bench.throughput(plan, server, wrk, 1.0)  # warm-up
        spy = subprocess.Popen(
            [pyspy, "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)),
             "--rate", str(args.rate), "--nonblocking", "--gil", "--format", "raw",
             "--output", str(args.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        requests = 0
        if args.stream:
            stop = threading.Event()

            def loop() -> None:
                while not stop.is_set():
                    bench.load_client(plan, ["stream", server.url, "--key", server.key, "--n", "4"])

            worker = threading.Thread(target=loop)
            worker.start()
            spy.wait()
            stop.set()
            worker.join()
        else:
            result = bench.throughput(plan, server, wrk, args.seconds)
            print(result)
            requests = int(result["requests"])
            spy.wait()
    gw_gateway.cleanup()
    per = 1e6 / args.rate / requests if requests else 0.0
    print(summarize(args.out, only="gatewaykit", per_sample_us=per, top=40))
    print(summarize(args.out, per_sample_us=per, top=40))
    print(f"collapsed stacks: {args.out}")


if __name__ == "__main__":
    main()
