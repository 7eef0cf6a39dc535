"""``python -m gatewaykit``: the admin command line (see :mod:`gatewaykit.cli`)."""

from __future__ import annotations

import sys

__all__: list[str] = []

try:
    from gatewaykit.cli import main
except ImportError as exc:  # e.g. a checkout run with a Python that lacks the dependencies
    sys.exit(
        f"gatewaykit: a dependency is missing in this Python ({exc}). Install gatewaykit "
        "(pip install gatewaykit, or pip install -e . in a checkout), or after nox -s "
        "example use its environment: source .nox/example/bin/activate"
    )

if __name__ == "__main__":
    main(prog_name="gatewaykit")
