"""Incremental detokenisation and stop strings split across tokens."""

from __future__ import annotations

from dsv4.chat.detokenizer import IncrementalDetokenizer
from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams


class ByteTokenizer:
    """Test double for a byte-level BPE tokenizer (the real V4 tokenizer is not bundled here):
    ids 0-255 are single bytes, higher ids are multi-byte merges, and decoding joins the bytes
    and replaces incomplete UTF-8 with U+FFFD, exactly as byte-level BPE decoders do."""

    MERGES = {256: b"hel", 257: b"lo wor", 258: b" \xc3", 259: b"<eos>"}
    SPECIAL = {259}

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(
            self.MERGES.get(i, bytes([i]) if i < 256 else b"")
            for i in ids
            if not (skip_special_tokens and i in self.SPECIAL)
        )
        return data.decode("utf-8", errors="replace")


TOK = ByteTokenizer()


def _run(ids: list[int], **params) -> Request:
    p = SamplingParams(max_tokens=100, **params)
    req = Request("r", TOK.encode("Q: "), p, eos_token_id=259)
    req.detokenizer = IncrementalDetokenizer(TOK, req.prompt_token_ids)
    for t in ids:
        req.append_token(t)
        if req.check_stop(max_model_len=10_000):
            break
    return req


def test_incremental_text_equals_full_decode_with_split_characters():
    ids = [256, 257, ord("l"), ord("d"), 258, 0xA9, 0xE2, 0x82, 0xAC, ord("!")]  # " é€!"
    detok = IncrementalDetokenizer(TOK, TOK.encode("Q: "))
    pieces = [detok.add_token(t) for t in ids]
    assert detok.output_text == TOK.decode(ids) == "hello world é€!"
    assert "\ufffd" not in "".join(pieces)
    assert pieces[4] == "" and pieces[5] == " é"  # the space waits for the rest of "é"
    assert pieces[6:9] == ["", "", "€"]


def test_stop_string_split_across_tokens_is_honoured():
    req = _run([256, 257, ord("l"), ord("d")], stop=["llo w"])
    assert req.finish_reason == "stop" and req.stop_reason == "llo w"
    assert req.text == "he" and req.output_token_ids == [256, 257]
    kept = _run([256, 257, ord("l"), ord("d")], stop=["llo w"], include_stop_str_in_output=True)
    assert kept.text == "hello w"


def test_stop_string_inside_a_split_multibyte_character():
    req = _run([ord("a"), 258, 0xA9, ord("!"), ord("z")], stop=["é!"])
    assert req.finish_reason == "stop" and req.text == "a " and req.num_output_tokens == 4


def test_earliest_of_several_stop_strings_wins_and_min_tokens_defers():
    req = _run([256, 257], stop=["wor", "ell"])
    assert req.stop_reason == "ell" and req.text == "h"
    # min_tokens=3: "lo" in the text of the first 2 tokens does not count; "xy" at token 4 does
    late = _run([256, 257, ord("x"), ord("y"), ord("z")], stop=["lo", "xy"], min_tokens=3)
    assert late.num_output_tokens == 4 and late.text == "hello wor" and late.stop_reason == "xy"


def test_streaming_holds_back_a_possible_stop_prefix():
    detok = IncrementalDetokenizer(TOK, [])
    for t in TOK.encode("abc##"):
        detok.add_token(t)
    assert detok.safe_text_len(["###"], finished=False) == 3  # "##" might start "###"
    assert detok.safe_text_len(["###"], finished=True) == 5


def test_eos_ends_the_request_and_is_not_in_the_text():
    req = _run([ord("o"), ord("k"), 259, ord("x")])
    assert req.finish_reason == "stop" and req.text == "ok" and req.output_token_ids[-1] == 259
