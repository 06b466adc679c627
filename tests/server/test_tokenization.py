"""The server's tokenizer: texts to ids and back on the caller's thread."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(sys.platform != "linux", reason="counts threads in /proc")
def test_encoding_and_decoding_start_no_threads(tiny_bundle, test_texts):
    # In a fresh process: a thread pool started earlier in the test session would hide one started here.
    code = (
        "import os\n"
        "from nmtserve_server.engine import Model\n"
        f"model = Model.from_path({str(tiny_bundle)!r})\n"
        "threads = len(os.listdir('/proc/self/task'))\n"
        f"ids = model.encode_texts({test_texts[:8]!r})\n"
        "texts = model.decode_ids(ids)\n"
        "assert len(texts) == 8 and all(texts), texts\n"
        "assert len(os.listdir('/proc/self/task')) == threads, 'tokenizing started threads'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_special_token_names_in_a_text_are_read_as_characters(tiny_bundle):
    """"<eos>" typed in a text used to become the eos id mid-source: the model read the sentence as ended there."""
    from nmtserve_server.engine import Model

    model = Model.from_path(tiny_bundle)
    text = "Pay <eos> on <pad> Friday <unk> <bos>"
    (ids,) = model.encode_texts([text])
    special = {model.tokens.pad, model.tokens.bos, model.tokens.eos, model.tokens.unk}
    assert ids[-1] == model.tokens.eos and not special & set(ids[:-1])
    assert model.decode_ids([ids[:-1]]) == [text]
