"""Training: label-smoothed cross-entropy, Adam with the paper's warm-up schedule (section 5.3), token batches."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import babel
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from nmtserve.bundle import PAD_ID, SPECIAL_TOKENS, UNDETERMINED
from nmtserve.normalize import normalize_source
from nmtserve.settings import directory_problem, env_value, flag

from . import checkpoint
from .corpus import (NORMALIZED_SPLIT, CorpusSettings, Pair, Splits, cldr_problem, file_sha256, normalized_split, read_tsv,
                     source_groups, split_corpus, target_languages)
from .data import Batch, encode_sources, encode_targets, epoch_batches, make_batch, token_batches
from .decode import greedy_search, model_device
from .devices import DEVICES, device_problem, torch_device, training_precision
from .model import Transformer, count_parameters, label_smoothed_nll_loss, model_config
from .tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    out: Path = field(default=Path("runs/default"), metadata={"help": "directory for the checkpoint, tokenizer, history and plots"})
    preset: str = field(default="small", metadata={"help": "model size", "choices": ["tiny", "small", "base"]})
    corpus: Path | None = field(default=None, metadata={"help": "TSV file of source<TAB>target lines (default: the generated CLDR corpus)"})
    # The built-in corpus's settings, with CorpusSettings' defaults (`nmtserve corpus` writes the same corpus).
    corpus_size: int = field(default=CorpusSettings.corpus_size, metadata={"help": "pairs to generate for the built-in corpus"})
    source_lang: str | None = field(default=None, metadata={
        "help": f"source locale: of the built-in corpus (unset: {CorpusSettings.source_lang}), or of --corpus's sources (unset: "
                f"{UNDETERMINED}, undetermined); the bundle reports it"})
    target_lang: str | None = field(default=None, metadata={
        "help": f"target locale: of the built-in corpus (any Babel locale, or several, comma-separated, for a multilingual "
                f"model; unset: {CorpusSettings.target_lang}), or of --corpus's targets (one; unset: {UNDETERMINED}); the bundle "
                "reports it, and it picks the BLEU tokenizer"})
    seed: int = field(default=CorpusSettings.seed, metadata={"help": "seed for the corpus, initialisation, batching and dropout"})
    valid_size: int = field(default=CorpusSettings.valid_size, metadata={"help": "held-out pairs for validation"})
    test_size: int = field(default=CorpusSettings.test_size, metadata={"help": "held-out pairs for the final test"})
    vocab_size: int = field(default=1000, metadata={"help": "shared subword vocabulary size"})
    max_tokens: int = field(default=4096, metadata={"help": "padded tokens per batch"})
    max_length: int = field(default=256, metadata={
        "help": "the longest source or target, in tokens with its special ones, the model reads or writes: its positional "
                "table and the bundle's limit; a corpus pair longer than this is refused, named by its line"})
    accumulate: int = field(default=1, metadata={
        "help": "batches whose gradients make one optimizer step (the step's batch is about accumulate x --max-tokens "
                "tokens: the paper's 25,000 on a smaller GPU)"})
    steps: int = field(default=1600, metadata={"help": "optimizer steps to train for"})
    max_minutes: float = field(default=0.0, metadata={
        "help": "also stop once the run has trained this many minutes in all, resumes included (0: no limit)"})
    peak_lr: float = field(default=2.5e-3, metadata={"help": "learning rate at the end of warm-up"})
    warmup_steps: int = field(default=400, metadata={"help": "linear warm-up steps, then decay with 1/sqrt(step)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "epsilon_ls of label smoothing"})
    clip_norm: float = field(default=1.0, metadata={"help": "gradient norm clipping (0: off)"})
    valid_every: int = field(default=200, metadata={"help": "steps between validations (and checkpoint saves)"})
    valid_decode: int = field(default=300, metadata={"help": "validation pairs decoded greedily for exact match at each validation"})
    device: str = field(default="auto", metadata={
        "help": "where to train: auto (a CUDA GPU where PyTorch sees one, else the CPU), cpu or cuda", "choices": list(DEVICES)})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: all cores)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the checkpoint in --out, with the settings it was started with (where --out holds none, start a new run)"})

    def problems(self) -> list[str]:
        """What is wrong with the settings, one sentence per problem (empty when they can train)."""
        found = [f"{flag(name)} must be at least 1" for name in _AT_LEAST_ONE if getattr(self, name) < 1]
        found += [f"{flag(name)} cannot be negative" for name in _NOT_NEGATIVE if not getattr(self, name) >= 0]
        if 1 <= self.vocab_size < SMALLEST_VOCABULARY:
            found.append(f"--vocab-size must be at least {SMALLEST_VOCABULARY} (the 256 bytes and the 4 special tokens), "
                         f"not {self.vocab_size}")
        if not 0 <= self.label_smoothing < 1:
            found.append(f"--label-smoothing must be in [0, 1), not {self.label_smoothing}")
        if not (math.isfinite(self.peak_lr) and self.peak_lr > 0):
            found.append(f"--peak-lr must be a positive number, not {self.peak_lr}")
        if problem := device_problem(self.device):
            found.append(problem)
        if problem := directory_problem("--out", Path(self.out), "the checkpoint"):
            found.append(problem)
        if self.corpus is None:
            found += [problem for problem in self.corpus_settings().problems() if problem not in found]
        elif not Path(self.corpus).is_file():
            found.append(f"--corpus {self.corpus}: no such file")
        elif len(target_languages(self.languages()[1])) > 1:
            found.append(f"--target-lang {self.target_lang}: a --corpus file has one target language (several need the "
                         "built-in corpus)")
        return found

    def languages(self) -> tuple[str, str]:
        """The source and target locales: as given, else the built-in corpus's, or undetermined for a --corpus file."""
        if self.corpus is not None:
            return self.source_lang or UNDETERMINED, self.target_lang or UNDETERMINED
        return self.source_lang or CorpusSettings.source_lang, self.target_lang or CorpusSettings.target_lang

    def corpus_settings(self) -> CorpusSettings:
        """The built-in corpus these settings generate."""
        return CorpusSettings(self.corpus_size, *self.languages(), self.seed, self.valid_size, self.test_size)

    def resume_problems(self) -> list[str]:
        """With --resume, a checkpoint in --out that is not whole, or the settings that differ from those its run was
        started with (empty otherwise, and where --out holds no checkpoint: the run starts anew)."""
        if not self.resume:
            return []
        missing = [name for name in checkpoint.FILES if not (Path(self.out) / name).is_file()]
        # No model there to lose: none, or a first save cut short (train_state.json, renamed last, never came, while
        # the state file it goes with did). The run starts anew, and says so.
        cut_short = checkpoint.STATE_META_FILE in missing and checkpoint.STATE_FILE not in missing
        if checkpoint.CONFIG_FILE in missing or checkpoint.MODEL_FILE in missing or cut_short:
            return []
        if missing:  # a model without the state to resume it: started anew, the run would replace it with its first save
            return [f"--resume: {self.out} holds a model that cannot be resumed: {checkpoint.are_missing(missing)}; without "
                    "--resume, a new run would replace it (to keep it, give another --out)"]
        metadata = checkpoint.read_metadata(Path(self.out))
        # A run started before --max-length was saved has the model length chosen for it then, its max_len.
        started = {"max_length": metadata["model"]["max_len"], **metadata["training"]["settings"]}
        found = [f"--resume: {flag(name)} is {_stored(getattr(self, name))!r}, but the run in {self.out} was started with "
                 f"{started[name]!r}; a resumed run keeps its corpus, model and optimisation (give the same, or a new --out)"
                 for name in FIXED_ON_RESUME if name in started and _stored(getattr(self, name)) != started[name]]
        interrupted = checkpoint.interrupted_save(Path(self.out))
        return found + self._corpus_problems(metadata["corpus"]) + ([f"--resume: {interrupted}; train again"] if interrupted else [])

    def _corpus_problems(self, corpus: dict) -> list[str]:
        """With --resume: whether the corpus is the one the run was started on; a --corpus file by its resolved path
        (the path as typed may name another file) and, byte for byte, its sha256; the languages it recorded."""
        started_on_file = corpus.get("kind") == "tsv"
        if (self.corpus is not None) != started_on_file:
            was = corpus["path"] if started_on_file else "the built-in corpus"
            now = Path(self.corpus).resolve() if self.corpus is not None else "the built-in corpus"
            return [f"--resume: the run in {self.out} was started on {was}, not {now}; a resumed run keeps its corpus "
                    "(give the same, or a new --out)"]
        found = [f"--resume: {flag(name)} is {now!r}, but the run in {self.out} was started with {corpus[name]!r}; a resumed "
                 "run keeps its corpus (give the same, or a new --out)"
                 for name, now in zip(("source_lang", "target_lang"), self.languages()) if corpus.get(name, now) != now]
        if problem := cldr_problem(corpus):
            found.append(f"--resume: {problem}, or start a new --out")
        return found + (self._corpus_file_problems(corpus) if started_on_file else [])

    def _corpus_file_problems(self, corpus: dict) -> list[str]:
        path = Path(self.corpus).resolve()
        if str(path) != corpus["path"]:
            return [f"--resume: --corpus {path} is not {corpus['path']}, the file the run in {self.out} was started on"]
        if not path.is_file():
            return []  # problems() names it
        if "sha256" in corpus and file_sha256(path) != corpus["sha256"]:
            return [f"--resume: {path} has changed since the run in {self.out} was started on it: its splits and batches "
                    "would no longer be the run's (restore the file, or start a new --out)"]
        return []


