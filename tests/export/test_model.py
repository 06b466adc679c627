"""The Transformer's modules: shapes, masks, and the incremental decoder against the full one."""

import math

import pytest
import torch

from nmtserve.bundle import BOS_ID, PAD_ID
from nmtserve_export.decode import IncrementalDecoder
from nmtserve_export.model import (
    MultiHeadAttention,
    PositionalEncoding,
    PositionwiseFeedForward,
    Transformer,
    label_smoothed_nll_loss,
    model_config,
    scaled_dot_product_attention,
    subsequent_mask,
)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config("tiny", vocab_size=50, max_len=64)).eval()


def random_ids(batch: int, length: int, vocab: int = 50) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length))


def test_scaled_dot_product_attention_is_equation_1():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    out, attention = scaled_dot_product_attention(q, k, v, mask=None)
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    assert out.shape == (2, 3, 5, 8) and attention.shape == (2, 3, 5, 7)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, 5))


def test_masked_keys_get_no_attention():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([True, True, False])[None, None, None, :]
    _, attention = scaled_dot_product_attention(q, k, v, mask)
    assert torch.all(attention[..., 2] == 0)


def test_multi_head_attention_shapes():
    attention = MultiHeadAttention(d_model=32, n_heads=4, dropout=0.0)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    key, value = attention.keys_values(memory)
    assert key.shape == value.shape == (2, 4, 9, 8)
    assert attention(x, key, value, None).shape == (2, 5, 32)
    assert attention.attention.shape == (2, 4, 5, 9)


def test_feed_forward_and_positional_encoding():
    assert PositionwiseFeedForward(16, 64, 0.0)(torch.randn(3, 4, 16)).shape == (3, 4, 16)
    pe = PositionalEncoding(d_model=16, max_len=10)
    torch.testing.assert_close(pe(torch.tensor([0]))[0, 0::2], torch.zeros(8))  # sin(0)
    torch.testing.assert_close(pe(torch.tensor([0]))[0, 1::2], torch.ones(8))  # cos(0)
    torch.testing.assert_close(pe(torch.tensor([3]))[0, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 16))))


def test_subsequent_mask_is_causal():
    assert subsequent_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_forward_shapes_and_log_softmax(model):
    log_probs = model(random_ids(3, 7), random_ids(3, 5))
    assert log_probs.shape == (3, 5, 50)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 5))


def test_output_projection_is_tied_to_embeddings(model):
    names = [name for name, _ in model.named_parameters()]
    assert not any("generator" in name for name in names)
    x = torch.randn(1, 1, model.config.d_model)
    torch.testing.assert_close(model.generator(x), torch.log_softmax(x @ model.embed.lut.weight.t(), -1))


# Log-probabilities near -4 are 4.8e-7 apart in float32; matrix products of other shapes (padded) sum in another order on
# two threads and differ by a few of those steps, while a mask that lets padding in moves them by far more.
TOLERANCE = 1e-5


def test_embeddings_are_scaled_by_the_square_root_of_d_model(model):
    tokens = random_ids(2, 3)
    torch.testing.assert_close(model.embed(tokens), model.embed.lut(tokens) * math.sqrt(model.config.d_model))


def test_source_padding_never_changes_unpadded_outputs(model):
    src, tgt = random_ids(1, 6), random_ids(1, 4)
    padded_src = torch.cat([src, torch.full((1, 3), PAD_ID)], dim=1)
    torch.testing.assert_close(model(src, tgt), model(padded_src, tgt), atol=TOLERANCE, rtol=0)


def test_target_padding_never_changes_unpadded_positions(model):
    src, tgt = random_ids(1, 6), random_ids(1, 4)
    padded_tgt = torch.cat([tgt, torch.full((1, 2), PAD_ID)], dim=1)
    torch.testing.assert_close(model(src, tgt), model(src, padded_tgt)[:, :4], atol=TOLERANCE, rtol=0)


def test_future_tokens_never_change_earlier_positions(model):
    src, tgt = random_ids(1, 6), random_ids(1, 5)
    changed = tgt.clone()
    changed[0, 3:] = (changed[0, 3:] + 1) % 46 + 4
    torch.testing.assert_close(model(src, tgt)[:, :3], model(src, changed)[:, :3], atol=TOLERANCE, rtol=0)


def test_incremental_decoder_equals_full_decoder(model):
    src = random_ids(3, 8)
    src[1, 5:] = PAD_ID  # a padded batch of mixed lengths
    tgt = torch.cat([torch.full((3, 1), BOS_ID), random_ids(3, 9)], dim=1)
    full = model(src, tgt)  # (B, T, V)
    decoder = IncrementalDecoder(model, src)
    steps = torch.stack([decoder.step(tgt[:, t]) for t in range(tgt.size(1))], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def test_label_smoothing_loss_ignores_padding_and_matches_definition():
    log_probs = torch.log_softmax(torch.randn(2, 3, 10), -1)
    target = torch.tensor([[4, 5, PAD_ID], [6, PAD_ID, PAD_ID]])
    loss = label_smoothed_nll_loss(log_probs, target, 0.1, PAD_ID)
    positions = [(0, 0), (0, 1), (1, 0)]
    expected = sum(0.9 * -log_probs[b, t, target[b, t]] + 0.1 * -log_probs[b, t].mean() for b, t in positions) / 3
    torch.testing.assert_close(loss, expected)
    smooth = torch.nn.functional.cross_entropy(log_probs.view(-1, 10), target.view(-1), ignore_index=PAD_ID, label_smoothing=0.1)
    torch.testing.assert_close(loss, smooth)


def test_presets():
    base = model_config("base")
    assert (base.d_model, base.d_ff, base.n_heads, base.n_encoder_layers, base.n_decoder_layers, base.dropout) == (512, 2048, 8, 6, 6, 0.1)
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")
