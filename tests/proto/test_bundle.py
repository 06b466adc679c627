"""The bundle reader refuses anything it cannot verify, naming the file and the problem."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest

from nmtserve.bundle import (
    MANIFEST, RECORDED_PROPERTIES, BundleError, destination, graph_properties, read_bundle, sha256_bytes, write_bundle,
)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target


def edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_exported_bundle_verifies(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    assert set(bundle.files) == {"encoder", "decoder_step", "tokenizer"}
    assert bundle.manifest["precision"] == "fp32"
    assert bundle.manifest["training"]["steps"] > 0
    assert bundle.manifest["training"]["onnx_max_difference"] < 1e-4  # the export's parity gate, over both graphs
    assert len(bundle.sha256) == 64
    for role, entry in bundle.manifest["files"].items():
        assert sha256_bytes((tiny_bundle / entry["path"]).read_bytes()) == entry["sha256"]


@pytest.mark.parametrize("bundle", ["tiny_bundle", "tiny_bundle_int8", "tiny_bundle_fp16"])
def test_graphs_pass_the_full_onnx_checker(bundle, request):
    """The graphs as shipped, int8 and fp16 too: those are converted after the fp32 graphs were checked."""
    for name in ("encoder.onnx", "decoder_step.onnx"):
        onnx.checker.check_model(onnx.load(str(request.getfixturevalue(bundle) / name)), full_check=True)


def _with_a_changed_byte(role: str, data: bytes) -> bytes:
    """The file with one byte changed where only its sha256 can tell: in the middle of a graph's largest weight (the
    graph still loads), or in an ordinary piece of the tokenizer's vocabulary, whose first letter changes case (the
    JSON still parses, no piece is there twice, the special tokens keep their ids)."""
    if role == "tokenizer":
        vocabulary = json.loads(data)["model"]["vocab"]
        piece = next(piece for piece in vocabulary if piece.isascii() and piece.isalpha() and len(piece) > 1
                     and piece[0].swapcase() + piece[1:] not in vocabulary and data.count(f'"{piece}":'.encode()) == 1)
        at = data.index(f'"{piece}":'.encode()) + 1  # the piece's first letter, after its opening quote
    else:
        weight = max(onnx.load_model_from_string(data).graph.initializer, key=lambda tensor: len(tensor.raw_data)).raw_data
        at = data.index(weight) + len(weight) // 2
    changed = bytearray(data)
    changed[at] ^= 0x20  # an ASCII letter's case; some bit of a weight
    return bytes(changed)


LISTED_FILES = ["encoder", "decoder_step", "tokenizer"]  # every file the tiny bundle's manifest lists


@pytest.mark.parametrize("role", LISTED_FILES)
def test_changed_byte_is_refused(bundle_copy, role):
    files = json.loads((bundle_copy / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(LISTED_FILES)
    path = bundle_copy / files[role]["path"]
    changed = _with_a_changed_byte(role, path.read_bytes())
    path.write_bytes(changed)
    with pytest.raises(BundleError, match=rf"^{re.escape(files[role]['path'])}: sha256 {sha256_bytes(changed)} does not match "
                                          rf"the manifest's {files[role]['sha256']}$"):
        read_bundle(bundle_copy)
    # Nothing but the hash tells: with the manifest listing the changed file's, the bundle reads.
    edit_manifest(bundle_copy, lambda m: m["files"][role].update(sha256=sha256_bytes(changed)))
    assert read_bundle(bundle_copy).files[role] == changed


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: listed in manifest\.json but missing"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("path", ["../encoder.onnx", "/etc/passwd", "sub/../../x.onnx", "encoder\0.onnx"])
def test_path_escaping_the_bundle_is_refused(bundle_copy, path):
    edit_manifest(bundle_copy, lambda m: m["files"]["encoder"].update(path=path))
    with pytest.raises(BundleError, match="must be relative, stay inside the bundle and hold no NUL"):
        read_bundle(bundle_copy)


def test_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle_copy / "encoder.onnx", outside)
    (bundle_copy / "encoder.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(bundle_copy)


def _replace_file(bundle: Path, role: str, data: bytes) -> None:
    """Write a changed file into the bundle with its manifest entry updated, as a careful forger would."""
    (bundle / json.loads((bundle / MANIFEST).read_text())["files"][role]["path"]).write_bytes(data)
    edit_manifest(bundle, lambda m: m["files"][role].update(sha256=sha256_bytes(data), bytes=len(data)))


def _replace_graph(bundle: Path, role: str, model: onnx.ModelProto) -> None:
    _replace_file(bundle, role, model.SerializeToString())


def test_graph_with_renamed_input_is_refused(bundle_copy):
    model = onnx.load(str(bundle_copy / "decoder_step.onnx"))
    model.graph.input[0].name = "token_ids"
    for node in model.graph.node:
        node.input[:] = ["token_ids" if name == "tokens" else name for name in node.input]
    _replace_graph(bundle_copy, "decoder_step", model)
    with pytest.raises(BundleError, match="graph inputs are .*'token_ids'.* promises"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("positions", ["", "many", "\u00b2", "\u0663"])  # superscript two and Arabic-Indic three
def test_a_graph_whose_positions_are_not_a_number_is_refused(bundle_copy, positions):
    model = onnx.load(str(bundle_copy / "encoder.onnx"))
    onnx.helper.set_model_props(model, {"nmtserve.positions": positions})
    _replace_graph(bundle_copy, "encoder", model)
    with pytest.raises(BundleError, match=r"encoder\.onnx: metadata nmtserve\.positions=.* is not a number of positions"):
        read_bundle(bundle_copy)


def test_a_graph_fixed_at_one_batch_size_is_refused(bundle_copy):
    """Such a graph would load, then fail the first batch of two."""
    model = onnx.load(str(bundle_copy / "decoder_step.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    _replace_graph(bundle_copy, "decoder_step", model)
    with pytest.raises(BundleError, match=r"input 'tokens' is int64\[1\], .*dimension 0 is fixed at 1, where the bundle format keeps batch dynamic"):
        read_bundle(bundle_copy)


def test_a_graph_input_that_is_not_a_tensor_is_refused(bundle_copy):
    model = onnx.load(str(bundle_copy / "encoder.onnx"))
    mask = model.graph.input[1]
    mask.type.CopyFrom(onnx.helper.make_sequence_type_proto(onnx.helper.make_tensor_type_proto(onnx.TensorProto.BOOL, None)))
    _replace_graph(bundle_copy, "encoder", model)
    with pytest.raises(BundleError, match=r"encoder\.onnx: input 'source_mask' is not a tensor of a known element type"):
        read_bundle(bundle_copy)


def test_a_file_of_another_size_than_listed_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["files"]["encoder"].update(bytes=1))
    with pytest.raises(BundleError, match=r"encoder\.onnx: \d+ bytes, the manifest says 1"):
        read_bundle(bundle_copy)


def test_external_data_reference_is_refused(bundle_copy):
    model = onnx.load(str(bundle_copy / "encoder.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.raw_data = b""
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../secrets.bin"
    _replace_graph(bundle_copy, "encoder", model)
    with pytest.raises(BundleError, match="external data .* must be relative, stay inside the bundle"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("where", ["constant node", "subgraph initializer"])
def test_external_data_hidden_in_a_node_or_subgraph_is_refused(bundle_copy, where):
    # ONNX Runtime would read such data relative to the server's working directory, unverified.
    model = onnx.load(str(bundle_copy / "encoder.onnx"))
    secret = onnx.helper.make_tensor("secret", onnx.TensorProto.UINT8, [8], vals=bytes(8), raw=True)
    secret.raw_data = b""
    secret.data_location = onnx.TensorProto.EXTERNAL
    entry = secret.external_data.add()
    entry.key, entry.value = "location", "etc/nmtserve/tls/tls.key"
    if where == "constant node":
        model.graph.node.append(onnx.helper.make_node("Constant", [], ["leak"], value=secret))
    else:
        branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["secret"], ["out"])], "branch", [],
                                        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.UINT8, [8])], [secret])
        flag = onnx.helper.make_tensor("flag", onnx.TensorProto.BOOL, [], [True])
        model.graph.node.extend([onnx.helper.make_node("Constant", [], ["flag"], value=flag),
                                 onnx.helper.make_node("If", ["flag"], ["leak"], then_branch=branch, else_branch=branch)])
    _replace_graph(bundle_copy, "encoder", model)
    with pytest.raises(BundleError, match=r"tensor 'secret' keeps its data in 'etc/nmtserve/tls/tls.key'"):
        read_bundle(bundle_copy)


def test_manifest_linked_from_outside_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((bundle_copy / MANIFEST).read_bytes())
    (bundle_copy / MANIFEST).unlink()
    (bundle_copy / MANIFEST).symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        read_bundle(tmp_path)


def test_version_1_manifest_reads_as_a_tokenizers_bundle(bundle_copy):
    edit_manifest(bundle_copy, lambda m: (m.update(format_version=1), m.pop("tokenizer")))
    bundle = read_bundle(bundle_copy)
    assert bundle.tokenizer_kind == "tokenizers"
    assert (bundle.tokens.pad, bundle.tokens.bos, bundle.tokens.eos, bundle.tokens.unk) == (0, 1, 2, 3)


MANIFEST_ERRORS = {  # what a wrong manifest says, by the edit that makes it wrong
    "wrong_format_version": (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    "field_of_the_wrong_type": (lambda m: m["model"].update(d_model="wide"), r"model\.d_model must be a positive integer"),
    "graph_unlike_the_manifest": (
        lambda m: m["model"].update(n_heads=m["model"]["n_heads"] * 2, d_k=m["model"]["d_k"] // 2),
        r"encoder\.onnx: output 'memory_key_0' is float32\[.*\], expected",
    ),
    "heads_that_do_not_split_d_model": (
        lambda m: m["model"].update(d_model=m["model"]["d_model"] + 1), r"model\.d_model \d+ must be n_heads × d_k \(\d+ × \d+ = \d+\)"
    ),
    "special_token_outside_the_vocabulary": (lambda m: m["tokens"].update(eos=m["model"]["vocab_size"]), r"tokens\.eos must be a token id below the vocabulary size"),
    "unknown_tokenizer_kind": (lambda m: m["tokenizer"].update(kind="wordpiece"), r"tokenizer\.kind 'wordpiece' is not one of tokenizers, marian"),
    "no_target_language": (lambda m: m.update(languages={}), r"languages must have a 'source' code and a non-empty 'target'"),
    "empty_language_codes": (lambda m: m.update(languages={"source": "", "target": [""]}), r"languages must have a 'source' code"),
    "a_version_that_is_a_boolean": (lambda m: m.update(format_version=True), "format_version True is not supported"),
    "an_empty_name": (lambda m: m.update(name=""), r"field 'name' must be a non-empty string, got ''"),
    "an_opset_unlike_the_graphs": (lambda m: m.update(opset=7), r"encoder\.onnx: opset 18, the manifest says 7"),
    "a_precision_unlike_the_graphs": (lambda m: m.update(precision="int8"), r"encoder\.onnx: its weights are fp32, the manifest says precision int8"),
    "target_language_twice": (lambda m: m["languages"].update(target=["de", "de"]), r"languages\.target lists a language twice"),
    "several_targets_without_their_tokens": (lambda m: m["languages"].update(target=["de", "fr"]),
                                             r"languages\.target_tokens is required with several target languages \(de, fr\)"),
    "target_tokens_unlike_the_targets": (lambda m: m["languages"].update(target=["de", "fr"], target_tokens={"de": "<2de>"}),
                                         r"languages\.target_tokens must map each target language, and no other, to a token"),
    "length_beyond_any_model": (lambda m: m["limits"].update(max_source_length=10**12), r"limits\.max_source_length is 1000000000000, above any model's \(65536\)"),
    # Beyond the graphs' positional tables: ONNX Runtime would fail on the first long text, naming an index only.
    "source_length_beyond_the_positions": (lambda m: m["limits"].update(max_source_length=m["limits"]["max_source_length"] + 1),
                                           r"limits\.max_source_length is \d+, but encoder\.onnx has positions for \d+ tokens"),
    "target_length_beyond_the_positions": (lambda m: m["limits"].update(max_target_length=m["limits"]["max_target_length"] * 2),
                                           r"limits\.max_target_length is \d+, but decoder_step\.onnx has positions for \d+ tokens"),
    "layers_beyond_any_model": (lambda m: m["model"].update(n_decoder_layers=300_000), r"model\.n_decoder_layers is 300000, above any model's"),
    # The fields the graphs' shapes do not pin down, which the graphs record: a wrong eos would decode every text to
    # the length limit, wrong dimensions would be what GetModelInfo tells clients.
    "eos_unlike_the_graphs": (lambda m: m["tokens"].update(eos=5), r"tokens\.eos is 5, but encoder\.onnx records 2 \(metadata nmtserve\.tokens\.eos\)"),
    "bos_unlike_the_graphs": (lambda m: m["tokens"].update(bos=7), r"tokens\.bos is 7, but encoder\.onnx records 1 \(metadata nmtserve\.tokens\.bos\)"),
    "d_ff_unlike_the_graphs": (lambda m: m["model"].update(d_ff=9), r"model\.d_ff is 9, but encoder\.onnx records \d+ \(metadata nmtserve\.model\.d_ff\)"),
    "encoder_layers_unlike_the_graphs": (lambda m: m["model"].update(n_encoder_layers=7),
                                         r"model\.n_encoder_layers is 7, but encoder\.onnx records \d+ \(metadata nmtserve\.model\.n_encoder_layers\)"),
    "eos_that_is_the_padding": (lambda m: m["tokens"].update(eos=m["tokens"]["pad"]), r"tokens\.eos \d+ must differ from tokens\.pad and tokens\.bos"),
    "optional_file_entry_not_an_object": (lambda m: m["files"].update(target_vocab="x"), r"files\.target_vocab must be an object"),
    "tokenizer_files_unlike_the_kind": (lambda m: m["tokenizer"].update(kind="marian"), r"files\.source_spm is missing: a 'marian' bundle lists encoder, decoder_step, source_spm, target_spm, vocab"),
}


@pytest.mark.parametrize("case", list(MANIFEST_ERRORS))
def test_wrong_manifest_is_refused_with_the_reason(bundle_copy, case):
    edit, message = MANIFEST_ERRORS[case]
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle_copy)


def _as_written_before_the_graphs_recorded_the_model(bundle: Path) -> None:
    """Take the recorded model fields and special token ids out of the graphs' metadata (positions stay)."""
    for role in ("encoder", "decoder_step"):
        model = onnx.load(str(bundle / f"{role}.onnx"))
        kept = {p.key: p.value for p in model.metadata_props if p.key not in RECORDED_PROPERTIES}
        onnx.helper.set_model_props(model, kept)
        _replace_graph(bundle, role, model)


