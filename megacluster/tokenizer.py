"""Byte-level BPE tokenizer via the `tokenizers` library: train, save, load.

Byte-level means every input byte sequence is encodable (no unknown tokens): code, Unicode and binary-ish
text all round-trip. One special token, `<|endoftext|>`, separates documents; the literal text `<|endoftext|>`
inside a document encodes as text (`encode_special_tokens`, set by `train` and `load` alike: tokenizer.json does
not keep it), so only the separator the data pipeline appends is the special id.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with at most `vocab_size` tokens (fewer if the corpus runs out of merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def save(tok: Tokenizer, path: str | Path) -> None:
    tok.save(str(path))


def load(path: str | Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def eot_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOT)
