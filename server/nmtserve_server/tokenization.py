"""Texts to source ids and generated ids to texts, for each tokenizer kind a bundle can carry.

"tokenizers": nmtserve's own shared subword vocabulary (Hugging Face `tokenizers`).
"marian": the SentencePiece pair of a Marian model plus its vocabulary, used the way
transformers' MarianTokenizer uses them, so imported models see the ids they were trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from nmtserve.bundle import Bundle, BundleError, SpecialTokens
from nmtserve.normalize import normalize_source


class SubwordTokenizer:
    """A Hugging Face `tokenizers` vocabulary shared by source and target; sources end with eos."""

    def __init__(self, tokenizer_json: bytes, tokens: SpecialTokens):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        # "<eos>" or "<pad>" typed in a text is read as those characters, never as the special ids (which would end or
        # blank the source mid-sentence), as training read its corpus (nmtserve_export.tokenizer.as_text_tokenizer).
        self.tokenizer.encode_special_tokens = True
        self.eos = tokens.eos

    # One text at a time, on the caller's thread: the batch calls hand every batch, even of one text, to a pool of
    # threads and block until one of them has run it, which on a busy server waits for a core the decoder needs.

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Source ids of each text, read as training read its sources (normalize_source): its subwords, then eos."""
        return [self.tokenizer.encode(normalize_source(text)).ids + [self.eos] for text in texts]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of generated id lists (special tokens left out)."""
        return [self.tokenizer.decode(list(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, None if there is none."""
        return self.tokenizer.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        """Vocabulary entry -> id."""
        return self.tokenizer.get_vocab()


class MarianTokenizer:
    """Marian's tokenizer: source.spm splits sources, vocab.json maps pieces to ids, target.spm joins targets."""

    EOS, UNK = "</s>", "<unk>"  # the piece names Marian vocabularies use

    def __init__(self, source_spm: bytes, target_spm: bytes, vocab: bytes, target_vocab: bytes | None, tokens: SpecialTokens):
        from sentencepiece import SentencePieceProcessor

        self.source = SentencePieceProcessor(model_proto=source_spm)
        self.target = SentencePieceProcessor(model_proto=target_spm)
        self.vocab: dict[str, int] = json.loads(vocab)
        target = json.loads(target_vocab) if target_vocab is not None else self.vocab
        self.target_pieces = {token_id: piece for piece, token_id in target.items()}
        self.eos, self.unk = self.vocab[self.EOS], self.vocab[self.UNK]
        self.special = {tokens.pad, tokens.bos, tokens.eos, tokens.unk}  # left out of texts, as transformers does

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Source ids of each text: a leading >>lang<< code kept whole, the pieces (unk outside the vocabulary), eos."""
        encoded = []
        for text in texts:
            # Not normalize_source: source.spm's own normalizer, which the model was trained with, already reads no-break
            # spaces, newlines and runs of white space as one space; normalize_source would also make spaces of control
            # characters it drops or keeps, and part from the ids transformers gives the model.
            code, text = split_language_code(text)
            pieces = code + self.source.encode(text, out_type=str)
            encoded.append([self.vocab.get(piece, self.unk) for piece in pieces] + [self.eos])
        return encoded

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of generated id lists (special tokens left out)."""
        texts = []
        for sequence in ids:
            pieces = [self.target_pieces[i] for i in sequence if i not in self.special]
            texts.append(self.target.decode_pieces(pieces).replace("\u2581", " ").strip())
        return texts

    def token_to_id(self, token: str) -> int | None:
        """The id of a source vocabulary entry, None if there is none."""
        return self.vocab.get(token)

    def get_vocab(self) -> dict[str, int]:
        """Source vocabulary entry -> id."""
        return dict(self.vocab)


def split_language_code(text: str) -> tuple[list[str], str]:
    """A leading target-language code such as >>fra<< (multilingual Marian models) and the rest of the text."""
    end = text.find("<<") if text.startswith(">>") else -1
    return ([text[: end + 2]], text[end + 2 :]) if end != -1 else ([], text)


def language_prefixes(languages: dict, tokenizer: SubwordTokenizer | MarianTokenizer) -> dict[str, list[int]]:
    """The source ids put before a text to ask for each target language: the id of its token in the manifest's
    languages.target_tokens, none where the model names no tokens; BundleError for a token not in the vocabulary."""
    tokens = languages.get("target_tokens") or {}
    prefixes = {}
    for language in languages["target"]:
        token = tokens.get(language)
        token_id = None if token is None else tokenizer.token_to_id(token)
        if token is not None and token_id is None:
            raise BundleError(f"manifest.json: languages.target_tokens names {token!r} for {language!r}, which the vocabulary lacks")
        prefixes[language] = [] if token_id is None else [token_id]
    return prefixes


def load_tokenizer(bundle: Bundle) -> SubwordTokenizer | MarianTokenizer:
    """The tokenizer of a verified bundle, by its kind; raises BundleError if its files do not load as one, or if
    nmtserve's own vocabulary is not the model's size (ids it could not read, or never see)."""
    files, tokens = bundle.files, bundle.tokens
    try:
        if bundle.tokenizer_kind == "marian":
            return MarianTokenizer(files["source_spm"], files["target_spm"], files["vocab"], files.get("target_vocab"), tokens)
        tokenizer = SubwordTokenizer(files["tokenizer"], tokens)
    except Exception as error:  # each library raises its own kinds (tokenizers: a bare Exception)
        raise BundleError(f"the {bundle.tokenizer_kind} tokenizer's files do not load: {type(error).__name__}: {error}") from error
    size = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if size != bundle.dims.vocab_size:
        raise BundleError(f"{bundle.manifest['files']['tokenizer']['path']}: a vocabulary of {size} entries, the manifest's "
                          f"model.vocab_size is {bundle.dims.vocab_size}")
    return tokenizer
