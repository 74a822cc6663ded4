"""Pretraining the parts, as real Speech-LLMs are built from pretrained pieces:

1. `pretrain_llm`: a byte-level BPE tokenizer and a tiny Qwen2 trained as a text LM on all 12
   languages (`<|xx|> text <|endoftext|>`), like a multilingual LLM that already knows spelling,
   and on a reading task (misspelt text spelt out → the text; see speechllm/prompt.py), which gives
   it the copying ability that real LLMs bring and the audio prompt relies on.
2. `pretrain_encoder`: the speech encoder trained with CTC over characters on the high- and
   mid-tier train speech only, with dynamic chunk sizes so that one encoder serves both the
   full-attention and the chunked (streaming) mode.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from speechllm.data import length_batches, load_features, read_manifest, spec_augment
from speechllm.encoder import EncoderConfig, SpeechEncoder
from speechllm.languages import BY_CODE, Tier
from speechllm.llm import LLMDims, new_qwen2
from speechllm.prompt import lm_prefix_ids, prompt_suffix_ids, spelled_ids, target_ids
from speechllm.tokenizer import train_tokenizer
from speechllm.training import CurveLog, autocast, default_device, make_optimizer, optimizer_step


def misspell(text: str, alphabet: str, rng: random.Random, rate: float) -> str:
    """Drop, substitute or double characters at `rate`, like the errors of a CTC-compressed prompt."""
    out = []
    for c in text:
        r = rng.random()
        if r < rate / 3:
            continue
        if r < 2 * rate / 3:
            c = rng.choice(alphabet)
        elif r < rate:
            out.append(c)
        out.append(c)
    return "".join(out)


def reading_row(tokenizer: PreTrainedTokenizerBase, text: str, language: str, spelling: str) -> tuple[list[int], int]:
    """The reading task: the spelling where the audio goes, then the ASR prompt and the text.
    Returns the ids and how many of them are prompt (not trained on)."""
    prompt = spelled_ids(tokenizer, spelling) + prompt_suffix_ids(tokenizer, language)
    return prompt + target_ids(tokenizer, text), len(prompt)


def padded_batch(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and labels for rows of (ids, number of leading ids that are not predicted)."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad)
    labels = torch.full((len(rows), length), -100)
    for i, (row, given) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, max(given, 1): len(row)] = torch.tensor(row[max(given, 1):])
    return ids, labels


def pretrain_llm(corpus_dir: Path, out_dir: Path, steps: int = 4000, batch_size: int = 128, lr: float = 2e-3,
                 vocab_size: int = 4096, misspelling_rate: float = 0.1, seed: int = 0) -> None:
    """Alternate batches of the text LM task and of the reading task (half the size: its rows are
    about three times longer). Every 500 steps the reading task's token accuracy on dev phrases is
    logged: it tells whether the LLM has learnt to read before any audio is attached."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    texts = read_manifest(corpus_dir / "lm_text.jsonl")
    alphabets = {code: "".join(sorted({c for t in texts if t["language"] == code for c in t["text"]}))
                 for code in {t["language"] for t in texts}}
    tokenizer = train_tokenizer((t["text"] for t in texts), vocab_size=vocab_size)
    lm_rows = [(lm_prefix_ids(tokenizer, t["language"]) + target_ids(tokenizer, t["text"]), 1) for t in texts]

    def reading(entry: dict) -> tuple[list[int], int]:
        spelling = misspell(entry["text"], alphabets[entry["language"]], rng, misspelling_rate)
        return reading_row(tokenizer, entry["text"], entry["language"], spelling)

    dev_rows = [reading(e) for e in read_manifest(corpus_dir / "dev.jsonl")[::3]]
    device = default_device()
    llm = new_qwen2(tokenizer, LLMDims()).to(device).train()
    optimizer, scheduler = make_optimizer(list(llm.parameters()), lr, steps, warmup=200)
    log = CurveLog(out_dir / "curve.jsonl")
    for step in (bar := tqdm(range(steps), desc="pretrain-llm", unit="step")):
        task = "reading" if step % 2 else "lm"
        rows = [reading(e) for e in rng.sample(texts, batch_size // 2)] if step % 2 else rng.sample(lm_rows, batch_size)
        ids, labels = padded_batch(rows, tokenizer.pad_token_id)
        with autocast(device):
            loss = llm(input_ids=ids.to(device), labels=labels.to(device)).loss
        optimizer_step(loss, list(llm.parameters()), optimizer, scheduler, max_norm=1.0)
        if step % 50 < 2:
            bar.set_postfix({task: f"{loss.item():.3f}"})
            log.write(step=step, **{f"{task}_loss": loss.item()})
        if (step + 1) % 500 == 0 or step + 1 == steps:
            log.write(step=step + 1, dev_reading_accuracy=reading_accuracy(llm, dev_rows, tokenizer.pad_token_id))
    llm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@torch.no_grad()
def reading_accuracy(llm: PreTrainedModel, rows: list[tuple[list[int], int]], pad: int) -> float:
    """Teacher-forced next-token accuracy on the transcript part of reading-task rows."""
    llm.eval()
    correct = total = 0
    device = next(llm.parameters()).device
    for start in range(0, len(rows), 64):
        ids, labels = padded_batch(rows[start: start + 64], pad)
        predicted = llm(input_ids=ids.to(device)).logits[:, :-1].argmax(-1).cpu()
        scored = labels[:, 1:] != -100
        correct += int((predicted == labels[:, 1:])[scored].sum())
        total += int(scored.sum())
    llm.train()
    return correct / max(total, 1)


class CTCModel(nn.Module):
    def __init__(self, config: EncoderConfig, n_symbols: int) -> None:
        super().__init__()
        self.encoder = SpeechEncoder(config)
        self.head = nn.Linear(config.d_model, n_symbols + 1)  # + blank (index 0)


def char_vocabulary(entries: list[dict]) -> list[str]:
    return sorted({c for e in entries for c in e["text"]})


def sample_chunk_size(rng: random.Random) -> int:
    """Dynamic chunk training: half the batches see full attention (0), half a random chunk size."""
    return 0 if rng.random() < 0.5 else rng.randint(4, 25)


def pretrain_encoder(corpus_dir: Path, out_dir: Path, steps: int = 6000, max_frames: int = 16000,
                     lr: float = 1.5e-3, config: EncoderConfig | None = None, seed: int = 0) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    config = config or EncoderConfig()
    train = load_features(corpus_dir, "train")
    keep = [i for i, e in enumerate(train.entries) if BY_CODE[e["language"]].tier != Tier.LOW]
    train = train.subset(keep)
    symbols = char_vocabulary(train.entries)
    index = {c: i + 1 for i, c in enumerate(symbols)}
    device = default_device()
    model = CTCModel(config, len(symbols)).to(device).train()
    optimizer, scheduler = make_optimizer(list(model.parameters()), lr, steps, warmup=min(500, steps // 10))
    log = CurveLog(out_dir / "curve.jsonl")
    bar = tqdm(total=steps, desc="pretrain-encoder", unit="step")
    step = 0
    while step < steps:
        for batch in length_batches(train.lengths(), max_frames, rng):
            features, lengths = train.batch(batch)
            features = spec_augment(features, generator)
            targets = [torch.tensor([index[c] for c in train.entries[i]["text"]]) for i in batch]
            with autocast(device):
                states, out_lengths = model.encoder(features.to(device), lengths.to(device),
                                                    chunk_size=sample_chunk_size(rng))
                logits = model.head(states)
            log_probs = logits.float().log_softmax(-1).transpose(0, 1)
            loss = F.ctc_loss(log_probs, torch.cat(targets).to(device), out_lengths,
                              torch.tensor([len(t) for t in targets]), zero_infinity=True)
            optimizer_step(loss, list(model.parameters()), optimizer, scheduler, max_norm=5.0)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                log.write(step=step, loss=loss.item())
            step += 1
            bar.update()
            if step >= steps:
                break
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, out_dir / "encoder.safetensors")
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, out_dir / "ctc_head.safetensors")
    (out_dir / "encoder.json").write_text(json.dumps({"config": asdict(config), "symbols": symbols}, indent=1))


@torch.no_grad()
def ctc_dev_cer(corpus_dir: Path, encoder_dir: Path, per_language: int = 50, chunk_size: int = 0) -> dict[str, float]:
    """Greedy CTC character error rate of the pretrained encoder on the dev split (high and mid tiers):
    how good the acoustic representation is before the LLM is attached."""
    import jiwer

    meta = json.loads((encoder_dir / "encoder.json").read_text())
    symbols = meta["symbols"]
    model = CTCModel(EncoderConfig(**meta["config"]), len(symbols)).eval()
    model.encoder.load_state_dict(load_file(encoder_dir / "encoder.safetensors"))
    model.head.load_state_dict(load_file(encoder_dir / "ctc_head.safetensors"))
    dev = load_features(corpus_dir, "dev")
    rates = {}
    for code in [c for c, lang in BY_CODE.items() if lang.tier != Tier.LOW]:
        rows = [i for i, e in enumerate(dev.entries) if e["language"] == code][:per_language]
        features, lengths = dev.batch(rows)
        states, out_lengths = model.encoder(features, lengths, chunk_size=chunk_size)
        best = model.head(states).argmax(-1)
        hypotheses = []
        for row, length in zip(best, out_lengths, strict=True):
            ids = torch.unique_consecutive(row[:length]).tolist()
            hypotheses.append("".join(symbols[i - 1] for i in ids if i > 0))
        rates[code] = jiwer.cer([dev.entries[i]["text"] for i in rows], hypotheses)
    return rates
