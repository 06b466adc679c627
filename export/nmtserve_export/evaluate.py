"""Score a checkpoint on its held-out test set: exact match, BLEU and chrF (sacrebleu), speed."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import sacrebleu
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .checkpoint import load_model, update_metadata
from .corpus import CorpusError, Pair, cldr_problem, file_sha256, generate_corpus, normalized_split, read_tsv, split_corpus, target_languages
from .data import encode_sources
from .decode import beam_search, greedy_search
from .devices import torch_device
from .model import Transformer


def held_out_pairs(metadata: dict) -> list[Pair]:
    """Rebuild the exact test split the checkpoint was held out from, by the rules it was split with."""
    corpus = metadata["corpus"]
    normalized = normalized_split(corpus)
    if corpus["kind"] == "tsv":
        # A file changed since training splits differently: its test set could hold sentences the model trained on.
        if not Path(corpus["path"]).is_file():
            raise CorpusError(f"{corpus['path']}, the corpus the model was trained on, is gone: its held-out split can "
                              "only be rebuilt from it; put it back at that path")
        if "sha256" in corpus and (now := file_sha256(corpus["path"])) != corpus["sha256"]:
            raise CorpusError(f"{corpus['path']} has changed since the model was trained on it (sha256 "
                              f"{corpus['sha256'][:12]}…, now {now[:12]}…): its held-out split "
                              "can no longer be rebuilt; restore the file, or train again")
        pairs = read_tsv(corpus["path"], strict=normalized)
    else:
        if problem := cldr_problem(corpus):  # another release's corpus: its test set could hold sentences trained on
            raise CorpusError(f"{problem}; its held-out split can only be rebuilt so")
        pairs = generate_corpus(corpus["size"], source_lang=corpus["source_lang"], target_lang=corpus["target_lang"], seed=corpus["seed"])
    return split_corpus(pairs, valid_size=corpus["valid_size"], test_size=corpus["test_size"], normalized=normalized).test


def translate_pairs(
    model: Transformer, tokenizer: Tokenizer, pairs: list[Pair], *, beam_size: int, batch_size: int = 64
) -> tuple[list[str], int, float]:
    """Translate the sources of pairs; returns texts, generated tokens and seconds."""
    sources = encode_sources(tokenizer, [p.source for p in pairs], [p.language for p in pairs])
    outputs: list[list[int]] = []
    start = time.perf_counter()
    with tqdm(total=len(sources), desc=f"decode beam={beam_size}", unit="sent", leave=False) as progress:
        for i in range(0, len(sources), batch_size):
            chunk = sources[i : i + batch_size]
            if beam_size == 1:
                outputs += greedy_search(model, chunk)
            else:
                outputs += [beam_search(model, s, beam_size=beam_size)[0].tokens for s in chunk]
            progress.update(len(chunk))
    seconds = time.perf_counter() - start
    generated = sum(len(o) + 1 for o in outputs)  # + <eos>
    return tokenizer.decode_batch(outputs), generated, seconds


# Target languages written without spaces between words, and the sacrebleu tokenizer that splits them for BLEU: 13a
# (its default) would take a whole Chinese or Japanese sentence for a word or two, and score near-misses 0. Cantonese is
# written in Han characters as Chinese is; Tibetan and Dzongkha mark syllables (with a tsheg), not words.
UNSPACED_BLEU_TOKENIZERS = {"zh": "zh", "yue": "zh", "ja": "char", "th": "char", "lo": "char", "km": "char", "my": "char",
                            "bo": "char", "dz": "char"}


def bleu_tokenizer(target_lang: str) -> str:
    """The sacrebleu tokenizer for BLEU on targets in these locales (comma-separated): 13a, or one that splits
    unspaced scripts where every locale needs the same one."""
    languages = {tag.replace("-", "_").split("_")[0].lower() for tag in target_languages(target_lang)}
    tokenizers = {UNSPACED_BLEU_TOKENIZERS.get(language, "13a") for language in languages}
    return tokenizers.pop() if len(tokenizers) == 1 else "13a"


def score(hypotheses: list[str], pairs: list[Pair], bleu_tokenize: str = "13a") -> dict:
    """Exact match overall and per category, BLEU (with sacrebleu's tokenizer `bleu_tokenize`) and chrF; for a
    corpus of several target languages, the same per language too."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    for hypothesis, pair in zip(hypotheses, pairs):
        by_category[pair.category].append(hypothesis == pair.target)
    scores = {
        **_text_scores(hypotheses, [p.target for p in pairs], bleu_tokenize),
        "exact_match_by_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
    }
    languages = sorted({p.language for p in pairs} - {""})
    if languages:
        scores["by_language"] = {
            language: _text_scores([h for h, p in zip(hypotheses, pairs) if p.language == language],
                                   [p.target for p in pairs if p.language == language], bleu_tokenizer(language))
            for language in languages
        }
    return scores


def _text_scores(hypotheses: list[str], references: list[str], bleu_tokenize: str) -> dict:
    return {
        "exact_match": sum(h == r for h, r in zip(hypotheses, references)) / len(references),
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references], tokenize=bleu_tokenize).score,
        "bleu_tokenize": bleu_tokenize,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def translate_pairs_onnx(
    bundle_dir: Path, pairs: list[Pair], *, beam_size: int, threads: int, device: str = "auto"
) -> tuple[list[str], int, float]:
    """Translate the sources of pairs with the ONNX Runtime engine and a bundle."""
    from nmtserve_server.engine import Engine, translate
    from nmtserve_server.search import DecodeOptions

    engine = Engine.from_path(bundle_dir, device=device, threads=threads)
    sources = [engine.encode_texts([p.source], p.language or None)[0] for p in pairs]
    start = time.perf_counter()
    # To the model's limit, as the PyTorch searches here and the server's default.
    options = DecodeOptions(beam_size=beam_size, max_length=engine.max_target_length)
    outputs = [h[0].tokens for h in translate(engine, sources, options)]
    seconds = time.perf_counter() - start
    return engine.decode_ids(outputs), sum(len(o) + 1 for o in outputs), seconds


