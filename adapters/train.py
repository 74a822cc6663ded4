"""Zipper-LoRA training, both stages (DESIGN.md §1), by one training loop.

Stage 1 (`train_stage1`): projector + one fully shared LoRA on the LLM + the LID head, on top of the
pretrained encoder (frozen) and LLM, trained on the imbalanced 12-language ASR mix.

Stage 2 (`train_adapters`): from the stage-1 model, a Zipper variant (static, hard, soft) or a
baseline (shared: the stage-1 LoRA trained on; independent: one LoRA per language, each seeing only
its own language's rows). Initial-B warm start: A ← A, B_s ← B, every B_l ← B (and for independent,
A_l ← A, B_l ← B); the ablation `init_b="zero"` keeps A and starts every B at zero, as a freshly
initialised LoRA does. Only adapter tensors train in stage 2; projector, LID head and encoder stay.

Language sampling: `sampling_temperature` τ draws each epoch's rows with per-language probability
∝ n_l^τ (τ = 1: the natural mix, every train utterance once per epoch, the extremely low tier ≈ 1 %
as often as a high-resource language, the paper's setting; τ < 1 upsamples the low tiers).
Model selection: the step with the lowest average dev CER (dev split only; test is never read).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from adapters.evaluate import evaluate_features
from adapters.zipper import Variant, ZipperConfig, is_adapter_tensor, sharing_penalty, use_languages, zipper_layers
from speechllm.data import FeatureSet, length_batches, load_features, spec_augment
from speechllm.encoder import EncoderConfig
from speechllm.model import SpeechLLM, SpeechLLMConfig
from speechllm.pretrain import sample_chunk_size
from speechllm.prompt import character_ids, target_ids
from speechllm.training import CurveLog, autocast, default_device, make_optimizer, optimizer_step

LID_LOSS_WEIGHT = 0.3
UNKNOWN_LANGUAGE_RATE = 0.1  # rows prompted <|unknown|> (and served by B_s alone), as untagged audio is


@dataclass
class TrainSettings:
    steps: int = 2500
    max_frames: int = 16000
    lr: float = 1e-3
    eval_every: int = 500
    dev_per_language: int = 20
    sampling_temperature: float = 1.0
    seed: int = 0


@dataclass
class Stage1Settings(TrainSettings):
    rank: int = 16
    alpha: float = 32.0
    train_encoder: bool = False
    ctc_compress: bool = True


@dataclass
class Stage2Settings(TrainSettings):
    variant: Variant = Variant.SOFT
    init_b: str = "warm"  # "warm": Initial-B from stage 1; "zero": the ablation
    static_shared_ranks: int = 8
    # Adam moves a parameter by about lr per step, whatever its gradient: at lr 5e-4 a router logit moves
    # ~0.1 in 250 steps, and a gate only changes sides once its logit (±2 at the start) crosses 0.
    router_lr_scale: float = 1.0
    # Weight of `sharing_penalty` in the loss (0: none). Without it, routers that may move (router_lr_scale 100)
    # learn to stop sharing, the extremely low tier included (docs/model.md).
    router_sharing_weight: float = 0.0
    # Each language's share of that prior: (n_min / n_l) ** power, n_l its training clips (0: the same for all;
    # 0.5: a language with 1 % of another's data is pulled 10× harder).
    router_sharing_data_power: float = 0.0
    extra: dict = field(default_factory=dict)


def build_stage1_model(llm_dir: Path, encoder_dir: Path, settings: Stage1Settings) -> SpeechLLM:
    encoder_meta = json.loads((encoder_dir / "encoder.json").read_text())
    adapter = ZipperConfig(variant=Variant.SHARED, rank=settings.rank, alpha=settings.alpha)
    config = SpeechLLMConfig(encoder=EncoderConfig(**encoder_meta["config"]), adapter=adapter,
                             ctc_symbols=len(encoder_meta["symbols"]) + 1 if settings.ctc_compress else 0,
                             soft_spelling=settings.ctc_compress)
    model = SpeechLLM.assemble(config, llm_dir)
    model.encoder.load_state_dict(load_file(encoder_dir / "encoder.safetensors"))
    model.encoder.requires_grad_(settings.train_encoder)
    if model.ctc_head is not None:  # the CTC head from encoder pretraining decides which frames the LLM reads
        model.ctc_head.load_state_dict(load_file(encoder_dir / "ctc_head.safetensors"))
        model.ctc_head.requires_grad_(False)
        model.projector.start_from_spelling(symbol_embeddings(model, encoder_meta["symbols"]))
    return model


@torch.no_grad()
def symbol_embeddings(model: SpeechLLM, symbols: list[str]) -> torch.Tensor:
    """One LLM input embedding per CTC symbol: blank (index 0) is zero, a character is the mean
    embedding of its tokens."""
    table = torch.zeros(len(symbols) + 1, model.projector.symbol_embeddings.embedding_dim)
    for index, symbol in enumerate(symbols, start=1):
        table[index] = model.embed_tokens(torch.tensor(character_ids(model.tokenizer, symbol))).mean(0)
    return table


@torch.no_grad()
def build_stage2_model(stage1_dir: Path, settings: Stage2Settings) -> SpeechLLM:
    """The stage-1 model with its shared LoRA replaced by `settings.variant`, warm-started from it."""
    stage1_config = json.loads((stage1_dir / "config.json").read_text())["adapter"]
    adapter = ZipperConfig(variant=settings.variant, rank=stage1_config["rank"], alpha=stage1_config["alpha"],
                           static_shared_ranks=settings.static_shared_ranks)
    model = SpeechLLM.load(stage1_dir, adapter=adapter)
    shared = load_file(stage1_dir / "adapter.safetensors")
    for name, layer in zipper_layers(model.llm):
        a, b = shared[f"{name}.lora_A"].float(), shared[f"{name}.lora_B_shared"].float()
        b = b if settings.init_b == "warm" else torch.zeros_like(b)
        layer.lora_A.copy_(a.expand_as(layer.lora_A))
        if hasattr(layer, "lora_B_shared"):
            layer.lora_B_shared.copy_(b)
        if hasattr(layer, "lora_B_language"):
            layer.lora_B_language.copy_(b.expand_as(layer.lora_B_language))
    model.requires_grad_(False)
    for name, param in model.llm.named_parameters():
        param.requires_grad_(is_adapter_tensor(name))
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
    keep = [i for indices in dev.rows_by_language().values()
            for i in sorted(rng.sample(indices, min(per_language, len(indices))))]
    return dev.subset(keep)


def epoch_indices(entries: list[dict], temperature: float, rng: random.Random) -> list[int]:
    """One epoch's rows: all of them (τ = 1), or as many drawn with language probability ∝ n_l^τ."""
    if temperature == 1.0:
        return list(range(len(entries)))
    by_language: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        by_language.setdefault(entry["language"], []).append(i)
    weights = {code: len(rows) ** temperature for code, rows in by_language.items()}
    total = sum(weights.values())
    codes = list(by_language)
    drawn = rng.choices(codes, weights=[weights[c] / total for c in codes], k=len(entries))
    return [rng.choice(by_language[code]) for code in drawn]


