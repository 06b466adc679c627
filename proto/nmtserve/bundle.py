"""The model bundle: the one contract between the exporter (writer) and the server (reader).

A bundle is a directory:
  manifest.json       format, model dimensions, special token ids, limits, languages,
                      precision, opset, tokenizer kind, every file with its sha256, training metadata
  encoder.onnx        source ids + mask -> every decoder layer's encoder-decoder keys/values
  decoder_step.onnx   one token per row + the cached keys/values -> log-probabilities, the
                      step's new keys/values and the encoder-decoder attention (alignment)
  the tokenizer's files, by kind:
    "tokenizers"      tokenizer.json: the shared subword vocabulary (Hugging Face tokenizers)
    "marian"          source.spm, target.spm (SentencePiece) and vocab.json, plus target_vocab.json
                      where the target vocabulary is separate: Marian's pieces-to-ids mapping

The special token ids (pad, the decoder's start token, eos, unk) are the manifest's:
nmtserve's own tokenizer puts them at 0-3, imported models keep their own.

Languages: {"source": "en", "target": ["de"]}. A model with several target
languages is asked for one by a source token put before the text, which the
manifest names in "target_tokens", e.g. {"fr": ">>fr<<", "es": ">>es<<"} for a
multilingual Marian model; the first target is the default.

The reader trusts nothing: it checks the manifest's schema and version, every
listed file's presence, size and sha256, that no path leaves the directory,
that the graphs' inputs and outputs are the ones below (dynamic axes left
dynamic), that their opset and precision are the manifest's, that the model's
numbers and special token ids the graphs record are the manifest's, that the
tokenizer's vocabulary gives the special tokens the manifest's ids, and that no
ONNX tensor refers to data outside the bundle. The verified bytes are what the
server loads. The writer puts a bundle in place only once it is whole and
verified.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# The special tokens of nmtserve's own tokenizer, in id order; a bundle's manifest says which ids its model uses.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))

FORMAT = "nmtserve-bundle"
FORMAT_VERSION = 2  # 2 added the tokenizer kind and the manifest's own special token ids
READABLE_VERSIONS = (1, 2)  # a version 1 manifest is a "tokenizers" bundle with the ids above
MANIFEST = "manifest.json"
GRAPH_FILES = {"encoder": "encoder.onnx", "decoder_step": "decoder_step.onnx"}
DEVICES = ("auto", "cpu", "cuda")  # where ONNX Runtime runs the graphs: auto takes CUDA where a usable GPU is
# A graph's metadata property: the positions its positional encoding table holds. The graphs are covered by their
# sha256, the manifest is not: its length limits are checked against this (bundles written before it have none).
POSITIONS_PROPERTY = "nmtserve.positions"
LIMIT_OF_GRAPH = {"encoder": "max_source_length", "decoder_step": "max_target_length"}  # what reads each one's positions
# Tokenizer kind -> (the files it needs, the files it may add), each role -> file name.
TOKENIZER_FILES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "tokenizers": ({"tokenizer": "tokenizer.json"}, {}),
    "marian": ({"source_spm": "source.spm", "target_spm": "target.spm", "vocab": "vocab.json"}, {"target_vocab": "target_vocab.json"}),
}
PRECISIONS = ("fp32", "fp16", "int8")
UNDETERMINED = "und"  # BCP 47 for a language not given: what the manifest says where a model's is not known

# Graph inputs and outputs: name -> (ONNX element type, shape). Shapes name their dynamic axes;
# h, d_k and V are filled in from the manifest's model dimensions. Keys and values come one tensor
# per decoder layer, so the graph never splits or stacks (copies) a whole cache.
ENCODER_INPUTS = {
    "source_ids": ("int64", ("batch", "source_length")),
    "source_mask": ("bool", ("batch", "source_length")),
}
_MEMORY = ("float", ("batch", "h", "source_length", "d_k"))
_PAST = ("float", ("batch", "h", "cache_length", "d_k"))
_NEW = ("float", ("batch", "h", 1, "d_k"))


def graph_io(n_layers: int) -> dict[str, tuple[dict, dict]]:
    """The inputs and outputs of each graph, by role, for a model with n_layers decoder layers."""
    layers = range(n_layers)
    encoder_outputs = {f"memory_{kv}_{i}": _MEMORY for i in layers for kv in ("key", "value")}
    decoder_inputs = {
        "tokens": ("int64", ("batch",)),
        "positions": ("int64", ("batch",)),
        "past_mask": ("bool", ("batch", "cache_length")),
        "source_mask": ("bool", ("batch", "source_length")),
        **{f"past_{kv}_{i}": _PAST for i in layers for kv in ("key", "value")},
        **encoder_outputs,
    }
    decoder_outputs = {
        "log_probs": ("float", ("batch", "V")),
        "alignment": ("float", ("batch", "source_length")),
        **{f"new_{kv}_{i}": _NEW for i in layers for kv in ("key", "value")},
    }
    return {"encoder": (ENCODER_INPUTS, encoder_outputs), "decoder_step": (decoder_inputs, decoder_outputs)}


_MANIFEST_SCHEMA: dict[str, type] = {
    "format": str,
    "format_version": int,
    "name": str,
    "model": dict,
    "tokens": dict,
    "tokenizer": dict,
    "limits": dict,
    "languages": dict,
    "precision": str,
    "opset": int,
    "files": dict,
    "training": dict,
}
_TYPE_NAMES = {str: "string", int: "integer", dict: "object"}
_MODEL_FIELDS = ("vocab_size", "d_model", "d_ff", "n_heads", "d_k", "n_encoder_layers", "n_decoder_layers")
_LIMIT_FIELDS = ("max_source_length", "max_target_length")
_TOKEN_FIELDS = ("pad", "bos", "eos", "unk")
# The manifest's fields that the graphs' inputs and outputs do not pin down (those fix h, d_k and so d_model, V, and the
# decoder layers), which export records in each graph's metadata under these properties: like positions, covered by
# the graphs' sha256 and checked against the manifest on read (bundles written before have none).
RECORDED_PROPERTIES = {
    f"nmtserve.{section}.{field}": (section, field)
    for section, field in (("model", "d_ff"), ("model", "n_encoder_layers"), *(("tokens", name) for name in _TOKEN_FIELDS))
}
# The special tokens' names in the vocabulary file of each tokenizer kind, by manifest field. Marian's are its target
# vocabulary's; its <pad> and decoder start token come from the checkpoint's config.json, which a bundle does not hold.
_SPECIAL_TOKEN_NAMES = {"tokenizers": dict(zip(_TOKEN_FIELDS, SPECIAL_TOKENS)), "marian": {"eos": "</s>", "unk": "<unk>"}}
# Bounds past any real model, so that a wrong manifest fails here rather than exhausting memory in the server.
_FIELD_MAXIMA = {"n_encoder_layers": 1_000, "n_decoder_layers": 1_000, "max_source_length": 65_536, "max_target_length": 65_536}


class BundleError(Exception):
    """A bundle that must not be served; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelDims:
    vocab_size: int
    d_model: int
    d_ff: int
    n_heads: int
    d_k: int
    n_encoder_layers: int
    n_decoder_layers: int