class TrainSettingsError(ValueError):
    """Settings that cannot train, or cannot resume the run in --out; `problems` has one sentence each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run's last save is, and how to go on from it."""


def default_run() -> Path:
    """The checkpoint `nmtserve train` writes when not told where: NMTSERVE_OUT, else runs/default; the other
    commands read it by default."""
    return Path(env_value("out") or TrainSettings.out)


# What a resumed run must share with its start: a change would train on other data or batches, another model or
# another schedule than the one its weights, optimizer moments and batch position come from. The corpus is checked
# apart (_corpus_problems).
FIXED_ON_RESUME = ("preset", "corpus_size", "seed", "valid_size", "test_size",
                   "vocab_size", "max_length", "max_tokens", "accumulate", "peak_lr", "warmup_steps", "label_smoothing", "clip_norm")
_AT_LEAST_ONE = ("corpus_size", "valid_size", "test_size", "vocab_size", "max_length", "max_tokens", "accumulate", "steps", "warmup_steps", "valid_every")
_NOT_NEGATIVE = ("max_minutes", "clip_norm", "valid_decode", "threads")
SMALLEST_VOCABULARY = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from every byte


def _stored(value: object) -> object:
    """A setting as config.json holds it."""
    return str(value) if isinstance(value, Path) else value


