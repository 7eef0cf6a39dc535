"""StandaloneMode's API-key authentication: the credential → a key record, through a cache.

A lookup is cached for ``key_cache_ttl`` seconds (at most 10,000 digests, least recently
used first out), misses included. A ledger that tells when keys changed (its
``key_epoch``) ends every cached entry at once; others rely on the TTL alone.
``StandaloneMode.revoke_key`` forgets a revoked key in this process at once.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from gatewaykit.errors import (
    ConfigurationError,
    ErrorKind,
    LedgerUnavailableError,
    RequestRejected,
)
from gatewaykit.keys import hash_key
from gatewaykit.ledger.base import ApiKeyRecord, Ledger
from gatewaykit.modes.admission import credential, missing_credential

__all__ = ["KeyAuthenticator"]

_KEY_CACHE_SIZE = 10_000


class KeyAuthenticator:
    """Authenticates a request's credential against the ledger's keys and a master key.

    ``fail_open``: while the ledger is unreachable, a key seen recently (still in the
    cache, however old) is admitted; an unknown key never is.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        master_key: str | None,
        cache_ttl: float,
        fail_open: bool,
        clock: Callable[[], float],
    ) -> None:
        if not cache_ttl >= 0:
            raise ConfigurationError("key_cache_ttl must be ≥ 0 seconds")
        if master_key is not None and len(master_key) < 16:
            raise ConfigurationError("master_key must be at least 16 characters")
        self.ledger = ledger
        self.cache_ttl = float(cache_ttl)
        self.fail_open = fail_open
        self.master_hash = hash_key(master_key) if master_key is not None else None
        self._clock = clock
        # Wall time (key expiry) is read from the same clock, so one fake clock moves
        # everything in tests.
        self._wall_epoch = time.time() - clock()
        #: digest -> (record or None, expiry, the ledger's key_epoch when it was looked up)
        self._keys: OrderedDict[str, tuple[ApiKeyRecord | None, float, int | None]] = OrderedDict()

    def _wall_time(self) -> float:
        return self._wall_epoch + self._clock()

    def invalidate(self, key_id: str | None = None) -> None:
        """Drop cached lookups of ``key_id`` (or of every key, and every cached miss)."""
        if key_id is None:
            self._keys.clear()
            return
        for digest in [d for d, (rec, *_) in self._keys.items() if rec and rec.key_id == key_id]:
            del self._keys[digest]

    async def _find_key(self, digest: str) -> ApiKeyRecord | None:
        now = self._clock()
        # A ledger that tells when keys changed (key_epoch) ends the cache at once;
        # others rely on key_cache_ttl alone. Read before the lookup: a change landing
        # during it leaves the entry tagged stale.
        epoch: int | None = getattr(self.ledger, "key_epoch", None)
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > now and cached[2] == epoch:
            self._keys.move_to_end(digest)
            return cached[0]
        try:
            record = await self.ledger.find_key(digest)
        except LedgerUnavailableError:
            if self.fail_open and cached is not None and cached[0]:
                return cached[0]  # a key seen recently; never admit an unknown key
            raise
        if self.cache_ttl > 0:
            self._keys[digest] = (record, now + self.cache_ttl, epoch)
            self._keys.move_to_end(digest)
            while len(self._keys) > _KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        return record

    async def authenticate(self, headers: Mapping[str, str]) -> ApiKeyRecord | None:
        """The key record the request's credential names, None for the master key; else 401."""
        presented = credential(headers)
        if presented is None:
            raise missing_credential()
        digest = hash_key(presented)
        if self.master_hash is not None and hmac.compare_digest(digest, self.master_hash):
            return None
        record = await self._find_key(digest)
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise RequestRejected(ErrorKind.AUTHENTICATION, "invalid API key")
        if record.revoked:
            raise RequestRejected(ErrorKind.AUTHENTICATION, "this API key has been revoked")
        if record.expires_at is not None and record.expires_at.timestamp() <= self._wall_time():
            raise RequestRejected(ErrorKind.AUTHENTICATION, "this API key has expired")
        return record
