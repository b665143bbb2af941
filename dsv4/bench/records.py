"""What one benchmark request produced: timings as the client saw them, usage, error.

Every time is in seconds on the client's monotonic clock (`time.perf_counter`), stored
relative to the request's own send time so a record means the same wherever it was taken.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """Timings and counts of one streamed request.

    `token_times_s` holds the arrival time of every SSE chunk that carried generated text
    (content, reasoning or completion text), relative to `send_time_s`. `end_s` is the arrival
    of the last chunk with `choices` (the one with `finish_reason` included), which is where
    vLLM's client ends a request too; the trailing usage chunk and `[DONE]` do not count.
    """

    index: int
    send_time_s: float = 0.0  # perf_counter at send, relative to the benchmark start
    prompt_len: int | None = None  # the dataset's own count, if it has one
    expected_output_len: int | None = None
    success: bool = False
    error: str = ""
    http_status: int | None = None
    ttft_s: float | None = None  # first chunk with any generated text (reasoning included)
    ttfc_s: float | None = None  # first chunk with answer content (reasoning excluded)
    end_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    usage_reasoning_tokens: int | None = None
    output_text: str = ""
    reasoning_text: str = ""
    finish_reason: str | None = None
    # filled in by metrics: the output token count used and where it came from
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # "usage" | "tokenizer" | "chunks"

    @property
    def e2el_s(self) -> float | None:
        return self.end_s

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive token-bearing chunks (vLLM's per-request `itl`)."""
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:])]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["itl_s"] = self.itl_s
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})
