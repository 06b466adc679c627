"""The decoding engine: a verified bundle in ONNX Runtime, a preallocated KV cache, and step-level decoding.

`Engine` runs the two graphs and owns the cache rows ("slots"). `Decoder`
drives searches over it one step at a time: sequences can be added between
steps and leave as soon as they finish (continuous batching); the server's
scheduler calls it step by step, `translate()` runs it to completion.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from nmtserve.bundle import Bundle, read_bundle

from .search import BeamSearch, DecodeOptions, Hypothesis
from .tokenization import load_tokenizer

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


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


def _cuda_device_present() -> bool:
    # onnxruntime-gpu lists the CUDA provider even where no GPU or driver exists.
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


@dataclass
class EncodedBatch:
    memory: list[np.ndarray]  # memory_key_0, memory_value_0, ... each (B, h, S, d_k)
    source_mask: np.ndarray  # (B, S)
    source_lengths: np.ndarray  # (B,)


class Engine:
    """ONNX Runtime sessions for a bundle, and a KV cache of `capacity` rows."""

    def __init__(self, bundle: Bundle, *, device: str = "auto", capacity: int = 64, threads: int = 0):
        self.bundle = bundle
        self.providers = providers_for(device)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one request stream; parallelism is inside ops
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.encoder = ort.InferenceSession(bundle.files["encoder"], options, providers=self.providers)
        self.decoder = ort.InferenceSession(bundle.files["decoder_step"], options, providers=self.providers)
        self.tokenizer = load_tokenizer(bundle)

        dims = bundle.dims
        self.capacity = capacity
        self.max_source_length = bundle.max_source_length
        self.max_target_length = bundle.max_target_length
        layers = 2 * dims.n_decoder_layers  # a key and a value tensor per layer, in graph order
        # Self-attention cache and encoder-decoder keys/values (fixed per sentence), row by row.
        self.cache = [np.zeros((capacity, dims.n_heads, self.max_target_length, dims.d_k), np.float32) for _ in range(layers)]
        self.memory = [np.zeros((capacity, dims.n_heads, self.max_source_length, dims.d_k), np.float32) for _ in range(layers)]
        self.past_names = [f"past_{kv}_{i}" for i in range(dims.n_decoder_layers) for kv in ("key", "value")]
        self.memory_names = [f"memory_{kv}_{i}" for i in range(dims.n_decoder_layers) for kv in ("key", "value")]
        self.lengths = np.zeros(capacity, np.int64)  # cached steps per row
        self.source_lengths = np.zeros(capacity, np.int64)
        self.free_slots = list(range(capacity - 1, -1, -1))
        self._gathered: tuple[tuple[int, ...], dict[str, np.ndarray]] | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kwargs: Any) -> Engine:
        """Verify the bundle at path and load it."""
        return cls(read_bundle(path), **kwargs)

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Source ids (subwords + <eos>) of each text; tokenizer only, safe beside the decode thread."""
        return self.tokenizer.encode_batch(list(texts))

    def decode_ids(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of generated id lists; tokenizer only, safe beside the decode thread."""
        return self.tokenizer.decode_batch([list(i) for i in ids])

    def encode(self, sources: Sequence[Sequence[int]]) -> EncodedBatch:
        """Run the encoder once for a batch of source id lists."""
        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        if lengths.max() > self.max_source_length:
            raise ValueError(f"a source of {lengths.max()} tokens is longer than the model's limit of {self.max_source_length}")
        source_ids = np.zeros((len(sources), int(lengths.max())), dtype=np.int64)
        for row, source in enumerate(sources):
            source_ids[row, : len(source)] = source
        source_mask = np.arange(source_ids.shape[1])[None, :] < lengths[:, None]
        memory = self.encoder.run(self.memory_names, {"source_ids": source_ids, "source_mask": source_mask})
        return EncodedBatch(memory, source_mask, lengths)

    def allocate(self, batch: EncodedBatch, index: int, rows: int) -> list[int]:
        """Take `rows` free slots for sentence `index` of an encoded batch (a beam of k takes k rows)."""
        if rows > len(self.free_slots):
            raise RuntimeError(f"{rows} KV-cache rows requested, {len(self.free_slots)} free")
        slots = [self.free_slots.pop() for _ in range(rows)]
        length = int(batch.source_lengths[index])
        for buffer, encoded in zip(self.memory, batch.memory):
            buffer[slots, :, :length] = encoded[index, :, :length]
        self.source_lengths[slots] = length
        self.lengths[slots] = 0
        self._gathered = None  # the rows' contents changed
        return slots

    def release(self, slots: Sequence[int]) -> None:
        """Return slots to the free list."""
        self.free_slots.extend(reversed(slots))
        self._gathered = None

    def reorder(self, slots: Sequence[int], parents: Sequence[int]) -> None:
        """Beam reordering: slot i takes over the cache of slot parents[i]."""
        if list(parents) == list(range(len(parents))):
            return
        new, old = list(slots[: len(parents)]), [slots[p] for p in parents]
        length = int(self.lengths[old].max())
        for buffer in self.cache:
            buffer[new, :, :length] = buffer[old, :, :length]
        self.lengths[new] = self.lengths[old]

    def _memory(self, slots: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Encoder-decoder keys/values and source mask of the rows, gathered once per set of rows."""
        if self._gathered is None or self._gathered[0] != slots:
            index = list(slots)
            source_length = int(self.source_lengths[index].max())
            feeds = {name: buffer[index, :, :source_length] for name, buffer in zip(self.memory_names, self.memory)}
            feeds["source_mask"] = np.arange(source_length)[None, :] < self.source_lengths[index][:, None]
            self._gathered = (slots, feeds)
        return self._gathered[1]

    def step(self, slots: Sequence[int], tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """One decoder step for the given rows: log-probabilities (B, V) and alignment (B, S)."""
        index = list(slots)
        lengths = self.lengths[index]
        cache_length = max(1, int(lengths.max()))  # at least one (masked) entry: a zero-length axis trips ORT's MatMul
        feeds = {
            "tokens": np.asarray(tokens, dtype=np.int64),
            "positions": lengths,
            "past_mask": np.arange(cache_length)[None, :] < lengths[:, None],
            **{name: buffer[index, :, :cache_length] for name, buffer in zip(self.past_names, self.cache)},
            **self._memory(tuple(index)),
        }
        log_probs, alignment, *new = self.decoder.run(None, feeds)
        for buffer, step in zip(self.cache, new):
            buffer[index, :, lengths] = step[:, :, 0]  # append each row's new key/value at its own length
        self.lengths[index] = lengths + 1
        return log_probs, alignment


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

    def add(self, keys: Sequence[Any], sources: Sequence[Sequence[int]], options: Sequence[DecodeOptions]) -> None:
        """Encode sentences in one batch and give each its rows (beam_size each)."""
        batch = self.engine.encode(sources)
        for index, (key, opts) in enumerate(zip(keys, options)):
            slots = self.engine.allocate(batch, index, opts.beam_size)
            self.active.append(ActiveSentence(key, BeamSearch(opts, self.engine.bundle.tokens), slots, len(sources[index])))

    def remove(self, key: Any) -> bool:
        """Drop a sentence (cancelled, deadline passed) and free its rows; False if not active."""
        for sequence in self.active:
            if sequence.key == key:
                self.active.remove(sequence)
                self.engine.release(sequence.slots)
                return True
        return False

    def step(self) -> list[tuple[Any, list[Hypothesis]]]:
        """Run one decoder step for every active sentence; returns those that finished."""
        if not self.active:
            return []
        slots, tokens = [], []
        for sequence in self.active:
            slots += sequence.slots[: sequence.search.rows]
            tokens += sequence.search.next_tokens()
        log_probs, alignment = self.engine.step(slots, tokens)
        best = log_probs.argmax(axis=1)  # one call for every row: greedy searches need nothing more
        finished, still_active, offset = [], [], 0
        for sequence in self.active:
            rows = sequence.search.rows
            window = slice(offset, offset + rows)
            own_source = alignment[window, : sequence.source_length]  # the batch pads sources to its longest
            parents = sequence.search.advance(log_probs[window], own_source, best[window])
            offset += rows
            if sequence.search.done:
                self.engine.release(sequence.slots)
                finished.append((sequence.key, sequence.search.results()))
            else:
                self.engine.reorder(sequence.slots, parents)
                still_active.append(sequence)
        self.active = still_active
        return finished


def translate(
    engine: Engine, sources: Sequence[Sequence[int]], options: DecodeOptions = DecodeOptions()
) -> list[list[Hypothesis]]:
    """Decode source id lists to completion, as many at a time as the cache holds."""
    max_length = min(options.max_length, engine.max_target_length)
    options = DecodeOptions(**{**options.__dict__, "max_length": max_length})
    decoder = Decoder(engine)
    results: dict[int, list[Hypothesis]] = {}
    pending = list(range(len(sources)))
    while pending or decoder.active:
        admit = []
        while pending and (len(admit) + 1) * options.beam_size <= decoder.rows_free():
            admit.append(pending.pop(0))
        if admit:
            decoder.add(admit, [sources[i] for i in admit], [options] * len(admit))
        for key, hypotheses in decoder.step():
            results[key] = hypotheses
    return [results[i] for i in range(len(sources))]
