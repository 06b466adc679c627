"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), section by section.

Shapes use B = batch, S = source length, T = target length, N = layers,
h = heads, d_k = d_model / h, V = vocabulary size.

Masks are boolean and True where attention is allowed; they broadcast to
(B, h, T_query, T_key).

The decoder is written so that one code path serves both teacher-forced
training (all target positions at once) and incremental decoding (one new
token per step, attending to a cache of the earlier steps' keys and values),
which is what the ONNX export and the server run.

The defaults are the paper's. A few fields describe the ways Marian models
(the opus-mt family, imported by `marian.py`) depart from it: the swish
activation, embeddings with or without the sqrt(d_model) scale, a sinusoid
table laid out as all sines then all cosines, a bias on the final linear,
separate source and target vocabularies, embeddings and output matrix, and
<pad> as the decoder's start token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


ACTIVATIONS = {"relu": F.relu, "silu": F.silu}  # silu is Marian's "swish"
POSITIONAL_LAYOUTS = ("interleaved", "halves")


@dataclass
class ModelConfig:
    vocab_size: int = 1000  # V: target subword vocabulary (the source's too, unless source_vocab_size is set)
    source_vocab_size: int | None = None  # a separate source vocabulary's size; None: the source shares V
    d_model: int = 128  # model width (section 3.2.2)
    d_ff: int = 512  # inner width of the position-wise feed-forward network (3.3)
    n_heads: int = 4  # h: parallel attention heads (3.2.2)
    n_encoder_layers: int = 2  # N for the encoder stack (3.1)
    n_decoder_layers: int = 2  # N for the decoder stack (3.1)
    # P_drop on sub-layer outputs and embedding sums (5.4); also, as The Annotated Transformer and tensor2tensor do,
    # on the attention weights and the feed-forward's hidden layer, which the paper does not mention.
    dropout: float = 0.1
    max_len: int = 256  # longest sequence the positional encoding table covers
    activation: str = "relu"  # the feed-forward non-linearity: max(0, x) (equation 2), or "silu" (Marian's swish)
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (3.4)
    positional_layout: str = "interleaved"  # sin, cos on even, odd dimensions (3.5); "halves": all sines, then all cosines
    share_embeddings: bool = True  # one embedding matrix for source and target tokens (3.4); needs one vocabulary
    tie_output: bool = True  # the final linear is the target embedding matrix (3.4), not a matrix of its own
    logits_bias: bool = False  # add a learned bias to the final linear's output
    pad_id: int = 0
    bos_id: int = 1  # the decoder's first input
    eos_id: int = 2
    unk_id: int = 3  # the tokenizer's stand-in for unknown pieces; the model itself never treats it apart

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.positional_layout not in POSITIONAL_LAYOUTS:
            raise ValueError(f"positional_layout {self.positional_layout!r} is not one of {', '.join(POSITIONAL_LAYOUTS)}")
        if self.share_embeddings and self.source_vocab_size not in (None, self.vocab_size):
            raise ValueError("share_embeddings needs one vocabulary: source_vocab_size must be None or vocab_size")

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads

    @property
    def source_vocab(self) -> int:
        """Size of the source vocabulary."""
        return self.source_vocab_size or self.vocab_size

    def to_dict(self) -> dict:
        """The configuration as a JSON-ready dict."""
        return asdict(self)


PRESETS: dict[str, dict] = {
    # Seconds to train: for tests.
    "tiny": dict(d_model=64, d_ff=256, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, dropout=0.1),
    # The default: sized by measurement for 2 CPU cores (see README, "Choosing the default model").
    "small": dict(d_model=128, d_ff=512, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, dropout=0.1),
    # The paper's base model (Table 3), sized for its GPUs: train it with --device cuda (on a CPU it is slow).
    "base": dict(d_model=512, d_ff=2048, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset, with fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


def subsequent_mask(size: int, device: torch.device | None = None) -> Tensor:
    """Causal mask: position i may attend to positions <= i."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()  # (T, T)


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout: nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V  (equation 1)."""
    d_k = query.size(-1)
    scores = query @ key.transpose(-2, -1) / math.sqrt(d_k)  # (B, h, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    attention = scores.softmax(dim=-1)  # (B, h, T_q, T_k)
    if dropout is not None:
        attention = dropout(attention)
    return attention @ value, attention  # (B, h, T_q, d_k)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.d_k = n_heads, d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.attention: Tensor | None = None  # the last attention weights, kept for plots

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, d_model) -> (B, h, T, d_k)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_k).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Project x to the heads' keys and values, each (B, h, T, d_k)."""
        return self.split_heads(self.w_k(x)), self.split_heads(self.w_v(x))

    def forward(self, x: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """Attend from queries x (B, T_q, d_model) to projected keys/values (B, h, T_k, d_k)."""
        B, T, d_model = x.shape
        query = self.split_heads(self.w_q(x))  # (B, h, T_q, d_k)
        heads, self.attention = scaled_dot_product_attention(query, key, value, mask, self.dropout)
        concat = heads.transpose(1, 2).reshape(B, T, d_model)  # (B, T_q, h * d_k)
        return self.w_o(concat)


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2  (equation 2), or with another activation in place of max(0, .)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class SublayerConnection(nn.Module):
    """LayerNorm(x + Dropout(Sublayer(x))): the residual around every sub-layer (5.4)."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, sublayer_output: Tensor) -> Tensor:
        return self.norm(x + self.dropout(sublayer_output))


class PositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...)  (3.5).

    layout "halves" puts the same sines in dimensions 0..d_model/2-1 and the cosines after them (Marian).
    """

    def __init__(self, d_model: int, max_len: int, layout: str = "interleaved"):
        super().__init__()
        # Computed in float64, then rounded once, so long positions keep float32 precision.
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))  # (d_model/2,)
        sines, cosines = torch.sin(position * div_term), torch.cos(position * div_term)  # (max_len, d_model/2) each
        if layout == "interleaved":
            pe = torch.stack([sines, cosines], dim=-1).flatten(1)  # sin, cos, sin, cos, ...
        else:
            pe = torch.cat([sines, cosines], dim=1)
        self.register_buffer("pe", pe.float(), persistent=False)  # (max_len, d_model)

    def forward(self, positions: Tensor) -> Tensor:
        """The encodings of integer positions (...,) -> (..., d_model)."""
        return self.pe[positions]


