"""The bundle reader refuses anything it cannot verify, naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from nmtserve.bundle import MANIFEST, BundleError, read_bundle, sha256_bytes


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


def test_graphs_pass_the_full_onnx_checker(tiny_bundle):
    for name in ("encoder.onnx", "decoder_step.onnx"):
        onnx.checker.check_model(onnx.load(str(tiny_bundle / name)), full_check=True)


def test_changed_byte_is_refused(bundle_copy):
    path = bundle_copy / "decoder_step.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder_step\.onnx: sha256 .* does not match"):
        read_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: listed in manifest\.json but missing"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("path", ["../encoder.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_path_escaping_the_bundle_is_refused(bundle_copy, path):
    edit_manifest(bundle_copy, lambda m: m["files"]["encoder"].update(path=path))
    with pytest.raises(BundleError, match="must be relative and stay inside the bundle"):
        read_bundle(bundle_copy)


def test_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle_copy / "encoder.onnx", outside)
    (bundle_copy / "encoder.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(bundle_copy)


def test_graph_with_renamed_input_is_refused(bundle_copy):
    path = bundle_copy / "decoder_step.onnx"
    model = onnx.load(str(path))
    model.graph.input[0].name = "token_ids"
    for node in model.graph.node:
        node.input[:] = ["token_ids" if name == "tokens" else name for name in node.input]
    path.write_bytes(model.SerializeToString())
    edit_manifest(bundle_copy, lambda m: m["files"]["decoder_step"].update(sha256=sha256_bytes(path.read_bytes())))
    with pytest.raises(BundleError, match="graph inputs are .*'token_ids'.* promises"):
        read_bundle(bundle_copy)


def test_external_data_reference_is_refused(bundle_copy):
    path = bundle_copy / "encoder.onnx"
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.raw_data = b""
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../secrets.bin"
    path.write_bytes(model.SerializeToString())
    edit_manifest(bundle_copy, lambda m: m["files"]["encoder"].update(sha256=sha256_bytes(path.read_bytes())))
    with pytest.raises(BundleError, match="external data .* must be relative and stay inside"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("where", ["constant node", "subgraph initializer"])
def test_external_data_hidden_in_a_node_or_subgraph_is_refused(bundle_copy, where):
    # ONNX Runtime would read such data relative to the server's working directory, unverified.
    path = bundle_copy / "encoder.onnx"
    model = onnx.load(str(path))
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
    path.write_bytes(model.SerializeToString())
    edit_manifest(bundle_copy, lambda m: m["files"]["encoder"].update(sha256=sha256_bytes(path.read_bytes())))
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
    "no_target_language": (lambda m: m.update(languages={}), r"languages must have a 'source' string and a non-empty 'target'"),
    "target_language_twice": (lambda m: m["languages"].update(target=["de", "de"]), r"languages\.target lists a language twice"),
    "several_targets_without_their_tokens": (lambda m: m["languages"].update(target=["de", "fr"]),
                                             r"languages\.target_tokens is required with several target languages \(de, fr\)"),
    "target_tokens_unlike_the_targets": (lambda m: m["languages"].update(target=["de", "fr"], target_tokens={"de": "<2de>"}),
                                         r"languages\.target_tokens must map each target language, and no other, to a token"),
    "length_beyond_any_model": (lambda m: m["limits"].update(max_source_length=10**12), r"limits\.max_source_length is 1000000000000, above any model's \(65536\)"),
    "layers_beyond_any_model": (lambda m: m["model"].update(n_decoder_layers=300_000), r"model\.n_decoder_layers is 300000, above any model's"),
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
