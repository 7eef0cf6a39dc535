"""Keeps this process's open admissions alive and reports the ones dead processes left open.

A gateway process records an *open admission* in the outbox's store before a request goes
upstream (:meth:`~gatewaykit.outbox.base.AdmissionStore.admit`) and closes it when it queues
the request's report (:meth:`~gatewaykit.outbox.base.AdmissionStore.complete`). If the
process dies in between — ``kill -9``, a crash, the machine gone — the admission stays
open. :class:`AdmissionKeeper` is the part that makes sure such an admission still becomes
exactly one report:

* while it runs it heart-beats every ``lease / 3`` seconds under its *instance id*, and as
  often turns admissions whose owner has not heart-beaten for ``lease`` seconds into reports
  (so a restarted gateway, or any other process sharing the store, reports a dead one's
  requests at most about ``lease`` seconds after it died);
* on start it does the same at once, and with a stable ``instance_id`` also recovers the
  admissions its own previous run left open, without waiting for the lease;
* on a clean stop it turns its own still-open admissions into reports (cause
  ``"shutdown"``) and forgets its instance row.

Which process may recover an admission is decided only by the store: a live process
heart-beats, so nobody else takes its admissions; if it stalls past the lease and someone
does, its own late settlement finds the admission closed and queues nothing (the recovered
report stands as the only one).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

import anyio

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox.base import Admission, AdmissionStore
from gatewaykit.resource import BackgroundWorker

__all__ = ["AdmissionKeeper", "RecoveryCause"]

logger = logging.getLogger("gatewaykit.outbox")

#: Why an admission is recovered: ``"shutdown"`` — this process is stopping with the request
#: still open; ``"crash"`` — the owning process stopped heart-beating (killed, crashed, cut
#: off from the store), or is an earlier run of this stable instance id.
RecoveryCause = Literal["shutdown", "crash"]

#: Builds the report for a recovered admission: ``(idempotency key, payload)``. Pure: it runs
#: inside the store's transaction.
CauseReportBuilder = Callable[[Admission, RecoveryCause], tuple[str, Mapping[str, Any]]]


class AdmissionKeeper(BackgroundWorker):
    """Heart-beats for one gateway process and recovers stale admissions in ``store``.

    ``report`` builds the report that replaces a recovered admission. ``instance_id``
    names this process in the store; the default is a fresh random id per start. Give a
    stable one (a pod or unit name) only if no two live processes sharing the store can
    ever have the same: a process recovers the admissions of its own id at start as left
    by a crash. ``lease`` is how long a process may go without heart-beating before others
    may report its open admissions. ``on_recovered`` is called with the keys of the reports
    a recovery queued (e.g. to wake the sender).

    An async context manager: enter it after the store is open, exit it before the store
    closes. Errors of the store are logged and retried at the next beat.
    """

    def __init__(
        self,
        store: AdmissionStore,
        *,
        report: CauseReportBuilder,
        instance_id: str | None = None,
        lease: float = 30.0,
        on_recovered: Callable[[list[str]], None] | None = None,
    ) -> None:
        if instance_id is not None and (
            not isinstance(instance_id, str) or not instance_id.strip() or len(instance_id) > 255
        ):
            raise ConfigurationError("instance_id must be a non-empty string of ≤255 characters")
        if not lease > 0:
            raise ConfigurationError("the admission lease must be a positive number of seconds")
        self.store = store
        self.lease = float(lease)
        self.interval = self.lease / 3
        self._report = report
        self._fixed_id = instance_id
        self._instance_id = instance_id or ""
        self._on_recovered = on_recovered
        #: Admissions this process turned into reports (its own at shutdown included).
        self.recovered = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<AdmissionKeeper {self._instance_id or '-'} lease={self.lease:g}s {state}>"

    @property
    def instance_id(self) -> str:
        """This process's id in the store (fixed, or random per start; "" before the first)."""
        return self._instance_id

    async def admit(self, request_id: str, details: Mapping[str, Any]) -> bool:
        """Record an open admission owned by this process (see ``AdmissionStore.admit``)."""
        if not self.running:
            raise ConfigurationError("the AdmissionKeeper is not running")
        return await self.store.admit(request_id, details, owner=self._instance_id)

    # -- lifecycle ---------------------------------------------------------------------
    async def _starting(self) -> None:
        self._instance_id = self._fixed_id or uuid.uuid4().hex
        # Recover before the first heartbeat: with a stable id, what this id holds now was
        # left by its previous run.
        await self._recover(own=self._fixed_id is not None, cause="crash")
        await self._beat()

    async def _stopped(self) -> None:
        await self._recover(own=True, cause="shutdown")
        try:
            await self.store.retire(self._instance_id)
        except Exception as exc:
            logger.warning("outbox: could not retire instance %s: %s", self._instance_id, exc)

    async def _run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            # Sweep only right after a beat that landed: this process's own heart-beat is
            # then fresh, so it can never find its own live admissions stale.
            if await self._beat():
                await self._recover(own=False, cause="crash")

    async def _beat(self) -> bool:
        try:
            await self.store.heartbeat(self._instance_id)
            return True
        except Exception as exc:
            logger.warning(
                "outbox: heartbeat of instance %s failed (%s); if it stays failing for %gs, "
                "other processes may report this one's open requests as incomplete",
                self._instance_id,
                exc,
                self.lease,
            )
            return False

    async def _recover(self, *, own: bool, cause: RecoveryCause) -> None:
        me = self._instance_id

        def build(admission: Admission) -> tuple[str, Mapping[str, Any]]:
            return self._report(admission, cause if admission.owner == me else "crash")

        try:
            keys = await self.store.recover(
                build, stale_after=self.lease, owner=me if own else None
            )
        except Exception as exc:
            logger.warning("outbox: could not recover open admissions: %s", exc)
            return
        if not keys:
            return
        self.recovered += len(keys)
        logger.warning(
            "outbox: %d admitted request(s) had no report (%s); queued as incomplete: %s",
            len(keys),
            "this gateway stopped before they ended"
            if cause == "shutdown"
            else "the gateway process serving them stopped",
            ", ".join(keys[:10]) + (" …" if len(keys) > 10 else ""),
        )
        if self._on_recovered is not None:
            self._on_recovered(keys)
