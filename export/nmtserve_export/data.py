"""Turn text pairs into padded id tensors, batched by token count."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from nmtserve.bundle import BOS_ID, EOS_ID, PAD_ID
from nmtserve.normalize import normalize_source

from .tokenizer import language_token


def encode_sources(tokenizer: Tokenizer, texts: Sequence[str], languages: Sequence[str] | None = None) -> list[list[int]]:
    """Source ids of the texts read as the server reads them (normalize_source): the subwords followed by <eos>, after
    the token asking for the text's target language where `languages` gives one per text (a multilingual model's; ""
    for none)."""
    encoded = [encoding.ids + [EOS_ID] for encoding in tokenizer.encode_batch([normalize_source(text) for text in texts])]
    if languages is None:
        return encoded
    return [([tokenizer.token_to_id(language_token(language))] if language else []) + ids for language, ids in zip(languages, encoded)]


def encode_targets(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Target ids: <bos>, the subwords, <eos> (decoder input is [:-1], expected output [1:])."""
    return [[BOS_ID] + encoding.ids + [EOS_ID] for encoding in tokenizer.encode_batch(list(texts))]


def pad(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> Tensor:
    """Right-pad id lists into one (B, max_len) tensor."""
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long)


@dataclass
class Batch:
    src: Tensor  # (B, S)
    tgt_in: Tensor  # (B, T): <bos> y_1 ... y_n
    tgt_out: Tensor  # (B, T): y_1 ... y_n <eos>
    n_tokens: int  # target tokens, the unit of the loss and of throughput

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`."""
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.n_tokens)


def make_batch(sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> Batch:
    """A padded batch from source and target id lists."""
    tgt = pad(targets)
    return Batch(src=pad(sources), tgt_in=tgt[:, :-1], tgt_out=tgt[:, 1:], n_tokens=sum(len(t) - 1 for t in targets))


def token_batches(
    sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], max_tokens: int, rng: random.Random | None
) -> list[list[int]]:
    """Group example indices into batches of at most max_tokens padded tokens, similar lengths together.

    With an rng the examples are shuffled, sorted by length within pools of
    about 100 batches (so padding stays low), and the batches shuffled; without
    one the order is by length, for evaluation.
    """
    order = list(range(len(sources)))
    length = [max(len(sources[i]), len(targets[i])) for i in order]
    if rng is None:
        order.sort(key=lambda i: length[i])
        pools = [order]
    else:
        rng.shuffle(order)
        pool_size = max(1, 100 * max_tokens // max(1, sum(length) // len(length)))
        pools = [sorted(order[i : i + pool_size], key=lambda i: length[i]) for i in range(0, len(order), pool_size)]
    batches: list[list[int]] = []
    for pool in pools:
        batch: list[int] = []
        longest = 0
        for i in pool:
            if batch and max(longest, length[i]) * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, length[i])
        if batch:
            batches.append(batch)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def epoch_batches(
    sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], max_tokens: int, seed: int
) -> Iterator[Batch]:
    """Endless training batches, a fresh shuffle each epoch, reproducible from the seed."""
    epoch = 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        for indices in token_batches(sources, targets, max_tokens, rng):
            yield make_batch([sources[i] for i in indices], [targets[i] for i in indices])
        epoch += 1
