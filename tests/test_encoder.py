import pytest
import torch

from speechllm.encoder import (
    EncoderConfig,
    SpeechEncoder,
    StreamingState,
    chunk_attention_mask,
    rotary,
    rotary_angles,
)


def _encoder(chunk_size: int, left_chunks: int) -> SpeechEncoder:
    torch.manual_seed(0)
    config = EncoderConfig(d_model=64, n_layers=3, n_heads=4, dropout=0.0, chunked=True, chunk_size=chunk_size,
                           left_chunks=left_chunks)
    return SpeechEncoder(config).eval()


@pytest.mark.parametrize("left_chunks", [-1, 0, 2])
def test_streaming_equals_full_chunked_forward(left_chunks: int) -> None:
    encoder = _encoder(chunk_size=4, left_chunks=left_chunks)
    features = torch.randn(2, 80, 16 * 6)  # 6 chunks of 4 encoder frames (16 feature frames each)
    with torch.no_grad():
        full, lengths = encoder(features, torch.tensor([96, 96]))
    state, pieces = StreamingState(), []
    for start in range(0, 96, 16):
        piece, state = encoder.stream(features[:, :, start: start + 16], state)
        pieces.append(piece)
    streamed = torch.cat(pieces, dim=1)
    assert lengths.tolist() == [24, 24]
    assert torch.allclose(streamed, full, atol=1e-5), (streamed - full).abs().max()


def test_chunked_mode_limits_right_context() -> None:
    encoder = _encoder(chunk_size=4, left_chunks=-1)
    features = torch.randn(1, 80, 64)
    changed = features.clone()
    changed[:, :, 40:] += 1.0  # touches encoder frames 10.. (chunk 2 onwards)
    with torch.no_grad():
        a, _ = encoder(features, torch.tensor([64]))
        b, _ = encoder(changed, torch.tensor([64]))
        full_a, _ = encoder(features, torch.tensor([64]), chunk_size=0)
        full_b, _ = encoder(changed, torch.tensor([64]), chunk_size=0)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # chunks 0 and 1 cannot see the change
    assert not torch.allclose(full_a[:, :8], full_b[:, :8], atol=1e-4)  # full attention can


def test_padding_does_not_change_valid_frames() -> None:
    encoder = _encoder(chunk_size=4, left_chunks=-1)
    features = torch.randn(1, 80, 40)
    padded = torch.cat([features, torch.randn(1, 80, 24)], dim=-1)
    with torch.no_grad():
        alone, n = encoder(features, torch.tensor([40]), chunk_size=0)
        batched, m = encoder(torch.cat([padded, padded]), torch.tensor([40, 64]), chunk_size=0)
    assert n.item() == m[0].item() == 10
    # Causal convolutions: frames before the padding boundary see only real input.
    assert torch.allclose(alone[0, :9], batched[0, :9], atol=1e-5)


def test_chunk_mask_shape() -> None:
    mask = chunk_attention_mask(6, chunk_size=2, left_chunks=1, device=torch.device("cpu"))
    assert mask[5].tolist() == [False, False, True, True, True, True]
    assert mask[0].tolist() == [True, True, False, False, False, False]


def test_rotary_rotates_queries_and_keys_as_rotate_half_does_bit_for_bit() -> None:
    """`rotary` (x·cos + roll(x)·sin with signed sin) against the textbook rotate-half form, for q and k together."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 11, 64)  # (q and k, batch, heads, frames, head_dim)
    positions = torch.arange(5, 16)
    half = 32
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    assert torch.equal(rotary(x, rotary_angles(positions, 64, torch.float32)), expected)
