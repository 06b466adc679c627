"""Import a Marian (opus-mt) checkpoint in the Hugging Face layout as an nmtserve model and bundle.

A checkpoint directory holds config.json, the weights (model.safetensors, or
pytorch_model.bin read with weights_only=True), source.spm and target.spm
(SentencePiece) and vocab.json, plus target_vocab.json where the target
vocabulary is separate. Marian's architecture is the paper's post-norm
Transformer with a few differences, each a ModelConfig field: the swish
activation, unscaled or scaled embeddings, a sinusoid table of all sines then all
cosines, a bias on the final linear, separate embeddings, and <pad> as the
decoder's start token. Anything else is refused with the reason. Nothing is
downloaded. A multilingual model (opus-mt-en-ROMANCE and the like) is asked
for its target language by a >>lang<< token before the source; each such token
of the source vocabulary becomes a target language of the bundle.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from nmtserve.bundle import UNDETERMINED
from nmtserve.cli import install_hint

from .model import ModelConfig, PositionalEncoding, Transformer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SPM_FILES = {"source_spm": "source.spm", "target_spm": "target.spm"}
VOCAB_FILES = {"vocab": "vocab.json", "target_vocab": "target_vocab.json"}
TOKENIZER_CONFIG = "tokenizer_config.json"
LANGUAGE_TOKEN = re.compile(r">>(.+)<<")  # as transformers' MarianTokenizer finds a multilingual model's target languages
ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu"}  # Marian's name -> ours
# Config switches of related architectures (mBART, pre-norm Marian ports) that this mapping does not cover.
UNSUPPORTED_SWITCHES = {
    "normalize_before": "pre-norm layers (normalize_before)",
    "add_final_layer_norm": "a final layer norm (add_final_layer_norm)",
    "normalize_embedding": "a layer norm on the embeddings (normalize_embedding)",
    "layernorm_embedding": "a layer norm on the embeddings (layernorm_embedding)",
}
# Our attention projections and sub-layer norms, by their Marian names.
ATTENTION = {"q_proj": "w_q", "k_proj": "w_k", "v_proj": "w_v", "out_proj": "w_o"}
ENCODER_LAYER = {"self_attn": "self_attn", "self_attn_layer_norm": "sublayer.0.norm", "final_layer_norm": "sublayer.1.norm"}
DECODER_LAYER = {
    "self_attn": "self_attn", "encoder_attn": "src_attn",
    "self_attn_layer_norm": "sublayer.0.norm", "encoder_attn_layer_norm": "sublayer.1.norm", "final_layer_norm": "sublayer.2.norm",
}
FEED_FORWARD = {"fc1": "feed_forward.w_1", "fc2": "feed_forward.w_2"}


class MarianImportError(ValueError):
    """A checkpoint that cannot be imported; the message names the file and what is missing or unsupported."""


class MarianCheckpoint(NamedTuple):
    model: Transformer  # in eval mode
    tokenizer_files: dict[str, bytes]  # bundle role -> content
    languages: dict[str, Any]
    metadata: dict[str, Any]  # what the manifest's training section records


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise MarianImportError(f"{path}: missing; a Marian checkpoint directory needs {path.name}")
    return path.read_bytes()


def _parse_json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as error:
        raise MarianImportError(f"{path}: not valid JSON ({error})") from error


def _read_json(path: Path) -> Any:
    return _parse_json(_read_file(path), path)


# The config.json sizes the model is built from, with no default to fall back on.
REQUIRED_SIZES = ("vocab_size", "d_model", "encoder_ffn_dim", "encoder_attention_heads", "encoder_layers", "decoder_layers",
                  "max_position_embeddings", "pad_token_id")


def model_config(hf: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig for a Marian config.json; refuses what the mapping does not cover."""
    if hf.get("model_type") != "marian":
        raise MarianImportError(f"{where}: model_type is {hf.get('model_type')!r}; only 'marian' checkpoints are supported")
    activation = hf.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise MarianImportError(
            f"{where}: activation_function {activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    for switch, what in UNSUPPORTED_SWITCHES.items():
        if hf.get(switch):
            raise MarianImportError(f"{where}: {what} is not supported; nmtserve runs post-norm Transformers only")
    for encoder_key, decoder_key in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(encoder_key) != hf.get(decoder_key):
            raise MarianImportError(f"{where}: {encoder_key} {hf.get(encoder_key)} != {decoder_key} {hf.get(decoder_key)} is not supported")
    if not isinstance(hf.get("eos_token_id"), int):
        raise MarianImportError(f"{where}: eos_token_id must be one id, got {hf.get('eos_token_id')!r}")
    for key in REQUIRED_SIZES:
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] < 0:
            raise MarianImportError(f"{where}: {key} must be a number, got {hf.get(key)!r}")
    shared = hf.get("share_encoder_decoder_embeddings", True)
    vocab_size = hf["vocab_size"]
    target_vocab_size = vocab_size if shared else hf.get("decoder_vocab_size") or vocab_size
    return ModelConfig(
        vocab_size=target_vocab_size,
        source_vocab_size=None if shared else vocab_size,
        d_model=hf["d_model"],
        d_ff=hf["encoder_ffn_dim"],
        n_heads=hf["encoder_attention_heads"],
        n_encoder_layers=hf["encoder_layers"],
        n_decoder_layers=hf["decoder_layers"],
        dropout=hf.get("dropout", 0.1),
        max_len=hf["max_position_embeddings"],
        activation=ACTIVATIONS[activation],
        scale_embeddings=bool(hf.get("scale_embedding", False)),
        positional_layout="halves",
        share_embeddings=shared,
        tie_output=hf.get("tie_word_embeddings", True),
        logits_bias=True,
        pad_id=hf["pad_token_id"],
        bos_id=hf.get("decoder_start_token_id", hf["pad_token_id"]),
        eos_id=hf["eos_token_id"],
    )


