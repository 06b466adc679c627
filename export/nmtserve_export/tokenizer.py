"""A shared source/target subword vocabulary, trained with Hugging Face `tokenizers`.

Byte-level BPE keeps encode -> decode lossless for any Unicode text (CLDR uses
narrow no-break spaces, for one); digits are split one by one so numbers are
copied and regrouped digit by digit rather than memorised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nmtserve.bundle import SPECIAL_TOKENS


def language_token(language: str) -> str:
    """The source token that asks a multilingual model for a target language (the bundle's languages.target_tokens)."""
    return f"<2{language}>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, languages: Sequence[str] = ()) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the special tokens pad, bos, eos, unk at ids 0-3, then a language token
    for each of a multilingual model's target languages."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *map(language_token, languages)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return as_text_tokenizer(tokenizer)


def load_tokenizer(path: Path) -> Tokenizer:
    """A checkpoint's tokenizer.json, ready to encode texts."""
    return as_text_tokenizer(Tokenizer.from_file(str(path)))


def as_text_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer, set to read "<pad>" or "<eos>" in a text as the characters they are, never as the special ids
    (which would end or blank a source mid-sentence); tokenizer.json does not keep the setting. The server's
    SubwordTokenizer reads texts the same way."""
    tokenizer.encode_special_tokens = True
    return tokenizer
