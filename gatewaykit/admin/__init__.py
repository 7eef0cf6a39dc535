"""The admin page: a Starlette app to mount beside the gateway (``gatewaykit[admin]``).

```python
from gatewaykit.admin import admin_app

app.mount("/admin", admin_app(ledger, master_key=os.environ["GATEWAYKIT_MASTER_KEY"]))
```

It shows and changes what the ``gatewaykit`` command line does: keys, budgets, usage,
holds and the ledger's invariant check. See docs/admin.md.
"""

from __future__ import annotations

try:
    import itsdangerous  # noqa: F401
    import jinja2  # noqa: F401
    import python_multipart  # noqa: F401  (Starlette's form parser)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"gatewaykit.admin needs the 'admin' extra: pip install 'gatewaykit[admin]' ({exc})"
    ) from exc

from gatewaykit.admin.app import admin_app

__all__ = ["admin_app"]