def optimizer_step(
    model: Transformer, optimizer: torch.optim.Optimizer, batches: list[Batch], label_smoothing: float, clip_norm: float
) -> float:
    """One optimizer step on the summed gradients of `batches`, as if they were one batch; returns their summed loss."""
    device = model_device(model)
    tokens = sum(batch.n_tokens for batch in batches)
    summed_loss = 0.0
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        batch = batch.to(device)
        loss = label_smoothed_nll_loss(model(batch.src, batch.tgt_in), batch.tgt_out, label_smoothing, PAD_ID)
        # The loss is a mean over the batch's tokens: weighted by its share of all the step's tokens, the gradients
        # sum to those of the mean over all of them.
        (loss * (batch.n_tokens / tokens)).backward()
        summed_loss += loss.item() * batch.n_tokens
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return summed_loss


def _device_name(device: torch.device) -> str:
    """The device as the checkpoint records it: `cpu`, or `cuda` and the GPU's name."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def learning_rate(step: int, peak_lr: float, warmup_steps: int) -> float:
    """lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), rescaled so the peak is peak_lr."""
    step = max(step, 1)
    return peak_lr * min(step / warmup_steps, math.sqrt(warmup_steps / step))


def load_splits(settings: TrainSettings, *, normalized: bool = True, new_run: bool = True) -> Splits:
    """The corpus the settings name, split into train / valid / test by the current rules (normalized=False: by those of a
    run started before them, see NORMALIZED_SPLIT); a new run's held-out splits must not be empty (a resumed run's were
    made at its start)."""
    if settings.corpus is not None:
        pairs: list[Pair] = read_tsv(settings.corpus, strict=normalized)
        if len(pairs) <= settings.valid_size + settings.test_size:  # known only once the file is read
            raise TrainSettingsError([
                f"--corpus {settings.corpus} has {len(pairs)} pairs, which leaves none for training after --valid-size "
                f"{settings.valid_size} and --test-size {settings.test_size}: give more pairs or hold out fewer"])
        splits = split_corpus(pairs, valid_size=settings.valid_size, test_size=settings.test_size, normalized=normalized)
        if new_run and (problems := _empty_split_problems(settings, splits, normalized=normalized)):
            raise TrainSettingsError(problems)
        return splits
    return settings.corpus_settings().splits()  # generated sources are written normalized: both rules split them alike


def _empty_split_problems(settings: TrainSettings, splits: Splits, *, normalized: bool) -> list[str]:
    """A sentence for each held-out split of a --corpus file that its repeated sources leave empty: validation would
    average over no pairs, and evaluation score none."""
    found = []
    for name, held_out, size, candidates in (("test_size", splits.test, settings.test_size, splits.valid + splits.train),
                                             ("valid_size", splits.valid, settings.valid_size, splits.train)):
        if not held_out:  # the splits fill test first: a group that fit in neither is left for training
            smallest = min(len(group) for group in source_groups(candidates, normalized=normalized).values())
            found.append(f"--corpus {settings.corpus}: nothing is held out for {flag(name)} {size}: all copies of a source "
                         f"go to one split, and its sources repeat in groups of more than {size} pairs (the smallest left has "
                         f"{smallest}); give {flag(name)} {smallest} or more, or a corpus with fewer repeats")
    return found


_NAMED_PAIRS = 5  # pairs past --max-length named in full, in file order; a count of the rest


def length_problems(settings: TrainSettings, pairs: list[Pair], sources: list[list[int]], targets: list[list[int]]) -> list[str]:
    """A sentence naming the pairs whose source or target ids are longer than --max-length, by file and line for a
    --corpus file; empty where all fit."""
    over = [(pair, "source" if len(s) >= len(t) else "target", max(len(s), len(t)))
            for pair, s, t in zip(pairs, sources, targets) if max(len(s), len(t)) > settings.max_length]
    if not over:
        return []
    over.sort(key=lambda o: o[0].line)
    named = ", ".join(f"{f'{settings.corpus}:{pair.line}' if pair.line else repr(pair.source)} ({side}, {n} tokens)"
                      for pair, side, n in over[:_NAMED_PAIRS])
    more = f" and {len(over) - _NAMED_PAIRS} more" if len(over) > _NAMED_PAIRS else ""
    return [f"{len(over)} pair(s) longer than --max-length {settings.max_length} tokens, which the model cannot read or "
            f"write: {named}{more}; split or remove them, or raise --max-length"]


def corpus_metadata(settings: TrainSettings, *, normalized: bool = True) -> dict:
    """How to rebuild the corpus exactly (for evaluation and the bundle manifest): with normalized=False, as a run started
    before NORMALIZED_SPLIT recorded it, without the rules."""
    source_lang, target_lang = settings.languages()
    rules = {"split": NORMALIZED_SPLIT} if normalized else {}
    if settings.corpus is not None:
        path = Path(settings.corpus).resolve()  # evaluate and plot may run from another directory
        return {"kind": "tsv", "path": str(path), "sha256": file_sha256(path), "source_lang": source_lang,
                "target_lang": target_lang, "valid_size": settings.valid_size, "test_size": settings.test_size, **rules}
    return {
        "kind": "cldr",
        "babel": babel.__version__,  # whose CLDR data the corpus is made from: another release can make other pairs
        "size": settings.corpus_size,
        "source_lang": source_lang,
        "target_lang": target_lang,
        "seed": settings.seed,
        "valid_size": settings.valid_size,
        "test_size": settings.test_size,
        **rules,
    }


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """Fraction of hypotheses identical to their reference."""
    return sum(h == r for h, r in zip(hypotheses, references)) / max(1, len(references))


@torch.inference_mode()
def validate(
    model: Transformer,
    tokenizer: Tokenizer,
    valid: list[Pair],
    valid_src: list[list[int]],
    valid_tgt: list[list[int]],
    n_decode: int,
    max_tokens: int,
) -> dict:
    """Validation loss (without label smoothing) and greedy exact match on the first n_decode pairs."""
    model.eval()
    total, count = 0.0, 0
    for indices in token_batches(valid_src, valid_tgt, max_tokens, rng=None):
        batch = make_batch([valid_src[i] for i in indices], [valid_tgt[i] for i in indices]).to(model_device(model))
        log_probs = model(batch.src, batch.tgt_in)
        total += label_smoothed_nll_loss(log_probs, batch.tgt_out, 0.0, PAD_ID).item() * batch.n_tokens
        count += batch.n_tokens
    result = {"valid_loss": total / count}
    if n_decode:
        subset = valid[:n_decode]
        outputs = greedy_search(model, valid_src[: len(subset)])
        result["valid_exact_match"] = exact_match(tokenizer.decode_batch(outputs), [p.target for p in subset])
    model.train()
    return result


def train(settings: TrainSettings) -> Path:
    """Train a model as the settings say; returns the checkpoint directory."""
    problems = settings.problems() + settings.resume_problems()
    if problems:
        raise TrainSettingsError(problems)
    device = torch_device(settings.device)
    threads = torch.get_num_threads()
    before = _save_in(Path(settings.out))
    try:
        with training_precision(device):
            return _train(settings, device)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupted(settings, before)) from None
    finally:
        torch.set_num_threads(threads)  # --threads is the training's, not the calling process's


def _save_in(directory: Path) -> str | None:
    """The id of the save of the checkpoint in `directory` (None: none there, or one from before saves had ids)."""
    return checkpoint.read_metadata(directory).get("save") if (directory / checkpoint.CONFIG_FILE).is_file() else None


def _interrupted(settings: TrainSettings, before: str | None) -> str:
    """Where a run stopped by Ctrl-C leaves --out, and what to do next; `before`: the save that was there at its start."""
    out = Path(settings.out)
    if not (out / checkpoint.CONFIG_FILE).is_file():
        return f"interrupted before the first save; nothing is saved in {out}"
    if not settings.resume and _save_in(out) == before:  # a resume would continue the run that was there, not this one
        return f"interrupted before this run's first save; {out} holds the checkpoint it held before"
    if problem := checkpoint.interrupted_save(out):  # stopped between a save's renames
        return f"interrupted while saving: {problem}; train again"
    step = json.loads((out / checkpoint.STATE_META_FILE).read_text())["step"]
    return f"interrupted; the last save is step {step} in {out}; continue with --resume"


def _train(settings: TrainSettings, device: torch.device) -> Path:
    out = Path(settings.out)
    torch.manual_seed(settings.seed)  # seeds a GPU's generator too
    if settings.threads:
        torch.set_num_threads(settings.threads)

    # resume_problems: a whole checkpoint, or no model to lose.
    resuming = settings.resume and all((out / name).is_file() for name in checkpoint.FILES)
    if settings.resume and not resuming:  # e.g. a mistyped --out: say so rather than train anew without a word
        log.warning("nothing to resume in %s; starting a new run", out)
    # A resumed run keeps the rules its splits were made by: other ones could move pairs it trained on into valid or test.
    normalized = not resuming or normalized_split(checkpoint.read_metadata(out)["corpus"])
    splits = load_splits(settings, normalized=normalized, new_run=not resuming)
    if resuming:
        tokenizer = load_tokenizer(out / checkpoint.TOKENIZER_FILE)
    else:
        targets = target_languages(settings.languages()[1])
        texts = (text for p in splits.train for text in (normalize_source(p.source), p.target))  # sources as encoded
        tokenizer = train_tokenizer(texts, settings.vocab_size, languages=targets if len(targets) > 1 else ())
    pairs = splits.train + splits.valid + splits.test
    sources = encode_sources(tokenizer, [p.source for p in pairs], [p.language for p in pairs])
    targets = encode_targets(tokenizer, [p.target for p in pairs])
    # A pair past the limit would train positions the model's table lacks, or, as one batch of tens of thousands of
    # tokens, exhaust memory in attention; a held-out one too: evaluation and the server could not read it.
    if problems := length_problems(settings, pairs, sources, targets):
        raise TrainSettingsError(problems)
    out.mkdir(parents=True, exist_ok=True)  # once the corpus is known to split and fit: a refused run leaves no folder
    n_train, n_valid = len(splits.train), len(splits.valid)
    train_src, train_tgt = sources[:n_train], targets[:n_train]
    valid_src, valid_tgt = sources[n_train : n_train + n_valid], targets[n_train : n_train + n_valid]

    config = model_config(settings.preset, vocab_size=tokenizer.get_vocab_size(), max_len=settings.max_length)
    model = Transformer(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)
    step, history, elapsed_before = 0, [], 0.0
    if resuming:
        model.load_state_dict(checkpoint.load_model(out)[0].state_dict())
        step, history = checkpoint.load_train_state(out, optimizer)
        elapsed_before = history[-1]["seconds"] if history else 0.0
        log.info("resuming from step %d", step)

    metadata = {
        "corpus": corpus_metadata(settings, normalized=normalized),
        "training": {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
                     "device": _device_name(device)},
        "parameters": count_parameters(model),
    }
    log.info("model: %s, %d parameters; %d training pairs; training on %s", settings.preset, count_parameters(model),
             len(splits.train), _device_name(device))

    batches = epoch_batches(train_src, train_tgt, settings.max_tokens, settings.seed)
    for _ in range(step * settings.accumulate):  # replay the batch order up to the resumed step
        next(batches)
    model.train()
    start = time.perf_counter() - elapsed_before
    window = {"loss": 0.0, "tokens": 0, "start": time.perf_counter()}

    def validate_and_save() -> None:
        nonlocal start
        now = time.perf_counter()
        record = {
            "step": step,
            "seconds": round(now - start, 2),
            "lr": learning_rate(step, settings.peak_lr, settings.warmup_steps),
            "train_loss": window["loss"] / max(1, window["tokens"]),
            "tokens_per_second": window["tokens"] / (now - window["start"]),
            **validate(model, tokenizer, splits.valid, valid_src, valid_tgt, settings.valid_decode, settings.max_tokens),
        }
        history.append(record)
        progress.set_postfix(loss=f"{record['train_loss']:.3f}", valid=f"{record['valid_loss']:.3f}",
                             em=f"{record.get('valid_exact_match', 0):.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
        log.info("step %d: %s", step, json.dumps(record))
        training = {**metadata["training"], "steps": step, "seconds": record["seconds"]}
        checkpoint.save_checkpoint(out, model, tokenizer, {**metadata, "training": training}, optimizer, step, history)
        window.update(loss=0.0, tokens=0, start=time.perf_counter())
        start += window["start"] - now  # validation and saving are not training time

    progress = tqdm(total=settings.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    try:
        while step < settings.steps:
            if settings.max_minutes and time.perf_counter() - start > 60 * settings.max_minutes:
                log.info("stopping at step %d: --max-minutes %.1f reached", step, settings.max_minutes)
                break
            batches_of_step = [next(batches) for _ in range(settings.accumulate)]
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings.peak_lr, settings.warmup_steps)
            window["loss"] += optimizer_step(model, optimizer, batches_of_step, settings.label_smoothing, settings.clip_norm)
            window["tokens"] += sum(batch.n_tokens for batch in batches_of_step)
            progress.update(1)
            if step % settings.valid_every == 0:
                validate_and_save()
        if not history or history[-1]["step"] != step:
            validate_and_save()
    finally:
        progress.close()  # ends its line, also before a Ctrl-C's message
    return out
