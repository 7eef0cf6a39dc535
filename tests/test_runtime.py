"""gatewaykit.runtime.tune_gc: the collector settings a serving process starts with."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from gatewaykit.config import parse_config
from gatewaykit.errors import ConfigurationError
from gatewaykit.runtime import DEFAULT_GC_THRESHOLD, tune_gc
from gatewaykit.server import build_app


def test_tune_gc_freezes_start_up_and_raises_only_the_young_threshold() -> None:
    gc.unfreeze()
    _, older, oldest = gc.get_threshold()
    tune_gc()
    assert gc.get_threshold() == (DEFAULT_GC_THRESHOLD, older, oldest)
    assert gc.get_freeze_count() > 0


def test_tune_gc_zero_leaves_the_collector_alone() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    tune_gc(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10000"])
def test_tune_gc_refuses_a_bad_threshold(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="GC threshold"):
        tune_gc(bad)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("threshold", [0, 5000])
async def test_the_served_app_tunes_the_collector_once_started(
    threshold: int, tmp_path: Path
) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    config = parse_config(
        {
            "server": {"gc_threshold": threshold},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
            "upstreams": [{"provider": "openai", "base_url": "http://127.0.0.1:9/v1"}],
        },
        environ={"OPENAI_API_KEY": "sk-test"},
    )
    app = build_app(config)
    assert gc.get_threshold() == before  # building the app changes nothing
    async with app.router.lifespan_context(app):
        assert gc.get_threshold()[0] == (threshold or before[0])
        assert (gc.get_freeze_count() > 0) is (threshold > 0)