def _check_of_the_run(bundle: Path, checkpoint_dir: Path, metadata: dict) -> None:
    """BundleError unless the bundle was exported from the checkpoint's run (any of its saves): another model's scores
    on this test set, which that model may have trained on, would be taken for this one's."""
    from nmtserve.bundle import BundleError, read_bundle

    from .onnx_export import not_of_the_run

    if problem := not_of_the_run(read_bundle(bundle).manifest, checkpoint_dir, metadata):
        raise BundleError(f"{bundle} was not exported from the run of {checkpoint_dir}: {problem}; export this checkpoint "
                          f"(nmtserve export {checkpoint_dir} --out DIR), or evaluate the one {bundle} was exported from")


def evaluate(
    checkpoint_dir: Path, *, beam_sizes: tuple[int, ...] = (1, 4), limit: int = 0, threads: int = 0, bundle: Path | None = None,
    device: str = "auto",
) -> dict:
    """Decode the test set with each beam size (PyTorch, or the ONNX engine with a bundle exported from this checkpoint's run,
    else BundleError) on `device` (auto|cpu|cuda); the PyTorch scores of the whole test set are stored in the checkpoint
    (and so in the bundle an export makes of it)."""
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, metadata = load_model(checkpoint_dir, "cpu" if bundle else torch_device(device))
    if bundle:
        _check_of_the_run(Path(bundle), Path(checkpoint_dir), metadata)
    pairs = held_out_pairs(metadata)
    if limit:
        pairs = pairs[:limit]
    results: dict = {"test_pairs": len(pairs), "decoder": f"onnxruntime:{bundle}" if bundle else "pytorch"}
    errors = []
    bleu_tokenize = bleu_tokenizer(str(metadata["corpus"].get("target_lang", "")))
    for beam_size in beam_sizes:
        if bundle:
            hypotheses, generated, seconds = translate_pairs_onnx(bundle, pairs, beam_size=beam_size, threads=threads, device=device)
        else:
            hypotheses, generated, seconds = translate_pairs(model, tokenizer, pairs, beam_size=beam_size)
        name = "greedy" if beam_size == 1 else f"beam{beam_size}"
        results[name] = {**score(hypotheses, pairs, bleu_tokenize), "tokens_per_second": generated / seconds, "seconds": seconds}
        if beam_size == 1:
            errors = [(p.source, p.target, h) for p, h in zip(pairs, hypotheses) if h != p.target]
    # The checkpoint's own scores are those of its PyTorch reference decoding of the whole test set: a part of it
    # (--limit) would replace them with a noisier figure. Scores of other beam sizes stay (training clears them all).
    if not bundle and not limit:
        update_metadata(checkpoint_dir, scores={**metadata.get("scores", {}), **results})
    results["greedy_errors"] = errors[:20]
    return results
