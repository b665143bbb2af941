"""Request state inside the engine and the outputs handed back to callers."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from dsv4.chat.detokenizer import IncrementalDetokenizer
from dsv4.engine.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its cache freed; recomputed on readmission
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass
class TokenLogprobs:
    """Logprobs for one generated token, from the raw distribution (see sampler.py)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first; empty if logprobs=0


@dataclass
class Request:
    """One sequence being generated. `n > 1` requests are split into n of these by the engine.

    Cache ownership: `state_slot` indexes the window rings and compressor states of every
    layer; `block_table` lists the blocks holding its compressed entries and indexer keys
    (shared by all CSA and HCA layers, see kv_cache.py).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    detokenizer: IncrementalDetokenizer | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    state_slot: int | None = None
    block_table: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None
    draft_token_ids: list[int] = field(default_factory=list)  # the MTP's guess of what follows
    num_preemptions: int = 0
    arrival_index: int = field(default_factory=lambda: next(_arrival_counter))

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt; send >= 1 token.")

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of the prompt followed by the outputs, without joining the two
        lists first: a decode step asks each request for one token, and joining cost O(prompt)
        per request per step (0.1 ms of a 32-request step with 2,000-token prompts)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens known but not yet in the cache (1 in decode; the rest of the prompt in prefill,
        or prompt + outputs again after a preemption)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int | None:
        mt = self.sampling_params.max_tokens
        return None if mt is None else self.num_prompt_tokens + mt

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    @property
    def text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer is not None else ""

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        if self.detokenizer is not None:
            self.detokenizer.add_token(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """After a token was appended: set the finished status if it ends the request."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last == self.eos_token_id:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params.stop_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
                return True
            if params.stop_strings and self.detokenizer is not None:
                hit = self.detokenizer.find_stop(params.stop, params.include_stop_str_in_output,
                                                 kept=params.stop_after)
                if hit is not None:
                    self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, hit
                    return True
        elif params.stop_strings and self.detokenizer is not None:
            self.detokenizer.skip_stop_check()
        if (params.max_tokens is not None and self.num_output_tokens >= params.max_tokens) or (
            self.num_tokens >= max_model_len
        ):
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False


@dataclass
class CompletionOutput:
    """One of the n samples of a request."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched


@dataclass
class RequestOutput:
    """What `generate` returns per prompt and what `step` reports per updated request.

    `token_ids`, `text`, `logprobs`, `finish_reason` and `stop_reason` are those of the first
    sample (the only one when n = 1); `outputs` holds all n. The outputs of one request share
    one `prompt_token_ids` list (not the engine's own); each holds its own token lists.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.outputs[0].stop_reason
