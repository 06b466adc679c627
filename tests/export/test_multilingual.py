"""A multilingual model: trained for two target languages at once, each asked for by its token, exported and served."""

from __future__ import annotations

import grpc
import sacrebleu

from nmtserve.bundle import read_bundle
from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_export.checkpoint import read_metadata
from nmtserve_export.evaluate import evaluate, held_out_pairs
from nmtserve_export.onnx_export import export_bundle
from nmtserve_export.plots import plot_all

TIMEOUT = 60


def test_a_multilingual_model_translates_into_the_language_it_is_asked_for(multilingual_run, start_server, tmp_path):
    bundle = export_bundle(multilingual_run, tmp_path / "bundle")
    manifest = read_bundle(bundle).manifest
    assert manifest["languages"] == {"source": "en", "target": ["de", "fr"], "target_tokens": {"de": "<2de>", "fr": "<2fr>"}}
    assert manifest["name"] == "nmtserve-en-de-fr"
    test_pairs = held_out_pairs(read_metadata(multilingual_run))
    server = start_server(bundle=bundle)
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        assert list(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT).target_languages) == ["de", "fr"]

        def translate(texts: list[str], language: str = "") -> list[str]:
            request = pb.TranslateRequest(texts=texts, options=pb.TranslateOptions(target_language=language))
            return [t.hypotheses[0].text for t in stub.Translate(request, timeout=TIMEOUT).translations]

        for language, other in (("de", "fr"), ("fr", "de")):
            pairs = [p for p in test_pairs if p.language == language][:60]
            sources, references = [p.source for p in pairs], [[p.target for p in pairs]]
            asked = sacrebleu.corpus_chrf(translate(sources, language), references).score
            misdirected = sacrebleu.corpus_chrf(translate(sources, other), references).score
            # The token steers the output: what was asked for is far nearer its language's references than the other.
            assert asked > misdirected + 15, (language, asked, misdirected)
        assert translate(sources) == translate(sources, "de")  # the first language is the default
        # A text that begins with a language's token, typed, is translated into that language unless the options say.
        assert translate([f"<2fr> {s}" for s in sources]) == translate(sources, "fr")
        assert translate([f"<2fr> {s}" for s in sources], "de") == translate(sources, "de")
    # Scored per language, in PyTorch and through the bundle.
    for results in (evaluate(multilingual_run, beam_sizes=(1,), limit=100),
                    evaluate(multilingual_run, beam_sizes=(1,), limit=100, bundle=bundle)):
        assert set(results["greedy"]["by_language"]) == {"de", "fr"}
    assert len(plot_all(multilingual_run)) == 4
