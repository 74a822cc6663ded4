"""The speech encoder: causal conv subsampling (4×) + pre-norm transformer layers with rotary
positions and an optional chunked attention mask.

Chunked mode (streaming): frames are grouped into chunks of `chunk_size` encoder frames; a frame
sees its whole chunk (limited right context) and `left_chunks` chunks before it (-1: all of them).
`stream()` consumes one chunk at a time with cached convolution inputs and per-layer keys/values
and returns exactly what `forward()` returns for those frames under the chunked mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from speechllm.cpu_linear import Linear

SUBSAMPLING = 4  # feature frames (10 ms) per encoder frame (40 ms)


@dataclass
class EncoderConfig:
    n_mels: int = 80
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    chunked: bool = False
    chunk_size: int = 16  # encoder frames per chunk (16 × 40 ms = 640 ms)
    left_chunks: int = -1


def chunk_attention_mask(length: int, chunk_size: int, left_chunks: int, device: torch.device) -> torch.Tensor:
    """(length, length) bool mask, True where query frame i may attend key frame j."""
    chunk = torch.arange(length, device=device) // chunk_size
    allowed = chunk[None, :] <= chunk[:, None]
    if left_chunks >= 0:
        allowed &= chunk[None, :] >= chunk[:, None] - left_chunks
    return allowed


def rotary_angles(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary position embedding's angles at absolute positions (T,), as `rotary` takes them:
    (T, head_dim) each, the sin with rotate-half's signs. Computed once per forward pass and shared by every layer's
    queries and keys (computing them in each was a twentieth of the audio worker's time at concurrency 16, py-spy)."""
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


def rotary(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Apply rotary position embedding to (..., T, Dh), given `rotary_angles` of its positions: x·cos + roll(x)·sin,
    four ops where rotate-half's halves take seven, bit for bit the same (as speechllm.decoder.RotaryTable)."""
    cos, sin = angles
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class CausalConvSubsampling(nn.Module):
    """Two stride-2 convolutions over time, left-padded so that no output looks into the future."""

    kernel = 3

    def __init__(self, n_mels: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d_model, self.kernel, stride=2)
        self.conv2 = nn.Conv1d(d_model, d_model, self.kernel, stride=2)

    def forward(self, features: torch.Tensor, cache: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features (B, n_mels, T) with T a multiple of 4 → (B, T/4, d_model) and the new cache."""
        pad = self.kernel - 1
        new_cache = []
        x = features
        for i, conv in enumerate((self.conv1, self.conv2)):
            left = cache[i] if cache is not None else x.new_zeros(x.shape[0], x.shape[1], pad)
            x = torch.cat([left, x], dim=-1)
            new_cache.append(x[..., -pad:])
            x = F.gelu(conv(x))
        return x.transpose(1, 2), new_cache


class EncoderLayer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = Linear(d, 3 * d)
        self.out = Linear(d, d)
        self.ff_norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(Linear(d, config.ff_mult * d), nn.GELU(), nn.Dropout(config.dropout),
                                Linear(config.ff_mult * d, d))
        # In bf16 the GELU between the two GEMMs computes in float32 and rounds to bf16, as the second GEMM rounds
        # its input: the same numbers without the conversions to float32 and back (1024 wide; 41 → 25 µs for 96
        # frames).
        self.ff[0].output_in_gemm_dtype = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`angles`: rotary_angles of the inputs' positions."""
        batch, length, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        (q, k), v = rotary(qkv[:2], angles), qkv[2]  # queries and keys rotated together
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(batch, length, d)))
        x = x + self.dropout(self.ff(self.ff_norm(x)))
        return x, (k, v)


@dataclass
class StreamingState:
    """What the encoder carries from one chunk to the next for one batch of streams."""

    conv_cache: list[torch.Tensor] | None = None
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    frames_done: int = 0


class SpeechEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.subsampling = CausalConvSubsampling(config.n_mels, config.d_model)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)

    @property
    def output_dim(self) -> int:
        return self.config.d_model

    @property
    def head_dim(self) -> int:
        return self.config.d_model // self.config.n_heads

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, n_mels, T) → states (B, T', d_model) and their lengths (B,), T' = ceil(T / 4).

        `chunk_size` overrides the configured mode for this call (0: full attention).
        """
        features = F.pad(features, (0, -features.shape[-1] % SUBSAMPLING))
        x, _ = self.subsampling(features)
        lengths = torch.div(feature_lengths + SUBSAMPLING - 1, SUBSAMPLING, rounding_mode="floor")
        mask = self._attention_mask(x.shape[1], lengths, chunk_size)
        angles = rotary_angles(torch.arange(x.shape[1], device=x.device), self.head_dim, x.dtype)
        for layer in self.layers:
            x, _ = layer(x, angles, mask)
        return self.final_norm(x), lengths

    def _attention_mask(self, length: int, lengths: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        if chunk_size is None:
            chunk_size = self.config.chunk_size if self.config.chunked else 0
        device = lengths.device
        allowed = torch.ones(length, length, dtype=torch.bool, device=device)
        if chunk_size > 0:
            allowed = chunk_attention_mask(length, chunk_size, self.config.left_chunks, device)
        key_valid = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, T)
        # Padded queries keep their own key so that no row is fully masked (NaN); they are ignored.
        diagonal = torch.eye(length, dtype=torch.bool, device=device)
        return (allowed[None] & (key_valid[:, None, :] | diagonal[None]))[:, None]  # (B, 1, T, T)

    @torch.no_grad()
    def stream(self, features: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        """Encode the next chunk: features (B, n_mels, 4 * chunk_size) → states (B, chunk_size, d)."""
        config = self.config
        x, conv_cache = self.subsampling(features, state.conv_cache)
        length = x.shape[1]
        angles = rotary_angles(torch.arange(state.frames_done, state.frames_done + length, device=x.device),
                               self.head_dim, x.dtype)
        # The next chunk may see `left_chunks` chunks back, this one included: keep that many frames.
        keep = None if config.left_chunks < 0 else config.left_chunks * config.chunk_size
        kv_cache = []
        for i, layer in enumerate(self.layers):
            past = state.kv_cache[i] if state.kv_cache else None
            x, (k, v) = layer(x, angles, None, past)  # a chunk sees itself and its cached past
            if keep is not None:
                k, v = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
            kv_cache.append((k, v))
        return self.final_norm(x), StreamingState(conv_cache, kv_cache, state.frames_done + length)
