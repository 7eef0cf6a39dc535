"""PlatformMode's resolve call: one POST to ``{base_url}/v1/resolve``, bounded in time.

The answer's JSON comes back on a 200 (:func:`~gatewaykit.modes.platform_messages.
parse_attempts` reads it); any other status is relayed or turned into a 503
(:func:`~gatewaykit.modes.platform_messages.control_plane_refusal`). A call whose outcome
the gateway cannot know — no answer in time, the connection lost after sending, a 5xx, the
caller cancelled — may still have been admitted by the control plane, so it is
``release``\\ d (reported ``released``) before the error is raised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from gatewaykit.errors import UpstreamConnectError, UpstreamError
from gatewaykit.http import Timeouts, UpstreamClient, post
from gatewaykit.modes.platform_messages import control_plane_refusal, unavailable
from gatewaykit.settlement import RequestEstimate

__all__ = ["ResolveClient"]

logger = logging.getLogger("gatewaykit.platform")


class ResolveClient:
    """Posts resolve requests for one control plane; ``release(request_id, reason,
    estimate)`` reports a request whose admission is in doubt (it must never raise)."""

    def __init__(
        self,
        client: UpstreamClient,
        *,
        base_url: str,
        gateway_token: str,
        timeout: float,
        release: Callable[[str, str, RequestEstimate], Awaitable[None]],
    ) -> None:
        self.timeout = timeout
        self._client = client
        self._token = gateway_token
        self._url = f"{base_url}/v1/resolve"
        self._timeouts = Timeouts(connect=timeout, read=timeout, write=timeout, pool=timeout)
        self._release = release

    async def post(
        self, request_id: str, payload: Mapping[str, Any], estimate: RequestEstimate
    ) -> Any:
        """The decoded JSON of a 200 answer (None when it is not JSON); else raises the
        :class:`~gatewaykit.errors.RequestRejected` to answer the client with."""
        headers = {
            "authorization": f"Bearer {self._token}",
            "content-type": "application/json",
        }
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            with anyio.fail_after(self.timeout):
                status, answer_headers, raw = await post(
                    self._client,
                    self._url,
                    body,
                    headers=headers,
                    timeouts=self._timeouts,
                )
        except anyio.get_cancelled_exc_class():
            # The caller gave up (a mode that does not shield resolve, as the middleware
            # does): the control plane may still admit the request.
            with anyio.CancelScope(shield=True):
                await self._release(request_id, "the gateway stopped waiting for resolve", estimate)
            raise
        except (UpstreamError, TimeoutError) as exc:
            if not isinstance(exc, UpstreamConnectError):  # it may have reached the plane
                await self._release(request_id, _resolve_failure(exc), estimate)
            if isinstance(exc, TimeoutError):  # UpstreamTimeoutError included
                logger.warning("resolve of %s timed out", request_id)
                raise unavailable(
                    f"the control plane did not answer within {self.timeout:g}s"
                ) from None
            logger.warning("resolve of %s failed: %s", request_id, exc)
            reason = (
                exc.cause if isinstance(exc, UpstreamError) and exc.cause else type(exc).__name__
            )
            raise unavailable(f"the control plane is unreachable ({reason})") from None
        data = _json_or_none(raw)
        if status == 200:
            return data
        if status >= 500:
            # A 5xx may come after the control plane admitted (or from a proxy in front of
            # it that gave up waiting): the outcome is unknown, so release.
            await self._release(request_id, f"the resolve answer was HTTP {status}", estimate)
        raise control_plane_refusal(request_id, status, data, answer_headers)


def _resolve_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no resolve answer in time"
    cause = exc.cause if isinstance(exc, UpstreamError) else ""
    return f"the resolve call failed ({cause or type(exc).__name__})"


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, TypeError):
        return None
