"""Helpers for testing code built on gatewaykit: a fake LLM provider speaking all three
wire formats (:class:`FakeProvider`, configured by :class:`FakeBehavior`), and a fake
platform control plane (:class:`FakeControlPlane`, run on a socket with :func:`serve_app`),
and a settlement usable outside a request (:class:`RecordingSettlement`, with
:func:`gateway_request` / :func:`gateway_scope` to call a handler as the middleware would)."""

from __future__ import annotations

from gatewaykit.testing.control_plane import (
    Admitted,
    FakeControlPlane,
    FakeUser,
    UsagePost,
    serve_app,
)
from gatewaykit.testing.fake_provider import FakeBehavior, FakeProvider, ReceivedRequest
from gatewaykit.testing.settlement import RecordingSettlement, gateway_request, gateway_scope

__all__ = [
    "Admitted",
    "FakeBehavior",
    "FakeControlPlane",
    "FakeProvider",
    "FakeUser",
    "ReceivedRequest",
    "RecordingSettlement",
    "UsagePost",
    "gateway_request",
    "gateway_scope",
    "serve_app",
]
