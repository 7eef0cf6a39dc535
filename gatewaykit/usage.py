"""Token usage of one provider call, with where the numbers came from."""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["Usage", "UsageSource"]


class UsageSource(str, enum.Enum):
    """Where a ``Usage`` came from; unknown usage is never silently zero."""

    PROVIDER = "provider"  # the provider reported final usage
    PARTIAL = "partial"  # the provider reported some usage before the call ended
    ESTIMATED = "estimated"  # gatewaykit estimated it (prompt estimate + observed output)
    NONE = "none"  # nothing is known


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Token counts by kind. Cache counts are separate from ``input_tokens``."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    source: UsageSource = UsageSource.PROVIDER

    def __post_init__(self) -> None:
        for field in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Usage.{field} must be a non-negative int, got {value!r}")
        if not isinstance(self.source, UsageSource):
            object.__setattr__(self, "source", UsageSource(self.source))

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )
