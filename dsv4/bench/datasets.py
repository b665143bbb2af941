"""Benchmark prompts: random of controlled token lengths, ShareGPT JSON, JSONL files.

A tokenizer here is the `tokenizers` library on a `tokenizer.json` (the server's own, or
dsv4's); nothing of the model is imported. Token counts that matter for metrics are taken from
the server's `usage` anyway; the tokenizer only shapes the workload.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS = ("random", "sharegpt", "jsonl")

# Used for random prompts when no tokenizer is given: common short English words, most of
# which are one token in BPE vocabularies, so the length is roughly (not exactly) input_len.
_PLAIN_WORDS = (
    "the of and to in is was for on that with as by at from his her they this had not are "
    "but were which be one all an or their has more when will there can if would so about "
    "what up out time into some them other then only these two its now may like first over "
    "new any such most made after way where many also before must through back years much"
).split()


@dataclass
class SampleRequest:
    """One prompt to send. `prompt_len` is the client's token count when it has one."""

    prompt: str
    output_len: int | None
    prompt_len: int | None = None
    messages: list[dict[str, Any]] | None = None
    send_time_s: float | None = None  # a trace's send time, relative to the first request


class TextTokenizer:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json (or a folder holding one)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer  # lazy: only needed when a path is given

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"--tokenizer {path} not found; give a tokenizer.json file or a folder with one"
            )
        self.tok = Tokenizer.from_file(str(path))
        self.plain_ids = self._clean_ids()

    def _clean_ids(self) -> list[int]:
        """Ids a random prompt may use: no added/special tokens, and only tokens that decode to
        whole printable text and encode back to themselves (byte-level vocabularies hold pieces
        of UTF-8 characters that would turn into U+FFFD and change the count)."""
        special = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        candidates = sorted(i for piece, i in self.tok.get_vocab().items() if piece not in special)
        # batch calls run in Rust threads: a 128k vocabulary takes about a second
        texts = self.tok.decode_batch([[i] for i in candidates], skip_special_tokens=True)
        ok = [t and t.isprintable() and "\ufffd" not in t for t in texts]
        encoded = self.tok.encode_batch([t if good else "" for t, good in zip(texts, ok)],
                                        add_special_tokens=False)
        ids = [i for i, good, enc in zip(candidates, ok, encoded) if good and enc.ids == [i]]
        if not ids:
            raise ValueError("the tokenizer has no plain tokens to build random prompts from")
        return sorted(ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self.encode(text))