def read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """The checkpoint's tensors and their file: model.safetensors, or pytorch_model.bin loaded with weights_only=True."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path)), path
            try:
                return torch.load(path, map_location="cpu", weights_only=True), path  # plain tensors only: no pickled code runs
            except pickle.UnpicklingError as error:
                raise MarianImportError(f"{path}: holds more than tensors, refused ({str(error).splitlines()[0]})") from error
    raise MarianImportError(f"{directory}: no weights; expected {' or '.join(WEIGHT_FILES)} (sharded checkpoints are not supported)")


def _weight_sources(config: ModelConfig) -> dict[str, str]:
    """Each of our parameter names -> the Marian weight it comes from."""
    names = {"embed.lut.weight": "model.shared.weight" if config.share_embeddings else "model.encoder.embed_tokens.weight"}
    if not config.share_embeddings:
        names["target_embed.lut.weight"] = "model.decoder.embed_tokens.weight"
    if not config.tie_output:
        names["output.weight"] = "lm_head.weight"
    names["logits_bias"] = "final_logits_bias"
    for stack, count, layer_names in (
        ("encoder", config.n_encoder_layers, ENCODER_LAYER), ("decoder", config.n_decoder_layers, DECODER_LAYER)
    ):
        for i in range(count):
            theirs, ours = f"model.{stack}.layers.{i}", f"{stack}_layers.{i}"
            for marian, mine in {**layer_names, **FEED_FORWARD}.items():
                projections = ATTENTION if marian.endswith("attn") else {"": ""}
                for projection, our_projection in projections.items():
                    for kind in ("weight", "bias"):
                        source = ".".join(p for p in (theirs, marian, projection, kind) if p)
                        names[".".join(p for p in (ours, mine, our_projection, kind) if p)] = source
    return names


def map_weights(weights: dict[str, Tensor], config: ModelConfig, where: str) -> dict[str, Tensor]:
    """Our state dict from Marian's tensors; every tensor must be used or be a known copy, none may be missing."""
    weights = dict(weights)
    if config.share_embeddings and "model.shared.weight" not in weights:
        weights["model.shared.weight"] = weights.get("model.encoder.embed_tokens.weight")  # saved under its tied name
    if "final_logits_bias" not in weights:
        weights["final_logits_bias"] = torch.zeros(1, config.vocab_size)  # transformers' default too
    state = {}
    for ours, theirs in _weight_sources(config).items():
        tensor = weights.pop(theirs, None)
        if tensor is None:
            raise MarianImportError(f"{where}: weight {theirs!r} is missing")
        state[ours] = tensor.reshape(-1) if ours == "logits_bias" else tensor
    # Copies of tied matrices, and the sinusoid tables transformers recomputes: they must agree with ours.
    target_embedding = state.get("target_embed.lut.weight", state["embed.lut.weight"])
    copies = {"model.encoder.embed_tokens.weight": state["embed.lut.weight"], "model.decoder.embed_tokens.weight": target_embedding}
    if config.tie_output:
        copies["lm_head.weight"] = target_embedding
    table = PositionalEncoding(config.d_model, config.max_len, config.positional_layout).pe
    for name in ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"):
        copies[name] = table
    for name, expected in copies.items():
        tensor = weights.pop(name, None)
        if tensor is not None and (tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, atol=1e-5)):
            raise MarianImportError(f"{where}: {name!r} differs from the tensor it should equal (tied weights or the Marian sinusoid table)")
    if weights:
        raise MarianImportError(
            f"{where}: weights of an unsupported variant: {', '.join(sorted(weights)[:5])}"
            + (f" and {len(weights) - 5} more" if len(weights) > 5 else "")
        )
    return state


