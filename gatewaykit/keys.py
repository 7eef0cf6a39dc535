"""API keys: generated with a readable prefix, stored only as a SHA-256 hash.

A key looks like ``gk_<key_id>_<secret>``: the key id (public, shown in listings) lets an
operator recognise a key without the secret; the secret carries 256 bits of randomness.
The store keeps ``sha256(key)`` and the display prefix; lookups go by hash, and the final
comparison is constant-time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets

__all__ = ["KEY_PREFIX", "NewKey", "display_prefix", "generate_key", "hash_key"]

KEY_PREFIX = "gk_"


@dataclasses.dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key. ``key`` is shown once and never stored."""

    key: str = dataclasses.field(repr=False)
    key_id: str
    key_hash: str = dataclasses.field(repr=False)
    prefix: str


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key: keys have 256 bits of entropy, so no salt or KDF is needed."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    """What listings show: the key id part and a few characters, never enough to use."""
    return key[: len(KEY_PREFIX) + 12 + 1 + 4] + "…"


def generate_key(key_id: str | None = None) -> NewKey:
    """A new key; ``key_id`` (12 hex characters) when the caller must know it in advance."""
    key_id = key_id or secrets.token_hex(6)  # 12 hex chars: readable, unique enough
    secret = secrets.token_urlsafe(32)  # 256 bits
    key = f"{KEY_PREFIX}{key_id}_{secret}"
    return NewKey(key=key, key_id=key_id, key_hash=hash_key(key), prefix=display_prefix(key))
