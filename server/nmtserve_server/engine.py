"""The decoding engine: a verified bundle in ONNX Runtime, a preallocated KV cache, and step-level decoding.

`Engine` runs the two graphs and owns the cache rows ("slots"). `Decoder`
drives searches over it one step at a time: sequences can be added between
steps and leave as soon as they finish (continuous batching); the decode
process's loop (`decode_loop.py`) calls it step by step, `translate()` runs it
to completion, on one engine or on several side by side (`engines_for`).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import io
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import onnxruntime as ort

from nmtserve.bundle import Bundle, SpecialTokens, read_bundle
from nmtserve.normalize import is_blank, normalize_source

from .config import DEVICES, logfmt
from .search import BeamSearch, DecodeOptions, Hypothesis, describe, echo
from .tokenization import language_prefixes, load_tokenizer

log = logging.getLogger(__name__)

MAX_CHARACTERS_PER_TOKEN = 16  # a text longer than this per token the model reads is refused before it is tokenized


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for --device auto|cpu|cuda."""
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda_usable = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()
    if device == "cuda" and not cuda_usable:
        raise DeviceError(
            "--device cuda: no usable GPU (ONNX Runtime providers: "
            f"{', '.join(ort.get_available_providers())}; NVIDIA device present: {_cuda_device_present()}); "
            "use --device cpu or auto"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_usable else ["CPUExecutionProvider"]


@functools.cache
def preload_cuda_libraries() -> list[str]:
    """Load the CUDA and cuDNN libraries the CUDA provider needs, once per process; what failed to load, logged too.

    The provider finds them by name only: ONNX Runtime's preload looks where pip's NVIDIA packages put them (the
    `cuda` extra), then on the loader's path (a CUDA image), so neither needs LD_LIBRARY_PATH.
    """
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # ONNX Runtime prints what it could not load
        ort.preload_dlls()
    failures = [line.strip() for line in said.getvalue().splitlines() if line.startswith("Failed to load")]
    for failure in failures:
        log.warning("event=cuda_library_missing detail=%s", logfmt(failure))
    return failures


def _cuda_device_present() -> bool:
    # onnxruntime-gpu lists the CUDA provider even where no GPU or driver exists.
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


@dataclass
class EncodedBatch:
    """The encoder's output for a batch of sources: each decoder layer's encoder-decoder keys and values, and once
    the decoder's first step has run (Engine.first_step), that step's self-attention keys and values."""

    memory: list[np.ndarray]  # memory_key_0, memory_value_0, ... each (B, h, S, d_k)
    source_mask: np.ndarray  # (B, S)
    source_lengths: np.ndarray  # (B,)
    first_step: list[np.ndarray] = field(default_factory=list)  # new_key_0, new_value_0, ... each (B, h, 1, d_k)

    def select(self, rows: Sequence[int]) -> EncodedBatch:
        """The batch's rows `rows`, in that order."""
        index = np.asarray(rows, dtype=np.int64)
        return EncodedBatch([m[index] for m in self.memory], self.source_mask[index], self.source_lengths[index],
                            [k[index] for k in self.first_step])


def session_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime options for one of the engine's sessions, with `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one request stream; parallelism is inside ops
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads would take the core the server's own threads need between runs (measured slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Model:
    """A verified bundle's text side: its tokenizer, special ids and length limits (no ONNX Runtime session)."""

    def __init__(self, bundle: Bundle):
        # The graphs' bytes (hundreds of MB for a large model) are not kept: the server never runs them, and an Engine
        # hands them to ONNX Runtime, which keeps its own copy.
        self.bundle = bundle.without_graphs()
        self.tokenizer = load_tokenizer(bundle)
        self.max_source_length = bundle.max_source_length
        self.max_target_length = bundle.max_target_length
        self.tokens = bundle.tokens  # the model's special ids, read once: the decode loop needs them every step
        self.target_languages: list[str] = bundle.manifest["languages"]["target"]
        self.language_prefixes = language_prefixes(bundle.manifest["languages"], self.tokenizer)
        # The tokens a text may begin with to ask for a language (<2fr>, >>fra<<), as a user types them.
        self._typed_languages = {token: language for language, token in (bundle.manifest["languages"].get("target_tokens") or {}).items()}

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kwargs: Any) -> Self:
        """Verify the bundle at path and load it."""
        return cls(read_bundle(path), **kwargs)

    def encode_texts(self, texts: Sequence[str], target_language: str | None = None) -> list[list[int]]:
        """Source ids (subwords + <eos>) of each text, after the token that asks for target_language where the model
        has several; None: the language whose token a text begins with, else the model's first language. A language
        token the text begins with is read as that token, never as its characters, and gives way to target_language."""
        if target_language is not None and (problem := self.language_problem(target_language)) is not None:
            raise ValueError(problem)
        typed = [self._typed_language(text) for text in texts]
        encoded = self.tokenizer.encode_batch([rest for _, rest in typed])
        first = self.target_languages[0]
        return [self.language_prefixes[target_language or language or first] + ids for (language, _), ids in zip(typed, encoded)]

    def _typed_language(self, text: str) -> tuple[str | None, str]:
        """The language whose token the text begins with (None if none) and the rest of the text."""
        if self._typed_languages:
            start = text.lstrip()
            for token, language in self._typed_languages.items():
                if start.startswith(token):
                    return language, start[len(token) :]
        return None, text

    def decode_ids(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of generated id lists."""
        return self.tokenizer.decode_batch([list(i) for i in ids])

    def read_sources(self, texts: Sequence[str], target_language: str | None = None) -> tuple[list[list[int]], dict[int, str]]:
        """Source ids of each text as encode_texts gives them (none for a refused one), and why each text the model
        cannot translate is refused, by its index, in the words of the server's INVALID_ARGUMENT and `translate --bundle`."""
        wrong = {index: problem for index, text in enumerate(texts) if (problem := self._text_problem(text)) is not None}
        readable = [index for index in range(len(texts)) if index not in wrong]  # a long text is slow to tokenize
        sources: list[list[int]] = [[] for _ in texts]
        for index, ids in zip(readable, self.encode_texts([texts[index] for index in readable], target_language)):
            sources[index] = ids
            if len(ids) > self.max_source_length:
                wrong[index] = f"{len(ids)} tokens, the model reads at most {self.max_source_length}"
        return sources, dict(sorted(wrong.items()))

    def _text_problem(self, text: str) -> str | None:
        """Why a text cannot be read, found before it is tokenized; None if it can."""
        if is_blank(self._typed_language(text)[1]):  # nothing to translate after a language token either
            return "empty text"
        most = MAX_CHARACTERS_PER_TOKEN * self.max_source_length
        length = len(text) if len(text) <= most else len(normalize_source(text))  # padding is no reason to refuse a text
        if length > most:
            return f"{length} characters, above the {most} a text may have (the model reads at most {self.max_source_length} tokens)"
        return None

    def language_problem(self, language: str) -> str | None:
        """Why the model cannot translate into `language`; None if it can."""
        if language not in self.language_prefixes:
            return f"{echo(language)} is not one of this model's target languages ({', '.join(self.target_languages)})"
        return None


class Engine(Model):
    """ONNX Runtime sessions for a bundle, and a KV cache of `capacity` rows.

    `threads` is the encoder's intra-op thread count (0: one per core). `decoder_threads` is the decoder step's;
    0 lets the engine time a full-batch step on the CPU with one thread and with `threads`, and keep the faster:
    a small model's step is hundreds of tiny operators, for which a thread pool costs more than it gives.
    """

    def __init__(self, bundle: Bundle, *, device: str = "auto", capacity: int = 64, threads: int = 0, decoder_threads: int = 0):
        super().__init__(bundle)
        self.providers = providers_for(device)
        if self.providers[0] == "CUDAExecutionProvider":  # here, not in providers_for: only a process that runs models
            preload_cuda_libraries()
        threads = threads or os.cpu_count() or 1
        self.encoder = ort.InferenceSession(bundle.files["encoder"], session_options(threads), providers=self.providers)
        if self.encoder.get_providers()[0] != self.providers[0]:  # ONNX Runtime fell back: CUDA or cuDNN did not load
            if device == "cuda":
                raise DeviceError("--device cuda: ONNX Runtime could not start its CUDA provider (its log above says "
                                  "why, e.g. a missing CUDA or cuDNN library); use --device cpu or auto")
            log.warning("event=cuda_unavailable providers=%s running_on=cpu", ",".join(self.encoder.get_providers()))
            self.providers = ["CPUExecutionProvider"]
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

        dims = bundle.dims
        self.capacity = capacity
        self.past_names = [f"past_{kv}_{i}" for i in range(dims.n_decoder_layers) for kv in ("key", "value")]
        self.memory_names = [f"memory_{kv}_{i}" for i in range(dims.n_decoder_layers) for kv in ("key", "value")]
        # A key and a value buffer per layer, in graph order: the self-attention cache (capacity, h, T, d_k) and the
        # encoder-decoder keys/values (capacity, h, S, d_k). The graphs read rows [0, n) of them in place (no copy
        # per step), so T and S are sized to the longest row in use, doubling as rows grow (see _axis_size).
        shape = (capacity, dims.n_heads, MIN_AXIS, dims.d_k)
        self.max_source_axis, self.max_target_axis = _axis_limit(self.max_source_length), _axis_limit(self.max_target_length)
        self.cache = [np.zeros(shape, np.float32) for _ in self.past_names]
        self.memory = [np.zeros(shape, np.float32) for _ in self.memory_names]
        self.lengths = np.zeros(capacity, np.int64)  # cached steps per row
        self.source_lengths = np.zeros(capacity, np.int64)
        self.free_slots = list(range(capacity))  # a heap: the lowest free row is taken first, keeping rows in use packed
        if decoder_threads or self.device == "cuda" or threads == 1:
            self.decoder_threads = decoder_threads or threads
            self.decoder = self._decoder_session(bundle, self.decoder_threads)
        else:
            self.decoder_threads, self.decoder = self._fastest_decoder(bundle, threads)
        log.info("event=decoder_threads threads=%d", self.decoder_threads)
        # First steps (`first_step`) run beside the batch's in a session of their own: one session's concurrent runs
        # share its memory arena and, on a GPU, its stream, so a first step would wait for the step in progress.
        self.first_step_decoder = self._decoder_session(bundle, 1 if self.device == "cpu" else self.decoder_threads)
        # The decoder step reads and writes these host buffers in place, bound to the session as OrtValues over their
        # memory (I/O binding): a step writes its tokens and masks into them and runs, with no feed dictionary to
        # build, no conversion of a dozen arrays and no output allocation. Rows [0, n) are bound, rebound when n or an
        # axis changes. With the CUDA provider, binding a host input copies it to the device then and there, so there
        # every step binds afresh; outputs are copied back into the host buffers after the run.
        self.step_tokens = np.zeros(capacity, np.int64)
        self.past_mask = np.zeros((capacity, MIN_AXIS), bool)
        self.source_mask = np.zeros((capacity, MIN_AXIS), bool)
        self.log_probs = np.zeros((capacity, dims.vocab_size), np.float32)
        self.alignment = np.zeros((capacity, MIN_AXIS), np.float32)
        self.new_names = [f"new_{kv}_{i}" for i in range(dims.n_decoder_layers) for kv in ("key", "value")]
        self.new_steps = [np.zeros((capacity, dims.n_heads, 1, dims.d_k), np.float32) for _ in self.new_names]
        self.binding = self.decoder.io_binding()
        self._bound_rows = 0  # rows the binding is for; 0 after a buffer is replaced
        # rows -> (input?, name, OrtValue over rows [0, rows) of a buffer): binding an OrtValue made once costs a
        # seventh of binding by address, and continuous batching rebinds at most steps. Emptied when a buffer is replaced.
        self._views: dict[int, list[tuple[bool, str, ort.OrtValue]]] = {}

    def _decoder_session(self, bundle: Bundle, threads: int) -> ort.InferenceSession:
        return ort.InferenceSession(bundle.files["decoder_step"], session_options(threads), providers=self.providers)

    def _fastest_decoder(self, bundle: Bundle, threads: int, repeats: int = 5, steps: int = 10) -> tuple[int, ort.InferenceSession]:
        """1 or `threads` decoder threads, whichever runs a full-cache step fastest, with its session.

        More threads must be at least MULTI_THREAD_GAIN faster to be chosen: they take cores from the server's own work.
        """
        dims, rows = self.bundle.dims, self.capacity
        past = np.zeros((rows, dims.n_heads, 2 * MIN_AXIS, dims.d_k), np.float32)
        memory = np.zeros((rows, dims.n_heads, MIN_AXIS, dims.d_k), np.float32)
        feeds = {
            "tokens": np.full(rows, self.tokens.bos, np.int64),
            "positions": np.full(rows, MIN_AXIS, np.int64),
            "past_mask": np.arange(past.shape[2])[None, :] < np.full((rows, 1), MIN_AXIS),
            "source_mask": np.ones((rows, MIN_AXIS), bool),
            **{name: past for name in self.past_names},
            **{name: memory for name in self.memory_names},
        }
        sessions = {n: self._decoder_session(bundle, n) for n in (1, threads)}
        best = dict.fromkeys(sessions, float("inf"))
        for session in sessions.values():
            session.run(None, feeds)  # the first run allocates; it is not timed
        for _ in range(repeats):  # in turns, so a busy moment falls on every candidate alike
            for n, session in sessions.items():
                start = time.perf_counter()
                for _ in range(steps):
                    session.run(None, feeds)
                best[n] = min(best[n], time.perf_counter() - start)
        fastest = threads if best[threads] * MULTI_THREAD_GAIN < best[1] else 1
        return fastest, sessions[fastest]

    def check_sources(self, sources: Sequence[Sequence[int]]) -> None:
        """ValueError where a source cannot be encoded: empty, or longer than the model reads."""
        for source in sources:
            if len(source) < 1:
                raise ValueError("an empty source: a source has at least its <eos>")
            if len(source) > self.max_source_length:
                raise ValueError(f"a source of {len(source)} tokens is longer than the model's limit of {self.max_source_length}")

    def encode(self, sources: Sequence[Sequence[int]]) -> EncodedBatch:
        """Run the encoder once for a batch of source id lists."""
        self.check_sources(sources)
        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        source_ids = np.zeros((len(sources), int(lengths.max())), dtype=np.int64)
        for row, source in enumerate(sources):
            source_ids[row, : len(source)] = source
        source_mask = np.arange(source_ids.shape[1])[None, :] < lengths[:, None]
        memory = self.encoder.run(self.memory_names, {"source_ids": source_ids, "source_mask": source_mask})
        return EncodedBatch(memory, source_mask, lengths)

    def first_step(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """The decoder's first step (<bos>, nothing cached) for an encoded batch, outside the cache: log-probabilities
        (B, V) and alignment (B, S); its keys and values go into the batch, for `allocate`.

        It takes no rows and touches none of the engine's buffers, and runs in a session of its own, so it may run in
        another thread beside `step`: a text's first token then need not wait for the batch's step.
        """
        rows, dims = len(batch.source_lengths), self.bundle.dims
        nothing_cached = np.zeros((rows, dims.n_heads, MIN_AXIS, dims.d_k), np.float32)
        # The source axis padded as the cache's would be: a row's results then do not depend on its batch's padding
        # (the kernels sum a length that is not a multiple of 16 in another order), as in the batch's own steps.
        size = _axis_size(batch.source_mask.shape[1], MIN_AXIS, self.max_source_axis)
        source_mask = np.zeros((rows, size), bool)
        source_mask[:, : batch.source_mask.shape[1]] = batch.source_mask
        feeds = {
            "tokens": np.full(rows, self.tokens.bos, np.int64), "positions": np.zeros(rows, np.int64),
            "past_mask": np.zeros((rows, MIN_AXIS), bool), "source_mask": source_mask,
            **dict.fromkeys(self.past_names, nothing_cached),
            **{name: _resized(memory, size) for name, memory in zip(self.memory_names, batch.memory)},
        }
        outputs = ["log_probs", "alignment", *self.new_names]
        log_probs, alignment, *batch.first_step = self.first_step_decoder.run(outputs, feeds)
        return log_probs, alignment[:, : batch.source_mask.shape[1]]

    def allocate(self, batch: EncodedBatch, rows: Sequence[int]) -> list[list[int]]:
        """Take rows[i] free slots for sentence i of an encoded batch whose first step has run (a beam of k takes k
        rows, each starting from that step); each sentence's slots."""
        if sum(rows) > len(self.free_slots):
            raise RuntimeError(f"{sum(rows)} KV-cache rows requested, {len(self.free_slots)} free")
        sentence = np.repeat(np.arange(len(rows)), rows)  # the batch row each slot copies
        length = batch.source_mask.shape[1]
        self._fit_source(max(length, int(self.source_lengths.max())))
        slots = [[heapq.heappop(self.free_slots) for _ in range(n)] for n in rows]
        taken = [slot for own in slots for slot in own]
        try:
            for buffer, encoded in zip(self.memory, batch.memory):
                buffer[taken, :, :length] = encoded[sentence]
            for buffer, first in zip(self.cache, batch.first_step, strict=True):
                buffer[taken, :, :1] = first[sentence]
        except Exception:  # a batch that does not fit the buffers: its rows are not lost
            self.release(taken)
            raise
        self.source_lengths[taken] = batch.source_lengths[sentence]
        self.lengths[taken] = 1
        return slots

    def release(self, slots: Sequence[int]) -> None:
        """Return slots to the free list; ValueError for one that is free already (two sentences would share it)."""
        free = set(self.free_slots)
        if len(set(slots)) < len(slots) or free.intersection(slots):
            raise ValueError(f"rows {sorted(slots)} are not all held: rows {sorted(free.intersection(slots))} are free already")
        for slot in slots:
            heapq.heappush(self.free_slots, slot)
        self.lengths[slots] = 0
        self.source_lengths[slots] = 0
        self._fit_source(int(self.source_lengths.max()))

    def move(self, sources: Sequence[int], targets: Sequence[int]) -> None:
        """Move the rows in use at `sources` to the free slots `targets`, which take their place in the free list."""
        if not sources:
            return
        old, new = list(sources), list(targets)
        length = int(self.lengths[old].max())
        for buffer in self.cache:
            buffer[new, :, :length] = buffer[old, :, :length]
        for buffer in self.memory:
            buffer[new] = buffer[old]
        self.lengths[new], self.source_lengths[new] = self.lengths[old], self.source_lengths[old]
        self.lengths[old], self.source_lengths[old] = 0, 0
        self.free_slots = sorted(set(self.free_slots).difference(new).union(old))  # a sorted list is a valid heap

    def reorder(self, slots: Sequence[int], parents: Sequence[int]) -> None:
        """Beam reordering: slot i takes over the cache of slot parents[i]."""
        if list(parents) == list(range(len(parents))):
            return
        new, old = list(slots[: len(parents)]), [slots[p] for p in parents]
        length = int(self.lengths[old].max())
        for buffer in self.cache:
            buffer[new, :, :length] = buffer[old, :, :length]
        self.lengths[new] = self.lengths[old]

    def _fit_source(self, longest: int) -> None:
        """Size the memory buffers' source axis for the longest source in use (kept as is when none is)."""
        if longest == 0:
            return
        size = _axis_size(longest, self.memory[0].shape[2], self.max_source_axis)
        if size != self.memory[0].shape[2]:
            self.memory = [_resized(buffer, size) for buffer in self.memory]
            self.source_mask = np.zeros((self.capacity, size), bool)
            self.alignment = np.zeros((self.capacity, size), np.float32)
            self._buffers_replaced()

    def step(self, slots: Sequence[int], tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """One decoder step for the given rows: log-probabilities (B, V) and alignment (B, S) over the padded source.

        Both are views of the engine's output buffers when the rows are 0..B-1 in order, so valid until the next step.
        """
        index = np.asarray(slots, dtype=np.int64)
        rows = int(index.max()) + 1  # the graph runs rows [0, rows); rows in there that are not stepping are ignored
        lengths = self.lengths[index]
        size = _axis_size(int(self.lengths.max()) + 1, self.cache[0].shape[2], self.max_target_axis)
        if size != self.cache[0].shape[2]:
            self.cache = [_resized(buffer, size) for buffer in self.cache]
            self.past_mask = np.zeros((self.capacity, size), bool)
            self._buffers_replaced()
        packed = rows == len(index) and bool((index == np.arange(rows)).all())  # the common case: rows 0..n-1 in order
        if packed:
            self.step_tokens[:rows] = tokens
        else:
            self.step_tokens[index] = tokens
        np.less(np.arange(size), self.lengths[:rows, None], out=self.past_mask[:rows])
        np.less(np.arange(self.memory[0].shape[2]), self.source_lengths[:rows, None], out=self.source_mask[:rows])
        if rows != self._bound_rows or self.device != "cpu":  # see __init__: a GPU reads a copy made at binding
            self._bind(rows)
        self.decoder.run_with_iobinding(self.binding)
        length = int(lengths[0])
        if packed and (lengths == length).all():  # rows that started together: one slice per buffer
            for buffer, step in zip(self.cache, self.new_steps):
                buffer[:rows, :, length] = step[:rows, :, 0]
        else:
            for buffer, step in zip(self.cache, self.new_steps):
                buffer[index, :, lengths] = step[index, :, 0]  # append each row's new key/value at its own length
        self.lengths[index] = lengths + 1
        if packed:
            return self.log_probs[:rows], self.alignment[:rows]
        return self.log_probs[index], self.alignment[index]

    def _bind(self, rows: int) -> None:
        """Bind rows [0, rows) of the step's input and output buffers to the decoder session."""
        views = self._views.get(rows)
        if views is None:
            inputs = {
                "tokens": self.step_tokens, "positions": self.lengths, "past_mask": self.past_mask,
                "source_mask": self.source_mask, **dict(zip(self.past_names, self.cache)),
                **dict(zip(self.memory_names, self.memory)),
            }
            outputs = {"log_probs": self.log_probs, "alignment": self.alignment, **dict(zip(self.new_names, self.new_steps))}
            # The leading rows of a C-contiguous buffer are one contiguous block: the OrtValue reads and writes it in place.
            views = self._views[rows] = [
                (is_input, name, ort.OrtValue.ortvalue_from_numpy(buffer[:rows]))
                for is_input, buffers in ((True, inputs), (False, outputs)) for name, buffer in buffers.items()
            ]
        for is_input, name, value in views:
            if is_input:
                self.binding.bind_ortvalue_input(name, value)
            else:
                self.binding.bind_ortvalue_output(name, value)
        self._bound_rows = rows

    def _buffers_replaced(self) -> None:
        """A step buffer was reallocated: bind afresh at the next step."""
        self._bound_rows = 0
        self._views.clear()


MIN_AXIS = 16  # smallest cache time / source axis
MULTI_THREAD_GAIN = 1.1  # how much faster a multi-threaded decoder step must be to be preferred to one thread


def _axis_limit(limit: int) -> int:
    """The largest cache axis for a model limit: the first 16 * 2**k that holds it."""
    # Never `limit` itself: a row's results are independent of its batch's padding only at multiples of 16 (see
    # first_step), and halving a limit such as 300 would give 150 and 75. Positions come from their own input,
    # so an axis longer than the model's limit only adds masked entries.
    largest = MIN_AXIS
    while largest < limit:
        largest *= 2
    return largest


def _axis_size(needed: int, current: int, largest: int) -> int:
    """A cache axis size for `needed` entries: doubled to grow, halved once four times too large, 16 * 2**k up to
    `largest` (an _axis_limit)."""
    size = current
    while size < needed:
        size *= 2
    while size > MIN_AXIS and needed <= size // 4:
        size //= 2
    return min(max(size, MIN_AXIS), largest)


def _resized(buffer: np.ndarray, size: int) -> np.ndarray:
    """A copy of a (rows, h, length, d_k) buffer with its length axis cut or zero-padded to size."""
    resized = np.zeros((*buffer.shape[:2], size, buffer.shape[3]), buffer.dtype)
    kept = min(size, buffer.shape[2])
    resized[:, :, :kept] = buffer[:, :, :kept]
    return resized


@dataclass
class ActiveSentence:
    """One sentence being decoded: its search and the cache rows it holds."""

    key: Any
    search: BeamSearch
    slots: list[int]
    source_length: int


@dataclass
class Decoder:
    """Continuous batching over an Engine: add sentences between steps, step, collect finished ones."""

    engine: Engine
    active: list[ActiveSentence] = field(default_factory=list)

    def rows_free(self) -> int:
        """KV-cache rows not held by a sentence."""
        return len(self.engine.free_slots)

    def add(
        self, keys: Sequence[Any], sources: Sequence[Sequence[int]], options: Sequence[DecodeOptions]
    ) -> list[tuple[Any, list[Hypothesis]]]:
        """Encode sentences in one batch, run their first step and give each its rows (beam_size each); returns those
        that the first step finished."""
        if not sources:
            return []
        batch = self.engine.encode(sources)
        searches = self.start(batch, options)
        rows = [i for i, search in enumerate(searches) if not search.done]
        self.join(batch, searches, rows, [keys[i] for i in rows])
        return [(key, search.results()) for key, search in zip(keys, searches) if search.done]

    def start(self, batch: EncodedBatch, options: Sequence[DecodeOptions]) -> list[BeamSearch]:
        """The searches of an encoded batch's sentences, advanced by the decoder's first step (Engine.first_step: safe
        beside `step` in another thread); a search may be done already."""
        for opts in options:  # before any model run: past the model's positions, a step would fail the whole batch
            check_options(self.engine, opts)
        log_probs, alignment = self.engine.first_step(batch)
        searches = [BeamSearch(opts, self.engine.tokens) for opts in options]
        advance_searches(searches, batch.source_lengths.tolist(), log_probs, alignment, self.engine.tokens)
        return searches

    def join(self, batch: EncodedBatch, searches: Sequence[BeamSearch], rows: Sequence[int], keys: Sequence[Any]) -> None:
        """Let the sentences at `rows` of a started batch (its searches, in batch order) join the running batch under
        `keys` (one per row), each in beam_size rows of the cache; the others (ended at their first step, withdrawn,
        or waiting for rows) do not."""
        if list(rows) == list(range(len(searches))):  # the whole batch, in order: the common case, no copy of it
            self.insert(keys, batch, searches)
        elif rows:
            self.insert(keys, batch.select(list(rows)), [searches[row] for row in rows])

    def insert(self, keys: Sequence[Any], batch: EncodedBatch, searches: Sequence[BeamSearch]) -> None:
        """Give the sentences of an encoded batch their rows (beam_size each), to go on with their started searches."""
        slots = self.engine.allocate(batch, [search.options.beam_size for search in searches])
        for key, search, own, length in zip(keys, searches, slots, batch.source_lengths.tolist()):
            self.active.append(ActiveSentence(key, search, own, length))

    def remove(self, key: Any) -> bool:
        """Drop a sentence (cancelled, deadline passed) and free its rows; False if not active."""
        for sequence in self.active:
            if sequence.key == key:
                self.active.remove(sequence)
                self.engine.release(sequence.slots)
                return True
        return False

    def compact(self) -> None:
        """Move the rows in use above a free row down into it, so a step runs over rows [0, rows in use) and no holes."""
        in_use = self.engine.capacity - len(self.engine.free_slots)
        if not self.engine.free_slots or self.engine.free_slots[0] >= in_use:  # a heap: [0] is the lowest free row
            return
        holes = [slot for slot in sorted(self.engine.free_slots) if slot < in_use]
        owners = {slot: (sentence, i) for sentence in self.active for i, slot in enumerate(sentence.slots) if slot >= in_use}
        sources = sorted(owners)
        self.engine.move(sources, holes[: len(sources)])
        for source, target in zip(sources, holes):
            sentence, i = owners[source]
            sentence.slots[i] = target

    def step(self) -> list[tuple[Any, list[Hypothesis]]]:
        """Run one decoder step for every active sentence; returns those that finished."""
        if not self.active:
            return []
        self.compact()  # rows freed since the last step (finished, removed) would otherwise still be computed
        slots, tokens = [], []
        for sequence in self.active:
            slots.extend(sequence.slots[: sequence.search.rows])
            tokens.extend(sequence.search.next_tokens())
        log_probs, alignment = self.engine.step(slots, tokens)
        searches = [sequence.search for sequence in self.active]
        source_lengths = [sequence.source_length for sequence in self.active]
        parents = advance_searches(searches, source_lengths, log_probs, alignment, self.engine.tokens)
        finished, still_active, released = [], [], []
        for sequence, own_parents in zip(self.active, parents):
            search = sequence.search
            if own_parents:
                self.engine.reorder(sequence.slots, own_parents)
            if search.done:
                released += sequence.slots
                finished.append((sequence.key, search.results()))
            else:
                still_active.append(sequence)
        self.active = still_active  # first: should releasing fail, no row is freed twice by removing its text after
        if released:
            self.engine.release(released)
        return finished


def advance_searches(
    searches: Sequence[BeamSearch], source_lengths: Sequence[int], log_probs: np.ndarray, alignment: np.ndarray,
    special: SpecialTokens,
) -> list[list[int]]:
    """Advance each search by a step's outputs for its rows (in order); each beam search's parent rows.

    It touches nothing but the searches and the step's outputs, so the intake thread may start searches with it.
    """
    early, offset = [], 0
    for search in searches:
        if search.step < search.options.min_length:
            early.extend(range(offset, offset + search.rows))
        offset += search.rows
    log_probs[:, special.pad] = -np.inf  # never generated (Marian's <pad> is its start token, and scores high)
    log_probs[early, special.eos] = -np.inf  # before min_length, <eos> may not end a hypothesis
    best = log_probs.argmax(axis=1)  # one call for every row: greedy searches need nothing more
    best_log_probs = log_probs[np.arange(len(best)), best]
    best_tokens = best.tolist()
    parents, offset = [], 0
    for search, source_length in zip(searches, source_lengths):
        rows, options = search.rows, search.options
        # The batch pads sources: each sentence's alignment is cut to its own, where it is asked for.
        # A copy: the search keeps it, and the engine reuses its output buffer at the next step.
        own_source = alignment[offset : offset + rows, :source_length].copy() if options.return_alignment else None
        if options.beam_size == 1:
            search.advance_greedy(best_tokens[offset], best_log_probs[offset], own_source)
            parents.append([])
        else:
            parents.append(search.advance(log_probs[offset : offset + rows], own_source))
        offset += rows
    return parents


def engines_for(path: str | os.PathLike, streams: int, *, capacity: int, threads: int = 0, **kwargs: Any) -> list[Engine]:
    """`streams` engines over one verified bundle, for `translate`: the cache rows and threads shared out among them."""
    bundle = read_bundle(path)
    threads = max(1, (threads or os.cpu_count() or 1) // streams)
    return [Engine(bundle, capacity=-(-capacity // streams), threads=threads, **kwargs) for _ in range(streams)]


def translate(
    engines: Engine | Sequence[Engine], sources: Sequence[Sequence[int]], options: DecodeOptions = DecodeOptions()
) -> list[list[Hypothesis]]:
    """Decode source id lists to completion, as many at a time as the cache holds; with several engines, each
    decodes every n-th source in a thread of its own.

    On a CPU a small model's step runs best on one thread (see Engine), which leaves the other cores idle; engines
    with their own sessions and caches put them to work, since ONNX Runtime releases the GIL while it runs.
    """
    engines = [engines] if isinstance(engines, Engine) else list(engines)[: max(1, len(sources))]
    if len(engines) == 1:
        return _translate(engines[0], sources, options)
    shares = [list(range(first, len(sources), len(engines))) for first in range(len(engines))]
    with ThreadPoolExecutor(len(engines), thread_name_prefix="translate") as pool:
        parts = list(pool.map(lambda engine, share: _translate(engine, [sources[i] for i in share], options), engines, shares))
    results: list[list[Hypothesis]] = [[] for _ in sources]
    for share, part in zip(shares, parts):
        for i, hypotheses in zip(share, part):
            results[i] = hypotheses
    return results


def check_options(engine: Engine, options: DecodeOptions) -> None:
    """ValueError where the engine cannot decode with these options: a beam its cache cannot hold, or what the server
    refuses (DecodeOptions.problems: an output longer than the model's positions, n-best above the beam, …)."""
    if not 1 <= options.beam_size <= engine.capacity:
        raise ValueError(f"beam size {options.beam_size} must be between 1 and the engine's {engine.capacity} cache rows")
    problems = options.problems(engine.max_target_length)
    if problems:
        raise ValueError(describe(problems))


def _translate(engine: Engine, sources: Sequence[Sequence[int]], options: DecodeOptions) -> list[list[Hypothesis]]:
    """Decode on one engine, admitting sources in order as rows come free."""
    max_length = min(options.max_length, engine.max_target_length)
    options = DecodeOptions(**{**options.__dict__, "max_length": max_length})
    check_options(engine, options)  # before the loop, which would wait for ever for rows a beam cannot have
    engine.check_sources(sources)  # before any holds rows: a failure midway would leave the others' behind
    decoder = Decoder(engine)
    results: dict[int, list[Hypothesis]] = {}
    pending = list(range(len(sources)))
    try:
        while pending or decoder.active:
            admit = []
            while pending and (len(admit) + 1) * options.beam_size <= decoder.rows_free():
                admit.append(pending.pop(0))
            if admit:
                results.update(decoder.add(admit, [sources[i] for i in admit], [options] * len(admit)))
            elif not decoder.active:  # rows held elsewhere (another Decoder on this engine): none will come free here
                raise RuntimeError(f"{decoder.rows_free()} of the engine's {engine.capacity} cache rows are free, and a "
                                   f"beam of {options.beam_size} needs more")
            results.update(decoder.step())
    finally:  # a failed run gives back the rows of the sentences it was decoding
        for sentence in list(decoder.active):
            decoder.remove(sentence.key)
    return [results[i] for i in range(len(sources))]