@dataclass(frozen=True)
class SpecialTokens:
    pad: int  # padding (never generated)
    bos: int  # the decoder's first input: <bos>; Marian starts from its <pad>
    eos: int  # ends a hypothesis (and every source)
    unk: int  # stands for a piece outside the vocabulary


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest and the verified bytes of its files."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]  # role ("encoder", "decoder_step", then the tokenizer's) -> verified content
    sha256: str  # of manifest.json: identifies the whole bundle, since it lists every file's hash

    @property
    def dims(self) -> ModelDims:
        return ModelDims(**{k: self.manifest["model"][k] for k in _MODEL_FIELDS})

    @property
    def tokens(self) -> SpecialTokens:
        return SpecialTokens(**{k: self.manifest["tokens"][k] for k in _TOKEN_FIELDS})

    @property
    def tokenizer_kind(self) -> str:
        return self.manifest["tokenizer"]["kind"]

    @property
    def max_source_length(self) -> int:
        return self.manifest["limits"]["max_source_length"]

    @property
    def max_target_length(self) -> int:
        return self.manifest["limits"]["max_target_length"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def without_graphs(self) -> Bundle:
        """The same bundle holding only its tokenizer's bytes: what is kept once the graphs are in ONNX Runtime."""
        return replace(self, files={role: data for role, data in self.files.items() if role not in GRAPH_FILES})


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of data."""
    return hashlib.sha256(data).hexdigest()


# Operators that only quantized graphs hold (onnxruntime.quantization.quantize_dynamic's), and float16's ONNX type.
_QUANTIZED_OPERATORS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm"}
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16

# The graph axes the manifest fixes: their name in the shapes above -> the manifest's model field.
_AXIS_FIELDS = {"h": "n_heads", "d_k": "d_k", "V": "vocab_size"}


def expected_shape(shape: tuple, dims: ModelDims) -> tuple:
    """A graph shape with h, d_k and V replaced by the model's numbers."""
    return tuple(getattr(dims, _AXIS_FIELDS[d]) if d in _AXIS_FIELDS else d for d in shape)


def graph_properties(manifest: dict[str, Any]) -> dict[str, str]:
    """The metadata export records in each graph: the manifest's fields its inputs and outputs do not pin down."""
    return {key: str(manifest[section][field]) for key, (section, field) in RECORDED_PROPERTIES.items()}


def file_names(tokenizer_kind: str) -> dict[str, str]:
    """Every file role a bundle with this tokenizer kind may hold -> its file name."""
    required, optional = TOKENIZER_FILES[tokenizer_kind]
    return {**GRAPH_FILES, **required, **optional}


def write_bundle(directory: Path, files: dict[str, bytes], manifest: dict[str, Any]) -> Path:
    """Write the files and a manifest listing their sha256, verify the result by reading it back, and only then put it
    at `directory` (new, empty, or an earlier bundle, which it replaces); raises BundleError, leaving `directory` as
    it was."""
    directory = destination(directory)
    with _writes_beside(directory):
        return _write(directory, files, manifest)


def _write(directory: Path, files: dict[str, bytes], manifest: dict[str, Any]) -> Path:
    staging = _beside(directory, "new")
    try:
        staging.mkdir()
    except OSError as error:
        raise BundleError(f"{directory}: cannot write beside it ({error.strerror or error})") from error
    try:
        names = file_names(manifest["tokenizer"]["kind"])
        listed = {}
        for role, content in files.items():
            name = names[role]
            (staging / name).write_bytes(content)
            listed[role] = {"path": name, "sha256": sha256_bytes(content), "bytes": len(content)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": listed}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        read_bundle(staging)
        if directory.exists():  # the earlier bundle goes only once the new one is whole and verified
            earlier = _beside(directory, "earlier")
            try:
                directory.rename(earlier)
            except OSError as error:  # a mount point cannot be moved
                raise BundleError(f"{directory}: cannot be replaced ({error.strerror or error}); export into a "
                                  "directory inside it") from error
            try:
                staging.rename(directory)
            except BaseException:  # interrupted between the two renames: the earlier bundle goes back
                earlier.rename(directory)
                raise
            shutil.rmtree(earlier)
        else:
            staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already where the bundle is in place
    return directory


def destination(directory: Path | str) -> Path:
    """Where a bundle written to `directory` goes (a symlink's target: the link is kept); raises BundleError where
    that holds something other than a bundle, which writing would replace, or where nothing can be written beside it."""
    directory = Path(os.path.abspath(directory))  # "." and "a/.." have a name, and a parent to stage beside
    if directory.is_symlink():
        directory = directory.resolve()
    if directory.exists() and not _holds_a_bundle(directory) and (not directory.is_dir() or any(directory.iterdir())):
        raise BundleError(f"{directory}: exists and is not a bundle; export into a new or empty directory, or over an "
                          "earlier bundle")
    # As the write will stage it, found now rather than after the export's work; in the nearest folder there is,
    # since the folders still missing are made only by the write (a file there fails the mkdir: not a directory).
    there = next(folder for folder in directory.parents if folder.exists())
    probe = _beside(there / directory.name, "probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise BundleError(f"{directory}: cannot write beside it ({error.strerror or error})") from error
    return directory


def _holds_a_bundle(directory: Path) -> bool:
    """Whether the directory holds a bundle's manifest (any other manifest.json is someone else's)."""
    try:
        return json.loads((directory / MANIFEST).read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # none, unreadable, not JSON, not an object
        return False


@contextlib.contextmanager
def _writes_beside(directory: Path) -> Iterator[None]:
    """Hold the lock on bundle writes in the folder of `directory`, once what a write killed there left is cleared:
    a staged bundle never put in place, and an earlier bundle moved aside (put back if none took its place)."""
    import fcntl  # POSIX only, as is exporting; reading a bundle needs none of this

    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(directory.parent, os.O_RDONLY)
    except OSError as error:
        raise BundleError(f"{directory}: cannot write beside it ({error.strerror or error})") from error
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # a second export into the same folder waits here
        for path in sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*-*")):
            label = path.name.removeprefix(f".{directory.name}.").rpartition("-")[0]
            if label == "earlier" and not directory.exists() and _holds_a_bundle(path):
                path.rename(directory)
            elif label in ("new", "earlier"):
                shutil.rmtree(path, ignore_errors=True)
        yield
    finally:
        os.close(folder)  # and with it the lock


def _beside(directory: Path, label: str) -> Path:
    """A hidden, unused name next to `directory` (the same file system, so a rename moves it whole)."""
    return directory.with_name(f".{directory.name}.{label}-{uuid.uuid4().hex[:12]}")


def _inside(root: Path, relative: str, what: str) -> Path:
    """The real path of `relative` under root, refusing absolute paths, '..' and symlinks that leave it."""
    if not relative or "\0" in relative or os.path.isabs(relative) or ".." in Path(relative).parts:
        raise BundleError(f"{what}: path {relative!r} must be relative, stay inside the bundle and hold no NUL")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise BundleError(f"{what}: path {relative!r} resolves to {resolved}, outside the bundle {root}")
    return resolved


def _check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    if isinstance(manifest.get("format_version"), bool) or manifest.get("format_version") not in READABLE_VERSIONS:
        raise BundleError(
            f"{MANIFEST}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this nmtserve reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if manifest["format_version"] == 1:
        manifest.setdefault("tokenizer", {"kind": "tokenizers"})
    for key, kind in _MANIFEST_SCHEMA.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value in ("", 0):  # a name, an opset: never empty
            raise BundleError(f"{MANIFEST}: field {key!r} must be a non-empty {_TYPE_NAMES[kind]}, got {value!r}")
    for section, keys in (("model", _MODEL_FIELDS), ("limits", _LIMIT_FIELDS)):
        for key in keys:
            value = manifest[section].get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BundleError(f"{MANIFEST}: {section}.{key} must be a positive integer, got {value!r}")
            if value > _FIELD_MAXIMA.get(key, value):
                raise BundleError(f"{MANIFEST}: {section}.{key} is {value}, above any model's ({_FIELD_MAXIMA[key]})")
    model = manifest["model"]
    if model["d_model"] != model["n_heads"] * model["d_k"]:  # the heads split d_model: d_k = d_model / h
        raise BundleError(f"{MANIFEST}: model.d_model {model['d_model']} must be n_heads × d_k "
                          f"({model['n_heads']} × {model['d_k']} = {model['n_heads'] * model['d_k']})")
    vocab_size = model["vocab_size"]
    for name in _TOKEN_FIELDS:
        token_id = manifest["tokens"].get(name)
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise BundleError(f"{MANIFEST}: tokens.{name} must be a token id below the vocabulary size {vocab_size}, got {token_id!r}")
    tokens = manifest["tokens"]
    if tokens["eos"] in (tokens["pad"], tokens["bos"]):  # <pad> is never generated: such an <eos> could never end a text
        raise BundleError(f"{MANIFEST}: tokens.eos {tokens['eos']} must differ from tokens.pad and tokens.bos")
    if manifest["precision"] not in PRECISIONS:
        raise BundleError(f"{MANIFEST}: precision {manifest['precision']!r} is not one of {', '.join(PRECISIONS)}")
    kind = manifest["tokenizer"].get("kind")
    if kind not in TOKENIZER_FILES:
        raise BundleError(f"{MANIFEST}: tokenizer.kind {kind!r} is not one of {', '.join(TOKENIZER_FILES)}")
    required = {**GRAPH_FILES, **TOKENIZER_FILES[kind][0]}
    for role in required:
        if role not in manifest["files"]:
            raise BundleError(f"{MANIFEST}: files.{role} is missing: a {kind!r} bundle lists {', '.join(required)}")
    for role, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"{MANIFEST}: files.{role} must be an object with 'path' and 'sha256'")
        if "bytes" in entry and (not isinstance(entry["bytes"], int) or isinstance(entry["bytes"], bool)):
            raise BundleError(f"{MANIFEST}: files.{role}.bytes must be an integer, got {entry['bytes']!r}")
    languages = manifest["languages"]
    targets = languages.get("target")
    if not isinstance(languages.get("source"), str) or not languages["source"] or not isinstance(targets, list) or not targets or not all(
        isinstance(target, str) and target for target in targets
    ):
        raise BundleError(f"{MANIFEST}: languages must have a 'source' code and a non-empty 'target' list of codes "
                          f"(BCP 47, {UNDETERMINED!r} where not known), got {languages!r}")
    if len(set(targets)) != len(targets):
        raise BundleError(f"{MANIFEST}: languages.target lists a language twice: {targets}")
    target_tokens = languages.get("target_tokens")
    if target_tokens is None and len(targets) > 1:
        raise BundleError(f"{MANIFEST}: languages.target_tokens is required with several target languages ({', '.join(targets)}): "
                          "the source token that asks for each")
    if target_tokens is not None and (not isinstance(target_tokens, dict) or set(target_tokens) != set(targets)
                                      or not all(isinstance(token, str) and token for token in target_tokens.values())):
        raise BundleError(f"{MANIFEST}: languages.target_tokens must map each target language, and no other, to a token")


def _tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX model: initializers, sparse ones, and node attributes, in subgraphs and functions too."""

    def in_graph(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from in_nodes(graph.node)

    def in_nodes(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("sparse_tensor"):
                    yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
                for sparse in attribute.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
                if attribute.HasField("g"):
                    yield from in_graph(attribute.g)
                for graph in attribute.graphs:
                    yield from in_graph(graph)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)


def _graph_precision(model: Any) -> str:
    """The precision a graph's arithmetic is in, as export makes it: int8 (ONNX Runtime's dynamic quantization), fp16
    (float16 weights) or fp32."""
    if any(node.op_type in _QUANTIZED_OPERATORS for node in model.graph.node):
        return "int8"
    if any(tensor.data_type == _FLOAT16 for tensor in model.graph.initializer):
        return "fp16"
    return "fp32"


def _check_positions(role: str, properties: dict[str, str], manifest: dict[str, Any]) -> None:
    """The manifest's length limit read by this graph must fit its positional table, where the graph records it."""
    recorded = properties.get(POSITIONS_PROPERTY)
    if recorded is None:
        return
    if not (recorded.isascii() and recorded.isdigit()):
        raise BundleError(f"{GRAPH_FILES[role]}: metadata {POSITIONS_PROPERTY}={recorded!r} is not a number of positions")
    limit = LIMIT_OF_GRAPH[role]
    if manifest["limits"][limit] > int(recorded):
        raise BundleError(f"manifest.json: limits.{limit} is {manifest['limits'][limit]}, but {GRAPH_FILES[role]} has "
                          f"positions for {recorded} tokens")


def _check_recorded(role: str, properties: dict[str, str], manifest: dict[str, Any]) -> None:
    """Each manifest field this graph records (RECORDED_PROPERTIES; graphs exported before record none) must be the
    value recorded."""
    for key, (section, field) in RECORDED_PROPERTIES.items():
        recorded = properties.get(key)
        if recorded is not None and recorded != str(manifest[section][field]):
            raise BundleError(f"{MANIFEST}: {section}.{field} is {manifest[section][field]}, but {GRAPH_FILES[role]} records "
                              f"{recorded} (metadata {key})")


def _check_graph(role: str, bundle: Bundle) -> None:
    import onnx  # only the reader needs it; imported here to keep the module light for the client

    manifest, dims, root = bundle.manifest, bundle.dims, bundle.path
    try:
        model = onnx.load_model_from_string(bundle.files[role])
    except Exception as error:  # onnx raises DecodeError and friends
        raise BundleError(f"{GRAPH_FILES[role]}: not a readable ONNX model ({error})") from error
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            _inside(root, location, f"{GRAPH_FILES[role]}: external data of {tensor.name!r}")
            raise BundleError(f"{GRAPH_FILES[role]}: tensor {tensor.name!r} keeps its data in {location!r}; bundles hold self-contained graphs")
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    if opset != manifest["opset"]:
        raise BundleError(f"{GRAPH_FILES[role]}: opset {opset}, the manifest says {manifest['opset']}")
    properties = {p.key: p.value for p in model.metadata_props}
    _check_positions(role, properties, manifest)
    _check_recorded(role, properties, manifest)
    precision = _graph_precision(model)
    if precision != manifest["precision"]:
        raise BundleError(f"{GRAPH_FILES[role]}: its weights are {precision}, the manifest says precision {manifest['precision']}")
    inputs, outputs = graph_io(dims.n_decoder_layers)[role]
    for kind, promised, actual in (("input", inputs, model.graph.input), ("output", outputs, model.graph.output)):
        found = {}
        for value in actual:
            tensor_type = value.type.tensor_type
            try:
                element = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
            except KeyError as error:  # no element type: not a tensor (a sequence, a map) or an undefined one
                raise BundleError(f"{GRAPH_FILES[role]}: {kind} {value.name!r} is not a tensor of a known element type; "
                                  f"the bundle format's are all tensors") from error
            shape = tuple(d.dim_param or d.dim_value for d in tensor_type.shape.dim)  # 0: unknown
            found[value.name] = (element, shape)
        if list(found) != list(promised):
            # A count that differs is most often a manifest for another model: say which of its numbers set it.
            layers = f"; the manifest says n_decoder_layers={dims.n_decoder_layers}" if len(found) != len(promised) else ""
            raise BundleError(f"{GRAPH_FILES[role]}: graph {kind}s are {list(found)}, the bundle format promises {list(promised)}{layers}")
        for name, (element, shape) in promised.items():
            want = ({"float": "float32", "bool": "bool", "int64": "int64"}[element], expected_shape(shape, dims))
            got = found[name]
            problems = _dimension_problems(got[1], want[1], shape)
            if got[0] != want[0] or len(got[1]) != len(want[1]) or problems:
                raise BundleError(f"{GRAPH_FILES[role]}: {kind} {name!r} is {got[0]}{list(got[1])}, expected "
                                  f"{want[0]}{list(want[1])}{''.join(f'; {problem}' for problem in problems)}")


def _check_tokenizer(bundle: Bundle) -> None:
    """The tokenizer's vocabulary, which its sha256 covers, must give the special tokens the manifest's ids."""
    kind = bundle.tokenizer_kind
    role = "tokenizer" if kind == "tokenizers" else "target_vocab" if "target_vocab" in bundle.files else "vocab"
    path = bundle.manifest["files"][role]["path"]
    try:
        vocabulary = json.loads(bundle.files[role])
    except ValueError as error:  # UnicodeDecodeError too
        raise BundleError(f"{path}: not valid JSON ({error})") from error
    if kind == "tokenizers":  # its "added_tokens", read as plain JSON: the server loads the whole tokenizer later
        added = vocabulary.get("added_tokens") if isinstance(vocabulary, dict) else None
        if not isinstance(added, list):
            raise BundleError(f"{path}: no 'added_tokens' list; a {kind!r} bundle holds a Hugging Face tokenizer.json")
        vocabulary = {token["content"]: token.get("id") for token in added
                      if isinstance(token, dict) and isinstance(token.get("content"), str)}
    elif not isinstance(vocabulary, dict):
        raise BundleError(f"{path}: expected a JSON object of pieces and their ids")
    tokens = bundle.manifest["tokens"]
    for field, name in _SPECIAL_TOKEN_NAMES[kind].items():
        if name not in vocabulary:
            raise BundleError(f"{path}: has no special token {name!r} ({MANIFEST}'s tokens.{field})")
        if vocabulary[name] != tokens[field]:
            raise BundleError(f"{MANIFEST}: tokens.{field} is {tokens[field]}, but {path} gives {name!r} the id {vocabulary[name]!r}")


def _dimension_problems(got: tuple, want: tuple, axes: tuple) -> list[str]:
    """How a graph's dimensions (a name or 0 where dynamic) differ from the expected ones (numbers for the model's
    fixed sizes, names for the axes that must stay dynamic: a graph fixed at batch 1 would fail the first batch of 2)."""
    problems = []
    for i, (g, w, axis) in enumerate(zip(got, want, axes)):
        if isinstance(w, int) and g != w:
            problems.append(f"dimension {i} is {g}, " + (f"the manifest says {_AXIS_FIELDS[axis]}={w}" if axis in _AXIS_FIELDS else f"expected {w}"))
        elif not isinstance(w, int) and isinstance(g, int) and g != 0:
            problems.append(f"dimension {i} is fixed at {g}, where the bundle format keeps {axis} dynamic")
    return problems


def read_bundle(directory: Path | str) -> Bundle:
    """Open and verify a bundle; raises BundleError naming the file and problem."""
    root = Path(directory).resolve()
    manifest_path = root / MANIFEST
    if manifest_path.is_symlink():
        manifest_path = _inside(root, MANIFEST, MANIFEST)  # a link may not lead out of the bundle
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: no {MANIFEST}; is {directory} a bundle written by 'nmtserve export'?")
    manifest_bytes = manifest_path.read_bytes()
    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, UnicodeDecodeError) as error:
        raise BundleError(f"{MANIFEST}: not valid JSON ({error})") from error
    _check_manifest(manifest)
    files = {}
    roles = file_names(manifest["tokenizer"]["kind"])
    for role, entry in manifest["files"].items():
        if role not in roles:
            raise BundleError(f"{MANIFEST}: unknown file role {role!r} for a {manifest['tokenizer']['kind']!r} tokenizer")
        path = _inside(root, entry["path"], f"{MANIFEST}: files.{role}")
        if not path.is_file():
            raise BundleError(f"{entry['path']}: listed in {MANIFEST} but missing")
        content = path.read_bytes()
        if entry.get("bytes", len(content)) != len(content):
            raise BundleError(f"{entry['path']}: {len(content)} bytes, the manifest says {entry['bytes']}")
        if sha256_bytes(content) != entry["sha256"]:
            raise BundleError(f"{entry['path']}: sha256 {sha256_bytes(content)} does not match the manifest's {entry['sha256']}")
        files[role] = content
    bundle = Bundle(path=root, manifest=manifest, files=files, sha256=sha256_bytes(manifest_bytes))
    for role in ("encoder", "decoder_step"):
        _check_graph(role, bundle)
    _check_tokenizer(bundle)
    return bundle
