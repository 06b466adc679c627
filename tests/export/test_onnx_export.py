"""The ONNX export's checks against PyTorch: a converted bundle records its own difference, a broken model is refused."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from nmtserve.bundle import read_bundle
from nmtserve_export.checkpoint import load_model
from nmtserve_export.onnx_export import (
    DecoderStepGraph, EncoderGraph, ExportError, check_parity, export_graph, max_graph_difference, not_exported_from, parity_inputs,
    write_model_bundle,
)

pytestmark = pytest.mark.e2e


def test_an_int8_bundle_records_the_difference_of_its_own_graphs(tiny_bundle, tiny_bundle_int8):
    fp32 = read_bundle(tiny_bundle).manifest["training"]["onnx_max_difference"]
    int8 = read_bundle(tiny_bundle_int8).manifest["training"]["onnx_max_difference"]
    assert fp32 < 1e-4 and math.isfinite(int8) and int8 > 10 * fp32  # quantized weights: measured, not the fp32 figure


def test_the_bundle_says_where_its_model_was_trained(tiny_run, tiny_bundle):
    trained_on = read_bundle(tiny_bundle).manifest["training"]["device"]
    assert trained_on == json.loads((tiny_run / "config.json").read_text())["training"]["device"]
    assert trained_on == ("cpu" if not torch.cuda.is_available() else f"cuda ({torch.cuda.get_device_name()})")


def test_a_bundle_is_known_for_its_checkpoints_by_the_save_it_was_exported_from(tiny_run, tiny_bundle):
    manifest = read_bundle(tiny_bundle).manifest
    metadata = json.loads((tiny_run / "config.json").read_text())
    assert manifest["training"]["checkpoint_save"] == metadata["save"]
    assert not_exported_from(manifest, tiny_run, metadata) is None
    later = {**metadata, "save": "later", "training": {**metadata["training"], "steps": 800}}  # the run resumed since
    assert not_exported_from(manifest, tiny_run, later) == (
        f"its weights are of another save (save {metadata['save']}, step 400; the checkpoint's is save later, step 800)")
    # A bundle from before the save was recorded: by what its training recorded.
    older = {**manifest, "training": {k: v for k, v in manifest["training"].items() if k != "checkpoint_save"}}
    assert not_exported_from(older, tiny_run, metadata) is None
    assert not_exported_from(older, tiny_run, later) == "its model was trained for 400 steps, the checkpoint's for 800"
    other = {**manifest, "files": {**manifest["files"], "tokenizer": {**manifest["files"]["tokenizer"], "sha256": "0" * 64}}}
    assert not_exported_from(other, tiny_run, metadata).startswith("its tokenizer.json is another (sha256 000000000000…, ")


def test_a_model_whose_outputs_are_not_numbers_is_refused(tiny_run, tmp_path):
    model, _, _ = load_model(tiny_run)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # as a diverged training leaves it
    with pytest.raises(ExportError, match="differ by nan"):
        write_model_bundle(model, tmp_path / "bundle", tokenizer_kind="tokenizers", tokenizer_files={},
                           languages={"source": "en", "target": ["de"]}, name="broken", training={})
    assert not (tmp_path / "bundle").exists()


def test_graphs_further_than_1e_4_from_the_model_are_refused(tiny_run, tiny_bundle):
    """The gate of export's "check parity" stage, on outputs that are numbers: the tiny bundle's graphs against its own
    model, then against it with the bias of the last layer's encoder-decoder values moved, which moves that layer's
    memory values (an output of the encoder graph) by as much."""
    model, _, _ = load_model(tiny_run)
    bundle = read_bundle(tiny_bundle)
    graphs = {role: bundle.files[role] for role in ("encoder", "decoder_step")}
    torch.manual_seed(0)
    checks = parity_inputs(model)
    assert check_parity(model, graphs, checks) < 1e-5
    bias = model.decoder_layers[-1].src_attn.w_v.bias
    with torch.no_grad():
        bias += 5e-5  # within the tolerance: passed, and measured
    assert check_parity(model, graphs, checks) == pytest.approx(5e-5, abs=1e-5)
    with torch.no_grad():
        bias += 1e-3 - 5e-5  # ten times the tolerance
    with pytest.raises(ExportError, match=r"^the ONNX graphs and PyTorch differ by \S+ \(> 1e-4\)$") as refused:
        check_parity(model, graphs, checks)
    assert float(re.search(r"differ by (\S+) ", str(refused.value))[1]) == pytest.approx(1e-3, rel=0.05)


class _PositionsOfTheCache(DecoderStepGraph):
    """A step that numbers every row's new token by the cache axis's length instead of the row's own: right only
    where every row fills the cache, which the engine's batches never do."""

    def forward(self, tokens, positions, past_mask, source_mask, *caches):
        return super().forward(tokens, torch.full_like(positions, past_mask.shape[1]), past_mask, source_mask, *caches)


def test_the_parity_check_catches_a_step_that_misplaces_rows_of_different_lengths(tiny_run):
    model, _, _ = load_model(tiny_run)
    torch.manual_seed(0)
    checks = parity_inputs(model)
    graphs = {
        "encoder": export_graph(EncoderGraph(model), "encoder", checks[0]["encoder"]),
        "decoder_step": export_graph(_PositionsOfTheCache(model), "decoder_step", checks[0]["decoder_step"]),
    }
    assert max_graph_difference(model, graphs, checks) > 1e-2
    graphs["decoder_step"] = export_graph(DecoderStepGraph(model), "decoder_step", checks[0]["decoder_step"])
    assert max_graph_difference(model, graphs, checks) < 1e-4

