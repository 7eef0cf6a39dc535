"""Helpers for testing code built on gatewaykit: a fake LLM provider speaking all three
wire formats (:class:`FakeProvider`, configured by :class:`FakeBehavior`)."""

from __future__ import annotations

from gatewaykit.testing.fake_provider import FakeBehavior, FakeProvider, ReceivedRequest

__all__ = ["FakeBehavior", "FakeProvider", "ReceivedRequest"]
