"""Child process for test_restart: queue reports while the control plane is down, say
which, then wait to be killed. Run as ``python -m tests.platform._kill_child URL TABLE N``
(an ``open_outbox`` URL and table name)."""

from __future__ import annotations

import json
import sys

import anyio
import httpx

from gatewaykit.envelopes import WireFormat
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.platform import PlatformMode
from gatewaykit.outbox import RetryPolicy, open_outbox
from gatewaykit.parsing import ParsedRequest
from gatewaykit.usage import Usage


def control_plane(request: httpx.Request) -> httpx.Response:
    """Resolve works; usage posts cannot get through (the control plane "went down")."""
    if request.url.path == "/v1/resolve":
        body = json.loads(request.content)
        attempt = {"attempt_id": "att_1", "provider": "openai", "base_url": "http://up.test/v1"}
        return httpx.Response(200, json={"request_id": body["request_id"], "attempts": [attempt]})
    raise httpx.ConnectError("connection refused", request=request)


async def main(url: str, table: str, count: int) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(control_plane)) as client:
        mode = PlatformMode(
            base_url="http://plane.test",
            gateway_token="gw-secret-token",
            client=client,
            outbox=open_outbox(url, table=table),
            retry=RetryPolicy(initial_delay=0.01, max_delay=0.05),
        )
        async with mode:
            keys = []
            for n in range(count):
                request = GatewayRequest(
                    request_id=f"req_{n}",
                    path="/v1/chat/completions",
                    format=WireFormat.OPENAI_CHAT,
                    headers={"authorization": "Bearer tok-alice"},
                    body={},
                    raw_body=b"{}",
                    parsed=ParsedRequest(model="gpt-4o-mini", prompt_chars=4, max_output_tokens=10),
                )
                context = await mode.resolve(request)
                await context.settlement.on_success(Usage(input_tokens=n + 1, output_tokens=2))
                keys.append(f"req_{n}:att_1")
            await anyio.sleep(0.2)  # let the sender fail a few deliveries first
            sys.stdout.write(json.dumps(keys) + "\n")
            sys.stdout.flush()
            await anyio.sleep(3600)  # killed here, reports unacknowledged


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
