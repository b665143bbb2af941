"""The tokenizer wrapper and incremental detokenisation on a byte-level BPE trained here
(the bundled model's tokenizer is trained the same way, on its corpus)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv4.chat import Tokenizer, encode_messages
from dsv4.chat.tokens import BOS, DSML, EOS, SPECIAL_TOKENS, THINK_END

TEXT = "Hello world, this is a tiny corpus for a byte level BPE. " * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([TEXT], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe.save(str(path))
    return Tokenizer.from_folder(path.parent)


def test_a_broken_tokenizer_file_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model":')
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_special_tokens_are_single_ids_and_bos_is_not_doubled(tokenizer):
    prompt = encode_messages([{"role": "user", "content": "Hello"}], "chat")
    ids = tokenizer.encode(prompt)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert tokenizer.special_ids[THINK_END] == ids[-1]
    assert tokenizer.encode(f"<{DSML}invoke")[1] == tokenizer.special_ids[DSML]
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello"


@pytest.mark.parametrize("text", ["昇腾 950 推理很快 🚀🔥 émoji café", "日本語 👩‍👩‍👧 test"])
def test_incremental_decoding_never_breaks_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # multi-byte characters really are split across tokens
    one_by_one = tokenizer.detokenizer()
    pieces = [one_by_one.add_token(i) for i in ids] + [one_by_one.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_incremental_decoding_after_a_prompt_matches_full_decode(tokenizer):
    rng = random.Random(0)
    prompt = tokenizer.encode(BOS + "Hello")
    text = "".join(rng.choice("ab 昇腾🚀é,.") for _ in range(200))
    ids = tokenizer.encode(text)
    detok = tokenizer.detokenizer(prompt)
    out = "".join(detok.add_token(i) for i in ids) + detok.flush()
    assert out == text


def test_not_a_v4_tokenizer_is_refused(tmp_path):
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300))
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a DeepSeek-V4 tokenizer"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_folder(tmp_path / "missing")
    assert EOS in SPECIAL_TOKENS