def _trained_state(model: SpeechLLM) -> dict[str, torch.Tensor]:
    """Everything training may change: all but the frozen base LLM."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("llm.") or is_adapter_tensor(k)}


def parameter_groups(model: SpeechLLM, settings: TrainSettings) -> list[dict]:
    """The trainable parameters; the routers and the language embedding they read at
    `router_lr_scale` times the learning rate (stage 2)."""
    scale = getattr(settings, "router_lr_scale", 1.0)
    groups: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[".router." in name or "zipper_language_embedding" in name].append(param)
    return [{"params": groups[False], "lr": settings.lr}] + (
        [{"params": groups[True], "lr": settings.lr * scale}] if groups[True] else [])


def sharing_prior_weights(entries: list[dict], languages: tuple[str, ...], settings: TrainSettings
                          ) -> torch.Tensor | None:
    """Per-language weights of the routers' prior towards sharing (Stage2Settings), or None without one."""
    if not getattr(settings, "router_sharing_weight", 0.0):
        return None
    counts = Counter(entry["language"] for entry in entries)
    clips = torch.tensor([float(counts[code]) for code in languages])
    return (clips.min() / clips) ** settings.router_sharing_data_power


def train_loop(model: SpeechLLM, corpus_dir: Path, out_dir: Path, settings: TrainSettings, description: str,
               train_lid: bool) -> dict:
    """Train `model`'s trainable parameters on the ASR mix; keep the best dev-CER state; save the model."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    device = default_device()
    model.to(device)
    train = load_features(corpus_dir, "train")
    dev = dev_subset(load_features(corpus_dir, "dev"), settings.dev_per_language, settings.seed)
    language_ids = {code: i for i, code in enumerate(model.config.languages)}
    sharing_weights = sharing_prior_weights(train.entries, model.config.languages, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(parameter_groups(model, settings), settings.lr, settings.steps,
                                          warmup=200)
    log = CurveLog(out_dir / "curve.jsonl")
    best: dict = {"dev_cer": float("inf")}
    step = 0
    bar = tqdm(total=settings.steps, desc=description, unit="step")
    while step < settings.steps:
        rows = epoch_indices(train.entries, settings.sampling_temperature, rng)
        for positions in length_batches(train.lengths()[rows], settings.max_frames, rng):
            batch = [rows[p] for p in positions]
            model.train()
            model.encoder.train(any(p.requires_grad for p in model.encoder.parameters()))
            entries = [train.entries[i] for i in batch]
            features, lengths = train.batch(batch)
            features = spec_augment(features, generator).to(device)
            truth = torch.tensor([language_ids[e["language"]] for e in entries], device=device)
            prompt_languages = [None if rng.random() < UNKNOWN_LANGUAGE_RATE else e["language"] for e in entries]
            adapter_rows = torch.tensor([-1 if p is None else t for p, t in zip(prompt_languages, truth.tolist(),
                                                                               strict=True)], device=device)
            with autocast(device):
                with torch.set_grad_enabled(any(p.requires_grad for p in model.encoder.parameters())):
                    states, state_lengths = model.encode(features, lengths.to(device), sample_chunk_size(rng))
                with use_languages(model.llm, adapter_rows):
                    asr = asr_loss(model, states, state_lengths, [e["text"] for e in entries], prompt_languages)
                loss = asr
                if sharing_weights is not None:
                    penalty = sharing_penalty(model.llm, sharing_weights).to(asr.device)
                    loss = loss + settings.router_sharing_weight * penalty
                if train_lid:
                    lid = F.cross_entropy(model.language_logits(states, state_lengths).float(), truth)
                    loss = loss + LID_LOSS_WEIGHT * lid
            optimizer_step(loss, trainable, optimizer, scheduler, max_norm=1.0)
            step += 1
            bar.update()
            if step % 25 == 0:
                bar.set_postfix(asr=f"{asr.item():.3f}")
                log.write(step=step, asr_loss=asr.item(), **({"lid_loss": lid.item()} if train_lid else {}))
            if step % settings.eval_every == 0 or step == settings.steps:
                report = evaluate_features(model, dev)
                log.write(step=step, dev_cer=report["average"]["cer"], dev_lid=report["lid_accuracy"],
                          **{f"dev_cer_{tier}": r["cer"] for tier, r in report["tiers"].items()})
                tqdm.write(f"step {step}: dev CER {report['average']['cer']:.4f}, LID {report['lid_accuracy']:.3f}")
                if report["average"]["cer"] < best["dev_cer"]:
                    best = {"dev_cer": report["average"]["cer"], "step": step, "state": _trained_state(model)}
                    model.save(out_dir / "model")  # the best so far is on disk, should the run be stopped
            if step >= settings.steps:
                break
    model.load_state_dict(best.pop("state"), strict=False)  # the best step's trained tensors
    model.save(out_dir / "model")
    trainable_count = sum(p.numel() for p in trainable)
    summary = {"best_step": best["step"], "best_dev_cer": best["dev_cer"], "trainable_parameters": trainable_count,
               "settings": json.loads(json.dumps(asdict(settings), default=str))}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def resume_stage1_model(model_dir: Path) -> SpeechLLM:
    """A saved stage-1 model, set up to train on: projector, LID head and the shared LoRA."""
    model = SpeechLLM.load(model_dir)
    model.requires_grad_(False)
    for module in (model.projector, model.lid_head):
        module.requires_grad_(True)
    for name, param in model.llm.named_parameters():
        param.requires_grad_(is_adapter_tensor(name))
    return model


def train_stage1(corpus_dir: Path, llm_dir: Path, encoder_dir: Path, out_dir: Path,
                 settings: Stage1Settings | None = None, resume_from: Path | None = None) -> dict:
    settings = settings or Stage1Settings()
    torch.manual_seed(settings.seed)
    model = resume_stage1_model(resume_from) if resume_from else build_stage1_model(llm_dir, encoder_dir, settings)
    return train_loop(model, corpus_dir, out_dir, settings, "train stage 1 (shared LoRA)", train_lid=True)


def train_adapters(corpus_dir: Path, stage1_dir: Path, out_dir: Path, settings: Stage2Settings) -> dict:
    torch.manual_seed(settings.seed)
    model = build_stage2_model(stage1_dir, settings)
    description = f"train stage 2 ({settings.variant.value}, {settings.init_b} B)"
    return train_loop(model, corpus_dir, out_dir, settings, description, train_lid=False)
