"""The usage reports platform mode queues for the control plane (docs/platform-protocol.md).

One report per admitted request: a settlement's (:func:`usage_report`), an admission's
left open by a process that died (:func:`recovered_report`), or a request the control
plane may have admitted but that was never served (:func:`released_report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from gatewaykit.outbox.admissions import RecoveryCause
from gatewaykit.outbox.base import Admission
from gatewaykit.settlement import RequestEstimate, SettlementStatus
from gatewaykit.upstream import Attempt
from gatewaykit.usage import Usage

__all__ = [
    "RELEASE_ATTEMPT_ID",
    "ReportStatus",
    "admission_details",
    "recovered_report",
    "released_report",
    "usage_report",
]

#: The attempt id of a ``released`` report: the gateway never got a usable list of attempts.
RELEASE_ATTEMPT_ID = "-"

#: A usage report's ``status``: a settlement's, or ``released`` (admitted, never served).
ReportStatus = SettlementStatus | Literal["released"]

#: The ``error`` of a report recovered from an admission left open, by cause.
_RECOVERED_ERRORS: dict[RecoveryCause, str] = {
    "crash": (
        "gateway restarted: the gateway process serving this request stopped (crash or kill) "
        "before the request ended; what happened upstream is unknown"
    ),
    "shutdown": "the gateway shut down before the request ended",
}

_MAX_MESSAGE = 500


def usage_report(
    *,
    request_id: str,
    attempt_id: str,
    status: ReportStatus,
    usage: Usage | None,
    error: str | None = None,
    observed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of one usage report (docs/platform-protocol.md)."""
    report: dict[str, Any] = {
        "request_id": request_id,
        "attempt_id": attempt_id,
        "status": status,
        "usage": None,
        "usage_source": "none",
    }
    if usage is not None:
        report["usage"] = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_read_tokens": usage.cache_read_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        }
        report["usage_source"] = usage.source.value
    if error is not None:
        report["error"] = error[:_MAX_MESSAGE]
    if observed is not None:
        report["observed"] = dict(observed)
    return report


def admission_details(
    attempts: tuple[Attempt, ...], model: str, endpoint: str, estimate: RequestEstimate
) -> dict[str, Any]:
    """What is written down when a request is admitted: enough to report it without us."""
    return {
        "attempt_ids": [attempt.attempt_id for attempt in attempts],
        "model": model,
        "endpoint": endpoint,
        "prompt_tokens_estimate": estimate.prompt_tokens,
        "estimate_usd": str(estimate.amount),
    }


def recovered_report(admission: Admission, cause: RecoveryCause) -> tuple[str, dict[str, Any]]:
    """The report of an admission left open (its process died, or stopped with it open).

    Status ``incomplete``, usage unknown (``null``, source ``none``). Which attempt was
    being tried is not written down, so it names the first attempt offered; the
    observations the process kept in memory are unknown (``null``).
    """
    attempt_ids = admission.details.get("attempt_ids") or [RELEASE_ATTEMPT_ID]
    attempt_id = str(attempt_ids[0])
    report = usage_report(
        request_id=admission.request_id,
        attempt_id=attempt_id,
        status="incomplete",
        usage=None,
        error=_RECOVERED_ERRORS[cause],
        observed={
            "upstream_contacted": None,
            "committed": None,
            "output_chars": None,
            "prompt_tokens_estimate": admission.details.get("prompt_tokens_estimate"),
        },
    )
    return f"{admission.request_id}:{attempt_id}", report


def released_report(
    request_id: str, reason: str, prompt_tokens_estimate: int
) -> tuple[str, dict[str, Any]]:
    """The report of a request the control plane may have admitted but that was never
    served (no usable resolve answer): status ``released``, attempt id ``"-"``."""
    report = usage_report(
        request_id=request_id,
        attempt_id=RELEASE_ATTEMPT_ID,
        status="released",
        usage=None,
        error=reason,
        observed={
            "upstream_contacted": False,
            "committed": False,
            "output_chars": 0,
            "prompt_tokens_estimate": prompt_tokens_estimate,
        },
    )
    return f"{request_id}:{RELEASE_ATTEMPT_ID}", report
