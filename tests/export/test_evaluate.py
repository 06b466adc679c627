"""Scores of a test set: BLEU split for the target's script."""

from __future__ import annotations

import hashlib

import pytest

from nmtserve_export.corpus import CorpusError, file_sha256, generate_corpus
from nmtserve_export.evaluate import bleu_tokenizer, held_out_pairs, score


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


def test_a_checkpoint_from_before_the_split_was_recorded_is_held_out_from_as_it_was_trained(tmp_path):
    """A TSV checkpoint trained before sources were grouped as the model reads them, and before read_tsv refused bare
    CRs and CSV quoting: its test set is the one it held out, not another with sentences it trained on."""
    lines = [f"Sentence {i}\tSatz {i}" for i in range(40)] + [f"Sentence\xa0{i} \tSatz {i}" for i in range(40)]
    lines += ["a bare\rCR\tein CR", '"He said ""hi""."\tEr sagte „hi“.']
    path = tmp_path / "old.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = {"kind": "tsv", "path": str(path), "sha256": file_sha256(path), "valid_size": 10, "test_size": 10}
    # Every source as written is distinct, so the old rule made each its own group and held out the first 10 in sha1 order.
    sources = sorted((line.split("\t")[0] for line in lines), key=lambda s: hashlib.sha1(s.encode("utf-8")).digest())
    assert sorted(p.source for p in held_out_pairs({"corpus": corpus})) == sorted(sources[:10])
    with pytest.raises(CorpusError, match=":81: a carriage return inside the line"):  # a new checkpoint's file is read strictly
        held_out_pairs({"corpus": {**corpus, "split": "normalized"}})
    with pytest.raises(CorpusError, match="split by rules 'v3', which this nmtserve does not know"):  # not guessed at
        held_out_pairs({"corpus": {**corpus, "split": "v3"}})