def read_tokenizer_files(directory: Path, config: ModelConfig) -> dict[str, bytes]:
    """source.spm, target.spm, vocab.json (and target_vocab.json), checked against each other and the model."""
    from sentencepiece import SentencePieceProcessor

    # Each file is read once: the bytes checked here are the bytes the bundle gets.
    files = {}
    for role, name in SPM_FILES.items():
        path = directory / name
        files[role] = _read_file(path)
        try:
            SentencePieceProcessor(model_proto=files[role])
        except RuntimeError as error:
            raise MarianImportError(f"{path}: not a SentencePiece model ({error})") from error
    separate = (directory / VOCAB_FILES["target_vocab"]).is_file()
    sizes = {"vocab": config.source_vocab, "target_vocab": config.vocab_size}
    for role in ("vocab", "target_vocab") if separate else ("vocab",):
        path = directory / VOCAB_FILES[role]
        files[role] = _read_file(path)
        vocab = _parse_json(files[role], path)
        size = sizes[role] if separate else config.vocab_size
        if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(size)):
            raise MarianImportError(f"{path}: expected {size} pieces with the ids 0..{size - 1}, as the model's embeddings")
        for piece in ("</s>", "<unk>"):
            if piece not in vocab:
                raise MarianImportError(f"{path}: no {piece} piece")
    target = json.loads(files["target_vocab" if separate else "vocab"])
    if target["</s>"] != config.eos_id:
        raise MarianImportError(f"{CONFIG_FILE}: eos_token_id {config.eos_id} is not the vocabulary's </s> ({target['</s>']})")
    return files


def marian_languages(source_vocab: dict[str, int], tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    """The bundle's languages: tokenizer_config.json's pair, or, for a multilingual model, every >>lang<< token of the
    source vocabulary as a target language, in id order (the first is the default)."""
    source = tokenizer_config.get("source_lang") or UNDETERMINED
    codes = sorted((token_id, found[1]) for token, token_id in source_vocab.items() if (found := LANGUAGE_TOKEN.fullmatch(token)))
    if not codes:
        return {"source": source, "target": [tokenizer_config.get("target_lang") or UNDETERMINED]}
    return {"source": source, "target": [code for _, code in codes], "target_tokens": {code: f">>{code}<<" for _, code in codes}}


def load_marian(directory: Path | str) -> MarianCheckpoint:
    """Read a Marian checkpoint directory into our Transformer, with its tokenizer files and languages."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MarianImportError(f"{directory}: not a directory")
    hf = _read_json(directory / CONFIG_FILE)
    config = model_config(hf, str(directory / CONFIG_FILE))
    weights, weights_path = read_weights(directory)
    tokenizer_files = read_tokenizer_files(directory, config)
    config.unk_id = json.loads(tokenizer_files.get("target_vocab", tokenizer_files["vocab"]))["<unk>"]  # config.json has none
    model = Transformer(config)
    model.load_state_dict(map_weights(weights, config, str(weights_path)))
    model.eval()
    tokenizer_config = _read_json(directory / TOKENIZER_CONFIG) if (directory / TOKENIZER_CONFIG).is_file() else {}
    languages = marian_languages(json.loads(tokenizer_files["vocab"]), tokenizer_config)
    metadata = {"imported_from": "marian", "checkpoint": directory.name, "parameters": sum(p.numel() for p in model.parameters())}
    return MarianCheckpoint(model, tokenizer_files, languages, metadata)


@torch.inference_mode()
def reference_difference(directory: Path | str, model: Transformer, *, batch: int = 4, length: int = 12, seed: int = 0) -> float:
    """Largest |ours - transformers| log-probability on random teacher-forced inputs (needs transformers)."""
    try:
        from transformers import MarianMTModel
    except ImportError as error:
        raise MarianImportError(f"the reference check needs transformers (pip install transformers, or {install_hint('dev')})") from error
    reference = MarianMTModel.from_pretrained(str(directory), local_files_only=True).eval()
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(0, c.source_vocab, (batch, length), generator=generator)
    tgt = torch.randint(0, c.vocab_size, (batch, length), generator=generator)
    src[src == c.pad_id] = c.unk_id
    tgt[:, 0] = c.bos_id
    theirs = reference(input_ids=src, attention_mask=torch.ones_like(src), decoder_input_ids=tgt).logits.log_softmax(dim=-1)
    return float((model(src, tgt) - theirs).abs().max())


def import_marian(
    directory: Path | str, out: Path | str, *, precision: str = "fp32", name: str | None = None, check_reference: bool = False
) -> Path:
    """Import a Marian checkpoint and write it as a verified bundle at `out` (the export path of our own models)."""
    from .onnx_export import write_model_bundle

    directory = Path(directory)
    checkpoint = load_marian(directory)
    metadata = dict(checkpoint.metadata)
    if check_reference:
        difference = reference_difference(directory, checkpoint.model)
        if not difference <= 1e-4:  # NaN too
            raise MarianImportError(f"{directory}: log-probabilities differ from transformers' by {difference:.2e} (> 1e-4)")
        log.info("matches transformers' MarianMTModel to %.1e", difference)
        metadata["transformers_max_log_prob_difference"] = difference
    return write_model_bundle(
        checkpoint.model, Path(out),
        tokenizer_kind="marian",
        tokenizer_files=checkpoint.tokenizer_files,
        languages=checkpoint.languages,
        name=name or f"marian-{directory.resolve().name}",
        training=metadata,
        precision=precision,
    )
