"""``python -m gatewaykit``: the admin command line (see :mod:`gatewaykit.cli`)."""

from __future__ import annotations

from gatewaykit.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main(prog_name="gatewaykit")
