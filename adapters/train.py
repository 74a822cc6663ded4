"""Zipper-LoRA training. Stage 1 (here): projector + one fully shared LoRA on the LLM + the LID
head, trained on the imbalanced 12-language ASR mix, on top of the pretrained encoder and LLM.

Language sampling in stage 1 is the natural mix: every train utterance once per epoch, so the
extremely low-resource tier is seen ~1% as often as a high-resource language (the paper's setting).
Model selection: the checkpoint with the lowest dev CER (dev split only; the test split is never read).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from adapters.evaluate import evaluate_features
from adapters.zipper import Variant, ZipperConfig, use_languages
from speechllm.data import FeatureSet, length_batches, load_features, spec_augment
from speechllm.encoder import EncoderConfig
from speechllm.model import SpeechLLM, SpeechLLMConfig
from speechllm.pretrain import sample_chunk_size
from speechllm.prompt import target_ids
from speechllm.training import CurveLog, autocast, default_device, make_optimizer, optimizer_step

LID_LOSS_WEIGHT = 0.3
UNKNOWN_LANGUAGE_RATE = 0.1  # rows trained with <|unknown|>: the model also transcribes untagged audio


@dataclass
class Stage1Settings:
    steps: int = 4000
    max_frames: int = 16000
    lr: float = 1e-3
    rank: int = 16
    alpha: float = 32.0
    eval_every: int = 500
    dev_per_language: int = 20
    train_encoder: bool = False
    seed: int = 0


def build_stage1_model(llm_dir: Path, encoder_dir: Path, settings: Stage1Settings) -> SpeechLLM:
    encoder_meta = json.loads((encoder_dir / "encoder.json").read_text())
    adapter = ZipperConfig(variant=Variant.SHARED, rank=settings.rank, alpha=settings.alpha)
    config = SpeechLLMConfig(encoder=EncoderConfig(**encoder_meta["config"]), adapter=adapter)
    model = SpeechLLM.assemble(config, llm_dir)
    model.encoder.load_state_dict(load_file(encoder_dir / "encoder.safetensors"))
    model.encoder.requires_grad_(settings.train_encoder)
    return model


def asr_loss(model: SpeechLLM, states: torch.Tensor, lengths: torch.Tensor, texts: list[str],
             languages: list[str | None]) -> torch.Tensor:
    """Next-token loss on the transcript (and end-of-text) after each row's audio + prompt."""
    audio, audio_lengths = model.audio_embeddings(states, lengths)
    prompts = model.prompt_embeddings(audio, audio_lengths, languages)
    targets = [torch.tensor(target_ids(model.tokenizer, t), device=audio.device) for t in texts]
    rows = [torch.cat([p, model.embed_tokens(t)]) for p, t in zip(prompts, targets, strict=True)]
    length = max(r.shape[0] for r in rows)
    embeds = audio.new_zeros(len(rows), length, audio.shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=audio.device)
    labels = torch.full((len(rows), length), -100, device=audio.device)
    for i, (row, prompt, target) in enumerate(zip(rows, prompts, targets, strict=True)):
        embeds[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, len(prompt) - 1: len(row) - 1] = target  # position t predicts token t + 1
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def dev_subset(dev: FeatureSet, per_language: int, seed: int) -> FeatureSet:
    rng = random.Random(seed)
    by_language: dict[str, list[int]] = {}
    for i, entry in enumerate(dev.entries):
        by_language.setdefault(entry["language"], []).append(i)
    keep = [i for indices in by_language.values() for i in sorted(rng.sample(indices, min(per_language, len(indices))))]
    return dev.subset(keep)


def train_stage1(corpus_dir: Path, llm_dir: Path, encoder_dir: Path, out_dir: Path,
                 settings: Stage1Settings | None = None) -> dict:
    settings = settings or Stage1Settings()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    device = default_device()
    model = build_stage1_model(llm_dir, encoder_dir, settings).to(device)
    train = load_features(corpus_dir, "train")
    dev = dev_subset(load_features(corpus_dir, "dev"), settings.dev_per_language, settings.seed)
    language_ids = {code: i for i, code in enumerate(model.config.languages)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, settings.lr, settings.steps, warmup=200)
    log = CurveLog(out_dir / "curve.jsonl")
    best: dict = {"dev_cer": float("inf")}
    step = 0
    bar = tqdm(total=settings.steps, desc="train stage 1 (shared LoRA)", unit="step")
    while step < settings.steps:
        for batch in length_batches(train.lengths(), settings.max_frames, rng):
            model.train()
            model.encoder.train(settings.train_encoder)  # a frozen encoder runs as it will in service
            entries = [train.entries[i] for i in batch]
            features, lengths = train.batch(batch)
            features = spec_augment(features, generator).to(device)
            truth = torch.tensor([language_ids[e["language"]] for e in entries], device=device)
            prompt_languages = [None if rng.random() < UNKNOWN_LANGUAGE_RATE else e["language"] for e in entries]
            with autocast(device):
                with torch.set_grad_enabled(settings.train_encoder):
                    states, state_lengths = model.encode(features, lengths.to(device), sample_chunk_size(rng))
                lid = F.cross_entropy(model.language_logits(states, state_lengths).float(), truth)
                with use_languages(model.llm, truth):
                    asr = asr_loss(model, states, state_lengths, [e["text"] for e in entries], prompt_languages)
                loss = asr + LID_LOSS_WEIGHT * lid
            optimizer_step(loss, trainable, optimizer, scheduler, max_norm=1.0)
            step += 1
            bar.update()
            if step % 25 == 0:
                bar.set_postfix(asr=f"{asr.item():.3f}", lid=f"{lid.item():.3f}")
                log.write(step=step, asr_loss=asr.item(), lid_loss=lid.item())
            if step % settings.eval_every == 0 or step == settings.steps:
                report = evaluate_features(model, dev)
                log.write(step=step, dev_cer=report["average"]["cer"], dev_lid=report["lid_accuracy"])
                tqdm.write(f"step {step}: dev CER {report['average']['cer']:.4f}, LID {report['lid_accuracy']:.3f}")
                if report["average"]["cer"] < best["dev_cer"]:
                    best = {"dev_cer": report["average"]["cer"], "step": step,
                            "state": copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()
                                                    if not k.startswith("llm.") or "lora_" in k})}
            if step >= settings.steps:
                break
    model.load_state_dict(best.pop("state"), strict=False)  # the best projector, LID head and LoRA
    model.save(out_dir / "model")
    summary = {"best_step": best["step"], "best_dev_cer": best["dev_cer"], "settings": settings.__dict__}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
