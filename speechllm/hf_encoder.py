"""A production-size speech encoder from a local Hugging Face Whisper directory, behind the same
interface as our own encoder (features, lengths → states, lengths). Not streamable: Whisper's
encoder attends over its whole 30 s window."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# Whisper checkpoints name the encoder's tensors with one of these prefixes; an encoder saved on its
# own has none.
_PREFIXES = ("model.encoder.", "encoder.")


class HFWhisperEncoder(nn.Module):
    def __init__(self, whisper_encoder: WhisperEncoder) -> None:
        super().__init__()
        self.whisper = whisper_encoder
        self.window_frames = 2 * whisper_encoder.config.max_source_positions  # it accepts exactly this many

    @classmethod
    def from_directory(cls, directory: str | Path) -> HFWhisperEncoder:
        """Load the encoder of a Whisper directory (a full Whisper checkpoint or an encoder saved alone)."""
        directory = Path(directory)
        encoder = WhisperEncoder(WhisperConfig.from_pretrained(directory))
        state = {}
        for file in sorted(directory.glob("*.safetensors")):
            for name, tensor in load_file(file).items():
                for prefix in _PREFIXES:
                    if name.startswith(prefix):
                        name = name[len(prefix):]
                        break
                state[name] = tensor.float()
        encoder.load_state_dict({k: v for k, v in state.items() if k in encoder.state_dict()}, strict=True)
        return cls(encoder)

    def save(self, directory: str | Path) -> None:
        self.whisper.save_pretrained(directory)

    @property
    def output_dim(self) -> int:
        return self.whisper.config.d_model

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor,
                chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if chunk_size:
            raise ValueError("the Whisper encoder has no chunked (streaming) mode")
        if features.shape[-1] > self.window_frames:
            raise ValueError(f"audio longer than the encoder window ({self.window_frames} frames)")
        padded = F.pad(features, (0, self.window_frames - features.shape[-1]))
        states = self.whisper(padded).last_hidden_state
        lengths = torch.div(feature_lengths + 1, 2, rounding_mode="floor")  # its conv stride is 2
        return states[:, : int(lengths.max())], lengths
