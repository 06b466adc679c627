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


def test_target_language_tokens_come_from_the_manifest(tiny_bundle, tmp_path):
    """A bundle with several target languages names the source token that asks for each; the tokenizer must know it."""
    import json
    import shutil

    from nmtserve.bundle import MANIFEST, BundleError
    from nmtserve_server.engine import Model

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    vocab = Model.from_path(bundle).tokenizer.get_vocab()
    first, second = sorted(token for token in vocab if token.isalpha())[:2]  # two ordinary entries stand in for <2xx> tokens

    def languages(target_tokens: dict[str, str]) -> None:
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["languages"].update(target=list(target_tokens), target_tokens=target_tokens)
        (bundle / MANIFEST).write_text(json.dumps(manifest))

    languages({"de": first, "fr": second})
    model = Model.from_path(bundle)
    (plain,) = Model.from_path(tiny_bundle).encode_texts(["Friday"])
    assert model.target_languages == ["de", "fr"]
    assert model.encode_texts(["Friday"], "fr") == [[vocab[second], *plain]]
    assert model.encode_texts(["Friday"]) == [[vocab[first], *plain]]  # the first language is the default
    # A text may begin with a language's token, as typed: read as that token, and the options' language comes first.
    assert model.encode_texts([f" {second} Friday"]) == [[vocab[second], *plain]]
    assert model.encode_texts([f"{second} Friday"], "de") == [[vocab[first], *plain]]
    assert model.read_sources([second, f"{second} Friday"])[1] == {0: "empty text"}
    with pytest.raises(ValueError, match=r"'it' is not one of this model's target languages \(de, fr\)"):
        model.encode_texts(["Friday"], "it")
    languages({"de": first, "fr": "<2fr>"})
    with pytest.raises(BundleError, match=r"languages\.target_tokens names '<2fr>' for 'fr', which the vocabulary lacks"):
        Model.from_path(bundle)


def test_a_vocabulary_of_another_size_than_the_models_is_refused(tiny_bundle, tmp_path):
    """A model that generates ids its tokenizer cannot read (or never reads ids it was trained on) serves garbage."""
    import json
    import shutil

    from tokenizers import Tokenizer

    from nmtserve.bundle import MANIFEST, BundleError, sha256_bytes
    from nmtserve_server.engine import Model

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_tokens(["<one more>"])
    data = tokenizer.to_str().encode()
    (bundle / "tokenizer.json").write_bytes(data)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["tokenizer"].update(sha256=sha256_bytes(data), bytes=len(data))
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"tokenizer.json: a vocabulary of {size + 1} entries, the manifest's model.vocab_size is {size}"):
        Model.from_path(bundle)


def test_sources_are_read_as_training_read_them():
    """Training reads its sources with plain spaces; the server read "5:27\u202fPM" (what CLDR and macOS write) and a
    line's newline as other tokens, and translated "05:27 in" and garbage."""
    from nmtserve.bundle import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SpecialTokens
    from nmtserve_export.corpus import generate_corpus
    from nmtserve_export.data import encode_sources
    from nmtserve_export.tokenizer import train_tokenizer
    from nmtserve_server.tokenization import SubwordTokenizer

    pairs = generate_corpus(2000)
    trained = train_tokenizer((text for p in pairs for text in (p.source, p.target)), vocab_size=400)
    server = SubwordTokenizer(trained.to_str().encode(), SpecialTokens(PAD_ID, BOS_ID, EOS_ID, UNK_ID))
    typed = ["5:27 PM", "Friday, May 16, 2003", "x", "It costs €3.00."]
    given = ["5:27\u202fPM", "Friday, May 16, 2003\n", " x\r\n", "It\xa0costs \t €3.00.  "]
    assert server.encode_batch(given) == server.encode_batch(typed) == encode_sources(trained, given)
    raw = [trained.encode(text).ids + [server.eos] for text in given]
    assert all(a != b for a, b in zip(raw, server.encode_batch(given)))  # the texts as given are other tokens
