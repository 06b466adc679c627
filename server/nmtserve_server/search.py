"""Greedy and beam search over log-probabilities, one decoder step at a time (numpy, no model).

These are the exact rules of the PyTorch reference decoder
(`nmtserve_export.decode`): candidates ranked by total log-probability with
ties to the lower row and token id; an <eos> among the first beam_size
candidates finishes a hypothesis; search ends when beam_size hypotheses have
finished or at max_length; scores are divided by length ** length_penalty;
<pad> is never generated. Greedy search (beam_size 1) follows the same rules
on a faster path. The start, end and padding ids are the bundle's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nmtserve.bundle import SpecialTokens


MAX_LENGTH_PENALTY = 10.0  # the API's range for length_penalty is [0, 10] (translator.proto)
MAX_ECHOED = 32  # characters of a bad value repeated in an error
MAX_VIOLATIONS = 10  # violations listed in one error: a server's trailers must stay small enough to reach the client


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 1  # beam width (1 for greedy search)
    max_length: int = 128  # most tokens to generate, <eos> included
    min_length: int = 0  # fewest tokens to generate before <eos> may end a hypothesis
    length_penalty: float = 1.0  # scores are divided by length ** length_penalty
    num_hypotheses: int = 1  # hypotheses to return, best first (at most beam_size)
    return_alignment: bool = False  # also return the encoder-decoder attention of every generated token

    def problems(self, max_target_length: int) -> list[tuple[str, str]]:
        """What is wrong with these options for a model that generates at most max_target_length tokens: (the API's
        field, why) for each, in the words the server refuses a request with."""
        def beyond(value: int, lowest: int, highest: str) -> str:
            return f"{value} is below {lowest}" if value < lowest else f"{value} is above {highest}"

        checks = [
            ("options.beam_size", self.beam_size >= 1, f"{self.beam_size} is below 1"),
            ("options.max_length", 1 <= self.max_length <= max_target_length,
             beyond(self.max_length, 1, f"the model's limit of {max_target_length} tokens")),
            ("options.min_length", 0 <= self.min_length <= self.max_length, beyond(self.min_length, 0, f"max_length {self.max_length}")),
            ("options.num_hypotheses", 1 <= self.num_hypotheses <= self.beam_size,
             beyond(self.num_hypotheses, 1, f"beam_size {self.beam_size}")),
            ("options.length_penalty", math.isfinite(self.length_penalty) and 0 <= self.length_penalty <= MAX_LENGTH_PENALTY,
             f"{self.length_penalty} is outside [0, {MAX_LENGTH_PENALTY:g}]"),
        ]
        return [(name, description) for name, ok, description in checks if not ok]


def describe(problems: list[tuple[str, str]]) -> str:
    """One message for a list of (field, why) problems, the way the server's INVALID_ARGUMENT states them."""
    return "; ".join(f"{name}: {why}" for name, why in problems)


