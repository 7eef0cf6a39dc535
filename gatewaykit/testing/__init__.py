"""Helpers for testing code built on gatewaykit: a fake LLM provider speaking all three
wire formats (:class:`FakeProvider`, configured by :class:`FakeBehavior`), and a fake
platform control plane (:class:`FakeControlPlane`, run on a socket with :func:`serve_app`)."""

from __future__ import annotations

from gatewaykit.testing.control_plane import FakeControlPlane, FakeUser, UsagePost, serve_app
from gatewaykit.testing.fake_provider import FakeBehavior, FakeProvider, ReceivedRequest

__all__ = [
    "FakeBehavior",
    "FakeControlPlane",
    "FakeProvider",
    "FakeUser",
    "ReceivedRequest",
    "UsagePost",
    "serve_app",
]