def test_the_graphs_record_the_manifests_fields_their_shapes_do_not_fix(tiny_bundle):
    manifest = read_bundle(tiny_bundle).manifest
    for name in ("encoder.onnx", "decoder_step.onnx"):
        recorded = {p.key: p.value for p in onnx.load(str(tiny_bundle / name)).metadata_props}
        assert {key: recorded.get(key) for key in RECORDED_PROPERTIES} == graph_properties(manifest)


def test_a_bundle_whose_graphs_record_no_model_fields_still_loads(bundle_copy):
    """As one exported before they did: read as a bundle whose graphs record no positions is."""
    _as_written_before_the_graphs_recorded_the_model(bundle_copy)
    read_bundle(bundle_copy)


def test_special_ids_unlike_the_tokenizer_are_refused_where_the_graphs_record_none(bundle_copy):
    """A bundle exported before the graphs recorded the ids: its manifest is still held to its tokenizer.json."""
    _as_written_before_the_graphs_recorded_the_model(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m["tokens"].update(eos=5))
    with pytest.raises(BundleError, match=r"manifest\.json: tokens\.eos is 5, but tokenizer\.json gives '<eos>' the id 2"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("change, message", [
    (lambda tokens: tokens[2].update(id=5), r"manifest\.json: tokens\.eos is 2, but tokenizer\.json gives '<eos>' the id 5"),
    (lambda tokens: tokens.pop(1), r"tokenizer\.json: has no special token '<bos>' \(manifest\.json's tokens\.bos\)"),
], ids=["another-id", "missing"])
def test_a_tokenizer_unlike_the_manifests_special_ids_is_refused(bundle_copy, change, message):
    tokenizer = json.loads((bundle_copy / "tokenizer.json").read_text())
    change(tokenizer["added_tokens"])
    _replace_file(bundle_copy, "tokenizer", json.dumps(tokenizer).encode())
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle_copy)