def listed(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (field, why) problems one error names: the first MAX_VIOLATIONS, then a count of the rest."""
    if len(problems) <= MAX_VIOLATIONS:
        return problems
    return [*problems[:MAX_VIOLATIONS], ("request", f"{len(problems) - MAX_VIOLATIONS} more violations not listed")]


def echo(value: str) -> str:
    """A client's value, quoted and cut short, for an error message."""
    return repr(value[:MAX_ECHOED]) + ("…" if len(value) > MAX_ECHOED else "")


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without <bos> and <eos>
    score: float  # normalised total log-probability
    # Per generated token (with <eos>), attention over the source tokens: (tokens, source tokens), float32. An array,
    # not lists of floats, which take 8 times the memory and twice the bytes through the decode process's pipe.
    alignment: np.ndarray | None = None


def top_candidates(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest scores, largest first, ties to the lower index (as a stable sort)."""
    n = min(n, scores.size)
    threshold = np.partition(scores, scores.size - n)[scores.size - n]
    contenders = np.flatnonzero(scores >= threshold)  # every index that could rank in the top n, ties included
    return contenders[np.argsort(-scores[contenders], kind="stable")][:n]


@dataclass
class BeamSearch:
    """The search of one source sentence: which tokens its rows feed next, and what has finished."""

    options: DecodeOptions
    tokens: SpecialTokens  # the model's start (bos), end (eos) and padding ids
    prefixes: list[list[int]] = field(default_factory=lambda: [[]])
    scores: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.float32))
    alignments: list[list[np.ndarray]] = field(default_factory=lambda: [[]])
    finished: list[Hypothesis] = field(default_factory=list)
    step: int = 0
    done: bool = False

    @property
    def rows(self) -> int:
        """Rows this search feeds at the next step (1 at the first step, then beam_size)."""
        return len(self.prefixes)

    def next_tokens(self) -> list[int]:
        """The token each row feeds at the next step."""
        return [prefix[-1] if prefix else self.tokens.bos for prefix in self.prefixes]

    def advance(self, log_probs: np.ndarray, alignment: np.ndarray | None) -> list[int]:
        """Take one step's log-probabilities (rows, V); returns each new row's parent row.

        The caller has already set <pad>, and before min_length <eos>, to -inf (advance_searches, for all rows at once).
        """
        options, eos = self.options, self.tokens.eos
        vocab_size = log_probs.shape[1]
        ranked = top_candidates((self.scores[:, None] + log_probs).reshape(-1), 2 * options.beam_size).tolist()
        parents, tokens, scores = [], [], []
        for rank, index in enumerate(ranked):
            row, token = divmod(index, vocab_size)
            score = float(self.scores[row] + log_probs[row, token])  # float32 arithmetic, as the reference
            if token == eos:
                if rank < options.beam_size:
                    self._finish(row, score, self.step + 1, alignment, with_eos=True)
            else:
                parents.append(row)
                tokens.append(token)
                scores.append(score)
                if len(parents) == options.beam_size:
                    break
        self.step += 1
        if len(self.finished) >= options.beam_size:
            self.done = True
            return []
        self.prefixes = [self.prefixes[p] + [t] for p, t in zip(parents, tokens)]
        self.scores = np.array(scores, dtype=np.float32)
        if options.return_alignment and alignment is not None:
            self.alignments = [self.alignments[p] + [alignment[p]] for p in parents]
        if self.step >= options.max_length:
            for row in range(len(self.prefixes)):
                self._finish(row, float(self.scores[row]), options.max_length, None, with_eos=False)
            self.done = True
            return []
        return parents

    def advance_greedy(self, token: int, log_prob: np.float32, alignment: np.ndarray | None) -> None:
        """One step of greedy search (beam_size 1): the row's best token and its log-probability."""
        score = self.scores[0] + log_prob  # float32 arithmetic, as the reference
        self.step += 1
        if token == self.tokens.eos:
            self._finish(0, float(score), self.step, alignment, with_eos=True)
            self.done = True
            return
        self.prefixes[0].append(token)
        self.scores[0] = score
        if self.options.return_alignment and alignment is not None:
            self.alignments[0].append(alignment[0])
        if self.step >= self.options.max_length:
            self._finish(0, float(score), self.options.max_length, None, with_eos=False)
            self.done = True

    def _finish(self, row: int, score: float, length: int, alignment: np.ndarray | None, *, with_eos: bool) -> None:
        steps = None
        if self.options.return_alignment:
            steps = np.stack(self.alignments[row] + ([alignment[row]] if with_eos and alignment is not None else []))
        prefix = self.prefixes[row]
        self.finished.append(Hypothesis(prefix, score / length**self.options.length_penalty, steps))

    def results(self) -> list[Hypothesis]:
        """The best num_hypotheses finished hypotheses, best first."""
        ranked = sorted(self.finished, key=lambda h: -h.score)  # stable: earlier-finished first among equals
        return ranked[: self.options.num_hypotheses]
