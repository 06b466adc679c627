"""Reference greedy and beam search in PyTorch, decoding one token at a time with the key/value cache.

The ONNX Runtime engine in the server must give exactly these outputs; the
search rules below (tie-breaking, length penalty, when a beam stops) are the
specification it follows. The special token ids are the model's (its config):
decoding starts from bos, ends at eos and never generates pad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import pad
from .model import Transformer


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without <bos> and <eos>
    score: float  # sum of token log-probabilities (including <eos>), divided by length ** length_penalty


class IncrementalDecoder:
    """Runs the decoder one step at a time for a batch of rows, growing the self-attention cache."""

    def __init__(self, model: Transformer, src: Tensor):
        self.model = model
        self.src_mask = (src != model.config.pad_id)[:, None, None, :]  # (B, 1, 1, S)
        memory = model.encode(src, self.src_mask)
        self.memory_keys, self.memory_values = model.memory_keys_values(memory)  # N x (B, h, S, d_k)
        self.keys, self.values = model.empty_cache(src.size(0), src.device)  # N x (B, h, t, d_k)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (B,); return next-token log-probabilities (B, V)."""
        B, t = tokens.size(0), self.keys[0].size(2)
        positions = torch.full((B, 1), t, dtype=torch.long, device=tokens.device)
        self_mask = torch.ones(B, 1, 1, t + 1, dtype=torch.bool, device=tokens.device)  # every earlier step is visible
        log_probs, new_keys, new_values = self.model.decode(
            tokens[:, None], positions, self.keys, self.values, self_mask, self.memory_keys, self.memory_values, self.src_mask
        )
        self.keys = [torch.cat([past, new], dim=2) for past, new in zip(self.keys, new_keys)]
        self.values = [torch.cat([past, new], dim=2) for past, new in zip(self.values, new_values)]
        return log_probs[:, -1]  # (B, V)

    def select(self, rows: Tensor) -> None:
        """Keep (and repeat) the given rows of the batch, e.g. to follow beam reordering."""
        self.keys, self.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
        self.memory_keys, self.memory_values = [k[rows] for k in self.memory_keys], [v[rows] for v in self.memory_values]
        self.src_mask = self.src_mask[rows]


def model_device(model: Transformer) -> torch.device:
    """The device the model's weights are on, where its inputs must be."""
    return next(model.parameters()).device


@torch.inference_mode()
def greedy_search(
    model: Transformer, sources: Sequence[Sequence[int]], *, max_length: int | None = None, min_length: int = 0
) -> list[list[int]]:
    """Greedy decoding of a batch of source id lists (at most max_length tokens, None: the model's limit, as the
    server's default); returns the generated ids without <eos>."""
    c = model.config
    max_length = c.max_len if max_length is None else max_length
    device = model_device(model)
    decoder = IncrementalDecoder(model, pad(sources, c.pad_id).to(device))
    B = len(sources)
    tokens = torch.full((B,), c.bos_id, dtype=torch.long, device=device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_length):
        log_probs = decoder.step(tokens)
        log_probs[:, c.pad_id] = float("-inf")
        if step < min_length:
            log_probs[:, c.eos_id] = float("-inf")
        tokens = log_probs.argmax(dim=-1)
        for row, token in enumerate(tokens.tolist()):  # one copy from the device a step, not one per row
            if done[row]:
                continue
            if token == c.eos_id:
                done[row] = True
            else:
                outputs[row].append(token)
        if all(done):
            break
    return outputs


@torch.inference_mode()
def beam_search(
    model: Transformer,
    source: Sequence[int],
    *,
    beam_size: int = 4,
    max_length: int | None = None,
    min_length: int = 0,
    length_penalty: float = 1.0,
    num_hypotheses: int = 1,
) -> list[Hypothesis]:
    """Beam search for one source id list; the best num_hypotheses, best first.

    Each step ranks the beam_size x V continuations by total log-probability
    (ties by lower row, then lower token id). Walking down the ranking, an
    <eos> among the first beam_size finishes a hypothesis; other candidates fill
    the next beam up to beam_size rows. Search ends when beam_size hypotheses
    have finished or at max_length, where the unfinished ones are finished as
    they are (None: the model's limit). Scores are divided by length **
    length_penalty (length counts <eos>).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, not {beam_size}")
    c = model.config
    max_length = c.max_len if max_length is None else max_length
    device = model_device(model)
    decoder = IncrementalDecoder(model, pad([source], c.pad_id).to(device))
    prefixes: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device)
    tokens = torch.tensor([c.bos_id], device=device)
    finished: list[Hypothesis] = []
    for step in range(max_length):
        log_probs = decoder.step(tokens)  # (rows, V)
        log_probs[:, c.pad_id] = float("-inf")
        if step < min_length:
            log_probs[:, c.eos_id] = float("-inf")
        vocab_size = log_probs.size(1)
        candidates = (scores[:, None] + log_probs).flatten()  # (rows * V,)
        ranked_scores, ranked = torch.sort(candidates, descending=True, stable=True)
        rows, next_tokens, next_scores = [], [], []
        for rank, (index, score) in enumerate(zip(ranked[: 2 * beam_size].tolist(), ranked_scores[: 2 * beam_size].tolist())):
            row, token = divmod(index, vocab_size)
            if token == c.eos_id:
                if rank < beam_size:
                    finished.append(Hypothesis(prefixes[row], score / (step + 1) ** length_penalty))
            else:
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                if len(rows) == beam_size:
                    break
        if len(finished) >= beam_size:
            break
        prefixes = [prefixes[row] + [token] for row, token in zip(rows, next_tokens)]
        scores = torch.tensor(next_scores, device=device)
        tokens = torch.tensor(next_tokens, device=device)
        decoder.select(torch.tensor(rows, device=device))
    else:
        finished += [Hypothesis(prefix, score / max_length**length_penalty) for prefix, score in zip(prefixes, scores.tolist())]
    finished.sort(key=lambda h: -h.score)  # stable: earlier-finished first among equals
    return finished[:num_hypotheses]