def _contents(bundle: Path) -> tuple[dict[str, bytes], dict]:
    """A bundle's files by role and its manifest as the exporter hands them to write_bundle."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = {role: (bundle / entry["path"]).read_bytes() for role, entry in manifest.pop("files").items()}
    del manifest["format"], manifest["format_version"]
    return files, manifest


def _left_beside(bundle: Path) -> list[str]:
    return sorted(path.name for path in bundle.parent.iterdir() if path.name.startswith(f".{bundle.name}."))


def test_a_bundle_written_over_an_earlier_one_replaces_it_whole(bundle_copy):
    files, manifest = _contents(bundle_copy)
    (bundle_copy / "stale.txt").write_text("from the earlier export")
    write_bundle(bundle_copy, files, {**manifest, "name": "the-new-one"})
    assert read_bundle(bundle_copy).manifest["name"] == "the-new-one"
    assert not (bundle_copy / "stale.txt").exists() and _left_beside(bundle_copy) == []


def test_a_bundle_that_fails_verification_leaves_the_earlier_one_as_it_was(bundle_copy):
    before = read_bundle(bundle_copy).sha256
    files, manifest = _contents(bundle_copy)
    model = onnx.load_model_from_string(files["decoder_step"])
    model.graph.input[0].name = "token_ids"
    with pytest.raises(BundleError, match="graph inputs are .*'token_ids'"):
        write_bundle(bundle_copy, {**files, "decoder_step": model.SerializeToString()}, manifest)
    assert read_bundle(bundle_copy).sha256 == before and _left_beside(bundle_copy) == []


@pytest.mark.parametrize("manifest_there", [None, '{"name": "my web app"}'], ids=["other-files", "another-manifest"])
def test_a_directory_that_is_not_a_bundle_is_never_replaced(bundle_copy, tmp_path, manifest_there):
    files, manifest = _contents(bundle_copy)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_text("weights")
    if manifest_there is not None:  # a manifest.json of something else: a web app's, a tool's
        (run / MANIFEST).write_text(manifest_there)
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        write_bundle(run, files, manifest)
    assert (run / "checkpoint.pt").read_text() == "weights"


def test_an_export_interrupted_between_its_renames_puts_the_earlier_bundle_back(bundle_copy, monkeypatch):
    before = read_bundle(bundle_copy).sha256
    files, manifest = _contents(bundle_copy)
    rename = Path.rename

    def interrupted(self: Path, target: Path) -> Path:
        if self.name.startswith(f".{bundle_copy.name}.new-"):  # the new bundle's move into place: Ctrl-C
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(bundle_copy, files, {**manifest, "name": "never-in-place"})
    assert read_bundle(bundle_copy).sha256 == before and _left_beside(bundle_copy) == []


def test_what_a_killed_export_left_is_cleared_and_its_earlier_bundle_put_back(bundle_copy):
    """A SIGKILL leaves the staged bundle beside its place, or, between the renames, the earlier one moved aside and
    none in place: the next write clears the first and puts the second back before its own work."""
    files, manifest = _contents(bundle_copy)
    before = read_bundle(bundle_copy).sha256
    staged = bundle_copy.with_name(f".{bundle_copy.name}.new-0123456789ab")
    staged.mkdir()
    (staged / "encoder.onnx").write_bytes(b"half written")
    bundle_copy.rename(bundle_copy.with_name(f".{bundle_copy.name}.earlier-0123456789ab"))
    with pytest.raises(BundleError):  # this write fails: what is in place is the bundle the killed one had replaced
        write_bundle(bundle_copy, {**files, "encoder": b"not a graph"}, manifest)
    assert read_bundle(bundle_copy).sha256 == before and _left_beside(bundle_copy) == []


def test_exports_into_one_folder_at_once_each_put_a_whole_bundle_in_place(bundle_copy):
    files, manifest = _contents(bundle_copy)
    names = [f"export-{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: write_bundle(bundle_copy, files, {**manifest, "name": name}), names))
    assert read_bundle(bundle_copy).manifest["name"] in names and _left_beside(bundle_copy) == []


def test_a_write_waits_while_another_holds_the_folders_lock(bundle_copy):
    """The lock is what keeps exports into one folder apart (the test above passes often enough without it): while
    another holds it, a write stages nothing and leaves the earlier bundle in place; once it is let go, the write ends."""
    files, manifest = _contents(bundle_copy)
    before = (bundle_copy / MANIFEST).read_bytes()
    folder = os.open(bundle_copy.parent, os.O_RDONLY)  # what write_bundle locks: the folder the bundle is in
    fcntl.flock(folder, fcntl.LOCK_EX)  # another export, writing into the same folder
    writer = threading.Thread(target=write_bundle, args=(bundle_copy, files, {**manifest, "name": "after-the-lock"}))
    try:
        writer.start()
        writer.join(1.0)
        assert writer.is_alive(), "the write went ahead while another held the folder's lock"
        assert _left_beside(bundle_copy) == [] and (bundle_copy / MANIFEST).read_bytes() == before
    finally:
        os.close(folder)  # and with it the lock
    writer.join(30)
    assert not writer.is_alive()
    assert read_bundle(bundle_copy).manifest["name"] == "after-the-lock" and _left_beside(bundle_copy) == []


def test_a_place_nothing_can_be_written_beside_is_refused_before_any_work(tmp_path):
    """destination() is what export asks first: an --out it could not write is refused then, not after the export."""
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(BundleError, match=r"a-file/bundle: cannot write beside it \(Not a directory\)"):
        destination(tmp_path / "a-file" / "bundle")
    assert destination(tmp_path / "new" / "bundle") == tmp_path / "new" / "bundle"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]  # nothing made: no folder, no probe left


def test_a_bundle_written_through_a_symlink_keeps_the_link(bundle_copy, tmp_path):
    files, manifest = _contents(bundle_copy)
    link = tmp_path / "current"
    link.symlink_to(bundle_copy)
    write_bundle(link, files, {**manifest, "name": "through-the-link"})
    assert link.is_symlink() and read_bundle(bundle_copy).manifest["name"] == "through-the-link"
