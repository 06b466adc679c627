"""Scores of a test set: BLEU split for the target's script."""

from __future__ import annotations

import pytest

from nmtserve_export.corpus import generate_corpus
from nmtserve_export.evaluate import bleu_tokenizer, score


@pytest.mark.parametrize(("target_lang", "tokenize"), [
    ("de", "13a"), ("ja", "char"), ("zh_Hant", "zh"), ("th", "char"), ("yue", "zh"), ("bo", "char"), ("dz", "char"),
])
def test_bleu_splits_unspaced_targets_that_13a_would_take_for_single_words(target_lang, tokenize):
    assert bleu_tokenizer(target_lang) == tokenize
    pairs = generate_corpus(300, source_lang="en", target_lang=target_lang, seed=0)[:60]
    # Two thirds miss by their last character: near misses, which a per-word BLEU of unspaced text counts as wholly wrong.
    hypotheses = [p.target if i % 3 == 0 else p.target[:-1] + ("x" if p.target[-1] != "x" else "y") for i, p in enumerate(pairs)]
    chosen, default = score(hypotheses, pairs, tokenize), score(hypotheses, pairs)
    assert chosen["bleu_tokenize"] == tokenize and default["bleu_tokenize"] == "13a"
    if tokenize != "13a":
        assert chosen["bleu"] > default["bleu"] + 10


def test_a_corpus_without_a_target_language_is_scored_with_13a():
    assert bleu_tokenizer("") == "13a"  # a checkpoint of a TSV corpus from before its languages were recorded


def test_several_target_languages_are_also_scored_one_by_one():
    assert bleu_tokenizer("ja,th") == "char" and bleu_tokenizer("de,ja") == "13a"  # overall: the split all of them need, or 13a
    pairs = generate_corpus(200, target_lang="de,ja", seed=0)
    assert {p.language for p in pairs} == {"de", "ja"} and sum(p.language == "ja" for p in pairs) == 100
    hypotheses = [p.target if p.language == "de" else p.target[:-1] + "x" for p in pairs]  # every Japanese one misses
    scores = score(hypotheses, pairs, bleu_tokenizer("de,ja"))
    assert scores["exact_match"] == 0.5
    assert scores["by_language"]["de"]["exact_match"] == 1.0 and scores["by_language"]["de"]["bleu_tokenize"] == "13a"
    assert scores["by_language"]["ja"]["exact_match"] == 0.0 and scores["by_language"]["ja"]["bleu_tokenize"] == "char"