class Embeddings(nn.Module):
    """Token embeddings multiplied by sqrt(d_model) (3.4), or left unscaled."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = True):
        super().__init__()
        self.lut = nn.Embedding(vocab_size, d_model)
        self.scale = math.sqrt(d_model) if scale else 1.0

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lut(tokens) * self.scale


class EncoderLayer(nn.Module):
    """Self-attention, then the feed-forward network, each wrapped in add & norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.feed_forward = PositionwiseFeedForward(config.d_model, config.d_ff, config.dropout, config.activation)
        self.sublayer = nn.ModuleList([SublayerConnection(config.d_model, config.dropout) for _ in range(2)])

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        x = self.sublayer[0](x, self.self_attn(x, *self.self_attn.keys_values(x), src_mask))
        return self.sublayer[1](x, self.feed_forward(x))


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, feed-forward; each in add & norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.src_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.feed_forward = PositionwiseFeedForward(config.d_model, config.d_ff, config.dropout, config.activation)
        self.sublayer = nn.ModuleList([SublayerConnection(config.d_model, config.dropout) for _ in range(3)])

    def forward(
        self,
        x: Tensor,  # (B, T, d_model): the new target positions
        past_key: Tensor,  # (B, h, T_past, d_k): self-attention keys of earlier steps
        past_value: Tensor,  # (B, h, T_past, d_k)
        self_mask: Tensor,  # (B, 1, T, T_past + T)
        memory_key: Tensor,  # (B, h, S, d_k): encoder-decoder keys, fixed per sentence
        memory_value: Tensor,  # (B, h, S, d_k)
        src_mask: Tensor,  # (B, 1, 1, S)
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the layer on new positions; also return their self-attention keys and values."""
        new_key, new_value = self.self_attn.keys_values(x)  # (B, h, T, d_k)
        key = torch.cat([past_key, new_key], dim=2)  # (B, h, T_past + T, d_k)
        value = torch.cat([past_value, new_value], dim=2)
        x = self.sublayer[0](x, self.self_attn(x, key, value, self_mask))
        x = self.sublayer[1](x, self.src_attn(x, memory_key, memory_value, src_mask))
        x = self.sublayer[2](x, self.feed_forward(x))
        return x, new_key, new_value


class Transformer(nn.Module):
    """The encoder-decoder Transformer with tied embeddings (unless the config unties them) and a log-softmax generator."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = Embeddings(c.source_vocab, c.d_model, c.scale_embeddings)  # shared by encoder, decoder, generator
        # Where the config unshares them: the decoder's embeddings, and the generator's own matrix and bias.
        self.target_embed = None if c.share_embeddings else Embeddings(c.vocab_size, c.d_model, c.scale_embeddings)
        self.output = None if c.tie_output else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.logits_bias = nn.Parameter(torch.zeros(c.vocab_size)) if c.logits_bias else None
        self.positional_encoding = PositionalEncoding(c.d_model, c.max_len, c.positional_layout)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder_layers = nn.ModuleList([EncoderLayer(c) for _ in range(c.n_encoder_layers)])
        self.decoder_layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.n_decoder_layers)])
        self._init_parameters()

    @property
    def target_embeddings(self) -> Embeddings:
        return self.embed if self.target_embed is None else self.target_embed

    def _init_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # Tied with the output projection, the embedding needs N(0, d_model^-1/2) so logits start small.
        for embeddings in (self.embed, self.target_embed):
            if embeddings is not None:
                nn.init.normal_(embeddings.lut.weight, std=self.config.d_model**-0.5)

    def embed_positions(self, embeddings: Embeddings, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token embedding + positional encoding, with dropout (3.4, 3.5)."""
        return self.dropout(embeddings(tokens) + self.positional_encoding(positions))

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """The encoder stack: source ids (B, S) and mask (B, 1, 1, S) -> memory (B, S, d_model)."""
        positions = torch.arange(src.size(1), device=src.device)
        x = self.embed_positions(self.embed, src, positions)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return x

    def memory_keys_values(self, memory: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Each decoder layer's encoder-decoder attention keys and values, N x (B, h, S, d_k)."""
        keys, values = zip(*(layer.src_attn.keys_values(memory) for layer in self.decoder_layers))
        return list(keys), list(values)

    def decode(
        self,
        tgt: Tensor,  # (B, T) new target tokens
        positions: Tensor,  # (B, T) their positions
        past_keys: list[Tensor],  # N x (B, h, T_past, d_k): one tensor per layer, no stacking to copy
        past_values: list[Tensor],  # N x (B, h, T_past, d_k)
        self_mask: Tensor,  # (B, 1, T, T_past + T)
        memory_keys: list[Tensor],  # N x (B, h, S, d_k)
        memory_values: list[Tensor],  # N x (B, h, S, d_k)
        src_mask: Tensor,  # (B, 1, 1, S)
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The decoder stack and generator: log-probabilities (B, T, V) and each layer's new keys/values (B, h, T, d_k)."""
        x = self.embed_positions(self.target_embeddings, tgt, positions)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.decoder_layers):
            x, key, value = layer(x, past_keys[i], past_values[i], self_mask, memory_keys[i], memory_values[i], src_mask)
            new_keys.append(key)
            new_values.append(value)
        return self.generator(x), new_keys, new_values

    def generator(self, x: Tensor) -> Tensor:
        """Final linear (tied to the embeddings, 3.4) and log-softmax: (B, T, d_model) -> (B, T, V)."""
        weight = self.target_embeddings.lut.weight if self.output is None else self.output.weight  # (V, d_model)
        logits = x @ weight.t()  # (B, T, V)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        return F.log_softmax(logits, dim=-1)

    def empty_cache(self, batch_size: int, device: torch.device | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Self-attention keys and values for zero earlier steps, N x (B, h, 0, d_k) each."""
        c = self.config
        empty = torch.zeros(batch_size, c.n_heads, 0, c.d_k, device=device)
        return [empty] * c.n_decoder_layers, [empty] * c.n_decoder_layers

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Teacher-forced log-probabilities (B, T, V) of the next token after each target prefix."""
        src_mask = (src != self.config.pad_id)[:, None, None, :]  # (B, 1, 1, S)
        # Target padding sits at the end, so the causal mask alone keeps real positions from seeing it
        # (and Marian's decoder starts from its <pad>, which must stay visible).
        tgt_mask = subsequent_mask(tgt.size(1), tgt.device)[None, None]  # (1, 1, T, T)
        memory = self.encode(src, src_mask)
        memory_keys, memory_values = self.memory_keys_values(memory)
        past_keys, past_values = self.empty_cache(src.size(0), src.device)
        positions = torch.arange(tgt.size(1), device=tgt.device).expand_as(tgt)
        log_probs, _, _ = self.decode(tgt, positions, past_keys, past_values, tgt_mask, memory_keys, memory_values, src_mask)
        return log_probs


def label_smoothed_nll_loss(log_probs: Tensor, target: Tensor, epsilon: float, pad_id: int) -> Tensor:
    """Cross-entropy against one-hot targets smoothed by epsilon (5.4), averaged over non-pad tokens. The paper does
    not say where epsilon goes: here over the whole vocabulary, special tokens included, as PyTorch's label_smoothing
    spreads it (The Annotated Transformer leaves <pad> out)."""
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    uniform = -log_probs.mean(dim=-1)  # (B, T): cross-entropy against the uniform distribution
    loss = (1.0 - epsilon) * nll + epsilon * uniform
    not_pad = target != pad_id
    return loss.masked_select(not_pad).mean()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