def _exact_length_text(tok: TextTokenizer, target: int, rng: random.Random) -> tuple[str, int]:
    """Text that re-encodes to exactly `target` tokens.

    Random ids rarely round-trip (decode then encode merges or splits pieces), so repeatedly
    re-encode, cut back or top up with fresh random ids until the count is stable. Returns the
    text and its real token count (equal to target unless the vocabulary makes that impossible).
    """
    ids = [rng.choice(tok.plain_ids) for _ in range(target)]
    text = tok.decode(ids)
    for _ in range(64):
        ids = tok.encode(text)
        if len(ids) == target:
            return text, target
        if len(ids) > target:
            ids = ids[:target]
        else:
            ids = ids + [rng.choice(tok.plain_ids) for _ in range(target - len(ids))]
        text = tok.decode(ids)
    # Rare: the loop cycles. Trim characters until at or under target; report the real count.
    while tok.count(text) > target and len(text) > 1:
        text = text[:-1]
    return text, tok.count(text)


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    *,
    tokenizer: TextTokenizer | None = None,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts of random tokens; lengths uniform in [L*(1-r), L*(1+r)] (vLLM's range ratio)."""
    if input_len < 1 or output_len < 1:
        raise ValueError("--input-len and --output-len must be at least 1 for --dataset random")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def draw(n: int) -> int:
        lo, hi = max(1, round(n * (1 - range_ratio))), max(1, round(n * (1 + range_ratio)))
        return rng.randint(lo, hi)

    samples = []
    for _ in range(num_prompts):
        n_in, n_out = draw(input_len), draw(output_len)
        if tokenizer is not None:
            text, real_len = _exact_length_text(tokenizer, n_in, rng)
            samples.append(SampleRequest(text, n_out, prompt_len=real_len))
        else:
            text = " ".join(rng.choice(_PLAIN_WORDS) for _ in range(n_in))
            samples.append(SampleRequest(text, n_out, prompt_len=None))
    return samples


def sharegpt_requests(
    path: str | Path,
    num_prompts: int,
    *,
    tokenizer: TextTokenizer | None = None,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """First human turn as prompt; the first reply's token count sizes the output.

    As in vLLM: shuffle with the seed, skip conversations with fewer than two turns and, when
    lengths are known, pairs with a prompt or reply under 4 tokens or over 1024 / 2048 in total.
    """
    if tokenizer is None and output_len is None:
        raise ValueError(
            "--dataset sharegpt sizes outputs from the reference replies: give --tokenizer PATH "
            "(tokenizer.json), or fix the length with --output-len N"
        )
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT file {path} must hold a JSON list of conversations")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    samples: list[SampleRequest] = []
    for i in order:
        conv = data[i].get("conversations") if isinstance(data[i], dict) else None
        if not conv or len(conv) < 2:
            continue
        prompt, reply = str(conv[0].get("value", "")), str(conv[1].get("value", ""))
        prompt_len = tokenizer.count(prompt) if tokenizer else None
        n_out = output_len if output_len is not None else tokenizer.count(reply)  # type: ignore[union-attr]
        if prompt_len is not None and output_len is None:
            if prompt_len < 4 or n_out < 4 or prompt_len > 1024 or prompt_len + n_out > 2048:
                continue
        samples.append(SampleRequest(prompt, n_out, prompt_len=prompt_len))
        if len(samples) == num_prompts:
            break
    if not samples:
        raise ValueError(f"ShareGPT file {path} has no usable conversations (need 2+ turns)")
    return _cycle(samples, num_prompts)


def jsonl_requests(
    path: str | Path,
    num_prompts: int,
    *,
    tokenizer: TextTokenizer | None = None,
    output_len: int | None = None,
) -> list[SampleRequest]:
    """One JSON object per line: {"prompt": str} or {"messages": [...]}, optional "output_len"
    (or "max_tokens"); --output-len fills in where a line has none. A file whose every line has
    a "timestamp" (milliseconds, as in request traces) is a trace: it is replayed at those
    times (relative to the first), and must hold at least --num-prompts lines."""
    samples: list[SampleRequest] = []
    with open(_existing(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from None
            if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
                raise ValueError(f'{path}:{lineno} needs a "prompt" string or "messages" list')
            n_out = obj.get("output_len", obj.get("max_tokens", output_len))
            if n_out is None:
                raise ValueError(
                    f'{path}:{lineno} has no "output_len"; add one or pass --output-len N'
                )
            messages = obj.get("messages")
            prompt = obj.get("prompt") or "\n".join(str(m.get("content", "")) for m in messages)
            prompt_len = tokenizer.count(prompt) if tokenizer else None
            stamp = obj.get("timestamp")
            if stamp is not None and not isinstance(stamp, (int, float)):
                raise ValueError(f'{path}:{lineno} "timestamp" must be a number of milliseconds')
            samples.append(SampleRequest(prompt, int(n_out), prompt_len, messages,
                                         None if stamp is None else stamp / 1000.0))
    if not samples:
        raise ValueError(f"JSONL file {path} holds no prompts")
    stamps = [s.send_time_s for s in samples]
    if any(t is not None for t in stamps):
        if None in stamps:
            raise ValueError(f'{path}: some lines have a "timestamp" and some do not; a trace '
                             "needs one on every line")
        if len(samples) < num_prompts:
            raise ValueError(f"trace {path} has {len(samples)} requests, fewer than "
                             f"--num-prompts {num_prompts}; a trace is not repeated")
        first = min(stamps)
        for sample in samples:
            sample.send_time_s -= first
        return samples[:num_prompts]
    return _cycle(samples, num_prompts)


def load_requests(
    dataset: str,
    num_prompts: int,
    *,
    dataset_path: str | None = None,
    input_len: int = 1024,
    output_len: int | None = None,
    tokenizer: TextTokenizer | None = None,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """The workload named by --dataset."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {num_prompts}")
    if dataset == "random":
        return random_requests(
            num_prompts, input_len, output_len if output_len is not None else 128,
            tokenizer=tokenizer, range_ratio=range_ratio, seed=seed,
        )
    if dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if not dataset_path:
        raise ValueError(f"--dataset {dataset} needs --dataset-path FILE")
    if dataset == "sharegpt":
        return sharegpt_requests(
            dataset_path, num_prompts, tokenizer=tokenizer, output_len=output_len, seed=seed
        )
    return jsonl_requests(dataset_path, num_prompts, tokenizer=tokenizer, output_len=output_len)


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--dataset-path {p} does not exist or is not a file")
    return p


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(_existing(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _cycle(samples: list[SampleRequest], n: int) -> list[SampleRequest]:
    """Exactly n samples, repeating the file's prompts in order when it has fewer."""
    return [samples[i % len(samples)] for i in range(n)]
