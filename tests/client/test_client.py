"""Every SDK method, blocking and asyncio, against a real server on loopback: results equal the raw API's."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from nmtserve.v1 import translator_pb2 as pb
from nmtserve_client import (
    AsyncClient, Client, HealthStatus, Hypothesis, InvalidInputError, Limits, ModelDimensions, ModelInfo, Piece, RequestCancelledError,
    Timings, Translation, Usage,
)

pytestmark = pytest.mark.e2e
TIMEOUT = 60
CANCELLED = "the stream was cancelled"  # what a read of a stream that cancel() ended says, in both clients


def _raw(stub, texts: list[str], **options) -> list[list[tuple[str, list[int], float]]]:
    """(text, tokens, score) of every hypothesis, straight from the generated stub."""
    request = pb.TranslateRequest(texts=texts, options=pb.TranslateOptions(return_scores=True, **options))
    response = stub.Translate(request, timeout=TIMEOUT)
    return [[(h.text, list(h.tokens), h.score) for h in t.hypotheses] for t in response.translations]


def _ours(translations: list[Translation]) -> list[list[tuple[str, list[int], float]]]:
    return [[(h.text, h.tokens, h.score) for h in t.hypotheses] for t in translations]


def test_translate_equals_the_raw_api(server, stub, test_texts):
    texts = test_texts[:6]
    with Client(server.address) as client:
        greedy = client.translate(texts, return_scores=True)
        beam = client.translate(texts, beam_size=4, num_hypotheses=3, length_penalty=0.6, return_scores=True, return_alignment=True)
        plain = client.translate(texts[:1])
    assert _ours(greedy) == _raw(stub, texts)
    assert _ours(beam) == _raw(stub, texts, beam_size=4, num_hypotheses=3, length_penalty=0.6)
    assert [t.text for t in greedy] == [h[0][0] for h in _raw(stub, texts)]
    assert all(len(t.hypotheses) == 3 and t.score == t.hypotheses[0].score for t in beam)
    for hypothesis in beam[0].hypotheses:
        assert hypothesis.alignment is not None and len(hypothesis.alignment) in (len(hypothesis.tokens), len(hypothesis.tokens) + 1)
        assert all(len(step) == len(beam[0].source_tokens) for step in hypothesis.alignment)
    assert plain[0].hypotheses[0].score is None and plain[0].hypotheses[0].alignment is None
    assert greedy[0].request_id and greedy[0].request_id == greedy[-1].request_id  # one request
    assert 0 <= greedy[0].timings.queue_seconds <= greedy[0].timings.total_seconds < TIMEOUT


def test_alignment_has_a_row_per_generated_token_and_one_for_end_of_sentence(server, test_texts):
    length = server.server.service.model.max_target_length
    with Client(server.address) as client:
        (ended,) = client.translate(test_texts[:1], return_alignment=True)
        (cut,) = client.translate(test_texts[:1], min_length=length, max_length=length, return_alignment=True)  # never ends
        final = list(client.translate_stream(test_texts[0], return_alignment=True))[-1].final
    assert len(ended.hypotheses[0].tokens) < length, "the translation did not end by itself"
    assert len(ended.hypotheses[0].alignment) == len(ended.hypotheses[0].tokens) + 1
    assert len(cut.hypotheses[0].alignment) == len(cut.hypotheses[0].tokens) == length
    assert len(final.hypotheses[0].alignment) == len(final.hypotheses[0].tokens) + 1  # the stream's too
    assert all(sum(row) == pytest.approx(1, abs=1e-4) and len(row) == len(ended.source_tokens) for row in ended.hypotheses[0].alignment)


def test_stream_yields_pieces_in_order_then_the_whole_result(server, stub, test_texts):
    text, length = test_texts[8], server.server.service.model.max_target_length
    # The longest decode: a reader on a busy machine, whose missed steps arrive as one piece, still sees it stream.
    with Client(server.address) as client:
        pieces = list(client.translate_stream(text, min_length=length, max_length=length, return_scores=True))
    *partial, last = pieces
    assert all(p.final is None for p in partial) and last.final is not None
    (expected,) = _raw(stub, [text], min_length=length, max_length=length)
    assert [t for p in partial for t in p.tokens] == expected[0][1] == last.final.hypotheses[0].tokens
    assert "".join(p.text for p in partial) == expected[0][0] == last.final.text
    assert last.final.score == pytest.approx(expected[0][2], abs=1e-5)
    assert sum(1 for p in partial if p.tokens) >= 2  # streamed as decoded


def test_model_info_and_health(server, tiny_bundle):
    with Client(server.address) as client:
        info = client.model_info()
        assert client.health() is HealthStatus.SERVING
        assert client.health("") is HealthStatus.SERVING
        assert client.health("no.such.Service") is HealthStatus.SERVICE_UNKNOWN
        client.wait_until_serving(timeout=5)
    model = server.server.service.model
    assert info.bundle_sha256 == model.bundle.sha256 and info.version == model.bundle.sha256[:12]
    assert info.limits.max_target_tokens == model.max_target_length
    assert info.limits.max_texts_per_request == server.server.settings.max_texts_per_request
    assert info.dimensions.d_model == model.bundle.dims.d_model and (info.device, info.precision) == ("cpu", "fp32")


def test_a_long_list_is_split_into_concurrent_requests_in_order(server, test_texts):
    texts = test_texts[:70]
    calls_before = server.metric("nmtserve_requests_total", {"method": "Translate", "code": "OK"})
    with Client(server.address, texts_per_request=8, max_concurrent_requests=3) as client:
        split = client.translate(texts)
        together = client.translate(texts[:64], timeout=TIMEOUT)
    # The server counts a call just after answering it: wait for the count rather than race it.
    server.wait_for(lambda: server.metric("nmtserve_requests_total", {"method": "Translate", "code": "OK"}) - calls_before == 9 + 8,
                    timeout=5, what="9 + 8 requests counted")
    assert [t.text for t in split[:64]] == [t.text for t in together]
    assert len(split) == 70 and len({t.request_id for t in split}) == 9
    assert [t.source_tokens for t in split] == [server.server.service.model.encode_texts([t])[0] for t in texts]
    with Client(server.address) as client:
        assert client.translate([]) == []
        for one_text in ("Friday", b"Friday"):
            with pytest.raises(TypeError, match=r"list of texts"):
                client.translate(one_text)
        with pytest.raises(TypeError, match=r"texts\[1\] must be a str, not bytes"):
            client.translate(["Friday", b"Friday"])
        with pytest.raises(TypeError, match=r"text must be a str, not NoneType"):
            client.translate_stream(None)


def test_a_request_id_is_what_the_server_logs_each_call_under(server, test_texts, caplog):
    caplog.set_level(logging.INFO, logger="nmtserve_server.service")
    texts = test_texts[:3]  # two requests, two texts a request: both logged under the call's id

    async def main() -> tuple[list[Translation], list[Piece]]:
        async with AsyncClient(server.address, texts_per_request=2) as client:
            await client.model_info(request_id="async-info-1")
            return (await client.translate(texts, request_id="async-translate-1"),
                    [piece async for piece in client.translate_stream(texts[0], request_id="async-stream-1")])

    with Client(server.address, texts_per_request=2) as client:
        translations = client.translate(texts, request_id="sync-translate-1")
        pieces = list(client.translate_stream(texts[0], request_id="sync-stream-1"))
        client.model_info(request_id="sync-info-1")
        with pytest.raises(InvalidInputError) as refused:  # the server would log it under an id of its own
            client.translate(texts, request_id="two words")
        assert refused.value.field == "request_id" and refused.value.code is None
        with pytest.raises(TypeError, match="request_id must be a str, not int"):
            client.model_info(request_id=1)
    async_translations, async_pieces = asyncio.run(main())
    assert {t.request_id for t in translations} == {"sync-translate-1"} and pieces[-1].final.request_id == "sync-stream-1"
    assert {t.request_id for t in async_translations} == {"async-translate-1"} and async_pieces[-1].final.request_id == "async-stream-1"
    logged = [("Translate", "sync-translate-1")] * 2 + [("TranslateStream", "sync-stream-1"), ("GetModelInfo", "sync-info-1"),
              ("GetModelInfo", "async-info-1")] + [("Translate", "async-translate-1")] * 2 + [("TranslateStream", "async-stream-1")]

    def lines() -> list[tuple[str, str]]:  # of these calls: the server is shared
        found = (re.match(r"event=rpc method=(\w+) request_id=(\S+) code=OK ", r.getMessage()) for r in caplog.records)
        return sorted(m.groups() for m in found if m and m[2] in {request_id for _, request_id in logged})

    server.wait_for(lambda: lines() == sorted(logged), timeout=5, what="one log line for each request, under its call's id")


@pytest.fixture(scope="module")
def three_calls_server(start_server):
    """A server that refuses, and counts, any Translate call beyond three in flight at once."""
    return start_server(max_concurrent_rpcs=3)


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_split_list_keeps_at_most_max_concurrent_requests_in_flight(three_calls_server, test_texts, kind):
    """70 texts, 8 a request, 3 requests at a time: with the decode process paused, the server holds exactly 3 calls
    (24 texts), and never has to refuse a fourth; resumed, all 9 requests answer, in order."""
    server, texts = three_calls_server, test_texts[:70]
    with Client(server.address) as client:
        expected = client.translate(texts)
    ok, refused = ({"method": "Translate", "code": code} for code in ("OK", "RESOURCE_EXHAUSTED"))
    ok_before, refused_before = server.metric("nmtserve_requests_total", ok), server.metric("nmtserve_requests_total", refused)
    bound = dict(texts_per_request=8, max_concurrent_requests=3, timeout=TIMEOUT)

    def blocking() -> list[Translation]:
        with Client(server.address, **bound) as client:
            return client.translate(texts)

    async def asynchronous() -> list[Translation]:
        async with AsyncClient(server.address, **bound) as client:
            return await client.translate(texts)

    with ThreadPoolExecutor(1) as thread:
        with server.paused():  # no request can finish, so none makes room for another
            translating = thread.submit(blocking if kind == "blocking" else lambda: asyncio.run(asynchronous()))
            service = server.server.service
            # A short request's call is counted, its texts read and sent to the decode process in one turn of the event loop.
            server.wait_for(lambda: service.in_flight == 3, timeout=TIMEOUT, what="three requests of 8 texts in the server")
            assert not translating.done()
            assert server.metric("nmtserve_requests_total", refused) == refused_before, "a fourth call was sent"
        translations = translating.result(TIMEOUT)
    server.wait_for(lambda: server.metric("nmtserve_requests_total", ok) - ok_before == 9, timeout=5, what="9 requests counted")
    # A fourth call at any time while three were in flight would have been refused (and counted) by this server.
    assert server.metric("nmtserve_requests_total", refused) == refused_before, "more than 3 requests were in flight"
    assert [t.text for t in translations] == [t.text for t in expected]
    assert [t.source_tokens for t in translations] == [t.source_tokens for t in expected]
    ids = [t.request_id for t in translations]
    assert len(set(ids)) == 9 and all(ids[i] == ids[i - i % 8] for i in range(70))  # 8 consecutive texts a request


def test_a_stream_ended_by_cancel_says_so(server, test_texts):
    with Client(server.address) as client:
        with client.translate_stream(test_texts[1], min_length=server.long_options().min_length) as stream:
            assert next(stream).tokens
            stream.cancel()
            with pytest.raises(RequestCancelledError, match=CANCELLED):  # the SDK's words, as the asyncio client's
                next(stream)
        assert client.translate(test_texts[:1])  # the client goes on


def test_async_client_has_the_same_methods_and_results(server, test_texts):
    texts = test_texts[:20]

    async def main():
        async with AsyncClient(server.address, texts_per_request=6, max_concurrent_requests=2) as client:
            translations = await client.translate(texts, beam_size=2, num_hypotheses=2, return_scores=True)
            pieces = [piece async for piece in client.translate_stream(texts[0])]
            await client.wait_until_serving(timeout=5)
            async with client.translate_stream(texts[1], min_length=server.long_options().min_length) as stream:
                assert (await anext(stream)).tokens
                stream.cancel()
                with pytest.raises(RequestCancelledError, match=CANCELLED):  # as the sync client: the task was not cancelled
                    await anext(stream)
            async with client.translate_stream(texts[2], min_length=server.long_options().min_length) as stream:
                assert (await anext(stream)).tokens
                reading = asyncio.create_task(anext(stream))
                await asyncio.sleep(0)  # the task is now waiting for the next piece
                reading.cancel()
                with pytest.raises(asyncio.CancelledError):  # a cancelled task stays cancelled
                    await reading
                with pytest.raises(RequestCancelledError, match=CANCELLED):  # and its read cancelled the stream
                    await anext(stream)
            return translations, pieces, await client.model_info(), await client.health()

    with Client(server.address) as client:
        expected = client.translate(texts, beam_size=2, num_hypotheses=2, return_scores=True)
        expected_pieces = list(client.translate_stream(texts[0]))
        expected_info = client.model_info()
    translations, pieces, info, health = asyncio.run(main())
    assert [[h[:2] for h in t] for t in _ours(translations)] == [[h[:2] for h in t] for t in _ours(expected)]
    scores = [h.score for t in translations for h in t.hypotheses]
    assert scores == pytest.approx([h.score for t in expected for h in t.hypotheses], abs=1e-5)  # batched differently
    assert len({t.request_id for t in translations}) == 4
    # A reader that falls behind gets the steps it missed as one piece: compare what the pieces add up to.
    assert "".join(p.text for p in pieces) == "".join(p.text for p in expected_pieces)
    assert [t for p in pieces for t in p.tokens] == [t for p in expected_pieces for t in p.tokens]
    assert pieces[-1].final.hypotheses == expected_pieces[-1].final.hypotheses
    assert info == expected_info and health is HealthStatus.SERVING


def test_leaving_a_stream_early_cancels_it_on_the_server(start_server, test_texts):
    server = start_server(max_batch_size=8)
    with Client(server.address) as client:
        cancelled = {"method": "TranslateStream", "code": "CANCELLED"}
        with server.paused_mid_decode(  # the stream is left mid-decode, however fast the rest would run
            lambda: client.translate_stream(test_texts[0], min_length=server.long_options().min_length),
            lambda: server.metric("nmtserve_active_sequences") == 1, "the text in the batch",
        ) as stream:
            with stream:
                assert next(stream).tokens
            server.wait_for(lambda: server.metric("nmtserve_requests_total", cancelled) == 1, timeout=5, what="the call counted as cancelled")
        server.wait_for(lambda: server.metric("nmtserve_active_sequences") == 0, timeout=10, what="the stream's row freed")


def test_the_sdk_types_cover_every_field_of_the_api():
    for ours, message in [(Hypothesis, pb.Hypothesis), (Timings, pb.Timings), (Usage, pb.Usage), (ModelInfo, pb.ModelInfo),
                          (ModelDimensions, pb.ModelDimensions), (Limits, pb.Limits)]:
        assert {f.name for f in dataclasses.fields(ours)} == {f.name for f in message.DESCRIPTOR.fields}, ours.__name__
    # A Translation is one text's: its own fields, and those of the response (or stream's end) it came in.
    translation = {f.name for f in dataclasses.fields(Translation)}
    assert translation == {f.name for f in pb.Translation.DESCRIPTOR.fields} | {f.name for f in pb.TranslateResponse.DESCRIPTOR.fields} - {"translations"}
    assert translation == {f.name for f in pb.TranslationFinal.DESCRIPTOR.fields} - {"hypothesis"} | {"hypotheses"}


def test_usage_counts_the_tokens_of_the_request(server, test_texts):
    with Client(server.address) as client:
        translations = client.translate(test_texts[:3], beam_size=2, num_hypotheses=2)
        (usage,) = {t.usage for t in translations}  # one request
        assert usage.input_tokens == sum(len(t.source_tokens) for t in translations)
        assert usage.output_tokens == sum(len(h.tokens) for t in translations for h in t.hypotheses)
        final = list(client.translate_stream(test_texts[0]))[-1].final
        assert final.usage == Usage(len(final.source_tokens), len(final.hypotheses[0].tokens))


def test_public_api_is_documented():
    import nmtserve_client

    for name in nmtserve_client.__all__:
        item = getattr(nmtserve_client, name)
        assert item.__doc__ and item.__doc__.strip(), name
        for attribute, member in vars(item).items():
            if callable(member) and not attribute.startswith("_"):
                assert member.__doc__, f"{name}.{attribute}"
    for option in ("beam_size:", "max_length:", "num_hypotheses:", "return_scores:", "return_alignment:", "timeout:", "request_id:"):
        assert option in Client.translate.__doc__ and option in AsyncClient.translate.__doc__
