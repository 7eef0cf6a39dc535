"""Token usage of one provider call, with where the numbers came from."""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["MAX_TOKENS", "Usage", "UsageSource", "clamp_usage"]

#: The largest token count of one kind that gatewaykit charges and stores for one call.
#: No real call comes near it (context windows are ~10⁷ tokens), so it never alters a
#: genuine report; yet all four kinds at this count, priced at up to $2,300 per million
#: tokens, still fit a signed 64-bit nano-USD counter, and it fits SQLite INTEGER and
#: PostgreSQL bigint columns with room to spare. A larger report is a provider bug or an
#: attack, and is clamped (:func:`clamp_usage`) instead of breaking the settlement.
MAX_TOKENS = 10**12
_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


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
        for field in _FIELDS:
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


def clamp_usage(usage: Usage) -> tuple[Usage, str | None]:
    """``usage`` with every count capped at :data:`MAX_TOKENS`, and a note saying so.

    The note is None when nothing was capped (then ``usage`` itself is returned). The
    source is kept: the numbers still came from where they came from, only too large.
    Settlement charges the clamped usage, so an absurd report can neither overflow the
    store nor leave the hold uncharged.
    """
    over = {f: getattr(usage, f) for f in _FIELDS if getattr(usage, f) > MAX_TOKENS}
    if not over:
        return usage, None
    clamped = Usage(
        input_tokens=min(usage.input_tokens, MAX_TOKENS),
        output_tokens=min(usage.output_tokens, MAX_TOKENS),
        cache_read_tokens=min(usage.cache_read_tokens, MAX_TOKENS),
        cache_write_tokens=min(usage.cache_write_tokens, MAX_TOKENS),
        source=usage.source,
    )
    detail = ", ".join(f"{field}={value}" for field, value in over.items())
    return clamped, f"reported usage clamped to {MAX_TOKENS} tokens per kind ({detail})"
