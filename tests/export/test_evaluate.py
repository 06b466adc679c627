"""Scores of a test set: BLEU split for the target's script."""

from __future__ import annotations

import pytest

from nmtserve_export.corpus import generate_corpus
from nmtserve_export.evaluate import bleu_tokenizer, score


@pytest.mark.parametrize(("target_lang", "tokenize"), [("de", "13a"), ("ja", "char"), ("zh_Hant", "zh"), ("th", "char")])
def test_bleu_splits_unspaced_targets_that_13a_would_take_for_single_words(target_lang, tokenize):
    assert bleu_tokenizer({"kind": "cldr", "target_lang": target_lang}) == tokenize
    pairs = generate_corpus(300, source_lang="en", target_lang=target_lang, seed=0)[:60]
    # Two thirds miss by their last character: near misses, which a per-word BLEU of unspaced text counts as wholly wrong.
    hypotheses = [p.target if i % 3 == 0 else p.target[:-1] + ("x" if p.target[-1] != "x" else "y") for i, p in enumerate(pairs)]
    chosen, default = score(hypotheses, pairs, tokenize), score(hypotheses, pairs)
    assert chosen["bleu_tokenize"] == tokenize and default["bleu_tokenize"] == "13a"
    if tokenize != "13a":
        assert chosen["bleu"] > default["bleu"] + 10


def test_a_corpus_without_a_target_language_is_scored_with_13a():
    assert bleu_tokenizer({"kind": "tsv", "path": "my.tsv", "valid_size": 10, "test_size": 10}) == "13a"
