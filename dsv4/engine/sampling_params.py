"""Per-request sampling parameters (OpenAI / vLLM meanings), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # the OpenAI API allows at most 20 top_logprobs
GREEDY_BELOW = 1e-5  # smaller temperatures are greedy: float32 logits divided by 1e-38 overflow
# to inf and the softmax to NaN (vLLM treats temperatures under 1e-5 as greedy too)


@dataclass
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    temperature 0 (or below GREEDY_BELOW) means greedy (exact argmax of the penalised logits).
    Penalties: presence and frequency count generated tokens only (OpenAI semantics);
    repetition_penalty counts prompt and generated tokens (Hugging Face semantics: positive
    logits divided, negative multiplied).
    `logprobs` is how many top alternatives to return per generated token (0 = only the chosen
    token's logprob, None = no logprobs); the values are those of the model's raw distribution
    (log_softmax of the logits before penalties, temperature and truncation), as vLLM returns by
    default.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k truncation
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's / cache's context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    stop_after: list[str] = field(default_factory=list)  # strings that end the request and stay
    # in its text whatever include_stop_str_in_output says (the server ends a forced tool call
    # at its closing tag this way: exact in tokens even when a step yields several)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name in ("stop", "stop_after", "stop_token_ids"):
            value = getattr(self, name)
            if value is None:
                value = []
            elif isinstance(value, (str, int)) and name != "stop_after":
                value = [value]  # one stop string or one stop token id
            _check(isinstance(value, (list, tuple)), name, value, "must be a list")
            setattr(self, name, list(value))
        if self.top_k == -1:
            self.top_k = 0
        _check(_integer(self.n) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _check(_number(self.temperature) and self.temperature >= 0.0, "temperature",
               self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        _check(_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p,
               "must be in (0, 1]")
        _check(_integer(self.top_k) and self.top_k >= 0, "top_k", self.top_k,
               "must be 0 or -1 (disabled) or a positive integer")
        _check(_number(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", self.min_p,
               "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_number(value) and -2.0 <= value <= 2.0, name, value, "must be in [-2, 2]")
        _check(_number(self.repetition_penalty) and self.repetition_penalty > 0.0,
               "repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        _check(self.max_tokens is None or (_integer(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens", self.max_tokens, "must be a positive integer or None")
        _check(_integer(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               self.min_tokens, "must be a non-negative integer")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"must be <= max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (_integer(self.logprobs) and
                                         0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", self.logprobs,
               f"must be None or an integer in [0, {MAX_LOGPROBS}] (alternatives per token)")
        for name in ("stop", "stop_after"):
            value = getattr(self, name)
            _check(all(isinstance(s, str) and s for s in value), name, value,
                   "must hold non-empty strings only")
        _check(all(_integer(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "must be non-negative token ids")
        _check(self.seed is None or _integer(self.seed), "seed", self.seed,
               "must be an integer or None")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name),
                   "must be True or False")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        """Every string that ends the request: `stop` and `stop_after`."""
        return self.stop + self.stop_after

    def for_child(self, index: int) -> SamplingParams:
        """Parameters of the index-th of n parallel samples: n=1 and a distinct seed.

        Child i of a seeded request gets seed + i, so the n samples differ from each other and
        the whole set is reproducible; unseeded children draw from the engine's shared stream.
        """
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it {rule}.")
