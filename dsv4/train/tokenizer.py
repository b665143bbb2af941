"""Train the byte-level BPE of a small V4 model on its corpus.

Digits are split one per token (so arithmetic is learnable digit by digit) and V4's special
tokens are added with the released strings, so `dsv4.chat.Tokenizer` treats it like the real one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4.chat.tokens import BOS, EOS, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """BOS gets id 0 and EOS id 1, as in the released models (bos_token_id 0, eos_token_id 1)."""
    specials = [BOS, EOS] + [t for t in SPECIAL_TOKENS if t not in (BOS, EOS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path) -> Path:
    path = Path(folder) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
