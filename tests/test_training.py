"""Stage-2 set-up: Initial-B warm start, the zero-B ablation, what trains, and language sampling."""

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from adapters.train import Stage2Settings, build_stage2_model, epoch_indices, parameter_groups
from adapters.zipper import Variant, ZipperConfig, merge_language, zipper_layers
from tests.conftest import tiny_speech_llm


@pytest.fixture(scope="module")
def stage1_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    model = tiny_speech_llm(tiny_tokenizer, adapter=ZipperConfig(variant=Variant.SHARED, rank=4, alpha=8.0))
    torch.manual_seed(11)
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    directory = tmp_path_factory.mktemp("stage1")
    model.save(directory, dtype=torch.float32)
    return directory


@pytest.mark.parametrize("variant", [Variant.STATIC, Variant.HARD, Variant.SOFT, Variant.INDEPENDENT, Variant.SHARED])
def test_initial_b_starts_every_language_at_the_stage1_lora(stage1_dir: Path, variant: Variant) -> None:
    stage1 = build_stage2_model(stage1_dir, Stage2Settings(variant=Variant.SHARED))
    model = build_stage2_model(stage1_dir, Stage2Settings(variant=variant, static_shared_ranks=2))
    reference = merge_language(stage1.llm, 0).b
    for language in range(len(model.config.languages)):
        merged = merge_language(model.llm, language)
        assert all(torch.allclose(b, r) for b, r in zip(merged.b, reference, strict=True))
        if merged.a is not None:  # independent: A_l ← A
            assert all(torch.allclose(a, layer.lora_A[0]) for a, (_, layer) in
                       zip(merged.a, zipper_layers(model.llm), strict=True))


def test_zero_b_ablation_starts_at_the_base_model(stage1_dir: Path) -> None:
    model = build_stage2_model(stage1_dir, Stage2Settings(variant=Variant.SOFT, init_b="zero"))
    assert all((b == 0).all() for b in merge_language(model.llm, 3).b)


def test_only_adapter_tensors_train_in_stage2(stage1_dir: Path) -> None:
    model = build_stage2_model(stage1_dir, Stage2Settings(variant=Variant.HARD))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "router" in n or "language_embedding" in n for n in trainable)


def test_routers_may_learn_faster_than_the_lora_factors(stage1_dir: Path) -> None:
    model = build_stage2_model(stage1_dir, Stage2Settings(variant=Variant.SOFT))
    settings = Stage2Settings(variant=Variant.SOFT, lr=1e-3, router_lr_scale=100)
    factors, routing = parameter_groups(model, settings)
    assert (factors["lr"], routing["lr"]) == (1e-3, 0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    assert all(".router." in names[id(p)] or "language_embedding" in names[id(p)] for p in routing["params"])
    assert all("lora_" in names[id(p)] for p in factors["params"])
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(factors["params"]) + len(routing["params"]) == trainable
    shared = build_stage2_model(stage1_dir, Stage2Settings(variant=Variant.SHARED))
    assert len(parameter_groups(shared, Stage2Settings(variant=Variant.SHARED))) == 1  # nothing to route


def test_language_sampling_temperature() -> None:
    entries = [{"language": "en"}] * 1000 + [{"language": "ar"}] * 10
    assert epoch_indices(entries, 1.0, random.Random(0)) == list(range(1010))
    flat = Counter(entries[i]["language"] for i in epoch_indices(entries, 0.0, random.Random(0)))
    assert 0.4 < flat["ar"] / 1010 < 0.6  # τ = 0: languages drawn uniformly
