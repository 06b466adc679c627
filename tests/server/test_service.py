"""Every RPC end to end on a real server (loopback, tiny bundle): results equal the in-process engine's."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from nmtserve.bundle import read_bundle
from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_server.engine import translate
from nmtserve_server.search import DecodeOptions

pytestmark = pytest.mark.e2e
TIMEOUT = 30  # seconds, per call


@pytest.fixture(scope="module")
def engine(server):
    """A second engine on the same bundle: the in-process reference."""
    from nmtserve_server.engine import Engine

    return Engine.from_path(server.server.settings.bundle, device="cpu", capacity=64)


def reference(engine, texts: list[str], options: DecodeOptions):
    return translate(engine, engine.encode_texts(texts), options)


def test_model_info_describes_the_bundle(stub, server, tiny_bundle):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
    bundle = read_bundle(tiny_bundle)
    assert info.name == bundle.manifest["name"]
    assert info.bundle_sha256 == bundle.sha256 and info.version == bundle.sha256[:12]
    assert (info.device, info.precision) == ("cpu", "fp32")
    assert info.source_language == bundle.manifest["languages"]["source"]
    assert list(info.target_languages) == bundle.manifest["languages"]["target"]
    assert info.dimensions.d_model == bundle.dims.d_model and info.dimensions.vocab_size == bundle.dims.vocab_size
    settings = server.server.settings
    assert info.limits.max_source_tokens == bundle.max_source_length
    assert info.limits.max_target_tokens == bundle.max_target_length
    assert (info.limits.max_batch_size, info.limits.max_queue_size) == (settings.max_batch_size, settings.max_queue_size)
    assert info.server_version


def test_translate_greedy_equals_the_engine(stub, engine, test_texts):
    texts = test_texts[:5]
    response, call = stub.Translate.with_call(
        pb.TranslateRequest(texts=texts), timeout=TIMEOUT, metadata=(("x-request-id", "test-greedy-1"),)
    )
    expected = reference(engine, texts, DecodeOptions(max_length=engine.max_target_length))  # the server's default
    assert [list(t.hypotheses[0].tokens) for t in response.translations] == [h[0].tokens for h in expected]
    assert [t.hypotheses[0].text for t in response.translations] == engine.decode_ids([h[0].tokens for h in expected])
    assert all(not t.hypotheses[0].HasField("score") and not t.hypotheses[0].alignment for t in response.translations)
    assert response.request_id == "test-greedy-1"
    assert response.usage.input_tokens == sum(len(s) for s in engine.encode_texts(texts))
    assert response.usage.output_tokens == sum(len(h[0].tokens) for h in expected)
    timings = response.timings
    assert 0 < timings.encode_seconds < timings.first_token_seconds <= timings.total_seconds < TIMEOUT
    assert 0 <= timings.queue_seconds <= timings.total_seconds


def test_translate_n_best_scores_and_alignment(stub, engine, test_texts):
    texts = test_texts[5:8]
    options = pb.TranslateOptions(beam_size=4, num_hypotheses=3, length_penalty=0.6, return_scores=True, return_alignment=True)
    response = stub.Translate(pb.TranslateRequest(texts=texts, options=options), timeout=TIMEOUT)
    expected = reference(engine, texts, DecodeOptions(beam_size=4, num_hypotheses=3, length_penalty=0.6, return_alignment=True,
                                                      max_length=engine.max_target_length))
    assert response.request_id  # made up by the server when the client sends none
    for translation, hypotheses, source in zip(response.translations, expected, engine.encode_texts(texts)):
        assert list(translation.source_tokens) == source
        assert [list(h.tokens) for h in translation.hypotheses] == [h.tokens for h in hypotheses]
        np.testing.assert_allclose([h.score for h in translation.hypotheses], [h.score for h in hypotheses], atol=1e-4)
        scores = [h.score for h in translation.hypotheses]
        assert scores == sorted(scores, reverse=True)
        for hypothesis, reference_hypothesis in zip(translation.hypotheses, hypotheses):
            alignment = np.array([step.weights for step in hypothesis.alignment])
            np.testing.assert_allclose(alignment, reference_hypothesis.alignment, atol=1e-5)  # each its own hypothesis's


def test_translate_stream_pieces_add_up_to_the_final_hypothesis(stub, engine, test_texts):
    text, length = test_texts[8], engine.max_target_length  # the longest decode: a reader on a busy machine still sees it stream
    options = pb.TranslateOptions(return_scores=True, min_length=length, max_length=length)
    messages = list(stub.TranslateStream(pb.TranslateStreamRequest(text=text, options=options), timeout=TIMEOUT))
    assert [m.WhichOneof("event") for m in messages[:-1]] == ["piece"] * (len(messages) - 1)
    final = messages[-1].final
    expected = reference(engine, [text], DecodeOptions(min_length=length, max_length=length))[0][0]
    assert list(final.hypothesis.tokens) == expected.tokens
    assert final.hypothesis.text == engine.decode_ids([expected.tokens])[0]
    assert final.hypothesis.score == pytest.approx(expected.score, abs=1e-4)
    assert [t for m in messages[:-1] for t in m.piece.tokens] == expected.tokens
    assert "".join(m.piece.text for m in messages[:-1]) == final.hypothesis.text
    assert len([m for m in messages[:-1] if m.piece.tokens]) >= 2  # streamed as decoded, not all at the end
    assert final.usage.output_tokens == len(expected.tokens)
    assert list(final.source_tokens) == engine.encode_texts([text])[0]
    assert final.timings.first_token_seconds <= final.timings.total_seconds


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nmtserve.v1.Translator"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
    names = {s.name for s in answer.list_services_response.service}
    assert {"nmtserve.v1.Translator", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def _bad_request(call) -> list[str]:
    """Fields of the BadRequest detail of an INVALID_ARGUMENT error."""
    status = rpc_status.from_call(call)
    assert status is not None, "no rich status"
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]


INVALID = [
    ("no texts", pb.TranslateRequest(), "texts"),
    ("empty text", pb.TranslateRequest(texts=["Friday", " "]), "texts[1]"),
    ("white space only", pb.TranslateRequest(texts=["Friday", "\xa0\u202f\r\n"]), "texts[1]"),  # nothing left once normalized
    ("invisible text", pb.TranslateRequest(texts=["Friday", "\u200b\ufeff\x00 \t"]), "texts[1]"),  # zero-width, BOM, NUL
    ("filler text", pb.TranslateRequest(texts=["Friday", "\u3164\u2800\u0301"]), "texts[1]"),  # Hangul filler, blank braille, a lone mark
    ("too many texts", pb.TranslateRequest(texts=["Friday"] * 65), "texts"),
    ("source too long", pb.TranslateRequest(texts=["Friday " * 300]), "texts[0]"),  # tokenized, then refused
    ("too long to tokenize", pb.TranslateRequest(texts=["Friday " * 600]), "texts[0]"),  # refused by its characters
    ("beam too wide", pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(beam_size=9)), "options.beam_size"),
    ("n-best above beam", pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(beam_size=2, num_hypotheses=3)), "options.num_hypotheses"),
    ("min above max", pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(min_length=10, max_length=5)), "options.min_length"),
    ("max above the model's", pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(max_length=100_000)), "options.max_length"),
    ("length penalty", pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(length_penalty=-1)), "options.length_penalty"),
    ("length penalty nan", pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(length_penalty=float("nan"))), "options.length_penalty"),
    ("unknown language", pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(target_language="xx")), "options.target_language"),
]


@pytest.mark.parametrize("request_, field", [(r, f) for _, r, f in INVALID], ids=[name for name, _, _ in INVALID])
def test_invalid_requests_name_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Translate(request_, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    assert field in _bad_request(caught.value)
    if field == "texts[0]":  # two limits name the same field: each says which it is
        assert ("characters" in caught.value.details()) == (len(request_.texts[0]) > 16 * 256), caught.value.details()


def test_the_character_limit_counts_a_text_as_it_is_read(stub):
    """Runs of white space count as the one space the model reads: padding is no reason to refuse a short text."""
    padded = "Friday" + " " * 5000 + "May 2003"
    (translation,) = stub.Translate(pb.TranslateRequest(texts=[padded]), timeout=TIMEOUT).translations
    (alone,) = stub.Translate(pb.TranslateRequest(texts=["Friday May 2003"]), timeout=TIMEOUT).translations
    assert translation.hypotheses[0].text == alone.hypotheses[0].text


def test_oversized_requests_are_refused_before_tokenizing_and_in_a_small_error(stub):
    """Too many texts: nothing is tokenized, one violation. Many bad texts: ten listed and a count. A long bad value:
    repeated cut short. Each keeps the error's trailers small enough to reach the client."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.Translate(pb.TranslateRequest(texts=[""] * 1000), timeout=TIMEOUT)
    assert _bad_request(caught.value) == ["texts"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Translate(pb.TranslateRequest(texts=["Friday"] + [""] * 20), timeout=TIMEOUT)
    assert _bad_request(caught.value) == [f"texts[{i}]" for i in range(1, 11)] + ["request"]
    assert caught.value.details().endswith("request: 10 more violations not listed")
    language = "x" * 10_000
    with pytest.raises(grpc.RpcError) as caught:
        stub.Translate(pb.TranslateRequest(texts=["Friday"], options=pb.TranslateOptions(target_language=language)), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(caught.value.details()) < 200


def test_an_answer_above_the_message_limit_is_refused_by_name(start_server, test_texts):
    server = start_server(max_message_bytes=512)
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        # Known only once decoded: texts of the longest output, their tokens and text alone above 512 bytes (one, about 900).
        for call, field, advice in (
            (lambda: stub.Translate(pb.TranslateRequest(texts=test_texts[:4], options=server.long_options()), timeout=TIMEOUT),
             "texts", "fewer texts or hypotheses"),
            (lambda: list(stub.TranslateStream(pb.TranslateStreamRequest(text=test_texts[0], options=server.long_options()),
                                               timeout=TIMEOUT)), "text", "a shorter text"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _bad_request(caught.value) == [field]
            assert re.search(rf"the answer would be \d+ bytes, above the 512 the server sends \(--max-message-bytes\): "
                             rf"ask for {advice}, a smaller max_length$", caught.value.details())
        assert stub.Translate(pb.TranslateRequest(texts=test_texts[:1], options=pb.TranslateOptions(max_length=8)),
                              timeout=TIMEOUT).translations  # still serving


def test_alignments_sure_to_exceed_the_message_limit_are_refused_before_decoding(start_server, test_texts):
    """min_length fixes the least the alignments take: beyond the limit, the request never takes rows and memory."""
    # Below the 2 KB of weights the shortest text (a word and <eos>) takes over 256 tokens: every text's are above it.
    server = start_server(max_message_bytes=2000)
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        encoder_runs = server.metric("nmtserve_encoder_duration_seconds_count")
        for call in (lambda r: stub.Translate(pb.TranslateRequest(texts=test_texts[:4], options=r), timeout=TIMEOUT),
                     lambda r: list(stub.TranslateStream(pb.TranslateStreamRequest(text=test_texts[0], options=r), timeout=TIMEOUT))):
            with pytest.raises(grpc.RpcError) as caught:
                call(server.long_options(return_alignment=True))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _bad_request(caught.value) == ["options.return_alignment"]
            assert "the alignments alone would be at least" in caught.value.details()
        assert server.metric("nmtserve_encoder_duration_seconds_count") == encoder_runs  # nothing was decoded
        # Where the shortest output fits, the text is decoded and its alignment returned.
        options = pb.TranslateOptions(max_length=8, return_alignment=True)
        (translation,) = stub.Translate(pb.TranslateRequest(texts=test_texts[:1], options=options), timeout=TIMEOUT).translations
        assert translation.hypotheses[0].alignment


def test_stream_validation(stub):
    bad = pb.TranslateStreamRequest(text="Friday", options=pb.TranslateOptions(beam_size=2))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.TranslateStream(bad, timeout=TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request(caught.value) == ["options.beam_size"]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.TranslateStream(pb.TranslateStreamRequest(text=""), timeout=TIMEOUT))
    assert _bad_request(caught.value) == ["text"]


@pytest.mark.parametrize("data, reason", [
    (b"\x0a\x02\xff\xfe", "String field had bad UTF-8"),  # field 1 (texts) = b"\xff\xfe"
    (b"\x0a\x05ab", "Wire format was corrupt"),  # a text of 5 bytes cut short after 2
], ids=["not-utf8", "truncated"])
def test_a_malformed_request_is_invalid_argument_and_says_why(channel, data, reason):
    translate = channel.unary_unary("/nmtserve.v1.Translator/Translate")  # raw bytes, as no well-behaved client sends
    with pytest.raises(grpc.RpcError) as caught:
        translate(data, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"request: not a valid Translate request: {reason}"


def test_message_size_is_limited(start_server):
    small = start_server(max_message_bytes=1024)
    with grpc.insecure_channel(small.address) as channel:
        translate = channel.unary_unary("/nmtserve.v1.Translator/Translate")
        with pytest.raises(grpc.RpcError) as caught:
            translate(pb.TranslateRequest(texts=["Friday " * 400]).SerializeToString(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_long_request_is_tokenized_without_holding_up_other_calls(start_server):
    """Texts at the character limit are tokenized before they are refused as too many tokens: 256 of them took the
    event loop for most of a second, every other call waiting."""
    server = start_server(max_texts_per_request=256)
    request = pb.TranslateRequest(texts=[("Friday, May 16, 2003. " * 200)[:4096]] * 256)
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
        pool = ThreadPoolExecutor(1)
        refused = pool.submit(lambda: [stub.Translate.with_call(request, timeout=TIMEOUT) for _ in range(2)])
        latencies = []
        while not refused.done() and len(latencies) < 2000:
            started = time.monotonic()
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
            latencies.append(time.monotonic() - started)
        with pytest.raises(grpc.RpcError) as error:
            refused.result()
        pool.shutdown()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens, the model reads at most" in error.value.details()
    assert len(latencies) > 5 and max(latencies) < 0.25, f"other calls waited up to {max(latencies):.3f} s"
