"""Training data: a manifest's utterances as cached log-mel features, batched by length."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from speechllm.audio import load_audio
from speechllm.features import log_mel_spectrogram, pad_features


def read_manifest(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def write_manifest(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@dataclass
class FeatureSet:
    """All utterances of one split: features concatenated along time (fp16), with offsets."""

    entries: list[dict]
    features: torch.Tensor  # (total_frames, n_mels)
    offsets: torch.Tensor  # (N + 1,)

    def __len__(self) -> int:
        return len(self.entries)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def item(self, index: int) -> torch.Tensor:
        return self.features[self.offsets[index]: self.offsets[index + 1]].float().T  # (n_mels, T)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded features (B, n_mels, T) and lengths (B,)."""
        return pad_features([self.item(i) for i in indices])

    def rows_by_language(self) -> dict[str, list[int]]:
        """Each language's utterance indices, in order."""
        rows: dict[str, list[int]] = {}
        for index, entry in enumerate(self.entries):
            rows.setdefault(entry["language"], []).append(index)
        return rows

    def save(self, corpus_dir: str | Path, split: str) -> None:
        """Write this set as the split of a corpus of its own: its manifest and its feature cache, which
        load_features reads without the audio (a subset carried to a machine without the corpus)."""
        corpus_dir = Path(corpus_dir)
        corpus_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(corpus_dir / f"{split}.jsonl", self.entries)
        self.save_features(corpus_dir, split)

    def save_features(self, corpus_dir: Path, split: str) -> None:
        cache = _feature_cache(corpus_dir, split)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": self.features, "offsets": self.offsets}, cache)

    @classmethod
    def from_parts(cls, entries: list[dict], parts: list[torch.Tensor]) -> FeatureSet:
        """The set of utterances `entries` whose features are `parts` ((frames, n_mels) each)."""
        lengths = torch.tensor([len(p) for p in parts])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        return cls(entries, torch.cat(parts), offsets)

    def subset(self, keep: list[int]) -> FeatureSet:
        return FeatureSet.from_parts([self.entries[i] for i in keep],
                                     [self.features[self.offsets[i]: self.offsets[i + 1]] for i in keep])


def load_features(corpus_dir: str | Path, split: str) -> FeatureSet:
    """Features of a split, computed once and cached under corpus_dir/features/."""
    corpus_dir = Path(corpus_dir)
    entries = read_manifest(corpus_dir / f"{split}.jsonl")
    cache = _feature_cache(corpus_dir, split)
    if cache.exists():
        tensors = load_file(cache)
        if len(tensors["offsets"]) == len(entries) + 1:
            return FeatureSet(entries, tensors["features"], tensors["offsets"])
    parts = [log_mel_spectrogram(load_audio(corpus_dir / e["audio"])).T.half()
             for e in tqdm(entries, desc=f"features {split}", unit="utt")]
    data = FeatureSet.from_parts(entries, parts)
    data.save_features(corpus_dir, split)
    return data


def _feature_cache(corpus_dir: Path, split: str) -> Path:
    return corpus_dir / "features" / f"{split}.safetensors"


def length_batches(lengths: torch.Tensor, max_frames: int, rng: random.Random) -> Iterator[list[int]]:
    """Shuffled batches of similar-length utterances, each at most `max_frames` padded frames."""
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]) + rng.random() * 20))
    batches, current, longest = [], [], 0
    for index in order:
        longest_if_added = max(longest, int(lengths[index]))
        if current and longest_if_added * (len(current) + 1) > max_frames:
            batches.append(current)
            current, longest_if_added = [], int(lengths[index])
        current.append(index)
        longest = longest_if_added
    if current:
        batches.append(current)
    rng.shuffle(batches)
    yield from batches


def spec_augment(features: torch.Tensor, rng: torch.Generator, freq_masks: int = 2, freq_width: int = 10,
                 time_masks: int = 2, time_width: int = 20) -> torch.Tensor:
    """SpecAugment-style masking on (B, n_mels, T), in place on a copy; masked bins are set to 0."""
    features = features.clone()
    batch, n_mels, frames = features.shape
    for row in range(batch):
        for _ in range(freq_masks):
            width = int(torch.randint(0, freq_width + 1, (1,), generator=rng))
            start = int(torch.randint(0, max(n_mels - width, 1), (1,), generator=rng))
            features[row, start: start + width] = 0
        for _ in range(time_masks):
            width = int(torch.randint(0, min(time_width, frames // 5) + 1, (1,), generator=rng))
            start = int(torch.randint(0, max(frames - width, 1), (1,), generator=rng))
            features[row, :, start: start + width] = 0
    return features
