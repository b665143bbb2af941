"""The tokenizer of a V4 model folder (`tokenizer.json`, a `tokenizers` byte-level BPE)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from dsv4.chat.detokenizer import IncrementalDetokenizer
from dsv4.chat.tokens import BOS, EOS, SPECIAL_TOKENS


class Tokenizer:
    """Encode rendered prompts (special tokens recognised, nothing added) and decode ids."""

    def __init__(self, backend: _HFTokenizer):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [t for t in (BOS, EOS) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer has no {missing}: not a DeepSeek-V4 tokenizer")
        self.special_ids = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # the most characters one token stands for (a byte-level entry holds one character
        # per byte), so a text of n characters is at least n / max_token_chars tokens
        self.max_token_chars = max(len(t) for t in vocab)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise ValueError(f"{file} is not a valid tokenizer.json ({exc}); replace it with "
                             "the tokenizer.json of the model's release") from None
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as written: a rendered prompt already holds its BOS, so no special
        token is added (the BOS is never doubled)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_ids: list[int] = (), skip_special_tokens: bool = False
    ) -> IncrementalDetokenizer:
        """A streaming decoder for one generation: never emits half a UTF-8 character."""
        return IncrementalDetokenizer(self, list(prompt_ids), skip_special_tokens)
